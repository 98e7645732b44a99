//! Keyboard translation for the console: GDK hardware keycodes to Linux evdev codes, text
//! to US-layout key strokes (for "type the clipboard"), the key combinations of the
//! send-keys menu, and the grab-release combination.
//!
//! What is covered: the evdev codes of a 105-key PC keyboard and printable ASCII on a US
//! layout. What is not: other layouts (a guest with a German layout gets US key positions),
//! dead keys, and characters outside ASCII (they are skipped and counted).

/// Linux evdev key codes (from `linux/input-event-codes.h`), the ones the app names.
pub mod evdev {
    pub const KEY_ESC: u16 = 1;
    pub const KEY_1: u16 = 2;
    pub const KEY_0: u16 = 11;
    pub const KEY_MINUS: u16 = 12;
    pub const KEY_EQUAL: u16 = 13;
    pub const KEY_BACKSPACE: u16 = 14;
    pub const KEY_TAB: u16 = 15;
    pub const KEY_Q: u16 = 16;
    pub const KEY_LEFTBRACE: u16 = 26;
    pub const KEY_RIGHTBRACE: u16 = 27;
    pub const KEY_ENTER: u16 = 28;
    pub const KEY_LEFTCTRL: u16 = 29;
    pub const KEY_A: u16 = 30;
    pub const KEY_SEMICOLON: u16 = 39;
    pub const KEY_APOSTROPHE: u16 = 40;
    pub const KEY_GRAVE: u16 = 41;
    pub const KEY_LEFTSHIFT: u16 = 42;
    pub const KEY_BACKSLASH: u16 = 43;
    pub const KEY_Z: u16 = 44;
    pub const KEY_COMMA: u16 = 51;
    pub const KEY_DOT: u16 = 52;
    pub const KEY_SLASH: u16 = 53;
    pub const KEY_RIGHTSHIFT: u16 = 54;
    pub const KEY_LEFTALT: u16 = 56;
    pub const KEY_SPACE: u16 = 57;
    pub const KEY_F1: u16 = 59;
    pub const KEY_F10: u16 = 68;
    pub const KEY_F11: u16 = 87;
    pub const KEY_F12: u16 = 88;
    pub const KEY_RIGHTCTRL: u16 = 97;
    pub const KEY_SYSRQ: u16 = 99;
    pub const KEY_RIGHTALT: u16 = 100;
    pub const KEY_DELETE: u16 = 111;
    pub const KEY_LEFTMETA: u16 = 125;
    pub const KEY_RIGHTMETA: u16 = 126;
    /// The highest code the engine's keyboards know.
    pub const KEY_MAX: u16 = 0x2ff;
}

use evdev::*;

/// The X11 / Wayland hardware keycode of a key is its evdev code plus 8.
pub fn evdev_from_hardware_keycode(keycode: u32) -> Option<u16> {
    let code = keycode.checked_sub(8)?;
    u16::try_from(code)
        .ok()
        .filter(|c| *c != 0 && *c <= KEY_MAX)
}

/// The evdev code of function key F`n` (1..=12).
pub fn function_key(n: u8) -> Option<u16> {
    match n {
        1..=10 => Some(KEY_F1 + u16::from(n) - 1),
        11 => Some(KEY_F11),
        12 => Some(KEY_F12),
        _ => None,
    }
}

/// One key to press (with Shift when `shift`) to type a character.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyStroke {
    pub code: u16,
    pub shift: bool,
}

const fn plain(code: u16) -> Option<KeyStroke> {
    Some(KeyStroke { code, shift: false })
}

const fn shifted(code: u16) -> Option<KeyStroke> {
    Some(KeyStroke { code, shift: true })
}

