//! Rollout: a staged canary release. For each step: shift, wait, judge;
//! pass -> next step (or pause at a manual gate), fail -> back to 0 %
//! canary at once, inconclusive -> hold and judge again, up to a limit.
//! A window with too few canary requests is carried: the next verdict
//! judges it together with the windows after it, so low traffic adds up
//! to a verdict. The state lives in the service's policy, so a restarted
//! control plane resumes it.

use super::judge::{self, Thresholds, Verdict, Window};
use almond_config::Weights;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Inconclusive verdicts in a row before the rollout gives up and rolls back.
pub const DEFAULT_MAX_INCONCLUSIVE: u32 = 10;

/// Verdicts kept in a rollout's `history` (the newest). Every verdict is
/// an event as well (`policy::EVENTS` of those are kept); the bound keeps
/// the stored policy small whatever `max_inconclusive` and the steps are
/// (Consul refuses values over 512 KiB, and a rollout that cannot be
/// written can neither go on nor be aborted).
pub const VERDICTS_KEPT: usize = 50;

/// The longest step interval a spec may ask for.
const MAX_INTERVAL_SECONDS: f64 = 30.0 * 24.0 * 3600.0;
/// The shortest interval (100 ms).
const MIN_INTERVAL_SECONDS: f64 = 0.1;

/// What an operator asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSpec {
    /// The new version's subset.
    pub canary: String,
    /// The current version's subset (default: the other subset with the
    /// most weight now).
    #[serde(default)]
    pub stable: Option<String>,
    /// Canary percent per step, ascending, e.g. `[1, 10, 50, 100]`. Once
    /// the last passes the canary gets 100 %, whatever the last step.
    pub steps: Vec<u32>,
    /// Time each step runs before it is judged, in seconds.
    pub interval_seconds: f64,
    /// What the canary must meet.
    #[serde(default)]
    pub thresholds: Thresholds,
    /// Steps (percent) after which to wait for `approve`.
    #[serde(default)]
    pub pause_at: Vec<u32>,
    /// Inconclusive verdicts in a row tolerated on one step.
    #[serde(default = "default_max_inconclusive")]
    pub max_inconclusive: u32,
    /// A shadow stage first: this percent of the service's requests is
    /// mirrored to the canary (0 % real traffic), and the copies are
    /// judged against stable before the first real step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<f64>,
}

fn default_max_inconclusive() -> u32 {
    DEFAULT_MAX_INCONCLUSIVE
}

/// Where a rollout is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Running a step.
    Running,
    /// Passed a gate step; waiting for `approve`.
    Paused,
    /// Passed its last step: all traffic on the canary.
    Succeeded,
    /// Judged bad and sent back to 0 %.
    RolledBack,
    /// Stopped by an operator and sent back.
    Aborted,
}

/// One judgement, for the record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Judged {
    /// Canary percent of the step.
    pub percent: u32,
    /// The verdict and why.
    pub verdict: Verdict,
    /// Unix ms.
    pub at: u64,
    /// Canary requests in the window judged (since the last conclusive
    /// verdict of the step: windows with too few are carried).
    pub canary_requests: u64,
    /// Stable requests in the window judged.
    pub stable_requests: u64,
    /// The window's figures (`judge::figures`), for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub figures: Option<String>,
}

/// A rollout in progress (or finished), as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// What was asked.
    pub spec: RolloutSpec,
    /// Unix ms when it was started: tells a rollout started again with
    /// the same spec from the one before (0 in rollouts stored before it
    /// was kept).
    #[serde(default)]
    pub started: u64,
    /// The stable subset actually used.
    pub stable: String,
    /// The split before the rollout (restored on rollback).
    pub original: Option<Weights>,
    /// Index into `spec.steps`.
    pub step: usize,
    /// Where it is.
    pub phase: Phase,
    /// Unix ms when the current step's window began.
    pub step_started: u64,
    /// Inconclusive verdicts in a row on this step.
    pub inconclusive: u32,
    /// The newest verdicts ([`VERDICTS_KEPT`] at most), oldest first.
    pub history: Vec<Judged>,
    /// Verdicts given in all, including those no longer in `history` (0
    /// in rollouts stored before it was kept: see
    /// [`Rollout::verdict_count`]).
    #[serde(default)]
    pub verdicts: u64,
    /// Why it ended, if it did.
    #[serde(default)]
    pub reason: Option<String>,
    /// The control-plane replica driving it, and until when (unix ms).
    #[serde(default)]
    pub lease: Option<(String, u64)>,
    /// In the shadow stage (before the first real step): the canary gets
    /// mirrored copies only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shadowing: bool,
    /// The windows judged inconclusive for too little canary traffic since
    /// the step's last conclusive verdict; the next verdict covers them too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carried: Option<Carried>,
    /// A shadow stage's rollout: the mirror an operator had set when it
    /// started, in force again once the stage is over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_mirror: Option<almond_config::Mirror>,
}

