//! Golden metrics: every name and label set of CONTRACT.md lives here.
//!
//! Families are registered once; the route table resolves per-(direction,
//! service, subset) handles when it is built, so the request path only
//! increments atomics (see [`SubsetMetrics`]).

use crate::outcome::{CodeClass, ErrorKind};
use almond_config::{CodeSet, Direction, GrpcCode, Protocol, Service};
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::sync::Arc;

/// Latency buckets in seconds (shared with the watcher, which reads them).
const DURATION_BUCKETS: &[f64] = almond_config::LATENCY_BUCKETS;

/// The metric families of one proxy, in their own registry.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    grpc_responses: IntCounterVec,
    duration: HistogramVec,
    in_flight: IntGaugeVec,
    upstream_errors: IntCounterVec,
    endpoints: IntGaugeVec,
    ejections: IntCounterVec,
    retries: IntCounterVec,
    zone_requests: IntCounterVec,
    split_weight: IntGaugeVec,
    access_log_dropped: IntCounterVec,
    guarded: IntCounterVec,
    mirror_dropped: IntCounterVec,
    trace_spans_dropped: IntCounterVec,
    /// Spans the collector accepted (`tracing.otlp`).
    pub trace_spans_exported: IntCounter,
    /// Export requests that failed or timed out (`tracing.otlp`).
    pub trace_export_errors: IntCounter,
    /// Requests the proxy could not route: no host, an unknown service or
    /// an unknown pinned subset (no labels: their values would come from the
    /// request).
    pub unroutable: IntCounter,
    /// HTTP/1.1 request heads hyper's server refused before they reached
    /// the pipeline (400 malformed, 414, 431 too large).
    pub malformed: IntCounter,
    /// Requests on `tls` listeners answered 403: the client's identity is
    /// not in `allow` (no labels: identities are not bounded).
    pub tls_denied: IntCounter,
    /// Client connections closed at accept: the listener had
    /// `limits.max_connections` open.
    pub connections_refused: IntCounter,
    /// Inbound TLS handshakes that failed or timed out (no certificate, an
    /// untrusted or expired one, plain HTTP on a TLS port).
    pub tls_handshake_failures: IntCounter,
    /// Index of the active config (0 in static mode).
    pub config_index: IntGauge,
    /// 1 while the control plane answers (static mode: 0).
    pub control_connected: IntGauge,
    /// Snapshot reads from the control plane that failed (Envoy's xDS
    /// `update_failure`).
    pub control_failures: IntCounter,
    config_refused: IntCounterVec,
    /// When the config in force was applied (Unix seconds): at start, a
    /// snapshot, a reload; a cache's write time when started from it.
    pub config_applied: Gauge,
    /// Request summaries sent to tap watchers (admin `/tap`).
    pub tap_events: IntCounter,
    /// Request summaries a tap filter passed but that were not sent: over
    /// the per-second budget, or the watcher read too slowly.
    pub tap_dropped: IntCounter,
}

/// Handles for one (direction, service, subset), resolved at table build.
#[derive(Clone)]
pub struct SubsetMetrics {
    requests: [IntCounter; CodeClass::COUNT],
    /// Time from the request's arrival to the response's headers.
    pub duration: Histogram,
    errors: [IntCounter; ErrorKind::UPSTREAM_KINDS.len()],
    /// gRPC classification (HTTP/2 services only).
    pub grpc: Option<Arc<GrpcMetrics>>,
}

/// gRPC handles of one (direction, service, subset): calls by
/// `grpc-status`, and the `code_class="2xx"` request counters by outcome
/// (a gRPC call answers 200 whether it failed or not).
pub struct GrpcMetrics {
    codes: [IntCounter; GrpcCode::COUNT],
    success: IntCounter,
    failure: IntCounter,
    failure_codes: CodeSet,
}

