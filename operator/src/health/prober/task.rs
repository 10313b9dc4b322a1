//! The per-endpoint probe loop: connect (in turn), follow the `Watch` stream with a liveness
//! `Check` each quiet interval or poll with `Check`, and count how each connection ended (see
//! the rules in [`super`]).

use std::{net::SocketAddr, time::Duration};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use kubegrpc_crds::HealthCheckMode;
use tokio::time::Instant;
use tonic::Code;
use tonic_health::pb::{HealthCheckResponse, health_check_response::ServingStatus};
use tracing::debug;

use super::{Connector, ProbeSettings, Shared, limiter::Turn, publish::Publisher};
use crate::{
    health::{
        connection::{
            CallEnd, CallId, ConnectionError, Event, GoAway, HealthConnection, Message, Method, Scheme, open_tcp,
            reason,
        },
        tls::tls_failure,
        tracker::{Failure, NotServingAnswer, ProbeOutcome},
    },
    weights::LoadSample,
};

/// How many polls a connection polled with `Check` for want of `Watch` makes before it tries
/// `Watch` again (see [`Prober::probe`]).
pub(super) const WATCH_RETRY_POLLS: u32 = 30;

/// One endpoint's prober, run by its task.
pub(super) struct Prober {
    target: SocketAddr,
    settings: ProbeSettings,
    publisher: Publisher,
    backoff: ExponentialBackoff,
    shared: Shared,
    /// The load-report stream on the current connection, once started.
    load_call: Option<CallId>,
    /// The connect turn held by the attempt in progress.
    turn: Option<Turn>,
    /// The latest attempt failed and no answer has counted since: take turns from the retry
    /// limiter.
    retrying: bool,
}

/// One connection's life, as far as the counting rules need it.
struct Link {
    opened: Instant,
    /// When the health service first answered on it.
    answered: Option<Instant>,
    /// The GOAWAY the server sent on it, if any.
    going_away: Option<u32>,
}

/// Why a connection's probing ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Ended {
    /// `Watch` is not to be had on this connection (the server answered UNIMPLEMENTED, or its
    /// SETTINGS_MAX_CONCURRENT_STREAMS leaves no room for it beside the liveness `Check`):
    /// poll with `Check` on the same connection.
    PollInstead,
    /// Polling has gone on for [`WATCH_RETRY_POLLS`] polls: try `Watch` again on the same
    /// connection.
    RetryWatch,
    /// The connection ended the way a rotation does (graceful GOAWAY, close, stream reset or
    /// ended): a rotation if it answered at least an interval ago, else an early end, counted
    /// as this failure (or as [`Failure::Closed`] for [`Failure::Unstable`] before any answer).
    Closed(Failure),
    /// A failure, whatever the connection's age.
    Failed(Failure),
}

/// What one `Check` showed about the connection.
enum Liveness {
    /// The health service answered (started at the instant given).
    Answered(ProbeOutcome, Instant),
    /// The server answered with an error: it is alive, the call failed.
    Failed(Failure),
    /// No answer within the timeout.
    Silent,
    /// The connection ended (closed, GOAWAY, the Watch stream ended, a protocol error).
    Ended(Ended),
}

impl Prober {
    pub(super) fn new(target: SocketAddr, settings: ProbeSettings, publisher: Publisher, shared: Shared) -> Self {
        Self {
            target,
            backoff: backoff(settings.interval),
            settings,
            publisher,
            shared,
            load_call: None,
            turn: None,
            retrying: false,
        }
    }