/// Golden metrics carried from one window to the next (both subsets).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Carried {
    /// The canary's (or, in the shadow stage, its mirrored copies').
    pub canary: Window,
    /// Stable's.
    pub stable: Window,
}

/// What the driver must do after a verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Apply this split (a new step) and start a new window.
    Shift(Weights),
    /// Keep the split; start a new window (inconclusive, or paused).
    Hold,
    /// Restore the original split: the rollout failed.
    RollBack(Weights),
}

impl RolloutSpec {
    /// Checks the spec; the message names what is wrong.
    pub fn check(&self) -> Result<(), String> {
        if self.steps.is_empty() {
            return Err("steps: at least one step is needed".into());
        }
        if self.stable.as_deref() == Some(self.canary.as_str()) {
            return Err("stable: must be another subset than the canary".into());
        }
        if self.steps.iter().any(|s| *s == 0 || *s > 100) {
            return Err("steps: each step is a canary percent from 1 to 100".into());
        }
        if self.steps.windows(2).any(|w| w[0] >= w[1]) {
            return Err("steps: must go up, e.g. 1,10,50,100".into());
        }
        if self.interval_seconds.is_nan() || self.interval_seconds < MIN_INTERVAL_SECONDS {
            return Err("interval: at least 100ms".into());
        }
        // Bounded: a larger value does not fit a `Duration` (the watcher
        // would panic on it).
        if self.interval_seconds > MAX_INTERVAL_SECONDS {
            return Err("interval: at most 30 days".into());
        }
        let t = &self.thresholds;
        if !(0.0..=1.0).contains(&t.max_error_rate) {
            return Err("max_error_rate: between 0% and 100%".into());
        }
        // 0 would let no test ever blame the canary; 1 would blame any.
        if !(t.significance > 0.0 && t.significance < 1.0) {
            return Err("significance: above 0 and below 1 (0.005 = 0.5 %)".into());
        }
        if !(0.0..0.5).contains(&t.latency_effect) {
            return Err(
                "latency_effect: from 0 to below 0.5 (0.1: slower in 60 % of pairs)".into(),
            );
        }
        // A p99 beyond the histogram's last bound reads as that bound, so
        // a `max_p99` at or over it could never fail a canary.
        let last = almond_config::LATENCY_BUCKETS
            .last()
            .copied()
            .unwrap_or(f64::INFINITY);
        if t.max_p99.is_some_and(|m| m.as_secs_f64() >= last) {
            return Err(format!(
                "max_p99: below {last}s, the largest bound of the proxies' latency histogram (a p99 beyond it reads as {last}s, so the limit could never fail a canary)"
            ));
        }
        if t.max_p99_ratio.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
            return Err("max_p99_ratio: a number above 0 (1.5: 50 % over stable's p99)".into());
        }
        if self.shadow.is_some_and(|p| !(p > 0.0 && p <= 100.0)) {
            return Err("shadow: a percent above 0, up to 100".into());
        }
        if let Some(p) = self.pause_at.iter().find(|p| !self.steps.contains(p)) {
            return Err(format!("pause_at: {p} is not one of the steps"));
        }
        Ok(())
    }

    /// The interval as a duration. A rollout started through the API was
    /// checked; one read from the store (written by hand, or by a release
    /// before the upper bound) is held to the same bounds here, rather
    /// than panic the watcher on a negative or huge value.
    pub fn interval(&self) -> Duration {
        let seconds = match self.interval_seconds {
            s if s.is_nan() => MIN_INTERVAL_SECONDS,
            s => s.clamp(MIN_INTERVAL_SECONDS, MAX_INTERVAL_SECONDS),
        };
        Duration::from_secs_f64(seconds)
    }
}

