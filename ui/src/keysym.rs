//! Linux evdev key codes to X11 keysyms, for sending keys to a VNC server (RFB KeyEvent).
//!
//! The map is the US layout without modifiers: a key gives its unshifted keysym (KEY_A →
//! `a`, KEY_1 → `1`) and Shift is sent as its own key, which is what servers that turn
//! keysyms back into scancodes (QEMU, DeskVM's own) expect. Keys with no keysym here (most
//! multimedia and vendor keys) give `None`.

/// The X11 keysym of an evdev key code on a US keyboard, or None when the key has none here.
pub fn evdev_to_keysym(code: u16) -> Option<u32> {
    const LETTER_ROWS: [(u16, &str); 3] = [(16, "qwertyuiop"), (30, "asdfghjkl"), (44, "zxcvbnm")];
    for (first, letters) in LETTER_ROWS {
        let letter = code
            .checked_sub(first)
            .and_then(|index| letters.as_bytes().get(usize::from(index)));
        if let Some(letter) = letter {
            return Some(u32::from(*letter));
        }
    }
    Some(match code {
        1 => 0xff1b,                              // Escape
        2..=10 => 0x31 + u32::from(code - 2),     // 1..9
        11 => 0x30,                               // 0
        12 => 0x2d,                               // minus
        13 => 0x3d,                               // equal
        14 => 0xff08,                             // BackSpace
        15 => 0xff09,                             // Tab
        26 => 0x5b,                               // bracketleft
        27 => 0x5d,                               // bracketright
        28 => 0xff0d,                             // Return
        29 => 0xffe3,                             // Control_L
        39 => 0x3b,                               // semicolon
        40 => 0x27,                               // apostrophe
        41 => 0x60,                               // grave
        42 => 0xffe1,                             // Shift_L
        43 => 0x5c,                               // backslash
        51 => 0x2c,                               // comma
        52 => 0x2e,                               // period
        53 => 0x2f,                               // slash
        54 => 0xffe2,                             // Shift_R
        55 => 0xffaa,                             // KP_Multiply
        56 => 0xffe9,                             // Alt_L
        57 => 0x20,                               // space
        58 => 0xffe5,                             // Caps_Lock
        59..=68 => 0xffbe + u32::from(code - 59), // F1..F10
        69 => 0xff7f,                             // Num_Lock
        70 => 0xff14,                             // Scroll_Lock
        71 => 0xffb7,                             // KP_7
        72 => 0xffb8,                             // KP_8
        73 => 0xffb9,                             // KP_9
        74 => 0xffad,                             // KP_Subtract
        75 => 0xffb4,                             // KP_4
        76 => 0xffb5,                             // KP_5
        77 => 0xffb6,                             // KP_6
        78 => 0xffab,                             // KP_Add
        79 => 0xffb1,                             // KP_1
        80 => 0xffb2,                             // KP_2
        81 => 0xffb3,                             // KP_3
        82 => 0xffb0,                             // KP_0
        83 => 0xffae,                             // KP_Decimal
        86 => 0x3c,                               // less (the 102nd key)
        87 => 0xffc8,                             // F11
        88 => 0xffc9,                             // F12
        96 => 0xff8d,                             // KP_Enter
        97 => 0xffe4,                             // Control_R
        98 => 0xffaf,                             // KP_Divide
        99 => 0xff61,                             // Print
        100 => 0xffea,                            // Alt_R
        102 => 0xff50,                            // Home
        103 => 0xff52,                            // Up
        104 => 0xff55,                            // Prior
        105 => 0xff51,                            // Left
        106 => 0xff53,                            // Right
        107 => 0xff57,                            // End
        108 => 0xff54,                            // Down
        109 => 0xff56,                            // Next
        110 => 0xff63,                            // Insert
        111 => 0xffff,                            // Delete
        113 => 0x1008_ff12,                       // XF86AudioMute
        114 => 0x1008_ff11,                       // XF86AudioLowerVolume
        115 => 0x1008_ff13,                       // XF86AudioRaiseVolume
        117 => 0xffbd,                            // KP_Equal
        119 => 0xff13,                            // Pause
        125 => 0xffeb,                            // Super_L
        126 => 0xffec,                            // Super_R
        127 => 0xff67,                            // Menu
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letters_digits_and_punctuation_are_unshifted_us_keysyms() {
        assert_eq!(evdev_to_keysym(30), Some(u32::from(b'a')));
        assert_eq!(evdev_to_keysym(16), Some(u32::from(b'q')));
        assert_eq!(evdev_to_keysym(50), Some(u32::from(b'm')));
        assert_eq!(evdev_to_keysym(38), Some(u32::from(b'l')));
        assert_eq!(evdev_to_keysym(2), Some(u32::from(b'1')));
        assert_eq!(evdev_to_keysym(10), Some(u32::from(b'9')));
        assert_eq!(evdev_to_keysym(11), Some(u32::from(b'0')));
        assert_eq!(evdev_to_keysym(53), Some(u32::from(b'/')));
        assert_eq!(evdev_to_keysym(57), Some(u32::from(b' ')));
    }

    #[test]
    fn special_keys_map_to_their_keysyms() {
        assert_eq!(evdev_to_keysym(28), Some(0xff0d));
        assert_eq!(evdev_to_keysym(59), Some(0xffbe)); // F1
        assert_eq!(evdev_to_keysym(68), Some(0xffc7)); // F10
        assert_eq!(evdev_to_keysym(88), Some(0xffc9)); // F12
        assert_eq!(evdev_to_keysym(111), Some(0xffff));
        assert_eq!(evdev_to_keysym(29), Some(0xffe3));
    }

    #[test]
    fn unknown_codes_give_none_without_panicking() {
        for code in [0u16, 84, 85, 128, 240, 0x2ff, u16::MAX] {
            assert_eq!(evdev_to_keysym(code), None, "code {code}");
        }
        // Every code is safe to ask about.
        for code in 0..=u16::MAX {
            let _ = evdev_to_keysym(code);
        }
    }

    #[test]
    fn no_two_keys_share_a_keysym() {
        let mut seen = std::collections::HashMap::new();
        for code in 0..1024u16 {
            if let Some(sym) = evdev_to_keysym(code) {
                assert_eq!(seen.insert(sym, code), None, "keysym {sym:#x}");
            }
        }
        assert!(seen.len() > 90, "{}", seen.len());
    }
}
