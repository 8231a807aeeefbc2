//! The sans-IO reflector: all session logic, no sockets, no clocks.
//!
//! Drivers call [`Reflector::connect`], [`Reflector::handle`], [`Reflector::disconnect`] and
//! [`Reflector::poll`] with the current time of a monotonic clock in milliseconds, then move the
//! [`Output`]s from [`Reflector::drain_outputs`] to the clients.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use synq_protocol::ids::{PersistentId, SessionId, ViewId};
use synq_protocol::wire::{
    ClientMessage, ErrorCode, ErrorMessage, EventBody, HashVote, Join, PersistRecord, ServerMessage, SessionTime,
    SnapshotRecord, StampedEvent, Sync, SyncStart, Tally, VoteGroup,
};
use synq_protocol::{INITIAL_SEQ, Limits, PROTOCOL_VERSION, seq_le};

use crate::session::{AwaitedUpload, Session, TallyState, UsersBatch};

/// A connection, as numbered by the driver.
pub type ClientId = u64;

/// How the reflector behaves. The defaults follow Croquet's where it has one.
#[derive(Clone, Debug)]
pub struct ReflectorConfig {
    /// Tick period used when a client asks for none (ms).
    pub default_tick_ms: u32,
    /// Join/leave notices are batched for this long (ms).
    pub users_batch_ms: u64,
    /// A vote tally closes when every client voted or after this long (ms).
    pub tally_window_ms: u64,
    /// At this many buffered events the reflector asks for a snapshot.
    pub request_snapshot_at: usize,
    /// At this many buffered events new events are refused until a snapshot arrives.
    pub max_buffered_events: usize,
    /// Size limits.
    pub limits: Limits,
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
}

/// The reflector's state machine. See the crate documentation.
pub struct Reflector {
    config: ReflectorConfig,
    sessions: HashMap<SessionId, Session>,
    clients: HashMap<ClientId, ClientState>,
    persisted: HashMap<PersistentId, PersistRecord>,
    outputs: Vec<Output>,
}

fn error(code: ErrorCode, message: impl Into<String>) -> ErrorMessage {
    ErrorMessage { code, message: message.into() }
}

