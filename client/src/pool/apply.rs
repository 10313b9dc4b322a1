//! What discovery read, applied to the pool: a new status, the spec's slow-start settings, the
//! GrpcBackend's absence; and the client's zone. Each ends with a rebuild of the rotation,
//! except the spec, which discovery applies right before the status it came with.

use std::time::SystemTime;

use tokio::time::Instant;
use tracing::{info, warn};

use super::Pool;
use crate::{
    slow_start::ParsedSlowStart,
    status::{ParsedStatus, StatusEndpoint},
    tls::Transport,
};

/// Whether the GrpcBackend object exists, as far as the watch knows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum Presence {
    #[default]
    NotReadYet,
    Found,
    NotFound,
}

/// The pool's view of the GrpcBackend: what discovery read last.
#[derive(Default)]
pub(super) struct View {
    pub presence: Presence,
    /// The status's endpoints, in its order.
    pub endpoints: Vec<StatusEndpoint>,
    /// The last spec read's warnings, so that each is logged when it appears rather than at
    /// every status write.
    pub spec_warnings: Vec<String>,
}

impl Pool {
    /// The client's zone (`None` or "": none): a rotation of the usable endpoints for it while
    /// there is one.
    pub fn set_zone(&self, zone: Option<String>) {
        let mut state = self.lock();
        state.zone = zone.filter(|zone| !zone.is_empty());
        self.rebuild(&mut state);
    }

    /// The spec's slow-start settings, read with the object; they apply from the next rebuild
    /// (discovery applies the status right after).
    pub fn apply_spec(&self, parsed: ParsedSlowStart) {
        let mut state = self.lock();
        if parsed.warnings != state.view.spec_warnings {
            for warning in &parsed.warnings {
                warn!("{warning}");
            }
            state.view.spec_warnings = parsed.warnings;
        }
        if parsed.settings != state.slow_start.settings {
            let settings = &parsed.settings;
            info!(window = ?settings.window, aggression = settings.aggression,
                min_weight_percent = settings.min_weight_percent, "slow start settings");
            state.slow_start.settings = parsed.settings;
        }
    }

    /// How to connect to the endpoints, from the spec's `tls` (discovery applies it before the
    /// status it came with). A change reconnects every endpoint (requests in flight finish on
    /// the old connections); an unavailable transport takes every endpoint out of rotation.
    pub fn apply_transport(&self, transport: Transport) {
        let mut state = self.lock();
        if state.transport.same(&transport) {
            return;
        }
        match &transport {
            Transport::Unavailable(why) => warn!("{why}; no endpoint is used"),
            transport => info!(transport = transport.describe(), "connections to the endpoints"),
        }
        state.transport = transport;
        state.connections.by_address.clear();
        self.rebuild(&mut state);
    }

    /// A new status was read.
    pub fn apply_status(&self, parsed: ParsedStatus) {
        for warning in &parsed.warnings {
            warn!("{warning}");
        }
        let mut guard = self.lock();
        let state = &mut *guard;
        state.outliers.readmit_on_news(&state.view.endpoints, &parsed.endpoints);
        state
            .slow_start
            .follow(&parsed.endpoints, SystemTime::now(), Instant::now());
        state.outliers.forget_absent(&parsed.endpoints);
        state.view.endpoints = parsed.endpoints;
        state.view.presence = Presence::Found;
        self.rebuild(state);
    }

    /// The GrpcBackend does not exist (deleted, or not created yet).
    pub fn apply_missing(&self) {
        let mut state = self.lock();
        state.view.endpoints.clear();
        state.view.presence = Presence::NotFound;
        state.slow_start.clear();
        state.outliers.clear();
        self.rebuild(&mut state);
    }
}
