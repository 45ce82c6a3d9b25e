//! The `almond` command: parse the command line, then call into the crates.

mod demo;
mod ops;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

/// jemalloc, with its background thread returning freed memory to the OS
/// (after a burst of connections closes, RSS falls back within seconds).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "almond",
    version,
    about = "A sidecar proxy and small service-mesh control plane"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "ALMOND_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar data plane.
    Proxy {
        /// Proxy config file (YAML or JSON).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the control plane: Consul (or a registry directory) in,
    /// snapshots out to every proxy.
    Control {
        /// Control config file (YAML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Set a traffic split, e.g. `almond shift orders v1=90 v2=10`.
    Shift {
        /// The service.
        service: String,
        /// SUBSET=WEIGHT pairs (percent, summing to 100).
        #[arg(required = true, value_parser = ops::parse_pair)]
        weights: Vec<(String, u32)>,
        /// Subsets that may have no endpoints yet.
        #[arg(long)]
        allow_empty: Vec<String>,
        /// Keep each user on one side: hash this request header's value
        /// (e.g. x-user-id). Kept by later shifts until changed.
        #[arg(long, value_name = "HEADER", value_parser = ops::parse_sticky_header)]
        sticky_header: Option<String>,
        /// Turn stickiness off (random split per request).
        #[arg(long, conflicts_with = "sticky_header")]
        no_sticky: bool,
        #[command(flatten)]
        ops: OpsArgs,
    },
    /// Send 100% of a service's traffic to one subset.
    Promote {
        /// The service.
        service: String,
        /// The subset that gets everything.
        subset: String,
        #[command(flatten)]
        ops: OpsArgs,
    },
    /// Go back to the split in force before the current one.
    Rollback {
        /// The service.
        service: String,
        #[command(flatten)]
        ops: OpsArgs,
    },
    /// A service's rollout events (started, each step's verdict with its
    /// figures, paused, approved, promoted, rolled back, aborted).
    Events {
        /// The service.
        service: String,
        /// Keep printing new events as they happen (until Ctrl-C).
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        ops: OpsArgs,
    },
    /// Deny requests to a path of a service at once, on every proxy
    /// (within a second): they get STATUS without reaching the service.
    Block {
        /// The service.
        service: String,
        /// Path prefix (whole segments: /api matches /api/x, not /apix).
        #[arg(long)]
        path: String,
        /// Only this method (default: any).
        #[arg(long)]
        method: Option<String>,
        /// The answer's status.
        #[arg(long, default_value_t = 503)]
        status: u16,
        /// The answer's body.
        #[arg(long)]
        body: Option<String>,
        #[command(flatten)]
        ops: OpsArgs,
    },
    /// Hold requests to a path of a service to a rate, on every proxy
    /// (each proxy counts its own: a per-proxy limit, unless `--fleet`);
    /// over it, 429.
    Limit {
        /// The service.
        service: String,
        /// Path prefix.
        #[arg(long)]
        path: String,
        /// Only this method (default: any).
        #[arg(long)]
        method: Option<String>,
        /// `10/s`, `100/min` or `5/h`.
        #[arg(long, value_parser = ops::parse_guard_rate)]
        rate: String,
        /// Requests allowed at once after a quiet spell.
        #[arg(long)]
        burst: Option<u32>,
        /// `none`, `client_ip` or `header NAME`.
        #[arg(long, default_value = "none", value_parser = ops::parse_guard_by)]
        by: String,
        /// The rate (and burst) are for the whole fleet: the control plane
        /// divides them by the number of proxies following it
        /// (approximate).
        #[arg(long)]
        fleet: bool,
        #[command(flatten)]
        ops: OpsArgs,
    },
    /// Remove the block or limit set on a path (and method) of a service.
    Unblock {
        /// The service.
        service: String,
        /// Path prefix, as given to `block` or `limit`.
        #[arg(long)]
        path: String,
        /// The method, as given to `block` or `limit`.
        #[arg(long)]
        method: Option<String>,
        #[command(flatten)]
        ops: OpsArgs,
    },
    /// Live requests to a service as every proxy sees them (time, proxy,
    /// method, path, status, subset, endpoint, latency, request ID), until
    /// Ctrl-C or `--count`. Each proxy sends at most 100 a second.
    Tap {
        /// The service.
        service: String,
        /// Only paths starting with this prefix.
        #[arg(long)]
        path: Option<String>,
        /// Only requests answered by this subset.
        #[arg(long)]
        subset: Option<String>,
        /// Only this status class (5xx) or code (503).
        #[arg(long)]
        status: Option<String>,
        /// Show request headers too (authorization and cookie values are
        /// never shown).
        #[arg(long)]
        headers: bool,
        /// At most this many events per second from each proxy (1..=100).
        #[arg(long)]
        rate: Option<u32>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        #[command(flatten)]
        ops: OpsArgs,
    },
    /// Allow a client identity to call a service on inbound mTLS
    /// listeners, or no longer allow it (every proxy enforces the list).
    Authz {
        /// The service.
        service: String,
        /// `allow` or `deny`.
        action: AuthzAction,
        /// A typed identity: spiffe://TRUST-DOMAIN/PATH, dns:NAME or cn:NAME.
        identity: String,
        #[command(flatten)]
        ops: OpsArgs,
    },
    /// A service's route rules, set through the control plane: `list`,
    /// `set FILE` (a YAML or JSON list of rules), `clear`.
    Route {
        #[command(subcommand)]
        action: RouteAction,
    },
    /// A service's traffic mirroring, set through the control plane:
    /// `list`, `set` (`--subset` or `--service`, `--percent`), `clear`.
    Mirror {
        #[command(subcommand)]
        action: MirrorAction,
    },
    /// Subsets, weights, endpoints healthy/total and live rps, success
    /// rate and p99 (from the proxies' metrics) of one service or all.
    Status {
        /// The service (default: all).
        service: Option<String>,
        /// How long the live figures are measured over: up to 10s when
        /// the control plane scrapes the proxies (default 1s), 1h with
        /// Prometheus (default 1m: two scrapes at least).
        #[arg(long, value_parser = ops::parse_window)]
        window: Option<std::time::Duration>,
        #[command(flatten)]
        ops: OpsArgs,
    },
    /// A staged rollout judged by the watcher; or `--approve`, `--abort`,
    /// or (with neither nor `--canary`) show the current one.
    Rollout {
        /// The service.
        service: String,
        /// The new version's subset.
        #[arg(long)]
        canary: Option<String>,
        /// The current version's subset (default: the other busiest one).
        #[arg(long)]
        stable: Option<String>,
        /// Canary percent per step; once the last passes, the canary gets
        /// 100 %.
        #[arg(long, value_delimiter = ',', default_value = "1,10,50,100")]
        steps: Vec<u32>,
        /// Time per step before it is judged.
        #[arg(long, default_value = "30s", value_parser = ops::parse_seconds)]
        interval: f64,
        /// Highest canary error rate, e.g. 1%.
        #[arg(long, default_value = "1%", value_parser = ops::parse_rate)]
        max_error_rate: f64,
        /// Highest canary p99, e.g. 300ms.
        #[arg(long, value_parser = ops::parse_seconds)]
        max_p99: Option<f64>,
        /// Highest canary p99 as a multiple of stable's.
        #[arg(long)]
        max_p99_ratio: Option<f64>,
        /// Fewest canary requests a pass needs (quiet windows add up until
        /// they have them; failures may fail the canary sooner).
        #[arg(long, default_value_t = 50)]
        min_requests: u64,
        /// Steps after which to wait for `--approve`.
        #[arg(long, value_delimiter = ',')]
        pause_at: Vec<u32>,
        /// A judged shadow stage first: mirror this percent of requests
        /// to the canary (no real traffic) and judge the copies against
        /// stable before the first step.
        #[arg(long, value_name = "PERCENT")]
        shadow: Option<f64>,
        /// Pass the manual gate.
        #[arg(long, conflicts_with_all = ["canary", "abort"])]
        approve: bool,
        /// Stop and roll back.
        #[arg(long, conflicts_with = "canary")]
        abort: bool,
        #[command(flatten)]
        ops: OpsArgs,
    },
    /// Validate a proxy or control config file: exit 0 (warnings on
    /// stderr), or 1 naming the problems with their lines.
    CheckConfig {
        /// The config file.
        file: PathBuf,
    },
    /// Everything on one machine: demo services in two versions, a proxy,
    /// traffic, and a live summary.
    Demo {
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        duration: Option<u64>,
        /// Requests per second the demo client sends (1 to 5000: the
        /// watcher needs traffic to judge, and one machine runs it all).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=5000))]
        rate: u32,
        /// Seconds each rollout step runs before the watcher judges it.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=3600))]
        step: u64,
    },
}

/// Options of the operator commands.
#[derive(clap::Args)]
struct OpsArgs {
    /// Control plane URL.
    #[arg(
        long,
        env = "ALMOND_CONTROL",
        default_value = "http://127.0.0.1:4180",
        value_parser = ops::parse_control_url
    )]
    control: String,
    /// With an https:// control URL: PEM file of the CAs its certificate
    /// must chain to (default: the system's roots).
    #[arg(long, env = "ALMOND_CONTROL_CA")]
    control_ca: Option<std::path::PathBuf>,
    /// Bearer token for changes.
    #[arg(long, env = "ALMOND_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Output format.
    #[arg(short = 'o', long = "output", default_value = "text")]
    output: Output,
}