impl Rollout {
    /// A new rollout at its first step.
    pub fn start(
        spec: RolloutSpec,
        stable: String,
        original: Option<Weights>,
        now: u64,
    ) -> Rollout {
        Rollout {
            shadowing: spec.shadow.is_some(),
            spec,
            started: now,
            stable,
            original,
            step: 0,
            phase: Phase::Running,
            step_started: now,
            inconclusive: 0,
            history: Vec::new(),
            verdicts: 0,
            reason: None,
            lease: None,
            carried: None,
            kept_mirror: None,
        }
    }

    /// Is it still going (running or paused)?
    pub fn active(&self) -> bool {
        matches!(self.phase, Phase::Running | Phase::Paused)
    }

    /// Canary percent of the current step (0 in the shadow stage; 100
    /// once succeeded, whatever the last step).
    pub fn percent(&self) -> u32 {
        if self.shadowing {
            return 0;
        }
        if self.phase == Phase::Succeeded {
            return 100;
        }
        self.spec.steps.get(self.step).copied().unwrap_or(0)
    }

    /// The mirror in force: the shadow stage's copies to the canary, and
    /// before and after the stage the operator's ([`Rollout::kept_mirror`]).
    pub fn mirror(&self) -> Option<almond_config::Mirror> {
        let Some(percent) = (self.spec.shadow).filter(|_| self.shadowing && self.active()) else {
            return self.kept_mirror.clone();
        };
        Some(almond_config::Mirror {
            subset: Some(self.spec.canary.clone()),
            service: None,
            percent,
            max_in_flight: 100,
        })
    }

    /// In its shadow stage: the mirror is the rollout's.
    pub fn shadowing_now(&self) -> bool {
        self.spec.shadow.is_some() && self.shadowing && self.active()
    }

    /// Canary percent in force: the step's while it runs or after it
    /// succeeded, 0 once rolled back or aborted.
    pub fn canary_weight(&self) -> u32 {
        match self.phase {
            Phase::RolledBack | Phase::Aborted => 0,
            _ => self.percent(),
        }
    }

    /// The split of the current step.
    pub fn split(&self) -> Weights {
        self.split_at(self.percent())
    }

    fn split_at(&self, percent: u32) -> Weights {
        let mut w = Weights::new();
        // A stored step above 100 (written by hand) is all on the canary.
        w.insert(self.stable.clone(), 100u32.saturating_sub(percent));
        w.insert(self.spec.canary.clone(), percent);
        w
    }

    /// The split a rollback restores: the original, or all on stable.
    pub fn rollback_split(&self) -> Weights {
        match &self.original {
            Some(o) if o.get(&self.spec.canary).copied().unwrap_or(0) == 0 => o.clone(),
            _ => self.split_at(0),
        }
    }

    /// Is the current step's window over?
    pub fn due(&self, now: u64) -> bool {
        self.phase == Phase::Running
            && now.saturating_sub(self.step_started) >= self.spec.interval().as_millis() as u64
    }

    /// Judges the window that just ended (`canary`, `stable`: golden
    /// metrics over it) together with the windows carried since the step's
    /// last conclusive verdict, and takes the verdict ([`Self::on_verdict`])
    /// with its figures. A verdict inconclusive for too little canary
    /// traffic carries the whole window on to the next one, so a
    /// low-traffic canary is judged once its requests add up, rather than
    /// never (each window too small alone); `max_inconclusive` still bounds
    /// the wait.
    pub fn judge_window(&mut self, canary: &Window, stable: &Window, now: u64) -> (Verdict, Next) {
        let mut window = self.carried.take().unwrap_or_default();
        if !(window.canary.add(canary) && window.stable.add(stable)) {
            // Other bucket bounds than the carried window's (the proxies
            // were upgraded meanwhile): this window is judged alone.
            window = Carried {
                canary: canary.clone(),
                stable: stable.clone(),
            };
        }
        let verdict = judge::judge(&window.canary, &window.stable, &self.spec.thresholds);
        let next = self.on_verdict(
            verdict.clone(),
            window.canary.requests,
            window.stable.requests,
            now,
        );
        if let Some(judged) = self.history.last_mut() {
            judged.figures = Some(judge::figures(&window.canary, &window.stable));
        }
        let too_little = window.canary.requests < self.spec.thresholds.min_requests;
        if self.phase == Phase::Running && matches!(verdict, Verdict::Inconclusive(_)) && too_little
        {
            self.carried = Some(window);
        }
        (verdict, next)
    }

