//! Where each key sits in a YAML (or JSON) file: key path -> 1-based line.
//!
//! Validation runs on deserialized values, which have no positions; this
//! index lets every problem still name its line.
//!
//! An alias (`timeouts: *t`) stands for its anchor's whole node, so the
//! paths under the anchored node are recorded again under the alias's
//! path, at the alias's line: that is where the copy is used, and a
//! problem in it is named there. A merge key (`<<: *defaults`, or
//! `<<: [*a, *b]`) copies into its own mapping the same way, but weaker:
//! a key written in that mapping keeps its own line, before or after the
//! `<<`, as YAML lets it override the merged one.
//!
//! The same walk finds what the deserializer would refuse without a key
//! path to name: a key given twice in one mapping, and a second document.

use serde_saphyr::granit_parser::{Event, Parser, ScalarStyle};
use std::collections::HashMap;

/// Key path (`services.orders.endpoints[0].addr`) to the line of its key.
#[derive(Debug, Default)]
pub(crate) struct LineIndex {
    lines: HashMap<String, usize>,
    /// Paths that only a merge key brought in; looked at after `lines`.
    merged: HashMap<String, usize>,
    /// Keys given twice in one mapping, in file order.
    duplicates: Vec<Duplicate>,
    /// The line of each document's start (`---`, or its first node).
    documents: Vec<usize>,
    /// The keys of the top-level mapping, as written.
    top: Vec<String>,
}

/// A key given a second time in the same mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Duplicate {
    /// The mapping's path (`services.web.timeouts`; empty at the top).
    pub(crate) parent: String,
    /// The key, as written.
    pub(crate) key: String,
    /// The line of the second key.
    pub(crate) line: usize,
    /// The line of the first.
    pub(crate) first: usize,
}

/// Most paths recorded by copying anchors: a chain of aliases can stand
/// for exponentially many nodes (the "billion laughs"), which the
/// deserializer refuses by its own budget; past this, aliases are not
/// copied and their problems are named at the nearest recorded ancestor.
const COPY_BUDGET: usize = 100_000;

/// Most bytes of paths kept under open anchors, for aliases to copy:
/// anchors nested hundreds deep over one large mapping kept each path
/// once per anchor above it (gigabytes from a file of 200 KB) before the
/// deserializer could refuse the file. Past this, paths are not kept for
/// anchors (an alias then names its problems at the nearest recorded
/// ancestor, as past [`COPY_BUDGET`]).
const ANCHORED_BYTES: usize = 16 << 20;

enum Frame {
    /// A mapping; `key` is set between a key and its value, and `merge`
    /// says that key is `<<`; `seen` holds the keys written so far, with
    /// their lines.
    Map {
        key: Option<String>,
        merge: bool,
        seen: HashMap<String, usize>,
    },
    /// A sequence and the index of its next item; `merge_into` is the
    /// mapping whose `<<` this sequence is the value of.
    Seq {
        next: usize,
        merge_into: Option<String>,
    },
}

/// An open mapping or sequence.
struct Node {
    path: String,
    frame: Frame,
    /// The anchor defined on this node, 0 for none.
    anchor: usize,
    /// Inside what a merge key brought in: its paths are weak.
    weak: bool,
}

/// Where a value node goes: its path, and whether it is merged in.
struct Slot {
    path: String,
    weak: bool,
}

/// The walk over the parser's events.
#[derive(Default)]
struct Builder {
    index: LineIndex,
    stack: Vec<Node>,
    /// Anchor id -> the paths under its node, relative to it (`.a`, `[0]`).
    anchors: HashMap<usize, Vec<String>>,
    /// Anchored scalars' values, for an alias used as a mapping key.
    scalars: HashMap<usize, String>,
    copied: usize,
    /// Bytes of the paths in `anchors` (see [`ANCHORED_BYTES`]).
    anchored: usize,
}

impl LineIndex {
    /// Builds the index; a file that does not parse gives the index of
    /// what comes before its error (the deserializer reports the syntax
    /// error with its own position).
    pub(crate) fn build(text: &str) -> LineIndex {
        Builder::walk(text).index
    }
}

