//! Linux evdev key codes to X11 keysyms, for sending keys to a VNC server (RFB KeyEvent), on
//! a US keyboard layout.
//!
//! [`evdev_to_keysym`] gives a key's unshifted keysym (KEY_A → `a`, KEY_1 → `1`) and
//! [`shifted_keysym`] the one with Shift (KEY_A → `A`, KEY_1 → `exclam`). [`KeyboardState`]
//! follows Shift, AltGr (right Alt, ISO_Level3) and Caps Lock as the keys go by and picks the
//! keysym an X server with a US layout would produce, the way VNC viewers send keys; it
//! releases a key with the keysym it was pressed with. Modifier keys are sent as their own
//! keysyms (Shift_L, Control_L...). [`text_to_keysym_events`] types text (the clipboard)
//! with Shift pressed around upper-case letters and symbols, whatever the Caps Lock state.
//!
//! Not covered: other layouts (the US layout has no third level, so AltGr changes no
//! keysym), Num Lock (keypad keys always give digits), dead keys and compose, and characters
//! outside printable ASCII (skipped and counted). Keys with no keysym here (most multimedia
//! and vendor keys) give `None`.

use std::collections::BTreeMap;

use crate::keymap::us_key_for_char;

/// Keysyms of the modifier keys and a few others, by their X11 names.
pub mod sym {
    pub const SHIFT_L: u32 = 0xffe1;
    pub const SHIFT_R: u32 = 0xffe2;
    pub const CAPS_LOCK: u32 = 0xffe5;
    pub const RETURN: u32 = 0xff0d;
    pub const TAB: u32 = 0xff09;
}

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

/// The keysym of an evdev key with Shift held on a US keyboard (KEY_1 → `exclam`, KEY_A →
/// `A`); keys that Shift does not change give their unshifted keysym, except Tab, which
/// gives ISO_Left_Tab as on X.
pub fn shifted_keysym(code: u16) -> Option<u32> {
    const KEY_TAB: u16 = 15;
    const KEY_102ND: u16 = 86;
    let unshifted = evdev_to_keysym(code)?;
    if code == KEY_TAB {
        return Some(0xfe20);
    }
    if code == KEY_102ND {
        return Some(u32::from(b'>'));
    }
    let shifted_char = (' '..='~')
        .find(|c| us_key_for_char(*c).is_some_and(|stroke| stroke.code == code && stroke.shift));
    Some(shifted_char.map_or(unshifted, u32::from))
}

/// A keysym press (true) or release to send in an RFB KeyEvent.
pub type KeysymEvent = (u32, bool);

/// The modifier state of the keyboard as the VNC server should see it, and the keysym each
/// held key was pressed with (so its release matches even when Shift changed meanwhile).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyboardState {
    shift_left: bool,
    shift_right: bool,
    level3: bool,
    caps_lock: bool,
    pressed: BTreeMap<u16, u32>,
}

impl KeyboardState {
    const KEY_LEFTSHIFT: u16 = 42;
    const KEY_RIGHTSHIFT: u16 = 54;
    const KEY_CAPSLOCK: u16 = 58;
    const KEY_RIGHTALT: u16 = 100;

    pub fn new() -> Self {
        Self::default()
    }

    /// Whether either Shift key is held.
    pub fn shift(&self) -> bool {
        self.shift_left || self.shift_right
    }

    /// Whether AltGr (right Alt, ISO_Level3) is held.
    pub fn level3(&self) -> bool {
        self.level3
    }

    /// Whether Caps Lock is on (it starts off; each press toggles it).
    pub fn caps_lock(&self) -> bool {
        self.caps_lock
    }

    /// The keysym a press of `code` gives now: letters are upper case with Shift or Caps
    /// Lock (not both), other keys take their shifted keysym with Shift.
    pub fn keysym_for(&self, code: u16) -> Option<u32> {
        let unshifted = evdev_to_keysym(code)?;
        let is_letter = (u32::from(b'a')..=u32::from(b'z')).contains(&unshifted);
        let shifted = if is_letter {
            self.shift() != self.caps_lock
        } else {
            self.shift()
        };
        if shifted {
            shifted_keysym(code)
        } else {
            Some(unshifted)
        }
    }

