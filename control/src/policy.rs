//! Policy: a service's traffic split, the split before it (for rollback),
//! and an audit trail of who changed what, when. Checked here; kept by
//! `store`; merged into the services proxies receive.

use crate::watcher::rollout::Rollout;
use almond_config::{
    canonical_match, check_guards, check_identity, check_mirror, check_rules, check_sticky_header,
    Authz, Guard, Match, Mirror, RouteRule, Service, Split, Weights,
};
use serde::{Deserialize, Serialize};

/// Changes kept in a policy's audit trail.
const HISTORY: usize = 50;

/// A service's traffic policy, as stored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Bumped by every change; a shift may name the version it saw. Only
    /// compared for equality, so past `u64::MAX` (a value edited into the
    /// store by hand) it wraps to 0 rather than failing every change.
    #[serde(default)]
    pub version: u64,
    /// Bumped by every write to the file store (its check-and-set token:
    /// watcher writes that leave `version` alone still conflict).
    #[serde(default)]
    pub revision: u64,
    /// The split in force (`None`: all subsets by endpoint weight).
    #[serde(default)]
    pub split: Option<Weights>,
    /// Header that keeps a user on one side of the split (see
    /// `split.sticky_header`). Kept apart from the weights: shifts,
    /// promotions, rollbacks and rollout steps change weights and leave it
    /// alone, as Envoy's hash policy is independent of cluster weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky_header: Option<String>,
    /// The split before the current one, for `rollback`.
    #[serde(default)]
    pub previous: Option<Weights>,
    /// There was no split before the current one (the source's split, or
    /// all subsets by endpoint weight): `rollback` clears the split. Apart
    /// from `previous`, whose `None` also means "nothing to roll back to",
    /// and stays so for policies stored before this field.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub previous_none: bool,
    /// Newest last.
    #[serde(default)]
    pub history: Vec<Change>,
    /// The staged rollout, running or finished (the last one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
    /// Who may call the service on inbound `tls` listeners (`almond
    /// authz`); once set, it replaces the source's and is enforced by
    /// every proxy serving the service inbound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authz: Option<Authz>,
    /// Guards set by `almond block` and `almond limit` (newest first);
    /// once set, they replace the source's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guards: Option<Vec<Guard>>,
    /// Rollout events, oldest first (the last `EVENTS`), numbered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<Event>,
    /// Route rules set with `almond route` (`PUT .../routes`); once set
    /// they replace the source's; `None` (`DELETE`): the source's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<Vec<RouteRule>>,
    /// Mirroring set with `almond mirror` (`PUT .../mirror`); once set it
    /// replaces the source's; `None` (`DELETE`): the source's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
}

/// Events kept per service.
pub const EVENTS: usize = 100;

/// A rollout's change of state, or a guard set or removed, for people and
/// tools to follow (`GET /v1/services/{svc}/events`, `almond events`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// 1, 2, 3, ... per service, never reused.
    pub seq: u64,
    /// Unix ms.
    pub at: u64,
    /// Rollouts: `started`, `step_passed`, `step_failed`,
    /// `step_inconclusive`, `paused`, `approved`, `promoted`,
    /// `rolled_back`, `aborted`. Guards: `blocked`, `limited`, `unblocked`.
    pub kind: String,
    /// The rollout's canary (empty for guard events).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub canary: String,
    /// Canary percent of the step it concerns (rollout events only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    /// The figures or reason (a verdict's, or why it ended); for guards,
    /// the match and the deny status or the rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Who made the change (guard events: the token's owner).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// One change, for the audit trail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// Unix seconds.
    pub at: u64,
    /// Who (the token's owner, or `anonymous`).
    pub by: String,
    /// What was in force before.
    pub from: Option<Weights>,
    /// What is in force after.
    pub to: Option<Weights>,
    /// `shift`, `promote`, `rollback`, or a rollout step.
    pub action: String,
    /// The sticky header in force after the change, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky_header: Option<String>,
    /// `authz allow` / `authz deny`: the identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// `block`, `limit`, `unblock`: the guard concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard: Option<Guard>,
    /// `routes set` / `routes clear`: the rules in force after the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<Vec<RouteRule>>,
    /// `mirror set`: the mirror in force after the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
}

/// A refused change, with the HTTP status it maps to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The request is wrong (bad weights, unknown subset).
    #[error("{0}")]
    Invalid(String),
    /// The service does not exist.
    #[error("unknown service {0:?}")]
    UnknownService(String),
    /// Someone else changed the policy first.
    #[error("{0}")]
    Conflict(String),
}

