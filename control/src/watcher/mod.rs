//! Watcher: drives staged rollouts. Every tick it reads each service's
//! policy from the store; for an active rollout whose lease it holds, it
//! collects the golden metrics of canary and stable over the step's
//! window ([`collect`]), judges them ([`judge`]; with the windows a
//! low-traffic step carried) and moves the rollout on ([`rollout`]),
//! writing the result back with check-and-set.

pub mod collect;
pub mod judge;
pub mod rollout;

use crate::policy::Policy;
use crate::state::{State, PROXY_STALE};
use crate::store::Store;
use almond_config::WatcherSource;
use almond_net::now_ms;
use collect::Totals;
use rollout::{Next, Rollout};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

/// How often rollouts are looked at.
const TICK: Duration = Duration::from_millis(250);
/// How long a lease lasts; renewed well before.
const LEASE_MS: u64 = 15_000;
/// Longest a window's collection may take (a Prometheus server's queries
/// run at once, 5 s each at most; the direct source scrapes 64 proxies at
/// a time, 2 s each at most). A slower one gives the window no new data.
const COLLECT_LIMIT: Duration = Duration::from_secs(8);
/// Lease a judgment needs left before its collection starts: the
/// collection, then the write. With less, the lease is renewed first, so
/// that no other replica can take it while this one collects (its
/// verdict's write would then be refused, and a slow source would lose
/// every verdict).
const JUDGE_LEASE_MS: u64 = COLLECT_LIMIT.as_millis() as u64 + 2_000;

/// What a replica does with a rollout this tick, by its lease.
#[derive(Debug, PartialEq, Eq)]
enum LeaseStep {
    /// Another replica holds it.
    Leave,
    /// Ours, with enough of it left for what is due.
    Drive,
    /// Missing, expired, or ours with too little left: (re)take it first.
    Take,
}

/// The step for a rollout whose lease is `lease`, for replica `me` at
/// `now`; `judging`: a window's judgment is due (it needs
/// [`JUDGE_LEASE_MS`] of lease, not just half of one).
fn lease_step(lease: Option<&(String, u64)>, me: &str, now: u64, judging: bool) -> LeaseStep {
    let needed = if judging {
        JUDGE_LEASE_MS
    } else {
        LEASE_MS / 2
    };
    match lease {
        Some((owner, until)) if owner != me && *until > now => LeaseStep::Leave,
        Some((owner, until)) if owner == me && *until > now + needed => LeaseStep::Drive,
        _ => LeaseStep::Take,
    }
}

/// Gives back the rollout leases replica `me` holds (a control plane
/// stopping): another replica, or this one started again under a new
/// name, drives those rollouts at once rather than once the lease has run
/// out (`LEASE_MS`, 15 s). A lease that changed meanwhile is left alone.
pub async fn release_leases(state: &State, store: &Store, me: &str) {
    let ours = |lease: Option<&(String, u64)>| lease.is_some_and(|(owner, _)| owner == me);
    for (name, policy) in state.policies() {
        if !ours(policy.rollout.as_ref().and_then(|r| r.lease.as_ref())) {
            continue;
        }
        let Ok((mut current, token)) = store.get(&name).await else {
            continue;
        };
        let Some(r) = current.rollout.as_mut().filter(|r| ours(r.lease.as_ref())) else {
            continue;
        };
        r.lease = None;
        match store.put(&name, &mut current, token).await {
            Ok(true) => tracing::info!(service = %name, "rollout lease given back"),
            _ => {
                tracing::debug!(service = %name, "rollout lease not given back: it changed meanwhile")
            }
        }
    }
}

/// Where a step's window starts: the step it belongs to (its start, unix
/// ms), when the baseline was taken, and every proxy's totals then.
struct Baseline {
    step_started: u64,
    taken: u64,
    totals: BTreeMap<String, Totals>,
}

/// The rollout driver of one control-plane replica.
pub struct Watcher {
    state: Arc<State>,
    /// Where golden metrics come from.
    source: WatcherSource,
    store: Arc<Store>,
    /// This replica's name, for leases.
    replica: String,
    /// Per service: the current step's baseline.
    baselines: tokio::sync::Mutex<HashMap<String, Baseline>>,
}

impl Watcher {
    /// A driver for the replica named `replica` (its leases say so).
    pub fn new(
        state: Arc<State>,
        store: Arc<Store>,
        source: WatcherSource,
        replica: String,
    ) -> Watcher {
        Watcher {
            state,
            source,
            store,
            replica,
            baselines: Default::default(),
        }
    }

