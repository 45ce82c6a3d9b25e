//! End to end, file mode: the control plane on a watched registry
//! directory, a proxy following it, backends that say who they are -- all
//! in-process on real sockets. Registry edits reach traffic; a bad file
//! changes nothing; the proxy rides out a control plane that is down (and
//! starts from its cache); edits under load drop no request; long-polls and
//! deltas behave as the API promises.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use http::{Method, Request, StatusCode};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;
use tokio::time::Instant;

/// The proxy's `almond_config_index`.
async fn proxy_index(proxy: &TestProxy) -> u64 {
    proxy_metric(proxy, "almond_config_index", &[]).await as u64
}

/// Waits until the control plane serves `svc` on exactly `addrs`, then
/// until the proxy has applied the control plane's current index.
async fn synced(control: &TestControl, proxy: &TestProxy, svc: &str, addrs: &[&Backend]) {
    let mut want: Vec<String> = addrs.iter().map(|b| b.addr.to_string()).collect();
    want.sort();
    eventually(&format!("control serves {svc} on {want:?}"), || async {
        let mut have: Vec<String> = control
            .state
            .service(svc)
            .map(|s| s.endpoints.iter().map(|e| e.addr.to_string()).collect())
            .unwrap_or_default();
        have.sort();
        have == want
    })
    .await;
    proxy_caught_up(control, proxy).await;
}

/// Waits until the proxy has applied the control plane's current index.
async fn proxy_caught_up(control: &TestControl, proxy: &TestProxy) {
    eventually("the proxy applies the control plane's index", || async {
        proxy_index(proxy).await == control.state.index()
    })
    .await;
}

/// Sends `n` GETs for `svc` over one connection; returns the backends that
/// answered, asserting every answer is 200.
async fn backends_seen(proxy: &TestProxy, svc: &str, n: usize) -> Vec<String> {
    let mut client = H1::connect(proxy.addr()).await;
    let mut seen = Vec::new();
    for _ in 0..n {
        let reply = client.get(svc, "/").await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        seen.push(reply.backend().to_owned());
    }
    seen
}

#[tokio::test]
async fn registry_edits_reach_traffic() {
    let a1 = Backend::start("a1").await;
    let a2 = Backend::start("a2").await;
    let registry = Registry::new();
    registry.service_lb("web", "round_robin", &[(a1.addr, "v1")]);
    let control = TestControl::start(&registry.control_yaml(None)).await;
    let proxy = start_following(&control.url(), None).await;

    // The registry's endpoint gets the traffic.
    let seen = backends_seen(&proxy, "web", 10).await;
    assert!(seen.iter().all(|b| b == "a1"), "{seen:?}");

    // Add an endpoint: traffic reaches it. (Round robin: under the default
    // p2c_ewma a fresh endpoint starts on a 30 ms latency prior that
    // decays over ~10 s, so sequential requests may not reach it for a
    // while -- a balancer matter, not the registry's.)
    registry.service_lb("web", "round_robin", &[(a1.addr, "v1"), (a2.addr, "v1")]);
    eventually("a request reaches the added endpoint a2", || async {
        get_h1(proxy.addr(), "web", "/").await.backend() == "a2"
    })
    .await;

    // Remove one: once applied, it gets nothing more.
    registry.service_lb("web", "round_robin", &[(a2.addr, "v1")]);
    synced(&control, &proxy, "web", &[&a2]).await;
    let before = a1.count();
    let seen = backends_seen(&proxy, "web", 30).await;
    assert!(seen.iter().all(|b| b == "a2"), "{seen:?}");
    assert_eq!(a1.count(), before, "the removed endpoint got traffic");

    // Delete the service's file: the proxy no longer knows the service.
    registry.remove("web.yaml");
    eventually("the deleted service answers 404", || async {
        get_h1(proxy.addr(), "web", "/").await.status == StatusCode::NOT_FOUND
    })
    .await;
    let reply = get_h1(proxy.addr(), "web", "/").await;
    assert!(reply.text().contains("web"), "{}", reply.text());
    let view = control.get("/v1/services/web").await;
    assert_eq!(view.status, StatusCode::NOT_FOUND, "{}", view.text());
}