    /// Verdicts given in all (a rollout stored before they were counted
    /// kept them all in `history`).
    pub fn verdict_count(&self) -> u64 {
        self.verdicts.max(self.history.len() as u64)
    }

    /// Takes a verdict on the current step.
    pub fn on_verdict(&mut self, verdict: Verdict, canary: u64, stable: u64, now: u64) -> Next {
        self.verdicts = self.verdict_count().saturating_add(1);
        self.history.push(Judged {
            percent: self.percent(),
            verdict: verdict.clone(),
            at: now,
            canary_requests: canary,
            stable_requests: stable,
            figures: None,
        });
        if self.history.len() > VERDICTS_KEPT {
            let cut = self.history.len() - VERDICTS_KEPT;
            self.history.drain(..cut);
        }
        self.step_started = now;
        match verdict {
            Verdict::Pass => {
                self.inconclusive = 0;
                if self.spec.pause_at.contains(&self.percent()) {
                    self.phase = Phase::Paused;
                    return Next::Hold;
                }
                self.advance()
            }
            Verdict::Fail(reason) => self.roll_back(Phase::RolledBack, reason),
            Verdict::Inconclusive(reason) => {
                self.inconclusive = self.inconclusive.saturating_add(1);
                if self.inconclusive > self.spec.max_inconclusive {
                    return self.roll_back(
                        Phase::RolledBack,
                        format!(
                            "inconclusive {} times in a row: {reason}",
                            self.inconclusive
                        ),
                    );
                }
                Next::Hold
            }
        }
    }

    /// An operator passed the gate.
    pub fn approve(&mut self, now: u64) -> Result<Next, String> {
        if self.phase != Phase::Paused {
            return Err(format!(
                "the rollout is {:?}, not paused at a gate",
                self.phase
            ));
        }
        self.phase = Phase::Running;
        self.step_started = now;
        Ok(self.advance())
    }

    /// An operator stopped it.
    pub fn abort(&mut self, by: &str) -> Result<Next, String> {
        if !self.active() {
            return Err(format!("the rollout is already {:?}", self.phase));
        }
        Ok(self.roll_back(Phase::Aborted, format!("aborted by {by}")))
    }

    fn advance(&mut self) -> Next {
        if self.shadowing {
            // The shadow stage passed: the first real step.
            self.shadowing = false;
            return Next::Shift(self.split());
        }
        if self.step + 1 >= self.spec.steps.len() {
            let last = self.percent();
            self.phase = Phase::Succeeded;
            self.reason = Some("every step passed".into());
            // A release ends with all traffic on the new version, as
            // Flagger's and Argo Rollouts' do: steps that stop short
            // (10,50) are promoted too, not left split with "succeeded".
            if last < 100 {
                return Next::Shift(self.split());
            }
            return Next::Hold;
        }
        self.step += 1;
        Next::Shift(self.split())
    }

