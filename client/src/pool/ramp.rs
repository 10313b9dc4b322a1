//! Slow start in the pool: which usable endpoints ramp and since when, and the timer that steps
//! the rotation while something in it ramps.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Weak, atomic::Ordering},
    time::{Duration, SystemTime},
};

use tokio::time::Instant;
use tracing::{debug, instrument};

use super::{Pool, PoolState, plan};
use crate::{
    slow_start::{SlowStart, ramp_percent, ramp_start},
    status::StatusEndpoint,
};

/// The spec's slow-start settings and the endpoints that ramp.
#[derive(Default)]
pub(super) struct Ramps {
    /// From the spec; applies from the next rebuild.
    pub settings: SlowStart,
    /// Usable endpoints with a recent `lastTransitionTime`, and where their ramp starts.
    starts: HashMap<SocketAddr, Ramp>,
    /// The slow-start timer runs.
    pub timer_running: bool,
}

/// A usable endpoint's slow start: the published transition time, and the monotonic instant it
/// stands for (fixed when first read, so that a wall-clock step does not move the ramp).
struct Ramp {
    since: SystemTime,
    start: Instant,
}

impl Ramps {
    /// Ramps the usable endpoints of a new status from their published transition times, read
    /// at wall time `now_wall` and monotonic time `now`. A time read before keeps its start.
    pub fn follow(&mut self, endpoints: &[StatusEndpoint], now_wall: SystemTime, now: Instant) {
        let mut starts = HashMap::new();
        for endpoint in endpoints.iter().filter(|e| e.usable()) {
            let Some(since) = endpoint.last_transition_time else {
                continue;
            };
            let start = match self.starts.get(&endpoint.address) {
                Some(ramp) if ramp.since == since => Some(ramp.start),
                _ => ramp_start(since, now_wall, now),
            };
            if let Some(start) = start {
                starts.insert(endpoint.address, Ramp { since, start });
            }
        }
        self.starts = starts;
    }

    /// Forgets every ramp (the GrpcBackend is gone).
    pub fn clear(&mut self) {
        self.starts.clear();
    }

    /// The share of its weight `address` gets at `now`, in percent, while it ramps.
    pub fn percent(&self, address: &SocketAddr, now: Instant) -> Option<u32> {
        ramp_percent(&self.settings, self.starts.get(address).map(|r| r.start), now)
    }
}

impl Pool {
    /// Starts the slow-start timer unless it runs: while an endpoint in rotation ramps, it
    /// recomputes the shares every [`SlowStart::tick`] and swaps in a new rotation when one
    /// changed (the connections stay; requests in flight are not touched). It ends at the first
    /// tick where nothing ramps, and a later ramp starts a new one.
    pub(super) fn start_ramp_timer(&self, state: &mut PoolState) {
        if state.slow_start.timer_running {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            debug!("no Tokio runtime to ramp slow-starting endpoints on");
            return;
        };
        state.slow_start.timer_running = true;
        self.ramp_timers.fetch_add(1, Ordering::Relaxed);
        let tick = state.slow_start.settings.tick();
        runtime.spawn(ramp_timer(self.me.clone(), self.backend.clone(), tick));
    }

    /// One tick of the slow-start timer: a new rotation if a share changed. Returns when to
    /// tick next, or `None` (and marks the timer stopped) when nothing in rotation ramps.
    fn ramp_tick(&self) -> Option<Duration> {
        let mut state = self.lock();
        let plan = plan::plan(&state.plan_input(self.config.panic_threshold, Instant::now()));
        if plan.chosen != state.built.chosen {
            self.install(&mut state, plan);
        }
        if state.built.ramping() {
            Some(state.slow_start.settings.tick())
        } else {
            state.slow_start.timer_running = false;
            None
        }
    }
}

/// The slow-start timer of GrpcBackend `backend`'s pool: ticks first after `tick`, then as
/// [`Pool::ramp_tick`] says, and ends when nothing ramps or the pool is gone (its timer does
/// not keep it alive). It outlives the span it was started in, so its own has no parent.
#[instrument(name = "slow_start", parent = None, skip_all, fields(backend = %backend))]
async fn ramp_timer(pool: Weak<Pool>, backend: String, tick: Duration) {
    let mut tick = tick;
    loop {
        tokio::time::sleep(tick).await;
        let Some(pool) = pool.upgrade() else { return };
        match pool.ramp_tick() {
            Some(next) => tick = next,
            None => return,
        }
    }
}