/// A FIFO (or any file that is not a regular one) named like a registry
/// file is passed over: reading it blocked the file source for good, and
/// the control plane never got ready.
#[tokio::test]
async fn a_fifo_in_the_registry_is_passed_over() {
    let a1 = Backend::start("a1").await;
    let registry = Registry::new();
    let fifo = registry.services.join("stuck.yaml");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    assert!(made.is_ok_and(|s| s.success()), "mkfifo {}", fifo.display());
    registry.service("web", &[(a1.addr, "v1")]);
    let control = TestControl::start(&registry.control_yaml(None)).await;
    let proxy = start_following(&control.url(), None).await;
    let seen = backends_seen(&proxy, "web", 3).await;
    assert!(seen.iter().all(|b| b == "a1"), "{seen:?}");
}

#[tokio::test]
async fn an_invalid_registry_file_leaves_the_last_good_state() {
    let a1 = Backend::start("a1").await;
    let a2 = Backend::start("a2").await;
    let marker = Backend::start("marker").await;
    let registry = Registry::new();
    registry.service("web", &[(a1.addr, "v1")]);
    registry.service("marker", &[(marker.addr, "v1")]);
    let control = TestControl::start(&registry.control_yaml(None)).await;
    let proxy = start_following(&control.url(), None).await;
    synced(&control, &proxy, "web", &[&a1]).await;

    // An unknown key: the whole file is refused. It would have moved web
    // to a2.
    let bad = format!(
        "{}  colour: blue\n",
        service_file("web", &[(a2.addr, "v1")])
    );
    registry.write("web.yaml", &bad);
    // The watcher has read the bad file once it has read a later edit of
    // another file (one directory listing covers both).
    registry.service("marker", &[(marker.addr, "v2")]);
    eventually("the control plane reads the marker edit", || async {
        control
            .state
            .service("marker")
            .is_some_and(|s| s.endpoints[0].subset == "v2")
    })
    .await;
    proxy_caught_up(&control, &proxy).await;

    // The previous good state stays in force, at the control plane and in
    // traffic.
    let served = control.service("web").await;
    let endpoints = served["service"]["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 1, "{served}");
    assert_eq!(endpoints[0]["addr"], a1.addr.to_string());
    let seen = backends_seen(&proxy, "web", 20).await;
    assert!(seen.iter().all(|b| b == "a1"), "{seen:?}");
    assert_eq!(a2.count(), 0);

    // A valid edit afterwards applies.
    registry.service("web", &[(a2.addr, "v1")]);
    synced(&control, &proxy, "web", &[&a2]).await;
    let seen = backends_seen(&proxy, "web", 20).await;
    assert!(seen.iter().all(|b| b == "a2"), "{seen:?}");

    // A file emptied (truncated, about to be written again) is no request
    // to remove web: web stays, and is served.
    registry.write("web.yaml", "");
    registry.service("marker", &[(marker.addr, "v1")]);
    eventually("the control plane reads the next marker edit", || async {
        control
            .state
            .service("marker")
            .is_some_and(|s| s.endpoints[0].subset == "v1")
    })
    .await;
    proxy_caught_up(&control, &proxy).await;
    assert!(control.state.service("web").is_some(), "web was removed");
    let seen = backends_seen(&proxy, "web", 20).await;
    assert!(seen.iter().all(|b| b == "a2"), "{seen:?}");
}

/// A registry file naming a service no `Host` can reach (`Orders`: the
/// proxy looks `Host` up in lower case) is refused like any invalid file,
/// so proxies never get it; the other files are served, and proxies keep
/// taking snapshots.
#[tokio::test]
async fn a_service_name_no_host_reaches_is_refused_with_its_file() {
    let a1 = Backend::start("a1").await;
    let marker = Backend::start("marker").await;
    let registry = Registry::new();
    registry.service("web", &[(a1.addr, "v1")]);
    registry.service("marker", &[(marker.addr, "v1")]);
    let control = TestControl::start(&registry.control_yaml(None)).await;
    let proxy = start_following(&control.url(), None).await;
    synced(&control, &proxy, "web", &[&a1]).await;
    // Added while running (a control plane started with a refused file
    // is not ready: see below).
    registry.service("Orders", &[(a1.addr, "v1")]);
    registry.service("marker", &[(marker.addr, "v3")]);
    eventually("the control plane reads the new files", || async {
        control
            .state
            .service("marker")
            .is_some_and(|s| s.endpoints[0].subset == "v3")
    })
    .await;
    assert!(
        !control.state.has_service("Orders"),
        "{:?}",
        control.state.services().keys()
    );

    // Host is case-insensitive: any spelling of `web` reaches it.
    for host in ["web", "WEB", "Web:4140"] {
        let reply = get_h1(proxy.addr(), host, "/").await;
        assert_eq!(reply.status, StatusCode::OK, "{host}: {}", reply.text());
        assert_eq!(reply.backend(), "a1");
    }
    // The refused file stays refused; later edits elsewhere still apply.
    registry.service("marker", &[(marker.addr, "v2")]);
    eventually("the control plane reads the marker edit", || async {
        control
            .state
            .service("marker")
            .is_some_and(|s| s.endpoints[0].subset == "v2")
    })
    .await;
    proxy_caught_up(&control, &proxy).await;
    assert!(!control.state.has_service("Orders"));
    let reply = get_h1(proxy.addr(), "orders", "/").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.text());
}

