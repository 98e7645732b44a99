//! A PS/2 (MF2) keyboard as it sits behind the i8042 controller.
//!
//! Emulated: the keyboard command set (0xFF reset with BAT 0xAA, 0xF2 identify AB 83,
//! 0xED LEDs, 0xF3 typematic rate/delay (stored, no auto-repeat is generated: the host
//! repeats keys itself), 0xF4/0xF5/0xF6 enable/disable/defaults, 0xF0 scan code set
//! 1/2/3 with query, 0xEE echo, 0xFE resend, 0xF7..0xFD set-3 key modes (acknowledged, not
//! applied), unknown bytes answered with 0xFE), and scan code generation from Linux evdev
//! key codes in sets 1, 2 and 3: the whole 105-key layout, the Japanese/Brazilian extra
//! keys, the ACPI power keys and the Microsoft multimedia keys, with E0 prefixes and the
//! special Pause and PrintScreen sequences (whose bytes depend on the held modifiers).
//!
//! Output bytes sit in two bounded queues: command replies, which go out first (like
//! QEMU's command queue, so a reply is never stuck behind typing), and key data. Key
//! sequences are queued whole or not at all (dropped on overflow, like QEMU).
//! The set-2 -> set-1 translation (i8042 command byte bit 6) is the controller's job;
//! [`SET2_TO_SET1`] is exported for it.
//!
//! Not emulated: per-key set-3 make/break/typematic modes (set 3 always sends make and
//! break), the typematic repeat itself, the overflow marker bytes, the fake shifts that
//! real keyboards add around the gray navigation keys, and timing.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Key data bytes the keyboard buffers. The controller's output buffer holds one more
/// byte, so a guest draining the port sees at most 16 bytes, the figure Linux's
/// `i8042_flush` and SeaBIOS accept (QEMU's queue is 16 bytes including that byte).
pub const KBD_QUEUE_CAPACITY: usize = 15;
/// Command reply bytes the keyboard buffers.
pub const KBD_REPLY_CAPACITY: usize = 16;

/// Acknowledge.
pub const KBD_ACK: u8 = 0xFA;
/// Resend / unknown command.
pub const KBD_RESEND: u8 = 0xFE;
/// Basic assurance test passed (after reset).
pub const KBD_BAT_OK: u8 = 0xAA;
/// Echo reply.
pub const KBD_ECHO: u8 = 0xEE;
/// First identification byte of an MF2 keyboard.
pub const KBD_ID_1: u8 = 0xAB;
/// Second identification byte (untranslated; the controller turns it into 0x41).
pub const KBD_ID_2: u8 = 0x83;
/// Default typematic byte: 10.9 characters/s after 500 ms.
pub const KBD_DEFAULT_TYPEMATIC: u8 = 0x2B;

/// Linux evdev key codes used by the special cases here and useful to callers.
pub mod evdev {
    pub const KEY_ESC: u16 = 1;
    pub const KEY_ENTER: u16 = 28;
    pub const KEY_LEFTCTRL: u16 = 29;
    pub const KEY_A: u16 = 30;
    pub const KEY_LEFTSHIFT: u16 = 42;
    pub const KEY_RIGHTSHIFT: u16 = 54;
    pub const KEY_LEFTALT: u16 = 56;
    pub const KEY_CAPSLOCK: u16 = 58;
    pub const KEY_F1: u16 = 59;
    pub const KEY_NUMLOCK: u16 = 69;
    pub const KEY_KPENTER: u16 = 96;
    pub const KEY_RIGHTCTRL: u16 = 97;
    pub const KEY_KPSLASH: u16 = 98;
    pub const KEY_SYSRQ: u16 = 99;
    pub const KEY_RIGHTALT: u16 = 100;
    pub const KEY_HOME: u16 = 102;
    pub const KEY_UP: u16 = 103;
    pub const KEY_LEFT: u16 = 105;
    pub const KEY_RIGHT: u16 = 106;
    pub const KEY_DOWN: u16 = 108;
    pub const KEY_DELETE: u16 = 111;
    pub const KEY_MUTE: u16 = 113;
    pub const KEY_PAUSE: u16 = 119;
    pub const KEY_HANGEUL: u16 = 122;
    pub const KEY_HANJA: u16 = 123;
    pub const KEY_LEFTMETA: u16 = 125;
    pub const KEY_PRINT: u16 = 210;
}

