//! The device side of USB 1.1 as a host controller sees it: tokens (SETUP / IN / OUT)
//! addressed to an endpoint of a device, answered with ACK (and data), NAK or STALL.
//!
//! Emulated: the [`UsbDevice`] trait host controllers drive, setup packets, and a generic
//! control-endpoint state machine ([`UsbDeviceCore`]) that device models embed: setup
//! stage, IN / OUT data stages spread over several packets, status stage, and the chapter 9
//! standard requests (SET_ADDRESS applied after the status stage, GET_DESCRIPTOR for
//! device / configuration / string descriptors truncated to wLength, GET/SET_CONFIGURATION,
//! GET_STATUS, CLEAR/SET_FEATURE for endpoint halt and remote wakeup, GET/SET_INTERFACE).
//! Class and vendor requests, and GET_DESCRIPTOR addressed to an interface (HID class
//! descriptors), go to the device model through [`ControlHandler`].
//!
//! Not emulated: data toggle checking (the controller never loses packets), isochronous
//! transfers, high speed, more than one configuration or alternate setting, SYNCH_FRAME,
//! SET_DESCRIPTOR, test modes.

use serde::{Deserialize, Serialize};

/// Token PID values as they appear in a UHCI transfer descriptor.
pub const PID_SETUP: u8 = 0x2d;
pub const PID_IN: u8 = 0x69;
pub const PID_OUT: u8 = 0xe1;

/// Largest OUT data stage a control transfer may carry (ours are a few bytes).
pub const MAX_CONTROL_OUT_DATA: usize = 4096;

/// Bus speed a device signals on attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UsbSpeed {
    Low,
    Full,
}

/// The token of a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pid {
    Setup,
    In,
    Out,
}

impl Pid {
    /// The PID a token byte encodes, None for anything but SETUP / IN / OUT.
    pub fn from_token(token: u8) -> Option<Self> {
        match token {
            PID_SETUP => Some(Pid::Setup),
            PID_IN => Some(Pid::In),
            PID_OUT => Some(Pid::Out),
            _ => None,
        }
    }

    pub fn token(self) -> u8 {
        match self {
            Pid::Setup => PID_SETUP,
            Pid::In => PID_IN,
            Pid::Out => PID_OUT,
        }
    }
}

/// A device's handshake for one transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketResult {
    /// Accepted; for IN the number of bytes placed in the buffer, for SETUP / OUT the
    /// number of bytes taken.
    Ack(usize),
    /// Not ready: the host retries later (interrupt IN with nothing new).
    Nak,
    /// Endpoint halted or request not supported.
    Stall,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UsbError {
    #[error("USB port {port} does not exist (the controller has ports 0..{ports})")]
    NoSuchPort { port: usize, ports: usize },
    #[error("USB port {port} already has a device; detach it before attaching another")]
    PortInUse { port: usize },
}

/// A USB device as a host controller drives it.
pub trait UsbDevice: Send {
    fn speed(&self) -> UsbSpeed;
    /// Bus reset: the device returns to the default state (address 0, unconfigured).
    fn reset(&mut self);
    /// The address the device answers to (0 until SET_ADDRESS completes).
    fn address(&self) -> u8;
    /// One transaction for `endpoint` (0..=15). For IN the device fills `data` (whose
    /// length is the host's maximum) and returns how much it wrote; for SETUP / OUT it
    /// reads `data`.
    fn handle_packet(&mut self, pid: Pid, endpoint: u8, data: &mut [u8]) -> PacketResult;
    /// Called once per 1 ms frame while the controller runs (idle timers).
    fn start_of_frame(&mut self) {}
    /// The device would signal remote wakeup now (it has input and the host enabled the
    /// feature); the controller reports resume on a suspended port.
    fn wakeup_pending(&self) -> bool {
        false
    }
}

/// Standard request codes (USB 2.0 table 9-4).
pub mod request {
    pub const GET_STATUS: u8 = 0x00;
    pub const CLEAR_FEATURE: u8 = 0x01;
    pub const SET_FEATURE: u8 = 0x03;
    pub const SET_ADDRESS: u8 = 0x05;
    pub const GET_DESCRIPTOR: u8 = 0x06;
    pub const SET_DESCRIPTOR: u8 = 0x07;
    pub const GET_CONFIGURATION: u8 = 0x08;
    pub const SET_CONFIGURATION: u8 = 0x09;
    pub const GET_INTERFACE: u8 = 0x0a;
    pub const SET_INTERFACE: u8 = 0x0b;
}

