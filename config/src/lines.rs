//! Where each key sits in a YAML (or JSON) file: key path -> 1-based line.
//!
//! Validation runs on deserialized values, which have no positions; this
//! index lets every problem still name its line.

use serde_saphyr::granit_parser::{Event, Parser};
use std::collections::HashMap;

/// Key path (`services.orders.endpoints[0].addr`) to the line of its key.
#[derive(Debug, Default)]
pub(crate) struct LineIndex {
    lines: HashMap<String, usize>,
}

enum Frame {
    /// A mapping; `key` is set between a key and its value.
    Map { key: Option<String> },
    /// A sequence and the index of its next item.
    Seq { next: usize },
}

impl LineIndex {
    /// Builds the index; a file that does not parse gives an empty index
    /// (the deserializer reports the syntax error with its own position).
    pub(crate) fn build(text: &str) -> LineIndex {
        let mut index = LineIndex::default();
        let mut stack: Vec<(String, Frame)> = Vec::new();
        for item in Parser::new_from_str(text) {
            let Ok((event, span)) = item else { break };
            let line = span.start.line();
            match event {
                Event::Scalar(value, ..) => {
                    if let Some((path, Frame::Map { key })) = stack.last_mut() {
                        if key.is_none() {
                            let full = join_key(path, &value);
                            index.lines.entry(full.clone()).or_insert(line);
                            *key = Some(full);
                            continue;
                        }
                    }
                    index.child_path(&mut stack, line);
                }
                Event::MappingStart(..) => {
                    let path = index.child_path(&mut stack, line);
                    stack.push((path, Frame::Map { key: None }));
                }
                Event::SequenceStart(..) => {
                    let path = index.child_path(&mut stack, line);
                    stack.push((path, Frame::Seq { next: 0 }));
                }
                Event::MappingEnd | Event::SequenceEnd => {
                    stack.pop();
                }
                _ => {}
            }
        }
        index
    }

    /// The path of a value node at the top of `stack`, recording its line,
    /// and advancing the parent past it.
    fn child_path(&mut self, stack: &mut [(String, Frame)], line: usize) -> String {
        match stack.last_mut() {
            None => String::new(),
            Some((_, Frame::Map { key })) => key.take().unwrap_or_default(),
            Some((path, Frame::Seq { next })) => {
                let full = format!("{path}[{next}]");
                *next += 1;
                self.lines.entry(full.clone()).or_insert(line);
                full
            }
        }
    }

    /// The line of `path`, or of its nearest ancestor that has one.
    pub(crate) fn line_of(&self, path: &str) -> Option<usize> {
        let mut p = path;
        loop {
            if let Some(line) = self.lines.get(p) {
                return Some(*line);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }
}

fn join_key(parent: &str, key: &str) -> String {
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
}