/// The i8042's set-2 -> set-1 translation table (command byte bit 6). A 0xF0 break prefix
/// is not in the table: the controller swallows it and ORs 0x80 into the next byte.
pub const SET2_TO_SET1: [u8; 256] = {
    const LOW: [u8; 128] = [
        0xff, 0x43, 0x41, 0x3f, 0x3d, 0x3b, 0x3c, 0x58, 0x64, 0x44, 0x42, 0x40, 0x3e, 0x0f, 0x29,
        0x59, 0x65, 0x38, 0x2a, 0x70, 0x1d, 0x10, 0x02, 0x5a, 0x66, 0x71, 0x2c, 0x1f, 0x1e, 0x11,
        0x03, 0x5b, 0x67, 0x2e, 0x2d, 0x20, 0x12, 0x05, 0x04, 0x5c, 0x68, 0x39, 0x2f, 0x21, 0x14,
        0x13, 0x06, 0x5d, 0x69, 0x31, 0x30, 0x23, 0x22, 0x15, 0x07, 0x5e, 0x6a, 0x72, 0x32, 0x24,
        0x16, 0x08, 0x09, 0x5f, 0x6b, 0x33, 0x25, 0x17, 0x18, 0x0b, 0x0a, 0x60, 0x6c, 0x34, 0x35,
        0x26, 0x27, 0x19, 0x0c, 0x61, 0x6d, 0x73, 0x28, 0x74, 0x1a, 0x0d, 0x62, 0x6e, 0x3a, 0x36,
        0x1c, 0x1b, 0x75, 0x2b, 0x63, 0x76, 0x55, 0x56, 0x77, 0x78, 0x79, 0x7a, 0x0e, 0x7b, 0x7c,
        0x4f, 0x7d, 0x4b, 0x47, 0x7e, 0x7f, 0x6f, 0x52, 0x53, 0x50, 0x4c, 0x4d, 0x48, 0x01, 0x45,
        0x57, 0x4e, 0x51, 0x4a, 0x37, 0x49, 0x46, 0x54,
    ];
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = if i < 128 { LOW[i] } else { i as u8 };
        i += 1;
    }
    // F7 and Alt+SysRq are the two set-2 codes above 0x7f.
    table[0x83] = 0x41;
    table[0x84] = 0x54;
    table
};

/// Translates a set-2 byte sequence to set 1 the way the i8042 does.
pub fn translate_set2_to_set1(set2: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(set2.len());
    let mut release = false;
    for &byte in set2 {
        if byte == 0xF0 {
            release = true;
            continue;
        }
        let translated = SET2_TO_SET1[usize::from(byte)];
        out.push(if release {
            translated | 0x80
        } else {
            translated
        });
        release = false;
    }
    out
}

/// Set-2 code of an evdev key: `0xE0xx` for E0-prefixed keys. Pause and PrintScreen
/// (modifier dependent) and the Korean make-only keys are handled by the caller.
pub fn evdev_to_set2(code: u16) -> Option<u16> {
    let set2 = match code {
        1 => 0x76,           // Esc
        2 => 0x16,           // 1
        3 => 0x1e,           // 2
        4 => 0x26,           // 3
        5 => 0x25,           // 4
        6 => 0x2e,           // 5
        7 => 0x36,           // 6
        8 => 0x3d,           // 7
        9 => 0x3e,           // 8
        10 => 0x46,          // 9
        11 => 0x45,          // 0
        12 => 0x4e,          // -
        13 => 0x55,          // =
        14 => 0x66,          // Backspace
        15 => 0x0d,          // Tab
        16 => 0x15,          // Q
        17 => 0x1d,          // W
        18 => 0x24,          // E
        19 => 0x2d,          // R
        20 => 0x2c,          // T
        21 => 0x35,          // Y
        22 => 0x3c,          // U
        23 => 0x43,          // I
        24 => 0x44,          // O
        25 => 0x4d,          // P
        26 => 0x54,          // [
        27 => 0x5b,          // ]
        28 => 0x5a,          // Enter
        29 => 0x14,          // Left Ctrl
        30 => 0x1c,          // A
        31 => 0x1b,          // S
        32 => 0x23,          // D
        33 => 0x2b,          // F
        34 => 0x34,          // G
        35 => 0x33,          // H
        36 => 0x3b,          // J
        37 => 0x42,          // K
        38 => 0x4b,          // L
        39 => 0x4c,          // ;
        40 => 0x52,          // '
        41 => 0x0e,          // `
        42 => 0x12,          // Left Shift
        43 => 0x5d,          // backslash
        44 => 0x1a,          // Z
        45 => 0x22,          // X
        46 => 0x21,          // C
        47 => 0x2a,          // V
        48 => 0x32,          // B
        49 => 0x31,          // N
        50 => 0x3a,          // M
        51 => 0x41,          // ,
        52 => 0x49,          // .
        53 => 0x4a,          // /
        54 => 0x59,          // Right Shift
        55 => 0x7c,          // Keypad *
        56 => 0x11,          // Left Alt
        57 => 0x29,          // Space
        58 => 0x58,          // Caps Lock
        59 => 0x05,          // F1
        60 => 0x06,          // F2
        61 => 0x04,          // F3
        62 => 0x0c,          // F4
        63 => 0x03,          // F5
        64 => 0x0b,          // F6
        65 => 0x83,          // F7
        66 => 0x0a,          // F8
        67 => 0x01,          // F9
        68 => 0x09,          // F10
        69 => 0x77,          // Num Lock
        70 => 0x7e,          // Scroll Lock
        71 => 0x6c,          // Keypad 7
        72 => 0x75,          // Keypad 8
        73 => 0x7d,          // Keypad 9
        74 => 0x7b,          // Keypad -
        75 => 0x6b,          // Keypad 4
        76 => 0x73,          // Keypad 5
        77 => 0x74,          // Keypad 6
        78 => 0x79,          // Keypad +
        79 => 0x69,          // Keypad 1
        80 => 0x72,          // Keypad 2
        81 => 0x7a,          // Keypad 3
        82 => 0x70,          // Keypad 0
        83 => 0x71,          // Keypad .
        86 => 0x61,          // 102nd key (ISO < >)
        87 => 0x78,          // F11
        88 => 0x07,          // F12
        89 => 0x51,          // Ro (JIS)
        90 => 0x63,          // Katakana
        91 => 0x62,          // Hiragana
        92 => 0x64,          // Henkan
        93 => 0x13,          // Katakana/Hiragana
        94 => 0x67,          // Muhenkan
        95 => 0x27,          // Keypad JP comma
        96 => 0xe05a,        // Keypad Enter
        97 => 0xe014,        // Right Ctrl
        98 => 0xe04a,        // Keypad /
        100 => 0xe011,       // Right Alt
        102 => 0xe06c,       // Home
        103 => 0xe075,       // Up
        104 => 0xe07d,       // Page Up
        105 => 0xe06b,       // Left
        106 => 0xe074,       // Right
        107 => 0xe069,       // End
        108 => 0xe072,       // Down
        109 => 0xe07a,       // Page Down
        110 => 0xe070,       // Insert
        111 => 0xe071,       // Delete
        113 => 0xe023,       // Mute
        114 => 0xe021,       // Volume Down
        115 => 0xe032,       // Volume Up
        116 => 0xe037,       // Power
        117 => 0x0f,         // Keypad = (Mac)
        121 => 0x6d,         // Keypad , (Brazil)
        124 => 0x6a,         // Yen (JIS)
        125 => 0xe01f,       // Left Meta (Windows)
        126 => 0xe027,       // Right Meta
        127 | 139 => 0xe02f, // Compose / Menu (application key)
        128 => 0xe028,       // WWW Stop
        136 | 217 => 0xe010, // Find / Search (WWW Search)
        140 => 0xe02b,       // Calculator
        142 => 0xe03f,       // Sleep
        143 => 0xe05e,       // Wake
        150 | 172 => 0xe03a, // WWW / Homepage
        155 => 0xe048,       // Mail
        156 => 0xe018,       // Bookmarks (WWW Favorites)
        157 => 0xe040,       // My Computer
        158 => 0xe038,       // WWW Back
        159 => 0xe030,       // WWW Forward
        163 => 0xe04d,       // Next Track
        164 => 0xe034,       // Play/Pause
        165 => 0xe015,       // Previous Track
        166 => 0xe03b,       // Stop
        173 => 0xe020,       // WWW Refresh
        226 => 0xe050,       // Media Select
        _ => return None,
    };
    Some(set2)
}