/// Checks a split against the service's subsets. `allow_empty` names
/// subsets that may have no endpoints yet (a canary about to deploy);
/// `current` is the split in force, whose subsets may be set to 0 gone.
pub fn check_split(
    weights: &Weights,
    service: &Service,
    allow_empty: &[String],
    current: Option<&Weights>,
) -> Result<(), Refusal> {
    if weights.is_empty() {
        return Err(Refusal::Invalid("a split needs at least one subset".into()));
    }
    for (subset, w) in weights {
        almond_config::check_split_subset(subset).map_err(Refusal::Invalid)?;
        if *w > 100 {
            return Err(Refusal::Invalid(format!(
                "weight of {subset} is {w}; weights are percent, 0 to 100"
            )));
        }
        // A subset at 0 that the split in force names may be gone
        // (retired, or all of it unhealthy): promoting off a dead subset
        // must not need it. Any other unknown name is a typo.
        let was_split = *w == 0 && current.is_some_and(|c| c.contains_key(subset));
        let exists = was_split || service.endpoints.iter().any(|e| &e.subset == subset);
        if !exists && !allow_empty.contains(subset) {
            let known: Vec<&str> = {
                let mut k: Vec<&str> = service
                    .endpoints
                    .iter()
                    .map(|e| e.subset.as_str())
                    .collect();
                k.sort_unstable();
                k.dedup();
                k
            };
            return Err(Refusal::Invalid(format!(
                "subset {subset:?} has no endpoints (known: {}); to split to it anyway: `almond shift ... --allow-empty {subset}` (API: \"allow_empty\": [{subset:?}])",
                known.join(", ")
            )));
        }
    }
    let sum: u32 = weights.values().sum();
    if sum != 100 {
        return Err(Refusal::Invalid(format!("weights sum to {sum}, not 100")));
    }
    Ok(())
}