impl Builder {
    /// The walk over `text`'s events (see [`LineIndex::build`]).
    fn walk(text: &str) -> Builder {
        let mut b = Builder::default();
        for item in Parser::new_from_str(text) {
            let Ok((event, span)) = item else { break };
            let line = span.start.line();
            match event {
                Event::Scalar(value, style, anchor, _) => {
                    if anchor != 0 {
                        b.scalars.insert(anchor, value.to_string());
                        b.anchors.insert(anchor, Vec::new());
                    }
                    let merge = style == ScalarStyle::Plain && value == "<<";
                    if !b.key(&value, merge, line) {
                        b.child(line);
                    }
                }
                Event::Alias(id) => {
                    let name = b.scalars.get(&id).cloned().unwrap_or_else(|| "*".into());
                    if !b.key(&name, false, line) {
                        let slot = b.child(line);
                        b.copy(id, &slot, line);
                    }
                }
                Event::MappingStart(_, anchor, _) => {
                    let slot = b.child(line);
                    b.open(
                        slot,
                        anchor,
                        Frame::Map {
                            key: None,
                            merge: false,
                            seen: HashMap::new(),
                        },
                    );
                }
                Event::SequenceStart(_, anchor, _) => {
                    // `<<: [*a, *b]`: each item merges into the mapping.
                    let merge_into = match b.stack.last() {
                        Some(Node {
                            path,
                            frame: Frame::Map { merge: true, .. },
                            ..
                        }) => Some(path.clone()),
                        _ => None,
                    };
                    let slot = b.child(line);
                    let frame = Frame::Seq {
                        next: 0,
                        merge_into,
                    };
                    b.open(slot, anchor, frame);
                }
                Event::MappingEnd | Event::SequenceEnd => {
                    b.stack.pop();
                }
                Event::DocumentStart(..) => b.index.documents.push(line),
                _ => {}
            }
        }
        b
    }
}

impl LineIndex {
    /// The keys of the top-level mapping, as written (up to a syntax
    /// error, if the file has one).
    pub(crate) fn top_level_keys(&self) -> &[String] {
        &self.top
    }

    /// Keys given twice in one mapping, in file order.
    pub(crate) fn duplicates(&self) -> &[Duplicate] {
        &self.duplicates
    }

    /// The line where each document starts; more than one: the file is a
    /// stream of documents, not one config.
    pub(crate) fn documents(&self) -> &[usize] {
        &self.documents
    }