/// Set-3 code of an evdev key (set 3 has single-byte codes and no prefixes).
pub fn evdev_to_set3(code: u16) -> Option<u8> {
    let set3 = match code {
        1 => 0x08, // Esc
        2..=11 | 13..=25 | 28 => {
            // Same byte as in set 2 for the digits, =, Backspace, Tab, the QWERTY row
            // and Enter.
            return evdev_to_set2(code).map(|c| c as u8);
        }
        12 => 0x4e,                                             // -
        26 => 0x54,                                             // [
        27 => 0x5b,                                             // ]
        29 => 0x11,                                             // Left Ctrl
        30..=38 => return evdev_to_set2(code).map(|c| c as u8), // A..L
        39 => 0x4c,                                             // ;
        40 => 0x52,                                             // '
        41 => 0x0e,                                             // `
        42 => 0x12,                                             // Left Shift
        43 => 0x5c,                                             // backslash
        44..=53 => return evdev_to_set2(code).map(|c| c as u8), // Z../
        54 => 0x59,                                             // Right Shift
        55 => 0x7e,                                             // Keypad *
        56 => 0x19,                                             // Left Alt
        57 => 0x29,                                             // Space
        58 => 0x14,                                             // Caps Lock
        59 => 0x07,                                             // F1
        60 => 0x0f,                                             // F2
        61 => 0x17,                                             // F3
        62 => 0x1f,                                             // F4
        63 => 0x27,                                             // F5
        64 => 0x2f,                                             // F6
        65 => 0x37,                                             // F7
        66 => 0x3f,                                             // F8
        67 => 0x47,                                             // F9
        68 => 0x4f,                                             // F10
        69 => 0x76,                                             // Num Lock
        70 => 0x5f,                                             // Scroll Lock
        71 => 0x6c,                                             // Keypad 7
        72 => 0x75,                                             // Keypad 8
        73 => 0x7d,                                             // Keypad 9
        74 => 0x84,                                             // Keypad -
        75 => 0x6b,                                             // Keypad 4
        76 => 0x73,                                             // Keypad 5
        77 => 0x74,                                             // Keypad 6
        78 => 0x7c,                                             // Keypad +
        79 => 0x69,                                             // Keypad 1
        80 => 0x72,                                             // Keypad 2
        81 => 0x7a,                                             // Keypad 3
        82 => 0x70,                                             // Keypad 0
        83 => 0x71,                                             // Keypad .
        86 => 0x13,                                             // 102nd key
        87 => 0x56,                                             // F11
        88 => 0x5e,                                             // F12
        92 => 0x86,                                             // Henkan
        93 => 0x87,                                             // Katakana/Hiragana
        94 => 0x85,                                             // Muhenkan
        96 => 0x79,                                             // Keypad Enter
        97 => 0x58,                                             // Right Ctrl
        98 => 0x77,                                             // Keypad /
        99 | 210 => 0x57,                                       // PrintScreen / SysRq
        100 => 0x39,                                            // Right Alt
        102 => 0x6e,                                            // Home
        103 => 0x63,                                            // Up
        104 => 0x6f,                                            // Page Up
        105 => 0x61,                                            // Left
        106 => 0x6a,                                            // Right
        107 => 0x65,                                            // End
        108 => 0x60,                                            // Down
        109 => 0x6d,                                            // Page Down
        110 => 0x67,                                            // Insert
        111 => 0x64,                                            // Delete
        119 => 0x62,                                            // Pause
        125 => 0x8b,                                            // Left Meta
        126 => 0x8c,                                            // Right Meta
        127 | 139 => 0x8d,                                      // Menu
        _ => return None,
    };
    Some(set3)
}