    /// Probes until the task is aborted (its handle dropped). Every log line of the prober is
    /// in this span, which names the GrpcBackend (when the observer does) and the endpoint.
    #[tracing::instrument(
        name = "prober",
        skip_all,
        fields(
            backend = self.publisher.observer().backend().map(tracing::field::display),
            endpoint = %self.target,
        )
    )]
    pub(super) async fn run(mut self) {
        loop {
            // A turn to connect, held until the connection answered or failed (or MAX_TURN).
            let limiter = if self.retrying {
                self.shared.retries.clone()
            } else {
                self.shared.connects.clone()
            };
            let Ok(permit) = self.attend(limiter.acquire_owned()).await else {
                return;
            };
            self.turn = Some(Turn::new(permit, self.settings.timeout));
            let attempt_deadline = Instant::now() + self.settings.timeout;
            let mut link = Link {
                opened: Instant::now(),
                answered: None,
                going_away: None,
            };
            let ended = match self.connect(attempt_deadline).await {
                Err(failure) => {
                    self.turn = None;
                    Ended::Failed(failure)
                }
                Ok(mut connection) => {
                    self.load_call = None;
                    self.probe(&mut connection, &mut link, attempt_deadline).await
                }
            };
            let now = Instant::now();
            let failure = match (ended, link.answered) {
                (Ended::Closed(_), Some(answered))
                    if now.saturating_duration_since(answered) >= self.settings.interval =>
                {
                    // Routine rotation: the connection served its interval.
                    self.confirm(now);
                    self.publisher.tracker().connection_ended();
                    self.publisher.observer().rotated();
                    continue;
                }
                (Ended::Closed(failure), Some(_)) => {
                    self.publisher.observer().ended_early();
                    failure
                }
                (Ended::Closed(Failure::Unstable), None) => Failure::Closed,
                (Ended::Closed(failure) | Ended::Failed(failure), _) => failure,
                (Ended::PollInstead | Ended::RetryWatch, _) => unreachable!("handled by probe"),
            };
            self.turn = None;
            self.retrying = true;
            debug!(
                %failure,
                lived = ?now.saturating_duration_since(link.opened),
                answered = ?link.answered.map(|at| now.saturating_duration_since(at)),
                detail = self.publisher.detail().unwrap_or_default(),
                "probe failed"
            );
            if link.answered.is_some() {
                self.publisher.tracker().connection_broke();
            }
            self.publisher.record(ProbeOutcome::Failed(failure), None);
            self.publisher.modify_state(|state| state.load.restart());
            // A connection that lived an interval is replaced at once (that is one connection
            // per interval at most); one that did not waits for the backoff.
            let lived = now.saturating_duration_since(link.opened);
            if lived < self.settings.interval {
                let delay = self.backoff.next().unwrap_or(self.settings.interval);
                self.attend(tokio::time::sleep(delay.min(self.settings.interval))).await;
            }
        }
    }

    /// Probes on one connection until it ends. In `Watch` mode every connection tries `Watch`
    /// first, and a connection polled with `Check` for want of it tries it again every
    /// [`WATCH_RETRY_POLLS`] polls: a backend that gains `Watch` (a rolling upgrade, in place or
    /// behind the same address) gets it on its next connection or within those polls, at the
    /// cost of one UNIMPLEMENTED answer per connection or per that many polls while it lacks it.
    async fn probe(&mut self, connection: &mut HealthConnection, link: &mut Link, deadline: Instant) -> Ended {
        if self.settings.mode != HealthCheckMode::Watch {
            self.turn = None;
            return self.poll(connection, link, None).await;
        }
        let mut deadline = deadline;
        loop {
            match self.watch(connection, link, deadline).await {
                Ended::PollInstead => self.turn = None,
                ended => return ended,
            }
            loop {
                match self.poll(connection, link, Some(WATCH_RETRY_POLLS)).await {
                    // Room for the Watch and the liveness Check beside it, or no Watch now.
                    Ended::RetryWatch if self.make_room(connection, 2) => break,
                    Ended::RetryWatch => {}
                    ended => return ended,
                }
            }
            deadline = Instant::now() + self.settings.timeout;
        }
    }

    /// Leaves room on `connection` for `needed` more calls if it can: the load-report stream
    /// gives way to health calls (it is reopened on a later connection, or after the next poll
    /// if there is room then). Whether there is room.
    fn make_room(&mut self, connection: &mut HealthConnection, needed: usize) -> bool {
        if connection.call_room() < needed
            && let Some(load_call) = self.load_call.take()
        {
            debug!(
                "the server's SETTINGS_MAX_CONCURRENT_STREAMS leaves no room for a health call: the load-report stream gives way"
            );
            connection.cancel(load_call);
        }
        connection.call_room() >= needed
    }

    /// Follows one `Watch` stream, with a liveness `Check` each quiet interval, until it ends.
    async fn watch(&mut self, connection: &mut HealthConnection, link: &mut Link, deadline: Instant) -> Ended {
        let started = Instant::now();
        let watch = match connection.start(Method::Watch, &self.settings.service) {
            Ok(watch) => watch,
            Err(ConnectionError::GoingAway) => return goaway_end(link.going_away.unwrap_or(reason::NO_ERROR)),
            Err(error) => return self.connection_gone(&error, link),
        };
        let first = loop {
            match self
                .attend(tokio::time::timeout_at(deadline, connection.next_event()))
                .await
            {
                Err(_) => return Ended::Failed(Failure::Timeout),
                Ok(Err(error)) => return self.connection_gone(&error, link),
                Ok(Ok(Event::Message(call, Message::Health(response)))) if call == watch => break response,
                Ok(Ok(Event::Ended(call, CallEnd::Status(Code::Unimplemented, _)))) if call == watch => {
                    return Ended::PollInstead;
                }
                // A Watch tried again after polling: the load-report stream may be open.
                Ok(Ok(event)) if self.load_event(&event) => {}
                Ok(Ok(Event::Ended(call, end))) if call == watch => {
                    return match link.going_away {
                        // Refused by the GOAWAY: the GOAWAY is the reason.
                        Some(code) => Ended::Failed(Failure::GoAway(code)),
                        None => Ended::Failed(self.call_failure(&end)),
                    };
                }
                // GOAWAY before the first answer: the Watch may still be answered, or refused.
                Ok(Ok(Event::GoAway(goaway))) => self.going_away(&goaway, link),
                Ok(Ok(_)) => {}
            }
        };
        self.turn = None;
        link.answered.get_or_insert_with(Instant::now);
        self.answered(answer(first), started);
        if let Some(code) = link.going_away {
            // The server announced the connection's end before it answered.
            return goaway_end(code);
        }
        if !self.make_room(connection, 1) {
            // A server allowing one stream: the Watch would leave no room for the liveness
            // Check, which is what proves a quiet endpoint alive.
            connection.cancel(watch);
            return Ended::PollInstead;
        }
        self.start_load_reports(connection);

        let mut heard_since_tick = false;
        let mut tick = tokio::time::interval_at(Instant::now() + self.settings.interval, self.settings.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = connection.next_event() => match event {
                    Ok(Event::Message(call, Message::Health(response))) if call == watch => {
                        heard_since_tick = true;
                        self.publisher.record(answer(response), None);
                    }
                    Ok(event) if self.load_event(&event) => {}
                    // The stream or the connection ended, or the server announced its end
                    // (GOAWAY: graceful shutdown, connection age), after answering: a rotation
                    // or an early end, by the connection's age.
                    Ok(Event::Ended(call, end)) if call == watch => return self.stream_end(&end, link),
                    Ok(Event::GoAway(goaway)) => {
                        self.going_away(&goaway, link);
                        return goaway_end(goaway.code);
                    }
                    Err(error) => return self.connection_gone(&error, link),
                    Ok(_) => {}
                },
                () = until(self.wake_at()) => self.wake(),
                _ = tick.tick() => {
                    if std::mem::take(&mut heard_since_tick) {
                        // The stream spoke within the interval: the connection is alive.
                        self.confirm(Instant::now());
                        continue;
                    }
                    match self.check(connection, link, Some(watch)).await {
                        Liveness::Answered(outcome, started) => {
                            self.confirm(Instant::now());
                            self.answered(outcome, started);
                        }
                        Liveness::Failed(failure) => {
                            self.publisher.tracker().connection_broke();
                            self.publisher.record(ProbeOutcome::Failed(failure), None);
                        }
                        Liveness::Silent => return Ended::Failed(Failure::Timeout),
                        Liveness::Ended(ended) => return ended,
                    }
                }
            }
        }
    }

    /// Polls with `Check` every interval until the connection stops answering, or until
    /// `retry_watch_after` polls (then [`Ended::RetryWatch`]). Between polls the connection is
    /// driven: the server's PINGs and SETTINGS are answered as they come, load reports are
    /// taken (and stamped) when they arrive, and a GOAWAY or a close is seen at once.
    async fn poll(
        &mut self,
        connection: &mut HealthConnection,
        link: &mut Link,
        retry_watch_after: Option<u32>,
    ) -> Ended {
        let mut polls = 0;
        loop {
            let started = Instant::now();
            match self.check(connection, link, None).await {
                Liveness::Answered(outcome, started) => {
                    self.confirm(Instant::now());
                    link.answered.get_or_insert_with(Instant::now);
                    self.answered(outcome, started);
                    self.start_load_reports(connection);
                }
                Liveness::Failed(failure) => {
                    if link.answered.is_some() {
                        self.publisher.tracker().connection_broke();
                    }
                    self.publisher
                        .record(ProbeOutcome::Failed(failure), Some(started.elapsed()));
                }
                Liveness::Silent => return Ended::Failed(Failure::Timeout),
                Liveness::Ended(ended) => return ended,
            }
            polls += 1;
            if retry_watch_after.is_some_and(|after| polls >= after) {
                return Ended::RetryWatch;
            }
            let next_poll = tokio::time::sleep_until(started + self.settings.interval);
            let mut next_poll = std::pin::pin!(next_poll);
            loop {
                tokio::select! {
                    event = connection.next_event() => match event {
                        Ok(event) if self.load_event(&event) => {}
                        // The server announced the connection's end (graceful shutdown,
                        // connection age): a rotation or an early end, by the connection's age.
                        Ok(Event::GoAway(goaway)) => {
                            self.going_away(&goaway, link);
                            return goaway_end(goaway.code);
                        }
                        Err(error) => return self.connection_gone(&error, link),
                        Ok(_) => {}
                    },
                    () = until(self.wake_at()) => self.wake(),
                    () = &mut next_poll => break,
                }
            }
        }
    }

    /// One `Check`, bounded by `timeout`. Messages of the open `watch`, if any, that arrive
    /// meanwhile are recorded; its end means the connection is going.
    async fn check(&mut self, connection: &mut HealthConnection, link: &mut Link, watch: Option<CallId>) -> Liveness {
        let started = Instant::now();
        // A server that lowered SETTINGS_MAX_CONCURRENT_STREAMS since the load-report stream
        // opened: the Check comes first.
        self.make_room(connection, 1);
        let check = match connection.start(Method::Check, &self.settings.service) {
            Ok(check) => check,
            Err(ConnectionError::GoingAway) => {
                return Liveness::Ended(goaway_end(link.going_away.unwrap_or(reason::NO_ERROR)));
            }
            Err(error) => return Liveness::Ended(self.connection_gone(&error, link)),
        };
        let deadline = started + self.settings.timeout;
        let mut answer_received = None;
        loop {
            let event = match self
                .attend(tokio::time::timeout_at(deadline, connection.next_event()))
                .await
            {
                Err(_) => return Liveness::Silent,
                Ok(Err(error)) => return Liveness::Ended(self.connection_gone(&error, link)),
                Ok(Ok(event)) => event,
            };
            match event {
                Event::Message(call, Message::Health(response)) if call == check => answer_received = Some(response),
                Event::Ended(call, end) if call == check => {
                    return match (end, answer_received) {
                        (CallEnd::Status(Code::Ok, _), Some(response)) => Liveness::Answered(answer(response), started),
                        // The protocol: Check on an unknown service answers NOT_FOUND.
                        (CallEnd::Status(Code::NotFound, _), _) => {
                            Liveness::Answered(ProbeOutcome::NotServing(NotServingAnswer::NotFound), started)
                        }
                        (CallEnd::Status(Code::Ok, _), None) => {
                            self.publisher
                                .set_detail(Some("a Check answered OK without a message".into()));
                            Liveness::Failed(Failure::ProtocolError)
                        }
                        // Refused by a GOAWAY: the connection is going.
                        (CallEnd::Reset(reason::REFUSED_STREAM), _) => {
                            Liveness::Ended(goaway_end(link.going_away.unwrap_or(reason::NO_ERROR)))
                        }
                        (end, _) => Liveness::Failed(self.call_failure(&end)),
                    };
                }
                Event::Message(call, Message::Health(response)) if Some(call) == watch => {
                    self.publisher.record(answer(response), None);
                }
                ref event if self.load_event(event) => {}
                Event::Ended(call, ref end) if Some(call) == watch => {
                    return Liveness::Ended(self.stream_end(end, link));
                }
                // GOAWAY: the Check, if refused, ends as such; if accepted, it is answered.
                Event::GoAway(ref goaway) => self.going_away(goaway, link),
                _ => {}
            }
        }
    }

    /// Opens the load-report stream on `connection` if the policy wants reports, the server
    /// has not refused them, and it is not open yet.
    fn start_load_reports(&mut self, connection: &mut HealthConnection) {
        let Some(settings) = self.settings.load_reports else {
            return;
        };
        if self.load_call.is_some() || self.publisher.state().load_reports_unimplemented {
            return;
        }
        // Only beside room for the liveness Check (and the Watch, open already or not wanted):
        // the Check proves the endpoint alive, a load report only weighs it. A server allowing
        // 2 streams gets Watch and Check, and its endpoint the mean weight, as one without ORCA.
        if connection.call_room() < 2 {
            return;
        }
        self.load_call = connection.start_load_reports(settings.interval).ok();
    }

    /// Takes `event` if it belongs to the load-report stream.
    fn load_event(&mut self, event: &Event) -> bool {
        let Some(load_call) = self.load_call else {
            return false;
        };
        match event {
            Event::Message(call, Message::LoadReport(report)) if *call == load_call => {
                let sample = LoadSample::from_report(report);
                let expiration = self
                    .settings
                    .load_reports
                    .map_or(Duration::MAX, |s| s.weight_expiration_period);
                self.publisher
                    .modify_state(|state| state.load.update(sample, expiration, Instant::now()));
                true
            }
            Event::Ended(call, end) if *call == load_call => {
                if matches!(end, CallEnd::Status(Code::Unimplemented, _)) {
                    debug!("no ORCA load reports (UNIMPLEMENTED): the endpoint gets the mean weight");
                    self.publisher
                        .modify_state(|state| state.load_reports_unimplemented = true);
                } else {
                    debug!(?end, "the load-report stream ended; reopened on the next connection");
                }
                true
            }
            _ => false,
        }
    }

    /// The failure of a health call, its detail kept for the log.
    fn call_failure(&mut self, end: &CallEnd) -> Failure {
        self.publisher.set_detail(match end {
            CallEnd::Status(_, message) if !message.is_empty() => Some(format!("grpc-message {message:?}")),
            CallEnd::Malformed(why) => Some((*why).to_string()),
            _ => None,
        });
        call_failure(end)
    }

    /// How the `Watch` stream's end after its first answer counts.
    fn stream_end(&mut self, end: &CallEnd, link: &Link) -> Ended {
        match end {
            CallEnd::MessageTooLarge | CallEnd::Malformed(_) => Ended::Failed(self.call_failure(end)),
            CallEnd::Reset(reason::REFUSED_STREAM) | CallEnd::Status(..) if link.going_away.is_some() => {
                goaway_end(link.going_away.unwrap_or(reason::NO_ERROR))
            }
            CallEnd::Reset(code) => Ended::Closed(Failure::Reset(*code)),
            CallEnd::Status(..) => {
                self.call_failure(end);
                Ended::Closed(Failure::Unstable)
            }
        }
    }

    /// How a connection that can no longer carry calls counts, its detail kept for the log.
    fn connection_gone(&mut self, error: &ConnectionError, link: &Link) -> Ended {
        self.publisher.set_detail(Some(error.to_string()));
        // A TLS 1.3 server judges the client's certificate after the client's side of the
        // handshake is done: its refusal is an alert on the first read.
        if let ConnectionError::Io(io) = error
            && let Some(tls) = tls_failure(io)
        {
            return Ended::Failed(Failure::Tls(tls));
        }
        match error {
            ConnectionError::Protocol(_) => Ended::Failed(Failure::ProtocolError),
            // A server whose SETTINGS_MAX_CONCURRENT_STREAMS leaves no room for a probe: what it
            // would answer to one sent anyway.
            ConnectionError::NoRoom => Ended::Failed(Failure::Reset(reason::REFUSED_STREAM)),
            ConnectionError::Closed | ConnectionError::Io(_) | ConnectionError::GoingAway => match link.going_away {
                Some(code) => goaway_end(code),
                None => Ended::Closed(Failure::Unstable),
            },
        }
    }

    fn going_away(&mut self, goaway: &GoAway, link: &mut Link) {
        link.going_away.get_or_insert(goaway.code);
        if !goaway.debug.is_empty() {
            self.publisher
                .set_detail(Some(format!("GOAWAY debug data {:?}", goaway.debug)));
        }
    }

    /// A new connection (no HTTP/2 keepalive: see the module docs), by `deadline`.
    async fn connect(&mut self, deadline: Instant) -> Result<HealthConnection, Failure> {
        let (target, source, tls) = (self.target, self.shared.source_address, self.settings.tls.as_ref());
        let connecting = async {
            let tcp = match &self.shared.connector {
                Connector::Tcp => open_tcp(target, source).await,
                #[cfg(test)]
                Connector::Memory(open) => {
                    return open(target)
                        .map(|io| HealthConnection::handshake(io, Scheme::Http, "test"))
                        .map_err(|error| (connect_failure(&error), error));
                }
            }
            .map_err(|error| (connect_failure(&error), error))?;
            let Some(tls) = tls else {
                return Ok(HealthConnection::handshake(tcp, Scheme::Http, &target.to_string()));
            };
            // The handshake is part of connecting: bounded by the same deadline.
            let stream = tls
                .connector()
                .connect(tls.server_name().clone(), tcp)
                .await
                .map_err(|error| {
                    (
                        tls_failure(&error).map_or_else(|| connect_failure(&error), Failure::Tls),
                        error,
                    )
                })?;
            Ok(HealthConnection::handshake(stream, Scheme::Https, &tls.authority()))
        };
        match tokio::time::timeout_at(deadline, connecting).await {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err((failure, error))) => {
                self.publisher.set_detail(Some(error.to_string()));
                Err(failure)
            }
            Err(_) => Err(Failure::ConnectTimeout),
        }
    }

    /// The health service answered a probe that started at `started`.
    fn answered(&mut self, outcome: ProbeOutcome, started: Instant) {
        self.publisher.record(outcome, Some(started.elapsed()));
        if !self.publisher.tracker().on_probation() {
            self.backoff = backoff(self.settings.interval);
            self.retrying = false;
        }
    }

    /// The current connection is alive at `now` (see [`crate::health::tracker::HealthTracker::confirm`]).
    fn confirm(&mut self, now: Instant) {
        if self.publisher.confirm(now) {
            self.backoff = backoff(self.settings.interval);
            self.retrying = false;
        }
    }

    /// The next instant something is due: a held verdict's release, a deferred notice, giving
    /// back a connect turn.
    fn wake_at(&self) -> Option<Instant> {
        let turn = self.turn.as_ref().map(Turn::until);
        self.publisher.deadline().into_iter().chain(turn).min()
    }

    /// Does what is due now (see [`Prober::wake_at`]).
    fn wake(&mut self) {
        if self.turn.as_ref().is_some_and(|turn| Instant::now() >= turn.until()) {
            self.turn = None;
        }
        self.publisher.wake(Instant::now());
    }

    /// Awaits `future` (which must not need the prober), doing what falls due meanwhile.
    async fn attend<T>(&mut self, future: impl Future<Output = T>) -> T {
        let mut future = std::pin::pin!(future);
        loop {
            tokio::select! {
                output = &mut future => return output,
                () = until(self.wake_at()) => self.wake(),
            }
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// How a GOAWAY counts: an error code is a failure; NO_ERROR, a graceful end.
pub(super) fn goaway_end(code: u32) -> Ended {
    if code == reason::NO_ERROR {
        Ended::Closed(Failure::GoAway(code))
    } else {
        Ended::Failed(Failure::GoAway(code))
    }
}

fn answer(response: HealthCheckResponse) -> ProbeOutcome {
    match ServingStatus::try_from(response.status) {
        Ok(ServingStatus::Serving) => ProbeOutcome::Serving,
        Ok(ServingStatus::NotServing) => ProbeOutcome::NotServing(NotServingAnswer::NotServing),
        Ok(ServingStatus::ServiceUnknown) => ProbeOutcome::NotServing(NotServingAnswer::ServiceUnknown),
        Ok(ServingStatus::Unknown) | Err(_) => ProbeOutcome::NotServing(NotServingAnswer::Unknown),
    }
}

/// How a health call that did not answer failed.
pub(super) fn call_failure(end: &CallEnd) -> Failure {
    match end {
        CallEnd::Reset(code) => Failure::Reset(*code),
        CallEnd::MessageTooLarge => Failure::MessageTooLarge,
        CallEnd::Malformed(_) => Failure::ProtocolError,
        CallEnd::Status(Code::Unimplemented, _) => Failure::Unimplemented,
        CallEnd::Status(code, _) => Failure::CallFailed(*code),
    }
}

/// How opening a connection failed.
pub(super) fn connect_failure(error: &std::io::Error) -> Failure {
    match error.kind() {
        std::io::ErrorKind::TimedOut => Failure::ConnectTimeout,
        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset => Failure::ConnectRefused,
        _ => Failure::ConnectFailed,
    }
}

/// Reconnect delays: from 100ms, doubling, with jitter (so that the probers of many endpoints
/// do not retry in lockstep); the caller caps each at the probe interval.
pub(super) fn backoff(interval: Duration) -> ExponentialBackoff {
    let min = Duration::from_millis(100).min(interval);
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay((interval / 2).max(min))
        .with_jitter()
        .without_max_times()
        .build()
}