/// The snapshot cache at `path`, if it is there and reads as JSON.
fn read_cache(path: &std::path::Path) -> Option<serde_json::Value> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

#[tokio::test]
async fn the_proxy_rides_out_a_control_plane_that_is_down() {
    let a1 = Backend::start("a1").await;
    let registry = Registry::new();
    registry.service("web", &[(a1.addr, "v1")]);
    let cache = registry.scratch("snapshot-cache.json");
    let control = TestControl::start(&registry.control_yaml(None)).await;
    let proxy = start_following(&control.url(), Some(&cache)).await;
    synced(&control, &proxy, "web", &[&a1]).await;
    let index = control.state.index();
    assert_eq!(
        proxy_metric(&proxy, "almond_control_connected", &[]).await,
        1.0
    );
    eventually("the proxy writes its snapshot cache", || async {
        read_cache(&cache).is_some_and(|v| v["index"].as_u64() == Some(index))
    })
    .await;

    // Control plane down: the proxy keeps serving what it has.
    control.shutdown().await;
    let seen = backends_seen(&proxy, "web", 10).await;
    assert!(seen.iter().all(|b| b == "a1"), "{seen:?}");
    eventually("the proxy notices the control plane is gone", || async {
        proxy_metric(&proxy, "almond_control_connected", &[]).await == 0.0
    })
    .await;
    let seen = backends_seen(&proxy, "web", 10).await;
    assert!(seen.iter().all(|b| b == "a1"), "{seen:?}");
    assert_eq!(proxy_index(&proxy).await, index);
    proxy.shutdown().await;

    // A proxy started while the control plane is still down (its URL
    // refuses connections) serves from the cache.
    let nowhere = format!("http://{}", closed_port().await);
    let restarted = start_following(&nowhere, Some(&cache)).await;
    let ready = restarted.admin_get("/ready").await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text());
    let seen = backends_seen(&restarted, "web", 10).await;
    assert!(seen.iter().all(|b| b == "a1"), "{seen:?}");
    assert_eq!(proxy_index(&restarted).await, index);
    eventually(
        "the restarted proxy reports control disconnected",
        || async { proxy_metric(&restarted, "almond_control_connected", &[]).await == 0.0 },
    )
    .await;
}

