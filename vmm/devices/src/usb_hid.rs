//! USB HID devices: an absolute-pointing tablet and a boot-protocol keyboard.
//!
//! Emulated: full-speed devices 0627:0001 with one configuration, one HID interface and one
//! interrupt IN endpoint (0x81, 8 bytes, 10 ms). The tablet ("DeskVM USB Tablet") reports
//! 6 bytes: 5 buttons + 3 bits padding, X and Y as u16 LE in 0..=0x7fff (absolute), and a
//! relative wheel byte, the layout of QEMU's usb-tablet. The keyboard ("DeskVM USB
//! Keyboard") is a boot-interface keyboard whose report descriptor is the boot descriptor
//! (modifier byte, reserved byte, 6 key usages; 5 LED output bits): more than 6 keys held
//! report ErrorRollOver (0x01) in every key slot. HID class requests GET_REPORT,
//! SET_REPORT (keyboard LED output report), GET/SET_IDLE (with a period of N*4 ms the last
//! report is sent again when nothing changed for that long; 0 = only on change),
//! GET/SET_PROTOCOL, and GET_DESCRIPTOR for the HID and report descriptors. The interrupt
//! endpoint NAKs when there is nothing to report. Remote wakeup is offered and reported to
//! the controller when enabled and input is waiting.
//!
//! Input arrives through a cloneable [`HidInput`] handle that the engine keeps: pointer
//! positions coalesce (the latest position wins, button changes stay in order), keys are
//! Linux evdev codes translated to the HID keyboard page (0x07) for the full 104/105-key
//! layout plus the Japanese / Korean / Brazilian keys and a few media keys. Keyboard LEDs
//! the guest sets are readable with [`HidInput::leds`].
//!
//! Not emulated: report IDs, relative mice, consumer-page (media) keys beyond those on
//! the keyboard page, keys above usage 0xe7, and an OUT interrupt endpoint (an OUT token
//! to the keyboard's endpoint 1 is accepted as an LED report, as a convenience).

use crate::usb::{
    descriptor_type, ControlHandler, PacketResult, Pid, SetupPacket, UsbDevice, UsbDeviceCore,
    UsbSpeed,
};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

pub const VENDOR_ID: u16 = 0x0627;
pub const PRODUCT_ID: u16 = 0x0001;
/// Largest coordinate of the tablet on either axis.
pub const TABLET_MAX_COORDINATE: u16 = 0x7fff;
/// Events queued for the guest; beyond it pointer motion folds into the last event and
/// keys are dropped.
pub const INPUT_QUEUE_CAPACITY: usize = 256;

/// HID class descriptor types and requests (HID 1.11 section 7).
pub const DESCRIPTOR_HID: u8 = 0x21;
pub const DESCRIPTOR_REPORT: u8 = 0x22;
pub const HID_GET_REPORT: u8 = 0x01;
pub const HID_GET_IDLE: u8 = 0x02;
pub const HID_GET_PROTOCOL: u8 = 0x03;
pub const HID_SET_REPORT: u8 = 0x09;
pub const HID_SET_IDLE: u8 = 0x0a;
pub const HID_SET_PROTOCOL: u8 = 0x0b;
const REPORT_TYPE_INPUT: u8 = 1;
const REPORT_TYPE_OUTPUT: u8 = 2;
/// GET/SET_PROTOCOL values.
pub const PROTOCOL_BOOT: u8 = 0;
pub const PROTOCOL_REPORT: u8 = 1;
/// HID usage ErrorRollOver (keyboard page).
pub const USAGE_ERROR_ROLL_OVER: u8 = 0x01;
const KEYBOARD_DEFAULT_IDLE: u8 = 125; // 500 ms, the HID spec's recommendation
const MAX_KEYS_HELD: usize = 32;

const STRING_MANUFACTURER: u8 = 1;
const STRING_PRODUCT: u8 = 2;
const STRING_SERIAL: u8 = 3;

/// Tablet report descriptor: buttons 1..5, X / Y absolute 0..32767, wheel relative.
pub const TABLET_REPORT_DESCRIPTOR: &[u8] = &[
    0x05, 0x01, // Usage Page (Generic Desktop)
    0x09, 0x02, // Usage (Mouse)
    0xa1, 0x01, // Collection (Application)
    0x09, 0x01, //   Usage (Pointer)
    0xa1, 0x00, //   Collection (Physical)
    0x05, 0x09, //     Usage Page (Button)
    0x19, 0x01, //     Usage Minimum (1)
    0x29, 0x05, //     Usage Maximum (5)
    0x15, 0x00, //     Logical Minimum (0)
    0x25, 0x01, //     Logical Maximum (1)
    0x95, 0x05, //     Report Count (5)
    0x75, 0x01, //     Report Size (1)
    0x81, 0x02, //     Input (Data, Variable, Absolute)
    0x95, 0x01, //     Report Count (1)
    0x75, 0x03, //     Report Size (3)
    0x81, 0x01, //     Input (Constant): padding
    0x05, 0x01, //     Usage Page (Generic Desktop)
    0x09, 0x30, //     Usage (X)
    0x09, 0x31, //     Usage (Y)
    0x15, 0x00, //     Logical Minimum (0)
    0x26, 0xff, 0x7f, //     Logical Maximum (32767)
    0x35, 0x00, //     Physical Minimum (0)
    0x46, 0xff, 0x7f, //     Physical Maximum (32767)
    0x75, 0x10, //     Report Size (16)
    0x95, 0x02, //     Report Count (2)
    0x81, 0x02, //     Input (Data, Variable, Absolute)
    0x05, 0x01, //     Usage Page (Generic Desktop)
    0x09, 0x38, //     Usage (Wheel)
    0x15, 0x81, //     Logical Minimum (-127)
    0x25, 0x7f, //     Logical Maximum (127)
    0x35, 0x00, //     Physical Minimum (0): same as logical
    0x45, 0x00, //     Physical Maximum (0)
    0x75, 0x08, //     Report Size (8)
    0x95, 0x01, //     Report Count (1)
    0x81, 0x06, //     Input (Data, Variable, Relative)
    0xc0, //   End Collection
    0xc0, // End Collection
];

