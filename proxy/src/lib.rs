//! almond's data plane: the sidecar proxy.
//!
//! A request walks the folders in order (docs/architecture.md draws it):
//! [`edge`] accepts it and serves it, [`pipeline`] decides where it goes
//! (route, split, admit, retry), [`upstream`] reaches an endpoint
//! (balance, eject, connect, send) and [`observe`] measures it; [`rescue`]
//! is where every error becomes a response. Beside the request path:
//! [`identity`] (mTLS and authorization), [`health`] (active checks, idle
//! sweeps), [`follow`] (the control plane's snapshots), [`admin`] (the
//! proxy's own endpoints).
//!
//! Dependencies point one way, down this list: `edge` -> `pipeline` ->
//! `upstream` -> `identity`, `observe` -> the leaves ([`rescue`],
//! [`headers`], [`body`], [`outcome`], [`limit`], [`clock`]); a check in
//! CI refuses import circles.

pub mod admin;
pub mod body;
pub mod clock;
pub mod edge;
pub mod follow;
pub mod headers;
pub mod health;
pub mod http2;
pub mod identity;
pub mod limit;
pub mod observe;
pub mod outcome;
pub mod pipeline;
pub mod reload;
pub mod rescue;
pub mod upstream;

#[cfg(test)]
mod props;

use almond_config::{ProxyConfig, Secret};
use arc_swap::ArcSwap;
use observe::metrics::Metrics;
use pipeline::route::Table;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// State every connection and request shares.
pub struct Shared {
    /// The routing table; swapped whole on config updates.
    pub table: ArcSwap<Table>,
    /// Golden metrics.
    pub metrics: Metrics,
    /// Whether `/ready` says yes.
    pub ready: AtomicBool,
    /// Downstream HTTP server settings.
    pub http: edge::listen::HttpServer,
    /// The mTLS identity (the config's `tls`), reloaded when its files change.
    pub tls: Option<Arc<identity::tls::Tls>>,
    /// Trace sampling, the access log and the log level.
    pub observe: observe::Observe,
    /// The token of `admin_token_env`: what `/config`, `/endpoints` and
    /// `/log-level` need when the admin listener is not on loopback.
    pub admin_token: Option<Secret>,
    /// Upgraded connections' tunnels, which outlive their connections.
    pub tunnels: Arc<upstream::tunnel::Tunnels>,
}

/// Sockets bound for a config, before serving starts: tests bind port 0
/// and read the real addresses here.
pub struct Bound {
    /// One per configured listener, in config order.
    pub listeners: Vec<TcpListener>,
    /// The admin listener.
    pub admin: TcpListener,
}

impl Bound {
    /// Binds every listener of `config` and its admin address.
    pub fn bind(config: &ProxyConfig) -> io::Result<Bound> {
        let listeners = config
            .listeners
            .iter()
            .map(|l| {
                warn_if_shared(l.bind);
                edge::listen::bind(l.bind).map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot bind listener {}: {e}", l.bind))
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        warn_if_shared(config.admin);
        let admin = edge::listen::bind(config.admin).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot bind admin {}: {e}", config.admin))
        })?;
        Ok(Bound { listeners, admin })
    }

    /// The bound addresses of the listeners, in config order.
    pub fn listener_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.local_addr().ok()
    }
}

/// Warns when another process already listens on `addr`: every socket
/// sets `SO_REUSEPORT` (a new proxy can start beside the old one during an
/// upgrade), so the kernel would divide the connections between the two
/// without a word: a second proxy started by mistake, or an old one left
/// running, would serve part of the traffic (and of the `/metrics`
/// scrapes) on a config of its own.
fn warn_if_shared(addr: SocketAddr) {
    if addr.port() == 0 {
        return;
    }
    let probe = match addr.ip() {
        ip if ip.is_unspecified() && addr.is_ipv4() => {
            SocketAddr::from(([127, 0, 0, 1], addr.port()))
        }
        ip if ip.is_unspecified() => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port())),
        _ => addr,
    };
    let timeout = std::time::Duration::from_millis(100);
    if std::net::TcpStream::connect_timeout(&probe, timeout).is_ok() {
        tracing::warn!(%addr, "another process already listens here: it and this proxy will share its connections (SO_REUSEPORT) until one stops; expected only while an upgrade overlaps");
    }
}