#[tokio::test]
async fn no_request_fails_while_endpoints_come_and_go() {
    let a1 = Backend::start("a1").await;
    let a2 = Backend::start("a2").await;
    let a3 = Backend::start("a3").await;
    let a4 = Backend::start("a4").await;
    let registry = Registry::new();
    registry.service_lb("web", "round_robin", &[(a1.addr, "v1"), (a2.addr, "v1")]);
    let control = TestControl::start(&registry.control_yaml(None)).await;
    let proxy = start_following(&control.url(), None).await;
    synced(&control, &proxy, "web", &[&a1, &a2]).await;

    // Round robin, so every edit really moves traffic onto added
    // endpoints and off removed ones while requests are in flight.
    // Steady load: one client on a keep-alive connection, one opening a
    // fresh connection per request; each sends sequential GETs until told
    // to stop and counts what it got.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut clients = Vec::new();
    for keep_alive in [true, false] {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let addr = proxy.addr();
        clients.push(tokio::spawn(async move {
            let mut conn = H1::connect(addr).await;
            while !stop.load(Ordering::SeqCst) {
                let reply = if keep_alive {
                    conn.get("web", "/").await
                } else {
                    get_h1(addr, "web", "/").await
                };
                if reply.status == StatusCode::OK {
                    ok.fetch_add(1, Ordering::SeqCst);
                } else {
                    failed
                        .lock()
                        .unwrap()
                        .push(format!("{}: {}", reply.status, reply.text()));
                }
            }
        }));
    }
    /// Lets at least 20 more requests through.
    async fn some_traffic(ok: &AtomicUsize) {
        let from = ok.load(Ordering::SeqCst);
        eventually("requests flow", || async {
            ok.load(Ordering::SeqCst) >= from + 20
        })
        .await;
    }

    some_traffic(&ok).await;
    let steps: [&[&Backend]; 5] = [
        &[&a1, &a2, &a3],
        &[&a2, &a3],
        &[&a2, &a3, &a4],
        &[&a4],
        &[&a1, &a4],
    ];
    for step in steps {
        let endpoints: Vec<_> = step.iter().map(|b| (b.addr, "v1")).collect();
        registry.service_lb("web", "round_robin", &endpoints);
        synced(&control, &proxy, "web", step).await;
        some_traffic(&ok).await;
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        within("load clients to stop", c).await.unwrap();
    }
    let failed = failed.lock().unwrap().clone();
    assert!(
        failed.is_empty(),
        "{} requests failed: {failed:?}",
        failed.len()
    );
    assert!(ok.load(Ordering::SeqCst) >= 120);
    // Every endpoint that was in the registry at some point got traffic.
    for b in [&a1, &a2, &a3, &a4] {
        assert!(b.count() > 0, "{} got nothing", b.name);
    }
}

/// `GET /v1/snapshot?...` as (reply, seconds it took, JSON).
async fn snapshot(control: &TestControl, query: &str) -> (Reply, Duration, serde_json::Value) {
    let started = Instant::now();
    let reply = control.get(&format!("/v1/snapshot?{query}")).await;
    let took = started.elapsed();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let json = reply.json();
    let header: u64 = reply.header("x-almond-index").unwrap().parse().unwrap();
    assert_eq!(json["index"].as_u64(), Some(header));
    (reply, took, json)
}

fn keys(v: &serde_json::Value) -> Vec<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