/// Boot keyboard report descriptor (HID 1.11 appendix B.1, key range widened to 0..255).
pub const KEYBOARD_REPORT_DESCRIPTOR: &[u8] = &[
    0x05, 0x01, // Usage Page (Generic Desktop)
    0x09, 0x06, // Usage (Keyboard)
    0xa1, 0x01, // Collection (Application)
    0x05, 0x07, //   Usage Page (Keyboard)
    0x19, 0xe0, //   Usage Minimum (Left Control)
    0x29, 0xe7, //   Usage Maximum (Right GUI)
    0x15, 0x00, //   Logical Minimum (0)
    0x25, 0x01, //   Logical Maximum (1)
    0x75, 0x01, //   Report Size (1)
    0x95, 0x08, //   Report Count (8)
    0x81, 0x02, //   Input (Data, Variable, Absolute): modifiers
    0x95, 0x01, //   Report Count (1)
    0x75, 0x08, //   Report Size (8)
    0x81, 0x01, //   Input (Constant): reserved byte
    0x95, 0x05, //   Report Count (5)
    0x75, 0x01, //   Report Size (1)
    0x05, 0x08, //   Usage Page (LEDs)
    0x19, 0x01, //   Usage Minimum (Num Lock)
    0x29, 0x05, //   Usage Maximum (Kana)
    0x91, 0x02, //   Output (Data, Variable, Absolute): LEDs
    0x95, 0x01, //   Report Count (1)
    0x75, 0x03, //   Report Size (3)
    0x91, 0x01, //   Output (Constant): padding
    0x95, 0x06, //   Report Count (6)
    0x75, 0x08, //   Report Size (8)
    0x15, 0x00, //   Logical Minimum (0)
    0x26, 0xff, 0x00, //   Logical Maximum (255)
    0x05, 0x07, //   Usage Page (Keyboard)
    0x19, 0x00, //   Usage Minimum (0)
    0x2a, 0xff, 0x00, //   Usage Maximum (255)
    0x81, 0x00, //   Input (Data, Array): key slots
    0xc0, // End Collection
];

/// Which HID device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HidKind {
    Tablet,
    Keyboard,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HidEvent {
    Pointer {
        x: u16,
        y: u16,
        buttons: u8,
        wheel: i8,
    },
    /// A keyboard-page usage (0xe0..=0xe7 are the modifiers).
    Key { usage: u8, down: bool },
}

#[derive(Default)]
struct InputState {
    events: VecDeque<HidEvent>,
    leds: u8,
}

/// The engine's side of a HID device: push host input, read the guest's keyboard LEDs.
/// Clones share the same device.
#[derive(Clone, Default)]
pub struct HidInput {
    inner: Arc<Mutex<InputState>>,
}

impl HidInput {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, InputState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tablet input: absolute position (clamped to 0..=0x7fff), buttons (bit 0 left,
    /// 1 right, 2 middle, 3 back, 4 forward) and wheel steps (positive = away from the
    /// user). Motion with unchanged buttons replaces a queued position (wheel steps add
    /// up); a button change is queued after it.
    pub fn pointer_absolute(&self, x: u16, y: u16, buttons: u8, wheel: i8) {
        let x = x.min(TABLET_MAX_COORDINATE);
        let y = y.min(TABLET_MAX_COORDINATE);
        let buttons = buttons & 0x1f;
        let mut state = self.lock();
        let full = state_is_full(state.events.len());
        if let Some(HidEvent::Pointer {
            x: last_x,
            y: last_y,
            buttons: last_buttons,
            wheel: last_wheel,
        }) = state.events.back_mut()
        {
            if *last_buttons == buttons || full {
                *last_x = x;
                *last_y = y;
                *last_buttons = buttons;
                *last_wheel = last_wheel.saturating_add(wheel);
                return;
            }
        }
        if full {
            log::debug!("usb-hid: input queue full, pointer event dropped");
            return;
        }
        state.events.push_back(HidEvent::Pointer {
            x,
            y,
            buttons,
            wheel,
        });
    }

    /// Keyboard input: a Linux evdev key code (`KEY_*`) pressed or released. Codes without
    /// a HID keyboard usage are ignored.
    pub fn key(&self, evdev_code: u16, down: bool) {
        let Some(usage) = evdev_to_hid_usage(evdev_code) else {
            log::debug!("usb-hid: evdev key {evdev_code} has no HID usage");
            return;
        };
        let mut state = self.lock();
        if state_is_full(state.events.len()) {
            log::warn!("usb-hid: keyboard queue full, key {evdev_code} dropped");
            return;
        }
        state.events.push_back(HidEvent::Key { usage, down });
    }

    /// The keyboard LEDs the guest last set: bit 0 Num Lock, 1 Caps Lock, 2 Scroll Lock,
    /// 3 Compose, 4 Kana.
    pub fn leds(&self) -> u8 {
        self.lock().leds
    }

    /// Events not yet seen by the guest.
    pub fn pending(&self) -> usize {
        self.lock().events.len()
    }

    fn pop(&self) -> Option<HidEvent> {
        self.lock().events.pop_front()
    }

    fn set_leds(&self, leds: u8) {
        self.lock().leds = leds;
    }
}

fn state_is_full(len: usize) -> bool {
    len >= INPUT_QUEUE_CAPACITY
}

/// The HID class part of a device (what [`UsbDeviceCore`] delegates to).
struct HidModel {
    kind: HidKind,
    input: HidInput,
    protocol: u8,
    /// Idle rate in 4 ms units, 0 = report only on change.
    idle_rate: u8,
    /// Frames (ms) since the last report went out.
    ms_since_report: u32,
    x: u16,
    y: u16,
    buttons: u8,
    modifiers: u8,
    /// Non-modifier usages held, in press order.
    keys: Vec<u8>,
    /// The last report sent (wheel 0 for the tablet).
    last_report: Vec<u8>,
}

impl HidModel {
    fn new(kind: HidKind, input: HidInput) -> Self {
        let mut model = Self {
            kind,
            input,
            protocol: PROTOCOL_REPORT,
            idle_rate: 0,
            ms_since_report: 0,
            x: 0,
            y: 0,
            buttons: 0,
            modifiers: 0,
            keys: Vec::new(),
            last_report: Vec::new(),
        };
        model.reset();
        model
    }