    /// Feeds a key press or release (evdev code) and returns the keysym events to send:
    /// normally one; none for keys without a keysym and for releases of keys not pressed
    /// here. A repeated press whose keysym changed (Shift pressed while the key is held)
    /// first releases the old keysym.
    pub fn key(&mut self, code: u16, down: bool) -> Vec<KeysymEvent> {
        let repeat = down && self.pressed.contains_key(&code);
        match code {
            Self::KEY_LEFTSHIFT => self.shift_left = down,
            Self::KEY_RIGHTSHIFT => self.shift_right = down,
            Self::KEY_RIGHTALT => self.level3 = down,
            Self::KEY_CAPSLOCK if down && !repeat => self.caps_lock = !self.caps_lock,
            _ => {}
        }
        if down {
            let Some(keysym) = self.keysym_for(code) else {
                return Vec::new();
            };
            let mut events = Vec::with_capacity(2);
            if let Some(old) = self.pressed.insert(code, keysym) {
                if old != keysym {
                    events.push((old, false));
                }
            }
            events.push((keysym, true));
            events
        } else {
            // A key whose press went elsewhere (F11 to the window) sends no release.
            self.pressed
                .remove(&code)
                .map(|keysym| vec![(keysym, false)])
                .unwrap_or_default()
        }
    }

    /// Releases every held key (the session ends or the view lost focus); Caps Lock stays.
    pub fn release_all(&mut self) -> Vec<KeysymEvent> {
        self.shift_left = false;
        self.shift_right = false;
        self.level3 = false;
        std::mem::take(&mut self.pressed)
            .into_values()
            .map(|keysym| (keysym, false))
            .collect()
    }
}

