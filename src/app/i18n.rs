//! Translations: the app's `po/*.po` catalogs are built into the binary and looked up by
//! the user's language (LANGUAGE, LC_ALL, LC_MESSAGES, LANG), so the app is translated when
//! run from the build tree without installing `.mo` files. `tr("text")` gives the
//! translation or the English text. Handles msgid/msgstr with continuation lines and C
//! escapes; plural forms and msgctxt are not used by the app and are skipped.

use std::collections::HashMap;
use std::sync::OnceLock;

/// The catalogs built in: (language code, .po text). Keep in step with po/LINGUAS.
const CATALOGS: &[(&str, &str)] = &[("de", include_str!("../../po/de.po"))];

static CATALOG: OnceLock<HashMap<String, String>> = OnceLock::new();

/// Parses a quoted PO string (`"a\"b\n"`), returning its text.
fn unquote(s: &str) -> Option<String> {
    let inner = s.trim().strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next()? {
            'n' => out.push('\n'),
            't' => out.push('\t'),
            '"' => out.push('"'),
            '\\' => out.push('\\'),
            other => {
                out.push('\\');
                out.push(other);
            }
        }
    }
    Some(out)
}

/// The translations of a .po file: msgid → msgstr, skipping untranslated, fuzzy and plural
/// entries and the header.
pub fn parse_po(text: &str) -> HashMap<String, String> {
    #[derive(PartialEq)]
    enum Field {
        None,
        Id,
        Str,
        Skip,
    }
    let mut map = HashMap::new();
    let (mut id, mut value) = (String::new(), String::new());
    let mut field = Field::None;
    let mut fuzzy = false;
    let mut flush = |id: &mut String, value: &mut String, fuzzy: &mut bool| {
        if !id.is_empty() && !value.is_empty() && !*fuzzy {
            map.insert(std::mem::take(id), std::mem::take(value));
        }
        id.clear();
        value.clear();
        *fuzzy = false;
    };
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            flush(&mut id, &mut value, &mut fuzzy);
            field = Field::None;
        } else if let Some(flags) = line.strip_prefix("#,") {
            if field == Field::Str {
                flush(&mut id, &mut value, &mut fuzzy);
            }
            fuzzy = flags.contains("fuzzy");
            field = Field::None;
        } else if line.starts_with('#') {
            continue;
        } else if let Some(rest) = line.strip_prefix("msgid_plural") {
            let _ = rest;
            field = Field::Skip;
            id.clear();
        } else if let Some(rest) = line.strip_prefix("msgid ") {
            if field == Field::Str {
                flush(&mut id, &mut value, &mut fuzzy);
            }
            id = unquote(rest).unwrap_or_default();
            field = Field::Id;
        } else if let Some(rest) = line.strip_prefix("msgstr ") {
            if field == Field::Skip {
                continue;
            }
            value = unquote(rest).unwrap_or_default();
            field = Field::Str;
        } else if line.starts_with("msgstr[") || line.starts_with("msgctxt") {
            field = Field::Skip;
            id.clear();
            value.clear();
        } else if line.starts_with('"') {
            let part = unquote(line).unwrap_or_default();
            match field {
                Field::Id => id.push_str(&part),
                Field::Str => value.push_str(&part),
                _ => {}
            }
        }
    }
    flush(&mut id, &mut value, &mut fuzzy);
    map
}

/// The language codes the user prefers, best first: "de_DE.UTF-8" gives "de_DE", "de".
pub fn preferred_languages(vars: &dyn Fn(&str) -> Option<String>) -> Vec<String> {
    let mut out = Vec::new();
    let lang_list = vars("LANGUAGE").filter(|v| !v.is_empty());
    let single = ["LC_ALL", "LC_MESSAGES", "LANG"]
        .iter()
        .find_map(|v| vars(v).filter(|v| !v.is_empty()));
    if matches!(single.as_deref(), Some("C") | Some("POSIX")) {
        return out;
    }
    let list = lang_list.or(single).unwrap_or_default();
    for entry in list.split(':') {
        let base = entry.split(['.', '@']).next().unwrap_or("");
        if base.is_empty() {
            continue;
        }
        out.push(base.to_string());
        if let Some((lang, _)) = base.split_once('_') {
            out.push(lang.to_string());
        }
    }
    out
}

/// Chooses the catalog for the user's language; call once at start.
pub fn init() {
    CATALOG.get_or_init(|| {
        let langs = preferred_languages(&|name| std::env::var(name).ok());
        langs
            .iter()
            .find_map(|l| CATALOGS.iter().find(|(code, _)| code == l))
            .map(|(_, text)| parse_po(text))
            .unwrap_or_default()
    });
}