    fn roll_back(&mut self, phase: Phase, reason: String) -> Next {
        // `shadowing` stays as it was: an ended rollout's mirror is the
        // operator's again whatever it says (`mirror` asks `active`), and
        // it tells where the rollout ended (0 % in a shadow stage).
        self.carried = None;
        self.phase = phase;
        self.reason = Some(reason);
        Next::RollBack(self.rollback_split())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RolloutSpec {
        RolloutSpec {
            canary: "v2".into(),
            stable: None,
            steps: vec![10, 50, 100],
            interval_seconds: 1.0,
            thresholds: Thresholds::default(),
            pause_at: vec![50],
            max_inconclusive: 2,
            shadow: None,
        }
    }

    /// A stored rollout is not checked as one started through the API is:
    /// an interval written by hand (negative, NaN, huge) used to panic
    /// the watcher, and a step above 100 to wrap the stable weight.
    #[test]
    fn a_stored_rollout_out_of_bounds_is_held_to_them() {
        for (seconds, want) in [
            (-1.0, 0.1),
            (f64::NAN, 0.1),
            (1e20, MAX_INTERVAL_SECONDS),
            (2.0, 2.0),
        ] {
            let s = RolloutSpec {
                interval_seconds: seconds,
                ..spec()
            };
            assert_eq!(s.interval(), Duration::from_secs_f64(want), "{seconds}");
        }
        let r = Rollout::start(spec(), "v1".into(), None, 0);
        let w = r.split_at(150);
        assert_eq!(w.get("v1"), Some(&0));
        assert_eq!(w.get("v2"), Some(&150));
    }

    #[test]
    fn a_shadow_stage_mirrors_first_then_steps_or_rolls_back() {
        let shadowed = RolloutSpec {
            shadow: Some(10.0),
            ..spec()
        };
        let mut r = Rollout::start(shadowed.clone(), "v1".into(), None, 0);
        assert_eq!(r.split(), w(&[("v1", 100), ("v2", 0)]), "no real traffic");
        let m = r.mirror().unwrap_or_else(|| panic!("a mirror"));
        assert_eq!((m.subset.as_deref(), m.percent), (Some("v2"), 10.0));
        assert_eq!(
            r.on_verdict(Verdict::Pass, 100, 900, 1000),
            Next::Shift(w(&[("v1", 90), ("v2", 10)])),
            "passed: the first real step"
        );
        assert!(r.mirror().is_none(), "the mirror ends with the stage");

        let original = w(&[("v1", 100)]);
        let mut r = Rollout::start(shadowed, "v1".into(), Some(original.clone()), 0);
        let next = r.on_verdict(Verdict::Fail("errors".into()), 100, 900, 1000);
        assert_eq!(next, Next::RollBack(original));
        assert_eq!(r.phase, Phase::RolledBack);
        assert!(r.mirror().is_none());
        let bad = RolloutSpec {
            shadow: Some(0.0),
            ..spec()
        };
        assert!(bad.check().is_err());
    }

    fn w(pairs: &[(&str, u32)]) -> Weights {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    #[test]
    fn passes_pause_at_gates_and_succeed() {
        let mut r = Rollout::start(spec(), "v1".into(), None, 0);
        assert_eq!(r.split(), w(&[("v1", 90), ("v2", 10)]));
        assert!(!r.due(999) && r.due(1000));
        assert_eq!(
            r.on_verdict(Verdict::Pass, 100, 900, 1000),
            Next::Shift(w(&[("v1", 50), ("v2", 50)]))
        );
        assert_eq!(r.on_verdict(Verdict::Pass, 100, 100, 2000), Next::Hold);
        assert_eq!(r.phase, Phase::Paused);
        assert!(!r.due(10_000), "a paused rollout waits for approval");
        assert_eq!(
            r.approve(3000),
            Ok(Next::Shift(w(&[("v1", 0), ("v2", 100)])))
        );
        assert_eq!(r.on_verdict(Verdict::Pass, 100, 0, 4000), Next::Hold);
        assert_eq!(r.phase, Phase::Succeeded);
    }

    /// Steps that stop short of 100 % end with the canary promoted, not
    /// with the split left partway and the rollout "succeeded".
    #[test]
    fn the_last_pass_promotes_to_100_percent() {
        let short = RolloutSpec {
            steps: vec![10, 50],
            pause_at: vec![],
            ..spec()
        };
        let mut r = Rollout::start(short.clone(), "v1".into(), None, 0);
        assert_eq!(
            r.on_verdict(Verdict::Pass, 100, 900, 1000),
            Next::Shift(w(&[("v1", 50), ("v2", 50)]))
        );
        assert_eq!(
            r.on_verdict(Verdict::Pass, 100, 100, 2000),
            Next::Shift(w(&[("v1", 0), ("v2", 100)]))
        );
        assert_eq!(r.phase, Phase::Succeeded);
        assert_eq!((r.percent(), r.canary_weight()), (100, 100));
        assert_eq!(r.history[1].percent, 50, "the verdict was on the 50 % step");

        // Through a gate on the last step: the approval promotes.
        let gated = RolloutSpec {
            pause_at: vec![50],
            ..short
        };
        let mut r = Rollout::start(gated, "v1".into(), None, 0);
        r.on_verdict(Verdict::Pass, 100, 900, 1000);
        assert_eq!(r.on_verdict(Verdict::Pass, 100, 100, 2000), Next::Hold);
        assert_eq!(r.phase, Phase::Paused);
        assert_eq!(
            r.approve(3000),
            Ok(Next::Shift(w(&[("v1", 0), ("v2", 100)])))
        );
        assert_eq!(r.phase, Phase::Succeeded);
    }

    #[test]
    fn a_failure_rolls_back_to_the_original_split() {
        let original = w(&[("v1", 100)]);
        let mut r = Rollout::start(spec(), "v1".into(), Some(original.clone()), 0);
        let next = r.on_verdict(Verdict::Fail("error rate 9%".into()), 100, 900, 1000);
        assert_eq!(next, Next::RollBack(original));
        assert_eq!(r.phase, Phase::RolledBack);
        assert_eq!(r.reason.as_deref(), Some("error rate 9%"));
    }

    #[test]
    fn too_many_inconclusive_verdicts_roll_back() {
        let mut r = Rollout::start(spec(), "v1".into(), None, 0);
        let inc = || Verdict::Inconclusive("no data".into());
        assert_eq!(r.on_verdict(inc(), 0, 0, 1), Next::Hold);
        assert_eq!(r.on_verdict(inc(), 0, 0, 2), Next::Hold);
        assert_eq!(
            r.on_verdict(inc(), 0, 0, 3),
            Next::RollBack(w(&[("v1", 100), ("v2", 0)]))
        );
    }

    /// `n` canary requests (`failed` of them failing) and 20 x as many on
    /// stable, all at 20 ms.
    fn windows(n: u64, failed: u64) -> (Window, Window) {
        let w = |n: u64, failed: u64| Window {
            requests: n,
            failures: failed,
            buckets: vec![(0.025, n), (f64::INFINITY, n)],
        };
        (w(n, failed), w(20 * n, 0))
    }

    /// A healthy canary on a quiet service (the CLI's defaults: at most 10
    /// inconclusive verdicts, 50 requests needed; 10 per window here): its
    /// windows add up to a verdict instead of each being too small alone.
    #[test]
    fn low_traffic_windows_add_up_to_a_pass() {
        let quiet = RolloutSpec {
            steps: vec![1, 10, 50, 100],
            pause_at: vec![],
            max_inconclusive: DEFAULT_MAX_INCONCLUSIVE,
            ..spec()
        };
        let mut r = Rollout::start(quiet, "v1".into(), None, 0);
        let (canary, stable) = windows(10, 0);
        for i in 1..=11 {
            r.judge_window(&canary, &stable, i * 1000);
        }
        assert_ne!(r.phase, Phase::RolledBack, "{:?}", r.reason);
        let seen: Vec<(u32, &str, u64)> = r
            .history
            .iter()
            .map(|j| (j.percent, j.verdict.label(), j.canary_requests))
            .collect();
        assert_eq!(
            &seen[..5],
            [
                (1, "inconclusive", 10),
                (1, "inconclusive", 20),
                (1, "inconclusive", 30),
                (1, "inconclusive", 40),
                (1, "pass", 50)
            ],
            "{seen:?}"
        );
        assert_eq!(
            seen[5],
            (10, "inconclusive", 10),
            "a new step, a new window"
        );
        assert_eq!(seen[9], (10, "pass", 50), "{seen:?}");
        assert_eq!((r.phase.clone(), r.percent()), (Phase::Running, 50));
        assert_eq!(
            r.history[4].figures.as_deref(),
            Some("errors 0/50 vs 0/1000, p = 1.00; p99 24.8ms vs 24.8ms")
        );

        // Still bounded: a canary that never gets enough traffic is given up.
        let mut r = Rollout::start(spec(), "v1".into(), None, 0);
        let (canary, stable) = windows(1, 0);
        for i in 1..=3 {
            r.judge_window(&canary, &stable, i * 1000);
        }
        assert_eq!(r.phase, Phase::RolledBack);
        assert_eq!(
            r.reason.as_deref(),
            Some("inconclusive 3 times in a row: too little canary traffic: 3 requests, 50 needed")
        );
        assert_eq!(r.carried, None);
    }

    /// Carried windows fail as a whole: failures spread over quiet windows
    /// add up too.
    #[test]
    fn carried_failures_fail() {
        let mut r = Rollout::start(spec(), "v1".into(), None, 0);
        let (canary, stable) = windows(10, 2);
        let (v, _) = r.judge_window(&canary, &stable, 1000);
        assert_eq!(v.label(), "inconclusive", "{v:?}");
        let (v, next) = r.judge_window(&canary, &stable, 2000);
        assert!(
            matches!(v, Verdict::Fail(ref why) if why.contains("4/20")),
            "{v:?}"
        );
        assert_eq!(next, Next::RollBack(w(&[("v1", 100), ("v2", 0)])));
    }

    /// A step held for thousands of windows keeps the newest verdicts and
    /// counts them all: its record stays small enough to be written.
    #[test]
    fn the_history_keeps_the_newest_verdicts() {
        let patient = RolloutSpec {
            max_inconclusive: 100_000,
            ..spec()
        };
        let mut r = Rollout::start(patient, "v1".into(), None, 0);
        let (canary, stable) = windows(0, 0);
        for i in 1..=5000 {
            r.judge_window(&canary, &stable, i);
        }
        assert_eq!(r.phase, Phase::Running);
        assert_eq!((r.history.len(), r.verdicts), (VERDICTS_KEPT, 5000));
        assert_eq!(r.history.last().map(|j| j.at), Some(5000), "the newest");
        assert_eq!(r.history[0].at, 5000 - VERDICTS_KEPT as u64 + 1);
        let stored = serde_json::to_vec(&r).unwrap();
        assert!(stored.len() < 64 * 1024, "{} bytes", stored.len());

        // Stored before verdicts were counted: the history was all of them.
        let mut old: Rollout = serde_json::from_value({
            let mut v = serde_json::to_value(&r).unwrap();
            v.as_object_mut().unwrap().remove("verdicts");
            v
        })
        .unwrap();
        assert_eq!(old.verdict_count(), VERDICTS_KEPT as u64);
        old.on_verdict(Verdict::Pass, 100, 900, 6000);
        assert_eq!(old.verdicts, VERDICTS_KEPT as u64 + 1);
    }

    #[test]
    fn specs_are_checked() {
        let mut s = spec();
        s.steps = vec![50, 10];
        assert!(s.check().is_err());
        let mut s = spec();
        s.pause_at = vec![20];
        assert!(s.check().is_err());
        assert!(spec().check().is_ok());
        // Thresholds that would make a test blind or blame everything.
        for bad in [0.0, 1.0, f64::NAN] {
            let mut s = spec();
            s.thresholds.significance = bad;
            let why = s.check().unwrap_err();
            assert!(why.starts_with("significance"), "{why}");
        }
        let mut s = spec();
        s.thresholds.latency_effect = 0.5;
        assert!(s.check().unwrap_err().starts_with("latency_effect"));
        let mut s = spec();
        s.thresholds.max_p99_ratio = Some(0.0);
        assert!(s.check().unwrap_err().starts_with("max_p99_ratio"));
        s.thresholds.max_p99_ratio = None;
        s.thresholds.max_p99 = Some(Duration::from_secs(15));
        assert!(s.check().unwrap_err().starts_with("max_p99: below 10s"));
        s.thresholds.max_p99 = Some(Duration::from_secs(9));
        assert!(s.check().is_ok());
    }
}
