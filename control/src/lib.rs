//! almond's control plane: endpoint sets in (Consul or a watched
//! directory), versioned snapshots out to every proxy.
//!
//! Sources feed the [`catalog`] through [`state`]; [`api`] serves
//! long-polled snapshots (full or delta) and operator views.

pub mod api;
pub mod catalog;
pub mod consul;
pub mod file;
pub mod history;
pub mod live;
pub mod notify;
pub mod policy;
pub mod roster;
pub mod state;
pub mod store;
pub mod tap;
pub mod tls;
pub mod ui;
pub mod watcher;

use almond_config::{ControlConfig, Secret, Source, Store as StoreKind};
use consul::ConsulClient;
use state::State;
use std::future::Future;
use std::sync::Arc;
use store::Store;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Errors that stop the control plane from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The metrics registry refused a family (a bug).
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A Consul TLS file cannot be read or used.
    #[error(transparent)]
    ConsulTls(#[from] consul::TlsSetupError),
    /// A configured token is missing from the environment.
    #[error("{0}")]
    Token(String),
    /// The API listener's `tls` files cannot be used.
    #[error("{0}")]
    Tls(String),
}

/// A control plane, ready to run.
pub struct Control {
    config: ControlConfig,
    state: Arc<State>,
    /// Where endpoints come from, ready to follow (a Consul client is
    /// built, and its TLS files read, before anything runs).
    source: Endpoints,
    /// The credentials the API checks.
    auth: api::Auth,
    /// The API listener's TLS (`tls`), files read at start.
    tls: Option<Arc<tls::ApiTls>>,
    /// The webhook poster (`notify`), spawned by `run`.
    notify: Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>>,
}

enum Endpoints {
    Consul(Box<(almond_config::ConsulSource, ConsulClient)>),
    File(std::path::PathBuf),
}

impl Control {
    /// Builds the control plane for a checked config.
    pub fn new(config: ControlConfig) -> Result<Control, Error> {
        let source = match &config.source {
            Source::Consul(c) => {
                let client = ConsulClient::new(c)?.with_max_body(config.max_body_bytes);
                Endpoints::Consul(Box::new((c.clone(), client)))
            }
            Source::File(dir) => Endpoints::File(dir.clone()),
        };
        // A configured token that is missing fails here, at start: it must
        // not mean "no token".
        let auth = api::Auth {
            operator: Secret::from_config("token_env", config.token_env.as_deref())
                .map_err(Error::Token)?,
            proxy: Secret::from_config("proxy_token_env", config.proxy_token_env.as_deref())
                .map_err(Error::Token)?,
            tls_clients: config.tls.is_some(),
            proxy_admin: Secret::from_config(
                "proxy_admin_token_env",
                config.proxy_admin_token_env.as_deref(),
            )
            .map_err(Error::Token)?,
        };
        for w in almond_config::control_warnings(&config) {
            tracing::warn!(key = %w.path, "{}", w.message);
        }
        let tls = match &config.tls {
            Some(files) => Some(Arc::new(tls::ApiTls::load(files).map_err(Error::Tls)?)),
            None => None,
        };
        let mut state = State::new()?;
        state.max_body = config.max_body_bytes;
        if let Endpoints::File(_) = source {
            state.metrics.without_consul();
        }
        let notify = (!config.notify.is_empty()).then(|| {
            let (notifier, task) = notify::start(
                config.notify.clone(),
                state.metrics.notify_dropped.clone(),
                state.metrics.notify_failed.clone(),
            );
            state.notify = Some(notifier);
            Box::pin(task) as std::pin::Pin<Box<dyn Future<Output = ()> + Send>>
        });
        let state = Arc::new(state);
        Ok(Control {
            config,
            state,
            source,
            auth,
            tls,
            notify,
        })
    }

    fn file_store(&self) -> Store {
        Store::File {
            path: self.config.policy_file.clone(),
            lock: tokio::sync::Mutex::new(()),
        }
    }