/// The keysym events that type `text` on a US layout (for "type the clipboard"): each
/// character's own keysym, with Shift_L pressed around it when the US layout needs Shift
/// (so a server that turns keysyms into key positions types the same), and the number of
/// characters with no key there (skipped). "\r\n" types one Return.
pub fn text_to_keysym_events(text: &str) -> (Vec<KeysymEvent>, usize) {
    let mut events = Vec::with_capacity(text.len() * 2);
    let mut skipped = 0;
    let normalized = text.replace("\r\n", "\n");
    for c in normalized.chars() {
        let c = if c == '\r' { '\n' } else { c };
        let Some(stroke) = us_key_for_char(c) else {
            skipped += 1;
            continue;
        };
        let keysym = match c {
            '\n' => sym::RETURN,
            '\t' => sym::TAB,
            printable => u32::from(printable),
        };
        if stroke.shift {
            events.push((sym::SHIFT_L, true));
        }
        events.push((keysym, true));
        events.push((keysym, false));
        if stroke.shift {
            events.push((sym::SHIFT_L, false));
        }
    }
    (events, skipped)
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

    /// Plays keysym events into a model of a server that turns keysyms back into US key
    /// positions (as QEMU and DeskVM's own server do) and returns the characters typed.
    fn typed_by_key_position(events: &[KeysymEvent]) -> String {
        let mut shift = false;
        let mut out = String::new();
        for &(keysym, down) in events {
            if keysym == sym::SHIFT_L || keysym == sym::SHIFT_R {
                shift = down;
                continue;
            }
            if !down {
                continue;
            }
            let code = (0..256u16)
                .find(|c| evdev_to_keysym(*c) == Some(keysym) || shifted_keysym(*c) == Some(keysym))
                .unwrap_or_else(|| panic!("no key gives keysym {keysym:#x}"));
            let typed = if shift {
                shifted_keysym(code)
            } else {
                evdev_to_keysym(code)
            };
            let typed = match typed {
                Some(sym::RETURN) => '\n',
                Some(sym::TAB) => '\t',
                Some(k) => char::from_u32(k).unwrap(),
                None => panic!("no keysym for code {code}"),
            };
            out.push(typed);
        }
        out
    }

    #[test]
    fn shift_gives_the_us_shifted_keysyms() {
        let pairs = [
            (2, b'!'),
            (3, b'@'),
            (6, b'%'),
            (7, b'^'),
            (10, b'('),
            (11, b')'),
            (12, b'_'),
            (13, b'+'),
            (26, b'{'),
            (27, b'}'),
            (39, b':'),
            (40, b'"'),
            (41, b'~'),
            (43, b'|'),
            (51, b'<'),
            (52, b'>'),
            (53, b'?'),
            (30, b'A'),
            (44, b'Z'),
            (57, b' '),
        ];
        for (code, shifted) in pairs {
            assert_eq!(
                shifted_keysym(code),
                Some(u32::from(shifted)),
                "code {code}"
            );
        }
        assert_eq!(shifted_keysym(15), Some(0xfe20)); // ISO_Left_Tab
        assert_eq!(shifted_keysym(28), Some(sym::RETURN));
        assert_eq!(shifted_keysym(59), Some(0xffbe)); // F1 stays F1
        assert_eq!(shifted_keysym(42), Some(sym::SHIFT_L));
        for code in 0..=u16::MAX {
            assert_eq!(
                shifted_keysym(code).is_some(),
                evdev_to_keysym(code).is_some()
            );
        }
    }

    #[test]
    fn held_shift_changes_the_keysym_and_the_release_matches_the_press() {
        let mut kb = KeyboardState::new();
        assert_eq!(kb.key(42, true), vec![(sym::SHIFT_L, true)]);
        assert!(kb.shift());
        assert_eq!(kb.key(2, true), vec![(0x21, true)]);
        assert_eq!(kb.key(30, true), vec![(u32::from(b'A'), true)]);
        // Shift goes up before the keys: they are released as pressed.
        assert_eq!(kb.key(42, false), vec![(sym::SHIFT_L, false)]);
        assert!(!kb.shift());
        assert_eq!(kb.key(2, false), vec![(0x21, false)]);
        assert_eq!(kb.key(30, false), vec![(u32::from(b'A'), false)]);
        // Without Shift: unshifted.
        assert_eq!(kb.key(2, true), vec![(u32::from(b'1'), true)]);
        assert_eq!(kb.key(2, false), vec![(u32::from(b'1'), false)]);
        // Right Shift works too.
        assert_eq!(kb.key(54, true), vec![(sym::SHIFT_R, true)]);
        assert_eq!(kb.key(53, true), vec![(u32::from(b'?'), true)]);
        assert_eq!(kb.key(53, false), vec![(u32::from(b'?'), false)]);
        assert_eq!(kb.key(54, false), vec![(sym::SHIFT_R, false)]);
    }

    #[test]
    fn a_repeated_press_after_shift_releases_the_old_keysym() {
        let mut kb = KeyboardState::new();
        kb.key(30, true);
        assert_eq!(kb.key(30, true), vec![(u32::from(b'a'), true)]);
        kb.key(42, true);
        assert_eq!(
            kb.key(30, true),
            vec![(u32::from(b'a'), false), (u32::from(b'A'), true)]
        );
        assert_eq!(kb.key(30, false), vec![(u32::from(b'A'), false)]);
    }

    #[test]
    fn caps_lock_toggles_letters_only_and_shift_inverts_it() {
        let mut kb = KeyboardState::new();
        assert!(!kb.caps_lock());
        assert_eq!(kb.key(58, true), vec![(sym::CAPS_LOCK, true)]);
        // Auto-repeat of Caps Lock does not toggle again.
        kb.key(58, true);
        assert_eq!(kb.key(58, false), vec![(sym::CAPS_LOCK, false)]);
        assert!(kb.caps_lock());
        assert_eq!(kb.keysym_for(30), Some(u32::from(b'A')));
        assert_eq!(kb.keysym_for(2), Some(u32::from(b'1')));
        assert_eq!(kb.keysym_for(53), Some(u32::from(b'/')));
        kb.key(42, true);
        assert_eq!(kb.keysym_for(30), Some(u32::from(b'a')));
        assert_eq!(kb.keysym_for(2), Some(0x21));
        kb.key(42, false);
        kb.key(58, true);
        kb.key(58, false);
        assert!(!kb.caps_lock());
        assert_eq!(kb.keysym_for(30), Some(u32::from(b'a')));
    }

    #[test]
    fn altgr_is_tracked_and_sent_as_its_own_key() {
        let mut kb = KeyboardState::new();
        assert_eq!(kb.key(100, true), vec![(0xffea, true)]);
        assert!(kb.level3());
        // The US layout has no third level: keys keep their keysyms.
        assert_eq!(kb.key(16, true), vec![(u32::from(b'q'), true)]);
        kb.key(16, false);
        assert_eq!(kb.key(100, false), vec![(0xffea, false)]);
        assert!(!kb.level3());
        // Ctrl and Alt pass as themselves.
        assert_eq!(kb.key(29, true), vec![(0xffe3, true)]);
        assert_eq!(kb.key(56, true), vec![(0xffe9, true)]);
    }

    #[test]
    fn release_all_lets_go_of_everything_held() {
        let mut kb = KeyboardState::new();
        kb.key(42, true);
        kb.key(3, true);
        kb.key(58, true);
        let mut released = kb.release_all();
        released.sort_unstable();
        assert_eq!(
            released,
            vec![
                (0x40, false),
                (sym::SHIFT_L, false),
                (sym::CAPS_LOCK, false)
            ]
        );
        assert!(!kb.shift());
        assert!(kb.caps_lock());
        assert!(kb.release_all().is_empty());
    }

    #[test]
    fn unknown_keys_send_nothing_and_never_panic() {
        let mut kb = KeyboardState::new();
        for code in [0u16, 84, 240, 0x2ff, u16::MAX] {
            assert!(kb.key(code, true).is_empty(), "{code}");
            assert!(kb.key(code, false).is_empty(), "{code}");
        }
        for code in 0..=u16::MAX {
            kb.key(code, true);
            kb.key(code, false);
        }
        // Releasing a key never pressed sends nothing, but a modifier's state follows it.
        let mut kb = KeyboardState::new();
        assert!(kb.key(30, false).is_empty());
        assert!(kb.key(87, false).is_empty());
        kb.shift_left = true;
        assert!(kb.key(42, false).is_empty());
        assert!(!kb.shift());
    }

    #[test]
    fn every_printable_ascii_character_types_itself() {
        for c in ' '..='~' {
            let text = c.to_string();
            let (events, skipped) = text_to_keysym_events(&text);
            assert_eq!(skipped, 0, "{c:?}");
            // The keysym pressed is the character itself (Latin-1 keysyms are code points).
            assert!(events.contains(&(u32::from(c), true)), "{c:?}: {events:?}");
            // A server that goes by key position types the same character.
            assert_eq!(typed_by_key_position(&events), text, "{c:?}: {events:?}");
            let needs_shift = us_key_for_char(c).is_some_and(|s| s.shift);
            assert_eq!(events.contains(&(sym::SHIFT_L, true)), needs_shift, "{c:?}");
        }
        let all: String = (' '..='~').chain("\n\t".chars()).collect();
        let (events, skipped) = text_to_keysym_events(&all);
        assert_eq!(skipped, 0);
        assert_eq!(typed_by_key_position(&events), all);
        // Every press is released, and Shift is never left down.
        let downs = events.iter().filter(|e| e.1).count();
        assert_eq!(downs * 2, events.len());
        assert_eq!(events.last(), Some(&(sym::TAB, false)));
    }

    #[test]
    fn typed_text_does_not_depend_on_caps_lock_and_line_ends_are_one_return() {
        let (events, skipped) = text_to_keysym_events("aB\r\nc\r");
        assert_eq!(skipped, 0);
        assert_eq!(
            events,
            vec![
                (u32::from(b'a'), true),
                (u32::from(b'a'), false),
                (sym::SHIFT_L, true),
                (u32::from(b'B'), true),
                (u32::from(b'B'), false),
                (sym::SHIFT_L, false),
                (sym::RETURN, true),
                (sym::RETURN, false),
                (u32::from(b'c'), true),
                (u32::from(b'c'), false),
                (sym::RETURN, true),
                (sym::RETURN, false),
            ]
        );
    }

    #[test]
    fn characters_without_a_us_key_are_skipped_without_panicking() {
        let (events, skipped) = text_to_keysym_events("é€\u{0}\u{7f}ß😀x");
        assert_eq!(skipped, 6);
        assert_eq!(
            events,
            vec![(u32::from(b'x'), true), (u32::from(b'x'), false)]
        );
        assert_eq!(text_to_keysym_events(""), (vec![], 0));
        let every_char: String = (0..0x3000u32).filter_map(char::from_u32).collect();
        let (events, skipped) = text_to_keysym_events(&every_char);
        // Printable ASCII, Tab, Line Feed and Carriage Return (typed as Return).
        assert_eq!(skipped, every_char.chars().count() - 98);
        assert_eq!(typed_by_key_position(&events).len(), 98);
    }
}