const MOD_LEFT_CTRL: u8 = 0x01;
const MOD_RIGHT_CTRL: u8 = 0x02;
const MOD_LEFT_SHIFT: u8 = 0x04;
const MOD_RIGHT_SHIFT: u8 = 0x08;
const MOD_LEFT_ALT: u8 = 0x10;
const MOD_RIGHT_ALT: u8 = 0x20;
const MOD_CTRL: u8 = MOD_LEFT_CTRL | MOD_RIGHT_CTRL;
const MOD_SHIFT: u8 = MOD_LEFT_SHIFT | MOD_RIGHT_SHIFT;
const MOD_ALT: u8 = MOD_LEFT_ALT | MOD_RIGHT_ALT;

fn modifier_bit(code: u16) -> u8 {
    match code {
        evdev::KEY_LEFTCTRL => MOD_LEFT_CTRL,
        evdev::KEY_RIGHTCTRL => MOD_RIGHT_CTRL,
        evdev::KEY_LEFTSHIFT => MOD_LEFT_SHIFT,
        evdev::KEY_RIGHTSHIFT => MOD_RIGHT_SHIFT,
        evdev::KEY_LEFTALT => MOD_LEFT_ALT,
        evdev::KEY_RIGHTALT => MOD_RIGHT_ALT,
        _ => 0,
    }
}

/// What the keyboard expects the next host byte to be.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
enum Expecting {
    #[default]
    Command,
    LedState,
    Typematic,
    ScanCodeSet,
    /// After 0xFB/0xFC/0xFD: a list of set-3 key codes, ended by the next command.
    KeyList,
}

/// The keyboard. Plain data: serialize it as is for save/restore.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ps2Keyboard {
    replies: VecDeque<u8>,
    keys: VecDeque<u8>,
    expecting: Expecting,
    scanning: bool,
    scan_code_set: u8,
    leds: u8,
    typematic: u8,
    modifiers: u8,
    last_sent: u8,
}

impl Default for Ps2Keyboard {
    fn default() -> Self {
        Self::new()
    }
}

impl Ps2Keyboard {
    /// A keyboard after power-on: scanning, set 2, LEDs off.
    pub fn new() -> Self {
        Self {
            replies: VecDeque::with_capacity(KBD_REPLY_CAPACITY),
            keys: VecDeque::with_capacity(KBD_QUEUE_CAPACITY),
            expecting: Expecting::Command,
            scanning: true,
            scan_code_set: 2,
            leds: 0,
            typematic: KBD_DEFAULT_TYPEMATIC,
            modifiers: 0,
            last_sent: 0,
        }
    }

    /// Machine reset: back to the power-on state (held modifiers are forgotten).
    pub fn reset(&mut self) {
        *self = Self::new();
    }

    /// LED state set by the guest with 0xED: bit 0 Scroll Lock, bit 1 Num Lock, bit 2 Caps Lock.
    pub fn leds(&self) -> u8 {
        self.leds
    }

    /// Typematic byte set with 0xF3 (bits 0..4 rate, bits 5..6 delay).
    pub fn typematic(&self) -> u8 {
        self.typematic
    }

    /// The selected scan code set (1, 2 or 3).
    pub fn scan_code_set(&self) -> u8 {
        self.scan_code_set
    }

    /// Whether the keyboard reports key presses (0xF4 / 0xF5).
    pub fn scanning_enabled(&self) -> bool {
        self.scanning
    }

    /// Whether a byte waits to be sent to the controller.
    pub fn has_data(&self) -> bool {
        !self.replies.is_empty() || !self.keys.is_empty()
    }

