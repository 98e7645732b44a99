//! Key translation for VNC clients: X11 keysyms (RFB KeyEvent) and QEMU "qnum" XT scancodes
//! (QEMU Extended Key Event) to Linux evdev key codes.
//!
//! Keysyms are mapped to the key a US keyboard would press: shifted symbols map to their base
//! key ('A' and '!' give KEY_A and KEY_1, since the client already sent the Shift press).
//! Common Latin-1 keysyms of German and French layouts map to the key position where those
//! layouts have them (ü -> KEY_LEFTBRACE, é -> KEY_2, ...); where the two layouts disagree the
//! German position wins. Not covered: other national layouts, IME/Japanese keys by keysym,
//! and multimedia keysyms (XF86*); clients that send QEMU Extended Key Events are exact.

/// Linux evdev key codes used here (linux/input-event-codes.h).
pub mod evdev {
    pub const KEY_ESC: u16 = 1;
    pub const KEY_1: u16 = 2;
    pub const KEY_2: u16 = 3;
    pub const KEY_3: u16 = 4;
    pub const KEY_4: u16 = 5;
    pub const KEY_5: u16 = 6;
    pub const KEY_6: u16 = 7;
    pub const KEY_7: u16 = 8;
    pub const KEY_8: u16 = 9;
    pub const KEY_9: u16 = 10;
    pub const KEY_0: u16 = 11;
    pub const KEY_MINUS: u16 = 12;
    pub const KEY_EQUAL: u16 = 13;
    pub const KEY_BACKSPACE: u16 = 14;
    pub const KEY_TAB: u16 = 15;
    pub const KEY_Q: u16 = 16;
    pub const KEY_W: u16 = 17;
    pub const KEY_E: u16 = 18;
    pub const KEY_R: u16 = 19;
    pub const KEY_T: u16 = 20;
    pub const KEY_Y: u16 = 21;
    pub const KEY_U: u16 = 22;
    pub const KEY_I: u16 = 23;
    pub const KEY_O: u16 = 24;
    pub const KEY_P: u16 = 25;
    pub const KEY_LEFTBRACE: u16 = 26;
    pub const KEY_RIGHTBRACE: u16 = 27;
    pub const KEY_ENTER: u16 = 28;
    pub const KEY_LEFTCTRL: u16 = 29;
    pub const KEY_A: u16 = 30;
    pub const KEY_S: u16 = 31;
    pub const KEY_D: u16 = 32;
    pub const KEY_F: u16 = 33;
    pub const KEY_G: u16 = 34;
    pub const KEY_H: u16 = 35;
    pub const KEY_J: u16 = 36;
    pub const KEY_K: u16 = 37;
    pub const KEY_L: u16 = 38;
    pub const KEY_SEMICOLON: u16 = 39;
    pub const KEY_APOSTROPHE: u16 = 40;
    pub const KEY_GRAVE: u16 = 41;
    pub const KEY_LEFTSHIFT: u16 = 42;
    pub const KEY_BACKSLASH: u16 = 43;
    pub const KEY_Z: u16 = 44;
    pub const KEY_X: u16 = 45;
    pub const KEY_C: u16 = 46;
    pub const KEY_V: u16 = 47;
    pub const KEY_B: u16 = 48;
    pub const KEY_N: u16 = 49;
    pub const KEY_M: u16 = 50;
    pub const KEY_COMMA: u16 = 51;
    pub const KEY_DOT: u16 = 52;
    pub const KEY_SLASH: u16 = 53;
    pub const KEY_RIGHTSHIFT: u16 = 54;
    pub const KEY_KPASTERISK: u16 = 55;
    pub const KEY_LEFTALT: u16 = 56;
    pub const KEY_SPACE: u16 = 57;
    pub const KEY_CAPSLOCK: u16 = 58;
    pub const KEY_F1: u16 = 59;
    pub const KEY_F10: u16 = 68;
    pub const KEY_NUMLOCK: u16 = 69;
    pub const KEY_SCROLLLOCK: u16 = 70;
    pub const KEY_KP7: u16 = 71;
    pub const KEY_KP8: u16 = 72;
    pub const KEY_KP9: u16 = 73;
    pub const KEY_KPMINUS: u16 = 74;
    pub const KEY_KP4: u16 = 75;
    pub const KEY_KP5: u16 = 76;
    pub const KEY_KP6: u16 = 77;
    pub const KEY_KPPLUS: u16 = 78;
    pub const KEY_KP1: u16 = 79;
    pub const KEY_KP2: u16 = 80;
    pub const KEY_KP3: u16 = 81;
    pub const KEY_KP0: u16 = 82;
    pub const KEY_KPDOT: u16 = 83;
    pub const KEY_102ND: u16 = 86;
    pub const KEY_F11: u16 = 87;
    pub const KEY_F12: u16 = 88;
    pub const KEY_RO: u16 = 89;
    pub const KEY_KATAKANA: u16 = 90;
    pub const KEY_HIRAGANA: u16 = 91;
    pub const KEY_HENKAN: u16 = 92;
    pub const KEY_KATAKANAHIRAGANA: u16 = 93;
    pub const KEY_MUHENKAN: u16 = 94;
    pub const KEY_KPJPCOMMA: u16 = 95;
    pub const KEY_KPENTER: u16 = 96;
    pub const KEY_RIGHTCTRL: u16 = 97;
    pub const KEY_KPSLASH: u16 = 98;
    pub const KEY_SYSRQ: u16 = 99;
    pub const KEY_RIGHTALT: u16 = 100;
    pub const KEY_HOME: u16 = 102;
    pub const KEY_UP: u16 = 103;
    pub const KEY_PAGEUP: u16 = 104;
    pub const KEY_LEFT: u16 = 105;
    pub const KEY_RIGHT: u16 = 106;
    pub const KEY_END: u16 = 107;
    pub const KEY_DOWN: u16 = 108;
    pub const KEY_PAGEDOWN: u16 = 109;
    pub const KEY_INSERT: u16 = 110;
    pub const KEY_DELETE: u16 = 111;
    pub const KEY_MUTE: u16 = 113;
    pub const KEY_VOLUMEDOWN: u16 = 114;
    pub const KEY_VOLUMEUP: u16 = 115;
    pub const KEY_POWER: u16 = 116;
    pub const KEY_KPEQUAL: u16 = 117;
    pub const KEY_PAUSE: u16 = 119;
    pub const KEY_KPCOMMA: u16 = 121;
    pub const KEY_HANGEUL: u16 = 122;
    pub const KEY_HANJA: u16 = 123;
    pub const KEY_YEN: u16 = 124;
    pub const KEY_LEFTMETA: u16 = 125;
    pub const KEY_RIGHTMETA: u16 = 126;
    pub const KEY_COMPOSE: u16 = 127;
    pub const KEY_STOP: u16 = 128;
    pub const KEY_AGAIN: u16 = 129;
    pub const KEY_UNDO: u16 = 131;
    pub const KEY_FIND: u16 = 136;
    pub const KEY_HELP: u16 = 138;
    pub const KEY_CALC: u16 = 140;
    pub const KEY_SLEEP: u16 = 142;
    pub const KEY_WAKEUP: u16 = 143;
    pub const KEY_MAIL: u16 = 155;
    pub const KEY_BACK: u16 = 158;
    pub const KEY_FORWARD: u16 = 159;
    pub const KEY_NEXTSONG: u16 = 163;
    pub const KEY_PLAYPAUSE: u16 = 164;
    pub const KEY_PREVIOUSSONG: u16 = 165;
    pub const KEY_STOPCD: u16 = 166;
    pub const KEY_HOMEPAGE: u16 = 172;
    pub const KEY_REFRESH: u16 = 173;
    pub const KEY_F13: u16 = 183;
    pub const KEY_SEARCH: u16 = 217;
    pub const KEY_MEDIA: u16 = 226;
}