    /// The shared state (for tests and the demo).
    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// Runs the source and the API on `listener` until `shutdown`.
    pub async fn run(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let store = Arc::new(match (&self.config.store, &self.source) {
            (StoreKind::Consul, Endpoints::Consul(consul)) => {
                Store::Consul(Box::new(consul.1.clone()))
            }
            // Refused by `load_control`; a config built in code that has
            // both still runs, on the policy file.
            (StoreKind::Consul, Endpoints::File(_)) => {
                tracing::warn!("store: consul needs a consul source; using the policy file");
                self.file_store()
            }
            (StoreKind::File, _) => self.file_store(),
        });
        let follower = tokio::spawn(store.clone().follow(self.state.clone()));
        // Checked when the config was loaded; a bad value means direct.
        let source = self
            .config
            .watcher_source()
            .unwrap_or(almond_config::WatcherSource::Direct);
        tracing::info!(watcher = ?source, "watcher source");
        let metrics_source = source.clone();
        // Unique among replicas, however many share a host or a process.
        let replica = format!(
            "{}-{}-{:04x}",
            almond_net::hostname("control"),
            std::process::id(),
            fastrand::u16(..)
        );
        let watcher =
            watcher::Watcher::new(self.state.clone(), store.clone(), source, replica.clone());
        let watcher = tokio::spawn(watcher.run());
        let store_for_release = store.clone();
        // With the Consul store, replicas share their proxies.
        let roster = match &*store {
            Store::Consul(client) => {
                let client = (**client).clone();
                let task = tokio::spawn(roster::run(
                    client.clone(),
                    self.state.clone(),
                    replica.clone(),
                ));
                Some((task, client))
            }
            Store::File { .. } => None,
        };
        let source = match &self.source {
            Endpoints::Consul(consul) => tokio::spawn(consul::run(
                consul.0.clone(),
                consul.1.clone(),
                self.config.subset_key.clone(),
                self.config.zone_key.clone(),
                self.state.clone(),
            )),
            Endpoints::File(dir) => tokio::spawn(file::run(dir.clone(), self.state.clone())),
        };
        // The dashboard's history, sampled from the watcher's source.
        let history = Arc::new(history::History::default());
        let sampler = tokio::spawn(history::run(
            self.state.clone(),
            history.clone(),
            metrics_source.clone(),
        ));
        let api = Arc::new(api::Api {
            state: self.state.clone(),
            store,
            auth: self.auth,
            intentions: matches!(&self.config.source, Source::Consul(c) if c.intentions.is_some()),
            max_wait: self.config.max_wait,
            metrics_source,
            live_slots: tokio::sync::Semaphore::new(api::LIVE_AT_ONCE),
            tap_slots: Arc::new(tokio::sync::Semaphore::new(tap::TAPS_AT_ONCE)),
            history,
        });
        let tls_watch = (self.tls.clone()).map(|tls| tokio::spawn(tls.watch(stop_rx.clone())));
        let api = tokio::spawn(api::serve(api, listener, self.tls, stop_rx));
        let notify = self.notify.map(tokio::spawn);
        tracing::info!("control plane serving");
        shutdown.await;
        tracing::info!("control plane stopping");
        let _ = stop_tx.send(true);
        source.abort();
        follower.abort();
        watcher.abort();
        // Waited for: one writing its lease as it was aborted would put
        // it back after the release.
        let _ = watcher.await;
        watcher::release_leases(&self.state, &store_for_release, &replica).await;
        if let Some((task, client)) = roster {
            task.abort();
            roster::leave(&client, &replica).await;
        }
        sampler.abort();
        let _ = api.await;
        // Events queued (a rollback's, a change's made just before the
        // stop, one waiting to be tried again) are posted, within `DRAIN`.
        if let Some(mut notify) = notify {
            if let Some(notifier) = &self.state.notify {
                notifier.close();
            }
            if tokio::time::timeout(notify::DRAIN, &mut notify)
                .await
                .is_err()
            {
                notify.abort();
            }
        }
        if let Some(task) = tls_watch {
            task.abort();
        }
    }
}