/// The translation of `text`, or `text`.
pub fn tr(text: &str) -> String {
    CATALOG
        .get()
        .and_then(|c| c.get(text))
        .cloned()
        .unwrap_or_else(|| text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn po_entries_with_continuations_escapes_and_fuzzy() {
        let po = r#"
msgid ""
msgstr "Content-Type: text/plain; charset=UTF-8\n"

#: src/app/mod.rs:1
msgid "Run"
msgstr "Starten"

msgid "Two "
"lines"
msgstr "Zwei "
"Zeilen\n"

#, fuzzy
msgid "Fuzzy"
msgstr "Unscharf"

msgid "Untranslated"
msgstr ""

msgid "Quote \"q\""
msgstr "Zitat \"q\""

msgid "One"
msgid_plural "Many"
msgstr[0] "Eins"
msgstr[1] "Viele"
"#;
        let map = parse_po(po);
        assert_eq!(map.get("Run").map(String::as_str), Some("Starten"));
        assert_eq!(
            map.get("Two lines").map(String::as_str),
            Some("Zwei Zeilen\n")
        );
        assert_eq!(
            map.get("Quote \"q\"").map(String::as_str),
            Some("Zitat \"q\"")
        );
        assert!(!map.contains_key("Fuzzy"));
        assert!(!map.contains_key("Untranslated"));
        assert!(!map.contains_key("One"));
        assert!(!map.contains_key(""));
        assert!(parse_po("msgid \"unterminated\nmsgstr \"x\"").is_empty());
    }

    #[test]
    fn language_preferences() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            preferred_languages(&env(&[("LANG", "de_DE.UTF-8")])),
            vec!["de_DE", "de"]
        );
        assert_eq!(
            preferred_languages(&env(&[("LANGUAGE", "fr:de"), ("LANG", "en_US.UTF-8")])),
            vec!["fr", "de"]
        );
        assert!(preferred_languages(&env(&[("LC_ALL", "C"), ("LANGUAGE", "de")])).is_empty());
        assert!(preferred_languages(&env(&[])).is_empty());
    }

    #[test]
    fn the_german_catalog_is_complete() {
        let (_, text) = CATALOGS[0];
        let map = parse_po(text);
        let ids = po_msgids(text);
        assert!(ids.len() > 50, "{}", ids.len());
        for id in ids {
            assert!(map.contains_key(&id), "untranslated: {id:?}");
        }
    }

    /// Every `tr("…")` text of the app's sources has a German translation.
    #[test]
    fn every_translatable_text_is_in_the_catalog() {
        let sources = [
            include_str!("console_page.rs"),
            include_str!("details.rs"),
            include_str!("details_model.rs"),
            include_str!("dialogs.rs"),
            include_str!("library_page.rs"),
            include_str!("mod.rs"),
            include_str!("perf_page.rs"),
            include_str!("remote_page.rs"),
            include_str!("settings.rs"),
            include_str!("wizard.rs"),
            include_str!("wizard_model.rs"),
        ];
        let map = parse_po(CATALOGS[0].1);
        let mut missing = Vec::new();
        for src in sources {
            let code = src.split("#[cfg(test)]").next().unwrap_or(src);
            // `tr(` then optional whitespace (rustfmt wraps long calls) then the literal;
            // `attr(`, `ptr(` and the like are other calls.
            let mut rest = code;
            while let Some(at) = rest.find("tr(") {
                let before = rest[..at].chars().next_back();
                let after = rest[at + 3..].trim_start();
                rest = &rest[at + 3..];
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                    continue;
                }
                let Some(literal) = after.strip_prefix('"') else {
                    continue;
                };
                // The literal ends at the first quote not escaped by a backslash.
                let mut escaped = false;
                let Some(end) = literal.char_indices().find_map(|(i, c)| {
                    let closes = c == '"' && !escaped;
                    escaped = c == '\\' && !escaped;
                    closes.then_some(i)
                }) else {
                    continue;
                };
                let text = literal[..end].replace("\\\"", "\"");
                if !map.contains_key(&text) {
                    missing.push(text);
                }
            }
        }
        assert!(missing.is_empty(), "not in po/de.po: {missing:?}");
    }

    fn po_msgids(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut current: Option<String> = None;
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("msgid ") {
                current = unquote(rest);
            } else if line.starts_with('"') {
                if let (Some(c), Some(p)) = (current.as_mut(), unquote(line)) {
                    c.push_str(&p);
                }
            } else if line.starts_with("msgstr") {
                if let Some(id) = current.take().filter(|i| !i.is_empty()) {
                    out.push(id);
                }
            }
        }
        out
    }
}