/// The key that types `c` on a US keyboard layout; `None` for characters it has no key for.
pub fn us_key_for_char(c: char) -> Option<KeyStroke> {
    const QWERTY_ROWS: [(&str, u16); 3] = [
        ("qwertyuiop", KEY_Q),
        ("asdfghjkl", KEY_A),
        ("zxcvbnm", KEY_Z),
    ];
    if c.is_ascii_lowercase() || c.is_ascii_uppercase() {
        let lower = c.to_ascii_lowercase();
        for (row, first) in QWERTY_ROWS {
            if let Some(i) = row.find(lower) {
                let code = first + i as u16;
                return Some(KeyStroke {
                    code,
                    shift: c.is_ascii_uppercase(),
                });
            }
        }
        return None;
    }
    match c {
        '1'..='9' => plain(KEY_1 + (c as u16 - '1' as u16)),
        '0' => plain(KEY_0),
        '!' => shifted(KEY_1),
        '@' => shifted(KEY_1 + 1),
        '#' => shifted(KEY_1 + 2),
        '$' => shifted(KEY_1 + 3),
        '%' => shifted(KEY_1 + 4),
        '^' => shifted(KEY_1 + 5),
        '&' => shifted(KEY_1 + 6),
        '*' => shifted(KEY_1 + 7),
        '(' => shifted(KEY_1 + 8),
        ')' => shifted(KEY_0),
        '-' => plain(KEY_MINUS),
        '_' => shifted(KEY_MINUS),
        '=' => plain(KEY_EQUAL),
        '+' => shifted(KEY_EQUAL),
        '[' => plain(KEY_LEFTBRACE),
        '{' => shifted(KEY_LEFTBRACE),
        ']' => plain(KEY_RIGHTBRACE),
        '}' => shifted(KEY_RIGHTBRACE),
        '\\' => plain(KEY_BACKSLASH),
        '|' => shifted(KEY_BACKSLASH),
        ';' => plain(KEY_SEMICOLON),
        ':' => shifted(KEY_SEMICOLON),
        '\'' => plain(KEY_APOSTROPHE),
        '"' => shifted(KEY_APOSTROPHE),
        '`' => plain(KEY_GRAVE),
        '~' => shifted(KEY_GRAVE),
        ',' => plain(KEY_COMMA),
        '<' => shifted(KEY_COMMA),
        '.' => plain(KEY_DOT),
        '>' => shifted(KEY_DOT),
        '/' => plain(KEY_SLASH),
        '?' => shifted(KEY_SLASH),
        ' ' => plain(KEY_SPACE),
        '\n' => plain(KEY_ENTER),
        '\t' => plain(KEY_TAB),
        _ => None,
    }
}

/// A key event to send: evdev code and pressed (true) or released.
pub type KeyEvent = (u16, bool);

/// The key presses and releases that type `text` on a US layout, with the number of
/// characters that have no key there (skipped). "\r\n" types one Enter.
pub fn text_to_key_events(text: &str) -> (Vec<KeyEvent>, usize) {
    let mut events = Vec::with_capacity(text.len() * 2);
    let mut skipped = 0;
    let normalized = text.replace("\r\n", "\n");
    for c in normalized.chars() {
        let c = if c == '\r' { '\n' } else { c };
        match us_key_for_char(c) {
            Some(stroke) => {
                if stroke.shift {
                    events.push((KEY_LEFTSHIFT, true));
                }
                events.push((stroke.code, true));
                events.push((stroke.code, false));
                if stroke.shift {
                    events.push((KEY_LEFTSHIFT, false));
                }
            }
            None => skipped += 1,
        }
    }
    (events, skipped)
}

/// The press-all-then-release-in-reverse events of a key combination.
pub fn combo_events(keys: &[u16]) -> Vec<KeyEvent> {
    keys.iter()
        .map(|k| (*k, true))
        .chain(keys.iter().rev().map(|k| (*k, false)))
        .collect()
}

/// A combination of the send-keys menu: its label and keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendKeysEntry {
    pub label: String,
    pub keys: Vec<u16>,
}

/// The send-keys menu: Ctrl+Alt+Del, Ctrl+Alt+Backspace, Ctrl+Alt+F1..F12, PrintScreen.
pub fn send_keys_menu() -> Vec<SendKeysEntry> {
    let mut entries = vec![
        SendKeysEntry {
            label: "Ctrl+Alt+Del".into(),
            keys: vec![KEY_LEFTCTRL, KEY_LEFTALT, KEY_DELETE],
        },
        SendKeysEntry {
            label: "Ctrl+Alt+Backspace".into(),
            keys: vec![KEY_LEFTCTRL, KEY_LEFTALT, KEY_BACKSPACE],
        },
    ];
    for n in 1..=12u8 {
        if let Some(f) = function_key(n) {
            entries.push(SendKeysEntry {
                label: format!("Ctrl+Alt+F{n}"),
                keys: vec![KEY_LEFTCTRL, KEY_LEFTALT, f],
            });
        }
    }
    entries.push(SendKeysEntry {
        label: "PrintScreen".into(),
        keys: vec![KEY_SYSRQ],
    });
    entries
}