use evdev::*;

const LETTERS: [u16; 26] = [
    KEY_A, KEY_B, KEY_C, KEY_D, KEY_E, KEY_F, KEY_G, KEY_H, KEY_I, KEY_J, KEY_K, KEY_L, KEY_M,
    KEY_N, KEY_O, KEY_P, KEY_Q, KEY_R, KEY_S, KEY_T, KEY_U, KEY_V, KEY_W, KEY_X, KEY_Y, KEY_Z,
];

const DIGITS: [u16; 10] = [
    KEY_0, KEY_1, KEY_2, KEY_3, KEY_4, KEY_5, KEY_6, KEY_7, KEY_8, KEY_9,
];

const KEYPAD_DIGITS: [u16; 10] = [
    KEY_KP0, KEY_KP1, KEY_KP2, KEY_KP3, KEY_KP4, KEY_KP5, KEY_KP6, KEY_KP7, KEY_KP8, KEY_KP9,
];

fn ascii_to_evdev(c: u8) -> Option<u16> {
    Some(match c {
        b'a'..=b'z' => LETTERS[usize::from(c - b'a')],
        b'A'..=b'Z' => LETTERS[usize::from(c - b'A')],
        b'0'..=b'9' => DIGITS[usize::from(c - b'0')],
        b' ' => KEY_SPACE,
        b'!' => KEY_1,
        b'@' => KEY_2,
        b'#' => KEY_3,
        b'$' => KEY_4,
        b'%' => KEY_5,
        b'^' => KEY_6,
        b'&' => KEY_7,
        b'*' => KEY_8,
        b'(' => KEY_9,
        b')' => KEY_0,
        b'-' | b'_' => KEY_MINUS,
        b'=' | b'+' => KEY_EQUAL,
        b'[' | b'{' => KEY_LEFTBRACE,
        b']' | b'}' => KEY_RIGHTBRACE,
        b'\\' | b'|' => KEY_BACKSLASH,
        b';' | b':' => KEY_SEMICOLON,
        b'\'' | b'"' => KEY_APOSTROPHE,
        b'`' | b'~' => KEY_GRAVE,
        b',' | b'<' => KEY_COMMA,
        b'.' | b'>' => KEY_DOT,
        b'/' | b'?' => KEY_SLASH,
        _ => return None,
    })
}

