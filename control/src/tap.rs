//! Tap: `GET /v1/services/{svc}/tap`, one live stream of request summaries
//! for a service, merged line by line from every proxy's admin `/tap` (each
//! proxy filters and caps its own). A proxy whose stream fails or ends is
//! named in an `error` line; the merged stream ends when every one has.

use almond_config::tap::Filter;
use almond_net::percent_encode;
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::task::JoinSet;

/// Lines waiting for a slow client, at most; a proxy's stream waits
/// (its own queue then fills, and the proxy drops and counts).
const QUEUE: usize = 1024;

/// An empty line after this long without one: a client that went away is
/// noticed and every proxy stream it held is closed.
const HEARTBEAT: Duration = Duration::from_secs(5);

/// Longest line accepted from a proxy (a summary with headers is a few KiB).
const MAX_LINE: usize = 64 * 1024;

/// How long a proxy has to answer the tap request's head.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The query each proxy is sent: the filter, with `service` set.
pub fn proxy_query(service: &str, query: &HashMap<String, String>) -> Result<String, String> {
    let mut query = query.clone();
    query.insert("service".to_owned(), service.to_owned());
    Filter::from_query(&query)?;
    let mut pairs: Vec<_> = query.iter().collect();
    pairs.sort();
    Ok(pairs
        .iter()
        .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&"))
}

/// Opens `/tap?{query}` on every proxy in `admins`, presenting `token`
/// when given, and merges their lines; a proxy's stream that fails or ends
/// adds `{"proxy": ADMIN, "error": WHY}`.
pub fn merge(
    admins: Vec<String>,
    query: String,
    token: Option<&[u8]>,
    slot: OwnedSemaphorePermit,
) -> TapStream {
    let authorization = token.and_then(|t| {
        let mut value = b"Bearer ".to_vec();
        value.extend_from_slice(t);
        let mut value = http::HeaderValue::from_bytes(&value).ok()?;
        value.set_sensitive(true);
        Some(value)
    });
    let (tx, rx) = mpsc::channel(QUEUE);
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut tasks = JoinSet::new();
    for admin in admins {
        let (client, tx, authorization) = (client.clone(), tx.clone(), authorization.clone());
        let url = format!("http://{admin}/tap?{query}");
        tasks.spawn(async move {
            let why = match relay(&client, &url, authorization, &tx).await {
                Ok(Ended::ByClient) => return,
                Ok(Ended::ByProxy) => "the proxy ended its tap stream".to_owned(),
                Err(why) => why,
            };
            tracing::debug!(proxy = %admin, %why, "tap stream ended");
            let mut line = serde_json::to_vec(&serde_json::json!({"proxy": admin, "error": why}))
                .unwrap_or_default();
            line.push(b'\n');
            let _ = tx.send(Bytes::from(line)).await;
        });
    }
    almond_net::Lines::new(rx, HEARTBEAT, (tasks, slot))
}

/// Who ended a proxy's stream that did not fail.
enum Ended {
    /// The tap's client left: nobody reads the merged stream.
    ByClient,
    /// The proxy's body ended (it is shutting down).
    ByProxy,
}

/// Sends each whole line of one proxy's stream (heartbeats left out).
async fn relay(
    client: &Client<HttpConnector, Empty<Bytes>>,
    url: &str,
    authorization: Option<http::HeaderValue>,
    tx: &mpsc::Sender<Bytes>,
) -> Result<Ended, String> {
    let mut req = hyper::Request::get(url)
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    if let Some(value) = authorization {
        req.headers_mut().insert(http::header::AUTHORIZATION, value);
    }
    let resp = tokio::time::timeout(CONNECT_TIMEOUT, client.request(req))
        .await
        .map_err(|_| format!("no answer in {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| match std::error::Error::source(&e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        })?;
    if !resp.status().is_success() {
        return Err(format!("answered {}", resp.status()));
    }
    let mut body = resp.into_body();
    let mut pending = BytesMut::new();
    // In a line over MAX_LINE: its bytes are dropped up to its end, and
    // the stream goes on with the next line.
    let mut skipping = false;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line = pending.split_to(end + 1).freeze();
            if std::mem::take(&mut skipping) {
                continue;
            }
            if line.len() > 1 && tx.send(line).await.is_err() {
                return Ok(Ended::ByClient);
            }
        }
        if pending.len() > MAX_LINE {
            if !skipping {
                tracing::warn!(
                    url,
                    max = MAX_LINE,
                    "tap: a proxy's line over the limit left out"
                );
            }
            skipping = true;
            pending.clear();
        }
    }
    Ok(Ended::ByProxy)
}

/// The merged stream a tap client reads, one JSON object per line; its
/// proxy streams are closed, and its place among the taps at once given
/// back, when it is dropped.
pub type TapStream = almond_net::Lines<(JoinSet<()>, OwnedSemaphorePermit)>;

/// Taps open at once on one control plane: each holds a connection to
/// every proxy (3,000 proxies and 20 taps were 60,000 sockets, near the
/// unit's `LimitNOFILE`); past it a new one is refused with 429.
pub const TAPS_AT_ONCE: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxy_query_is_checked_and_names_the_service() {
        let q: HashMap<String, String> = [("path", "/api/a b"), ("status", "5xx")]
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        assert_eq!(
            proxy_query("web", &q).unwrap(),
            "path=%2Fapi%2Fa%20b&service=web&status=5xx"
        );
        let bad: HashMap<String, String> = [("status".to_owned(), "7xx".to_owned())].into();
        assert!(proxy_query("web", &bad).unwrap_err().contains("status"));
    }
}
