//! A key-path -> source-location index of a YAML document, built from the event stream.
//! serde gives locations only for its own errors; the semantic checks that come later
//! (unknown kinds, dangling references, cycles) look their locations up here.
//!
//! Aliases are never expanded here, and nesting is capped, so hostile input stays cheap.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

use super::diagnostic::Location;

/// Deepest nesting of mappings and sequences accepted.
pub const MAX_DEPTH: usize = 32;

/// Shape of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeKind {
    /// A mapping.
    Mapping,
    /// A sequence.
    Sequence,
    /// A scalar (or an alias).
    Scalar,
}

/// Locations of keys and values by dotted path (`steps.chunk.with.size`).
#[derive(Debug, Default)]
pub struct LocationIndex {
    keys: HashMap<String, Location>,
    values: HashMap<String, (Location, NodeKind)>,
    children: HashMap<String, Vec<String>>,
    /// Keys that appear twice in one mapping: (path, first, second).
    pub duplicates: Vec<(String, Location, Location)>,
    /// Whether the document had any content at all.
    pub empty: bool,
}

/// A syntax problem found while indexing.
#[derive(Debug)]
pub struct SyntaxError {
    /// Where.
    pub location: Location,
    /// What.
    pub message: String,
}

impl LocationIndex {
    /// Indexes `source`. Fails on YAML syntax errors and on nesting beyond `MAX_DEPTH`.
    pub fn build(source: &str) -> Result<Self, SyntaxError> {
        let mut builder = Builder::default();
        let mut parser = Parser::new_from_str(source);
        let result = parser.load(&mut builder, true);
        if let Some(err) = builder.error.take() {
            return Err(err);
        }
        result.map_err(|e| SyntaxError {
            location: loc(e.marker()),
            message: e.info().to_string(),
        })?;
        if builder.documents > 1 {
            return Err(SyntaxError {
                location: builder.second_document.unwrap_or_default(),
                message:
                    "the file holds more than one YAML document (`---`); a pipeline is one document"
                        .into(),
            });
        }
        let mut index = builder.index;
        index.empty = !index.values.contains_key("");
        Ok(index)
    }

    /// Location of the key at `path`, else of its value.
    pub fn key(&self, path: &str) -> Option<Location> {
        self.keys.get(path).copied().or_else(|| self.value(path))
    }

    /// Location of the value at `path`.
    pub fn value(&self, path: &str) -> Option<Location> {
        self.values.get(path).map(|(l, _)| *l)
    }

    /// Shape of the value at `path`.
    pub fn kind(&self, path: &str) -> Option<NodeKind> {
        self.values.get(path).map(|(_, k)| *k)
    }

    /// Keys of the mapping at `path`, in file order.
    pub fn keys_of(&self, path: &str) -> &[String] {
        self.children.get(path).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The location of `path`, else the key of its closest indexed ancestor.
    pub fn nearest(&self, path: &str) -> Option<Location> {
        if let Some(l) = self.value(path).or_else(|| self.keys.get(path).copied()) {
            return Some(l);
        }
        let mut p = path;
        while let Some(i) = p.rfind('.') {
            p = &p[..i];
            if let Some(l) = self.keys.get(p).copied().or_else(|| self.value(p)) {
                return Some(l);
            }
        }
        self.value("")
    }
}

fn loc(m: &Marker) -> Location {
    Location {
        line: m.line(),
        col: m.col() + 1,
    }
}

/// Joins a parent path and a child segment.
pub fn join(parent: &str, child: &str) -> String {
    if parent.is_empty() {
        child.to_string()
    } else {
        format!("{parent}.{child}")
    }
}

enum Frame {
    Mapping {
        path: String,
        pending_key: Option<String>,
    },
    Sequence {
        path: String,
        next: usize,
    },
}

#[derive(Default)]
struct Builder {
    index: LocationIndex,
    stack: Vec<Frame>,
    error: Option<SyntaxError>,
    documents: usize,
    second_document: Option<Location>,
}

impl Builder {
    /// Path of the node that starts now, and whether it is a mapping key.
    fn next_node_path(&mut self) -> (String, bool) {
        match self.stack.last_mut() {
            None => (String::new(), false),
            Some(Frame::Sequence { path, next }) => {
                let p = join(path, &next.to_string());
                *next += 1;
                (p, false)
            }
            Some(Frame::Mapping {
                path, pending_key, ..
            }) => match pending_key.take() {
                Some(key) => (join(path, &key), false),
                None => (path.clone(), true),
            },
        }
    }