fn latin1_to_evdev(c: u32) -> Option<u16> {
    Some(match c {
        // German layout.
        0xfc | 0xdc => KEY_LEFTBRACE,  // ü Ü
        0xf6 | 0xd6 => KEY_SEMICOLON,  // ö Ö
        0xe4 | 0xc4 => KEY_APOSTROPHE, // ä Ä
        0xdf => KEY_MINUS,             // ß
        0xb4 => KEY_EQUAL,             // ´ (acute accent)
        0xb0 => KEY_GRAVE,             // ° (Shift+^)
        0xa7 => KEY_3,                 // § (Shift+3)
        0xb2 => KEY_2,                 // ² (AltGr+2)
        0xb3 => KEY_3,                 // ³ (AltGr+3)
        0xb5 => KEY_M,                 // µ (AltGr+M)
        // French layout.
        0xe9 | 0xc9 => KEY_2,          // é É
        0xe8 | 0xc8 => KEY_7,          // è È
        0xe7 | 0xc7 => KEY_9,          // ç Ç
        0xe0 | 0xc0 => KEY_0,          // à À
        0xf9 | 0xd9 => KEY_APOSTROPHE, // ù Ù
        0xa3 | 0xa4 => KEY_RIGHTBRACE, // £ ¤ (Shift+$, AltGr+$)
        0xa8 => KEY_LEFTBRACE,         // ¨ (Shift+^)
        // Shared by several layouts.
        0xa0 => KEY_SPACE,            // no-break space
        0xd7 => KEY_8,                // ×
        0xf7 => KEY_SLASH,            // ÷
        0xab => KEY_8,                // « (AltGr+8 on some layouts)
        0xbb => KEY_9,                // »
        0xac => KEY_6,                // ¬
        0xa6 => KEY_102ND,            // ¦
        0xf1 | 0xd1 => KEY_SEMICOLON, // ñ Ñ (Spanish)
        _ => return None,
    })
}