    fn reset(&mut self) {
        self.protocol = PROTOCOL_REPORT;
        self.idle_rate = match self.kind {
            HidKind::Tablet => 0,
            HidKind::Keyboard => KEYBOARD_DEFAULT_IDLE,
        };
        self.ms_since_report = 0;
        self.last_report = self.report(0);
    }

    fn report_descriptor(&self) -> &'static [u8] {
        match self.kind {
            HidKind::Tablet => TABLET_REPORT_DESCRIPTOR,
            HidKind::Keyboard => KEYBOARD_REPORT_DESCRIPTOR,
        }
    }

    fn hid_descriptor(&self) -> Vec<u8> {
        let len = (self.report_descriptor().len() as u16).to_le_bytes();
        vec![
            9,
            DESCRIPTOR_HID,
            0x11,
            0x01, // bcdHID 1.11
            0,    // not localized
            1,    // one class descriptor
            DESCRIPTOR_REPORT,
            len[0],
            len[1],
        ]
    }

    /// The input report for the current state with `wheel` steps.
    fn report(&self, wheel: i8) -> Vec<u8> {
        match self.kind {
            HidKind::Tablet => {
                let x = self.x.to_le_bytes();
                let y = self.y.to_le_bytes();
                vec![self.buttons, x[0], x[1], y[0], y[1], wheel as u8]
            }
            HidKind::Keyboard => {
                let mut report = vec![self.modifiers, 0, 0, 0, 0, 0, 0, 0];
                if self.keys.len() > 6 {
                    report[2..].fill(USAGE_ERROR_ROLL_OVER);
                } else {
                    for (slot, &usage) in report[2..].iter_mut().zip(self.keys.iter()) {
                        *slot = usage;
                    }
                }
                report
            }
        }
    }

    /// Applies one event; returns the wheel steps it carried.
    fn apply(&mut self, event: HidEvent) -> i8 {
        match (self.kind, event) {
            (
                HidKind::Tablet,
                HidEvent::Pointer {
                    x,
                    y,
                    buttons,
                    wheel,
                },
            ) => {
                self.x = x;
                self.y = y;
                self.buttons = buttons;
                wheel
            }
            (HidKind::Keyboard, HidEvent::Key { usage, down }) => {
                if (0xe0..=0xe7).contains(&usage) {
                    let bit = 1 << (usage - 0xe0);
                    if down {
                        self.modifiers |= bit;
                    } else {
                        self.modifiers &= !bit;
                    }
                } else if down {
                    if !self.keys.contains(&usage) && self.keys.len() < MAX_KEYS_HELD {
                        self.keys.push(usage);
                    }
                } else {
                    self.keys.retain(|&k| k != usage);
                }
                0
            }
            // Events for the other kind of device are ignored.
            _ => 0,
        }
    }

    /// The next report for the interrupt endpoint, None to NAK.
    fn poll(&mut self) -> Option<Vec<u8>> {
        while let Some(event) = self.input.pop() {
            let wheel = self.apply(event);
            let steady = self.report(0);
            if steady != self.last_report || wheel != 0 {
                self.last_report = steady;
                self.ms_since_report = 0;
                return Some(self.report(wheel));
            }
        }
        let period = u32::from(self.idle_rate) * 4;
        if period != 0 && self.ms_since_report >= period {
            self.ms_since_report = 0;
            return Some(self.last_report.clone());
        }
        None
    }

    fn interface_is_ours(setup: &SetupPacket) -> bool {
        setup.index == 0
    }
}

impl ControlHandler for HidModel {
    fn device_descriptor(&self) -> Vec<u8> {
        let vendor = VENDOR_ID.to_le_bytes();
        let product = PRODUCT_ID.to_le_bytes();
        vec![
            18,
            descriptor_type::DEVICE,
            0x10,
            0x01, // USB 1.1
            0,
            0,
            0, // class in the interface
            8, // bMaxPacketSize0
            vendor[0],
            vendor[1],
            product[0],
            product[1],
            0x00,
            0x01, // bcdDevice 1.00
            STRING_MANUFACTURER,
            STRING_PRODUCT,
            STRING_SERIAL,
            1, // one configuration
        ]
    }