/// Descriptor types (USB 2.0 table 9-5).
pub mod descriptor_type {
    pub const DEVICE: u8 = 0x01;
    pub const CONFIGURATION: u8 = 0x02;
    pub const STRING: u8 = 0x03;
    pub const INTERFACE: u8 = 0x04;
    pub const ENDPOINT: u8 = 0x05;
}

/// Feature selectors.
pub const FEATURE_ENDPOINT_HALT: u16 = 0;
pub const FEATURE_DEVICE_REMOTE_WAKEUP: u16 = 1;
/// Configuration descriptor bmAttributes bit: the device supports remote wakeup.
pub const CONFIG_ATTR_REMOTE_WAKEUP: u8 = 0x20;
/// US English, the only language of our string descriptors.
pub const LANGUAGE_EN_US: u16 = 0x0409;

/// Who a request is for (bmRequestType bits 4:0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recipient {
    Device,
    Interface,
    Endpoint,
    Other,
}

/// Standard, class or vendor request (bmRequestType bits 6:5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    Standard,
    Class,
    Vendor,
    Reserved,
}

/// The 8 bytes of a SETUP stage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetupPacket {
    pub request_type: u8,
    pub request: u8,
    pub value: u16,
    pub index: u16,
    pub length: u16,
}

impl SetupPacket {
    /// Parses a SETUP data packet; None unless it is exactly 8 bytes.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let b: &[u8; 8] = bytes.try_into().ok()?;
        Some(Self {
            request_type: b[0],
            request: b[1],
            value: u16::from_le_bytes([b[2], b[3]]),
            index: u16::from_le_bytes([b[4], b[5]]),
            length: u16::from_le_bytes([b[6], b[7]]),
        })
    }

    pub fn to_bytes(&self) -> [u8; 8] {
        let v = self.value.to_le_bytes();
        let i = self.index.to_le_bytes();
        let l = self.length.to_le_bytes();
        [
            self.request_type,
            self.request,
            v[0],
            v[1],
            i[0],
            i[1],
            l[0],
            l[1],
        ]
    }

    /// Data stage (if any) goes from device to host.
    pub fn is_device_to_host(&self) -> bool {
        self.request_type & 0x80 != 0
    }

    pub fn kind(&self) -> RequestKind {
        match (self.request_type >> 5) & 3 {
            0 => RequestKind::Standard,
            1 => RequestKind::Class,
            2 => RequestKind::Vendor,
            _ => RequestKind::Reserved,
        }
    }

    pub fn recipient(&self) -> Recipient {
        match self.request_type & 0x1f {
            0 => Recipient::Device,
            1 => Recipient::Interface,
            2 => Recipient::Endpoint,
            _ => Recipient::Other,
        }
    }
}

/// What a device model provides to [`UsbDeviceCore`].
pub trait ControlHandler {
    /// The 18-byte device descriptor.
    fn device_descriptor(&self) -> Vec<u8>;
    /// The configuration descriptor with its interface, class and endpoint descriptors.
    fn configuration_descriptor(&self) -> Vec<u8>;
    /// String `index` (1..), None if the device has no such string.
    fn string(&self, index: u8) -> Option<String>;
    /// GET_DESCRIPTOR addressed to an interface (HID and report descriptors).
    fn interface_descriptor(&self, setup: &SetupPacket) -> Option<Vec<u8>> {
        let _ = setup;
        None
    }
    /// A class or vendor request. `data` is the OUT data stage (empty for IN requests).
    /// Returns the IN data (empty for OUT requests), None to stall.
    fn class_request(&mut self, setup: &SetupPacket, data: &[u8]) -> Option<Vec<u8>>;
    /// SET_CONFIGURATION succeeded (0 = back to the address state).
    fn configuration_changed(&mut self, configuration: u8) {
        let _ = configuration;
    }
}

