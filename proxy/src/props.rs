//! Property tests of everything the proxy itself parses from the network
//! (the HTTP grammar is hyper's): `Host` against the target, `Connection`
//! and the hop-by-hop set, `TE`, `traceparent`, `x-almond-*` headers and
//! the sticky-split hash. Arbitrary input never panics, and each parser
//! keeps its promise. 256 cases each (proptest's default), so `cargo test`
//! runs them in bounded time.

use crate::edge::trust::{check_host, strip_almond_headers};
use crate::headers::to_upstream;
use crate::observe::trace::Context;
use crate::pipeline::split::Split;
use almond_config::Protocol;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::Request;
use proptest::prelude::*;
use std::collections::BTreeMap;

/// Header names: the ones the proxy interprets, and ordinary ones.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("connection".to_owned()),
        Just("keep-alive".to_owned()),
        Just("te".to_owned()),
        Just("transfer-encoding".to_owned()),
        Just("upgrade".to_owned()),
        Just("proxy-connection".to_owned()),
        Just("x-almond-subset".to_owned()),
        Just("x-almond-error".to_owned()),
        Just("host".to_owned()),
        Just("traceparent".to_owned()),
        "[a-z][a-z0-9-]{0,12}",
    ]
}

/// Header values: token lists (as `Connection` carries) and noise.
fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[a-zA-Z0-9, -]{0,40}".prop_map(String::into_bytes),
        proptest::collection::vec(0x20u8..0x7f, 0..60),
        proptest::collection::vec(any::<u8>(), 0..60),
    ]
}

fn headers() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    proptest::collection::vec((name(), value()), 0..12)
}

fn request(uri: &str, pairs: &[(String, Vec<u8>)]) -> Request<()> {
    let mut req = Request::new(());
    if let Ok(uri) = uri.parse() {
        *req.uri_mut() = uri;
    }
    for (n, v) in pairs {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(n.as_bytes()),
            HeaderValue::from_bytes(v),
        ) {
            req.headers_mut().append(n, v);
        }
    }
    req
}

