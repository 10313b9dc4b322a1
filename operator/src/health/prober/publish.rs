//! What a prober makes of its probes: the endpoint's [`HealthTracker`] fed each outcome, the
//! [`ProbeState`] its handle reads, and the notices to its [`ProbeObserver`] (metrics, and a
//! reconcile when the state changed), paced to one per status write interval.

use std::{sync::Arc, time::Duration};

use kubegrpc_crds::Health;
use tokio::{sync::watch, time::Instant};
use tracing::{info, warn};

use super::{ProbeObserver, ProbeState};
use crate::health::tracker::{HealthTracker, HealthVerdict, ProbeOutcome};

/// See the module docs.
pub(super) struct Publisher {
    tracker: HealthTracker,
    state: watch::Sender<ProbeState>,
    observer: Arc<dyn ProbeObserver>,
    /// The least time between two status writes of the GrpcBackend: notices are paced on it.
    write_interval: Duration,
    /// What the latest failure showed beyond its reason (logged when the verdict changes).
    detail: Option<String>,
    /// When the observer was last told of a change, and whether a change awaits telling.
    last_notice: Option<Instant>,
    notice_pending: bool,
}

impl Publisher {
    pub(super) fn new(
        tracker: HealthTracker,
        state: watch::Sender<ProbeState>,
        observer: Arc<dyn ProbeObserver>,
        write_interval: Duration,
    ) -> Self {
        Self {
            tracker,
            state,
            observer,
            write_interval,
            detail: None,
            last_notice: None,
            notice_pending: false,
        }
    }

    pub(super) fn observer(&self) -> &dyn ProbeObserver {
        &*self.observer
    }

    /// What the latest failure showed beyond its reason, until the next publication logs it.
    pub(super) fn detail(&self) -> Option<&str> {
        self.detail.as_deref()
    }

    pub(super) fn set_detail(&mut self, detail: Option<String>) {
        self.detail = detail;
    }

    pub(super) fn tracker(&mut self) -> &mut HealthTracker {
        &mut self.tracker
    }

    pub(super) fn state(&self) -> watch::Ref<'_, ProbeState> {
        self.state.borrow()
    }

    /// Changes the published state without a notice (load reports: read at the next reconcile).
    pub(super) fn modify_state(&self, modify: impl FnOnce(&mut ProbeState)) {
        self.state.send_modify(modify);
    }

    /// A probe ended with `outcome`.
    pub(super) fn record(&mut self, outcome: ProbeOutcome, latency: Option<Duration>) {
        self.observer.probed(outcome, latency);
        let before = self.tracker.verdict().clone();
        let changed = self.tracker.observe(outcome, Instant::now());
        self.publish(&before, changed);
    }

    /// The current connection is alive at `now` (see [`HealthTracker::confirm`]); whether that
    /// confirmed an answer waiting for it.
    pub(super) fn confirm(&mut self, now: Instant) -> bool {
        let before = self.tracker.verdict().clone();
        let confirmed = self.tracker.confirm(now);
        if confirmed {
            self.publish(&before, true);
        }
        confirmed
    }

    /// The next instant something is due: a held verdict's release, a deferred notice.
    pub(super) fn deadline(&self) -> Option<Instant> {
        let notice = self
            .last_notice
            .filter(|_| self.notice_pending)
            .map(|last| last + self.write_interval);
        self.tracker.deadline().into_iter().chain(notice).min()
    }

    /// Does what is due at `now` (see [`Publisher::deadline`]).
    pub(super) fn wake(&mut self, now: Instant) {
        let before = self.tracker.verdict().clone();
        if self.tracker.wake(now) {
            self.publish(&before, true);
        }
        if self.notice_pending {
            self.notify();
        }
    }

    /// Publishes the tracker's state if it `changed` (or on the first probe), and logs a
    /// change of verdict from `before`, with the detail of what caused it, once.
    fn publish(&mut self, before: &HealthVerdict, changed: bool) {
        let detail = self.detail.take();
        let verdict = self.tracker.verdict();
        if verdict != before {
            let (health, reason) = (verdict.health, verdict.reason.as_deref().unwrap_or_default());
            if health == Health::Serving {
                info!(%health, "endpoint health changed");
            } else {
                let detail = detail.unwrap_or_default();
                warn!(%health, reason, detail, "endpoint health changed");
            }
        }
        let first = !self.state.borrow().probed;
        if changed || first {
            let started = self.state.borrow().started;
            self.state.send_modify(|state| {
                state.verdict = self.tracker.verdict().clone();
                state.connect_failing = self.tracker.connect_failing();
                state.started = started;
                state.probed = true;
            });
            self.notify();
        }
    }

    /// Tells the observer the state changed: at once, unless it was told less than a status
    /// write interval ago (then once that interval has passed), so that a flapping endpoint
    /// drives at most one notice per write interval.
    fn notify(&mut self) {
        let now = Instant::now();
        let due = self.last_notice.map(|last| last + self.write_interval);
        if due.is_none_or(|due| now >= due) {
            self.last_notice = Some(now);
            self.notice_pending = false;
            self.observer.changed();
        } else {
            self.notice_pending = true;
        }
    }
}