/// Where the default control pipe is in a control transfer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
enum ControlStage {
    /// Waiting for SETUP.
    #[default]
    Idle,
    /// Control read: data to send, then a zero-length OUT status stage.
    DataIn { data: Vec<u8>, sent: usize },
    /// Control write: collecting data, then an IN status stage runs the request.
    DataOut { setup: SetupPacket, data: Vec<u8> },
    /// No-data request done; the IN status stage applies a pending address.
    StatusIn { new_address: Option<u8> },
    /// Request failed: every token but SETUP stalls.
    Stalled,
}

/// Result of running a request.
enum RequestResult {
    Data(Vec<u8>),
    NoData { new_address: Option<u8> },
    Stall,
}

/// Chapter 9 device state and the default control pipe, embedded by device models.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsbDeviceCore {
    address: u8,
    configuration: u8,
    alternate_setting: u8,
    remote_wakeup_enabled: bool,
    /// Halted endpoints: bit n = OUT endpoint n, bit 16 + n = IN endpoint n.
    halted: u32,
    #[serde(skip)]
    stage: ControlStage,
}

impl UsbDeviceCore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bus reset.
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    pub fn address(&self) -> u8 {
        self.address
    }

    pub fn configuration(&self) -> u8 {
        self.configuration
    }

    pub fn is_configured(&self) -> bool {
        self.configuration != 0
    }

    pub fn remote_wakeup_enabled(&self) -> bool {
        self.remote_wakeup_enabled
    }

    fn halt_bit(endpoint_address: u8) -> u32 {
        let number = u32::from(endpoint_address & 0x0f);
        if endpoint_address & 0x80 != 0 {
            1 << (16 + number)
        } else {
            1 << number
        }
    }

    /// Endpoint `endpoint_address` (bit 7 = IN) is halted by SET_FEATURE(ENDPOINT_HALT).
    pub fn is_halted(&self, endpoint_address: u8) -> bool {
        self.halted & Self::halt_bit(endpoint_address) != 0
    }

    /// Checks an IN / OUT token for a non-control endpoint: Some(Stall) when the device is
    /// not configured or the endpoint is halted, None when the device should handle it.
    pub fn check_data_endpoint(&self, pid: Pid, endpoint: u8) -> Option<PacketResult> {
        let address = match pid {
            Pid::In => 0x80 | endpoint,
            Pid::Out => endpoint,
            Pid::Setup => return Some(PacketResult::Stall),
        };
        (!self.is_configured() || self.is_halted(address)).then_some(PacketResult::Stall)
    }

    /// One transaction on endpoint 0.
    pub fn handle_control(
        &mut self,
        handler: &mut dyn ControlHandler,
        pid: Pid,
        data: &mut [u8],
    ) -> PacketResult {
        match pid {
            Pid::Setup => self.setup_stage(handler, data),
            Pid::In => self.in_token(handler, data),
            Pid::Out => self.out_token(data),
        }
    }

    fn setup_stage(&mut self, handler: &mut dyn ControlHandler, data: &[u8]) -> PacketResult {
        // A SETUP always aborts whatever transfer was in progress.
        self.stage = ControlStage::Idle;
        let Some(setup) = SetupPacket::parse(data) else {
            self.stage = ControlStage::Stalled;
            return PacketResult::Stall;
        };
        let length = usize::from(setup.length);
        if !setup.is_device_to_host() && length > 0 {
            if length > MAX_CONTROL_OUT_DATA {
                self.stage = ControlStage::Stalled;
            } else {
                self.stage = ControlStage::DataOut {
                    setup,
                    data: Vec::with_capacity(length),
                };
            }
            // The handshake for SETUP is always ACK; errors show in the next stage.
            return PacketResult::Ack(data.len());
        }
        self.stage = match self.run_request(handler, &setup, &[]) {
            RequestResult::Data(mut reply) if setup.is_device_to_host() => {
                reply.truncate(length);
                if length == 0 {
                    ControlStage::StatusIn { new_address: None }
                } else {
                    ControlStage::DataIn {
                        data: reply,
                        sent: 0,
                    }
                }
            }
            RequestResult::Data(_) => ControlStage::StatusIn { new_address: None },
            RequestResult::NoData { new_address } => ControlStage::StatusIn { new_address },
            RequestResult::Stall => ControlStage::Stalled,
        };
        PacketResult::Ack(data.len())
    }

    fn in_token(&mut self, handler: &mut dyn ControlHandler, buffer: &mut [u8]) -> PacketResult {
        match std::mem::take(&mut self.stage) {
            ControlStage::DataIn { data, sent } => {
                let remaining = data.get(sent..).unwrap_or(&[]);
                let n = remaining.len().min(buffer.len());
                if let (Some(dst), Some(src)) = (buffer.get_mut(..n), remaining.get(..n)) {
                    dst.copy_from_slice(src);
                }
                self.stage = ControlStage::DataIn {
                    data,
                    sent: sent + n,
                };
                PacketResult::Ack(n)
            }
            ControlStage::StatusIn { new_address } => {
                if let Some(address) = new_address {
                    self.address = address;
                }
                PacketResult::Ack(0)
            }
            ControlStage::DataOut { setup, data } => match self.run_request(handler, &setup, &data)
            {
                RequestResult::Stall => {
                    self.stage = ControlStage::Stalled;
                    PacketResult::Stall
                }
                RequestResult::NoData {
                    new_address: Some(address),
                } => {
                    self.address = address;
                    PacketResult::Ack(0)
                }
                _ => PacketResult::Ack(0),
            },
            ControlStage::Idle | ControlStage::Stalled => {
                self.stage = ControlStage::Stalled;
                PacketResult::Stall
            }
        }
    }

    fn out_token(&mut self, buffer: &[u8]) -> PacketResult {
        match &mut self.stage {
            ControlStage::DataOut { setup, data } => {
                let room = usize::from(setup.length).saturating_sub(data.len());
                if buffer.len() > room {
                    // More data than wLength announced.
                    self.stage = ControlStage::Stalled;
                    return PacketResult::Stall;
                }
                data.extend_from_slice(buffer);
                PacketResult::Ack(buffer.len())
            }
            ControlStage::DataIn { .. } => {
                // Status stage of a control read (possibly early: the host may end the
                // data stage before reading everything).
                self.stage = ControlStage::Idle;
                PacketResult::Ack(buffer.len())
            }
            ControlStage::Idle | ControlStage::StatusIn { .. } | ControlStage::Stalled => {
                self.stage = ControlStage::Stalled;
                PacketResult::Stall
            }
        }
    }

    fn run_request(
        &mut self,
        handler: &mut dyn ControlHandler,
        setup: &SetupPacket,
        data: &[u8],
    ) -> RequestResult {
        match setup.kind() {
            RequestKind::Standard => {}
            RequestKind::Class | RequestKind::Vendor => {
                return match handler.class_request(setup, data) {
                    Some(reply) if setup.is_device_to_host() => RequestResult::Data(reply),
                    Some(_) => RequestResult::NoData { new_address: None },
                    None => RequestResult::Stall,
                };
            }
            RequestKind::Reserved => return RequestResult::Stall,
        }
        let no_data = RequestResult::NoData { new_address: None };
        let config = handler.configuration_descriptor();
        match (setup.request, setup.recipient(), setup.is_device_to_host()) {
            (request::GET_STATUS, recipient, true) => {
                let status: u16 = match recipient {
                    Recipient::Device => {
                        let self_powered = config.get(7).is_some_and(|a| a & 0x40 != 0);
                        u16::from(self_powered) | (u16::from(self.remote_wakeup_enabled) << 1)
                    }
                    Recipient::Interface if self.interface_exists(&config, setup.index) => 0,
                    Recipient::Endpoint if self.endpoint_exists(&config, setup.index) => {
                        u16::from(self.is_halted(setup.index as u8))
                    }
                    _ => return RequestResult::Stall,
                };
                RequestResult::Data(status.to_le_bytes().to_vec())
            }
            (request::CLEAR_FEATURE | request::SET_FEATURE, recipient, false) => {
                let set = setup.request == request::SET_FEATURE;
                match (recipient, setup.value) {
                    (Recipient::Device, FEATURE_DEVICE_REMOTE_WAKEUP)
                        if config
                            .get(7)
                            .is_some_and(|a| a & CONFIG_ATTR_REMOTE_WAKEUP != 0) =>
                    {
                        self.remote_wakeup_enabled = set;
                        no_data
                    }
                    (Recipient::Endpoint, FEATURE_ENDPOINT_HALT)
                        if self.endpoint_exists(&config, setup.index) =>
                    {
                        let bit = Self::halt_bit(setup.index as u8);
                        // Endpoint 0 cannot stay halted: a protocol stall clears itself.
                        if set && setup.index & 0x0f != 0 {
                            self.halted |= bit;
                        } else {
                            self.halted &= !bit;
                        }
                        no_data
                    }
                    _ => RequestResult::Stall,
                }
            }
            (request::SET_ADDRESS, Recipient::Device, false) => {
                if setup.value > 127 || self.configuration != 0 {
                    RequestResult::Stall
                } else {
                    RequestResult::NoData {
                        new_address: Some(setup.value as u8),
                    }
                }
            }
            (request::GET_DESCRIPTOR, Recipient::Device, true) => {
                let kind = (setup.value >> 8) as u8;
                let index = setup.value as u8;
                let descriptor = match kind {
                    descriptor_type::DEVICE if index == 0 => Some(handler.device_descriptor()),
                    descriptor_type::CONFIGURATION if index == 0 => Some(config),
                    descriptor_type::STRING if index == 0 => {
                        let lang = LANGUAGE_EN_US.to_le_bytes();
                        Some(vec![4, descriptor_type::STRING, lang[0], lang[1]])
                    }
                    descriptor_type::STRING => handler.string(index).map(|s| string_descriptor(&s)),
                    _ => None,
                };
                descriptor.map_or(RequestResult::Stall, RequestResult::Data)
            }
            (request::GET_DESCRIPTOR, Recipient::Interface, true) => handler
                .interface_descriptor(setup)
                .map_or(RequestResult::Stall, RequestResult::Data),
            (request::GET_CONFIGURATION, Recipient::Device, true) => {
                RequestResult::Data(vec![self.configuration])
            }
            (request::SET_CONFIGURATION, Recipient::Device, false) => {
                let wanted = setup.value;
                let ours = config.get(5).copied().unwrap_or(1);
                if wanted != 0 && wanted != u16::from(ours) {
                    return RequestResult::Stall;
                }
                if self.address == 0 {
                    // Not allowed in the default state.
                    return RequestResult::Stall;
                }
                self.configuration = wanted as u8;
                self.alternate_setting = 0;
                self.halted = 0;
                handler.configuration_changed(self.configuration);
                no_data
            }
            (request::GET_INTERFACE, Recipient::Interface, true)
                if self.is_configured() && self.interface_exists(&config, setup.index) =>
            {
                RequestResult::Data(vec![self.alternate_setting])
            }
            (request::SET_INTERFACE, Recipient::Interface, false)
                if self.is_configured()
                    && self.interface_exists(&config, setup.index)
                    && setup.value == 0 =>
            {
                self.alternate_setting = 0;
                self.halted = 0;
                no_data
            }
            _ => RequestResult::Stall,
        }
    }

    fn interface_exists(&self, config: &[u8], index: u16) -> bool {
        descriptors(config).any(|d| {
            d.get(1) == Some(&descriptor_type::INTERFACE)
                && d.get(2).map(|&n| u16::from(n)) == Some(index)
        })
    }

    fn endpoint_exists(&self, config: &[u8], index: u16) -> bool {
        if index & !0x8f != 0 {
            return false;
        }
        index & 0x0f == 0
            || descriptors(config).any(|d| {
                d.get(1) == Some(&descriptor_type::ENDPOINT)
                    && d.get(2).map(|&a| u16::from(a)) == Some(index)
            })
    }
}