    fn configuration_descriptor(&self) -> Vec<u8> {
        let (subclass, protocol) = match self.kind {
            HidKind::Tablet => (0, 0),
            HidKind::Keyboard => (1, 1), // boot interface, keyboard
        };
        let mut out = vec![
            9,
            descriptor_type::CONFIGURATION,
            34,
            0, // total length
            1, // one interface
            1, // bConfigurationValue
            0, // no string
            0xa0,
            50, // bus powered, remote wakeup, 100 mA
            9,
            descriptor_type::INTERFACE,
            0,
            0,
            1, // one endpoint
            0x03,
            subclass,
            protocol,
            0,
        ];
        out.extend_from_slice(&self.hid_descriptor());
        out.extend_from_slice(&[7, descriptor_type::ENDPOINT, 0x81, 0x03, 8, 0, 10]);
        out
    }

    fn string(&self, index: u8) -> Option<String> {
        let text = match (index, self.kind) {
            (STRING_MANUFACTURER, _) => "DeskVM",
            (STRING_PRODUCT, HidKind::Tablet) => "DeskVM USB Tablet",
            (STRING_PRODUCT, HidKind::Keyboard) => "DeskVM USB Keyboard",
            (STRING_SERIAL, _) => "1",
            _ => return None,
        };
        Some(text.to_string())
    }

    fn interface_descriptor(&self, setup: &SetupPacket) -> Option<Vec<u8>> {
        if !Self::interface_is_ours(setup) {
            return None;
        }
        match (setup.value >> 8) as u8 {
            DESCRIPTOR_REPORT => Some(self.report_descriptor().to_vec()),
            DESCRIPTOR_HID => Some(self.hid_descriptor()),
            _ => None,
        }
    }

    fn class_request(&mut self, setup: &SetupPacket, data: &[u8]) -> Option<Vec<u8>> {
        if setup.kind() != crate::usb::RequestKind::Class || !Self::interface_is_ours(setup) {
            return None;
        }
        let report_type = (setup.value >> 8) as u8;
        match (setup.request, setup.is_device_to_host()) {
            (HID_GET_REPORT, true) => match (report_type, self.kind) {
                (REPORT_TYPE_INPUT, _) => Some(self.report(0)),
                (REPORT_TYPE_OUTPUT, HidKind::Keyboard) => Some(vec![self.input.leds()]),
                _ => None,
            },
            (HID_GET_IDLE, true) => Some(vec![self.idle_rate]),
            (HID_GET_PROTOCOL, true) => Some(vec![self.protocol]),
            (HID_SET_REPORT, false) => match (report_type, self.kind, data.first()) {
                (REPORT_TYPE_OUTPUT, HidKind::Keyboard, Some(&leds)) => {
                    self.input.set_leds(leds & 0x1f);
                    Some(Vec::new())
                }
                _ => None,
            },
            (HID_SET_IDLE, false) => {
                self.idle_rate = (setup.value >> 8) as u8;
                self.ms_since_report = 0;
                Some(Vec::new())
            }
            (HID_SET_PROTOCOL, false) if setup.value <= 1 => {
                self.protocol = setup.value as u8;
                Some(Vec::new())
            }
            _ => None,
        }
    }
}

/// A USB HID tablet or keyboard.
pub struct UsbHid {
    core: UsbDeviceCore,
    model: HidModel,
}

impl UsbHid {
    /// A tablet fed by a new [`HidInput`] (get it with [`Self::input`]).
    pub fn tablet() -> Self {
        Self::with_input(HidKind::Tablet, HidInput::new())
    }

    /// A boot keyboard fed by a new [`HidInput`].
    pub fn keyboard() -> Self {
        Self::with_input(HidKind::Keyboard, HidInput::new())
    }

    /// A device fed by an existing handle.
    pub fn with_input(kind: HidKind, input: HidInput) -> Self {
        Self {
            core: UsbDeviceCore::new(),
            model: HidModel::new(kind, input),
        }
    }

    pub fn kind(&self) -> HidKind {
        self.model.kind
    }

    /// A handle the engine keeps to feed input (clones share the queue).
    pub fn input(&self) -> HidInput {
        self.model.input.clone()
    }

    /// The protocol the guest selected ([`PROTOCOL_BOOT`] or [`PROTOCOL_REPORT`]).
    pub fn protocol(&self) -> u8 {
        self.model.protocol
    }

    /// The idle rate in 4 ms units (0 = infinite).
    pub fn idle_rate(&self) -> u8 {
        self.model.idle_rate
    }

    pub fn configuration(&self) -> u8 {
        self.core.configuration()
    }
}

impl UsbDevice for UsbHid {
    fn speed(&self) -> UsbSpeed {
        UsbSpeed::Full
    }

    fn reset(&mut self) {
        self.core.reset();
        self.model.reset();
    }

    fn address(&self) -> u8 {
        self.core.address()
    }