/// Checks route rules sent to the API: each `match`, a `to.subset` the
/// source knows (`subsets`), a `to.service` that exists (`exists`).
pub fn check_routes(
    rules: &[RouteRule],
    subsets: &[&str],
    exists: impl Fn(&str) -> bool,
) -> Result<(), Refusal> {
    let known = subsets.join(", ");
    let mut problems: Vec<String> = check_rules(rules, Some(subsets))
        .into_iter()
        .map(|(path, why)| {
            let path = path.trim_start_matches(".routes");
            if path.ends_with(".to.subset") {
                format!("routes{path}: {why} (known subsets: {known})")
            } else {
                format!("routes{path}: {why}")
            }
        })
        .collect();
    for (i, rule) in rules.iter().enumerate() {
        if let Some(to) = rule.to.service.as_deref().filter(|s| !exists(s)) {
            problems.push(format!("routes[{i}].to.service: no service named {to:?}"));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(Refusal::Invalid(problems.join("; ")))
}

/// Checks a mirror sent to the API: a subset the source knows
/// (`subsets`), a service that exists (`exists`), the numbers.
pub fn check_mirror_request(
    m: &Mirror,
    subsets: &[&str],
    exists: impl Fn(&str) -> bool,
) -> Result<(), Refusal> {
    let known = subsets.join(", ");
    let mut problems: Vec<String> = check_mirror(m, Some(subsets))
        .into_iter()
        .map(|(path, why)| {
            let path = path.trim_start_matches('.');
            if path.ends_with(".subset") {
                format!("{path}: {why} (known subsets: {known})")
            } else {
                format!("{path}: {why}")
            }
        })
        .collect();
    if let Some(to) = m.service.as_deref().filter(|s| !s.is_empty() && !exists(s)) {
        problems.push(format!("mirror.service: no service named {to:?}"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Refusal::Invalid(problems.join("; ")))
    }
}

/// Checks a sticky header sent to the API (`""` clears it).
pub fn check_sticky(header: Option<&str>) -> Result<(), Refusal> {
    match header {
        None | Some("") => Ok(()),
        Some(h) => {
            check_sticky_header(h).map_err(|e| Refusal::Invalid(format!("sticky_header: {e}")))
        }
    }
}

impl Policy {
    /// The policy after setting `split`; the current one becomes
    /// `previous`.
    pub fn with_split(&self, split: Weights, by: &str, action: &str, now: u64) -> Policy {
        let mut next = self.clone();
        next.version = next.version.wrapping_add(1);
        next.previous = self.split.clone();
        next.previous_none = self.split.is_none();
        next.split = Some(split);
        next.record(by, action, now);
        next
    }

    /// The policy after a rollout set `split` (a step, its end, its
    /// rollback): `previous` is the split in force before the canary
    /// (`restores`), so that `rollback` goes back there, not to the step
    /// before.
    pub fn with_rollout_split(
        &self,
        split: Weights,
        restores: Weights,
        by: &str,
        action: &str,
        now: u64,
    ) -> Policy {
        let mut next = self.with_split(split, by, action, now);
        next.previous = Some(restores);
        next.previous_none = false;
        next
    }

    /// `almond_rollout_step`: the canary's percent, the step's while its
    /// rollout runs, else the canary's weight in the split in force (a
    /// succeeded rollout's 100 until a rollback or shift moves it; 0 once
    /// rolled back). `None` without a rollout.
    pub fn rollout_step(&self) -> Option<u32> {
        let r = self.rollout.as_ref()?;
        if r.active() {
            return Some(r.canary_weight());
        }
        let in_force = self.split.as_ref().and_then(|s| s.get(&r.spec.canary));
        Some(in_force.copied().unwrap_or(0))
    }

    /// Was the last change of the split a rollback (its split still in
    /// force)? Changes that leave the split alone since (a guard, routes,
    /// a mirror, the allow-list) do not count.
    pub fn just_rolled_back(&self) -> bool {
        const LEAVE_THE_SPLIT: [&str; 9] = [
            "block",
            "limit",
            "unblock",
            "routes set",
            "routes clear",
            "mirror set",
            "mirror clear",
            "authz allow",
            "authz deny",
        ];
        self.history
            .iter()
            .rev()
            .find(|c| !LEAVE_THE_SPLIT.contains(&c.action.as_str()))
            .is_some_and(|c| c.action == "rollback" && c.to == self.split)
    }

    /// The policy after going back to the previous split: the one in
    /// force before the last shift, promotion or rollout, or none at all
    /// when there was none (the first shift of a service is rolled back
    /// to the source's split, or to all subsets by endpoint weight).
    pub fn rolled_back(&self, by: &str, now: u64) -> Result<Policy, Refusal> {
        // A replica of an older release writes the policy back without
        // `previous_none`: the trail says it too (the last change went
        // from no split to the one in force).
        let from_none = self
            .history
            .last()
            .is_some_and(|c| c.from.is_none() && c.to.is_some() && c.to == self.split);
        let previous = match (&self.previous, self.previous_none || from_none) {
            (Some(previous), _) => Some(previous.clone()),
            (None, true) => None,
            (None, false) => {
                return Err(Refusal::Conflict(
                    "no previous split to roll back to".into(),
                ))
            }
        };
        let mut next = self.clone();
        next.version = next.version.wrapping_add(1);
        next.previous = self.split.clone();
        next.previous_none = self.split.is_none();
        next.split = previous;
        next.record(by, "rollback", now);
        Ok(next)
    }

    fn record(&mut self, by: &str, action: &str, now: u64) {
        let from = self.previous.clone();
        self.history.push(Change {
            at: now,
            by: by.to_owned(),
            from,
            to: self.split.clone(),
            action: action.to_owned(),
            sticky_header: self.sticky_header.clone(),
            identity: None,
            guard: None,
            routes: None,
            mirror: None,
        });
        if self.history.len() > HISTORY {
            let cut = self.history.len() - HISTORY;
            self.history.drain(..cut);
        }
    }

    /// The policy after setting (`Some(name)`) or clearing (`Some("")`)
    /// the sticky header; `None` keeps it. Call before [`Policy::with_split`]
    /// so that the audit trail records it.
    pub fn with_sticky_header(mut self, header: Option<String>) -> Policy {
        if let Some(h) = header {
            self.sticky_header = (!h.is_empty()).then_some(h);
        }
        self
    }

    /// The policy after allowing (`allow: true`) or no longer allowing
    /// `identity` to call the service. The first change starts from the
    /// source's allow-list (`source`); denying the last identity leaves an
    /// empty list, which admits no one (never "everyone").
    pub fn with_authz(
        &self,
        source: Option<&Authz>,
        allow: bool,
        identity: &str,
        by: &str,
        now: u64,
    ) -> Result<Policy, Refusal> {
        check_identity(identity).map_err(Refusal::Invalid)?;
        // With no list in force every verified client may call: taking
        // one off would start a list of nobody (every caller refused).
        if !allow && self.authz.is_none() && source.is_none() {
            return Err(Refusal::Conflict(format!(
                "no allow-list: every verified client may call; allow the callers first, then {identity} is refused"
            )));
        }
        let mut next = self.clone();
        let list = next
            .authz
            .get_or_insert_with(|| source.cloned().unwrap_or_default());
        let present = list.allow.iter().any(|i| i == identity);
        match (allow, present) {
            (true, false) => list.allow.push(identity.to_owned()),
            (false, true) => list.allow.retain(|i| i != identity),
            _ => {}
        }
        next.version = next.version.wrapping_add(1);
        next.record(by, if allow { "authz allow" } else { "authz deny" }, now);
        if let Some(change) = next.history.last_mut() {
            change.from = self.split.clone();
            change.identity = Some(identity.to_owned());
        }
        Ok(next)
    }

    /// The policy after `almond block` / `almond limit` (`guard` set: it
    /// replaces any guard with the same match, else goes first, so the
    /// newest decision wins) or `almond unblock` (`guard` with no deny or
    /// limit: every guard with that match goes). The first change starts
    /// from the source's guards. Paths are compared, and kept, in the form
    /// proxies match them in (`canonical_match`): `/api/giveaway/` and
    /// `/api/%67iveaway` are `/api/giveaway`, one guard, not two.
    /// Recorded in the audit trail and as a `blocked`, `limited` or
    /// `unblocked` event (`now_ms`: unix ms).
    pub fn with_guard(
        &self,
        source: &[Guard],
        guard: Guard,
        by: &str,
        now_ms: u64,
    ) -> Result<Policy, Refusal> {
        let removing = guard.deny.is_none() && guard.limit.is_none();
        if !removing {
            if let Some((path, why)) = check_guards(std::slice::from_ref(&guard))
                .into_iter()
                .next()
            {
                return Err(Refusal::Invalid(format!(
                    "guard{}: {why}",
                    path.trim_start_matches(".guards[0]")
                )));
            }
        } else if let Some((path, why)) = almond_config::check_match(&guard.when).into_iter().next()
        {
            return Err(Refusal::Invalid(format!("match{path}: {why}")));
        }
        let guard = Guard {
            when: canonical_match(&guard.when).into_owned(),
            ..guard
        };
        let mut next = self.clone();
        let list = next.guards.get_or_insert_with(|| source.to_vec());
        // Guards stored before paths were canonical, or written in the
        // source, are compared in the same form.
        let same = |g: &Guard| *canonical_match(&g.when) == guard.when;
        let action = if removing {
            if !list.iter().any(same) {
                return Err(Refusal::Invalid(format!(
                    "no guard matches exactly {}",
                    describe(&guard.when)
                )));
            }
            list.retain(|g| !same(g));
            "unblock"
        } else {
            list.retain(|g| !same(g));
            list.insert(0, guard.clone());
            if guard.deny.is_some() {
                "block"
            } else {
                "limit"
            }
        };
        next.version = next.version.wrapping_add(1);
        next.record(by, action, now_ms / 1000);
        let (kind, detail) = match action {
            "unblock" => ("unblocked", describe(&guard.when)),
            "block" => ("blocked", describe_guard(&guard)),
            _ => ("limited", describe_guard(&guard)),
        };
        next.push_event(Event {
            at: now_ms,
            kind: kind.to_owned(),
            detail: Some(detail),
            by: Some(by.to_owned()),
            ..Event::default()
        });
        if let Some(change) = next.history.last_mut() {
            change.from = self.split.clone();
            change.guard = Some(guard);
        }
        Ok(next)
    }

    /// The policy after setting (`Some`) or clearing (`None`: back to the
    /// source's) the route rules, recorded in the audit trail.
    pub fn with_routes(&self, routes: Option<Vec<RouteRule>>, by: &str, now: u64) -> Policy {
        let mut next = self.clone();
        next.version = next.version.wrapping_add(1);
        let action = if routes.is_some() {
            "routes set"
        } else {
            "routes clear"
        };
        next.routes = routes;
        next.record(by, action, now);
        if let Some(change) = next.history.last_mut() {
            change.from = self.split.clone();
            change.routes = next.routes.clone();
        }
        next
    }

    /// The policy after setting (`Some`) or clearing (`None`) the mirror,
    /// recorded in the audit trail.
    pub fn with_mirror(&self, mirror: Option<Mirror>, by: &str, now: u64) -> Policy {
        let mut next = self.clone();
        next.version = next.version.wrapping_add(1);
        let action = if mirror.is_some() {
            "mirror set"
        } else {
            "mirror clear"
        };
        next.mirror = mirror;
        // A rollout with a shadow stage gives its kept mirror back when the
        // stage ends (and keeps its choice on every later write): the
        // operator's newest one is what it keeps.
        if let Some(r) = next.rollout.as_mut().filter(|r| r.spec.shadow.is_some()) {
            r.kept_mirror = next.mirror.clone();
        }
        next.record(by, action, now);
        if let Some(change) = next.history.last_mut() {
            change.from = self.split.clone();
            change.mirror = next.mirror.clone();
        }
        next
    }

    /// Appends the events that lead from `before`'s rollout to this one's:
    /// a start, each new verdict, each change of phase; returns them.
    pub fn record_events(&mut self, before: &Policy, now_ms: u64) -> Vec<Event> {
        use crate::watcher::rollout::Phase;
        let Some(r) = &self.rollout else {
            return Vec::new();
        };
        let old = before.rollout.as_ref();
        let mut out: Vec<(&str, u32, Option<String>)> = Vec::new();
        // A new rollout: another start time (the same spec may be started
        // again after an abort), else another spec or fewer verdicts
        // (rollouts stored without a start time).
        let fresh = old.is_none_or(|o| {
            o.started != r.started || o.spec != r.spec || r.verdict_count() < o.verdict_count()
        });
        // The new verdicts are the newest in the history; counted, not
        // found by position (the history keeps only the newest).
        let new = match old {
            Some(o) if !fresh => r.verdict_count() - o.verdict_count(),
            _ => r.verdict_count(),
        };
        let new = usize::try_from(new).unwrap_or(usize::MAX);
        if fresh {
            // At the first step, or 0 in a shadow stage (copies only).
            out.push(("started", r.percent(), None));
        }
        for j in r.history.iter().skip(r.history.len().saturating_sub(new)) {
            let (kind, detail) = match &j.verdict {
                crate::watcher::judge::Verdict::Pass => ("step_passed", None),
                crate::watcher::judge::Verdict::Fail(why) => ("step_failed", Some(why.clone())),
                crate::watcher::judge::Verdict::Inconclusive(why) => {
                    ("step_inconclusive", Some(why.clone()))
                }
            };
            let counts = j.figures.clone().unwrap_or_else(|| {
                format!(
                    "canary {} requests, stable {}",
                    j.canary_requests, j.stable_requests
                )
            });
            let detail = Some(match detail {
                Some(d) => format!("{d} ({counts})"),
                None => counts,
            });
            out.push((kind, j.percent, detail));
        }
        let was = if fresh { None } else { old.map(|o| &o.phase) };
        if was != Some(&r.phase) {
            let kinds: &[&str] = match (&r.phase, was) {
                (Phase::Paused, _) => &["paused"],
                (Phase::Running, Some(Phase::Paused)) => &["approved"],
                (Phase::Running, _) => &[],
                // The gate was on the last step: the approval promotes.
                (Phase::Succeeded, Some(Phase::Paused)) => &["approved", "promoted"],
                (Phase::Succeeded, _) => &["promoted"],
                (Phase::RolledBack, _) => &["rolled_back"],
                (Phase::Aborted, _) => &["aborted"],
            };
            for &kind in kinds {
                // Why it ended goes with the end, not with the approval.
                let reason = r.reason.clone().filter(|_| kind != "approved");
                out.push((kind, r.percent(), reason));
            }
        }
        let canary = r.spec.canary.clone();
        out.into_iter()
            .map(|(kind, percent, detail)| {
                self.push_event(Event {
                    at: now_ms,
                    kind: kind.to_owned(),
                    canary: canary.clone(),
                    percent: Some(percent),
                    detail,
                    ..Event::default()
                })
            })
            .collect()
    }

    /// Appends `e` with the next number (its `seq` is set here), keeping
    /// the last `EVENTS`; returns it as stored.
    fn push_event(&mut self, mut e: Event) -> Event {
        e.seq = self.events.last().map_or(0, |e| e.seq) + 1;
        self.events.push(e.clone());
        if self.events.len() > EVENTS {
            let cut = self.events.len() - EVENTS;
            self.events.drain(..cut);
        }
        e
    }

    /// The events numbered after `seq`, oldest first.
    pub fn events_after(&self, seq: u64) -> Vec<Event> {
        self.events
            .iter()
            .filter(|e| e.seq > seq)
            .cloned()
            .collect()
    }

    /// The service proxies get: the source's, with this policy's split
    /// (and sticky header; else the source's own), allow-list and route
    /// rules.
    pub fn apply(&self, mut service: Service) -> Service {
        if let Some(authz) = &self.authz {
            service.authz = Some(authz.clone());
        }
        if let Some(guards) = &self.guards {
            service.guards = guards.clone();
        }
        if let Some(routes) = &self.routes {
            service.routes = routes.clone();
        }
        if let Some(mirror) = &self.mirror {
            service.mirror = Some(mirror.clone());
        }
        if let Some(weights) = &self.split {
            let source_sticky = service.split.take().and_then(|s| s.sticky_header);
            service.split = Some(Split {
                weights: weights.clone(),
                sticky_header: self.sticky_header.clone().or(source_sticky),
            });
        }
        service
    }
}

/// A guard in words: `POST /api/giveaway* denied 503`, `any method
/// /search* limited to 10/s, burst 20, per client_ip`.
pub fn describe_guard(g: &Guard) -> String {
    let what = match (&g.deny, &g.limit) {
        (Some(d), _) => format!("denied {}", d.status),
        (None, Some(l)) => {
            let by = match &l.by {
                almond_config::LimitBy::None => String::new(),
                almond_config::LimitBy::ClientIp => ", per client_ip".to_owned(),
                almond_config::LimitBy::Header(h) => format!(", per header {h}"),
            };
            let scope = if l.scope == almond_config::LimitScope::Fleet {
                ", fleet-wide"
            } else {
                ""
            };
            format!("limited to {}, burst {}{by}{scope}", l.rate, l.burst())
        }
        (None, None) => "removed".to_owned(),
    };
    format!("{} {what}", describe(&g.when))
}

/// A match in words: `POST /api/giveaway*`.
pub fn describe(m: &Match) -> String {
    let method = m.method.as_deref().unwrap_or("any method");
    match (&m.path_prefix, &m.path_exact) {
        (Some(p), _) => format!("{method} {p}*"),
        (None, Some(p)) => format!("{method} {p}"),
        (None, None) => format!("{method} any path"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> Service {
        serde_json::from_value(serde_json::json!({
            "endpoints": [
                { "addr": "127.0.0.1:1", "subset": "v1" },
                { "addr": "127.0.0.1:2", "subset": "v2" }
            ]
        }))
        .unwrap()
    }

    fn w(pairs: &[(&str, u32)]) -> Weights {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    #[test]
    fn splits_are_checked() {
        let s = service();
        assert!(check_split(&w(&[("v1", 90), ("v2", 10)]), &s, &[], None).is_ok());
        let bad_sum = check_split(&w(&[("v1", 90), ("v2", 20)]), &s, &[], None);
        assert_eq!(
            bad_sum,
            Err(Refusal::Invalid("weights sum to 110, not 100".into()))
        );
        assert!(check_split(&w(&[("v1", 90), ("v3", 10)]), &s, &[], None).is_err());
        assert!(check_split(&w(&[("v1", 90), ("v3", 10)]), &s, &["v3".into()], None).is_ok());
        assert!(check_split(&w(&[("v1", 101)]), &s, &[], None).is_err());
        // At 0, a subset the split in force names may be gone; a typo is
        // still refused.
        let typo = w(&[("v1", 100), ("v9", 0)]);
        assert!(check_split(&typo, &s, &[], None).is_err());
        let in_force = w(&[("v1", 50), ("v9", 50)]);
        assert!(check_split(&typo, &s, &[], Some(&in_force)).is_ok());
    }

    /// Denying an identity while no list is in force would leave a list
    /// of nobody: refused, and nothing changes. With a list, it is taken
    /// off.
    #[test]
    fn a_deny_with_no_allow_list_is_refused() {
        let web = "spiffe://example.org/service/web";
        let p = Policy::default();
        let refused = p.with_authz(None, false, web, "ops", 1);
        assert!(matches!(refused, Err(Refusal::Conflict(_))), "{refused:?}");
        let listed = p.with_authz(None, true, web, "ops", 1).unwrap();
        let billing = "spiffe://example.org/service/billing";
        let listed = listed.with_authz(None, true, billing, "ops", 2).unwrap();
        let denied = listed.with_authz(None, false, web, "ops", 3).unwrap();
        assert_eq!(denied.authz.unwrap().allow, vec![billing.to_owned()]);
        // A list from the service's own config counts as one in force.
        let source = almond_config::Authz {
            allow: vec![web.to_owned()],
        };
        let denied = p.with_authz(Some(&source), false, web, "ops", 1).unwrap();
        assert!(denied.authz.unwrap().allow.is_empty());
    }

    #[test]
    fn a_version_at_its_end_wraps_instead_of_overflowing() {
        let stored = Policy {
            version: u64::MAX,
            ..Policy::default()
        };
        let next = stored.with_split(w(&[("v1", 100)]), "ops", "shift", 1);
        assert_eq!(next.version, 0);
        assert_ne!(
            next.version, stored.version,
            "the change is still seen as one"
        );
    }

    #[test]
    fn rollback_restores_the_previous_split() {
        let p = Policy::default()
            .with_split(w(&[("v1", 100)]), "ops", "shift", 1)
            .with_split(w(&[("v1", 90), ("v2", 10)]), "ops", "shift", 2);
        let back = p.rolled_back("ops", 3).unwrap();
        assert_eq!(back.split, Some(w(&[("v1", 100)])));
        assert_eq!(back.version, 3);
        assert_eq!(back.history.len(), 3);
        assert_eq!(back.history[2].action, "rollback");
        assert!(Policy::default().rolled_back("ops", 1).is_err());
    }

    /// The first shift of a service had no split before it: rollback
    /// clears the split (the source's, or endpoint weights, again).
    #[test]
    fn the_first_shift_rolls_back_to_no_split() {
        let canary = w(&[("v1", 90), ("v2", 10)]);
        let p = Policy::default().with_split(canary.clone(), "ops", "shift", 1);
        assert!(!p.just_rolled_back());
        let back = p.rolled_back("ops", 2).unwrap();
        assert_eq!(back.split, None);
        assert_eq!(back.history[1].action, "rollback");
        // The API changes nothing on a second rollback, even after a change
        // that leaves the split alone.
        assert!(back.just_rolled_back());
        let routed = back.with_routes(None, "ops", 3);
        assert!(routed.just_rolled_back());
        let shifted = back.with_split(canary, "ops", "shift", 3);
        assert!(!shifted.just_rolled_back());
        // Stored by a release before `previous_none`: nothing to go to.
        let json = r#"{"version": 1, "split": {"v1": 100}, "previous": null}"#;
        let old: Policy = serde_json::from_str(json).unwrap();
        assert!(old.rolled_back("ops", 2).is_err());
        // Written back by such a release after a first shift: the trail
        // says the split before was none.
        let mut rewritten = p.clone();
        rewritten.previous_none = false;
        let back = rewritten.rolled_back("ops", 2).unwrap();
        assert_eq!(back.split, None);
    }

    fn rollout_spec(steps: &[u32], pause_at: &[u32]) -> crate::watcher::rollout::RolloutSpec {
        crate::watcher::rollout::RolloutSpec {
            canary: "v2".into(),
            stable: Some("v1".into()),
            steps: steps.to_vec(),
            interval_seconds: 1.0,
            thresholds: Default::default(),
            pause_at: pause_at.to_vec(),
            max_inconclusive: 10,
            shadow: None,
        }
    }

    /// The policy once `r` (a step of the rollout in `p`) is stored, with
    /// the events recorded.
    fn step(p: &Policy, r: Rollout, now: u64) -> Policy {
        let mut out = p.clone();
        out.rollout = Some(r);
        out.record_events(p, now);
        out
    }

    fn kinds(p: &Policy) -> Vec<String> {
        p.events
            .iter()
            .map(|e| format!("{} {}", e.kind, e.percent.unwrap_or(0)))
            .collect()
    }

    /// `almond rollout web --canary v2`, `--abort`, the same again: the
    /// second rollout is started too (it has the same spec, and no
    /// verdicts either).
    #[test]
    fn a_rollout_started_again_with_the_same_spec_is_started() {
        let mut p = Policy::default();
        for now in [1000, 5000] {
            let r = Rollout::start(rollout_spec(&[10, 100], &[]), "v1".into(), None, now);
            p = step(&p, r, now);
            let mut r = p.rollout.clone().unwrap();
            r.abort("ops").unwrap();
            p = step(&p, r, now + 1);
        }
        assert_eq!(
            kinds(&p),
            ["started 10", "aborted 10", "started 10", "aborted 10"]
        );
    }

    /// A step judged inconclusive far more often than the history keeps:
    /// each verdict is still an event (found by count, not by position in
    /// a history that no longer grows), and the rollout is started once.
    #[test]
    fn every_verdict_is_an_event_once_the_history_is_full() {
        use crate::watcher::judge::Verdict;
        let mut spec = rollout_spec(&[10, 100], &[]);
        spec.max_inconclusive = 1000;
        let r = Rollout::start(spec, "v1".into(), None, 1);
        let mut p = step(&Policy::default(), r, 1);
        for now in 2..=301 {
            let mut r = p.rollout.clone().unwrap();
            r.on_verdict(Verdict::Inconclusive("no data".into()), 0, 0, now);
            p = step(&p, r, now);
        }
        let r = p.rollout.clone().unwrap();
        assert_eq!(r.verdicts, 300);
        assert!(r.history.len() < 300);
        let last = p.events.last().unwrap();
        assert_eq!(
            (last.seq, last.kind.as_str(), last.at),
            (301, "step_inconclusive", 301)
        );
        assert!(p.events.iter().all(|e| e.kind == "step_inconclusive"));
        assert_eq!(p.events.len(), EVENTS);
    }

    /// A rollout with a shadow stage starts at 0 % (mirrored copies
    /// only), and one that fails or is aborted there ends at 0 %: no user
    /// request went to the canary.
    #[test]
    fn a_shadow_stage_starts_and_ends_at_zero_percent() {
        use crate::watcher::judge::Verdict;
        let mut spec = rollout_spec(&[10, 100], &[]);
        spec.shadow = Some(20.0);
        let r = Rollout::start(spec.clone(), "v1".into(), None, 1000);
        let mut p = step(&Policy::default(), r, 1000);
        let mut r = p.rollout.clone().unwrap();
        r.on_verdict(Verdict::Fail("errors".into()), 100, 900, 2000);
        p = step(&p, r, 2000);
        assert_eq!(kinds(&p), ["started 0", "step_failed 0", "rolled_back 0"]);
        assert_eq!(p.rollout.as_ref().unwrap().canary_weight(), 0);

        let r = Rollout::start(spec, "v1".into(), None, 5000);
        let mut p = step(&Policy::default(), r, 5000);
        let mut r = p.rollout.clone().unwrap();
        r.abort("ops").unwrap();
        p = step(&p, r, 5001);
        assert_eq!(kinds(&p), ["started 0", "aborted 0"]);
    }

    /// Steps 10,100 with a gate at 100: pass, pass, approve. The approval
    /// is recorded, then the promotion.
    #[test]
    fn approving_a_gate_on_the_last_step_is_an_event() {
        use crate::watcher::judge::Verdict;
        let r = Rollout::start(rollout_spec(&[10, 100], &[100]), "v1".into(), None, 1000);
        let mut p = step(&Policy::default(), r, 1000);
        for now in [2000, 3000] {
            let mut r = p.rollout.clone().unwrap();
            r.on_verdict(Verdict::Pass, 100, 900, now);
            p = step(&p, r, now);
        }
        let mut r = p.rollout.clone().unwrap();
        r.approve(4000).unwrap();
        p = step(&p, r, 4000);
        assert_eq!(
            kinds(&p),
            [
                "started 10",
                "step_passed 10",
                "step_passed 100",
                "paused 100",
                "approved 100",
                "promoted 100"
            ]
        );
        let approved = &p.events[4];
        assert_eq!((approved.seq, approved.detail.as_deref()), (5, None));
        assert_eq!(p.events[5].detail.as_deref(), Some("every step passed"));
    }

    #[test]
    fn the_sticky_header_outlives_weight_changes() {
        let p = Policy::default()
            .with_sticky_header(Some("x-user-id".into()))
            .with_split(w(&[("v1", 90), ("v2", 10)]), "ops", "shift", 1)
            .with_sticky_header(None)
            .with_split(w(&[("v1", 50), ("v2", 50)]), "ops", "shift", 2);
        assert_eq!(p.history[1].sticky_header.as_deref(), Some("x-user-id"));
        let served = p.apply(service()).split.unwrap_or_default();
        assert_eq!(served.sticky_header.as_deref(), Some("x-user-id"));
        assert_eq!(served.weights, w(&[("v1", 50), ("v2", 50)]));
        let back = p.rolled_back("ops", 3).unwrap();
        assert_eq!(
            back.apply(service())
                .split
                .unwrap_or_default()
                .sticky_header
                .as_deref(),
            Some("x-user-id")
        );
        let off = back.with_sticky_header(Some(String::new()));
        assert_eq!(
            off.apply(service()).split.unwrap_or_default().sticky_header,
            None
        );
        assert!(check_sticky(Some("x-almond-subset")).is_err());
        assert!(check_sticky(Some("")).is_ok());
    }
}