    fn record_key(&mut self, key: String, at: Location) {
        if let Some(Frame::Mapping { path, pending_key }) = self.stack.last_mut() {
            let full = join(path, &key);
            // A full path is unique per mapping key, so a repeat is a duplicate key.
            if let Some(first) = self.index.keys.get(&full) {
                self.index.duplicates.push((full, *first, at));
                // Index the duplicate's value under a path of its own, so its children
                // are not mistaken for duplicates of the first copy's children.
                *pending_key = Some(format!("{key}\u{1}{}", self.index.duplicates.len()));
                return;
            }
            match self.index.children.get_mut(path.as_str()) {
                Some(children) => children.push(key.clone()),
                None => {
                    self.index.children.insert(path.clone(), vec![key.clone()]);
                }
            }
            self.index.keys.insert(full, at);
            *pending_key = Some(key);
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        let at = loc(&mark);
        match ev {
            Event::DocumentStart => {
                self.documents += 1;
                if self.documents == 2 {
                    self.second_document = Some(at);
                }
            }
            Event::Scalar(text, ..) => {
                let (path, is_key) = self.next_node_path();
                if is_key {
                    self.record_key(text, at);
                } else {
                    self.index
                        .values
                        .entry(path)
                        .or_insert((at, NodeKind::Scalar));
                }
            }
            Event::Alias(_) => {
                let (path, is_key) = self.next_node_path();
                if is_key {
                    self.record_key("<alias>".into(), at);
                } else {
                    self.index
                        .values
                        .entry(path)
                        .or_insert((at, NodeKind::Scalar));
                }
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let is_map = matches!(ev, Event::MappingStart(..));
                let (path, is_key) = self.next_node_path();
                if self.stack.len() >= MAX_DEPTH {
                    self.error = Some(SyntaxError {
                        location: at,
                        message: format!(
                            "nesting deeper than {MAX_DEPTH} levels; a pipeline never needs this much"
                        ),
                    });
                    return;
                }
                let path = if is_key {
                    // A complex key: index it under a placeholder so nothing collides.
                    self.record_key("<complex key>".into(), at);
                    join(&path, "<complex key>")
                } else {
                    path
                };
                let kind = if is_map {
                    NodeKind::Mapping
                } else {
                    NodeKind::Sequence
                };
                self.index.values.entry(path.clone()).or_insert((at, kind));
                self.stack.push(if is_map {
                    Frame::Mapping {
                        path,
                        pending_key: None,
                    }
                } else {
                    Frame::Sequence { path, next: 0 }
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_keys_and_values() {
        let src = "name: x\nsteps:\n  a:\n    uses: command\n    with: {size: 5}\n";
        let idx = LocationIndex::build(src).unwrap();
        assert_eq!(idx.key("steps.a"), Some(Location { line: 3, col: 3 }));
        assert_eq!(
            idx.value("steps.a.uses"),
            Some(Location { line: 4, col: 11 })
        );
        assert_eq!(
            idx.value("steps.a.with.size"),
            Some(Location { line: 5, col: 18 })
        );
        assert_eq!(idx.keys_of("steps.a"), ["uses", "with"]);
        assert_eq!(idx.kind("steps"), Some(NodeKind::Mapping));
    }

    #[test]
    fn duplicates_and_depth_are_reported() {
        let idx = LocationIndex::build("a: 1\nb: 2\na: 3\n").unwrap();
        assert_eq!(idx.duplicates.len(), 1);
        let deep = format!("{}1{}", "[".repeat(100), "]".repeat(100));
        let err = LocationIndex::build(&deep).unwrap_err();
        assert!(err.message.contains("nesting"));
    }

    #[test]
    fn regression_children_of_a_duplicate_key_are_not_duplicates() {
        let src = "steps:\n  a: {uses: x, with: {run: 1}}\n  a: {uses: y, with: {run: 2}}\n";
        let idx = LocationIndex::build(src).unwrap();
        assert_eq!(idx.duplicates.len(), 1, "{:?}", idx.duplicates);
        assert_eq!(idx.duplicates[0].0, "steps.a");
        assert_eq!(
            idx.value("steps.a.uses"),
            Some(Location { line: 2, col: 13 })
        );
    }

    #[test]
    fn syntax_errors_have_locations() {
        let err = LocationIndex::build("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.location.line >= 1);
    }
}