#[tokio::test]
async fn snapshot_long_polls_and_deltas() {
    let a1 = Backend::start("a1").await;
    let b1 = Backend::start("b1").await;
    let a2 = Backend::start("a2").await;
    let registry = Registry::new();
    registry.service("a", &[(a1.addr, "v1")]);
    registry.service("b", &[(b1.addr, "v1")]);
    let control = TestControl::start(&registry.control_yaml(None)).await;
    eventually("both services are served", || async {
        control.state.services().len() == 2
    })
    .await;

    // Index 0: everything, at once.
    let (_, _, full) = snapshot(&control, "proxy=t&index=0&wait=30s").await;
    let current = full["index"].as_u64().unwrap();
    assert_eq!(full["full"], true);
    assert_eq!(keys(&full["services"]), ["a", "b"]);

    // Behind the current index: at once, even with a long wait allowed (a
    // 30 s wait makes "did not wait" unambiguous on a loaded machine).
    let (_, took, behind) = snapshot(&control, &format!("index={}&wait=30s", current - 1)).await;
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(behind["index"].as_u64(), Some(current));

    // At the current index: held for the wait, then the same index.
    let (_, took, same) = snapshot(&control, &format!("index={current}&wait=1s")).await;
    assert!(
        took >= Duration::from_millis(950),
        "returned after {took:?}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(same["index"].as_u64(), Some(current));

    // A long-poll waiting at the current index returns when a change
    // lands, with the new index.
    let waiting = {
        let addr = control.addr;
        tokio::spawn(async move {
            let path = format!("/v1/snapshot?index={current}&wait=25s");
            get_h1(addr, &addr.to_string(), &path).await
        })
    };
    registry.service("a", &[(a2.addr, "v1")]);
    let woken = within("the long-poll to return on a change", waiting)
        .await
        .unwrap()
        .json();
    let changed = woken["index"].as_u64().unwrap();
    assert!(changed > current, "{woken}");
    assert_eq!(control.state.index(), changed);

    // One change later, a delta from just below it carries only the
    // changed service, and every name.
    let (_, _, delta) = snapshot(&control, &format!("index={}&wait=1s", changed - 1)).await;
    assert_eq!(delta["index"].as_u64(), Some(changed));
    assert_eq!(delta["full"], false, "{delta}");
    assert_eq!(keys(&delta["services"]), ["a"], "{delta}");
    assert_eq!(delta["names"], serde_json::json!(["a", "b"]));
    assert_eq!(
        delta["services"]["a"]["endpoints"][0]["addr"],
        a2.addr.to_string()
    );
    // From the earlier index too: still only `a`.
    let (_, _, delta) = snapshot(&control, &format!("index={current}&wait=1s")).await;
    assert_eq!(keys(&delta["services"]), ["a"], "{delta}");
}

/// `almond status` with no service argument measures every service, but
/// the control plane runs at most four live measurements at once (429
/// beyond): the CLI keeps to four at a time, so five services all show.
#[tokio::test]
async fn status_of_every_service_keeps_to_the_live_limit() {
    let registry = Registry::new();
    let names = ["s1", "s2", "s3", "s4", "s5"];
    let backend = closed_port().await;
    for name in names {
        registry.service(name, &[(backend, "v1")]);
    }
    let control = TestControl::start(&registry.control_yaml(None)).await;
    for name in names {
        eventually(&format!("control serves {name}"), || async {
            control.state.has_service(name)
        })
        .await;
    }
    let (code, out, err) = run_ops(&["status", "--control", &control.url()]).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    for name in names {
        assert!(
            out.lines()
                .any(|l| l.starts_with(&format!("{name} (index"))),
            "{name} missing:\n{out}"
        );
    }
    assert!(!out.contains("(no live figures:"), "{out}");

    // Another client's measurements hold the four places: a service is
    // shown without live figures, with the reason, and the command works.
    let mut busy = Vec::new();
    for name in &names[1..] {
        let addr = control.addr;
        let path = format!("/v1/services/{name}/live?window=5s");
        busy.push(tokio::spawn(async move {
            get_h1(addr, &addr.to_string(), &path).await
        }));
    }
    eventually("the four live places are taken", || async {
        let reply = control.get("/v1/services/s1/live?window=1ms").await;
        reply.status == StatusCode::TOO_MANY_REQUESTS
    })
    .await;
    let (code, out, err) = run_ops(&["status", "s1", "--control", &control.url()]).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert!(out.starts_with("s1 (index"), "{out}");
    assert!(
        out.contains("(no live figures: too many live measurements at once"),
        "{out}"
    );
    for call in busy {
        assert_eq!(call.await.unwrap().status, StatusCode::OK);
    }
}

/// Methods: HEAD is answered as GET (health checks send it); a path the
/// API has, asked with a method it does not take, is 405 with `Allow`; a
/// path it does not have is 404, whatever the method.
#[tokio::test]
async fn methods_are_answered_as_http_says() {
    let registry = Registry::new();
    let backend = Backend::start("v1").await;
    registry.service("s", &[(backend.addr, "v1")]);
    let control = TestControl::start(&registry.control_yaml(None)).await;
    let mut client = H1::connect(control.addr).await;
    let host = control.addr.to_string();
    let ask = |method: Method, path: &str| {
        Request::builder()
            .method(method)
            .uri(path)
            .header("host", &host)
            .header("content-type", "application/json")
            .body(empty())
            .unwrap()
    };
    let head = client.request(ask(Method::HEAD, "/ready")).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    let reply = client
        .request(ask(Method::GET, "/v1/services/s/split"))
        .await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.header("allow"), Some("PUT"));
    let reply = client.request(ask(Method::POST, "/ready")).await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.header("allow"), Some("GET, HEAD"));
    // The live tap is a stream: GET only, and `Allow` says so.
    let reply = client
        .request(ask(Method::HEAD, "/v1/services/s/tap"))
        .await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.header("allow"), Some("GET"));
    let reply = client.request(ask(Method::POST, "/nothing/here")).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let reply = client.request(ask(Method::GET, "/nothing/here")).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
}