    /// Ticks until the task is dropped.
    pub async fn run(self) {
        loop {
            let mut names = Vec::new();
            for (name, policy) in self.state.policies() {
                let Some(r) = &policy.rollout else { continue };
                // Every replica says where each rollout is, whichever one
                // drives it: the driver's writes reach the others through
                // the store, and a scrape of any replica must agree.
                if let Some(step) = policy.rollout_step() {
                    self.state.metrics.rollout_step(&name, step);
                }
                if r.active() {
                    names.push(name);
                }
            }
            // A rollout over (or gone with its service) keeps no baseline:
            // each holds every proxy's figures for its service.
            (self.baselines.lock().await).retain(|name, _| names.contains(name));
            for name in names {
                if let Err(e) = self.drive(&name).await {
                    tracing::warn!(service = %name, error = %e, "rollout tick failed");
                }
            }
            tokio::time::sleep(TICK).await;
        }
    }

    async fn drive(&self, name: &str) -> Result<(), crate::store::StoreError> {
        let (policy, token) = self.store.get(name).await?;
        let Some(mut r) = policy.rollout.clone() else {
            return Ok(());
        };
        if !r.active() {
            return Ok(());
        }
        let now = now_ms();
        let mut baselines = self.baselines.lock().await;
        let interval = r.spec.interval().as_millis() as u64;
        let judging = r.due(now)
            && baselines.get(name).is_some_and(|b| {
                b.step_started == r.step_started && now.saturating_sub(b.taken) >= interval
            });
        // Only the lease holder drives; take an expired or missing lease,
        // and renew ours before a judgment that could outlast it.
        match lease_step(r.lease.as_ref(), &self.replica, now, judging) {
            LeaseStep::Leave => return Ok(()),
            LeaseStep::Drive => {}
            LeaseStep::Take => {
                r.lease = Some((self.replica.clone(), now + LEASE_MS));
                let mut next = policy.clone();
                next.rollout = Some(r.clone());
                if !self.store.put(name, &mut next, token).await? {
                    return Ok(()); // another replica won the lease
                }
                self.store.stamp_write(name, &self.state).await;
                self.state.set_written_policy(name, next, token);
                return Ok(());
            }
        }
        self.state.metrics.rollout_step(name, r.canary_weight());
        if r.phase != rollout::Phase::Running {
            return Ok(());
        }
        let admins = self.proxy_admins();
        let Some(base) = baselines
            .get(name)
            .filter(|b| b.step_started == r.step_started)
        else {
            // A new step (or a restarted control plane): the window starts
            // now. Bounded as the judge's collection is: proxies that never
            // answer would hold every other service's rollout meanwhile.
            let collected = tokio::time::timeout(COLLECT_LIMIT, self.collect(&admins, name));
            let Ok(totals) = collected.await else {
                tracing::warn!(service = name, limit = ?COLLECT_LIMIT, "collecting the step's baseline took too long: taken again next time");
                return Ok(());
            };
            baselines.insert(
                name.to_owned(),
                Baseline {
                    step_started: r.step_started,
                    taken: now,
                    totals,
                },
            );
            return Ok(());
        };
        if !judging {
            return Ok(());
        }
        let current = match tokio::time::timeout(COLLECT_LIMIT, self.collect(&admins, name)).await {
            Ok(current) => current,
            // Too slow: no new data for this window (judged inconclusive,
            // which a source that stays slow turns into a rollback), and
            // the next window starts from the same baseline.
            Err(_) => {
                tracing::warn!(service = name, limit = ?COLLECT_LIMIT, "collecting the golden metrics took too long: the window has no new data");
                base.totals.clone()
            }
        };
        let window = collect::delta(&current, &base.totals);
        // The shadow stage judges the canary's mirrored copies.
        let canary_key = if r.shadowing {
            format!("{}{}", collect::MIRROR_PREFIX, r.spec.canary)
        } else {
            r.spec.canary.clone()
        };
        let canary = window.get(&canary_key).cloned().unwrap_or_default();
        let stable = window.get(&r.stable).cloned().unwrap_or_default();
        let percent = r.percent();
        let (verdict, next) = r.judge_window(&canary, &stable, now);
        // The counts judged: this window's, plus any carried.
        let (canary_requests, stable_requests) = r
            .history
            .last()
            .map_or((0, 0), |j| (j.canary_requests, j.stable_requests));
        tracing::info!(
            service = name,
            step = percent,
            verdict = verdict.label(),
            detail = ?verdict,
            canary_requests,
            stable_requests,
            "rollout step judged"
        );
        let restores = r.rollback_split();
        let mut next_policy = match &next {
            Next::Shift(split) => policy.with_rollout_split(
                split.clone(),
                restores,
                "watcher",
                if r.phase == rollout::Phase::Succeeded {
                    "rollout promote"
                } else {
                    "rollout step"
                },
                now / 1000,
            ),
            Next::RollBack(split) => policy.with_rollout_split(
                split.clone(),
                restores,
                "watcher",
                "rollout rollback",
                now / 1000,
            ),
            Next::Hold => policy.clone(),
        };
        let step_started = r.step_started;
        let reason = r.reason.clone();
        if r.spec.shadow.is_some() {
            next_policy.mirror = r.mirror();
        }
        next_policy.rollout = Some(r);
        let events = next_policy.record_events(&policy, now);
        if self.store.put(name, &mut next_policy, token).await? {
            if let Some(notify) = &self.state.notify {
                notify.send(name, &events);
            }
            // Counted once the verdict is written: a lost check-and-set
            // (another replica's write) is judged again, not counted twice.
            self.state.metrics.verdict(name, verdict.label());
            if matches!(next, Next::RollBack(_)) {
                tracing::warn!(service = name, ?reason, "rollout rolled back");
                self.state.metrics.rollback(name);
            }
            if let Some(step) = next_policy.rollout_step() {
                self.state.metrics.rollout_step(name, step);
            }
            self.store.stamp_write(name, &self.state).await;
            self.state.set_written_policy(name, next_policy, token);
            // The next window starts where this one ended.
            baselines.insert(
                name.to_owned(),
                Baseline {
                    step_started,
                    taken: now,
                    totals: current,
                },
            );
        }
        Ok(())
    }

