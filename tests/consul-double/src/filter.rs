//! A subset of go-bexpr, the `filter=` language of Consul's list endpoints.
//!
//! Supported: `==`, `!=`, `is empty`, `is not empty`, `in`, `not in`,
//! `contains`, `not contains`, `and`, `or`, `not`, parentheses, selectors
//! with `.name` and `["key"]` parts, double-quoted and backtick strings,
//! numbers and bare words as values. `matches` / `not matches` parse but are
//! rejected at evaluation time with an error (the double has no regex
//! engine).
//!
//! Selectors that pass through a list of objects (e.g. `Checks.Status`)
//! match when **any** element matches, as go-bexpr does.

use std::collections::BTreeMap;

/// A value a selector resolves to.
#[derive(Clone, Debug)]
pub(crate) enum Val {
    Str(String),
    List(Vec<String>),
    Map(BTreeMap<String, String>),
}

/// Something filters run against.
pub(crate) trait Selectable {
    /// Resolves a selector path; `Err` for an unknown selector. A path
    /// through a list yields several values.
    fn select(&self, path: &[String]) -> Result<Vec<Val>, String>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Eq,
    Ne,
    IsEmpty,
    IsNotEmpty,
    Contains,
    NotContains,
    Matches,
    NotMatches,
}

#[derive(Clone, Debug)]
pub(crate) enum Expr {
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Match {
        selector: Vec<String>,
        op: Op,
        value: String,
    },
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(String),
    Dot,
    LBracket,
    RBracket,
    LParen,
    RParen,
    EqEq,
    NotEq,
}

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    while i < chars.len() {
        let c = chars[i];
        match c {
            ' ' | '\t' | '\n' | '\r' => i += 1,
            '(' => {
                out.push(Tok::LParen);
                i += 1;
            }
            ')' => {
                out.push(Tok::RParen);
                i += 1;
            }
            '[' => {
                out.push(Tok::LBracket);
                i += 1;
            }
            ']' => {
                out.push(Tok::RBracket);
                i += 1;
            }
            '.' if !chars.get(i + 1).is_some_and(|c| c.is_ascii_digit()) => {
                out.push(Tok::Dot);
                i += 1;
            }
            '=' if chars.get(i + 1) == Some(&'=') => {
                out.push(Tok::EqEq);
                i += 2;
            }
            '!' if chars.get(i + 1) == Some(&'=') => {
                out.push(Tok::NotEq);
                i += 2;
            }
            '"' => {
                i += 1;
                let mut v = String::new();
                loop {
                    let Some(&c) = chars.get(i) else {
                        return Err("unterminated string literal".into());
                    };
                    i += 1;
                    match c {
                        '"' => break,
                        '\\' => {
                            let Some(&e) = chars.get(i) else {
                                return Err("unterminated string literal".into());
                            };
                            i += 1;
                            v.push(match e {
                                'n' => '\n',
                                't' => '\t',
                                'r' => '\r',
                                other => other,
                            });
                        }
                        other => v.push(other),
                    }
                }
                out.push(Tok::Str(v));
            }
            '`' => {
                i += 1;
                let mut v = String::new();
                loop {
                    let Some(&c) = chars.get(i) else {
                        return Err("unterminated raw string literal".into());
                    };
                    i += 1;
                    if c == '`' {
                        break;
                    }
                    v.push(c);
                }
                out.push(Tok::Str(v));
            }
            c if c.is_ascii_digit() || c == '-' || c == '.' => {
                let start = i;
                i += 1;
                while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                    i += 1;
                }
                out.push(Tok::Num(chars[start..i].iter().collect()));
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                out.push(Tok::Ident(chars[start..i].iter().collect()));
            }
            other => return Err(format!("unexpected character {other:?} at offset {i}")),
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

fn is_kw(t: Option<&Tok>, kw: &str) -> bool {
    matches!(t, Some(Tok::Ident(s)) if s == kw)
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }
    fn peek_at(&self, n: usize) -> Option<&Tok> {
        self.toks.get(self.pos + n)
    }
    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn or(&mut self) -> Result<Expr, String> {
        let mut left = self.and()?;
        while is_kw(self.peek(), "or") {
            self.pos += 1;
            let right = self.and()?;
            left = Expr::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, String> {
        let mut left = self.unary()?;
        while is_kw(self.peek(), "and") {
            self.pos += 1;
            let right = self.unary()?;
            left = Expr::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, String> {
        if is_kw(self.peek(), "not") {
            self.pos += 1;
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        if self.peek() == Some(&Tok::LParen) {
            self.pos += 1;
            let e = self.or()?;
            if self.next() != Some(Tok::RParen) {
                return Err("expected ')'".into());
            }
            return Ok(e);
        }
        self.matcher()
    }

    /// A selector: `Name(.Name | ["key"])*`.
    fn selector(&mut self) -> Result<Vec<String>, String> {
        let mut path = Vec::new();
        match self.next() {
            Some(Tok::Ident(s)) => path.push(s),
            other => return Err(format!("expected a selector, found {other:?}")),
        }
        loop {
            match self.peek() {
                Some(Tok::Dot) => {
                    self.pos += 1;
                    match self.next() {
                        Some(Tok::Ident(s)) => path.push(s),
                        other => return Err(format!("expected a name after '.', found {other:?}")),
                    }
                }
                Some(Tok::LBracket) => {
                    self.pos += 1;
                    match self.next() {
                        Some(Tok::Str(s)) => path.push(s),
                        other => return Err(format!("expected a string key, found {other:?}")),
                    }
                    if self.next() != Some(Tok::RBracket) {
                        return Err("expected ']'".into());
                    }
                }
                _ => break,
            }
        }
        Ok(path)
    }

    /// A value: string, number, or bare word/selector-like text.
    fn value(&mut self) -> Result<String, String> {
        match self.peek() {
            Some(Tok::Str(_)) | Some(Tok::Num(_)) => match self.next() {
                Some(Tok::Str(s)) | Some(Tok::Num(s)) => Ok(s),
                _ => Err("expected a value".into()),
            },
            Some(Tok::Ident(_)) => Ok(self.selector()?.join(".")),
            other => Err(format!("expected a value, found {other:?}")),
        }
    }

    fn matcher(&mut self) -> Result<Expr, String> {
        // `<value> [not] in <selector>` form?
        let value_first = match self.peek() {
            Some(Tok::Str(_)) | Some(Tok::Num(_)) => true,
            Some(Tok::Ident(_)) => {
                // scan past a selector-like run to see whether `in` follows
                let save = self.pos;
                let _ = self.selector();
                let r = is_kw(self.peek(), "in")
                    || (is_kw(self.peek(), "not") && is_kw(self.peek_at(1), "in"));
                self.pos = save;
                r
            }
            _ => false,
        };
        if value_first {
            let value = self.value()?;
            let negate = if is_kw(self.peek(), "not") {
                self.pos += 1;
                true
            } else {
                false
            };
            if !is_kw(self.peek(), "in") {
                return Err("expected 'in' after a value".into());
            }
            self.pos += 1;
            let selector = self.selector()?;
            let op = if negate {
                Op::NotContains
            } else {
                Op::Contains
            };
            return Ok(Expr::Match {
                selector,
                op,
                value,
            });
        }
        let selector = self.selector()?;
        let t = self.next();
        let (op, needs_value) = match t {
            Some(Tok::EqEq) => (Op::Eq, true),
            Some(Tok::NotEq) => (Op::Ne, true),
            Some(Tok::Ident(ref s)) if s == "is" => {
                if is_kw(self.peek(), "not") {
                    self.pos += 1;
                    if !is_kw(self.next().as_ref(), "empty") {
                        return Err("expected 'empty' after 'is not'".into());
                    }
                    (Op::IsNotEmpty, false)
                } else if is_kw(self.next().as_ref(), "empty") {
                    (Op::IsEmpty, false)
                } else {
                    return Err("expected 'empty' after 'is'".into());
                }
            }
            Some(Tok::Ident(ref s)) if s == "contains" => (Op::Contains, true),
            Some(Tok::Ident(ref s)) if s == "matches" => (Op::Matches, true),
            Some(Tok::Ident(ref s)) if s == "not" => match self.next() {
                Some(Tok::Ident(s)) if s == "contains" => (Op::NotContains, true),
                Some(Tok::Ident(s)) if s == "matches" => (Op::NotMatches, true),
                other => return Err(format!("unexpected {other:?} after 'not'")),
            },
            other => return Err(format!("expected a match operator, found {other:?}")),
        };
        let value = if needs_value {
            self.value()?
        } else {
            String::new()
        };
        Ok(Expr::Match {
            selector,
            op,
            value,
        })
    }
}

/// Parses a filter expression. Errors carry Consul's prefix
/// (`Failed to create boolean expression evaluator: ...`).
pub(crate) fn parse(s: &str) -> Result<Expr, String> {
    let wrap = |e: String| format!("Failed to create boolean expression evaluator: {e}");
    let toks = tokenize(s).map_err(wrap)?;
    if toks.is_empty() {
        return Err(wrap("empty expression".into()));
    }
    let mut p = Parser { toks, pos: 0 };
    let e = p.or().map_err(wrap)?;
    if p.pos != p.toks.len() {
        return Err(wrap(format!(
            "unexpected trailing input {:?}",
            p.toks.get(p.pos)
        )));
    }
    Ok(e)
}

/// Checks every selector of `e` against `probe` (so an invalid selector is
/// reported even when the list to filter is empty).
pub(crate) fn validate(e: &Expr, probe: &dyn Selectable) -> Result<(), String> {
    match e {
        Expr::And(a, b) | Expr::Or(a, b) => {
            validate(a, probe)?;
            validate(b, probe)
        }
        Expr::Not(a) => validate(a, probe),
        Expr::Match { selector, op, .. } => {
            if matches!(op, Op::Matches | Op::NotMatches) {
                return Err(
                    "Failed to create boolean expression evaluator: the test double does not support 'matches'"
                        .into(),
                );
            }
            probe
                .select(selector)
                .map(|_| ())
                .map_err(|e| format!("Failed to create boolean expression evaluator: {e}"))
        }
    }
}

fn match_one(v: &Val, op: Op, value: &str) -> bool {
    match op {
        Op::Eq => match v {
            Val::Str(s) => s == value,
            Val::List(l) => l.iter().any(|x| x == value),
            Val::Map(_) => false,
        },
        Op::Ne => !match_one(v, Op::Eq, value),
        Op::IsEmpty => match v {
            Val::Str(s) => s.is_empty(),
            Val::List(l) => l.is_empty(),
            Val::Map(m) => m.is_empty(),
        },
        Op::IsNotEmpty => !match_one(v, Op::IsEmpty, value),
        Op::Contains => match v {
            Val::Str(s) => s.contains(value),
            Val::List(l) => l.iter().any(|x| x == value),
            Val::Map(m) => m.contains_key(value),
        },
        Op::NotContains => !match_one(v, Op::Contains, value),
        Op::Matches | Op::NotMatches => false,
    }
}

/// Evaluates `e` against `item`.
pub(crate) fn eval(e: &Expr, item: &dyn Selectable) -> Result<bool, String> {
    Ok(match e {
        Expr::And(a, b) => eval(a, item)? && eval(b, item)?,
        Expr::Or(a, b) => eval(a, item)? || eval(b, item)?,
        Expr::Not(a) => !eval(a, item)?,
        Expr::Match {
            selector,
            op,
            value,
        } => {
            let vals = item.select(selector)?;
            vals.iter().any(|v| match_one(v, *op, value))
        }
    })
}

/// Resolves `path` inside a map-typed field: `[]` → the whole map, `[k]` →
/// the value (missing key → empty string), deeper → error.
pub(crate) fn select_map(
    m: &BTreeMap<String, String>,
    path: &[String],
    name: &str,
) -> Result<Vec<Val>, String> {
    match path {
        [] => Ok(vec![Val::Map(m.clone())]),
        [k] => Ok(vec![Val::Str(m.get(k).cloned().unwrap_or_default())]),
        _ => Err(format!("Selector {name:?} is not valid")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Item {
        tags: Vec<String>,
        meta: BTreeMap<String, String>,
        statuses: Vec<String>,
        port: u16,
    }

    impl Selectable for Item {
        fn select(&self, path: &[String]) -> Result<Vec<Val>, String> {
            let p: Vec<&str> = path.iter().map(String::as_str).collect();
            match p.as_slice() {
                ["Service", "Tags"] => Ok(vec![Val::List(self.tags.clone())]),
                ["Service", "Port"] => Ok(vec![Val::Str(self.port.to_string())]),
                ["Service", "Meta", rest @ ..] => {
                    let rest: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
                    select_map(&self.meta, &rest, "Service.Meta")
                }
                ["Checks", "Status"] => {
                    Ok(self.statuses.iter().map(|s| Val::Str(s.clone())).collect())
                }
                _ => Err(format!("Selector {:?} is not valid", path.join("."))),
            }
        }
    }

    fn item() -> Item {
        Item {
            tags: vec!["primary".into(), "v1".into()],
            meta: [("version".to_string(), "v1".to_string())].into(),
            statuses: vec!["passing".into(), "warning".into()],
            port: 8080,
        }
    }

    fn check(expr: &str) -> bool {
        let e = parse(expr).unwrap_or_else(|e| panic!("{expr}: {e}"));
        eval(&e, &item()).unwrap_or_else(|e| panic!("{expr}: {e}"))
    }

    #[test]
    fn operators() {
        assert!(check(r#""primary" in Service.Tags"#));
        assert!(check(r#"primary in Service.Tags"#));
        assert!(!check(r#""canary" in Service.Tags"#));
        assert!(check(r#""canary" not in Service.Tags"#));
        assert!(check(r#"Service.Tags contains "v1""#));
        assert!(check(r#"Service.Tags not contains "v2""#));
        assert!(check(r#"Service.Meta.version == v1"#));
        assert!(check(r#"Service.Meta["version"] == "v1""#));
        assert!(check(r#"Service.Meta.version != `v2`"#));
        assert!(check(r#"Service.Meta.missing is empty"#));
        assert!(check(r#"Service.Tags is not empty"#));
        assert!(check(r#"Service.Port == 8080"#));
        assert!(check(r#"Checks.Status == warning"#));
        assert!(check(r#"Checks.Status != passing"#));
        assert!(!check(r#"Checks.Status == critical"#));
        assert!(check(r#""version" in Service.Meta"#));
    }

    #[test]
    fn logic_and_precedence() {
        assert!(check(
            r#"("canary" in Service.Tags or Service.Meta.version == v1) and not Checks.Status == critical"#
        ));
        // and binds tighter than or
        assert!(check(
            r#"Service.Port == 1 and Service.Port == 2 or Service.Port == 8080"#
        ));
        assert!(!check(
            r#"Service.Port == 1 and (Service.Port == 2 or Service.Port == 8080)"#
        ));
        assert!(check(r#"not not "v1" in Service.Tags"#));
    }

    #[test]
    fn errors() {
        assert!(parse("Service.Tags ==").is_err());
        assert!(parse("(Service.Port == 1").is_err());
        assert!(parse("").is_err());
        assert!(parse(r#"Service.Port == 1 Service"#).is_err());
        let e = parse("Service.Nope == 1").unwrap();
        assert!(validate(&e, &item()).is_err());
        let e = parse(r#"Service.Meta.x matches "a.*""#).unwrap();
        assert!(validate(&e, &item()).is_err());
    }
}