impl GrpcMetrics {
    /// Counts a finished gRPC call by its status: in
    /// `almond_grpc_responses_total`, and in `almond_requests_total` as a
    /// failure when the service's `grpc.failure_codes` name it.
    #[inline]
    pub fn record(&self, code: GrpcCode) {
        self.codes[code as usize].inc();
        if self.failure_codes.contains(code) {
            self.failure.inc();
        } else {
            self.success.inc();
        }
    }
}

impl GrpcMetrics {
    /// Counts a call the proxy answered itself (no endpoint, timed out):
    /// in `almond_grpc_responses_total` only, by the status its client
    /// got (`almond_requests_total` has it as an error already).
    #[inline]
    pub fn record_local(&self, code: GrpcCode) {
        self.codes[code as usize].inc();
    }
}

impl SubsetMetrics {
    /// Counts a finished request by its class (the class fixes the outcome).
    #[inline]
    pub fn record(&self, class: CodeClass, seconds: f64) {
        self.requests[class as usize].inc();
        self.duration.observe(seconds);
    }

    /// The counter of `kind="timeout"` upstream errors (for a response
    /// body that stalls after its headers were counted).
    pub fn timeouts(&self) -> IntCounter {
        self.errors[1].clone()
    }

    /// Counts an upstream error by kind (only the kinds of CONTRACT.md).
    #[inline]
    pub fn upstream_error(&self, kind: ErrorKind) {
        if let Some(i) = kind.upstream_index() {
            self.errors[i].inc();
        }
    }
}