/// Modifier keys a grab-release combination may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Modifiers {
    pub ctrl: bool,
    pub alt: bool,
    pub shift: bool,
    pub meta: bool,
}

impl Modifiers {
    fn is_empty(&self) -> bool {
        !(self.ctrl || self.alt || self.shift || self.meta)
    }
}

/// Why a grab-release combination text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ComboError {
    #[error("the release combination names no modifier key")]
    Empty,
    #[error("'{0}' is not a modifier: use Ctrl, Alt, Shift or Super joined by '+'")]
    UnknownKey(String),
}

/// Parses "Ctrl+Alt", "ctrl+shift", "Super+Alt"...
pub fn parse_release_combo(text: &str) -> Result<Modifiers, ComboError> {
    let mut m = Modifiers::default();
    for part in text.split('+').map(str::trim).filter(|p| !p.is_empty()) {
        match part.to_ascii_lowercase().as_str() {
            "ctrl" | "control" => m.ctrl = true,
            "alt" => m.alt = true,
            "shift" => m.shift = true,
            "super" | "meta" | "win" => m.meta = true,
            _ => return Err(ComboError::UnknownKey(part.to_string())),
        }
    }
    if m.is_empty() {
        return Err(ComboError::Empty);
    }
    Ok(m)
}

/// The text of a combination, as shown in the grab overlay: "Ctrl+Alt".
pub fn combo_label(m: Modifiers) -> String {
    let mut parts = Vec::new();
    if m.ctrl {
        parts.push("Ctrl");
    }
    if m.alt {
        parts.push("Alt");
    }
    if m.shift {
        parts.push("Shift");
    }
    if m.meta {
        parts.push("Super");
    }
    parts.join("+")
}

/// Watches key events while the keyboard is grabbed and says when the release combination
/// is complete (all its modifiers held, no other key).
#[derive(Debug, Clone, Default)]
pub struct GrabReleaseDetector {
    combo: Modifiers,
    held: Modifiers,
}

impl GrabReleaseDetector {
    pub fn new(combo: Modifiers) -> Self {
        Self {
            combo,
            held: Modifiers::default(),
        }
    }

    /// Feeds one key event; true when the combination is now complete.
    pub fn on_key(&mut self, code: u16, down: bool) -> bool {
        match code {
            KEY_LEFTCTRL | KEY_RIGHTCTRL => self.held.ctrl = down,
            KEY_LEFTALT | KEY_RIGHTALT => self.held.alt = down,
            KEY_LEFTSHIFT | KEY_RIGHTSHIFT => self.held.shift = down,
            KEY_LEFTMETA | KEY_RIGHTMETA => self.held.meta = down,
            _ => {
                return false;
            }
        }
        down && self.held == self.combo
    }