/// A proxy restarted from a cache that lacks a service the control plane
/// serves (one it could not take last time: a `tls` it had no identity
/// for) gets it: its first ask is for the whole state, not for what
/// changed since the cache's index (nothing, so never that service).
#[tokio::test]
async fn a_proxy_restarted_from_its_cache_takes_the_whole_state() {
    let a1 = Backend::start("a1").await;
    let b1 = Backend::start("b1").await;
    let registry = Registry::new();
    registry.service("web", &[(a1.addr, "v1")]);
    registry.service("api", &[(b1.addr, "v1")]);
    let cache = registry.scratch("snapshot-cache.json");
    let control = TestControl::start(&registry.control_yaml(None)).await;
    let proxy = start_following(&control.url(), Some(&cache)).await;
    proxy_caught_up(&control, &proxy).await;
    let index = control.state.index();
    eventually("the proxy writes its snapshot cache", || async {
        read_cache(&cache).is_some_and(|v| v["index"].as_u64() == Some(index))
    })
    .await;
    proxy.shutdown().await;
    // The cache as a proxy that could not take `api` wrote it.
    let mut cached: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cache).unwrap()).unwrap();
    cached["services"].as_object_mut().unwrap().remove("api");
    cached["names"] = serde_json::json!(["web"]);
    std::fs::write(&cache, serde_json::to_vec(&cached).unwrap()).unwrap();

    let restarted = start_following(&control.url(), Some(&cache)).await;
    assert_eq!(control.state.index(), index, "nothing changed meanwhile");
    eventually("the restarted proxy serves api", || async {
        get_h1(restarted.addr(), "api", "/").await.status == StatusCode::OK
    })
    .await;
    let seen = backends_seen(&restarted, "web", 4).await;
    assert!(seen.iter().all(|b| b == "a1"), "{seen:?}");
}

/// A registry directory that cannot be read is not an empty registry: a
/// control plane started on one is not ready, and one whose directory goes
/// away (unmounted, swapped) keeps serving what it read, so its proxies
/// keep their routes. (It served nothing, ready, and every proxy dropped
/// every route.)
#[tokio::test]
async fn an_unreadable_registry_directory_empties_nothing() {
    let a1 = Backend::start("a1").await;
    let registry = Registry::new();
    let moved = registry.scratch("services-moved");
    std::fs::rename(&registry.services, &moved).unwrap();
    let control = TestControl::launch_unready(&registry.control_yaml(None)).await;
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    let ready = control.get("/ready").await;
    assert_eq!(
        ready.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        ready.text()
    );
    // The directory appears: ready, serving it.
    std::fs::rename(&moved, &registry.services).unwrap();
    registry.service("web", &[(a1.addr, "v1")]);
    eventually("the control plane is ready", || async {
        control.get("/ready").await.status == StatusCode::OK
    })
    .await;
    let proxy = start_following(&control.url(), None).await;
    synced(&control, &proxy, "web", &[&a1]).await;
    proxy_caught_up(&control, &proxy).await;
    // The directory goes away while running: nothing is removed.
    std::fs::rename(&registry.services, &moved).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    assert!(control.state.has_service("web"));
    let seen = backends_seen(&proxy, "web", 4).await;
    assert!(seen.iter().all(|b| b == "a1"), "{seen:?}");
    std::fs::rename(&moved, &registry.services).unwrap();
}