/// Translates an X11 keysym (as sent in an RFB KeyEvent) to a Linux evdev key code.
pub fn keysym_to_evdev(keysym: u32) -> Option<u16> {
    if keysym < 0x80 {
        return ascii_to_evdev(keysym as u8);
    }
    if keysym < 0x100 {
        return latin1_to_evdev(keysym);
    }
    Some(match keysym {
        0xff08 => KEY_BACKSPACE,
        0xff09 | 0xfe20 => KEY_TAB, // Tab, ISO_Left_Tab
        0xff0a | 0xff0d => KEY_ENTER,
        0xff13 | 0xff6b => KEY_PAUSE, // Pause, Break
        0xff14 => KEY_SCROLLLOCK,
        0xff15 | 0xff61 => KEY_SYSRQ, // Sys_Req, Print
        0xff1b => KEY_ESC,
        0xffff => KEY_DELETE,
        0xff50 => KEY_HOME,
        0xff51 => KEY_LEFT,
        0xff52 => KEY_UP,
        0xff53 => KEY_RIGHT,
        0xff54 => KEY_DOWN,
        0xff55 => KEY_PAGEUP,
        0xff56 => KEY_PAGEDOWN,
        0xff57 => KEY_END,
        0xff63 => KEY_INSERT,
        0xff65 => KEY_UNDO,
        0xff66 => KEY_AGAIN,
        0xff67 => KEY_COMPOSE, // Menu
        0xff68 => KEY_FIND,
        0xff69 => KEY_STOP,
        0xff6a => KEY_HELP,
        0xff7f => KEY_NUMLOCK,
        // Keypad.
        0xff80 => KEY_SPACE,
        0xff89 => KEY_TAB,
        0xff8d => KEY_KPENTER,
        0xff95 => KEY_KP7,   // KP_Home
        0xff96 => KEY_KP4,   // KP_Left
        0xff97 => KEY_KP8,   // KP_Up
        0xff98 => KEY_KP6,   // KP_Right
        0xff99 => KEY_KP2,   // KP_Down
        0xff9a => KEY_KP9,   // KP_Prior
        0xff9b => KEY_KP3,   // KP_Next
        0xff9c => KEY_KP1,   // KP_End
        0xff9d => KEY_KP5,   // KP_Begin
        0xff9e => KEY_KP0,   // KP_Insert
        0xff9f => KEY_KPDOT, // KP_Delete
        0xffaa => KEY_KPASTERISK,
        0xffab => KEY_KPPLUS,
        0xffac => KEY_KPCOMMA, // KP_Separator
        0xffad => KEY_KPMINUS,
        0xffae => KEY_KPDOT,
        0xffaf => KEY_KPSLASH,
        0xffb0..=0xffb9 => KEYPAD_DIGITS[(keysym - 0xffb0) as usize],
        0xffbd => KEY_KPEQUAL,
        // Function keys F1..F24.
        0xffbe..=0xffc7 => KEY_F1 + (keysym - 0xffbe) as u16,
        0xffc8 => KEY_F11,
        0xffc9 => KEY_F12,
        0xffca..=0xffd5 => KEY_F13 + (keysym - 0xffca) as u16,
        // Modifiers.
        0xffe1 => KEY_LEFTSHIFT,
        0xffe2 => KEY_RIGHTSHIFT,
        0xffe3 => KEY_LEFTCTRL,
        0xffe4 => KEY_RIGHTCTRL,
        0xffe5 | 0xffe6 => KEY_CAPSLOCK,
        0xffe7 | 0xffe9 => KEY_LEFTALT, // Meta_L, Alt_L
        0xffe8 | 0xffea => KEY_RIGHTALT,
        0xfe03 | 0xff7e => KEY_RIGHTALT, // ISO_Level3_Shift (AltGr), Mode_switch
        0xffeb | 0xffed => KEY_LEFTMETA, // Super_L, Hyper_L
        0xffec | 0xffee => KEY_RIGHTMETA,
        // Dead keys at their German (^ ´ `) / French (¨) positions.
        0xfe50 | 0xfe51 => KEY_EQUAL, // dead_grave, dead_acute
        0xfe52 => KEY_GRAVE,          // dead_circumflex
        0xfe53 => KEY_RIGHTBRACE,     // dead_tilde
        0xfe57 => KEY_LEFTBRACE,      // dead_diaeresis
        0x20ac => KEY_E,              // EuroSign (AltGr+E)
        // Japanese / Korean keys.
        0xff21 => KEY_KATAKANAHIRAGANA, // Kanji
        0xff22 => KEY_MUHENKAN,
        0xff23 => KEY_HENKAN,
        0xff27 => KEY_KATAKANAHIRAGANA, // Hiragana_Katakana
        0xff31 => KEY_HANGEUL,
        0xff34 => KEY_HANJA,
        _ => return None,
    })
}

