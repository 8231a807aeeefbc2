//! The sans-IO reflector: all session logic, no sockets, no clocks.
//!
//! Drivers call [`Reflector::connect`], [`Reflector::handle`], [`Reflector::disconnect`] and
//! [`Reflector::poll`] with the current time of a monotonic clock in milliseconds, then move the
//! [`Output`]s from [`Reflector::drain_outputs`] to the clients.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use synq_protocol::ids::{PersistentId, SessionId, ViewId};
use synq_protocol::membership::{self, Challenge, MemberKey};
use synq_protocol::wire::{
    ClientMessage, ErrorCode, ErrorMessage, EventBody, HashVote, Join, PersistRecord, ServerMessage, SessionTime,
    SnapshotRecord, StampedEvent, Sync, SyncStart, Tally, ViewEvent, VoteGroup, VotePurpose,
};
use synq_protocol::{INITIAL_SEQ, Limits, PROTOCOL_VERSION, seq_le};

use crate::access::AccessControl;
use crate::session::{AwaitedUpload, Session, TallyState, UsersBatch, event_bytes};
use crate::storage::{Claim, SessionMeta, Storage, StorageError, StoredSession};

/// A session resumed from storage continues this far after the latest time recorded for it
/// (events' times and clock marks), so that no client can have seen a later time.
pub const TIME_MARK_MS: u64 = 100;

/// While a session is active its clock is recorded ahead: when session time reaches the last mark,
/// a mark this far ahead is written, so an idle session writes one mark a second rather than one
/// per [`TIME_MARK_MS`]. A session resumed from storage may therefore continue up to this much
/// later than clients last saw: its clock jumps forward once, never back.
const TIME_LEASE_MS: u64 = 1000;

/// The event log is made durable (fsync) this often.
const SYNC_EVERY_MS: u64 = 1000;

/// Idle sessions are unloaded, and the memory held recounted, this often: each is a pass over
/// every session, and neither needs to be prompt.
const HOUSEKEEPING_MS: u64 = 1000;

/// The latest session time a client may claim to hold (2⁵³ ms, ≈ 285,000 years): session time is
/// computed from it, and must never overflow.
const MAX_SESSION_TIME: SessionTime = 1 << 53;

type Store = Option<Box<dyn Storage>>;

/// A connection, as numbered by the driver.
pub type ClientId = u64;

/// How the reflector behaves. The defaults follow Croquet's where it has one.
#[derive(Clone, Debug)]
pub struct ReflectorConfig {
    /// Tick period used when a client asks for none (ms).
    pub default_tick_ms: u32,
    /// Join/leave notices are batched for this long (ms): at most one `Users` event is stamped
    /// per this period. A join after a quiet period (no notice stamped for this long) is stamped
    /// at once, so that the joiner, which is synced only once it sees its own view-join, does not
    /// wait out a batch; joins that follow within the period are batched.
    pub users_batch_ms: u64,
    /// A vote tally closes when every client voted or after this long (ms).
    pub tally_window_ms: u64,
    /// At this many buffered events the reflector asks for a snapshot.
    pub request_snapshot_at: usize,
    /// At this many buffered events new events are refused until a snapshot arrives.
    pub max_buffered_events: usize,
    /// Size limits.
    pub limits: Limits,
    /// A disconnected view leaves its session (in the model: view-exit) only after this long; a
    /// client that reconnects sooner never left. Croquet's `rejoinLimit` (1000 ms) + 250 ms.
    pub leave_delay_ms: u64,
    /// Most events one client may send per second (Croquet's hard maximum is 60; clients bundle
    /// above 20 per second, so well-behaved clients never reach it). Excess events are refused.
    pub max_events_per_second: u32,
    /// Which apps are admitted.
    pub access: AccessControl,
    /// Most votes one client may send per second (a replica votes at each snapshot point and
    /// persist request: a few per minute). Excess votes are ignored.
    pub max_votes_per_second: u32,
    /// Most vote tallies a session keeps open at once; votes that would open more are ignored.
    pub max_open_tallies: usize,
    /// Most sessions held in memory; a join that would load another is refused with
    /// [`ErrorCode::Full`] (after idle sessions were unloaded).
    pub max_sessions: usize,
    /// Most sessions one origin (an IP address, as the driver reports it) may have opened and
    /// still held in memory; beyond, its joins of sessions not in memory are refused.
    pub max_sessions_per_origin: usize,
    /// A session with no client for this long is unloaded from memory (its state stays in
    /// storage, and it is loaded again at the next join). Sessions of a reflector without
    /// storage are never unloaded.
    pub idle_unload_ms: u64,
    /// Most bytes of events one session may buffer (since its latest snapshot); past half of it
    /// the reflector asks for a snapshot, at it new events are refused until one arrives.
    pub max_buffered_bytes: usize,
    /// Most bytes of events, snapshots and persisted documents the reflector holds in memory over
    /// all sessions; at it, events and new sessions are refused with a clear error.
    pub memory_budget_bytes: usize,
}

impl Default for ReflectorConfig {
    fn default() -> Self {
        Self {
            default_tick_ms: 50,
            users_batch_ms: 200,
            tally_window_ms: 1000,
            request_snapshot_at: 60_000,
            max_buffered_events: 100_000,
            limits: Limits::default(),
            max_events_per_second: 60,
            leave_delay_ms: 1250,
            access: AccessControl::Open,
            max_votes_per_second: 10,
            max_open_tallies: 8,
            max_sessions: 100_000,
            max_sessions_per_origin: 64,
            idle_unload_ms: 60_000,
            max_buffered_bytes: 64 * 1024 * 1024,
            memory_budget_bytes: 2 * 1024 * 1024 * 1024,
        }
    }
}

/// What the driver must do.
#[derive(Debug, Clone)]
pub enum Output {
    /// Deliver `message` to `client`.
    Send {
        /// The recipient.
        client: ClientId,
        /// The message, shared between all recipients of a broadcast.
        message: Arc<ServerMessage>,
    },
    /// Deliver the error to `client`, then close its connection.
    Close {
        /// The client to disconnect.
        client: ClientId,
        /// Why.
        reason: ErrorMessage,
    },
}

struct ClientState {
    session: Option<SessionId>,
    view: ViewId,
    /// What the join of this connection must sign.
    challenge: Challenge,
    /// The membership key the client proved it holds (set at join).
    member: Option<MemberKey>,
    /// Where the connection comes from, as the driver reports it.
    origin: Option<std::net::IpAddr>,
    /// Token bucket of the event rate limit.
    events: TokenBucket,
    /// Token bucket of the vote rate limit.
    votes: TokenBucket,
}

/// A token bucket: `rate` tokens per second, at most `rate` held.
struct TokenBucket {
    tokens: f64,
    refilled_at: u64,
}