impl Metrics {
    /// Registers every family in a fresh registry, with process metrics.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let r = &registry;
        let requests = counter_vec(
            r,
            "almond_requests_total",
            "Requests handled, by outcome.",
            &["direction", "service", "subset", "code_class", "outcome"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "almond_request_duration_seconds",
                "Time from a request's arrival to its response headers.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["direction", "service", "subset"],
        )?;
        registry.register(Box::new(duration.clone()))?;
        let in_flight = IntGaugeVec::new(
            Opts::new(
                "almond_requests_in_flight",
                "Requests not yet finished, open tunnels included.",
            ),
            &["direction", "service"],
        )?;
        registry.register(Box::new(in_flight.clone()))?;
        let endpoints = IntGaugeVec::new(
            Opts::new("almond_endpoints", "Endpoints known, by state."),
            &["service", "subset", "state"],
        )?;
        registry.register(Box::new(endpoints.clone()))?;
        let split_weight = IntGaugeVec::new(
            Opts::new(
                "almond_split_weight",
                "Percent of a service's traffic sent to a subset.",
            ),
            &["service", "subset"],
        )?;
        registry.register(Box::new(split_weight.clone()))?;
        let metrics = Metrics {
            requests,
            grpc_responses: counter_vec(
                r,
                "almond_grpc_responses_total",
                "gRPC calls finished, by grpc-status (HTTP/2 services).",
                &["direction", "service", "subset", "grpc_status"],
            )?,
            duration,
            in_flight,
            upstream_errors: counter_vec(
                r,
                "almond_upstream_errors_total",
                "Requests that got no upstream response, by kind.",
                &["service", "subset", "kind"],
            )?,
            endpoints,
            ejections: counter_vec(
                r,
                "almond_endpoint_ejections_total",
                "Endpoints taken out of balancing by failure accrual.",
                &["service", "subset"],
            )?,
            retries: counter_vec(
                r,
                "almond_retries_total",
                "Retries sent (not first tries).",
                &["service"],
            )?,
            zone_requests: counter_vec(
                r,
                "almond_zone_requests_total",
                "First tries sent to the local zone's endpoints or to other zones (zone-aware balancing).",
                &["service", "zone"],
            )?,
            split_weight,
            guarded: counter_vec(
                r,
                "almond_guarded_requests_total",
                "Requests a guard answered: denied (almond block), or over a rate limit (almond limit).",
                &["service", "reason"],
            )?,
            access_log_dropped: counter_vec(
                r,
                "almond_access_log_dropped_total",
                "Access log lines not written: writer queue full, or over max_per_second.",
                &["reason"],
            )?,
            mirror_dropped: counter_vec(
                r,
                "almond_mirror_dropped_total",
                "Requests not copied to a mirror: max_in_flight copies out, or a body not kept.",
                &["service", "reason"],
            )?,
            trace_spans_dropped: counter_vec(
                r,
                "almond_trace_spans_dropped_total",
                "Spans not exported: export queue full, or the export failed.",
                &["reason"],
            )?,
            trace_spans_exported: counter(
                r,
                "almond_trace_spans_exported_total",
                "Spans sent to the OTLP collector and accepted.",
            )?,
            trace_export_errors: counter(
                r,
                "almond_trace_export_errors_total",
                "OTLP export requests that failed or timed out.",
            )?,
            unroutable: counter(
                r,
                "almond_unroutable_requests_total",
                "Requests that named no known service or subset, or no host.",
            )?,
            malformed: counter(
                r,
                "almond_malformed_requests_total",
                "HTTP/1.1 request heads refused before routing: malformed (400) or too large (414, 431).",
            )?,
            tls_denied: counter(
                r,
                "almond_tls_denied_requests_total",
                "Requests on tls listeners refused with 403: client identity not allowed.",
            )?,
            tls_handshake_failures: counter(
                r,
                "almond_tls_handshake_failures_total",
                "Inbound TLS handshakes that failed or timed out.",
            )?,
            connections_refused: counter(
                r,
                "almond_connections_refused_total",
                "Client connections closed at accept: the listener was at limits.max_connections.",
            )?,
            config_index: gauge(r, "almond_config_index", "Index of the active config.")?,
            config_refused: counter_vec(
                r,
                "almond_config_refused_total",
                "Configuration not applied: a snapshot refused whole, one service of a snapshot refused, a reload refused.",
                &["reason"],
            )?,
            config_applied: {
                let g = Gauge::new(
                    "almond_config_applied_timestamp_seconds",
                    "When the config in force was applied (Unix time).",
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            control_connected: gauge(
                r,
                "almond_control_connected",
                "1 while the control plane answers.",
            )?,
            control_failures: counter(
                r,
                "almond_control_failures_total",
                "Snapshot reads from the control plane that failed: unreachable, TLS or a credential refused, an answer too large or unreadable.",
            )?,
            tap_events: counter(
                r,
                "almond_tap_events_total",
                "Request summaries sent to tap watchers.",
            )?,
            tap_dropped: counter(
                r,
                "almond_tap_events_dropped_total",
                "Request summaries a tap filter passed but not sent: over the per-second cap, or a slow watcher.",
            )?,
            registry,
        };
        for reason in ["queue_full", "rate_limit"] {
            metrics.access_log_dropped.with_label_values(&[reason]);
        }
        for reason in ["queue_full", "export_failed"] {
            metrics.trace_spans_dropped.with_label_values(&[reason]);
        }
        for reason in ["snapshot", "service", "reload"] {
            metrics.config_refused.with_label_values(&[reason]);
        }
        #[cfg(target_os = "linux")]
        metrics.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(metrics)
    }

    /// Resolves the handles of one (direction, service, subset); `svc`
    /// decides whether there are gRPC ones (HTTP/2 services).
    pub fn subset(
        &self,
        direction: Direction,
        service: &str,
        subset: &str,
        svc: &Service,
    ) -> SubsetMetrics {
        self.subset_labeled(direction.as_str(), service, subset, svc)
    }

    /// [`Metrics::subset`] for a direction label of its own (`mirror`:
    /// copies of requests, which no listener receives).
    pub fn subset_labeled(
        &self,
        d: &str,
        service: &str,
        subset: &str,
        svc: &Service,
    ) -> SubsetMetrics {
        let grpc = (svc.protocol == Protocol::Http2).then(|| {
            let success = CodeClass::Success;
            Arc::new(GrpcMetrics {
                codes: GrpcCode::ALL.map(|code| {
                    self.grpc_responses
                        .with_label_values(&[d, service, subset, code.name()])
                }),
                success: self.requests.with_label_values(&[
                    d,
                    service,
                    subset,
                    success.label(),
                    "success",
                ]),
                failure: self.requests.with_label_values(&[
                    d,
                    service,
                    subset,
                    success.label(),
                    "failure",
                ]),
                failure_codes: CodeSet::of(&svc.grpc.failure_codes),
            })
        });
        let requests = CodeClass::ALL.map(|class| {
            self.requests.with_label_values(&[
                d,
                service,
                subset,
                class.label(),
                class.outcome_label(),
            ])
        });
        let errors = ErrorKind::UPSTREAM_KINDS.map(|kind| {
            self.upstream_errors.with_label_values(&[
                service,
                subset,
                kind.metric_kind().unwrap_or("other"),
            ])
        });
        SubsetMetrics {
            requests,
            duration: self.duration.with_label_values(&[d, service, subset]),
            errors,
            grpc,
        }
    }

    /// The in-flight gauge of one (direction, service).
    pub fn in_flight(&self, direction: Direction, service: &str) -> IntGauge {
        self.in_flight
            .with_label_values(&[direction.as_str(), service])
    }

    /// The ejection counter and endpoint-state gauges of a subset.
    pub fn ejection(&self, service: &str, subset: &str) -> EjectionMetrics {
        EjectionMetrics {
            ejections: self.ejections.with_label_values(&[service, subset]),
            healthy: self
                .endpoints
                .with_label_values(&[service, subset, "healthy"]),
            ejected: self
                .endpoints
                .with_label_values(&[service, subset, "ejected"]),
        }
    }

    /// Drops every series of a subset that is gone (its endpoints left
    /// the table), so dashboards and the watcher do not see its last values
    /// forever. A subset that comes back starts from zero, which
    /// Prometheus reads as a counter reset.
    pub fn forget_subset(&self, service: &str, subset: &str) {
        for state in ["healthy", "ejected"] {
            let _ = self
                .endpoints
                .remove_label_values(&[service, subset, state]);
        }
        for d in ["outbound", "inbound", "mirror"] {
            for class in CodeClass::ALL {
                let labels = [d, service, subset, class.label(), class.outcome_label()];
                let _ = self.requests.remove_label_values(&labels);
            }
            let grpc_failure = [d, service, subset, CodeClass::Success.label(), "failure"];
            let _ = self.requests.remove_label_values(&grpc_failure);
            for code in GrpcCode::ALL {
                let labels = [d, service, subset, code.name()];
                let _ = self.grpc_responses.remove_label_values(&labels);
            }
            let _ = self.duration.remove_label_values(&[d, service, subset]);
        }
        for kind in ErrorKind::UPSTREAM_KINDS {
            let labels = [service, subset, kind.metric_kind().unwrap_or("other")];
            let _ = self.upstream_errors.remove_label_values(&labels);
        }
        let _ = self.ejections.remove_label_values(&[service, subset]);
        self.forget_split(service, subset);
    }

    /// Drops the per-service series of a service that is gone (its
    /// subsets are forgotten one by one).
    pub fn forget_service(&self, service: &str) {
        for direction in [Direction::Outbound, Direction::Inbound] {
            let _ = self
                .in_flight
                .remove_label_values(&[direction.as_str(), service]);
        }
        let _ = self.retries.remove_label_values(&[service]);
        for zone in ["local", "remote"] {
            let _ = self.zone_requests.remove_label_values(&[service, zone]);
        }
        for reason in ["full", "body", "subset"] {
            let _ = self.mirror_dropped.remove_label_values(&[service, reason]);
        }
    }

    /// The zone-aware counters of a service: first tries sent to the
    /// local zone, and to other zones.
    pub fn zone_requests(&self, service: &str) -> [IntCounter; 2] {
        ["local", "remote"].map(|zone| self.zone_requests.with_label_values(&[service, zone]))
    }

    /// Copies of `service`'s requests not mirrored, by `reason` (`full`:
    /// `max_in_flight` copies were out; `body`: a body not kept for retry;
    /// `subset`: the mirror's subset has no endpoints).
    pub fn mirror_dropped(&self, service: &str, reason: &str) -> IntCounter {
        self.mirror_dropped.with_label_values(&[service, reason])
    }

    /// Drops a subset's split weight gauge (the split is gone).
    pub fn forget_split(&self, service: &str, subset: &str) {
        let _ = self.split_weight.remove_label_values(&[service, subset]);
    }

    /// `almond_guarded_requests_total{service, reason}`.
    pub fn guarded(&self, service: &str, reason: &str) -> IntCounter {
        self.guarded.with_label_values(&[service, reason])
    }

    /// A service's guards are gone (or the service is): its guarded-answer
    /// counters too (the guard subset's series go with `forget_subset`).
    pub fn forget_guarded(&self, service: &str) {
        for reason in ["denied", "rate_limited"] {
            let _ = self.guarded.remove_label_values(&[service, reason]);
        }
    }

    /// The access log's drop counter for `reason` (`queue_full`, `rate_limit`).
    pub fn access_log_dropped(&self, reason: &str) -> IntCounter {
        self.access_log_dropped.with_label_values(&[reason])
    }

    /// Counts configuration not applied, for `reason` (`snapshot`: a
    /// snapshot refused whole; `service`: one service of a snapshot;
    /// `reload`: a SIGHUP reload).
    pub fn config_refused(&self, reason: &str) {
        self.config_refused.with_label_values(&[reason]).inc();
    }

    /// Notes that the config in force was applied at `at`.
    pub fn config_applied_at(&self, at: std::time::SystemTime) {
        let seconds = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        self.config_applied.set(seconds.as_secs_f64());
    }

    /// The span drop counter for `reason` (`queue_full`, `export_failed`).
    pub fn trace_spans_dropped(&self, reason: &str) -> IntCounter {
        self.trace_spans_dropped.with_label_values(&[reason])
    }

    /// The retry counter of a service.
    pub fn retries(&self, service: &str) -> IntCounter {
        self.retries.with_label_values(&[service])
    }

    /// Sets a subset's split weight gauge.
    pub fn set_split_weight(&self, service: &str, subset: &str, percent: u32) {
        self.split_weight
            .with_label_values(&[service, subset])
            .set(i64::from(percent));
    }

    /// Static mode: `almond_control_connected` and
    /// `almond_control_failures_total` are not served (nothing to connect
    /// to), so that a rule on them (`AlmondProxyDisconnected`) sees
    /// following proxies alone, the one that never connected included.
    pub fn without_control(self) -> Metrics {
        let _ = (self.registry).unregister(Box::new(self.control_connected.clone()));
        let _ = (self.registry).unregister(Box::new(self.control_failures.clone()));
        self
    }

    /// The Prometheus text exposition of every family.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail for well-formed families.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        out
    }
}

/// Ejection metrics of one subset.
#[derive(Clone)]
pub struct EjectionMetrics {
    /// `almond_endpoint_ejections_total{service, subset}`.
    pub ejections: IntCounter,
    /// `almond_endpoints{service, subset, state="healthy"}`.
    pub healthy: IntGauge,
    /// `almond_endpoints{service, subset, state="ejected"}`.
    pub ejected: IntGauge,
}

impl EjectionMetrics {
    /// Sets the subset's endpoint counts by state from (members, out).
    pub fn update(&self, (members, out): (usize, usize)) {
        self.ejected.set(out as i64);
        self.healthy.set(members.saturating_sub(out) as i64);
    }
}

/// A counter family, registered.
fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, prometheus::Error> {
    let family = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(family.clone()))?;
    Ok(family)
}

/// A counter, registered.
fn counter(registry: &Registry, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
    let counter = IntCounter::new(name, help)?;
    registry.register(Box::new(counter.clone()))?;
    Ok(counter)
}

/// A gauge, registered.
fn gauge(registry: &Registry, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
    let gauge = IntGauge::new(name, help)?;
    registry.register(Box::new(gauge.clone()))?;
    Ok(gauge)
}