/// A long poll whose client goes away mid-wait (a proxy restarted, its
/// connection cut) is no longer counted in `almond_control_long_polls`:
/// the gauge only grew with every such disconnect.
#[tokio::test]
async fn a_long_poll_whose_client_left_is_no_longer_counted() {
    use tokio::io::AsyncWriteExt;
    let a1 = Backend::start("a1").await;
    let registry = Registry::new();
    registry.service("web", &[(a1.addr, "v1")]);
    let control = TestControl::start(&registry.control_yaml(None)).await;
    let now = control.get("/v1/snapshot?wait=0s").await.json();
    let plain = |v: &serde_json::Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    let (epoch, index) = (plain(&now["epoch"]), plain(&now["index"]));
    let waiting = || async { control_metric(&control, "almond_control_long_polls", &[]).await };
    for _ in 0..3 {
        let mut conn = tokio::net::TcpStream::connect(control.addr).await.unwrap();
        let req = format!(
            "GET /v1/snapshot?proxy=gone&epoch={epoch}&index={index}&wait=30s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        );
        conn.write_all(req.as_bytes()).await.unwrap();
        eventually("the poll waits", || async { waiting().await == 1.0 }).await;
        drop(conn);
        eventually("the poll is no longer counted", || async {
            waiting().await == 0.0
        })
        .await;
    }
}

/// A following proxy before its first configuration (the control plane
/// not reached yet, no cache) answers 503 `not-ready` with `Retry-After`,
/// on a routed listener and on one bound to a service: a wait, where it
/// answered 404 `unknown-service` (a client would not try again).
#[tokio::test]
async fn a_proxy_without_its_first_config_answers_503_not_404() {
    let control = closed_port().await;
    let yaml = format!(
        "admin: 127.0.0.1:0\ncontrol: http://{control}\nlisteners:\n  - bind: 127.0.0.1:0\n  - bind: 127.0.0.1:0\n    service: web\n"
    );
    let proxy = TestProxy::start(&yaml).await;
    for addr in &proxy.listeners {
        let reply = get_h1(*addr, "web", "/").await;
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            reply.text()
        );
        assert_eq!(reply.header("x-almond-error"), Some("not-ready"));
        assert_eq!(reply.header("retry-after"), Some("1"));
    }
}

/// A cache holding one service this start cannot take (a `tls` service,
/// the proxy's identity since removed from its config) still gives the
/// others: a proxy restarted while the control plane is down serves
/// them, where it threw the whole cache away (no service, not ready).
#[tokio::test]
async fn a_cache_with_one_bad_service_still_serves_the_others() {
    let a1 = Backend::start("a1").await;
    let registry = Registry::new();
    registry.service("web", &[(a1.addr, "v1")]);
    let cache = registry.scratch("snapshot-cache.json");
    let control = TestControl::start(&registry.control_yaml(None)).await;
    let proxy = start_following(&control.url(), Some(&cache)).await;
    synced(&control, &proxy, "web", &[&a1]).await;
    let read = || read_cache(&cache);
    eventually("the proxy writes its snapshot cache", || async {
        read().is_some_and(|v| v["services"]["web"].is_object())
    })
    .await;
    proxy.shutdown().await;
    control.shutdown().await;
    let mut snapshot = read().unwrap();
    let mut secure = snapshot["services"]["web"].clone();
    secure["tls"] = serde_json::json!({});
    snapshot["services"]["secure"] = secure;
    if let Some(names) = snapshot["names"].as_array_mut() {
        names.push(serde_json::json!("secure"));
    }
    std::fs::write(&cache, serde_json::to_vec(&snapshot).unwrap()).unwrap();

    let nowhere = format!("http://{}", closed_port().await);
    let restarted = start_following(&nowhere, Some(&cache)).await;
    let seen = backends_seen(&restarted, "web", 5).await;
    assert!(seen.iter().all(|b| b == "a1"), "{seen:?}");
    let reply = get_h1(restarted.addr(), "secure", "/").await;
    assert_ne!(reply.status, StatusCode::OK, "{}", reply.text());
}

