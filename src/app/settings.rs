//! The app's preferences through GSettings (`io.github.deskvm.DeskVM`), usable from the
//! build tree: when the schema is not installed, the schema XML built into the binary is
//! compiled with `glib-compile-schemas` into `$XDG_CACHE_HOME/deskvm/schemas` and loaded
//! from there. When that fails too (no glib-compile-schemas), every setting has its default
//! and changes last only for the session. GSettings aborts the process on a missing schema,
//! so the schema source is always checked first.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use gtk::gio;
use gtk::prelude::*;

pub const SCHEMA_ID: &str = "io.github.deskvm.DeskVM";
const SCHEMA_XML: &str = include_str!("../../data/io.github.deskvm.DeskVM.gschema.xml");

/// The preferences, with their defaults when GSettings is unavailable.
pub struct AppSettings {
    settings: Option<gio::Settings>,
    fallback: RefCell<HashMap<&'static str, String>>,
}

fn default_of(key: &str) -> &'static str {
    match key {
        "vm-folder" => "",
        "console-scaling" => "fit",
        "console-smooth" => "true",
        "grab-combo" => "Ctrl+Alt",
        "graph-interval-ms" => "1000",
        "history-length" => "60",
        "confirm-force-off" | "confirm-quit-running" => "true",
        _ => "",
    }
}

/// Compiles the built-in schema into `dir` (only when missing or older than the binary's).
fn compile_schema(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let xml = dir.join(format!("{SCHEMA_ID}.gschema.xml"));
    let compiled = dir.join("gschemas.compiled");
    let current = std::fs::read_to_string(&xml).ok();
    if current.as_deref() == Some(SCHEMA_XML) && compiled.is_file() {
        return Ok(());
    }
    vmm::config::write_atomically(&xml, SCHEMA_XML.as_bytes())?;
    let status = std::process::Command::new("glib-compile-schemas")
        .arg(dir)
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "glib-compile-schemas failed: {status}"
        )))
    }
}

fn schema_cache_dir() -> Option<PathBuf> {
    dirs::cache_dir().map(|d| d.join("deskvm").join("schemas"))
}

fn open_settings() -> Option<gio::Settings> {
    let default_source = gio::SettingsSchemaSource::default();
    if let Some(schema) = default_source
        .as_ref()
        .and_then(|s| s.lookup(SCHEMA_ID, true))
    {
        return Some(gio::Settings::new_full(
            &schema,
            None::<&gio::SettingsBackend>,
            None,
        ));
    }
    let dir = schema_cache_dir()?;
    if let Err(e) = compile_schema(&dir) {
        log::warn!(
            "settings: cannot compile the schema into {}: {e}; using defaults",
            dir.display()
        );
        return None;
    }
    let source =
        gio::SettingsSchemaSource::from_directory(&dir, default_source.as_ref(), false).ok()?;
    let schema = source.lookup(SCHEMA_ID, false)?;
    Some(gio::Settings::new_full(
        &schema,
        None::<&gio::SettingsBackend>,
        None,
    ))
}

impl AppSettings {
    pub fn load() -> Self {
        Self {
            settings: open_settings(),
            fallback: RefCell::new(HashMap::new()),
        }
    }

    /// Settings with defaults only.
    #[cfg(test)]
    pub fn defaults() -> Self {
        Self {
            settings: None,
            fallback: RefCell::new(HashMap::new()),
        }
    }

    pub fn is_persistent(&self) -> bool {
        self.settings.is_some()
    }

    fn fallback(&self, key: &'static str) -> String {
        self.fallback
            .borrow()
            .get(key)
            .cloned()
            .unwrap_or_else(|| default_of(key).to_string())
    }

    pub fn string(&self, key: &'static str) -> String {
        match &self.settings {
            Some(s) => s.string(key).to_string(),
            None => self.fallback(key),
        }
    }

    pub fn boolean(&self, key: &'static str) -> bool {
        match &self.settings {
            Some(s) => s.boolean(key),
            None => self.fallback(key) == "true",
        }
    }

    pub fn uint(&self, key: &'static str) -> u32 {
        match &self.settings {
            Some(s) => s.uint(key),
            None => self.fallback(key).parse().unwrap_or(0),
        }
    }

    pub fn set_string(&self, key: &'static str, value: &str) {
        match &self.settings {
            Some(s) => {
                if let Err(e) = s.set_string(key, value) {
                    log::warn!("settings: {key}: {e}");
                }
            }
            None => {
                self.fallback.borrow_mut().insert(key, value.to_string());
            }
        }
    }

    pub fn set_boolean(&self, key: &'static str, value: bool) {
        match &self.settings {
            Some(s) => {
                if let Err(e) = s.set_boolean(key, value) {
                    log::warn!("settings: {key}: {e}");
                }
            }
            None => {
                self.fallback.borrow_mut().insert(key, value.to_string());
            }
        }
    }

    pub fn set_uint(&self, key: &'static str, value: u32) {
        match &self.settings {
            Some(s) => {
                if let Err(e) = s.set_uint(key, value) {
                    log::warn!("settings: {key}: {e}");
                }
            }
            None => {
                self.fallback.borrow_mut().insert(key, value.to_string());
            }
        }
    }

    /// The VM library folder: the setting, or the XDG default.
    pub fn library_dir(&self) -> Result<PathBuf, crate::library::LibraryError> {
        let folder = self.string("vm-folder");
        if folder.trim().is_empty() {
            crate::library::library_dir()
        } else {
            Ok(PathBuf::from(folder))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_without_gsettings() {
        let s = AppSettings::defaults();
        assert!(!s.is_persistent());
        assert_eq!(s.string("console-scaling"), "fit");
        assert_eq!(s.string("grab-combo"), "Ctrl+Alt");
        assert_eq!(s.uint("graph-interval-ms"), 1000);
        assert_eq!(s.uint("history-length"), 60);
        assert!(s.boolean("confirm-force-off"));
        s.set_uint("history-length", 120);
        s.set_boolean("confirm-force-off", false);
        s.set_string("vm-folder", "/tmp/vms");
        assert_eq!(s.uint("history-length"), 120);
        assert!(!s.boolean("confirm-force-off"));
        assert_eq!(s.library_dir().unwrap(), PathBuf::from("/tmp/vms"));
    }

    #[test]
    fn the_built_in_schema_names_every_key_with_its_default() {
        for key in [
            "vm-folder",
            "console-scaling",
            "console-smooth",
            "grab-combo",
            "graph-interval-ms",
            "history-length",
            "confirm-force-off",
            "confirm-quit-running",
        ] {
            assert!(
                SCHEMA_XML.contains(&format!("<key name=\"{key}\"")),
                "{key}"
            );
            let default = default_of(key);
            let quoted = format!("<default>'{default}'</default>");
            let plain = format!("<default>{default}</default>");
            let section = SCHEMA_XML
                .split(&format!("<key name=\"{key}\""))
                .nth(1)
                .and_then(|s| s.split("</key>").next())
                .unwrap();
            assert!(
                section.contains(&quoted) || section.contains(&plain),
                "{key}"
            );
        }
    }
}