/// `almond route ...`.
#[derive(Subcommand)]
enum RouteAction {
    /// The rules in force, in order.
    List {
        /// The service.
        service: String,
        #[command(flatten)]
        ops: OpsArgs,
    },
    /// Replace the rules with those of FILE (`-`: standard input), e.g.
    /// `- { match: { path_prefix: /api }, to: { subset: v2 } }`.
    Set {
        /// The service.
        service: String,
        /// A YAML (or JSON) list of rules.
        file: PathBuf,
        #[command(flatten)]
        ops: OpsArgs,
    },
    /// Remove the rules set here (the source's, if any, apply again).
    Clear {
        /// The service.
        service: String,
        #[command(flatten)]
        ops: OpsArgs,
    },
}

/// `almond mirror ...`.
#[derive(Subcommand)]
enum MirrorAction {
    /// The mirror in force.
    List {
        /// The service.
        service: String,
        #[command(flatten)]
        ops: OpsArgs,
    },
    /// Copy a share of the service's requests to a subset or a service.
    Set {
        /// The service whose requests are copied.
        service: String,
        /// Copy to this subset of the service.
        #[arg(
            long,
            required_unless_present = "to_service",
            conflicts_with = "to_service"
        )]
        subset: Option<String>,
        /// Copy to this other service.
        #[arg(long = "service", id = "to_service")]
        to_service: Option<String>,
        /// Percent of requests copied (0 to 100).
        #[arg(long)]
        percent: f64,
        /// Copies in flight at once; more are dropped and counted.
        #[arg(long)]
        max_in_flight: Option<u32>,
        #[command(flatten)]
        ops: OpsArgs,
    },
    /// Stop mirroring (the source's mirror, if any, applies again).
    Clear {
        /// The service.
        service: String,
        #[command(flatten)]
        ops: OpsArgs,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum AuthzAction {
    Allow,
    Deny,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Text,
    Json,
}

impl OpsArgs {
    fn target(self) -> ops::Target {
        ops::Target {
            control: self.control,
            control_ca: self.control_ca,
            // As the control plane reads its own: without surrounding
            // spaces and line ends.
            token: self.token.map(|t| t.trim().to_owned()),
            json: self.output == Output::Json,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo's narration is the point: its components log warnings only
    // (unless ALMOND_LOG or RUST_LOG says otherwise).
    let default_level = match cli.command {
        Command::Demo { .. } => "warn",
        _ => "info",
    };
    let log_level = init_logging(cli.log_format, default_level);
    let result = match cli.command {
        Command::Proxy { config } => run_proxy(&config, log_level),
        Command::Control { config } => run_control(&config),
        Command::Shift {
            service,
            weights,
            allow_empty,
            sticky_header,
            no_sticky,
            ops,
        } => {
            let w = ops::weights(weights).unwrap_or_else(|e| usage(e));
            let sticky = if no_sticky {
                Some(String::new())
            } else {
                sticky_header
            };
            let t = ops.target();
            block_on(ops::shift(&t, &service, w, allow_empty, sticky, "shift"))
        }
        Command::Promote {
            service,
            subset,
            ops,
        } => block_on(ops::promote(&ops.target(), &service, &subset)),
        Command::Rollback { service, ops } => block_on(ops::rollback(&ops.target(), &service)),
        Command::Events {
            service,
            follow,
            ops,
        } => block_on(ops::events(&ops.target(), &service, follow)),
        Command::Block {
            service,
            path,
            method,
            status,
            body,
            ops,
        } => {
            let mut deny = serde_json::json!({ "status": status });
            if let Some(body) = body {
                deny["body"] = serde_json::Value::String(body);
            }
            let change = ops::GuardChange {
                path,
                method,
                action: Some(deny),
            };
            block_on(ops::guard(&ops.target(), &service, change))
        }
        Command::Limit {
            service,
            path,
            method,
            rate,
            burst,
            by,
            fleet,
            ops,
        } => {
            let mut limit = serde_json::json!({ "rate": rate, "by": by });
            if fleet {
                limit["scope"] = serde_json::Value::from("fleet");
            }
            if let Some(burst) = burst {
                limit["burst"] = serde_json::Value::from(burst);
            }
            let change = ops::GuardChange {
                path,
                method,
                action: Some(limit),
            };
            block_on(ops::guard(&ops.target(), &service, change))
        }
        Command::Unblock {
            service,
            path,
            method,
            ops,
        } => {
            let change = ops::GuardChange {
                path,
                method,
                action: None,
            };
            block_on(ops::guard(&ops.target(), &service, change))
        }
        Command::Tap {
            service,
            path,
            subset,
            status,
            headers,
            rate,
            count,
            ops,
        } => {
            let mut filter = Vec::new();
            filter.extend(path.map(|v| ("path", v)));
            filter.extend(subset.map(|v| ("subset", v)));
            filter.extend(status.map(|v| ("status", v)));
            filter.extend(headers.then(|| ("headers", "true".to_owned())));
            filter.extend(rate.map(|v| ("rate", v.to_string())));
            block_on(ops::tap(&ops.target(), &service, &filter, count))
        }
        Command::Authz {
            service,
            action,
            identity,
            ops,
        } => block_on(ops::authz(
            &ops.target(),
            &service,
            action == AuthzAction::Allow,
            &identity,
        )),
        Command::Mirror { action } => match action {
            MirrorAction::List { service, ops } => {
                block_on(ops::mirror_list(&ops.target(), &service))
            }
            MirrorAction::Set {
                service,
                subset,
                to_service,
                percent,
                max_in_flight,
                ops,
            } => {
                let body = serde_json::json!({
                    "subset": subset, "service": to_service,
                    "percent": percent, "max_in_flight": max_in_flight,
                });
                block_on(ops::mirror_set(&ops.target(), &service, body))
            }
            MirrorAction::Clear { service, ops } => {
                block_on(ops::mirror_clear(&ops.target(), &service))
            }
        },
        Command::Route { action } => match action {
            RouteAction::List { service, ops } => {
                block_on(ops::routes_list(&ops.target(), &service))
            }
            RouteAction::Set { service, file, ops } => {
                block_on(ops::routes_set(&ops.target(), &service, &file))
            }
            RouteAction::Clear { service, ops } => {
                block_on(ops::routes_clear(&ops.target(), &service))
            }
        },
        Command::Rollout {
            service,
            canary,
            stable,
            steps,
            interval,
            max_error_rate,
            max_p99,
            max_p99_ratio,
            min_requests,
            pause_at,
            shadow,
            approve,
            abort,
            ops,
        } => {
            let action = if approve {
                ops::RolloutAction::Approve
            } else if abort {
                ops::RolloutAction::Abort
            } else if let Some(canary) = canary {
                ops::RolloutAction::Start(serde_json::json!({
                    "canary": canary,
                    "stable": stable,
                    "steps": steps,
                    "interval_seconds": interval,
                    "pause_at": pause_at,
                    "shadow": shadow,
                    "thresholds": {
                        "min_requests": min_requests,
                        "max_error_rate": max_error_rate,
                        "max_p99": max_p99,
                        "max_p99_ratio": max_p99_ratio,
                    },
                }))
            } else {
                ops::RolloutAction::Show
            };
            block_on(ops::rollout(&ops.target(), &service, action))
        }
        Command::Status {
            service,
            window,
            ops,
        } => block_on(ops::status(&ops.target(), service.as_deref(), window)),
        Command::CheckConfig { file } => return check_config(&file),
        Command::Demo {
            duration,
            rate,
            step,
        } => runtime(None).and_then(|rt| {
            rt.block_on(demo::run(
                duration.map(std::time::Duration::from_secs),
                rate,
                step.max(1),
            ))
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("almond: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A usage error found after parsing: clap's message, exit status 2.
fn usage(message: String) -> ! {
    use clap::CommandFactory;
    Cli::command()
        .error(clap::error::ErrorKind::ValueValidation, message)
        .exit()
}

/// Logs go to stderr; the level comes from `ALMOND_LOG` (or `RUST_LOG`),
/// e.g. `ALMOND_LOG=debug` or `ALMOND_LOG=almond_proxy=debug`. The filter
/// stays reloadable: the returned handle is what the proxy's admin
/// `PUT /log-level` calls. Without either variable, `default_level`.
fn init_logging(format: LogFormat, default_level: &str) -> almond_proxy::observe::LogLevel {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("ALMOND_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new(default_level));
    // Colours only for a terminal: a file, a pipe or journald gets plain
    // lines (and `NO_COLOR` turns them off anywhere).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => {
            let builder = builder.with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            log_level(handle)
        }
        LogFormat::Json => {
            let builder = builder.json().flatten_event(true).with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            log_level(handle)
        }
    }
}

/// Wraps a filter reload handle for the proxy's admin listener.
fn log_level<S: 'static>(
    handle: tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, S>,
) -> almond_proxy::observe::LogLevel {
    let current = handle.clone();
    almond_proxy::observe::LogLevel {
        get: Box::new(move || current.with_current(|f| f.to_string()).unwrap_or_default()),
        set: Box::new(move |text| {
            // Field values matched literally, never as regular
            // expressions: a pattern from the admin API would be compiled
            // into an automaton of unbounded size on a runtime worker.
            let filter = tracing_subscriber::EnvFilter::builder()
                .with_regex(false)
                .parse(text)
                .map_err(|e| e.to_string())?;
            handle.reload(filter).map_err(|e| e.to_string())
        }),
    }
}

/// A runtime with `workers` threads (default: the CPUs this process may
/// use); one worker gets the leaner current-thread scheduler.
fn runtime(workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let workers = workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let mut builder = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    builder
        .enable_all()
        .build()
        .context("cannot start the runtime")
}

fn run_proxy(
    path: &std::path::Path,
    log_level: almond_proxy::observe::LogLevel,
) -> anyhow::Result<()> {
    let config = almond_config::load_proxy_file(path)?;
    let rt = runtime(config.workers)?;
    rt.block_on(async move {
        let bound = almond_proxy::Bound::bind(&config)?;
        let services: Vec<String> = (config.listeners.iter())
            .map(|l| l.service.clone().unwrap_or_else(|| "(by host)".into()))
            .collect();
        // Built before "listening" is said: a start it refuses (a token
        // variable unset) logs only its reason.
        let proxy = almond_proxy::Proxy::new(config)?;
        // Signals are watched before "listening" is said: one sent just
        // after would otherwise take its default action (end the process).
        let shutdown = shutdown_signal();
        #[cfg(unix)]
        let others = hup_and_usr1();
        for (service, addr) in services.iter().zip(bound.listener_addrs()) {
            tracing::info!(%addr, service = %service, "listening");
        }
        if let Some(admin) = bound.admin_addr() {
            tracing::info!(%admin, "admin listening");
        }
        let _ = proxy.shared().observe.log_level.set(log_level);
        #[cfg(unix)]
        tokio::spawn(proxy_signals(proxy.clone(), path.to_owned(), others));
        proxy.run(bound, shutdown).await;
        Ok(())
    })
}

/// Runs one operator command on a small runtime.
fn block_on(work: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    runtime(Some(1))?.block_on(work)
}

fn run_control(path: &std::path::Path) -> anyhow::Result<()> {
    let config = almond_config::load_control_file(path)?;
    let rt = runtime(None)?;
    rt.block_on(async move {
        // Built first: a start it refuses (a token variable unset) logs
        // no "listening" before its reason.
        let listen = config.listen;
        let control = almond_control::Control::new(config)?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot bind {listen}"))?;
        let bound = listener.local_addr().unwrap_or(listen);
        let shutdown = shutdown_signal();
        #[cfg(unix)]
        let others = hup_and_usr1();
        tracing::info!(addr = %bound, "control API listening");
        #[cfg(unix)]
        tokio::spawn(control_signals(others));
        control.run(listener, shutdown).await;
        Ok(())
    })
}

/// Resolves on SIGTERM or SIGINT, watched from the call on (not from the
/// future's first poll: a signal before it would end the process); a
/// second one, during the drain that follows, ends the process at once
/// (exit 1), as an operator who pressed Ctrl-C twice means.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let watched = {
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        )
    };
    async move {
        #[cfg(unix)]
        match watched {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = int.recv() => {},
                    _ = term.recv() => {},
                }
                tokio::spawn(async move {
                    tokio::select! {
                        _ = int.recv() => {},
                        _ = term.recv() => {},
                    }
                    tracing::warn!(
                        "second stop signal: exiting now, without the rest of the drain"
                    );
                    std::process::exit(1);
                });
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// SIGHUP and SIGUSR1, watched from now on.
#[cfg(unix)]
type OtherSignals = (tokio::signal::unix::Signal, tokio::signal::unix::Signal);

/// Starts watching SIGHUP and SIGUSR1 (their default action ends the
/// process); `None` if the runtime cannot.
#[cfg(unix)]
fn hup_and_usr1() -> Option<OtherSignals> {
    use tokio::signal::unix::{signal, SignalKind};
    Some((
        signal(SignalKind::hangup()).ok()?,
        signal(SignalKind::user_defined1()).ok()?,
    ))
}

/// The proxy's other signals: SIGHUP reads the config file again (see
/// `almond_proxy::reload`), SIGUSR1 reopens the access log's file (after
/// logrotate), as Nginx's do. Either used to end the process.
#[cfg(unix)]
async fn proxy_signals(
    proxy: almond_proxy::Proxy,
    path: std::path::PathBuf,
    signals: Option<OtherSignals>,
) {
    let Some((mut hup, mut usr1)) = signals else {
        tracing::warn!("cannot watch SIGHUP and SIGUSR1: reload and log reopening are off");
        return;
    };
    loop {
        tokio::select! {
            Some(()) = hup.recv() => reload(&proxy, &path).await,
            Some(()) = usr1.recv() => match &proxy.shared().observe.access_log {
                Some(log) => log.reopen().await,
                None => tracing::info!("SIGUSR1: no access log file to reopen"),
            },
            else => return,
        }
    }
}

/// SIGHUP: the config file read and checked again; its services applied,
/// or why not logged (the running configuration stays).
#[cfg(unix)]
async fn reload(proxy: &almond_proxy::Proxy, path: &std::path::Path) {
    let owned = path.to_owned();
    let loaded = tokio::task::spawn_blocking(move || almond_config::load_proxy_file(&owned)).await;
    let new = match loaded {
        Ok(Ok(new)) => new,
        Ok(Err(e)) => {
            proxy.shared().metrics.config_refused("reload");
            tracing::error!(config = %path.display(), "reload refused, the running configuration stays: {e:#}");
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, "reload failed");
            return;
        }
    };
    match proxy.reload(new) {
        Ok(done) => {
            if !done.restart.is_empty() {
                tracing::warn!(keys = %done.restart.join(", "), "reload: these keys changed and take effect on a restart");
            }
            tracing::info!(config = %path.display(), services_changed = done.services, "reloaded");
        }
        Err(problem) => {
            proxy.shared().metrics.config_refused("reload");
            tracing::error!(config = %path.display(), %problem, "reload refused, the running configuration stays");
        }
    }
}

/// The control plane has no reload: SIGHUP says so instead of ending the
/// process (its default), and SIGUSR1 is ignored.
#[cfg(unix)]
async fn control_signals(signals: Option<OtherSignals>) {
    let Some((mut hup, mut usr1)) = signals else {
        return;
    };
    loop {
        tokio::select! {
            Some(()) = hup.recv() => tracing::warn!("SIGHUP: the control plane has no reload; restart it to apply a changed config file"),
            Some(()) = usr1.recv() => {},
            else => return,
        }
    }
}

fn check_config(path: &std::path::Path) -> ExitCode {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("{}: cannot read: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    let name = path.display().to_string();
    let (kind, result) = if almond_config::is_control_config(&text) {
        let loaded = almond_config::load_control(&text, &name);
        (
            "control",
            loaded.map(|c| almond_config::control_warnings(&c)),
        )
    } else {
        let loaded = almond_config::load_proxy(&text, &name);
        ("proxy", loaded.map(|c| almond_config::proxy_warnings(&c)))
    };
    match result {
        Ok(mut warnings) => {
            // Allowed, so still ok (exit 0); said on stderr, with lines.
            almond_config::locate(&text, &mut warnings);
            for w in &warnings {
                eprintln!("{name}: warning: {w}");
            }
            println!("{name}: ok ({kind} config)");
            ExitCode::SUCCESS
        }
        Err(problems) => {
            eprintln!("{problems}");
            ExitCode::FAILURE
        }
    }
}