/// The descriptors packed in a configuration descriptor (stops at a malformed length).
fn descriptors(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        let len = usize::from(*rest.first()?);
        if len < 2 || len > rest.len() {
            return None;
        }
        let (head, tail) = rest.split_at(len);
        rest = tail;
        Some(head)
    })
}

/// A string descriptor (UTF-16LE, at most 126 code units so the length fits a byte).
pub fn string_descriptor(text: &str) -> Vec<u8> {
    let units: Vec<u16> = text.encode_utf16().take(126).collect();
    let mut out = Vec::with_capacity(2 + units.len() * 2);
    out.push((2 + units.len() * 2) as u8);
    out.push(descriptor_type::STRING);
    for unit in units {
        out.extend_from_slice(&unit.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal device: one interface, one interrupt IN endpoint, a vendor request that
    /// echoes its OUT data back on a later IN request.
    struct TestModel {
        stored: Vec<u8>,
        configured_with: Vec<u8>,
    }

    const DEVICE: [u8; 18] = [
        18, 1, 0x10, 0x01, 0, 0, 0, 8, 0x34, 0x12, 0x78, 0x56, 0, 1, 1, 2, 0, 1,
    ];
    const CONFIG: [u8; 25] = [
        9, 2, 25, 0, 1, 1, 0, 0xa0, 50, // configuration, remote wakeup
        9, 4, 0, 0, 1, 0xff, 0, 0, 0, // interface 0
        7, 5, 0x81, 3, 8, 0, 10, // endpoint 1 IN
    ];

    impl ControlHandler for TestModel {
        fn device_descriptor(&self) -> Vec<u8> {
            DEVICE.to_vec()
        }
        fn configuration_descriptor(&self) -> Vec<u8> {
            CONFIG.to_vec()
        }
        fn string(&self, index: u8) -> Option<String> {
            match index {
                1 => Some("Maker".into()),
                2 => Some("A longer product name".into()),
                _ => None,
            }
        }
        fn class_request(&mut self, setup: &SetupPacket, data: &[u8]) -> Option<Vec<u8>> {
            match setup.request {
                0x01 if !setup.is_device_to_host() => {
                    self.stored = data.to_vec();
                    Some(Vec::new())
                }
                0x02 if setup.is_device_to_host() => Some(self.stored.clone()),
                _ => None,
            }
        }
        fn configuration_changed(&mut self, configuration: u8) {
            self.configured_with.push(configuration);
        }
    }

    fn model() -> TestModel {
        TestModel {
            stored: Vec::new(),
            configured_with: Vec::new(),
        }
    }

    fn setup(core: &mut UsbDeviceCore, m: &mut TestModel, packet: SetupPacket) -> PacketResult {
        let mut bytes = packet.to_bytes();
        core.handle_control(m, Pid::Setup, &mut bytes)
    }

    /// Runs a control read with `max_packet`-byte IN packets; returns the data or None on
    /// a stall.
    fn control_read(
        core: &mut UsbDeviceCore,
        m: &mut TestModel,
        packet: SetupPacket,
        max_packet: usize,
    ) -> Option<Vec<u8>> {
        assert_eq!(setup(core, m, packet), PacketResult::Ack(8));
        let mut out = Vec::new();
        loop {
            let mut buf = vec![0u8; max_packet];
            match core.handle_control(m, Pid::In, &mut buf) {
                PacketResult::Ack(n) => {
                    out.extend_from_slice(&buf[..n]);
                    if n < max_packet {
                        break;
                    }
                }
                PacketResult::Stall => return None,
                PacketResult::Nak => panic!("control pipe NAKed"),
            }
            assert!(out.len() <= usize::from(packet.length));
        }
        assert_eq!(
            core.handle_control(m, Pid::Out, &mut []),
            PacketResult::Ack(0)
        );
        Some(out)
    }

    fn control_no_data(core: &mut UsbDeviceCore, m: &mut TestModel, packet: SetupPacket) -> bool {
        assert_eq!(setup(core, m, packet), PacketResult::Ack(8));
        core.handle_control(m, Pid::In, &mut []) == PacketResult::Ack(0)
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

    #[test]
    fn device_descriptor_in_several_packets_and_truncated() {
        let mut core = UsbDeviceCore::new();
        let mut m = model();
        let full = control_read(&mut core, &mut m, req(0x80, 6, 0x0100, 0, 64), 8).unwrap();
        assert_eq!(full, DEVICE);
        let first8 = control_read(&mut core, &mut m, req(0x80, 6, 0x0100, 0, 8), 8).unwrap();
        assert_eq!(first8, DEVICE[..8]);
        let config9 = control_read(&mut core, &mut m, req(0x80, 6, 0x0200, 0, 9), 8).unwrap();
        assert_eq!(config9, CONFIG[..9]);
        let config = control_read(&mut core, &mut m, req(0x80, 6, 0x0200, 0, 255), 8).unwrap();
        assert_eq!(config, CONFIG);
    }

    #[test]
    fn string_descriptors() {
        let mut core = UsbDeviceCore::new();
        let mut m = model();
        let langs = control_read(&mut core, &mut m, req(0x80, 6, 0x0300, 0, 255), 64).unwrap();
        assert_eq!(langs, [4, 3, 0x09, 0x04]);
        let s = control_read(&mut core, &mut m, req(0x80, 6, 0x0301, 0x409, 255), 8).unwrap();
        assert_eq!(s, [12, 3, b'M', 0, b'a', 0, b'k', 0, b'e', 0, b'r', 0]);
        assert!(control_read(&mut core, &mut m, req(0x80, 6, 0x0309, 0x409, 255), 8).is_none());
    }

    #[test]
    fn set_address_applies_after_status_stage() {
        let mut core = UsbDeviceCore::new();
        let mut m = model();
        assert_eq!(
            setup(&mut core, &mut m, req(0, 5, 7, 0, 0)),
            PacketResult::Ack(8)
        );
        assert_eq!(core.address(), 0);
        assert_eq!(
            core.handle_control(&mut m, Pid::In, &mut []),
            PacketResult::Ack(0)
        );
        assert_eq!(core.address(), 7);
        // Addresses above 127 stall.
        assert!(!control_no_data(&mut core, &mut m, req(0, 5, 200, 0, 0)));
        assert_eq!(core.address(), 7);
    }

    #[test]
    fn configuration_interface_status_and_features() {
        let mut core = UsbDeviceCore::new();
        let mut m = model();
        // Not allowed before an address is set.
        assert!(!control_no_data(&mut core, &mut m, req(0, 9, 1, 0, 0)));
        assert!(control_no_data(&mut core, &mut m, req(0, 5, 3, 0, 0)));
        assert!(!control_no_data(&mut core, &mut m, req(0, 9, 2, 0, 0)));
        assert!(control_no_data(&mut core, &mut m, req(0, 9, 1, 0, 0)));
        assert_eq!(m.configured_with, [1]);
        assert_eq!(
            control_read(&mut core, &mut m, req(0x80, 8, 0, 0, 1), 8).unwrap(),
            [1]
        );
        assert_eq!(
            control_read(&mut core, &mut m, req(0x81, 0x0a, 0, 0, 1), 8).unwrap(),
            [0]
        );
        assert!(control_no_data(&mut core, &mut m, req(1, 0x0b, 0, 0, 0)));
        assert!(!control_no_data(&mut core, &mut m, req(1, 0x0b, 1, 0, 0)));
        assert!(!control_no_data(&mut core, &mut m, req(1, 0x0b, 0, 5, 0)));

        // Remote wakeup.
        assert_eq!(
            control_read(&mut core, &mut m, req(0x80, 0, 0, 0, 2), 8).unwrap(),
            [0, 0]
        );
        assert!(control_no_data(&mut core, &mut m, req(0, 3, 1, 0, 0)));
        assert!(core.remote_wakeup_enabled());
        assert_eq!(
            control_read(&mut core, &mut m, req(0x80, 0, 0, 0, 2), 8).unwrap(),
            [2, 0]
        );
        assert!(control_no_data(&mut core, &mut m, req(0, 1, 1, 0, 0)));
        assert!(!core.remote_wakeup_enabled());

        // Endpoint halt on 0x81; unknown endpoints stall.
        assert!(control_no_data(&mut core, &mut m, req(2, 3, 0, 0x81, 0)));
        assert!(core.is_halted(0x81));
        assert_eq!(
            core.check_data_endpoint(Pid::In, 1),
            Some(PacketResult::Stall)
        );
        assert_eq!(
            control_read(&mut core, &mut m, req(0x82, 0, 0, 0x81, 2), 8).unwrap(),
            [1, 0]
        );
        assert!(control_no_data(&mut core, &mut m, req(2, 1, 0, 0x81, 0)));
        assert!(!core.is_halted(0x81));
        assert_eq!(core.check_data_endpoint(Pid::In, 1), None);
        assert!(!control_no_data(&mut core, &mut m, req(2, 3, 0, 0x82, 0)));

        // Unconfigure: data endpoints stall again.
        assert!(control_no_data(&mut core, &mut m, req(0, 9, 0, 0, 0)));
        assert_eq!(
            core.check_data_endpoint(Pid::In, 1),
            Some(PacketResult::Stall)
        );
    }

    #[test]
    fn control_write_with_data_stage_then_read_back() {
        let mut core = UsbDeviceCore::new();
        let mut m = model();
        assert_eq!(
            setup(&mut core, &mut m, req(0x41, 1, 0, 0, 10)),
            PacketResult::Ack(8)
        );
        let mut part1 = [1u8, 2, 3, 4, 5, 6, 7, 8];
        let mut part2 = [9u8, 10];
        assert_eq!(
            core.handle_control(&mut m, Pid::Out, &mut part1),
            PacketResult::Ack(8)
        );
        assert_eq!(
            core.handle_control(&mut m, Pid::Out, &mut part2),
            PacketResult::Ack(2)
        );
        assert!(m.stored.is_empty(), "request runs at the status stage");
        assert_eq!(
            core.handle_control(&mut m, Pid::In, &mut []),
            PacketResult::Ack(0)
        );
        assert_eq!(m.stored, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        let back = control_read(&mut core, &mut m, req(0xc1, 2, 0, 0, 64), 8).unwrap();
        assert_eq!(back, m.stored);
    }

    #[test]
    fn protocol_errors_stall_until_next_setup() {
        let mut core = UsbDeviceCore::new();
        let mut m = model();
        // Unknown standard request.
        assert_eq!(
            setup(&mut core, &mut m, req(0x80, 0x42, 0, 0, 8)),
            PacketResult::Ack(8)
        );
        assert_eq!(
            core.handle_control(&mut m, Pid::In, &mut [0; 8]),
            PacketResult::Stall
        );
        assert_eq!(
            core.handle_control(&mut m, Pid::Out, &mut []),
            PacketResult::Stall
        );
        // Short SETUP packets stall.
        assert_eq!(
            core.handle_control(&mut m, Pid::Setup, &mut [0; 4]),
            PacketResult::Stall
        );
        // Too much OUT data.
        assert_eq!(
            setup(&mut core, &mut m, req(0x41, 1, 0, 0, 2)),
            PacketResult::Ack(8)
        );
        assert_eq!(
            core.handle_control(&mut m, Pid::Out, &mut [0; 8]),
            PacketResult::Stall
        );
        // Huge OUT data stage announced.
        assert_eq!(
            setup(&mut core, &mut m, req(0x41, 1, 0, 0, 0xffff)),
            PacketResult::Ack(8)
        );
        assert_eq!(
            core.handle_control(&mut m, Pid::Out, &mut [0; 8]),
            PacketResult::Stall
        );
        // A good request afterwards works.
        let d = control_read(&mut core, &mut m, req(0x80, 6, 0x0100, 0, 18), 8).unwrap();
        assert_eq!(d, DEVICE);
        // IN without SETUP stalls.
        assert_eq!(
            core.handle_control(&mut m, Pid::In, &mut [0; 8]),
            PacketResult::Stall
        );
    }

    #[test]
    fn early_status_stage_and_reset() {
        let mut core = UsbDeviceCore::new();
        let mut m = model();
        assert_eq!(
            setup(&mut core, &mut m, req(0x80, 6, 0x0100, 0, 64)),
            PacketResult::Ack(8)
        );
        let mut buf = [0u8; 8];
        assert_eq!(
            core.handle_control(&mut m, Pid::In, &mut buf),
            PacketResult::Ack(8)
        );
        // Host gives up after 8 bytes (SeaBIOS does this to learn bMaxPacketSize0).
        assert_eq!(
            core.handle_control(&mut m, Pid::Out, &mut []),
            PacketResult::Ack(0)
        );
        assert!(control_no_data(&mut core, &mut m, req(0, 5, 9, 0, 0)));
        core.reset();
        assert_eq!(core.address(), 0);
        assert!(!core.is_configured());
    }

    #[test]
    fn setup_packet_round_trip_and_descriptor_walk() {
        let p = req(0xa1, 0x01, 0x0100, 2, 8);
        assert_eq!(SetupPacket::parse(&p.to_bytes()), Some(p));
        assert_eq!(p.kind(), RequestKind::Class);
        assert_eq!(p.recipient(), Recipient::Interface);
        assert!(SetupPacket::parse(&[0; 9]).is_none());
        // A malformed length byte ends the walk instead of looping or panicking.
        assert_eq!(descriptors(&[9, 2, 0, 0, 0, 0, 0, 0, 0, 0, 4]).count(), 1);
        assert_eq!(descriptors(&[0, 0, 0]).count(), 0);
        assert_eq!(string_descriptor(&"x".repeat(300)).len(), 254);
    }
}
