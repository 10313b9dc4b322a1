//! A plan made real: the rotation built from it, with the connections of the endpoints it keeps
//! and new ones for the others (connected at once), swapped in for the requests to read.

use std::{
    collections::{HashMap, hash_map::RandomState},
    hash::BuildHasher,
    net::SocketAddr,
    sync::Arc,
    time::SystemTime,
};

use tracing::{debug, info, instrument, warn};

use super::{
    Pool, PoolState, Rotation, addresses,
    plan::{Chosen, Plan, why_unavailable},
};
use crate::{
    endpoint::{Endpoint, EndpointStats},
    failure::classify,
    picker::Picker,
    slow_start::picker_weights,
    tls::Transport,
};

/// The connections of the endpoints in the current rotation (ejected ones included), and the
/// counters of every listed endpoint.
#[derive(Default)]
pub(super) struct Connections {
    pub by_address: HashMap<SocketAddr, Arc<Endpoint>>,
    pub stats: HashMap<SocketAddr, Arc<EndpointStats>>,
}

/// What the current rotation was built from: to log what changed, and for the slow-start
/// timer to tell whether a new plan differs.
#[derive(Default)]
pub(super) struct Built {
    pub panic: bool,
    /// The client has a zone and nothing usable is for it: every zone is in rotation.
    pub zone_fallback: bool,
    pub chosen: Vec<Chosen>,
}

impl Built {
    /// Something in rotation ramps up (slow start).
    pub fn ramping(&self) -> bool {
        self.chosen.iter().any(|c| c.percent.is_some())
    }
}

impl Pool {
    /// Swaps in a rotation built from `plan`, keeping the connections of the endpoints it keeps.
    pub(super) fn install(&self, state: &mut PoolState, plan: Plan) {
        self.log_changes(state, &plan);

        let listed = addresses(&state.view.endpoints);
        let stats = &mut state.connections.stats;
        stats.retain(|address, _| listed.contains(address));
        for address in &listed {
            stats.entry(*address).or_default();
        }
        let weighted: Vec<(u32, Option<u32>)> = plan.chosen.iter().map(|c| (c.weight, c.percent)).collect();
        let chosen = plan.chosen.iter().map(|c| c.address).zip(picker_weights(&weighted));
        let mut connections = HashMap::new();
        let mut items = Vec::new();
        let mut weights = Vec::new();
        let mut new_connections = Vec::new();
        let (tls, template) = match &state.transport {
            #[cfg(feature = "tls")]
            Transport::Tls(spec_tls) if !self.config.tls => (true, spec_tls.template(&self.config.template)),
            _ => (self.config.tls, self.config.template.clone()),
        };
        for (address, weight) in chosen.chain(plan.ejected.iter().map(|address| (*address, 0))) {
            let endpoint = match state.connections.by_address.get(&address) {
                Some(existing) => existing.clone(),
                None => {
                    let stats = state.connections.stats.get(&address).cloned().unwrap_or_default();
                    match Endpoint::new(address, tls, &template, &self.config.dial, stats) {
                        Ok(endpoint) => {
                            let endpoint = Arc::new(endpoint);
                            new_connections.push(endpoint.clone());
                            endpoint
                        }
                        Err(error) => {
                            warn!(endpoint = %address, %error, "cannot configure a connection; endpoint left out");
                            continue;
                        }
                    }
                }
            };
            connections.insert(address, endpoint.clone());
            if weight > 0 {
                items.push(endpoint);
                weights.push(weight);
            }
        }
        // Connections that left rotation are dropped here; requests in flight on them hold
        // their own handle and finish.
        state.connections.by_address = connections;
        state.built.chosen = plan.chosen;

        let view = &state.view;
        let unavailable = match &state.transport {
            Transport::Unavailable(why) => why.clone(),
            _ => why_unavailable(&self.backend, view.presence, &view.endpoints, &state.outliers.ejections),
        };
        let start = RandomState::new().hash_one(SystemTime::now()) as usize;
        self.rotation.store(Arc::new(Rotation {
            picker: Picker::new(items, &weights, start),
            unavailable,
            panic: plan.panic,
        }));
        self.version.send_modify(|v| *v += 1);
        if state.built.ramping() {
            self.start_ramp_timer(state);
        }
        // Connect to new endpoints now: no request pays for the handshake, and one that cannot
        // be reached at all is ejected before a request is sent to it.
        for endpoint in new_connections {
            if let Some(pool) = self.me.upgrade() {
                tokio::spawn(connect_new(pool, endpoint));
            }
        }
    }

    /// Logs the rotation's changes of mode (panic, zone fallback), and records the new ones.
    fn log_changes(&self, state: &mut PoolState, plan: &Plan) {
        let built = &mut state.built;
        if plan.panic != built.panic {
            if plan.panic {
                warn!(
                    usable = plan.usable,
                    ready = plan.kubernetes_ready,
                    "panic mode: too few usable endpoints; spreading over every Kubernetes-ready endpoint"
                );
            } else {
                info!("panic mode over");
            }
            built.panic = plan.panic;
        }
        if plan.zone_fallback != built.zone_fallback {
            let zone = state.zone.as_deref().unwrap_or_default();
            if plan.zone_fallback {
                warn!(zone, "no usable endpoint for the client's zone; sending to every zone");
            } else {
                info!(zone, "requests stay in the client's zone again");
            }
            built.zone_fallback = plan.zone_fallback;
        }
    }
}

/// Connects a new endpoint at once; one that cannot be connected to at all is ejected before a
/// request is sent to it. Its span is a child of the one it was started in (the GrpcBackend's).
#[instrument(skip_all, fields(endpoint = %endpoint.address))]
async fn connect_new(pool: Arc<Pool>, endpoint: Arc<Endpoint>) {
    if let Err(error) = endpoint.warm_up().await {
        debug!(%error, "cannot connect");
        if classify(&error).is_evidence() {
            pool.eject(endpoint.address, "a new endpoint that cannot be connected to");
        }
    }
}