    /// Bytes waiting to be sent (replies and key data).
    pub fn pending_len(&self) -> usize {
        self.replies.len() + self.keys.len()
    }

    /// The next byte for the controller: command replies first, then key data.
    pub fn read_byte(&mut self) -> Option<u8> {
        let byte = self.replies.pop_front().or_else(|| self.keys.pop_front())?;
        self.last_sent = byte;
        Some(byte)
    }

    fn reply(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            if self.replies.len() < KBD_REPLY_CAPACITY {
                self.replies.push_back(byte);
            }
        }
    }

    /// Restores the defaults as QEMU does for 0xF5/0xF6/0xFF: set 2, LEDs off, default
    /// typematic, output discarded.
    fn load_defaults(&mut self) {
        self.scan_code_set = 2;
        self.leds = 0;
        self.typematic = KBD_DEFAULT_TYPEMATIC;
        self.replies.clear();
        self.keys.clear();
        self.expecting = Expecting::Command;
    }

    /// A byte from the host (written to port 0x60 without a pending controller command).
    pub fn write(&mut self, byte: u8) {
        let expecting = std::mem::take(&mut self.expecting);
        // A command byte aborts a pending argument, as on real keyboards.
        if expecting != Expecting::Command && byte < 0xED {
            match expecting {
                Expecting::LedState => {
                    self.leds = byte & 0x07;
                    self.reply(&[KBD_ACK]);
                }
                Expecting::Typematic => {
                    self.typematic = byte & 0x7f;
                    self.reply(&[KBD_ACK]);
                }
                Expecting::ScanCodeSet => match byte {
                    0 => {
                        let set = self.scan_code_set;
                        self.reply(&[KBD_ACK, set]);
                    }
                    1..=3 => {
                        self.scan_code_set = byte;
                        self.reply(&[KBD_ACK]);
                    }
                    _ => self.reply(&[KBD_RESEND]),
                },
                Expecting::KeyList => {
                    self.expecting = Expecting::KeyList;
                    self.reply(&[KBD_ACK]);
                }
                Expecting::Command => {}
            }
            return;
        }
        self.command(byte);
    }

    fn command(&mut self, byte: u8) {
        match byte {
            0xED => {
                self.expecting = Expecting::LedState;
                self.reply(&[KBD_ACK]);
            }
            0xEE => self.reply(&[KBD_ECHO]),
            0xF0 => {
                self.expecting = Expecting::ScanCodeSet;
                self.reply(&[KBD_ACK]);
            }
            0xF2 => self.reply(&[KBD_ACK, KBD_ID_1, KBD_ID_2]),
            0xF3 => {
                self.expecting = Expecting::Typematic;
                self.reply(&[KBD_ACK]);
            }
            0xF4 => {
                self.scanning = true;
                self.reply(&[KBD_ACK]);
            }
            0xF5 => {
                self.load_defaults();
                self.scanning = false;
                self.reply(&[KBD_ACK]);
            }
            0xF6 => {
                self.load_defaults();
                self.scanning = true;
                self.reply(&[KBD_ACK]);
            }
            0xF7..=0xFA => self.reply(&[KBD_ACK]),
            0xFB..=0xFD => {
                self.expecting = Expecting::KeyList;
                self.reply(&[KBD_ACK]);
            }
            0xFE => {
                let last = self.last_sent;
                self.reply(&[last]);
            }
            0xFF => {
                self.load_defaults();
                self.scanning = true;
                self.reply(&[KBD_ACK, KBD_BAT_OK]);
            }
            _ => self.reply(&[KBD_RESEND]),
        }
    }

    /// A host key went down or up (`evdev_code` is a Linux `KEY_*` code). Queues the
    /// bytes of the selected scan code set; nothing happens while scanning is disabled,
    /// for unknown keys, or when the whole sequence does not fit in the queue.
    pub fn key_event(&mut self, evdev_code: u16, down: bool) {
        let modifier = modifier_bit(evdev_code);
        if down {
            self.modifiers |= modifier;
        } else {
            self.modifiers &= !modifier;
        }
        if !self.scanning {
            return;
        }
        let sequence = match self.scan_code_set {
            1 => self
                .set2_sequence(evdev_code, down)
                .map(|set2| translate_set2_to_set1(&set2)),
            3 => evdev_to_set3(evdev_code).map(
                |code| {
                    if down {
                        vec![code]
                    } else {
                        vec![0xF0, code]
                    }
                },
            ),
            _ => self.set2_sequence(evdev_code, down),
        };
        let Some(sequence) = sequence else {
            return;
        };
        if self.keys.len() + self.replies.len() + sequence.len() <= KBD_QUEUE_CAPACITY {
            self.keys.extend(sequence);
        } else {
            log::debug!("ps2 keyboard: queue full, key {evdev_code} dropped");
        }
    }

    /// The set-2 bytes of a key event (set 1 is derived from them by translation).
    fn set2_sequence(&self, code: u16, down: bool) -> Option<Vec<u8>> {
        let held = self.modifiers;
        let sequence = match code {
            evdev::KEY_PAUSE => {
                // Pause has no break code; with Ctrl it is Break.
                if !down {
                    return Some(Vec::new());
                }
                if held & MOD_CTRL != 0 {
                    vec![0xE0, 0x7E, 0xE0, 0xF0, 0x7E]
                } else {
                    vec![0xE1, 0x14, 0x77, 0xE1, 0xF0, 0x14, 0xF0, 0x77]
                }
            }
            evdev::KEY_SYSRQ | evdev::KEY_PRINT => {
                if held & MOD_ALT != 0 {
                    // Alt+PrintScreen is SysRq, a plain key.
                    if down {
                        vec![0x84]
                    } else {
                        vec![0xF0, 0x84]
                    }
                } else if held & (MOD_CTRL | MOD_SHIFT) != 0 {
                    if down {
                        vec![0xE0, 0x7C]
                    } else {
                        vec![0xE0, 0xF0, 0x7C]
                    }
                } else if down {
                    vec![0xE0, 0x12, 0xE0, 0x7C]
                } else {
                    vec![0xE0, 0xF0, 0x7C, 0xE0, 0xF0, 0x12]
                }
            }
            // Korean Hangul/Hanja keys send a make code only.
            evdev::KEY_HANGEUL | evdev::KEY_HANJA => {
                if !down {
                    return Some(Vec::new());
                }
                vec![if code == evdev::KEY_HANGEUL {
                    0xF2
                } else {
                    0xF1
                }]
            }
            _ => {
                let set2 = evdev_to_set2(code)?;
                let mut bytes = Vec::with_capacity(3);
                if set2 > 0xff {
                    bytes.push((set2 >> 8) as u8);
                }
                if !down {
                    bytes.push(0xF0);
                }
                bytes.push(set2 as u8);
                bytes
            }
        };
        Some(sequence)
    }
}