impl TokenBucket {
    fn full(rate: u32, now: u64) -> Self {
        Self { tokens: f64::from(rate), refilled_at: now }
    }

    /// Refills the bucket and takes one token if there is one.
    fn take(&mut self, rate: u32, now: u64) -> bool {
        let rate = f64::from(rate);
        let elapsed = now.saturating_sub(self.refilled_at) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        self.refilled_at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The reflector's state machine. See the crate documentation.
pub struct Reflector {
    config: ReflectorConfig,
    sessions: HashMap<SessionId, Session>,
    clients: HashMap<ClientId, ClientState>,
    persisted: HashMap<PersistentId, PersistRecord>,
    /// Membership keys pinned to persistent ids (a cache of storage's).
    member_keys: HashMap<PersistentId, MemberKey>,
    outputs: Vec<Output>,
    /// Events stamped since outputs were last handed out, in order: appended to storage (one
    /// batch per session) before any output leaves, see [`Reflector::drain_outputs`].
    unappended: Vec<(SessionId, StampedEvent)>,
    storage: Store,
    last_sync: u64,
    /// Bytes held in memory: buffered events, snapshots, persisted documents.
    memory: usize,
    last_housekeeping: u64,
    /// Connections accepted since start.
    connections: u64,
}

fn error_message(code: ErrorCode, message: impl Into<String>) -> ErrorMessage {
    ErrorMessage { code, message: message.into() }
}

impl Reflector {
    /// A reflector with no sessions that keeps everything in memory.
    pub fn new(config: ReflectorConfig) -> Self {
        Self {
            config,
            sessions: HashMap::new(),
            clients: HashMap::new(),
            persisted: HashMap::new(),
            member_keys: HashMap::new(),
            outputs: Vec::new(),
            unappended: Vec::new(),
            storage: None,
            last_sync: 0,
            memory: 0,
            last_housekeeping: 0,
            connections: 0,
        }
    }

    /// A reflector that records sessions and persisted data in `storage`, and resumes the
    /// sessions it finds there.
    pub fn with_storage(config: ReflectorConfig, storage: Box<dyn Storage>) -> Self {
        Self { storage: Some(storage), ..Self::new(config) }
    }

    /// Makes everything recorded so far durable (call before exiting).
    pub fn flush_storage(&mut self, now: u64) -> Result<(), StorageError> {
        for session in self.sessions.values_mut() {
            let time = session.time(now);
            if let Some(storage) = self.storage.as_mut() {
                storage.mark_time(&session.id, time)?;
            }
        }
        match self.storage.as_mut() {
            Some(storage) => storage.sync(),
            None => Ok(()),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ReflectorConfig {
        &self.config
    }

    /// Number of sessions held in memory.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Number of events buffered for a session (since its latest snapshot).
    pub fn buffered_events(&self, session: &SessionId) -> Option<usize> {
        self.sessions.get(session).map(|s| s.events.len())
    }

    /// The latest snapshot stored for a session.
    pub fn snapshot(&self, session: &SessionId) -> Option<&SnapshotRecord> {
        self.sessions.get(session).and_then(|s| s.snapshot.as_ref())
    }

    /// The persisted data stored for a persistent id.
    pub fn persisted(&self, persistent_id: &PersistentId) -> Option<&PersistRecord> {
        self.persisted.get(persistent_id)
    }

    /// Takes the outputs produced so far.
    pub fn drain_outputs(&mut self) -> std::vec::Drain<'_, Output> {
        self.append_unappended();
        self.outputs.drain(..)
    }

    /// Appends the events stamped since outputs were last handed out, one batch per session, all
    /// in one [`Storage::append_batches`] call (a JetStream cluster's storage pipelines them: one
    /// round trip for the whole pass instead of one per event). Until then nothing that carries them — the
    /// events, a `Sync`, a tick after them — has left. A session whose events storage refuses
    /// is failed: see [`Reflector::fail_session`].
    fn append_unappended(&mut self) {
        if self.unappended.is_empty() {
            return;
        }
        let Some(storage) = self.storage.as_mut() else {
            self.unappended.clear();
            return;
        };
        let mut batches: Vec<(SessionId, Vec<StampedEvent>)> = Vec::new();
        let mut index: HashMap<SessionId, usize> = HashMap::new();
        for (session, event) in self.unappended.drain(..) {
            let at = *index.entry(session).or_insert_with(|| {
                batches.push((session, Vec::new()));
                batches.len() - 1
            });
            batches[at].1.push(event);
        }
        let results = storage.append_batches(&batches);
        let failed =
            batches.iter().zip(results).filter_map(|((session, _), result)| result.err().map(|e| (*session, e)));
        for (session, error) in failed.collect::<Vec<_>>() {
            tracing::error!(%session, %error, "events not recorded: the session's clients are sent away");
            let msg = format!("the reflector could not record the session's events: {}", error.public_reason());
            self.fail_session(session, &msg);
        }
    }

    /// Stops serving a session at once: the outputs to its clients that have not left are
    /// dropped (among them any event storage has not recorded), its clients are closed with
    /// [`ErrorCode::Unavailable`] and `reason`, and the session is dropped from memory. The
    /// clients reconnect and resume from what storage holds, sending again what was not
    /// stamped; they never saw an event that storage does not hold.
    fn fail_session(&mut self, id: SessionId, reason: &str) {
        self.unappended.retain(|(session, _)| *session != id);
        let Some(session) = self.sessions.remove(&id) else { return };
        self.memory = self.memory.saturating_sub(session.memory_bytes());
        let clients: HashSet<ClientId> = session.clients.iter().map(|(client, _)| *client).collect();
        self.outputs.retain(|output| match output {
            Output::Send { client, .. } | Output::Close { client, .. } => !clients.contains(client),
        });
        for client in clients {
            if let Some(state) = self.clients.get_mut(&client) {
                state.session = None;
            }
            self.close(client, error_message(ErrorCode::Unavailable, reason));
        }
    }

    /// Connections accepted since the reflector started.
    pub fn connections_accepted(&self) -> u64 {
        self.connections
    }

    /// Bytes of events, snapshots and persisted documents held in memory.
    pub fn memory_bytes(&self) -> usize {
        self.memory
    }

    /// Whether the connection has joined a session (its membership proved).
    pub fn has_joined(&self, client: ClientId) -> bool {
        self.session_of(client).is_some()
    }

    /// The session the connection joined, if it did.
    pub fn session_of(&self, client: ClientId) -> Option<SessionId> {
        self.clients.get(&client).and_then(|c| c.session)
    }

    /// A new connection. It is sent a [`ServerMessage::Challenge`] and must answer with `Join`.
    pub fn connect(&mut self, now: u64, client: ClientId) {
        self.connect_from(now, client, None);
    }

    /// A new connection from `origin` (its IP address), which the per-origin limits count.
    pub fn connect_from(&mut self, now: u64, client: ClientId, origin: Option<std::net::IpAddr>) {
        self.connections += 1;
        let challenge = Challenge::random();
        let state = ClientState {
            session: None,
            view: ViewId(0),
            challenge,
            member: None,
            origin,
            events: TokenBucket::full(self.config.max_events_per_second, now),
            votes: TokenBucket::full(self.config.max_votes_per_second, now),
        };
        self.clients.insert(client, state);
        self.send(client, ServerMessage::Challenge(challenge));
    }

    /// A connection closed (or timed out). Its view leaves its session.
    pub fn disconnect(&mut self, now: u64, client: ClientId) {
        // The view leaves only if it does not come back within the leave delay.
        self.remove_client(client, now + self.config.leave_delay_ms);
    }

    /// A client said it leaves its session: its view exits with the next users notice, without
    /// waiting for the leave delay (it will not come back).
    fn leave(&mut self, now: u64, client: ClientId) {
        self.remove_client(client, now);
    }

    fn remove_client(&mut self, client: ClientId, view_leaves_at: u64) {
        let Some(state) = self.clients.remove(&client) else { return };
        let Some(session_id) = state.session else { return };
        if let Some(session) = self.sessions.get_mut(&session_id) {
            session.clients.retain(|(c, _)| *c != client);
            session.pending_leaves.push((state.view, view_leaves_at));
        }
    }

    /// Turns due pending leaves into leave notices; pauses a session once it is empty and has
    /// nothing left to announce.
    fn expire_leaves(&mut self, now: u64) {
        let batch_ms = self.config.users_batch_ms;
        for session in self.sessions.values_mut() {
            if session.pending_leaves.is_empty() || session.paused_at.is_some() {
                continue;
            }
            let (due, waiting): (Vec<_>, Vec<_>) = session.pending_leaves.drain(..).partition(|(_, at)| now >= *at);
            session.pending_leaves = waiting;
            for (view, _) in due {
                queue_user_change(session, now, batch_ms, view, false);
            }
            if session.clients.is_empty() && session.pending_leaves.is_empty() {
                // Nobody will hear the leave batch live; stamp it now so that it is buffered and
                // replayed by the next joiner, then pause session time.
                flush_users(session, now, &mut self.unappended, &mut self.outputs);
                let time = session.time(now);
                if let Some(storage) = self.storage.as_mut()
                    && let Err(error) = storage.mark_time(&session.id, time)
                {
                    tracing::error!(session = %session.id, %error, "cannot record session time");
                }
                session.paused_at = Some(time);
                session.idle_since = Some(now);
                session.tallies.clear();
                session.awaited_upload = None;
                session.awaited_persist = None;
            }
        }
    }

    /// Handles one message from a client.
    pub fn handle(&mut self, now: u64, client: ClientId, message: ClientMessage) {
        let Some(state) = self.clients.get(&client) else { return };
        let joined = state.session;
        match (message, joined) {
            (ClientMessage::Join(join), None) => self.join(now, client, join),
            (ClientMessage::Join(_), Some(_)) => {
                self.close(client, error_message(ErrorCode::NotJoined, "second Join on one connection"))
            }
            (ClientMessage::Ping(nonce), _) => self.send(client, ServerMessage::Pong(nonce)),
            (_, None) => self.close(client, error_message(ErrorCode::NotJoined, "the first message must be Join")),
            (ClientMessage::Event(ViewEvent { sent, payload }), Some(session)) => {
                let view = self.clients[&client].view;
                if let Some(id) = sent
                    && self.sessions.get(&session).is_some_and(|s| s.already_stamped(view, id))
                {
                    // Sent again after a reconnect, but it was stamped: the sender will see it.
                    tracing::debug!(client, %view, seq = id.seq, "duplicate event ignored");
                    return;
                }
                if payload.len() > self.config.limits.max_event_bytes {
                    let limit = self.config.limits.max_event_bytes;
                    self.send_error(
                        client,
                        ErrorCode::TooLarge,
                        format!("event of {} bytes exceeds {limit} bytes", payload.len()),
                    );
                    return;
                }
                let rate = self.config.max_events_per_second;
                if !self.clients.get_mut(&client).is_some_and(|c| c.events.take(rate, now)) {
                    let limit = self.config.max_events_per_second;
                    self.send_error(
                        client,
                        ErrorCode::RateLimited,
                        format!("more than {limit} events per second; dropped"),
                    );
                    return;
                }
                self.stamp(now, session, client, EventBody::View { sender: view, sent, payload });
            }
            (ClientMessage::HashVote(vote), Some(session)) => self.vote(now, session, client, vote),
            (ClientMessage::SnapshotUpload(record), Some(session)) => self.upload(session, client, record),
            (ClientMessage::PersistUpload(record), Some(session)) => self.persist(session, client, record),
            (ClientMessage::Leave, Some(_)) => self.leave(now, client),
        }
    }

    /// Fires what is due: heartbeat ticks, join/leave batches, vote tallies, storage upkeep.
    pub fn poll(&mut self, now: u64) {
        self.sync_storage(now);
        self.drop_lost_claims();
        self.expire_leaves(now);
        if now >= self.last_housekeeping + HOUSEKEEPING_MS {
            self.last_housekeeping = now;
            self.unload_idle_sessions(Some(now));
            self.recount_memory();
        }
        for session in self.sessions.values_mut() {
            if session.clients.is_empty() {
                continue;
            }
            if session.users.deadline.is_some_and(|d| now >= d) {
                flush_users(session, now, &mut self.unappended, &mut self.outputs);
            }
            let time = session.time(now);
            if time >= session.last_mark {
                session.last_mark = time + TIME_LEASE_MS;
                if let Some(storage) = self.storage.as_mut()
                    && let Err(error) = storage.mark_time(&session.id, session.last_mark)
                {
                    tracing::error!(session = %session.id, %error, "cannot record session time");
                }
            }
            let due: Vec<_> = session.tallies.iter().filter(|(_, t)| now >= t.deadline).map(|(k, _)| *k).collect();
            for key in due {
                close_tally(session, key, &mut self.outputs);
            }
            if now >= session.last_broadcast + u64::from(session.tick_ms) {
                let tick = Arc::new(ServerMessage::Tick { time: session.time(now), seq: session.seq });
                session.last_broadcast = now;
                for (client, _) in &session.clients {
                    self.outputs.push(Output::Send { client: *client, message: tick.clone() });
                }
            }
        }
    }

    /// Makes the event logs durable if it is time to (called by [`Reflector::poll`]).
    fn sync_storage(&mut self, now: u64) {
        if now >= self.last_sync + SYNC_EVERY_MS {
            self.last_sync = now;
            if let Some(Err(error)) = self.storage.as_mut().map(|s| s.sync()) {
                tracing::error!(%error, "cannot make the event logs durable");
            }
        }
    }

    /// The earliest time at which [`Reflector::poll`] has something to do.
    pub fn next_deadline(&self) -> Option<u64> {
        let active = self.sessions.values().filter(|s| !s.clients.is_empty()).flat_map(|s| {
            let tick = s.last_broadcast + u64::from(s.tick_ms);
            let tallies = s.tallies.values().map(|t| t.deadline);
            std::iter::once(tick).chain(s.users.deadline).chain(tallies)
        });
        let leaves = self
            .sessions
            .values()
            .filter(|s| s.paused_at.is_none())
            .flat_map(|s| s.pending_leaves.iter().map(|(_, at)| *at));
        active.chain(leaves).min()
    }

    fn send(&mut self, client: ClientId, message: ServerMessage) {
        self.outputs.push(Output::Send { client, message: Arc::new(message) });
    }

    fn send_error(&mut self, client: ClientId, code: ErrorCode, message: String) {
        self.send(client, ServerMessage::Error(error_message(code, message)));
    }

    fn close(&mut self, client: ClientId, reason: ErrorMessage) {
        self.outputs.push(Output::Close { client, reason });
    }

    fn join(&mut self, now: u64, client: ClientId, join: Join) {
        if join.protocol != PROTOCOL_VERSION {
            let msg = format!("client speaks protocol {}, this reflector speaks {PROTOCOL_VERSION}", join.protocol);
            return self.close(client, error_message(ErrorCode::ProtocolVersion, msg));
        }
        if join.held_time > MAX_SESSION_TIME {
            let msg = format!("a held model time of {} ms is out of range", join.held_time);
            return self.close(client, error_message(ErrorCode::Malformed, msg));
        }
        let (challenge, origin) = {
            let state = &self.clients[&client];
            (state.challenge, state.origin)
        };
        if !self.config.access.admits(&join.app_id, join.api_key_proof.as_ref(), &challenge) {
            tracing::debug!(client, app_id = %join.app_id, "join refused: missing or wrong API key");
            let msg = format!("app {} is not admitted by this reflector: missing or wrong API key", join.app_id);
            return self.close(client, error_message(ErrorCode::AccessDenied, msg));
        }
        if !membership::verify(&join.member_key, &membership::join_transcript(&challenge, &join), &join.signature) {
            tracing::debug!(client, "join refused: the membership proof does not verify");
            let msg = "the join's membership proof does not verify (forged, or replayed from another connection)";
            return self.close(client, error_message(ErrorCode::AccessDenied, msg));
        }
        match self.pinned_member_key(&join.persistent_id, join.member_key) {
            Ok(pinned) if pinned == join.member_key => {}
            Ok(_) => {
                tracing::debug!(client, persistent_id = %join.persistent_id, "join refused: wrong session password");
                let msg = "wrong session password (this session's name was first used with another password)";
                return self.close(client, error_message(ErrorCode::WrongPassword, msg));
            }
            Err(error) => {
                tracing::error!(persistent_id = %join.persistent_id, %error, "cannot read or pin the membership key");
                let msg = format!("the reflector cannot admit members right now: {}", error.public_reason());
                return self.close(client, error_message(ErrorCode::Unavailable, msg));
            }
        }
        let tick_ms = if join.tick_ms == 0 { self.config.default_tick_ms } else { join.tick_ms.clamp(10, 30_000) };
        if !self.sessions.contains_key(&join.session_id) {
            if let Err(msg) = self.room_for_session(origin) {
                tracing::debug!(client, session = %join.session_id, "join refused: {msg}");
                return self.close(client, error_message(ErrorCode::Full, msg));
            }
            match self.storage.as_mut().map_or(Ok(Claim::Owned), |storage| storage.claim(&join.session_id)) {
                Ok(Claim::Owned) => {}
                Ok(Claim::ServedBy(owner)) => {
                    tracing::debug!(client, session = %join.session_id, %owner, "join redirected to the session's reflector");
                    self.send(client, ServerMessage::Redirect(owner));
                    let msg = format!("the session is served by the reflector at {owner}");
                    return self.close(client, error_message(ErrorCode::Unavailable, msg));
                }
                Err(error) => {
                    tracing::error!(session = %join.session_id, %error, "cannot claim session");
                    let msg = format!("the reflector cannot claim this session: {}", error.public_reason());
                    return self.close(client, error_message(ErrorCode::Unavailable, msg));
                }
            }
            match self.open_session(now, &join, tick_ms, origin) {
                Ok(session) => {
                    self.sessions.insert(join.session_id, session);
                }
                Err(error) => {
                    tracing::error!(session = %join.session_id, %error, "cannot open session");
                    let msg = format!("the reflector cannot open this session: {}", error.public_reason());
                    return self.close(client, error_message(ErrorCode::Unavailable, msg));
                }
            }
        }
        let latest_persisted_vote = self.persisted_for(&join.persistent_id).ok().flatten().map(|p| p.vote);
        let session = self.sessions.get_mut(&join.session_id).expect("opened above");
        if session.persisted_vote.is_none() {
            session.persisted_vote = latest_persisted_vote;
        }
        if session.has_view(join.view_id) {
            let msg = format!("view {} is already connected to this session", join.view_id);
            return self.close(client, error_message(ErrorCode::DuplicateView, msg));
        }
        session.idle_since = None;
        if let Some(paused) = session.paused_at.take() {
            session.base_now = now;
            session.base_time = paused;
            session.last_broadcast = now;
        }
        if join.resume_after.is_some() && join.held_time > session.time(now) {
            // A member has seen a later time than this reflector recorded (its storage lost the
            // latest marks): never let session time go back behind what a client saw.
            tracing::warn!(session = %join.session_id, held = join.held_time, time = session.time(now), "session time raised to a client's");
            session.base_time = join.held_time;
            session.base_now = now;
        }
        let time = session.time(now);
        let resumable = join.resume_after.filter(|&after| {
            // The client has executed everything up to `after`; it can continue if we still hold
            // every event after it, and we are not behind it.
            let first_buffered = session.events.front().map(|e| e.seq);
            seq_le(after, session.seq)
                && match first_buffered {
                    Some(first) => seq_le(first.wrapping_sub(1), after),
                    None => after == session.seq,
                }
        });
        if session.reseeding && resumable.is_none() {
            // Only a snapshot can bring this client to the state the session continues from.
            let msg = "the session is being restored from its players' state; retry shortly";
            return self.close(client, error_message(ErrorCode::Unavailable, msg));
        }
        let (start, events) = match resumable {
            Some(after) => {
                let events = session.events.iter().filter(|e| !seq_le(e.seq, after)).cloned().collect();
                (SyncStart::Resume, events)
            }
            None => match &session.snapshot {
                Some(snapshot) => (SyncStart::Snapshot(snapshot.clone()), session.events.iter().cloned().collect()),
                None => {
                    // Every fresh start of a session — the first client's and a late joiner's
                    // replay from the beginning — gets the data the session started from.
                    let persisted = session.initial_persisted.clone();
                    let persisted_damaged = session.initial_persisted_damaged.clone();
                    (SyncStart::Fresh { persisted, persisted_damaged }, session.events.iter().cloned().collect())
                }
            },
        };
        let sync = Sync { time, seq: session.seq, tick_ms: session.tick_ms, start, events };
        let damage = session.damage.clone();
        session.clients.push((client, join.view_id));
        session.pending_leaves.retain(|(v, _)| *v != join.view_id);
        // Announce the view unless the model holds it and no leave of it is queued: a client back
        // within the leave delay never left, while one whose view the model dropped (or never
        // had, as after a restart, until the reset batch) joins again.
        let leave_queued = session.users.left.contains(&join.view_id);
        let announced = session.in_model.contains(&join.view_id) || session.users.joined.contains(&join.view_id);
        // After a restart or a takeover, the first notice resets the model's views to the clients
        // connected by then. It waits for the leave delay, so that every client back within it
        // stays in the model; a resuming client does not wait for it (its view is in its model).
        let batch_ms = match session.reset_pending {
            true => self.config.leave_delay_ms.max(self.config.users_batch_ms),
            false => self.config.users_batch_ms,
        };
        let announce = !announced || leave_queued;
        if announce {
            queue_user_change(session, now, batch_ms, join.view_id, true);
            join_due_early(session, now, batch_ms);
        }
        let state = self.clients.get_mut(&client).expect("joined client is connected");
        state.session = Some(join.session_id);
        state.view = join.view_id;
        state.member = Some(join.member_key);
        self.send(client, ServerMessage::Sync(sync));
        // A join after a quiet period is stamped now, after the joiner's `Sync` (it is the first
        // event the joiner gets): the joiner is synced as soon as it restored the model.
        if let Some(session) = self.sessions.get_mut(&join.session_id)
            && announce
            && session.users.deadline.is_some_and(|d| now >= d)
        {
            flush_users(session, now, &mut self.unappended, &mut self.outputs);
        }
        if let Some(damage) = damage {
            let msg = format!("the reflector's storage of this session was damaged: {damage}");
            self.send_error(client, ErrorCode::DataLost, msg);
        }
    }

    /// Resumes a session from storage, or creates it.
    fn open_session(
        &mut self,
        now: u64,
        join: &Join,
        tick_ms: u32,
        origin: Option<std::net::IpAddr>,
    ) -> Result<Session, StorageError> {
        let mut stored = match self.storage.as_mut() {
            Some(storage) => storage.load_session(&join.session_id)?,
            None => None,
        };
        // A returning replica that holds more of the session than storage does (the files were
        // rolled back, or lost records): the replicas have lost nothing, so the session continues
        // from the replica, as for a session this reflector never knew.
        let mut carried_persisted = None;
        if let (Some(held), Some(found)) = (join.resume_after, &stored) {
            let stored_seq = match (found.events.last(), &found.snapshot) {
                (Some(event), _) => event.seq,
                (None, Some(snapshot)) => snapshot.seq,
                (None, None) => INITIAL_SEQ,
            };
            if history_has_gap(found) || !seq_le(held, stored_seq) {
                tracing::warn!(
                    session = %join.session_id,
                    stored_seq,
                    held,
                    "a replica holds more of the session than storage: continuing from the replica"
                );
                carried_persisted = stored.take().map(|s| (s.meta.initial_persisted, s.meta.initial_persisted_damaged));
            }
        }
        let mut session = Session {
            id: join.session_id,
            persistent_id: join.persistent_id,
            base_now: now,
            base_time: 0,
            paused_at: None,
            seq: INITIAL_SEQ,
            tick_ms,
            last_broadcast: now,
            last_mark: 0,
            buffered_bytes: 0,
            reseeding: false,
            damage: None,
            opened_by: origin,
            idle_since: None,
            initial_persisted: None,
            initial_persisted_damaged: None,
            snapshot: None,
            events: VecDeque::new(),
            in_model: Default::default(),
            stamped: Default::default(),
            clients: Vec::new(),
            users: UsersBatch::default(),
            users_stamped_at: None,
            reset_pending: false,
            tallies: Default::default(),
            awaited_upload: None,
            told_divergence: BTreeSet::new(),
            awaited_persist: None,
            persisted_vote: None,
            pending_leaves: Vec::new(),
            requested_at: None,
        };
        match stored {
            Some(stored) => {
                if let Some(damage) = &stored.damage {
                    tracing::error!(session = %join.session_id, %damage, "the session's stored events are damaged");
                    if history_has_gap(&stored) {
                        // Events after a gap cannot be executed without the missing ones: serving
                        // them would hand clients a history nobody had. Refused until repaired.
                        return Err(StorageError::Corrupt {
                            path: std::path::PathBuf::from(join.session_id.to_string()),
                            what: "event log",
                            reason: damage.to_string(),
                        });
                    }
                    session.damage = Some(damage.to_string());
                }
                // Continue after the latest time any client can have seen.
                let time = stored.time + TIME_MARK_MS;
                session.base_time = time;
                session.last_mark = time;
                session.persistent_id = stored.meta.persistent_id;
                session.tick_ms = stored.meta.tick_ms;
                session.initial_persisted = stored.meta.initial_persisted;
                session.initial_persisted_damaged = stored.meta.initial_persisted_damaged;
                if let Some((seq, time)) = stored.meta.reseeded_from
                    && stored.snapshot.is_none()
                {
                    session.reseeding = true;
                    session.seq = seq;
                    session.base_time = session.base_time.max(time);
                    session.last_mark = session.base_time;
                }
                session.seq = match (stored.events.last(), &stored.snapshot) {
                    (Some(event), _) => event.seq,
                    (None, Some(snapshot)) => snapshot.seq,
                    (None, None) => session.seq,
                };
                session.snapshot = stored.snapshot;
                session.buffered_bytes = stored.events.iter().map(event_bytes).sum();
                stored.events.iter().for_each(|event| session.note_stamped(event));
                session.events = stored.events.into();
                // Whoever was connected before the restart is gone: the next join batch tells the
                // model who is really there.
                session.reset_pending = true;
                tracing::info!(session = %join.session_id, time, events = session.events.len(), "session resumed from storage");
            }
            None => {
                // A damaged document is never taken for "no data": the session starts without it,
                // every fresh start of it is told why, and the model disables persisting, so the
                // stored document stays for the operator to restore.
                match carried_persisted {
                    Some((persisted, damaged)) => {
                        session.initial_persisted = persisted;
                        session.initial_persisted_damaged = damaged;
                    }
                    None => match self.persisted_for(&join.persistent_id) {
                        Ok(persisted) => session.initial_persisted = persisted,
                        Err(error) => session.initial_persisted_damaged = Some(error.public_reason()),
                    },
                }
                // A client that holds a running model of a session this reflector does not know
                // (it lost its storage, or is another machine): the session continues from there.
                let reseeded_from = join.resume_after.map(|after| (after, join.held_time));
                if let Some((seq, time)) = reseeded_from {
                    session.seq = seq;
                    session.base_time = time;
                    session.last_mark = time;
                    session.reseeding = true;
                    session.reset_pending = true;
                }
                if let Some(storage) = self.storage.as_mut() {
                    let meta = SessionMeta {
                        persistent_id: join.persistent_id,
                        tick_ms,
                        initial_persisted: session.initial_persisted.clone(),
                        reseeded_from,
                        initial_persisted_damaged: session.initial_persisted_damaged.clone(),
                    };
                    storage.create_session(&join.session_id, &meta)?;
                }
                match reseeded_from {
                    Some((seq, time)) => tracing::warn!(
                        session = %join.session_id,
                        seq,
                        time,
                        "unknown session continued from a replica's state (this reflector lost it)"
                    ),
                    None => tracing::info!(session = %join.session_id, "session created"),
                }
            }
        }
        Ok(session)
    }

    /// The membership key pinned to `persistent_id`; when none is, pins `presented` (durably
    /// first: a key is never admitted before it is recorded).
    fn pinned_member_key(
        &mut self,
        persistent_id: &PersistentId,
        presented: MemberKey,
    ) -> Result<MemberKey, StorageError> {
        if let Some(key) = self.member_keys.get(persistent_id) {
            return Ok(*key);
        }
        let stored = match self.storage.as_mut() {
            Some(storage) => storage.load_member_key(persistent_id)?.map(MemberKey),
            None => None,
        };
        let key = match stored {
            Some(key) => key,
            None => {
                if let Some(storage) = self.storage.as_mut() {
                    storage.pin_member_key(persistent_id, &presented.0)?;
                }
                tracing::info!(%persistent_id, "membership key pinned (first use of this persistent id)");
                presented
            }
        };
        self.member_keys.insert(*persistent_id, key);
        Ok(key)
    }

    /// Whether one more session may be loaded for a client from `origin`: unloads idle sessions
    /// if that makes room, and says why not otherwise.
    fn room_for_session(&mut self, origin: Option<std::net::IpAddr>) -> Result<(), String> {
        if self.sessions.len() >= self.config.max_sessions || self.memory >= self.config.memory_budget_bytes {
            self.unload_idle_sessions(None);
        }
        if self.sessions.len() >= self.config.max_sessions {
            return Err(format!(
                "the reflector serves its maximum of {} sessions; retry later",
                self.config.max_sessions
            ));
        }
        if self.memory >= self.config.memory_budget_bytes {
            return Err("the reflector is at its memory budget; retry later".into());
        }
        if let Some(origin) = origin {
            let opened = self.sessions.values().filter(|s| s.opened_by == Some(origin)).count();
            if opened >= self.config.max_sessions_per_origin {
                let limit = self.config.max_sessions_per_origin;
                return Err(format!("too many sessions opened from this address (at most {limit} at once)"));
            }
        }
        Ok(())
    }

    /// Unloads the sessions that have had no client for the idle time (every idle one when `now`
    /// is `None`), if there is storage to load them from again.
    fn unload_idle_sessions(&mut self, now: Option<u64>) {
        if self.storage.is_none() {
            return;
        }
        // What an idle session stamped last (its leave notices) is recorded before it goes.
        self.append_unappended();
        let idle_ms = self.config.idle_unload_ms;
        let idle: Vec<SessionId> = self
            .sessions
            .values()
            .filter(|s| s.clients.is_empty() && s.pending_leaves.is_empty() && s.paused_at.is_some())
            .filter(|s| match (now, s.idle_since) {
                (None, _) => true,
                (Some(now), Some(since)) => now >= since + idle_ms,
                (Some(_), None) => false,
            })
            .map(|s| s.id)
            .collect();
        for id in idle {
            if let Some(session) = self.sessions.remove(&id) {
                self.memory = self.memory.saturating_sub(session.memory_bytes());
                if let Some(storage) = self.storage.as_mut() {
                    storage.unload_session(&id);
                }
                tracing::debug!(session = %id, "idle session unloaded from memory");
            }
        }
    }

    /// Stops serving the sessions whose claim storage reports lost (another reflector serves
    /// them now, or this one could not renew its claim in time): their clients are closed with
    /// [`ErrorCode::Unavailable`], reconnect, and are sent to the session's reflector.
    fn drop_lost_claims(&mut self) {
        let Some(storage) = self.storage.as_mut() else { return };
        for id in storage.renew_claims() {
            if self.sessions.contains_key(&id) {
                tracing::warn!(session = %id, "the claim on the session was lost: no longer serving it");
            }
            let msg = "this reflector no longer serves the session; reconnect to be sent to the one that does";
            self.fail_session(id, msg);
        }
    }

    /// Recounts the bytes held in memory (cheap enough to run every housekeeping interval).
    fn recount_memory(&mut self) {
        let sessions: usize = self.sessions.values().map(Session::memory_bytes).sum();
        let persisted: usize = self.persisted.values().map(|p| p.data.len()).sum();
        self.memory = sessions + persisted;
    }

    /// The persisted data of a persistent id, from memory or storage. A damaged document is an
    /// error, never "no data".
    fn persisted_for(&mut self, persistent_id: &PersistentId) -> Result<Option<PersistRecord>, StorageError> {
        if let Some(record) = self.persisted.get(persistent_id) {
            return Ok(Some(record.clone()));
        }
        let loaded = match self.storage.as_mut() {
            Some(storage) => storage.load_persisted(persistent_id),
            None => Ok(None),
        };
        match loaded {
            Ok(Some(record)) => {
                self.persisted.insert(*persistent_id, record.clone());
                Ok(Some(record))
            }
            Ok(None) => Ok(None),
            Err(error) => {
                tracing::error!(persistent_id = %persistent_id, %error, "cannot load persisted data");
                Err(error)
            }
        }
    }

    fn stamp(&mut self, now: u64, session_id: SessionId, client: ClientId, body: EventBody) {
        let Some(session) = self.sessions.get_mut(&session_id) else { return };
        let size = match &body {
            EventBody::View { payload, .. } => payload.len(),
            _ => 0,
        };
        let refusal = if session.events.len() >= self.config.max_buffered_events {
            Some(format!("{} events are buffered; no more until a snapshot arrives", session.events.len()))
        } else if session.buffered_bytes + size > self.config.max_buffered_bytes {
            Some(format!("{} bytes of events are buffered; no more until a snapshot arrives", session.buffered_bytes))
        } else if self.memory + size > self.config.memory_budget_bytes {
            Some("the reflector is at its memory budget; event dropped".to_string())
        } else {
            None
        };
        if let Some(msg) = refusal {
            self.outputs.push(Output::Send {
                client,
                message: Arc::new(ServerMessage::Error(error_message(ErrorCode::BufferFull, msg))),
            });
            return;
        }
        let before = session.buffered_bytes;
        broadcast_event(session, now, body, &mut self.unappended, &mut self.outputs);
        self.memory += session.buffered_bytes - before;
        let len = session.events.len();
        let half_full = session.buffered_bytes >= self.config.max_buffered_bytes / 2;
        if (len >= self.config.request_snapshot_at || half_full)
            && session.requested_at.is_none_or(|at| len >= at + 1000)
        {
            session.requested_at = Some(len);
            broadcast_event(session, now, EventBody::SnapshotRequest, &mut self.unappended, &mut self.outputs);
        }
    }

    fn vote(&mut self, now: u64, session_id: SessionId, client: ClientId, vote: HashVote) {
        let rate = self.config.max_votes_per_second;
        let Some(state) = self.clients.get_mut(&client) else { return };
        if !state.votes.take(rate, now) {
            tracing::debug!(client, "vote ignored: more than {rate} votes per second");
            return;
        }
        let view = state.view;
        let window = self.config.tally_window_ms;
        let Some(session) = self.sessions.get_mut(&session_id) else { return };
        if vote.purpose == VotePurpose::Snapshot && session.snapshot.as_ref().is_some_and(|s| s.time > vote.time) {
            return; // older than what we hold: nothing to decide
        }
        if vote.time > session.time(now) || vote.parts.len() > self.config.limits.max_vote_parts {
            return; // a point the session has not reached, or an oversized vote: not a replica's
        }
        let key = (vote.purpose, vote.time, vote.seq);
        if !session.tallies.contains_key(&key) && session.tallies.len() >= self.config.max_open_tallies {
            tracing::debug!(client, "vote ignored: {} tallies already open", session.tallies.len());
            return;
        }
        let tally =
            session.tallies.entry(key).or_insert_with(|| TallyState { votes: Vec::new(), deadline: now + window });
        if tally.votes.iter().any(|(v, _, _)| *v == view) {
            return;
        }
        tally.votes.push((view, vote.vote, vote.parts));
        if tally.votes.len() >= session.clients.len() {
            close_tally(session, key, &mut self.outputs);
        }
    }

    fn upload(&mut self, session_id: SessionId, client: ClientId, record: SnapshotRecord) {
        // The log the snapshot shortens holds every event stamped so far.
        self.append_unappended();
        if !self.sessions.contains_key(&session_id) {
            return;
        }
        let view = self.clients[&client].view;
        let signed = self.clients[&client].member.is_some_and(|member| {
            membership::verify(&member, &membership::snapshot_transcript(&session_id, &record), &record.signature)
        });
        if !signed {
            tracing::debug!(client, "snapshot upload ignored: its signature does not verify");
            return;
        }
        let limit = self.config.limits.max_snapshot_bytes;
        let Some(session) = self.sessions.get_mut(&session_id) else { return };
        if record.data.len() > limit {
            let msg = format!("snapshot of {} bytes exceeds {limit} bytes", record.data.len());
            self.outputs.push(Output::Send {
                client,
                message: Arc::new(ServerMessage::Error(error_message(ErrorCode::TooLarge, msg))),
            });
            return;
        }
        let expected = session.awaited_upload.as_ref().is_some_and(|a| {
            a.uploader == view && a.time == record.time && a.seq == record.seq && a.vote == record.vote
        });
        if !expected {
            return; // unsolicited, dissident or stale: ignored
        }
        let dissenters = session.awaited_upload.take().map(|a| a.dissenters).unwrap_or_default();
        send_consensus(session, &record, &dissenters, &mut self.outputs);
        while session.events.front().is_some_and(|e| seq_le(e.seq, record.seq)) {
            if let Some(event) = session.events.pop_front() {
                session.buffered_bytes = session.buffered_bytes.saturating_sub(event_bytes(&event));
            }
        }
        session.requested_at = None;
        let (time, seq) = (record.time, record.seq);
        if let Some(storage) = self.storage.as_mut() {
            let remaining: Vec<StampedEvent> = session.events.iter().cloned().collect();
            if let Err(error) = storage.store_snapshot(&session_id, &record, &remaining) {
                // Keep serving the snapshot from memory; the events stay in the log.
                tracing::error!(session = %session_id, %error, "cannot store the snapshot");
            }
        }
        session.snapshot = Some(record);
        session.reseeding = false;
        self.outputs.push(Output::Send { client, message: Arc::new(ServerMessage::SnapshotAccepted { time, seq }) });
    }

    fn persist(&mut self, session_id: SessionId, client: ClientId, record: PersistRecord) {
        let limit = self.config.limits.max_persist_bytes;
        let view = self.clients[&client].view;
        let member = self.clients[&client].member;
        if record.data.len() > limit {
            let msg = format!("persisted data of {} bytes exceeds {limit} bytes", record.data.len());
            self.send_error(client, ErrorCode::TooLarge, msg);
            return;
        }
        let Some(session) = self.sessions.get_mut(&session_id) else { return };
        let transcript = membership::persist_transcript(&session.persistent_id, &record);
        if !member.is_some_and(|member| membership::verify(&member, &transcript, &record.signature)) {
            tracing::debug!(client, "persisted-data upload ignored: its signature does not verify");
            return;
        }
        let expected = session
            .awaited_persist
            .as_ref()
            .is_some_and(|a| a.uploader == view && a.time == record.time && a.vote == record.vote);
        if !expected {
            return; // unsolicited or dissident: never overwrites the consensus data
        }
        session.awaited_persist = None;
        session.persisted_vote = Some(record.vote);
        let vote = record.vote;
        let persistent_id = session.persistent_id;
        if let Some(storage) = self.storage.as_mut()
            && let Err(error) = storage.store_persisted(&persistent_id, &record)
        {
            tracing::error!(%persistent_id, %error, "cannot store persisted data");
            let msg = format!("persisted data not stored: {}", error.public_reason());
            self.send_error(client, ErrorCode::Unavailable, msg);
            return;
        }
        self.persisted.insert(persistent_id, record);
        self.send(client, ServerMessage::PersistAccepted { vote });
    }
}

/// Whether a stored session's history misses events: storage names the gaps it can see; a session
/// without a snapshot must also begin right after where it started (its first sequence number,
/// or where it was reseeded from), which only the meta says.
fn history_has_gap(stored: &StoredSession) -> bool {
    if stored.damage.as_ref().is_some_and(|d| !d.missing_seqs.is_empty()) {
        return true;
    }
    let start = match (&stored.snapshot, stored.meta.reseeded_from) {
        (Some(snapshot), _) => snapshot.seq,
        (None, Some((seq, _))) => seq,
        (None, None) => INITIAL_SEQ,
    };
    stored.events.first().is_some_and(|first| first.seq != start.wrapping_add(1))
}

fn queue_user_change(session: &mut Session, now: u64, batch_ms: u64, view: ViewId, joined: bool) {
    let users = &mut session.users;
    let (add, cancel) =
        if joined { (&mut users.joined, &mut users.left) } else { (&mut users.left, &mut users.joined) };
    if let Some(at) = cancel.iter().position(|v| *v == view) {
        cancel.remove(at); // a join and a leave of one view within one batch cancel out
    } else {
        add.push(view);
    }
    if users.deadline.is_none() {
        users.deadline = Some(now + batch_ms);
    }
}

/// Brings a batch holding a join forward to one period after the previous notice (or to now, if
/// that was longer ago): at most one notice per `batch_ms` still, but a lone joiner waits for
/// nothing. A batch that resets the model's views (after a reflector restart or a takeover)
/// keeps its whole wait, so that it gathers every client back within the leave delay.
fn join_due_early(session: &mut Session, now: u64, batch_ms: u64) {
    if session.reset_pending {
        return;
    }
    let due = session.users_stamped_at.map_or(now, |at| at.saturating_add(batch_ms).max(now));
    session.users.deadline = Some(session.users.deadline.map_or(due, |d| d.min(due)));
}

fn flush_users(
    session: &mut Session,
    now: u64,
    unappended: &mut Vec<(SessionId, StampedEvent)>,
    outputs: &mut Vec<Output>,
) {
    let users = std::mem::take(&mut session.users);
    if users.joined.is_empty() && users.left.is_empty() {
        return;
    }
    let reset = session.reset_pending;
    let body = EventBody::Users { joined: users.joined.clone(), left: users.left.clone(), reset };
    broadcast_event(session, now, body, unappended, outputs);
    session.users_stamped_at = Some(now);
    session.reset_pending = false;
    if reset {
        session.in_model.clear();
    }
    for view in &users.left {
        session.in_model.remove(view);
    }
    session.in_model.extend(users.joined.iter().copied());
    if session.reseeding {
        // The replicas now agree on who is there: ask them for the snapshot that lets everyone
        // else join again.
        broadcast_event(session, now, EventBody::SnapshotRequest, unappended, outputs);
    }
}

/// Stamps an event and queues it for its session's clients and for storage: the reflector
/// appends it to storage before any output leaves ([`Reflector::drain_outputs`]), so an event is
/// recorded before anyone sees it.
fn broadcast_event(
    session: &mut Session,
    now: u64,
    body: EventBody,
    unappended: &mut Vec<(SessionId, StampedEvent)>,
    outputs: &mut Vec<Output>,
) {
    let event = StampedEvent { time: session.time(now), seq: session.seq.wrapping_add(1), body };
    session.seq = event.seq;
    session.buffered_bytes += event_bytes(&event);
    session.note_stamped(&event);
    session.events.push_back(event.clone());
    session.last_broadcast = now;
    unappended.push((session.id, event.clone()));
    let message = Arc::new(ServerMessage::Event(event));
    for (client, _) in &session.clients {
        outputs.push(Output::Send { client: *client, message: message.clone() });
    }
}

fn close_tally(session: &mut Session, key: (VotePurpose, SessionTime, u32), outputs: &mut Vec<Output>) {
    let Some(tally) = session.tallies.remove(&key) else { return };
    let (purpose, time, seq) = key;
    let mut groups: Vec<VoteGroup> = Vec::new();
    for (view, vote, parts) in &tally.votes {
        match groups.iter_mut().find(|g| g.vote == *vote) {
            Some(group) => group.views.push(*view),
            None => groups.push(VoteGroup { vote: *vote, parts: parts.clone(), views: vec![*view] }),
        }
    }
    for group in &mut groups {
        group.views.sort();
    }
    groups.sort_by(|a, b| b.views.len().cmp(&a.views.len()).then(a.vote.cmp(&b.vote)));
    if groups.len() == 1 {
        // The part hashes only serve to name what differs between groups: with one group there is
        // nothing to name, and echoing them would amplify every vote to every client.
        groups[0].parts.clear();
    }
    // The views outside the consensus of a snapshot vote get the consensus snapshot when it is
    // uploaded, once per divergence: a view that votes with the consensus again may be told
    // again later. (When no upload is wanted, the reflector holding a snapshot of this point or a
    // later one already, they are not sent one.)
    let mut dissenters: Vec<ViewId> = Vec::new();
    if purpose == VotePurpose::Snapshot
        && let Some((consensus, others)) = groups.split_first()
    {
        let clients = &session.clients;
        session.told_divergence.retain(|v| !consensus.views.contains(v) && clients.iter().any(|(_, c)| c == v));
        dissenters =
            others.iter().flat_map(|g| &g.views).filter(|v| !session.told_divergence.contains(v)).copied().collect();
    }
    let wanted = match (purpose, groups.first()) {
        (_, None) => false,
        (VotePurpose::Snapshot, Some(_)) => {
            session.snapshot.as_ref().is_none_or(|s| s.time < time || (s.time == time && s.seq != seq))
        }
        (VotePurpose::Persist, Some(consensus)) => session.persisted_vote != Some(consensus.vote),
    };
    // The first voter of the consensus group uploads: it answered fastest.
    let uploader = match groups.first() {
        Some(consensus) if wanted => tally.votes.iter().map(|(v, _, _)| *v).find(|v| consensus.views.contains(v)),
        _ => None,
    };
    if let (Some(uploader), Some(consensus)) = (uploader, groups.first()) {
        let awaited = Some(AwaitedUpload { time, seq, uploader, vote: consensus.vote, dissenters });
        match purpose {
            VotePurpose::Snapshot => session.awaited_upload = awaited,
            VotePurpose::Persist => session.awaited_persist = awaited,
        }
    }
    let message = Arc::new(ServerMessage::Tally(Tally { purpose, time, seq, groups, uploader }));
    for (client, _) in &session.clients {
        outputs.push(Output::Send { client: *client, message: message.clone() });
    }
}

/// Sends the consensus snapshot `record` to the clients of the `dissenters` views, and remembers
/// that they were told.
fn send_consensus(session: &mut Session, record: &SnapshotRecord, dissenters: &[ViewId], outputs: &mut Vec<Output>) {
    if dissenters.is_empty() {
        return;
    }
    let message = Arc::new(ServerMessage::Consensus(record.clone()));
    for (client, view) in &session.clients {
        if dissenters.contains(view) {
            outputs.push(Output::Send { client: *client, message: message.clone() });
        }
    }
    session.told_divergence.extend(dissenters.iter().copied());
}

#[cfg(test)]
mod tests;