    /// Per-source totals now: per proxy (direct) or one sum (Prometheus).
    async fn collect(&self, admins: &[String], service: &str) -> BTreeMap<String, Totals> {
        match &self.source {
            WatcherSource::Direct => collect::scrape(admins, service, self.state.max_body).await,
            WatcherSource::Prometheus(url) => {
                collect::query_prometheus(url, service, self.state.max_body).await
            }
        }
    }

    fn proxy_admins(&self) -> Vec<String> {
        self.state.proxy_admins(PROXY_STALE)
    }
}

/// Applies an operator's rollout change to a policy (start, approve,
/// abort): the split follows the rollout.
pub fn apply_next(
    policy: &Policy,
    rollout: Rollout,
    next: Next,
    by: &str,
    action: &str,
    now: u64,
) -> Policy {
    let mut out = match next {
        Next::Shift(split) | Next::RollBack(split) => {
            policy.with_rollout_split(split, rollout.rollback_split(), by, action, now / 1000)
        }
        Next::Hold => policy.clone(),
    };
    if out.version == policy.version {
        out.version = out.version.wrapping_add(1);
    }
    // A shadow stage's mirror follows the rollout.
    if rollout.spec.shadow.is_some() {
        out.mirror = rollout.mirror();
    }
    out.rollout = Some(rollout);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_judgment_is_driven_only_with_lease_enough_for_it() {
        let me = "a";
        let now = 1_000_000;
        let ours = |left: u64| Some(("a".to_owned(), now + left));
        // Another replica's live lease: left alone; expired: taken.
        let theirs = Some(("b".to_owned(), now + 1));
        assert_eq!(lease_step(theirs.as_ref(), me, now, true), LeaseStep::Leave);
        let expired = Some(("b".to_owned(), now));
        assert_eq!(
            lease_step(expired.as_ref(), me, now, false),
            LeaseStep::Take
        );
        assert_eq!(lease_step(None, me, now, false), LeaseStep::Take);
        // Ours with 9 s left: enough to keep going, not to collect and
        // write a verdict (8 s of collection, then the write): renewed
        // first, so that nobody takes it meanwhile.
        assert_eq!(
            lease_step(ours(9_000).as_ref(), me, now, false),
            LeaseStep::Drive
        );
        assert_eq!(
            lease_step(ours(9_000).as_ref(), me, now, true),
            LeaseStep::Take
        );
        // Just renewed: judged.
        assert_eq!(
            lease_step(ours(LEASE_MS - 250).as_ref(), me, now, true),
            LeaseStep::Drive
        );
        // Under half left: renewed even between judgments.
        assert_eq!(
            lease_step(ours(7_000).as_ref(), me, now, false),
            LeaseStep::Take
        );
    }
}