/// A snapshot with one service this proxy cannot read (a field of a newer
/// control plane) is applied for every other service: the whole snapshot
/// was refused, as if the control plane were unreachable, and no change
/// reached the proxy until that service changed back.
#[tokio::test]
async fn a_service_a_proxy_cannot_read_does_not_stop_the_others() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a1 = Backend::start("a1").await;
    let snapshot = serde_json::json!({
        "epoch": 7,
        "index": 3,
        "full": true,
        "names": ["newer", "web"],
        "services": {
            "web": { "endpoints": [{ "addr": a1.addr.to_string() }] },
            "newer": { "endpoints": [{ "addr": a1.addr.to_string() }], "future_knob": 1 },
        },
    })
    .to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let body = snapshot.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(head.as_bytes()).await;
                let _ = conn.write_all(body.as_bytes()).await;
            });
        }
    });
    let proxy = start_following(&control, None).await;
    let seen = backends_seen(&proxy, "web", 3).await;
    assert!(seen.iter().all(|b| b == "a1"), "{seen:?}");
    let reply = get_h1(proxy.addr(), "newer", "/").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.text());
}

/// A control plane started while a registry file is refused (a typo the
/// running one tolerated, keeping its last good content) is not ready,
/// and tells no proxy anything: it has no last good content of that file,
/// and becoming ready without it would remove its services from every
/// proxy. Once the file reads, it is ready with all of them.
#[tokio::test]
async fn a_control_plane_started_with_a_refused_file_is_not_ready() {
    let a1 = Backend::start("a1").await;
    let b1 = Backend::start("b1").await;
    let registry = Registry::new();
    registry.service("web", &[(a1.addr, "v1")]);
    let bad = registry.services.join("api.yaml");
    std::fs::write(&bad, "api:\n  endpoints: [{ addr: nowhere }]\n").unwrap();
    let control = TestControl::launch_unready(&registry.control_yaml(None)).await;
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    let ready = control.get("/ready").await;
    assert_eq!(
        ready.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        ready.text()
    );
    // Fixed: ready, with both files' services.
    registry.service("api", &[(b1.addr, "v1")]);
    eventually("the control plane is ready", || async {
        control.get("/ready").await.status == StatusCode::OK
    })
    .await;
    assert!(control.state.has_service("web"));
    assert!(control.state.has_service("api"));
}

/// Two proxies following under one `proxy_id` (a copied config) take turns
/// in the control plane's roster: only one at a time is counted and
/// scraped by the watcher. The control plane notices the ID going back
/// and forth between two admin addresses and says so in `/v1/proxies`
/// (and its log); a proxy restarted on a new admin port is not flagged.
#[tokio::test]
async fn two_proxies_under_one_id_are_flagged() {
    let registry = Registry::new();
    let a1 = Backend::start("a1").await;
    registry.service("web", &[(a1.addr, "v1")]);
    let control = TestControl::start(&registry.control_yaml(None)).await;
    let ask = |id: &str, admin: &str| format!("proxy={id}&admin={admin}&wait=0s");
    // The control plane takes the host from the connection: ports differ.
    for admin in ["4191", "4192"] {
        snapshot(&control, &ask("restarted", admin)).await;
    }
    for admin in ["4191", "4192", "4191"] {
        snapshot(&control, &ask("copied", admin)).await;
    }
    let proxies = control.get("/v1/proxies").await.json();
    assert_eq!(
        proxies["copied"]["shared_with"], "127.0.0.1:4192",
        "{proxies}"
    );
    assert!(
        proxies["restarted"].get("shared_with").is_none(),
        "{proxies}"
    );
}
