//! almond's shared model: the contract between the planes.
//!
//! The proxy config (and the per-service shape the control plane will send in
//! snapshots), how it is parsed from YAML or JSON, and how it is checked.
//! Every problem is reported with its key path and line ([`Problem`]); the
//! same [`load_proxy`] serves `almond check-config`, start-up and reload.

mod control;
mod duration;
mod grpc;
mod guards;
mod lines;
mod load;
mod observe;
mod path;
mod problem;
mod proxy;
mod rules;
mod secret;
mod snapshot;
mod split;
pub mod tap;
mod tls;
mod warnings;
mod write;

pub use control::{
    ConsulIntentions, ConsulSource, ControlConfig, IntentionDefault, Notify, NotifyFormat,
    ServiceDefaults, Source, Store, Watcher, WatcherScrape, WatcherSource,
};
pub use grpc::{CodeSet, Grpc, GrpcCode};
pub use guards::{check_guards, Deny, Guard, Limit, LimitBy, LimitScope, Rate, MAX_GUARDS};
pub use load::{
    check_service, is_control_config, load_control, load_control_file, load_proxy, load_proxy_file,
    load_rules, load_services, validate_proxy, Strictness,
};
pub use observe::{AccessLog, AccessLogFormat, Otlp, Tracing, LATENCY_BUCKETS};
pub use path::{canonical_match, normalize_path, slashes_unescaped};
pub use problem::{Problem, Problems};
pub use proxy::{
    check_identity, check_service_name, Authz, CircuitBreaker, Condition, Direction, Endpoint,
    HealthCheck, Lb, Limits, Listener, Protocol, ProxyConfig, Retries, Service, Timeouts, Tls,
    UpstreamTls, DEFAULT_SUBSET,
};
pub use rules::{
    check_match, check_mirror, check_rules, HeaderMatch, Match, Mirror, RouteRule, RouteTo,
    MAX_RULES,
};
pub use secret::Secret;
pub use snapshot::Snapshot;
pub use split::{check_split_subset, check_sticky_header, Split, Weights};
pub use warnings::{control_warnings, locate, proxy_warnings};
pub use write::write_atomic;