/// Errors that stop the proxy from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The metrics registry refused a family (a bug).
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The `tls` files cannot be used.
    #[error("{0}")]
    Tls(#[from] identity::tls::TlsError),
    /// The control plane cannot be reached as configured (token, CA).
    #[error("{0}")]
    Control(#[from] follow::LinkError),
    /// `admin_token_env` names a variable that is unset or empty.
    #[error("{0}")]
    AdminToken(String),
}

/// A running proxy's handle: swap its config while it serves.
#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
    /// Position of the snapshot cache loaded at start (default: none).
    cached: follow::Position,
    /// How to reach the control plane, when `control` is set.
    link: Option<Arc<follow::Link>>,
}

impl Proxy {
    /// Builds the proxy's state for a checked config. With `control` set,
    /// the services of the snapshot cache (if any) are loaded first.
    pub fn new(mut config: ProxyConfig) -> Result<Proxy, Error> {
        for w in almond_config::proxy_warnings(&config) {
            tracing::warn!(key = %w.path, "{}", w.message);
        }
        // Said once: a zone that matches no endpoint's turns zone-aware
        // balancing off without any other sign.
        match config.local_zone() {
            Some(zone) => {
                tracing::info!(%zone, "this proxy's zone: pools with endpoints in it balance zone-aware")
            }
            None => tracing::info!("no zone (zone, ALMOND_ZONE): zones are ignored"),
        }
        let cached = match config.control {
            Some(_) => follow::load_cache(&mut config).unwrap_or_default(),
            None => follow::Position::default(),
        };

        let admin_token = Secret::from_config("admin_token_env", config.admin_token_env.as_deref())
            .map_err(Error::AdminToken)?;
        let metrics = match config.control {
            Some(_) => Metrics::new()?,
            None => Metrics::new()?.without_control(),
        };
        let http = edge::listen::http_builder(&config.limits);
        let observe = observe::Observe::new(&config, &metrics);
        let tls = match &config.tls {
            Some(files) => Some(Arc::new(identity::tls::Tls::load(files)?)),
            None => None,
        };
        let link = match config.control {
            Some(_) => Some(Arc::new(follow::Link::new(&config, tls.as_ref())?)),
            None => None,
        };
        let tunnels = Arc::new(upstream::tunnel::Tunnels::new(config.limits.idle_timeout));
        // Applied now, or when the cache it starts from was written.
        let applied = (config.cache.as_ref().filter(|_| cached.index > 0))
            .and_then(|path| std::fs::metadata(path).and_then(|m| m.modified()).ok())
            .unwrap_or_else(std::time::SystemTime::now);
        metrics.config_applied_at(applied);
        let table = Table::build_tls(Arc::new(config), &metrics, None, tls.as_ref());
        Ok(Proxy {
            shared: Arc::new(Shared {
                table: ArcSwap::from_pointee(table),
                metrics,
                ready: AtomicBool::new(false),
                http,
                tls,
                observe,
                admin_token,
                tunnels,
            }),
            cached,
            link,
        })
    }

    /// Applies a new checked config's services: a new table is built
    /// (state carried over) and swapped in; listeners stay as bound.
    pub fn update(&self, config: ProxyConfig) {
        let old = self.shared.table.load_full();
        let table = Table::build_tls(
            Arc::new(config),
            &self.shared.metrics,
            Some(&old),
            self.shared.tls.as_ref(),
        );
        self.shared.table.store(Arc::new(table));
        (self.shared.metrics).config_applied_at(std::time::SystemTime::now());
    }

    /// Per listener (config order): its mTLS settings, if it is `tls`.
    fn inbound_tls(&self) -> Vec<Option<Arc<identity::authz::Inbound>>> {
        let config = self.shared.table.load().config.clone();
        config
            .listeners
            .iter()
            .map(|l| match (&self.shared.tls, l.tls) {
                (Some(tls), true) => Some(Arc::new(identity::authz::Inbound {
                    tls: tls.clone(),
                    allow: l.allow.clone(),
                })),
                _ => None,
            })
            .collect()
    }

    /// Static mode: ready now. With `control`: follows the control plane
    /// (the task returned), ready once a snapshot (or the cache) is in
    /// force.
    fn follow(&self, admin_addr: Option<SocketAddr>) -> Option<tokio::task::JoinHandle<()>> {
        let config = self.shared.table.load().config.clone();
        let (Some(url), Some(link)) = (&config.control, self.link.clone()) else {
            self.shared.ready.store(true, Ordering::Release);
            return None;
        };
        let cached = self.cached;
        if cached.index > 0 {
            self.shared.metrics.config_index.set(cached.index as i64);
            self.shared.ready.store(true, Ordering::Release);
        }
        let id = config.proxy_id.clone().unwrap_or_else(proxy_hostname);
        let admin = admin_addr.map(|a| a.to_string()).unwrap_or_default();
        let following = follow::follow(self.clone(), link, url.clone(), id, admin, cached);
        Some(tokio::spawn(following))
    }

