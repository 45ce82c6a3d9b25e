//! Test support: a real HTTP client (hyper-util legacy), fixture loading,
//! and an order-preserving JSON shape comparison.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// Upper bound for any single HTTP exchange in the tests.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A response, fully read.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.text()))
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    }
    /// `X-Consul-Index`, required.
    pub fn index(&self) -> u64 {
        self.header("x-consul-index")
            .unwrap_or_else(|| panic!("no X-Consul-Index on {} {:?}", self.status, self.text()))
            .parse()
            .unwrap()
    }
}

/// Sends one request with a real HTTP/1.1 client.
pub async fn call(method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::copy_from_slice(body))).unwrap();
    let fut = async {
        let resp = client.request(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        }
    };
    tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("{method} {url} timed out"))
}

pub async fn get(url: &str) -> Reply {
    call("GET", url, &[], b"").await
}

pub async fn get_with(url: &str, headers: &[(&str, &str)]) -> Reply {
    call("GET", url, headers, b"").await
}

pub async fn put(url: &str, body: &[u8]) -> Reply {
    call("PUT", url, &[], body).await
}

pub async fn delete(url: &str) -> Reply {
    call("DELETE", url, &[], b"").await
}

/// `shared/consul/fixtures`, found by walking up from this crate.
pub fn fixtures_dir() -> PathBuf {
    let start = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for dir in start.ancestors() {
        let cand = dir.join("shared").join("consul").join("fixtures");
        if cand.is_dir() {
            return cand;
        }
    }
    panic!(
        "Consul fixtures not found: no `shared/consul/fixtures` directory in any ancestor of {} \
         (CI copies shared/ next to the repository, i.e. ../shared from the workspace root)",
        start.display()
    );
}

pub fn fixture_text(name: &str) -> String {
    let p = fixtures_dir().join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

pub fn fixture_json(name: &str) -> serde_json::Value {
    serde_json::from_str(&fixture_text(name)).unwrap()
}

// ---- order-preserving JSON -----------------------------------------------

/// JSON with object key order preserved (serde_json's `Value` sorts keys).
#[derive(Clone, Debug)]
pub enum J {
    Null,
    Bool,
    Num,
    Str,
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

impl fmt::Display for J {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            J::Null => "null",
            J::Bool => "bool",
            J::Num => "number",
            J::Str => "string",
            J::Arr(_) => "array",
            J::Obj(_) => "object",
        };
        f.write_str(s)
    }
}

struct JVisitor;

impl<'de> Visitor<'de> for JVisitor {
    type Value = J;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<J, E> {
        Ok(J::Bool)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<J, E> {
        Ok(J::Num)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<J, E> {
        Ok(J::Num)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<J, E> {
        Ok(J::Num)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<J, E> {
        Ok(J::Str)
    }
    fn visit_unit<E: de::Error>(self) -> Result<J, E> {
        Ok(J::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<J, E> {
        Ok(J::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<J, A::Error> {
        let mut v = Vec::new();
        while let Some(x) = seq.next_element::<J>()? {
            v.push(x);
        }
        Ok(J::Arr(v))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<J, A::Error> {
        let mut v = Vec::new();
        while let Some((k, x)) = map.next_entry::<String, J>()? {
            v.push((k, x));
        }
        Ok(J::Obj(v))
    }
}

impl<'de> Deserialize<'de> for J {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<J, D::Error> {
        d.deserialize_any(JVisitor)
    }
}

pub fn parse_j(text: &[u8]) -> J {
    serde_json::from_slice(text).unwrap()
}

/// Fields whose JSON objects are maps (data keys, not struct fields).
const MAP_FIELDS: &[&str] = &[
    "Meta",
    "TaggedAddresses",
    "NodeMeta",
    "ServiceMeta",
    "ServiceTaggedAddresses",
];

/// Compares the shape of `actual` with `fixture`: same struct keys in the
/// same order, recursively; same JSON types. Map-typed fields compare each
/// value with the fixture's representative value. Inside tagged-address
/// maps key case is ignored (the fixtures' documented `address`/`port`
/// spelling vs the server's `Address`/`Port`, fixtures/SOURCES.md §1).
pub fn assert_same_shape(fixture: &J, actual: &J, root_is_map: bool) {
    let mut errs = Vec::new();
    compare(fixture, actual, "$", root_is_map, false, &mut errs);
    assert!(
        errs.is_empty(),
        "shape differs from fixture:\n{}",
        errs.join("\n")
    );
}

fn representative(f: &[(String, J)]) -> Option<&J> {
    f.iter()
        .map(|(_, v)| v)
        .find(|v| {
            matches!(v, J::Arr(a) if !a.is_empty()) || matches!(v, J::Obj(o) if !o.is_empty())
        })
        .or_else(|| f.first().map(|(_, v)| v))
}

fn compare(fix: &J, act: &J, path: &str, map_field: bool, ci: bool, errs: &mut Vec<String>) {
    match (fix, act) {
        (J::Obj(f), J::Obj(a)) if map_field => {
            let tagged = path.ends_with("TaggedAddresses");
            if let Some(rep) = representative(f) {
                for (k, av) in a {
                    compare(rep, av, &format!("{path}[{k:?}]"), false, tagged, errs);
                }
            }
        }
        (J::Obj(f), J::Obj(a)) => {
            let norm = |k: &str| if ci { k.to_lowercase() } else { k.to_string() };
            let fk: Vec<String> = f.iter().map(|(k, _)| norm(k)).collect();
            let ak: Vec<String> = a.iter().map(|(k, _)| norm(k)).collect();
            if fk != ak {
                errs.push(format!(
                    "{path}: keys differ\n  fixture: {fk:?}\n  actual:  {ak:?}"
                ));
                return;
            }
            for ((k, fv), (_, av)) in f.iter().zip(a) {
                compare(
                    fv,
                    av,
                    &format!("{path}.{k}"),
                    MAP_FIELDS.contains(&k.as_str()),
                    false,
                    errs,
                );
            }
        }
        (J::Arr(f), J::Arr(a)) => {
            if let Some(f0) = f.first() {
                for (i, av) in a.iter().enumerate() {
                    compare(f0, av, &format!("{path}[{i}]"), false, false, errs);
                }
            }
        }
        (J::Null, J::Null) | (J::Bool, J::Bool) | (J::Num, J::Num) | (J::Str, J::Str) => {}
        (f, a) => errs.push(format!("{path}: fixture has {f}, actual has {a}")),
    }
}

/// Collects all object keys of a `J` tree (struct-field keys only).
pub fn keys_at(j: &J) -> Vec<String> {
    match j {
        J::Obj(o) => o.iter().map(|(k, _)| k.clone()).collect(),
        _ => Vec::new(),
    }
}

/// Raw HTTP/1.1 exchange, to look at header spelling on the wire.
pub async fn raw_request(addr: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf).into_owned()
    };
    tokio::time::timeout(DEADLINE, fut).await.unwrap()
}