#[cfg(test)]
mod tests {
    use super::evdev::*;
    use super::*;

    fn drain(kbd: &mut Ps2Keyboard) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(byte) = kbd.read_byte() {
            out.push(byte);
            assert!(out.len() <= KBD_QUEUE_CAPACITY + KBD_REPLY_CAPACITY);
        }
        out
    }

    fn send(kbd: &mut Ps2Keyboard, bytes: &[u8]) -> Vec<u8> {
        for &byte in bytes {
            kbd.write(byte);
        }
        drain(kbd)
    }

    fn press_release(kbd: &mut Ps2Keyboard, code: u16) -> (Vec<u8>, Vec<u8>) {
        kbd.key_event(code, true);
        let make = drain(kbd);
        kbd.key_event(code, false);
        (make, drain(kbd))
    }

    #[test]
    fn translation_table_matches_known_keys() {
        // Esc, A, Enter, F7 (the one set-2 code above 0x7f), Alt+SysRq, Num Lock.
        for (set2, set1) in [
            (0x76, 0x01),
            (0x1c, 0x1e),
            (0x5a, 0x1c),
            (0x83, 0x41),
            (0x84, 0x54),
            (0x77, 0x45),
        ] {
            assert_eq!(SET2_TO_SET1[set2], set1, "set-2 {set2:#x}");
        }
        // Replies pass through unchanged.
        for reply in [
            KBD_ACK, KBD_RESEND, KBD_BAT_OK, KBD_ECHO, KBD_ID_1, 0xE0, 0xE1,
        ] {
            assert_eq!(SET2_TO_SET1[usize::from(reply)], reply);
        }
        // Every key of the set-2 table lands on a distinct set-1 code (no two keys collide).
        let mut seen = std::collections::HashMap::new();
        for code in 0..=300u16 {
            if let Some(set2) = evdev_to_set2(code) {
                let set1 = (set2 & 0xff00) | u16::from(SET2_TO_SET1[usize::from(set2 as u8)]);
                if let Some(other) = seen.insert(set1, code) {
                    // Aliases map to the same key on purpose.
                    let aliases = [(127, 139), (136, 217), (150, 172)];
                    assert!(
                        aliases.contains(&(other, code)),
                        "{other} and {code} collide"
                    );
                }
            }
        }
        assert_eq!(
            translate_set2_to_set1(&[0xE0, 0xF0, 0x75]),
            vec![0xE0, 0xC8]
        );
    }

    #[test]
    fn set2_make_and_break_codes() {
        let mut kbd = Ps2Keyboard::new();
        assert_eq!(
            press_release(&mut kbd, KEY_ESC),
            (vec![0x76], vec![0xF0, 0x76])
        );
        assert_eq!(
            press_release(&mut kbd, KEY_A),
            (vec![0x1c], vec![0xF0, 0x1c])
        );
        assert_eq!(
            press_release(&mut kbd, KEY_F1),
            (vec![0x05], vec![0xF0, 0x05])
        );
        assert_eq!(
            press_release(&mut kbd, KEY_UP),
            (vec![0xE0, 0x75], vec![0xE0, 0xF0, 0x75])
        );
        assert_eq!(
            press_release(&mut kbd, KEY_LEFT),
            (vec![0xE0, 0x6B], vec![0xE0, 0xF0, 0x6B])
        );
        assert_eq!(
            press_release(&mut kbd, KEY_RIGHT),
            (vec![0xE0, 0x74], vec![0xE0, 0xF0, 0x74])
        );
        assert_eq!(
            press_release(&mut kbd, KEY_DOWN),
            (vec![0xE0, 0x72], vec![0xE0, 0xF0, 0x72])
        );
        assert_eq!(
            press_release(&mut kbd, KEY_KPENTER),
            (vec![0xE0, 0x5A], vec![0xE0, 0xF0, 0x5A])
        );
        assert_eq!(
            press_release(&mut kbd, KEY_RIGHTCTRL),
            (vec![0xE0, 0x14], vec![0xE0, 0xF0, 0x14])
        );
        assert_eq!(
            press_release(&mut kbd, KEY_LEFTMETA),
            (vec![0xE0, 0x1F], vec![0xE0, 0xF0, 0x1F])
        );
        assert_eq!(
            press_release(&mut kbd, KEY_MUTE),
            (vec![0xE0, 0x23], vec![0xE0, 0xF0, 0x23])
        );
        assert_eq!(
            press_release(&mut kbd, 65),
            (vec![0x83], vec![0xF0, 0x83]),
            "F7"
        );
        assert_eq!(
            press_release(&mut kbd, 86),
            (vec![0x61], vec![0xF0, 0x61]),
            "102nd key"
        );
        // Unknown evdev codes produce nothing.
        assert_eq!(press_release(&mut kbd, 0), (vec![], vec![]));
        assert_eq!(press_release(&mut kbd, 0xffff), (vec![], vec![]));
    }

    #[test]
    fn pause_and_printscreen_sequences_depend_on_modifiers() {
        let mut kbd = Ps2Keyboard::new();
        assert_eq!(
            press_release(&mut kbd, KEY_PAUSE),
            (vec![0xE1, 0x14, 0x77, 0xE1, 0xF0, 0x14, 0xF0, 0x77], vec![])
        );
        assert_eq!(
            press_release(&mut kbd, KEY_SYSRQ),
            (
                vec![0xE0, 0x12, 0xE0, 0x7C],
                vec![0xE0, 0xF0, 0x7C, 0xE0, 0xF0, 0x12]
            )
        );
        kbd.key_event(KEY_LEFTCTRL, true);
        drain(&mut kbd);
        assert_eq!(
            press_release(&mut kbd, KEY_PAUSE),
            (vec![0xE0, 0x7E, 0xE0, 0xF0, 0x7E], vec![])
        );
        assert_eq!(
            press_release(&mut kbd, KEY_SYSRQ),
            (vec![0xE0, 0x7C], vec![0xE0, 0xF0, 0x7C])
        );
        kbd.key_event(KEY_LEFTCTRL, false);
        kbd.key_event(KEY_RIGHTALT, true);
        drain(&mut kbd);
        assert_eq!(
            press_release(&mut kbd, KEY_SYSRQ),
            (vec![0x84], vec![0xF0, 0x84])
        );
        kbd.key_event(KEY_RIGHTALT, false);
        drain(&mut kbd);
        // Set 1 versions.
        assert_eq!(send(&mut kbd, &[0xF0, 0x01]), vec![KBD_ACK, KBD_ACK]);
        assert_eq!(
            press_release(&mut kbd, KEY_PAUSE),
            (vec![0xE1, 0x1D, 0x45, 0xE1, 0x9D, 0xC5], vec![])
        );
        assert_eq!(
            press_release(&mut kbd, KEY_SYSRQ),
            (vec![0xE0, 0x2A, 0xE0, 0x37], vec![0xE0, 0xB7, 0xE0, 0xAA])
        );
        // Korean keys: make only.
        assert_eq!(press_release(&mut kbd, KEY_HANGEUL), (vec![0xF2], vec![]));
    }

    #[test]
    fn scan_code_sets_1_and_3() {
        let mut kbd = Ps2Keyboard::new();
        assert_eq!(send(&mut kbd, &[0xF0, 0x00]), vec![KBD_ACK, KBD_ACK, 2]);
        assert_eq!(send(&mut kbd, &[0xF0, 0x01]), vec![KBD_ACK, KBD_ACK]);
        assert_eq!(kbd.scan_code_set(), 1);
        assert_eq!(press_release(&mut kbd, KEY_ESC), (vec![0x01], vec![0x81]));
        assert_eq!(press_release(&mut kbd, KEY_ENTER), (vec![0x1C], vec![0x9C]));
        assert_eq!(
            press_release(&mut kbd, KEY_UP),
            (vec![0xE0, 0x48], vec![0xE0, 0xC8])
        );
        assert_eq!(
            press_release(&mut kbd, KEY_KPSLASH),
            (vec![0xE0, 0x35], vec![0xE0, 0xB5])
        );
        assert_eq!(press_release(&mut kbd, 87), (vec![0x57], vec![0xD7]), "F11");
        assert_eq!(send(&mut kbd, &[0xF0, 0x03]), vec![KBD_ACK, KBD_ACK]);
        assert_eq!(send(&mut kbd, &[0xF0, 0x00]), vec![KBD_ACK, KBD_ACK, 3]);
        assert_eq!(
            press_release(&mut kbd, KEY_ESC),
            (vec![0x08], vec![0xF0, 0x08])
        );
        assert_eq!(
            press_release(&mut kbd, KEY_UP),
            (vec![0x63], vec![0xF0, 0x63])
        );
        assert_eq!(
            press_release(&mut kbd, KEY_RIGHTCTRL),
            (vec![0x58], vec![0xF0, 0x58])
        );
        assert_eq!(
            press_release(&mut kbd, KEY_PAUSE),
            (vec![0x62], vec![0xF0, 0x62])
        );
        // Invalid set: resend, set unchanged.
        assert_eq!(send(&mut kbd, &[0xF0, 0x04]), vec![KBD_ACK, KBD_RESEND]);
        assert_eq!(kbd.scan_code_set(), 3);
        // Set-3 key mode commands are acknowledged; FB..FD take key lists.
        assert_eq!(
            send(&mut kbd, &[0xF8, 0xFC, 0x1C, 0x08, 0xF4]),
            vec![KBD_ACK; 5]
        );
    }

    #[test]
    fn atkbd_style_commands() {
        let mut kbd = Ps2Keyboard::new();
        assert_eq!(send(&mut kbd, &[0xF2]), vec![KBD_ACK, 0xAB, 0x83]);
        assert_eq!(send(&mut kbd, &[0xF5]), vec![KBD_ACK]);
        assert!(!kbd.scanning_enabled());
        kbd.key_event(KEY_A, true);
        assert!(!kbd.has_data(), "disabled keyboard drops keys");
        assert_eq!(send(&mut kbd, &[0xED, 0x07]), vec![KBD_ACK, KBD_ACK]);
        assert_eq!(kbd.leds(), 7);
        assert_eq!(send(&mut kbd, &[0xF3, 0x20]), vec![KBD_ACK, KBD_ACK]);
        assert_eq!(kbd.typematic(), 0x20);
        assert_eq!(send(&mut kbd, &[0xF4]), vec![KBD_ACK]);
        kbd.key_event(KEY_A, false);
        assert_eq!(drain(&mut kbd), vec![0xF0, 0x1C]);
        assert_eq!(send(&mut kbd, &[0xEE]), vec![KBD_ECHO]);
        assert_eq!(
            send(&mut kbd, &[0xFE]),
            vec![KBD_ECHO],
            "resend repeats the last byte"
        );
        assert_eq!(send(&mut kbd, &[0x12]), vec![KBD_RESEND]);
        assert_eq!(send(&mut kbd, &[0xFF]), vec![KBD_ACK, KBD_BAT_OK]);
        assert_eq!(kbd.leds(), 0);
        assert_eq!(kbd.typematic(), KBD_DEFAULT_TYPEMATIC);
        // A command aborts a pending argument.
        assert_eq!(
            send(&mut kbd, &[0xED, 0xF2]),
            vec![KBD_ACK, KBD_ACK, 0xAB, 0x83]
        );
        assert_eq!(
            send(&mut kbd, &[0x01]),
            vec![KBD_RESEND],
            "no argument pending any more"
        );
    }

    #[test]
    fn replies_go_before_queued_keys_and_queue_is_bounded() {
        let mut kbd = Ps2Keyboard::new();
        kbd.key_event(KEY_A, true);
        kbd.write(0xEE);
        assert_eq!(drain(&mut kbd), vec![KBD_ECHO, 0x1C]);
        for _ in 0..100 {
            kbd.key_event(KEY_UP, true);
        }
        assert!(kbd.pending_len() <= KBD_QUEUE_CAPACITY);
        let bytes = drain(&mut kbd);
        // Only whole sequences are queued.
        assert_eq!(bytes.len() % 2, 0);
        assert!(bytes.chunks(2).all(|pair| pair == [0xE0, 0x75]));
    }

    #[test]
    fn hostile_command_bytes_never_break_the_keyboard() {
        let mut kbd = Ps2Keyboard::new();
        let mut seed = 0x1234_5678u32;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            match seed % 3 {
                0 => kbd.write((seed >> 8) as u8),
                1 => kbd.key_event((seed >> 8) as u16 % 300, seed & 0x100 != 0),
                _ => {
                    kbd.read_byte();
                }
            }
            assert!(kbd.replies.len() <= KBD_REPLY_CAPACITY);
            assert!(kbd.keys.len() <= KBD_QUEUE_CAPACITY);
            assert!((1..=3).contains(&kbd.scan_code_set()));
            assert!(kbd.leds() <= 7);
        }
        // Still answers normally.
        drain(&mut kbd);
        assert_eq!(send(&mut kbd, &[0xFF]), vec![KBD_ACK, KBD_BAT_OK]);
        assert_eq!(send(&mut kbd, &[0xF2]), vec![KBD_ACK, 0xAB, 0x83]);
    }
}