proptest! {
    #[test]
    fn hop_by_hop_headers_never_reach_the_upstream(
        pairs in headers(),
        h2 in any::<bool>(),
        uri in prop_oneof![Just("/x".to_owned()), Just("http://svc:80/y".to_owned())],
    ) {
        let mut req = request(&uri, &pairs);
        // Names `Connection` lists are hop-by-hop too.
        let named: Vec<String> = req
            .headers()
            .get_all("connection")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(',').map(|t| t.trim().to_ascii_lowercase()).collect::<Vec<_>>())
            .filter(|t| !t.is_empty())
            .collect();
        let kept: Vec<(String, Vec<u8>)> = pairs.clone();
        let protocol = if h2 { Protocol::Http2 } else { Protocol::Http1 };
        to_upstream(&mut req, protocol, false);
        for gone in ["connection", "keep-alive", "proxy-connection", "transfer-encoding",
                     "upgrade", "x-almond-subset"] {
            prop_assert!(req.headers().get(gone).is_none(), "{} survived", gone);
        }
        if let Some(te) = req.headers().get("te") {
            prop_assert!(h2 && te == "trailers", "te: {:?}", te);
        }
        for n in &named {
            if n != "te" && n != "host" {
                prop_assert!(req.headers().get(n.as_str()).is_none(), "{} (named) survived", n);
            }
        }
        // Everything else arrives.
        for (n, v) in kept {
            let ordinary = !named.contains(&n)
                && n.starts_with(|c: char| c.is_ascii_lowercase())
                && !["connection", "keep-alive", "te", "transfer-encoding", "upgrade",
                     "proxy-connection", "x-almond-subset", "host"].contains(&n.as_str());
            if ordinary && HeaderValue::from_bytes(&v).is_ok() {
                let values: Vec<&[u8]> =
                    req.headers().get_all(n.as_str()).iter().map(|x| x.as_bytes()).collect();
                prop_assert!(values.contains(&v.as_slice()), "{} lost", n);
            }
        }
        // HTTP/1.1 upstreams get one Host; HTTP/2 ones an authority.
        if h2 {
            prop_assert!(req.uri().authority().is_some());
        } else if uri.starts_with("http://") {
            prop_assert_eq!(req.headers().get_all("host").iter().count(), 1);
            prop_assert_eq!(&req.headers()["host"], "svc:80");
        }
    }

    #[test]
    fn one_host_that_agrees_or_refused(
        hosts in proptest::collection::vec("[a-zA-Z0-9.:-]{1,20}", 0..3),
        authority in proptest::option::of("[a-z0-9.-]{1,12}(:[0-9]{1,4})?"),
    ) {
        let uri = authority.as_ref().map_or("/p".to_owned(), |a| format!("http://{a}/p"));
        let pairs: Vec<(String, Vec<u8>)> =
            hosts.iter().map(|h| ("host".to_owned(), h.clone().into_bytes())).collect();
        let req = request(&uri, &pairs);
        let n = req.headers().get_all("host").iter().count();
        let agrees = match (req.uri().authority(), req.headers().get("host")) {
            (Some(a), Some(h)) => a.as_str().eq_ignore_ascii_case(h.to_str().unwrap_or("\u{0}")),
            _ => true,
        };
        let named = n == 1 || req.uri().authority().is_some();
        // A host (no `:` in these) and at most one `:` before digits.
        let valid = hosts.first().is_none_or(|h| match h.split_once(':') {
            None => true,
            Some((_, port)) => port.bytes().all(|b| b.is_ascii_digit()),
        });
        prop_assert_eq!(check_host(&req).is_ok(), n <= 1 && agrees && named && valid);
    }

    #[test]
    fn untrusted_almond_headers_are_all_removed(pairs in headers()) {
        let mut req = request("/", &pairs);
        let others = req.headers().keys().filter(|k| !k.as_str().starts_with("x-almond-")).count();
        strip_almond_headers(req.headers_mut());
        prop_assert!(req.headers().keys().all(|k| !k.as_str().starts_with("x-almond-")));
        prop_assert_eq!(req.headers().keys().count(), others);
    }

    #[test]
    fn any_traceparent_gives_one_well_formed_traceparent(raw in value(), valid in any::<bool>(),
                                                         trace in 1u128.., parent in 1u64..) {
        let mut headers = HeaderMap::new();
        let sent = if valid {
            format!("00-{trace:032x}-{parent:016x}-01").into_bytes()
        } else {
            raw
        };
        if let Ok(v) = HeaderValue::from_bytes(&sent) {
            headers.insert("traceparent", v);
        }
        let ctx = Context::read(&mut headers, 0.0);
        ctx.stamp().insert(&mut headers);
        let out = headers["traceparent"].as_bytes().to_vec();
        prop_assert_eq!(out.len(), 55);
        prop_assert_eq!(&out[..3], b"00-");
        prop_assert!(out.iter().all(|b| b.is_ascii_hexdigit() || *b == b'-'));
        if valid {
            prop_assert_eq!(ctx.trace_id, trace);
            prop_assert_eq!(ctx.parent_id, Some(parent));
        }
        prop_assert_ne!(ctx.trace_id, 0);
    }

    #[test]
    fn sticky_hashing_is_total_and_stable(value in proptest::collection::vec(any::<u8>(), 0..200),
                                          canary in 0u32..=100) {
        let mut weights = BTreeMap::new();
        weights.insert("v1".to_owned(), 100 - canary);
        weights.insert("v2".to_owned(), canary);
        let split = Split::new(&weights, &["v1", "v2"]);
        let first = split.pick(Some(&value));
        prop_assert!(first.is_some_and(|i| i < 2));
        if !value.is_empty() {
            prop_assert_eq!(split.pick(Some(&value)), first);
            if canary == 0 { prop_assert_eq!(first, Some(0)); }
            if canary == 100 { prop_assert_eq!(first, Some(1)); }
        }
    }
}