    /// The shared state (metrics, table).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Serves on `bound` until `shutdown` resolves, then stops accepting
    /// and lets in-flight requests and open tunnels finish for up to the
    /// config's `drain_timeout`; the tunnels left then are closed.
    pub async fn run(self, bound: Bound, shutdown: impl Future<Output = ()>) {
        let drain = self.shared.table.load().config.drain_timeout;
        let (stop_tx, stop_rx) = watch::channel(false);
        let (cut_tx, cut_rx) = watch::channel(false);
        let connections = tokio_util::task::TaskTracker::new();
        let mut tasks = Vec::new();
        let inbound = self.inbound_tls();
        for (index, listener) in bound.listeners.into_iter().enumerate() {
            tasks.push(tokio::spawn(edge::listen::accept_loop(
                self.shared.clone(),
                index,
                listener,
                inbound.get(index).cloned().flatten(),
                (stop_rx.clone(), cut_rx.clone()),
                connections.clone(),
            )));
        }
        // Active health checks and idle-connection sweeps.
        tokio::spawn(health::maintain(self.shared.clone(), stop_rx.clone()));
        // Certificate rotation: new handshakes pick up changed files.
        if let Some(tls) = &self.shared.tls {
            tokio::spawn(tls.clone().watch(stop_rx.clone()));
        }
        let admin_addr = bound.admin.local_addr().ok();
        // The admin listener outlives the drain, so `/ready` answers 503
        // (not connection refused) while in-flight requests finish.
        let (admin_stop, admin_stop_rx) = watch::channel(false);
        let admin = tokio::spawn(admin::serve(
            self.shared.clone(),
            bound.admin,
            admin_stop_rx,
        ));
        let follower = self.follow(admin_addr);
        tracing::info!("proxy serving");

        shutdown.await;
        tracing::info!(drain_timeout = ?drain, "shutting down: draining in-flight requests");
        // The follower first, and waited for: one applying a snapshot on
        // another thread would mark the proxy ready again after this.
        if let Some(follower) = follower {
            follower.abort();
            let _ = follower.await;
        }
        self.shared.ready.store(false, Ordering::Release);
        let _ = stop_tx.send(true);
        for task in tasks {
            let _ = task.await;
        }
        // Every connection was told to close after its request in progress.
        connections.close();
        let tunnels = &self.shared.tunnels;
        let drained = async {
            connections.wait().await;
            // Tunnels open on connections: none opens once they are done.
            tunnels.ended().await;
        };
        let access_log = self.shared.observe.access_log.as_ref();
        match tokio::time::timeout(drain, drained).await {
            Ok(()) => tracing::info!("drained"),
            Err(_) => {
                tracing::warn!("drain timeout: closing remaining connections");
                // Their requests are dropped now, not with the runtime: each
                // logged as the proxy's cut (503).
                self.shared.observe.cut();
                let _ = cut_tx.send(true);
                tunnels.close().await;
                let _ = tokio::time::timeout(LAST_WRITES, connections.wait()).await;
            }
        }
        // The access log's last lines, written before the runtime goes.
        if let Some(log) = access_log {
            if tokio::time::timeout(LAST_WRITES, log.flush())
                .await
                .is_err()
            {
                tracing::warn!("access log not flushed in time: its last lines are lost");
            }
        }
        // Spans of the drained requests: flushed, within the export timeout.
        if let Some(spans) = &self.shared.observe.spans {
            spans.shutdown().await;
        }
        let _ = admin_stop.send(true);
        let _ = admin.await;
    }
}

/// How long a stopping proxy waits for the connections it cut to end, and
/// then for its access log's last lines to be written.
const LAST_WRITES: std::time::Duration = std::time::Duration::from_secs(2);

/// This host's name (the default proxy ID and span service name).
pub(crate) fn proxy_hostname() -> String {
    almond_net::hostname("almond-proxy")
}

/// `make()`'s future in a box, built in the box: allocated first, so
/// that the compiler can write the future where it will live instead of
/// copying it in whole (a future is sized for its largest state, most of
/// which is not yet set when it is made).
#[inline(always)]
pub(crate) fn boxed<F: std::future::Future>(make: impl FnOnce() -> F) -> std::pin::Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
}
