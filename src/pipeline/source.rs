//! Reading a pipeline or spec file: size and UTF-8 checks, the lazily built location
//! index, and diagnostics located at a key path.

use std::path::{Path, PathBuf};

use super::location::{self, LocationIndex, NodeKind};
use super::{Diagnostic, Diagnostics, Location};
use crate::util::suggest::did_you_mean;

/// Largest pipeline or spec file accepted.
const MAX_FILE_BYTES: usize = 16 << 20;

/// A YAML file read and decoded. Its location index is built only when a diagnostic needs
/// a location (or the file needs a careful look), so a valid file is parsed once.
pub(crate) struct SourceFile {
    pub path: PathBuf,
    pub text: String,
    index: std::cell::OnceCell<LocationIndex>,
}

impl SourceFile {
    /// Reads a YAML file; `what` names it in messages ("pipeline", "step spec").
    pub fn read(path: &Path, what: &str) -> Result<Self, Diagnostics> {
        let bytes = std::fs::read(path)
            .map_err(|e| Diagnostic::at(path, None, format!("cannot read {what} file: {e}")))?;
        if bytes.len() > MAX_FILE_BYTES {
            return Err(Diagnostic::at(
                path,
                None,
                format!(
                    "{what} file is {} bytes; the limit is {MAX_FILE_BYTES}",
                    bytes.len()
                ),
            )
            .into());
        }
        let text = String::from_utf8(bytes).map_err(|e| {
            let good = e.utf8_error().valid_up_to();
            let raw = e.as_bytes();
            let location = offset_location(&String::from_utf8_lossy(&raw[..good]), good);
            Diagnostic::at(
                path,
                Some(location),
                format!("{what} file is not valid UTF-8 (byte 0x{:02x})", raw[good]),
            )
            .with_help("save the file as UTF-8")
        })?;
        if text.trim().is_empty() {
            return Err(empty_file(path, what).into());
        }
        Ok(Self {
            path: path
                .components()
                .filter(|c| !matches!(c, std::path::Component::CurDir))
                .collect(),
            text,
            index: std::cell::OnceCell::new(),
        })
    }

    /// The location index (built on first use; empty if the YAML cannot be indexed).
    pub fn index(&self) -> &LocationIndex {
        self.index
            .get_or_init(|| LocationIndex::build(&self.text).unwrap_or_default())
    }

    /// Builds the index now, turning YAML syntax problems and empty documents into
    /// diagnostics.
    pub fn check_syntax(&self, what: &str) -> Result<(), Diagnostic> {
        let text = &self.text;
        let index = LocationIndex::build(text).map_err(|e| {
            let line_text = text
                .lines()
                .nth(e.location.line.saturating_sub(1))
                .unwrap_or("");
            let tab_help = (line_text.starts_with('\t')
                || text.lines().any(|l| l.starts_with('\t')) && e.message.contains("tab"))
            .then(|| "YAML does not allow tabs for indentation; indent with spaces".to_string());
            let flow_help = e
                .message
                .contains("flow")
                .then(|| "check for an unclosed `{`, `[` or quote before this point".to_string());
            Diagnostic::at(
                &self.path,
                Some(e.location),
                format!("invalid YAML: {}", e.message),
            )
            .with_optional_help(tab_help.or(flow_help))
        })?;
        let empty = index.empty;
        let _ = self.index.set(index);
        if empty {
            return Err(empty_file(&self.path, what));
        }
        Ok(())
    }

    /// A diagnostic at `path`: a scalar's value, a mapping's or sequence's key, or the
    /// nearest indexed ancestor.
    pub fn diag(&self, path: &str, message: impl Into<String>) -> Diagnostic {
        let index = self.index();
        let location = match index.kind(path) {
            Some(NodeKind::Scalar) => index.value(path),
            Some(_) => index.key(path),
            None => None,
        }
        .or_else(|| index.nearest(path));
        Diagnostic::at(&self.path, location, message)
    }

    /// Duplicate keys as diagnostics.
    pub fn duplicate_diags(&self) -> Vec<Diagnostic> {
        self.index()
            .duplicates
            .iter()
            .map(|(key_path, first, _second)| {
                let key = key_path.rsplit('.').next().unwrap_or(key_path);
                let what = if key_path.starts_with("steps.") && key_path.matches('.').count() == 1 {
                    format!("duplicate step name `{key}`")
                } else {
                    format!("duplicate key `{key}`")
                };
                Diagnostic::at(&self.path, Some(*_second), what).with_help(format!(
                    "first defined at line {}, column {}",
                    first.line, first.col
                ))
            })
            .collect()
    }

    /// Unknown keys of the mapping at `path`.
    pub fn unknown_keys(&self, path: &str, allowed: &[&str], what: &str) -> Vec<Diagnostic> {
        self.index()
            .keys_of(path)
            .iter()
            .filter(|k| !allowed.contains(&k.as_str()))
            .map(|k| {
                let help = did_you_mean(k, allowed.iter().copied())
                    .unwrap_or_else(|| format!("expected one of: {}", allowed.join(", ")));
                Diagnostic::at(
                    &self.path,
                    self.index().key(&location::join(path, k)),
                    format!("unknown key `{k}` in {what}"),
                )
                .with_help(help)
            })
            .collect()
    }

    /// Deserializes the whole file into `T`, mapping serde's error to a diagnostic.
    pub fn deserialize<T: serde::de::DeserializeOwned>(&self) -> Result<T, Diagnostic> {
        serde_yaml::from_str(&self.text).map_err(|e| {
            let location = e.location().map(|l| Location {
                line: l.line(),
                col: l.column(),
            });
            let mut message = e.to_string();
            if let Some(i) = message.rfind(" at line ") {
                message.truncate(i);
            }
            let help = if message.contains("repetition limit") {
                Some("anchors and aliases (`&a`, `*a`) expand to too much data; write the values out".to_string())
            } else {
                None
            };
            Diagnostic::at(&self.path, location, crate::util::suggest::plain_type_names(&message)).with_optional_help(help)
        })
    }
}

fn empty_file(path: &Path, what: &str) -> Diagnostic {
    let help = if what == "pipeline" {
        "a pipeline needs at least `name:` and `steps:`"
    } else {
        "a step spec needs at least `run:`"
    };
    Diagnostic::at(path, None, format!("{what} file is empty")).with_help(help)
}

fn offset_location(prefix: &str, _offset: usize) -> Location {
    let line = prefix.matches('\n').count() + 1;
    let col = prefix
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    Location { line, col }
}