    fn handle_packet(&mut self, pid: Pid, endpoint: u8, data: &mut [u8]) -> PacketResult {
        if endpoint == 0 {
            return self.core.handle_control(&mut self.model, pid, data);
        }
        if let Some(result) = self.core.check_data_endpoint(pid, endpoint) {
            return result;
        }
        match (pid, endpoint, self.model.kind) {
            (Pid::In, 1, _) => match self.model.poll() {
                Some(report) => {
                    let n = report.len().min(data.len());
                    if let (Some(dst), Some(src)) = (data.get_mut(..n), report.get(..n)) {
                        dst.copy_from_slice(src);
                    }
                    PacketResult::Ack(n)
                }
                None => PacketResult::Nak,
            },
            (Pid::Out, 1, HidKind::Keyboard) => {
                if let Some(&leds) = data.first() {
                    self.model.input.set_leds(leds & 0x1f);
                }
                PacketResult::Ack(data.len())
            }
            _ => PacketResult::Stall,
        }
    }

    fn start_of_frame(&mut self) {
        if self.core.is_configured() {
            self.model.ms_since_report = self.model.ms_since_report.saturating_add(1);
        }
    }

    fn wakeup_pending(&self) -> bool {
        self.core.remote_wakeup_enabled() && self.model.input.pending() > 0
    }
}