impl Reflector {
    /// A reflector with no sessions.
    pub fn new(config: ReflectorConfig) -> Self {
        Self {
            config,
            sessions: HashMap::new(),
            clients: HashMap::new(),
            persisted: HashMap::new(),
            outputs: Vec::new(),
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
        self.outputs.drain(..)
    }

    /// A new connection. It must send `Join` first.
    pub fn connect(&mut self, _now: u64, client: ClientId) {
        self.clients.insert(client, ClientState { session: None, view: ViewId(0) });
    }

    /// A connection closed (or timed out). Its view leaves its session.
    pub fn disconnect(&mut self, now: u64, client: ClientId) {
        let Some(state) = self.clients.remove(&client) else { return };
        let Some(session_id) = state.session else { return };
        let batch_ms = self.config.users_batch_ms;
        if let Some(session) = self.sessions.get_mut(&session_id) {
            session.clients.retain(|(c, _)| *c != client);
            queue_user_change(session, now, batch_ms, state.view, false);
            if session.clients.is_empty() {
                // Nobody will hear the leave batch live; stamp it now so that it is buffered and
                // replayed by the next joiner, then pause session time.
                flush_users(session, now, &mut self.outputs);
                session.paused_at = Some(session.time(now));
                session.tallies.clear();
                session.awaited_upload = None;
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
                self.close(client, error(ErrorCode::NotJoined, "second Join on one connection"))
            }
            (ClientMessage::Ping(nonce), _) => self.send(client, ServerMessage::Pong(nonce)),
            (_, None) => self.close(client, error(ErrorCode::NotJoined, "the first message must be Join")),
            (ClientMessage::Event(payload), Some(session)) => {
                if payload.len() > self.config.limits.max_event_bytes {
                    let limit = self.config.limits.max_event_bytes;
                    self.send_error(
                        client,
                        ErrorCode::TooLarge,
                        format!("event of {} bytes exceeds {limit} bytes", payload.len()),
                    );
                    return;
                }
                let view = self.clients[&client].view;
                self.stamp(now, session, client, EventBody::View { sender: view, payload });
            }
            (ClientMessage::HashVote(vote), Some(session)) => self.vote(now, session, client, vote),
            (ClientMessage::SnapshotUpload(record), Some(session)) => self.upload(session, client, record),
            (ClientMessage::PersistUpload(record), Some(session)) => self.persist(session, client, record),
            (ClientMessage::Leave, Some(_)) => self.disconnect(now, client),
        }
    }

    /// Fires what is due: heartbeat ticks, join/leave batches and vote tallies.
    pub fn poll(&mut self, now: u64) {
        for session in self.sessions.values_mut() {
            if session.clients.is_empty() {
                continue;
            }
            if session.users.deadline.is_some_and(|d| now >= d) {
                flush_users(session, now, &mut self.outputs);
            }
            let due: Vec<_> = session.tallies.iter().filter(|(_, t)| now >= t.deadline).map(|(k, _)| *k).collect();
            for key in due {
                close_tally(session, key, &mut self.outputs);
            }
            if now >= session.last_broadcast + u64::from(session.tick_ms) {
                let tick = Arc::new(ServerMessage::Tick(session.time(now)));
                session.last_broadcast = now;
                for (client, _) in &session.clients {
                    self.outputs.push(Output::Send { client: *client, message: tick.clone() });
                }
            }
        }
    }

    /// The earliest time at which [`Reflector::poll`] has something to do.
    pub fn next_deadline(&self) -> Option<u64> {
        self.sessions
            .values()
            .filter(|s| !s.clients.is_empty())
            .flat_map(|s| {
                let tick = s.last_broadcast + u64::from(s.tick_ms);
                let tallies = s.tallies.values().map(|t| t.deadline);
                std::iter::once(tick).chain(s.users.deadline).chain(tallies)
            })
            .min()
    }

    fn send(&mut self, client: ClientId, message: ServerMessage) {
        self.outputs.push(Output::Send { client, message: Arc::new(message) });
    }

    fn send_error(&mut self, client: ClientId, code: ErrorCode, message: String) {
        self.send(client, ServerMessage::Error(error(code, message)));
    }

    fn close(&mut self, client: ClientId, reason: ErrorMessage) {
        self.outputs.push(Output::Close { client, reason });
    }

    fn join(&mut self, now: u64, client: ClientId, join: Join) {
        if join.protocol != PROTOCOL_VERSION {
            let msg = format!("client speaks protocol {}, this reflector speaks {PROTOCOL_VERSION}", join.protocol);
            return self.close(client, error(ErrorCode::ProtocolVersion, msg));
        }
        let tick_ms = if join.tick_ms == 0 { self.config.default_tick_ms } else { join.tick_ms.clamp(10, 30_000) };
        let session = self.sessions.entry(join.session_id).or_insert_with(|| {
            tracing::info!(session = %join.session_id, "session created");
            Session {
                id: join.session_id,
                persistent_id: join.persistent_id,
                start: now,
                paused_at: None,
                seq: INITIAL_SEQ,
                tick_ms,
                last_broadcast: now,
                password_check: join.password_check.clone(),
                snapshot: None,
                events: VecDeque::new(),
                clients: Vec::new(),
                users: UsersBatch::default(),
                reset_pending: false,
                tallies: Default::default(),
                awaited_upload: None,
                requested_at: None,
            }
        });
        if session.has_view(join.view_id) {
            let msg = format!("view {} is already connected to this session", join.view_id);
            return self.close(client, error(ErrorCode::DuplicateView, msg));
        }
        if let Some(paused) = session.paused_at.take() {
            session.start = now.saturating_sub(paused);
            session.last_broadcast = now;
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
        let (start, events) = match resumable {
            Some(after) => {
                let events = session.events.iter().filter(|e| !seq_le(e.seq, after)).cloned().collect();
                (SyncStart::Resume, events)
            }
            None => match &session.snapshot {
                Some(snapshot) => (SyncStart::Snapshot(snapshot.clone()), session.events.iter().cloned().collect()),
                None => {
                    let persisted = self.persisted.get(&session.persistent_id).cloned();
                    (SyncStart::Fresh { persisted }, session.events.iter().cloned().collect())
                }
            },
        };
        let sync = Sync {
            time,
            seq: session.seq,
            tick_ms: session.tick_ms,
            password_check: session.password_check.clone(),
            start,
            events,
        };
        session.clients.push((client, join.view_id));
        if resumable.is_none() {
            queue_user_change(session, now, self.config.users_batch_ms, join.view_id, true);
        } else {
            // A seamless rejoin cancels a leave that has not been stamped yet.
            session.users.left.retain(|v| *v != join.view_id);
        }
        let state = self.clients.get_mut(&client).expect("joined client is connected");
        state.session = Some(join.session_id);
        state.view = join.view_id;
        self.send(client, ServerMessage::Sync(sync));
    }

    fn stamp(&mut self, now: u64, session_id: SessionId, client: ClientId, body: EventBody) {
        let Some(session) = self.sessions.get_mut(&session_id) else { return };
        if session.events.len() >= self.config.max_buffered_events {
            let msg = format!("{} events are buffered; no more until a snapshot arrives", session.events.len());
            self.outputs.push(Output::Send {
                client,
                message: Arc::new(ServerMessage::Error(error(ErrorCode::BufferFull, msg))),
            });
            return;
        }
        broadcast_event(session, now, body, &mut self.outputs);
        let len = session.events.len();
        if len >= self.config.request_snapshot_at && session.requested_at.is_none_or(|at| len >= at + 1000) {
            session.requested_at = Some(len);
            broadcast_event(session, now, EventBody::SnapshotRequest, &mut self.outputs);
        }
    }

    fn vote(&mut self, now: u64, session_id: SessionId, client: ClientId, vote: HashVote) {
        let view = self.clients[&client].view;
        let window = self.config.tally_window_ms;
        let Some(session) = self.sessions.get_mut(&session_id) else { return };
        if session.snapshot.as_ref().is_some_and(|s| s.time > vote.time) {
            return; // older than what we hold: nothing to decide
        }
        let key = (vote.time, vote.seq);
        let tally =
            session.tallies.entry(key).or_insert_with(|| TallyState { votes: Vec::new(), deadline: now + window });
        if tally.votes.iter().any(|(v, _)| *v == view) {
            return;
        }
        tally.votes.push((view, vote.vote));
        if tally.votes.len() >= session.clients.len() {
            close_tally(session, key, &mut self.outputs);
        }
    }

    fn upload(&mut self, session_id: SessionId, client: ClientId, record: SnapshotRecord) {
        let view = self.clients[&client].view;
        let limit = self.config.limits.max_snapshot_bytes;
        let Some(session) = self.sessions.get_mut(&session_id) else { return };
        if record.data.len() > limit {
            let msg = format!("snapshot of {} bytes exceeds {limit} bytes", record.data.len());
            self.outputs.push(Output::Send {
                client,
                message: Arc::new(ServerMessage::Error(error(ErrorCode::TooLarge, msg))),
            });
            return;
        }
        let expected = session.awaited_upload.as_ref().is_some_and(|a| {
            a.uploader == view && a.time == record.time && a.seq == record.seq && a.vote == record.vote
        });
        if !expected {
            return; // unsolicited, dissident or stale: ignored
        }
        session.awaited_upload = None;
        while session.events.front().is_some_and(|e| seq_le(e.seq, record.seq)) {
            session.events.pop_front();
        }
        session.requested_at = None;
        let (time, seq) = (record.time, record.seq);
        session.snapshot = Some(record);
        self.outputs.push(Output::Send { client, message: Arc::new(ServerMessage::SnapshotAccepted { time, seq }) });
    }

    fn persist(&mut self, session_id: SessionId, client: ClientId, record: PersistRecord) {
        let limit = self.config.limits.max_persist_bytes;
        let Some(session) = self.sessions.get(&session_id) else { return };
        if record.data.len() > limit {
            let msg = format!("persisted data of {} bytes exceeds {limit} bytes", record.data.len());
            self.send_error(client, ErrorCode::TooLarge, msg);
            return;
        }
        let vote = record.vote;
        self.persisted.insert(session.persistent_id, record);
        self.send(client, ServerMessage::PersistAccepted { vote });
    }
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

fn flush_users(session: &mut Session, now: u64, outputs: &mut Vec<Output>) {
    let users = std::mem::take(&mut session.users);
    if users.joined.is_empty() && users.left.is_empty() {
        return;
    }
    let reset = std::mem::take(&mut session.reset_pending);
    broadcast_event(session, now, EventBody::Users { joined: users.joined, left: users.left, reset }, outputs);
}

fn broadcast_event(session: &mut Session, now: u64, body: EventBody, outputs: &mut Vec<Output>) {
    session.seq = session.seq.wrapping_add(1);
    let event = StampedEvent { time: session.time(now), seq: session.seq, body };
    session.events.push_back(event.clone());
    session.last_broadcast = now;
    let message = Arc::new(ServerMessage::Event(event));
    for (client, _) in &session.clients {
        outputs.push(Output::Send { client: *client, message: message.clone() });
    }
}

fn close_tally(session: &mut Session, key: (SessionTime, u32), outputs: &mut Vec<Output>) {
    let Some(tally) = session.tallies.remove(&key) else { return };
    let mut groups: Vec<VoteGroup> = Vec::new();
    for (view, vote) in &tally.votes {
        match groups.iter_mut().find(|g| g.vote == *vote) {
            Some(group) => group.views.push(*view),
            None => groups.push(VoteGroup { vote: *vote, views: vec![*view] }),
        }
    }
    for group in &mut groups {
        group.views.sort();
    }
    groups.sort_by(|a, b| b.views.len().cmp(&a.views.len()).then(a.vote.cmp(&b.vote)));
    let wants_snapshot =
        session.snapshot.as_ref().is_none_or(|s| s.time < key.0 || (s.time == key.0 && s.seq != key.1));
    // The first voter of the consensus group uploads: it answered fastest.
    let uploader = match groups.first() {
        Some(consensus) if wants_snapshot => tally.votes.iter().map(|(v, _)| *v).find(|v| consensus.views.contains(v)),
        _ => None,
    };
    if let (Some(uploader), Some(consensus)) = (uploader, groups.first()) {
        session.awaited_upload = Some(AwaitedUpload { time: key.0, seq: key.1, uploader, vote: consensus.vote });
    }
    let message = Arc::new(ServerMessage::Tally(Tally { time: key.0, seq: key.1, groups, uploader }));
    for (client, _) in &session.clients {
        outputs.push(Output::Send { client: *client, message: message.clone() });
    }
}