/// Translates a QEMU "qnum" key number (XT set 1 scancode; 0xe0-prefixed codes have bit 7 set,
/// i.e. 0xe0 0x48 is 0xc8) to a Linux evdev key code.
pub fn qnum_to_evdev(qnum: u32) -> Option<u16> {
    Some(match qnum {
        // Set 1 scancodes 0x01..=0x58 equal the evdev codes, except 0x54 (Alt+SysRq).
        0x54 => KEY_SYSRQ,
        0x01..=0x58 => qnum as u16,
        0x59 => KEY_KPEQUAL,
        0x5c => KEY_KPJPCOMMA,
        0x64..=0x6e => KEY_F13 + (qnum - 0x64) as u16, // F13..F23
        0x70 => KEY_KATAKANAHIRAGANA,
        0x71 => KEY_HANJA,
        0x72 => KEY_HANGEUL,
        0x73 => KEY_RO,
        0x76 => KEY_F13 + 11, // F24
        0x77 => KEY_HIRAGANA,
        0x78 => KEY_KATAKANA,
        0x79 => KEY_HENKAN,
        0x7b => KEY_MUHENKAN,
        0x7d => KEY_YEN,
        0x7e => KEY_KPCOMMA,
        // 0xe0-prefixed keys.
        0x90 => KEY_PREVIOUSSONG,
        0x99 => KEY_NEXTSONG,
        0x9c => KEY_KPENTER,
        0x9d => KEY_RIGHTCTRL,
        0xa0 => KEY_MUTE,
        0xa1 => KEY_CALC,
        0xa2 => KEY_PLAYPAUSE,
        0xa4 => KEY_STOPCD,
        0xae => KEY_VOLUMEDOWN,
        0xb0 => KEY_VOLUMEUP,
        0xb2 => KEY_HOMEPAGE,
        0xb5 => KEY_KPSLASH,
        0xb7 => KEY_SYSRQ,
        0xb8 => KEY_RIGHTALT,
        0xc6 => KEY_PAUSE, // Ctrl+Break, QEMU uses it for Pause
        0xc7 => KEY_HOME,
        0xc8 => KEY_UP,
        0xc9 => KEY_PAGEUP,
        0xcb => KEY_LEFT,
        0xcd => KEY_RIGHT,
        0xcf => KEY_END,
        0xd0 => KEY_DOWN,
        0xd1 => KEY_PAGEDOWN,
        0xd2 => KEY_INSERT,
        0xd3 => KEY_DELETE,
        0xdb => KEY_LEFTMETA,
        0xdc => KEY_RIGHTMETA,
        0xdd => KEY_COMPOSE,
        0xde => KEY_POWER,
        0xdf => KEY_SLEEP,
        0xe3 => KEY_WAKEUP,
        0xe5 => KEY_SEARCH,
        0xe7 => KEY_REFRESH,
        0xe8 => KEY_STOP,
        0xe9 => KEY_FORWARD,
        0xea => KEY_BACK,
        0xec => KEY_MAIL,
        0xed => KEY_MEDIA,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letters_ignore_case() {
        assert_eq!(keysym_to_evdev(u32::from(b'a')), Some(KEY_A));
        assert_eq!(keysym_to_evdev(u32::from(b'A')), Some(KEY_A));
        assert_eq!(keysym_to_evdev(u32::from(b'z')), Some(KEY_Z));
        assert_eq!(keysym_to_evdev(u32::from(b'Q')), Some(KEY_Q));
        assert_eq!(keysym_to_evdev(u32::from(b'm')), Some(KEY_M));
    }

    #[test]
    fn every_printable_ascii_is_mapped() {
        for c in 0x20u32..0x7f {
            assert!(keysym_to_evdev(c).is_some(), "ascii {c:#x} unmapped");
        }
        assert_eq!(keysym_to_evdev(0x7f), None);
        assert_eq!(keysym_to_evdev(0x01), None);
    }

    #[test]
    fn shifted_symbols_use_base_key() {
        let pairs = [
            (b'!', b'1'),
            (b'@', b'2'),
            (b'#', b'3'),
            (b'$', b'4'),
            (b'%', b'5'),
            (b'^', b'6'),
            (b'&', b'7'),
            (b'*', b'8'),
            (b'(', b'9'),
            (b')', b'0'),
            (b'_', b'-'),
            (b'+', b'='),
            (b'{', b'['),
            (b'}', b']'),
            (b'|', b'\\'),
            (b':', b';'),
            (b'"', b'\''),
            (b'~', b'`'),
            (b'<', b','),
            (b'>', b'.'),
            (b'?', b'/'),
        ];
        for (shifted, base) in pairs {
            assert_eq!(
                keysym_to_evdev(u32::from(shifted)),
                keysym_to_evdev(u32::from(base)),
                "{}",
                shifted as char
            );
        }
        assert_eq!(keysym_to_evdev(u32::from(b'1')), Some(KEY_1));
        assert_eq!(keysym_to_evdev(u32::from(b'0')), Some(KEY_0));
        assert_eq!(keysym_to_evdev(u32::from(b'/')), Some(KEY_SLASH));
    }

    #[test]
    fn function_navigation_and_modifier_keys() {
        assert_eq!(keysym_to_evdev(0xffbe), Some(KEY_F1));
        assert_eq!(keysym_to_evdev(0xffc7), Some(KEY_F10));
        assert_eq!(keysym_to_evdev(0xffc8), Some(KEY_F11));
        assert_eq!(keysym_to_evdev(0xffc9), Some(KEY_F12));
        assert_eq!(keysym_to_evdev(0xffca), Some(KEY_F13));
        assert_eq!(keysym_to_evdev(0xffd5), Some(194)); // F24
        assert_eq!(keysym_to_evdev(0xff0d), Some(KEY_ENTER));
        assert_eq!(keysym_to_evdev(0xff1b), Some(KEY_ESC));
        assert_eq!(keysym_to_evdev(0xff08), Some(KEY_BACKSPACE));
        assert_eq!(keysym_to_evdev(0xffff), Some(KEY_DELETE));
        assert_eq!(keysym_to_evdev(0xff52), Some(KEY_UP));
        assert_eq!(keysym_to_evdev(0xff56), Some(KEY_PAGEDOWN));
        assert_eq!(keysym_to_evdev(0xffe1), Some(KEY_LEFTSHIFT));
        assert_eq!(keysym_to_evdev(0xffe4), Some(KEY_RIGHTCTRL));
        assert_eq!(keysym_to_evdev(0xffe9), Some(KEY_LEFTALT));
        assert_eq!(keysym_to_evdev(0xfe03), Some(KEY_RIGHTALT));
        assert_eq!(keysym_to_evdev(0xffeb), Some(KEY_LEFTMETA));
        assert_eq!(keysym_to_evdev(0xff61), Some(KEY_SYSRQ));
    }

    #[test]
    fn keypad() {
        assert_eq!(keysym_to_evdev(0xffb0), Some(KEY_KP0));
        assert_eq!(keysym_to_evdev(0xffb9), Some(KEY_KP9));
        assert_eq!(keysym_to_evdev(0xff95), Some(KEY_KP7));
        assert_eq!(keysym_to_evdev(0xff8d), Some(KEY_KPENTER));
        assert_eq!(keysym_to_evdev(0xffaf), Some(KEY_KPSLASH));
        assert_eq!(keysym_to_evdev(0xffaa), Some(KEY_KPASTERISK));
        assert_eq!(keysym_to_evdev(0xffae), Some(KEY_KPDOT));
    }

    #[test]
    fn german_and_french_letters() {
        assert_eq!(keysym_to_evdev(0xfc), Some(KEY_LEFTBRACE)); // ü
        assert_eq!(keysym_to_evdev(0xd6), Some(KEY_SEMICOLON)); // Ö
        assert_eq!(keysym_to_evdev(0xe4), Some(KEY_APOSTROPHE)); // ä
        assert_eq!(keysym_to_evdev(0xdf), Some(KEY_MINUS)); // ß
        assert_eq!(keysym_to_evdev(0xe9), Some(KEY_2)); // é
        assert_eq!(keysym_to_evdev(0xe8), Some(KEY_7)); // è
        assert_eq!(keysym_to_evdev(0xe7), Some(KEY_9)); // ç
        assert_eq!(keysym_to_evdev(0xe0), Some(KEY_0)); // à
        assert_eq!(keysym_to_evdev(0x20ac), Some(KEY_E)); // €
        assert_eq!(keysym_to_evdev(0x12345678), None);
    }

    #[test]
    fn qnum_scancodes() {
        assert_eq!(qnum_to_evdev(0x1e), Some(KEY_A));
        assert_eq!(qnum_to_evdev(0x01), Some(KEY_ESC));
        assert_eq!(qnum_to_evdev(0x58), Some(KEY_F12));
        assert_eq!(qnum_to_evdev(0x56), Some(KEY_102ND));
        assert_eq!(qnum_to_evdev(0xc8), Some(KEY_UP));
        assert_eq!(qnum_to_evdev(0x9d), Some(KEY_RIGHTCTRL));
        assert_eq!(qnum_to_evdev(0xb8), Some(KEY_RIGHTALT));
        assert_eq!(qnum_to_evdev(0x9c), Some(KEY_KPENTER));
        assert_eq!(qnum_to_evdev(0xdb), Some(KEY_LEFTMETA));
        assert_eq!(qnum_to_evdev(0x73), Some(KEY_RO));
        assert_eq!(qnum_to_evdev(0), None);
        assert_eq!(qnum_to_evdev(0xffff_ffff), None);
    }
}