/// The HID keyboard-page usage of a Linux evdev key code.
pub fn evdev_to_hid_usage(code: u16) -> Option<u8> {
    let usage = match code {
        1 => 0x29,                            // ESC
        2..=10 => code as u8 + 0x1c,          // 1..9 -> 0x1e..0x26
        11 => 0x27,                           // 0
        12 => 0x2d,                           // MINUS
        13 => 0x2e,                           // EQUAL
        14 => 0x2a,                           // BACKSPACE
        15 => 0x2b,                           // TAB
        16 => 0x14,                           // Q
        17 => 0x1a,                           // W
        18 => 0x08,                           // E
        19 => 0x15,                           // R
        20 => 0x17,                           // T
        21 => 0x1c,                           // Y
        22 => 0x18,                           // U
        23 => 0x0c,                           // I
        24 => 0x12,                           // O
        25 => 0x13,                           // P
        26 => 0x2f,                           // LEFTBRACE
        27 => 0x30,                           // RIGHTBRACE
        28 => 0x28,                           // ENTER
        29 => 0xe0,                           // LEFTCTRL
        30 => 0x04,                           // A
        31 => 0x16,                           // S
        32 => 0x07,                           // D
        33 => 0x09,                           // F
        34 => 0x0a,                           // G
        35 => 0x0b,                           // H
        36 => 0x0d,                           // J
        37 => 0x0e,                           // K
        38 => 0x0f,                           // L
        39 => 0x33,                           // SEMICOLON
        40 => 0x34,                           // APOSTROPHE
        41 => 0x35,                           // GRAVE
        42 => 0xe1,                           // LEFTSHIFT
        43 => 0x31,                           // BACKSLASH
        44 => 0x1d,                           // Z
        45 => 0x1b,                           // X
        46 => 0x06,                           // C
        47 => 0x19,                           // V
        48 => 0x05,                           // B
        49 => 0x11,                           // N
        50 => 0x10,                           // M
        51 => 0x36,                           // COMMA
        52 => 0x37,                           // DOT
        53 => 0x38,                           // SLASH
        54 => 0xe5,                           // RIGHTSHIFT
        55 => 0x55,                           // KPASTERISK
        56 => 0xe2,                           // LEFTALT
        57 => 0x2c,                           // SPACE
        58 => 0x39,                           // CAPSLOCK
        59..=68 => code as u8 - 59 + 0x3a,    // F1..F10
        69 => 0x53,                           // NUMLOCK
        70 => 0x47,                           // SCROLLLOCK
        71 => 0x5f,                           // KP7
        72 => 0x60,                           // KP8
        73 => 0x61,                           // KP9
        74 => 0x56,                           // KPMINUS
        75 => 0x5c,                           // KP4
        76 => 0x5d,                           // KP5
        77 => 0x5e,                           // KP6
        78 => 0x57,                           // KPPLUS
        79 => 0x59,                           // KP1
        80 => 0x5a,                           // KP2
        81 => 0x5b,                           // KP3
        82 => 0x62,                           // KP0
        83 => 0x63,                           // KPDOT
        85 => 0x94,                           // ZENKAKUHANKAKU (LANG5)
        86 => 0x64,                           // 102ND (non-US \ and |)
        87 => 0x44,                           // F11
        88 => 0x45,                           // F12
        89 => 0x87,                           // RO (International1)
        90 => 0x92,                           // KATAKANA (LANG3)
        91 => 0x93,                           // HIRAGANA (LANG4)
        92 => 0x8a,                           // HENKAN (International4)
        93 => 0x88,                           // KATAKANAHIRAGANA (International2)
        94 => 0x8b,                           // MUHENKAN (International5)
        95 => 0x8c,                           // KPJPCOMMA (International6)
        96 => 0x58,                           // KPENTER
        97 => 0xe4,                           // RIGHTCTRL
        98 => 0x54,                           // KPSLASH
        99 => 0x46,                           // SYSRQ (PrintScreen)
        100 => 0xe6,                          // RIGHTALT
        102 => 0x4a,                          // HOME
        103 => 0x52,                          // UP
        104 => 0x4b,                          // PAGEUP
        105 => 0x50,                          // LEFT
        106 => 0x4f,                          // RIGHT
        107 => 0x4d,                          // END
        108 => 0x51,                          // DOWN
        109 => 0x4e,                          // PAGEDOWN
        110 => 0x49,                          // INSERT
        111 => 0x4c,                          // DELETE
        113 => 0x7f,                          // MUTE
        114 => 0x81,                          // VOLUMEDOWN
        115 => 0x80,                          // VOLUMEUP
        116 => 0x66,                          // POWER
        117 => 0x67,                          // KPEQUAL
        119 => 0x48,                          // PAUSE
        121 => 0x85,                          // KPCOMMA
        122 => 0x90,                          // HANGEUL (LANG1)
        123 => 0x91,                          // HANJA (LANG2)
        124 => 0x89,                          // YEN (International3)
        125 => 0xe3,                          // LEFTMETA
        126 => 0xe7,                          // RIGHTMETA
        127 => 0x65,                          // COMPOSE (Application / menu key)
        128 => 0x78,                          // STOP
        129 => 0x79,                          // AGAIN
        130 => 0x76,                          // PROPS
        131 => 0x7a,                          // UNDO
        132 => 0x77,                          // FRONT
        133 => 0x7c,                          // COPY
        134 => 0x74,                          // OPEN
        135 => 0x7d,                          // PASTE
        136 => 0x7e,                          // FIND
        137 => 0x7b,                          // CUT
        138 => 0x75,                          // HELP
        139 => 0x76,                          // MENU
        183..=194 => code as u8 - 183 + 0x68, // F13..F24
        _ => return None,
    };
    Some(usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control(dev: &mut UsbHid, setup: SetupPacket, out_data: &[u8]) -> Option<Vec<u8>> {
        let mut bytes = setup.to_bytes();
        assert_eq!(
            dev.handle_packet(Pid::Setup, 0, &mut bytes),
            PacketResult::Ack(8)
        );
        let mut reply = Vec::new();
        if setup.is_device_to_host() {
            loop {
                let mut buf = [0u8; 8];
                match dev.handle_packet(Pid::In, 0, &mut buf) {
                    PacketResult::Ack(n) => {
                        reply.extend_from_slice(&buf[..n]);
                        if n < 8 {
                            break;
                        }
                    }
                    PacketResult::Stall => return None,
                    PacketResult::Nak => panic!("NAK on control pipe"),
                }
            }
            assert_eq!(
                dev.handle_packet(Pid::Out, 0, &mut []),
                PacketResult::Ack(0)
            );
        } else {
            for chunk in out_data.chunks(8) {
                let mut c = chunk.to_vec();
                assert_eq!(
                    dev.handle_packet(Pid::Out, 0, &mut c),
                    PacketResult::Ack(chunk.len())
                );
            }
            if dev.handle_packet(Pid::In, 0, &mut []) != PacketResult::Ack(0) {
                return None;
            }
        }
        Some(reply)
    }

    fn req(request_type: u8, request: u8, value: u16, index: u16, length: u16) -> SetupPacket {
        SetupPacket {
            request_type,
            request,
            value,
            index,
            length,
        }
    }

    fn configured(mut dev: UsbHid) -> UsbHid {
        control(&mut dev, req(0, 5, 1, 0, 0), &[]).unwrap();
        control(&mut dev, req(0, 9, 1, 0, 0), &[]).unwrap();
        dev
    }

    fn poll(dev: &mut UsbHid) -> Option<Vec<u8>> {
        let mut buf = [0u8; 8];
        match dev.handle_packet(Pid::In, 1, &mut buf) {
            PacketResult::Ack(n) => Some(buf[..n].to_vec()),
            PacketResult::Nak => None,
            PacketResult::Stall => panic!("interrupt endpoint stalled"),
        }
    }

    #[test]
    fn tablet_descriptors() {
        let mut dev = UsbHid::tablet();
        let device = control(&mut dev, req(0x80, 6, 0x0100, 0, 18), &[]).unwrap();
        assert_eq!(
            device,
            [18, 1, 0x10, 0x01, 0, 0, 0, 8, 0x27, 0x06, 0x01, 0x00, 0x00, 0x01, 1, 2, 3, 1]
        );
        let config = control(&mut dev, req(0x80, 6, 0x0200, 0, 255), &[]).unwrap();
        let report_len = TABLET_REPORT_DESCRIPTOR.len() as u8;
        assert_eq!(
            config,
            [
                9, 2, 34, 0, 1, 1, 0, 0xa0, 50, // configuration
                9, 4, 0, 0, 1, 3, 0, 0, 0, // interface: HID, no boot protocol
                9, 0x21, 0x11, 0x01, 0, 1, 0x22, report_len, 0, // HID
                7, 5, 0x81, 3, 8, 0, 10, // endpoint 1 IN interrupt
            ]
        );
        let report = control(&mut dev, req(0x81, 6, 0x2200, 0, 255), &[]).unwrap();
        assert_eq!(report, TABLET_REPORT_DESCRIPTOR);
        // Logical maximum 32767 for X / Y.
        assert!(report.windows(3).any(|w| w == [0x26, 0xff, 0x7f]));
        let hid = control(&mut dev, req(0x81, 6, 0x2100, 0, 9), &[]).unwrap();
        assert_eq!(hid, config[18..27]);
        let product = control(&mut dev, req(0x80, 6, 0x0302, 0x409, 255), &[]).unwrap();
        let text: Vec<u16> = product[2..]
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(String::from_utf16(&text).unwrap(), "DeskVM USB Tablet");
        // Another interface number stalls.
        assert!(control(&mut dev, req(0x81, 6, 0x2200, 1, 255), &[]).is_none());
    }

    #[test]
    fn keyboard_descriptors_are_boot_keyboard() {
        let mut dev = UsbHid::keyboard();
        let config = control(&mut dev, req(0x80, 6, 0x0200, 0, 255), &[]).unwrap();
        assert_eq!(config[9..18], [9, 4, 0, 0, 1, 3, 1, 1, 0]);
        assert_eq!(
            usize::from(config[25]),
            KEYBOARD_REPORT_DESCRIPTOR.len(),
            "HID descriptor announces the report descriptor length"
        );
        let report = control(&mut dev, req(0x81, 6, 0x2200, 0, 255), &[]).unwrap();
        assert_eq!(report, KEYBOARD_REPORT_DESCRIPTOR);
        assert_eq!(&report[..6], [0x05, 0x01, 0x09, 0x06, 0xa1, 0x01]);
        assert_eq!(report.last(), Some(&0xc0));
    }

    #[test]
    fn tablet_reports_nak_until_input_then_edges_and_wheel() {
        let mut dev = configured(UsbHid::tablet());
        let input = dev.input();
        assert_eq!(poll(&mut dev), None);
        input.pointer_absolute(0, 0x7fff, 0, 0);
        assert_eq!(poll(&mut dev), Some(vec![0, 0, 0, 0xff, 0x7f, 0]));
        assert_eq!(poll(&mut dev), None);
        // Out-of-range coordinates clamp.
        input.pointer_absolute(0xffff, 0, 1, 0);
        assert_eq!(poll(&mut dev), Some(vec![1, 0xff, 0x7f, 0, 0, 0]));
        input.pointer_absolute(0xffff, 0, 1, -1);
        assert_eq!(poll(&mut dev), Some(vec![1, 0xff, 0x7f, 0, 0, 0xff]));
        // Same position, no wheel: nothing new.
        input.pointer_absolute(0xffff, 0, 1, 0);
        assert_eq!(poll(&mut dev), None);
    }

    #[test]
    fn pointer_motion_coalesces_but_button_changes_stay() {
        let mut dev = configured(UsbHid::tablet());
        let input = dev.input();
        for i in 0..100 {
            input.pointer_absolute(i, i, 0, 0);
        }
        input.pointer_absolute(200, 200, 1, 1);
        input.pointer_absolute(300, 300, 1, 1);
        input.pointer_absolute(300, 300, 0, 0);
        assert_eq!(input.pending(), 3);
        assert_eq!(poll(&mut dev), Some(vec![0, 99, 0, 99, 0, 0]));
        assert_eq!(poll(&mut dev), Some(vec![1, 44, 1, 44, 1, 2]));
        assert_eq!(poll(&mut dev), Some(vec![0, 44, 1, 44, 1, 0]));
        assert_eq!(poll(&mut dev), None);
        // A full queue folds motion into the last event instead of growing.
        for i in 0..(INPUT_QUEUE_CAPACITY as u16 * 2) {
            input.pointer_absolute(i, 0, (i % 2) as u8, 0);
        }
        assert!(input.pending() <= INPUT_QUEUE_CAPACITY);
    }

    #[test]
    fn keyboard_modifiers_keys_and_rollover() {
        let mut dev = configured(UsbHid::keyboard());
        let input = dev.input();
        assert_eq!(poll(&mut dev), None);
        input.key(42, true); // LEFTSHIFT
        input.key(30, true); // A
        assert_eq!(poll(&mut dev), Some(vec![0x02, 0, 0, 0, 0, 0, 0, 0]));
        assert_eq!(poll(&mut dev), Some(vec![0x02, 0, 0x04, 0, 0, 0, 0, 0]));
        input.key(30, true); // host auto-repeat: no change
        input.key(126, true); // RIGHTMETA
        assert_eq!(poll(&mut dev), Some(vec![0x82, 0, 0x04, 0, 0, 0, 0, 0]));
        for code in [31, 32, 33, 34, 35] {
            input.key(code, true); // S D F G H
        }
        for _ in 0..4 {
            poll(&mut dev).unwrap();
        }
        assert_eq!(
            poll(&mut dev),
            Some(vec![0x82, 0, 0x04, 0x16, 0x07, 0x09, 0x0a, 0x0b])
        );
        input.key(36, true); // J: seventh key
        assert_eq!(poll(&mut dev), Some(vec![0x82, 0, 1, 1, 1, 1, 1, 1]));
        input.key(30, false);
        assert_eq!(
            poll(&mut dev),
            Some(vec![0x82, 0, 0x16, 0x07, 0x09, 0x0a, 0x0b, 0x0d])
        );
        for code in [31, 32, 33, 34, 35, 36, 42, 126] {
            input.key(code, false);
        }
        let mut last = None;
        while let Some(r) = poll(&mut dev) {
            last = Some(r);
        }
        assert_eq!(last, Some(vec![0; 8]));
        // Unknown codes are ignored.
        input.key(0x2ff, true);
        assert_eq!(input.pending(), 0);
    }

    #[test]
    fn hid_class_requests() {
        let mut dev = configured(UsbHid::keyboard());
        let input = dev.input();
        // Keyboard default idle 500 ms; SET_IDLE 0 = infinite.
        assert_eq!(
            control(&mut dev, req(0xa1, HID_GET_IDLE, 0, 0, 1), &[]),
            Some(vec![125])
        );
        control(&mut dev, req(0x21, HID_SET_IDLE, 0, 0, 0), &[]).unwrap();
        assert_eq!(dev.idle_rate(), 0);
        assert_eq!(
            control(&mut dev, req(0xa1, HID_GET_PROTOCOL, 0, 0, 1), &[]),
            Some(vec![PROTOCOL_REPORT])
        );
        control(&mut dev, req(0x21, HID_SET_PROTOCOL, 0, 0, 0), &[]).unwrap();
        assert_eq!(dev.protocol(), PROTOCOL_BOOT);
        assert!(control(&mut dev, req(0x21, HID_SET_PROTOCOL, 7, 0, 0), &[]).is_none());
        // LEDs via SET_REPORT (output report), read back by the engine and GET_REPORT.
        control(&mut dev, req(0x21, HID_SET_REPORT, 0x0200, 0, 1), &[0x03]).unwrap();
        assert_eq!(input.leds(), 0x03);
        assert_eq!(
            control(&mut dev, req(0xa1, HID_GET_REPORT, 0x0200, 0, 1), &[]),
            Some(vec![0x03])
        );
        // And via the interrupt OUT convenience path.
        assert_eq!(
            dev.handle_packet(Pid::Out, 1, &mut [0x04]),
            PacketResult::Ack(1)
        );
        assert_eq!(input.leds(), 0x04);
        // GET_REPORT input returns the current state without consuming the queue.
        input.key(29, true);
        assert_eq!(
            control(&mut dev, req(0xa1, HID_GET_REPORT, 0x0100, 0, 8), &[]),
            Some(vec![0; 8])
        );
        assert_eq!(poll(&mut dev), Some(vec![0x01, 0, 0, 0, 0, 0, 0, 0]));
        // Feature reports do not exist.
        assert!(control(&mut dev, req(0xa1, HID_GET_REPORT, 0x0300, 0, 8), &[]).is_none());
        // Tablet does not take output reports.
        let mut tablet = configured(UsbHid::tablet());
        assert!(control(&mut tablet, req(0x21, HID_SET_REPORT, 0x0200, 0, 1), &[1]).is_none());
    }

    #[test]
    fn idle_rate_resends_last_report_when_period_expires() {
        let mut dev = configured(UsbHid::keyboard());
        let input = dev.input();
        // 8 ms idle period.
        control(&mut dev, req(0x21, HID_SET_IDLE, 0x0200, 0, 0), &[]).unwrap();
        input.key(30, true);
        assert_eq!(poll(&mut dev), Some(vec![0, 0, 4, 0, 0, 0, 0, 0]));
        for _ in 0..7 {
            dev.start_of_frame();
        }
        assert_eq!(poll(&mut dev), None);
        dev.start_of_frame();
        assert_eq!(poll(&mut dev), Some(vec![0, 0, 4, 0, 0, 0, 0, 0]));
        assert_eq!(poll(&mut dev), None);
        // Infinite: never re-sent.
        control(&mut dev, req(0x21, HID_SET_IDLE, 0, 0, 0), &[]).unwrap();
        for _ in 0..5000 {
            dev.start_of_frame();
        }
        assert_eq!(poll(&mut dev), None);
    }

    #[test]
    fn unconfigured_or_halted_endpoint_stalls_and_wakeup() {
        let mut dev = UsbHid::tablet();
        assert_eq!(
            dev.handle_packet(Pid::In, 1, &mut [0; 8]),
            PacketResult::Stall
        );
        let mut dev = configured(dev);
        assert_eq!(
            dev.handle_packet(Pid::In, 2, &mut [0; 8]),
            PacketResult::Stall
        );
        let input = dev.input();
        input.pointer_absolute(1, 1, 0, 0);
        assert!(!dev.wakeup_pending());
        control(&mut dev, req(0, 3, 1, 0, 0), &[]).unwrap();
        assert!(dev.wakeup_pending());
        dev.reset();
        assert_eq!(dev.address(), 0);
        assert!(!dev.wakeup_pending());
    }

    #[test]
    fn evdev_map_covers_a_full_keyboard() {
        assert_eq!(evdev_to_hid_usage(30), Some(0x04)); // A
        assert_eq!(evdev_to_hid_usage(2), Some(0x1e)); // 1
        assert_eq!(evdev_to_hid_usage(10), Some(0x26)); // 9
        assert_eq!(evdev_to_hid_usage(59), Some(0x3a)); // F1
        assert_eq!(evdev_to_hid_usage(68), Some(0x43)); // F10
        assert_eq!(evdev_to_hid_usage(88), Some(0x45)); // F12
        assert_eq!(evdev_to_hid_usage(86), Some(0x64)); // 102ND
        assert_eq!(evdev_to_hid_usage(183), Some(0x68)); // F13
        assert_eq!(evdev_to_hid_usage(194), Some(0x73)); // F24
        assert_eq!(evdev_to_hid_usage(100), Some(0xe6)); // RIGHTALT
        assert_eq!(evdev_to_hid_usage(0), None);
        let mapped: std::collections::BTreeSet<u8> =
            (0..=255u16).filter_map(evdev_to_hid_usage).collect();
        assert!(mapped.len() >= 105, "{} usages", mapped.len());
        // Every usage of a 104-key US layout (0x04..=0x65 minus 0x32 non-US #, plus the 8
        // modifiers) is reachable.
        for usage in (0x04..=0x65).chain(0xe0..=0xe7) {
            if usage == 0x32 {
                continue;
            }
            assert!(mapped.contains(&usage), "usage {usage:#x} unreachable");
        }
    }
}