    /// The line of `path`, or of its nearest ancestor that has one.
    pub(crate) fn line_of(&self, path: &str) -> Option<usize> {
        let mut p = path;
        loop {
            if let Some(line) = self.lines.get(p).or_else(|| self.merged.get(p)) {
                return Some(*line);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }
}

impl Builder {
    /// Takes `name` as the next key if a mapping waits for one. A key
    /// seen before in the same mapping is a duplicate (merge keys aside:
    /// `<<` may be given more than once).
    fn key(&mut self, name: &str, merge: bool, line: usize) -> bool {
        let top = self.stack.len() == 1;
        let Some(Node {
            path,
            frame:
                Frame::Map {
                    key: key @ None,
                    merge: m,
                    seen,
                },
            weak,
            ..
        }) = self.stack.last_mut()
        else {
            return false;
        };
        if top {
            self.index.top.push(name.to_owned());
        }
        if !merge {
            match seen.get(name) {
                Some(first) => self.index.duplicates.push(Duplicate {
                    parent: path.clone(),
                    key: name.to_owned(),
                    line,
                    first: *first,
                }),
                None => {
                    seen.insert(name.to_owned(), line);
                }
            }
        }
        let full = join_key(path, name);
        *key = Some(full.clone());
        *m = merge;
        let weak = *weak;
        self.record(full, line, weak);
        true
    }

    /// Where the next value node goes, advancing its parent past it (and
    /// recording a sequence item's line).
    fn child(&mut self, line: usize) -> Slot {
        let Some(node) = self.stack.last_mut() else {
            return Slot {
                path: String::new(),
                weak: false,
            };
        };
        let weak = node.weak;
        match &mut node.frame {
            Frame::Map { key, merge, .. } => {
                let path = key.take().unwrap_or_default();
                if std::mem::take(merge) {
                    // The value of `<<` fills the mapping itself.
                    let path = node.path.clone();
                    return Slot { path, weak: true };
                }
                Slot { path, weak }
            }
            Frame::Seq { next, merge_into } => {
                let full = format!("{}[{next}]", node.path);
                *next += 1;
                let merge_into = merge_into.clone();
                self.record(full.clone(), line, weak);
                match merge_into {
                    Some(path) => Slot { path, weak: true },
                    None => Slot { path: full, weak },
                }
            }
        }
    }

    fn open(&mut self, slot: Slot, anchor: usize, frame: Frame) {
        if anchor != 0 {
            self.anchors.insert(anchor, Vec::new());
        }
        self.stack.push(Node {
            path: slot.path,
            frame,
            anchor,
            weak: slot.weak,
        });
    }

    /// Records the paths under anchor `id` again under `slot`, at `line`.
    fn copy(&mut self, id: usize, slot: &Slot, line: usize) {
        if self.copied >= COPY_BUDGET {
            return;
        }
        let Some(relative) = self.anchors.get(&id).cloned() else {
            return;
        };
        for rel in relative {
            if self.copied >= COPY_BUDGET {
                return;
            }
            self.copied += 1;
            let full = if slot.path.is_empty() {
                rel.trim_start_matches('.').to_owned()
            } else {
                format!("{}{rel}", slot.path)
            };
            self.record(full, line, slot.weak);
        }
    }

    /// Records `path` (the first line seen wins), and adds it to every
    /// open anchored node it is under, so an alias of one copies it too.
    fn record(&mut self, path: String, line: usize, weak: bool) {
        for node in self.stack.iter().filter(|n| n.anchor != 0) {
            let rel = if node.path.is_empty() {
                if path.starts_with('[') {
                    path.clone()
                } else {
                    format!(".{path}")
                }
            } else {
                match path.strip_prefix(node.path.as_str()) {
                    Some(rel) if rel.starts_with(['.', '[']) => rel.to_owned(),
                    _ => continue,
                }
            };
            if self.anchored + rel.len() > ANCHORED_BYTES {
                continue;
            }
            if let Some(list) = self.anchors.get_mut(&node.anchor) {
                self.anchored += rel.len();
                list.push(rel);
            }
        }
        let map = if weak {
            &mut self.index.merged
        } else {
            &mut self.index.lines
        };
        map.entry(path).or_insert(line);
    }
}

/// A key as a path segment: `""` for the empty key, which would
/// otherwise leave a bare `services.` (what `check-config` shows).
pub(crate) fn segment(key: &str) -> &str {
    if key.is_empty() {
        "\"\""
    } else {
        key
    }
}

fn join_key(parent: &str, key: &str) -> String {
    let key = segment(key);
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_and_flow_styles_have_lines() {
        let text = "admin: 127.0.0.1:1\nservices:\n  orders:\n    endpoints:\n      - { addr: 127.0.0.1:2 }\n      - addr: 127.0.0.1:3\n        weight: 2\n";
        let index = LineIndex::build(text);
        assert_eq!(index.line_of("admin"), Some(1));
        assert_eq!(index.line_of("services.orders"), Some(3));
        assert_eq!(index.line_of("services.orders.endpoints[0].addr"), Some(5));
        assert_eq!(index.line_of("services.orders.endpoints[1]"), Some(6));
        assert_eq!(
            index.line_of("services.orders.endpoints[1].weight"),
            Some(7)
        );
        // Unknown children fall back to the nearest known ancestor.
        assert_eq!(index.line_of("services.orders.split.v9"), Some(3));
    }

    #[test]
    fn json_has_lines_too() {
        let text = "{\n  \"services\": {\n    \"a\": {\"endpoints\": []}\n  }\n}\n";
        let index = LineIndex::build(text);
        assert_eq!(index.line_of("services.a.endpoints"), Some(3));
    }

    /// An alias is a whole value: the key after it is a key again, and
    /// the anchor's keys are found under the alias, at its line.
    #[test]
    fn keys_after_an_alias_keep_their_lines() {
        let text = "\
services:
  a:
    timeouts: &t { connect: 1s, request: 5s }
    endpoints: [{ addr: 127.0.0.1:1 }]
  b:
    timeouts: *t
    endpoints:
      - addr: 127.0.0.1:2
      - addr: 127.0.0.1:3
        weight: 0
    lb: *lb
";
        let index = LineIndex::build(text);
        assert_eq!(index.line_of("services.b.endpoints[1].weight"), Some(10));
        assert_eq!(index.line_of("services.b.endpoints"), Some(7));
        assert_eq!(index.line_of("services.a.timeouts.connect"), Some(3));
        assert_eq!(index.line_of("services.b.timeouts.request"), Some(6));
        // An alias of no anchor (the deserializer refuses it) is a value.
        assert_eq!(index.line_of("services.b.lb"), Some(11));
    }

    /// A merge key's keys are found at the `<<` line, and a key written
    /// in the mapping itself, before or after it, at its own line.
    #[test]
    fn merge_keys_have_lines() {
        let text = "\
defaults: &d
  timeouts: { connect: 1s }
  lb: round_robin
extra: &e { protocol: http2 }
services:
  a:
    lb: p2c_ewma
    <<: *d
    endpoints:
      - addr: 127.0.0.1:1
        weight: 0
  b:
    <<: [*d, *e]
    timeouts: { request: 0s }
    endpoints: []
";
        let index = LineIndex::build(text);
        assert_eq!(index.line_of("services.a.timeouts.connect"), Some(8));
        assert_eq!(index.line_of("services.a.lb"), Some(7));
        assert_eq!(index.line_of("services.a.endpoints[0].weight"), Some(11));
        assert_eq!(index.line_of("services.b.protocol"), Some(13));
        assert_eq!(index.line_of("services.b.timeouts.request"), Some(14));
        assert_eq!(index.line_of("services.b.endpoints"), Some(15));
    }

    /// Aliases of aliases are copied, within a budget.
    #[test]
    fn nested_aliases_are_copied_within_a_budget() {
        let text = "a: &a { x: 1 }\nb: &b { y: *a }\nc:\n  z: *b\n";
        let index = LineIndex::build(text);
        assert_eq!(index.line_of("c.z.y.x"), Some(4));
        let mut bomb = String::from("l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n");
        for i in 1..12 {
            let p = i - 1;
            bomb += &format!("l{i}: &l{i} [*l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}]\n");
        }
        let index = LineIndex::build(&bomb);
        assert!(index.lines.len() + index.merged.len() <= COPY_BUDGET + 1_000);
    }

    /// Anchors nested deep over one large mapping keep each of its paths
    /// once per anchor above it: within a budget of bytes, not the
    /// gigabytes a 200 KB file used to take.
    #[test]
    fn paths_kept_for_nested_anchors_are_bounded() {
        let depth = 100;
        let mut text = String::new();
        for i in 0..depth {
            text += &format!("{{a: &x{i} ");
        }
        text += "{";
        for k in 0..20_000 {
            text += &format!("k{k}: 1, ");
        }
        text += "z: 1}";
        text += &"}".repeat(depth);
        let b = Builder::walk(&text);
        let kept: usize = b.anchors.values().flatten().map(String::len).sum();
        assert!(kept <= ANCHORED_BYTES, "{kept} bytes kept");
        // The paths themselves are all indexed.
        let deepest = format!("{}k19999", "a.".repeat(depth));
        assert!(b.index.line_of(&deepest).is_some(), "{deepest}");
    }
}