    /// Forgets held keys (after a release or focus loss).
    pub fn clear(&mut self) {
        self.held = Modifiers::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardware_keycodes_are_evdev_plus_eight() {
        assert_eq!(evdev_from_hardware_keycode(9), Some(KEY_ESC));
        assert_eq!(evdev_from_hardware_keycode(38), Some(KEY_A));
        assert_eq!(evdev_from_hardware_keycode(119), Some(KEY_DELETE));
        for bad in [0, 7, 8, u32::MAX, 8 + 0x300] {
            assert_eq!(evdev_from_hardware_keycode(bad), None, "{bad}");
        }
    }

    #[test]
    fn function_keys() {
        assert_eq!(function_key(1), Some(59));
        assert_eq!(function_key(10), Some(68));
        assert_eq!(function_key(11), Some(87));
        assert_eq!(function_key(12), Some(88));
        assert_eq!(function_key(0), None);
        assert_eq!(function_key(13), None);
    }

    #[test]
    fn us_layout_letters_digits_and_symbols() {
        assert_eq!(us_key_for_char('q'), plain(16));
        assert_eq!(us_key_for_char('P'), shifted(25));
        assert_eq!(us_key_for_char('l'), plain(38));
        assert_eq!(us_key_for_char('m'), plain(50));
        assert_eq!(us_key_for_char('1'), plain(2));
        assert_eq!(us_key_for_char('9'), plain(10));
        assert_eq!(us_key_for_char('0'), plain(11));
        assert_eq!(us_key_for_char('@'), shifted(3));
        assert_eq!(us_key_for_char(')'), shifted(11));
        assert_eq!(us_key_for_char('?'), shifted(KEY_SLASH));
        assert_eq!(us_key_for_char('~'), shifted(KEY_GRAVE));
        assert_eq!(us_key_for_char('é'), None);
        assert_eq!(us_key_for_char('\u{0}'), None);
        // Every printable ASCII character has a key.
        for c in ' '..='~' {
            assert!(us_key_for_char(c).is_some(), "{c:?}");
        }
    }

    #[test]
    fn text_becomes_presses_with_shift_around_capitals() {
        let (events, skipped) = text_to_key_events("aB\r\n€");
        assert_eq!(skipped, 1);
        assert_eq!(
            events,
            vec![
                (KEY_A, true),
                (KEY_A, false),
                (KEY_LEFTSHIFT, true),
                (48, true),
                (48, false),
                (KEY_LEFTSHIFT, false),
                (KEY_ENTER, true),
                (KEY_ENTER, false),
            ]
        );
        assert_eq!(text_to_key_events(""), (vec![], 0));
        // Every press is released.
        let (events, _) = text_to_key_events("Hello, World! ~_~");
        let downs = events.iter().filter(|e| e.1).count();
        assert_eq!(downs * 2, events.len());
    }

    #[test]
    fn combos_release_in_reverse() {
        assert_eq!(
            combo_events(&[KEY_LEFTCTRL, KEY_LEFTALT, KEY_DELETE]),
            vec![
                (KEY_LEFTCTRL, true),
                (KEY_LEFTALT, true),
                (KEY_DELETE, true),
                (KEY_DELETE, false),
                (KEY_LEFTALT, false),
                (KEY_LEFTCTRL, false),
            ]
        );
        let menu = send_keys_menu();
        assert_eq!(menu.len(), 2 + 12 + 1);
        assert_eq!(menu[0].label, "Ctrl+Alt+Del");
        assert_eq!(menu[13].keys, vec![KEY_LEFTCTRL, KEY_LEFTALT, KEY_F12]);
        assert_eq!(menu[14].keys, vec![KEY_SYSRQ]);
    }

    #[test]
    fn release_combo_parsing() {
        let m = parse_release_combo("Ctrl+Alt").unwrap();
        assert!(m.ctrl && m.alt && !m.shift && !m.meta);
        assert_eq!(combo_label(m), "Ctrl+Alt");
        assert_eq!(
            combo_label(parse_release_combo(" super + shift ").unwrap()),
            "Shift+Super"
        );
        assert_eq!(parse_release_combo(""), Err(ComboError::Empty));
        assert_eq!(parse_release_combo("+"), Err(ComboError::Empty));
        assert_eq!(
            parse_release_combo("Ctrl+Q"),
            Err(ComboError::UnknownKey("Q".into()))
        );
    }

    #[test]
    fn grab_release_fires_when_all_modifiers_are_held() {
        let mut d = GrabReleaseDetector::new(parse_release_combo("Ctrl+Alt").unwrap());
        assert!(!d.on_key(KEY_LEFTCTRL, true));
        assert!(!d.on_key(KEY_A, true));
        assert!(d.on_key(KEY_RIGHTALT, true));
        d.clear();
        // Ctrl+Alt+Shift is not Ctrl+Alt.
        assert!(!d.on_key(KEY_LEFTSHIFT, true));
        assert!(!d.on_key(KEY_LEFTCTRL, true));
        assert!(!d.on_key(KEY_LEFTALT, true));
        assert!(!d.on_key(KEY_LEFTSHIFT, false));
        // Releases never fire.
        assert!(!d.on_key(KEY_LEFTALT, false));
        assert!(d.on_key(KEY_LEFTALT, true));
    }
}
