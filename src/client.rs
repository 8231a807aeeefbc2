//! One client's part in a session: joining, catching up, running the model, voting and uploading.
//!
//! The [`SynqClient`] resource holds the connection and the session state; [`ModelWorld`] holds
//! the model runtime that view systems read. The plugin's systems drive both once per frame.

use bevy::prelude::*;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;
use tracing::{debug, error, info, warn};

use synq_protocol::crypto::{Binding, SealKind, SessionKey};
use synq_protocol::ids::{PersistentId, SessionId, ViewId};
use synq_protocol::membership::{self, Challenge, MemberSignature};
use synq_protocol::wire::{
    ClientMessage, ErrorCode, EventBody, HashVote, Join, ServerMessage, SnapshotRecord, StampedEvent, SyncStart,
    VotePurpose,
};
use synq_protocol::{Hash32, PROTOCOL_VERSION, seq_le};

use crate::config::{SessionConfig, ShadowCheck};
use crate::debug::synq_debug;
use crate::model::ModelProblem;
use crate::model::app::{ModelPlugin, WorldSettings};
use crate::model::runtime::{External, ExternalBody, ModelRuntime, RuntimeError};
use crate::status::{DivergenceDetected, SynqProblem, SynqStatus};
use crate::transport::{Connection, Connector};

mod outbox;
mod shadow;
mod votes;

pub use outbox::Outbox;
use outbox::SentEvents;

/// This replica's model, for view systems (through [`Model`](crate::view::Model) and
/// [`ModelQuery`](crate::view::ModelQuery)).
///
/// It hands out the runtime read-only: views cannot step or change the model through it. Tests
/// and tools hash and capture the state with [`ModelWorld::state_hash`] and
/// [`ModelWorld::capture`].
///
/// ```compile_fail
/// # use bevy::prelude::*;
/// fn view(mut model: ResMut<bevy_synq::ModelWorld>) {
///     model.runtime_mut().unwrap().advance(1_000); // no mutable access to the model
/// }
/// ```
#[derive(Resource, Default)]
pub struct ModelWorld {
    pub(crate) runtime: Option<ModelRuntime>,
}

impl ModelWorld {
    /// The runtime, once the session started.
    pub fn runtime(&self) -> Option<&ModelRuntime> {
        self.runtime.as_ref()
    }

    /// The hash of the model's current state (the canonical snapshot's SHA-256), once the
    /// session started. It only encodes the state; it changes nothing in the model (`&mut` is for
    /// the query over the model world that the encoding runs).
    pub fn state_hash(&mut self) -> Option<Result<Hash32, crate::snapshot::SnapshotError>> {
        self.runtime.as_mut().map(ModelRuntime::state_hash)
    }

    /// The model's current state, encoded canonically (the plaintext of a snapshot), once the
    /// session started. Like [`ModelWorld::state_hash`], it changes nothing in the model.
    pub fn capture(&mut self) -> Option<Result<Vec<u8>, crate::snapshot::SnapshotError>> {
        self.runtime.as_mut().map(ModelRuntime::capture)
    }
}

/// A state hash this replica computed at a snapshot point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HashRecord {
    /// Model time of the snapshot point.
    pub time: u64,
    /// The last external sequence number before it.
    pub seq: u32,
    /// SHA-256 of the canonical snapshot.
    pub hash: Hash32,
}

/// The identities of the session this client is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionIds {
    /// The session id.
    pub session: SessionId,
    /// The persistent id.
    pub persistent: PersistentId,
    /// This client's view id.
    pub view: ViewId,
}

/// How this replica's model started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartKind {
    /// A fresh session: the model's init ran.
    Fresh,
    /// From the reflector's latest snapshot.
    Snapshot {
        /// Model time of the snapshot.
        time: u64,
    },
    /// A seamless rejoin: the running model continued.
    Resume,
}

/// The session key, once derived (Argon2id takes tens of milliseconds: it runs on a task pool).
pub(crate) type KeyTask = bevy::tasks::Task<Result<SessionKey, String>>;

enum Phase {
    /// The session key is being derived off the main thread; nothing is sent before it is ready.
    DerivingKey(KeyTask),
    Connecting,
    /// The connection was lost; the next attempt is due at `next_at`.
    Reconnecting {
        next_at: Instant,
    },
    /// Connected; waiting for the reflector's challenge (then `joined`), then for its `Sync`.
    AwaitingSync {
        since: Instant,
        /// The last sequence number and the model time this client holds, to resume from.
        resume_after: Option<(u32, u64)>,
        joined: bool,
    },
    Running,
    Failed,
}

struct PastPersist {
    time: u64,
    seq: u32,
    vote: Hash32,
    json: String,
}

struct PastPoint {
    time: u64,
    seq: u32,
    vote: Hash32,
    bytes: Arc<Vec<u8>>,
    /// The names of the state's parts, in the order of the votes' part hashes.
    part_names: Vec<String>,
}

/// The client side of a session. See the module documentation.
#[derive(Resource)]
pub struct SynqClient {
    pub(crate) config: SessionConfig,
    pub(crate) ids: SessionIds,
    /// The session key; `None` only while it is being derived (before any connection).
    key: Option<SessionKey>,
    plugin: Arc<dyn ModelPlugin>,
    settings: WorldSettings,
    connector: Box<dyn Connector>,
    /// Where the connector connects, described at every connection (for logs and
    /// [`SynqClient::reflector`]).
    reflector: String,
    /// Whether the reflector of this connection sent the client to another one.
    redirected: bool,
    connection: Option<Box<dyn Connection>>,
    phase: Phase,
    synced: bool,
    pending: VecDeque<StampedEvent>,
    target_time: u64,
    catch_up_from: u64,
    recent_points: VecDeque<PastPoint>,
    recent_persists: VecDeque<PastPersist>,
    persist_uploads: u32,
    history: Vec<HashRecord>,
    pub(crate) status: SynqStatus,
    started_from: Option<StartKind>,
    pub(crate) problems: Vec<SynqProblem>,
    pub(crate) divergences: Vec<DivergenceDetected>,
    /// When the connection was lost, while it is being restored.
    lost_at: Option<Instant>,
    /// The current reconnect delay: grows with every failed attempt, reset by a `Sync`.
    retry_delay_ms: u64,
    /// The next join must not ask to resume: the running model is behind or ahead of the session.
    resync: bool,
    reconnects: u32,
    /// When the reflector was last heard from (it ticks every `tick_ms` when nothing else flows).
    last_heard: Instant,
    /// When the last event (or bundle) was sent, for the event rate limit.
    last_send: Option<Instant>,
    /// The events sent and not yet seen stamped, sent again after a reconnect.
    sent: SentEvents,
    /// The shadow replica, when [`SessionConfig::shadow`] asks for one.
    shadow: shadow::Shadow,
    /// How many times the app asked to reload the session's state.
    resyncs: u32,
    /// The last snapshot point this replica voted on before it last reloaded the session's
    /// state: tallies of points up to it are about the state it dropped.
    reloaded_after: Option<u64>,
}

/// How long a `Sync` may take to arrive before the client tries again.
const SYNC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

const KEPT_POINTS: usize = 4;
const KEPT_HISTORY: usize = 4096;

impl SynqClient {
    pub(crate) fn new(
        config: SessionConfig,
        ids: SessionIds,
        key: KeyTask,
        plugin: Arc<dyn ModelPlugin>,
        seed: [u8; 32],
        connector: Box<dyn Connector>,
    ) -> Self {
        let settings = WorldSettings { step_ms: config.step_ms, seed };
        Self {
            config,
            ids,
            key: None,
            plugin,
            settings,
            reflector: connector.describe(),
            redirected: false,
            connector,
            connection: None,
            phase: Phase::DerivingKey(key),
            synced: false,
            pending: VecDeque::new(),
            target_time: 0,
            catch_up_from: 0,
            recent_points: VecDeque::new(),
            recent_persists: VecDeque::new(),
            persist_uploads: 0,
            history: Vec::new(),
            status: SynqStatus::Connecting,
            started_from: None,
            problems: Vec::new(),
            divergences: Vec::new(),
            lost_at: None,
            retry_delay_ms: 0,
            resync: false,
            reconnects: 0,
            last_heard: Instant::now(),
            last_send: None,
            sent: SentEvents::new(),
            shadow: shadow::Shadow::default(),
            resyncs: 0,
            reloaded_after: None,
        }
    }

    /// The session key. Only the phases after `DerivingKey` use it, and that phase ends by setting it.
    fn key(&self) -> &SessionKey {
        self.key.as_ref().expect("bevy_synq: the session key is derived before the client connects")
    }

    /// The session's ids and this client's view id.
    pub fn ids(&self) -> SessionIds {
        self.ids
    }

    /// The connection state.
    pub fn status(&self) -> &SynqStatus {
        &self.status
    }

    /// Whether this replica has caught up with the session.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// The state hashes of the snapshot points this replica passed, oldest first (at least the
    /// last 4096).
    pub fn hash_history(&self) -> &[HashRecord] {
        &self.history
    }

    /// How this replica's model started (`None` before the first sync).
    pub fn started_from(&self) -> Option<StartKind> {
        self.started_from
    }

    /// How many persisted documents this client uploaded (it does so when the reflector elects
    /// it among the replicas that agree on the document).
    pub fn persist_uploads(&self) -> u32 {
        self.persist_uploads
    }

    /// How many of the messages this client sent the session has not been seen to stamp yet; they
    /// are sent again after a reconnect, and stamped once.
    pub fn unacknowledged_events(&self) -> usize {
        self.sent.unacknowledged()
    }

    /// The latest session time this client heard of from the reflector.
    pub fn reflector_time(&self) -> u64 {
        self.target_time
    }

    fn fail(&mut self, reason: String) {
        error!("bevy_synq: session {}: {reason}", self.ids.session);
        self.phase = Phase::Failed;
        self.synced = false;
        self.connection = None;
        self.status = SynqStatus::Disconnected { reason };
    }

    /// Drops the connection and reconnects at once (e.g. after the device changed networks).
    /// Back within the rejoin limit, the session continues seamlessly.
    pub fn reconnect(&mut self) {
        if matches!(self.phase, Phase::Running | Phase::AwaitingSync { .. }) {
            self.lost("reconnect requested".into());
        }
    }

    /// Reloads the session's consensus state: drops the connection and rejoins *without*
    /// resuming, so that the reflector sends its latest snapshot — the state the largest group
    /// of replicas voted for — and the events since; the model is replaced by the restored one.
    ///
    /// Use it when this replica diverged ([`DivergenceDetected::in_consensus`] is `false`):
    /// [`SynqClient::reconnect`] would resume the diverged model. The diverged model stays in
    /// place (views keep reading it) until the snapshot arrives; meanwhile the client is
    /// `Connecting`, then `Syncing` until it has caught up. If this replica passed the
    /// snapshot's point itself with another state, [`SynqProblem::ReloadedConsensus`] names the
    /// entities and parts that differed. [`SessionConfig::resync_on_divergence`] does this
    /// automatically.
    pub fn resync(&mut self) {
        if let Some(last) = self.history.last() {
            self.reloaded_after = Some(last.time);
        }
        match self.phase {
            Phase::Running | Phase::AwaitingSync { .. } => {
                self.resync = true;
                self.resyncs += 1;
                self.lost("resync requested: reloading the session's state".into());
                // Not seamless: the model is replaced, so the view goes through the states again.
                self.synced = false;
                self.status = SynqStatus::Connecting;
            }
            Phase::Reconnecting { .. } => {
                self.resync = true;
                self.resyncs += 1;
            }
            // No model yet (its first state comes from the reflector anyway), or no session.
            Phase::DerivingKey(_) | Phase::Connecting | Phase::Failed => {}
        }
    }

    /// Whether the session key is derived (the client connects once it is).
    #[cfg(feature = "testing")]
    pub(crate) fn key_ready(&self) -> bool {
        self.key.is_some()
    }

    /// How many times this client reloaded the session's state ([`SynqClient::resync`]).
    pub fn resyncs(&self) -> u32 {
        self.resyncs
    }

    /// Where this client's reflector is, e.g. `the reflector at udp://127.0.0.1:5800`.
    pub fn reflector(&self) -> &str {
        &self.reflector
    }

    /// How many times the connection was restored after a loss.
    pub fn reconnects(&self) -> u32 {
        self.reconnects
    }

    /// The round-trip time to the reflector, when connected over a transport that measures it.
    pub fn rtt(&self) -> Option<std::time::Duration> {
        self.connection.as_ref().and_then(|connection| connection.rtt())
    }

    /// How many messages from the reflector wait to be executed (the catch-up backlog).
    pub fn backlog(&self) -> usize {
        self.pending.len()
    }

    /// Tells the reflector this view leaves (its exit reaches the other replicas at once) and
    /// closes the connection. The client is done afterwards: the session API drops it.
    pub(crate) fn leave(&mut self) {
        if let Some(mut connection) = self.connection.take()
            && matches!(self.phase, Phase::Running | Phase::AwaitingSync { joined: true, .. })
        {
            connection.send(ClientMessage::Leave);
        }
        info!("bevy_synq: view {} left session {}", self.ids.view, self.ids.session);
        self.phase = Phase::Failed;
        self.synced = false;
    }

    /// The connection is gone (or the reflector asked us to come back later): reconnect with
    /// jittered exponential backoff, keeping the model.
    fn lost(&mut self, reason: String) {
        warn!("bevy_synq: view {}: {reason}; reconnecting", self.ids.view);
        synq_debug!(self.config.debug, SESSION, "connection lost ({reason})");
        self.connection = None;
        let now = Instant::now();
        self.lost_at.get_or_insert(now);
        // The first retry is immediate; then min(30 s, (delay + 100 ms) * (1 + random)), growing
        // with every attempt that does not end in a `Sync`.
        let next_delay = if self.lost_at == Some(now) { 0 } else { jittered(self.retry_delay_ms) };
        self.retry_delay_ms = next_delay;
        self.phase = Phase::Reconnecting { next_at: now + std::time::Duration::from_millis(next_delay) };
        if !matches!(self.status, SynqStatus::Connecting) && !self.within_rejoin_limit() {
            self.status = SynqStatus::Connecting;
        }
    }

    fn within_rejoin_limit(&self) -> bool {
        self.lost_at.is_none_or(|at| at.elapsed() <= self.config.rejoin_limit)
    }

    fn connect(&mut self, model: &ModelWorld) {
        self.redirected = false;
        let connection = self.connector.connect();
        // The connector may have moved on to another reflector of a cluster.
        self.reflector = self.connector.describe();
        let connection = match connection {
            Ok(connection) => connection,
            Err(reason) => {
                if self.lost_at.is_some() {
                    return self.lost(format!("cannot reach {}: {reason}", self.reflector));
                }
                return self.fail(format!("cannot reach {}: {reason}", self.reflector));
            }
        };
        self.connection = Some(connection);
        // A client with a running model asks to continue right after the last event it has.
        let resume_after = model
            .runtime
            .as_ref()
            .filter(|_| matches!(self.phase, Phase::Reconnecting { .. }) && !self.resync)
            .map(|runtime| (self.last_held(runtime), self.target_time.max(runtime.now_ms())));
        // The join leaves when the reflector's challenge arrives (it must sign it).
        self.phase = Phase::AwaitingSync { since: Instant::now(), resume_after, joined: false };
    }

    /// Answers the reflector's challenge with the join and its membership proof.
    fn answer_challenge(&mut self, challenge: &Challenge) {
        let Phase::AwaitingSync { resume_after, joined: joined @ false, .. } = &mut self.phase else {
            warn!("bevy_synq: the reflector sent a second challenge; ignored");
            return;
        };
        *joined = true;
        let resume_after = *resume_after;
        let mut join = Join {
            protocol: PROTOCOL_VERSION,
            app_id: self.config.app_id.clone(),
            api_key_proof: self
                .config
                .api_key
                .as_ref()
                .map(|k| membership::api_key_proof(k, challenge, &self.config.app_id)),
            session_id: self.ids.session,
            persistent_id: self.ids.persistent,
            view_id: self.ids.view,
            tick_ms: self.config.tick_ms,
            resume_after: resume_after.map(|(seq, _)| seq),
            held_time: resume_after.map_or(0, |(_, time)| time),
            member_key: self.key().member_key(),
            signature: MemberSignature::EMPTY,
        };
        membership::sign_join(self.key(), challenge, &mut join);
        self.send(ClientMessage::Join(join));
    }

    fn send(&mut self, message: ClientMessage) {
        if let Some(connection) = self.connection.as_mut() {
            connection.send(message);
        }
    }

    /// Connects if needed and handles everything the reflector sent.
    pub(crate) fn receive(&mut self, model: &mut ModelWorld) {
        if let Phase::DerivingKey(task) = &mut self.phase {
            match bevy::tasks::futures::check_ready(task) {
                None => return,
                Some(Ok(key)) => {
                    self.key = Some(key);
                    self.phase = Phase::Connecting;
                }
                Some(Err(reason)) => return self.fail(format!("cannot derive the session key: {reason}")),
            }
        }
        match self.phase {
            Phase::Connecting => self.connect(model),
            Phase::Reconnecting { next_at, .. } if Instant::now() >= next_at => self.connect(model),
            _ => {}
        }
        if self.lost_at.is_some() && !self.within_rejoin_limit() && self.status.is_synced() {
            self.status = SynqStatus::Connecting;
        }
        // Everything that arrived is taken in before the silence and join timeouts are checked: the
        // transport may have received while the app did not run a frame (loading, a minimised
        // window).
        self.take_in(model);
        // The reflector ticks when nothing else flows: a long silence means it is gone, even if
        // the transport has not noticed yet.
        let silence =
            std::time::Duration::from_millis(u64::from(self.config.tick_ms) * 20).max(self.config.silence_limit);
        match self.phase {
            Phase::Running if self.last_heard.elapsed() > silence => {
                self.lost(format!("no word from the reflector for {} ms", silence.as_millis()));
            }
            Phase::AwaitingSync { since, .. } if since.elapsed() > SYNC_TIMEOUT => {
                self.lost("no answer to join".into());
            }
            _ => {}
        }
    }

    /// Handles every message the connection holds.
    fn take_in(&mut self, model: &mut ModelWorld) {
        loop {
            let Some(connection) = self.connection.as_mut() else { return };
            let message = match connection.poll() {
                Ok(Some(message)) => {
                    self.last_heard = Instant::now();
                    message
                }
                Ok(None) => return,
                Err(reason) => return self.lost(format!("connection lost: {reason}")),
            };
            match message.as_ref() {
                ServerMessage::Challenge(challenge) => self.answer_challenge(challenge),
                ServerMessage::Sync(sync) => {
                    if let Err(reason) = self.start(model, sync) {
                        return self.fail(reason);
                    }
                }
                ServerMessage::Event(event) => {
                    synq_debug!(
                        self.config.debug,
                        MESSAGES,
                        "seq {} at {} ms: {}",
                        event.seq,
                        event.time,
                        match &event.body {
                            EventBody::View { sender, payload, .. } =>
                                format!("event from {sender}, {} bytes sealed", payload.len()),
                            EventBody::Users { joined, left, reset } =>
                                format!("users joined {joined:?} left {left:?} reset {reset}"),
                            EventBody::SnapshotRequest => "snapshot request".into(),
                        }
                    );
                    self.target_time = self.target_time.max(event.time);
                    self.acknowledge_own(event);
                    self.pending.push_back(event.clone());
                }
                ServerMessage::Tick { time, seq } => {
                    // A tick may overtake events sent before it: it counts only once this client
                    // holds every event it vouches for (see `ServerMessage::Tick`).
                    let holds = model.runtime.as_ref().is_some_and(|runtime| seq_le(*seq, self.last_held(runtime)));
                    if matches!(self.phase, Phase::Running) && holds {
                        self.target_time = self.target_time.max(*time);
                    }
                }
                ServerMessage::Tally(tally) => self.tally(tally),
                ServerMessage::SnapshotAccepted { time, seq } => {
                    debug!("bevy_synq: snapshot at {time} ms (seq {seq}) stored by the reflector");
                }
                ServerMessage::PersistAccepted { .. } | ServerMessage::Pong(_) => {}
                ServerMessage::Consensus(record) => self.report_divergence(record),
                ServerMessage::Redirect(to) => {
                    // The `Unavailable` error that follows closes this connection; the next one
                    // goes to the reflector that serves the session.
                    self.redirected = true;
                    match self.connector.redirect(*to) {
                        Ok(()) => {
                            info!("bevy_synq: the session is served by the reflector at udp://{to}; moving there")
                        }
                        Err(reason) => warn!("bevy_synq: {reason}"),
                    }
                }
                ServerMessage::Error(error) => {
                    if error.code.is_final() {
                        return self.fail(format!("refused by the reflector: {}", error.message));
                    }
                    warn!("bevy_synq: reflector: {} ({:?})", error.message, error.code);
                    if matches!(error.code, ErrorCode::ShuttingDown | ErrorCode::Full | ErrorCode::Unavailable)
                        && !matches!(self.phase, Phase::Running)
                    {
                        if !self.redirected {
                            // Another reflector of a cluster may serve us (it may send us back).
                            self.connector.try_another();
                        }
                        return self.lost(format!("the reflector cannot serve us now: {}", error.message));
                    }
                    if error.code == ErrorCode::ShuttingDown {
                        self.connector.try_another();
                        return self.lost("the reflector is shutting down".into());
                    }
                    if matches!(error.code, ErrorCode::BufferFull | ErrorCode::RateLimited | ErrorCode::TooLarge) {
                        // One of this client's events (or uploads) was dropped, not stamped.
                        self.problems.push(SynqProblem::Refused(error.message.clone()));
                    }
                    if error.code == ErrorCode::DataLost {
                        self.problems.push(SynqProblem::DataLost(error.message.clone()));
                    }
                }
            }
        }
    }

    /// The sequence number of the last event this client holds, executed or pending.
    fn last_held(&self, runtime: &ModelRuntime) -> u32 {
        self.pending.back().map_or(runtime.last_seq(), |e| e.seq)
    }

    /// Our own event, stamped: it need not be sent again.
    fn acknowledge_own(&mut self, event: &StampedEvent) {
        if let EventBody::View { sender, sent: Some(id), .. } = &event.body
            && *sender == self.ids.view
        {
            self.sent.acknowledge(*id);
        }
    }

    /// After a `Sync`: forgets the sent events the session has (in the backlog, or executed
    /// before the state this client starts from) and sends the others again.
    fn resend_after_sync(&mut self, model: &ModelWorld, sync: &synq_protocol::wire::Sync) {
        if let Some(id) = model.runtime.as_ref().and_then(|r| r.views().last_sent(self.ids.view)) {
            self.sent.acknowledge(id);
        }
        for event in &sync.events {
            self.acknowledge_own(event);
        }
        let again = self.sent.resend_all();
        if again > 0 {
            info!("bevy_synq: view {} sends {again} unacknowledged events again", self.ids.view);
        }
    }

    fn start(&mut self, model: &mut ModelWorld, sync: &synq_protocol::wire::Sync) -> Result<(), String> {
        let policy = self.config.snapshot_policy;
        synq_debug!(
            self.config.debug,
            SESSION,
            "sync: session time {} ms, seq {}, {} events, start {}",
            sync.time,
            sync.seq,
            sync.events.len(),
            match &sync.start {
                SyncStart::Fresh { persisted_damaged: Some(reason), .. } =>
                    format!("fresh, the stored persisted data is damaged ({reason})"),
                SyncStart::Fresh { persisted: None, .. } => "fresh".to_string(),
                SyncStart::Fresh { persisted: Some(p), .. } =>
                    format!("fresh from persisted data ({} bytes sealed)", p.data.len()),
                SyncStart::Snapshot(s) => format!("from the snapshot at {} ms ({} bytes sealed)", s.time, s.data.len()),
                SyncStart::Resume => "resumed".to_string(),
            }
        );
        self.started_from = Some(match &sync.start {
            SyncStart::Fresh { .. } => StartKind::Fresh,
            SyncStart::Snapshot(record) => StartKind::Snapshot { time: record.time },
            SyncStart::Resume => StartKind::Resume,
        });
        let runtime = match &sync.start {
            SyncStart::Fresh { persisted_damaged: Some(reason), .. } => {
                let reason = format!(
                    "the persisted data of {}/{} is damaged on the reflector ({reason}); the session starts without it",
                    self.config.app_id, self.config.name
                );
                error!("bevy_synq: {reason}");
                ModelRuntime::fresh(self.plugin.clone(), self.settings, policy, Some(Err(reason)))
            }
            SyncStart::Fresh { persisted, .. } => {
                let opened = persisted.as_ref().map(|record| {
                    self.key()
                        .open(SealKind::Persisted, &Binding::Persistent(self.ids.persistent), &record.data)
                        .map_err(|_| {
                            format!(
                                "the persisted data of {}/{} cannot be opened with this session's password \
                                 (it was saved under another password)",
                                self.config.app_id, self.config.name
                            )
                        })
                });
                match &opened {
                    Some(Ok(json)) => info!(
                        "bevy_synq: session {} starts fresh from persisted data ({} bytes)",
                        self.ids.session,
                        json.len()
                    ),
                    Some(Err(error)) => error!("bevy_synq: {error}"),
                    None => info!("bevy_synq: session {} starts fresh", self.ids.session),
                }
                ModelRuntime::fresh(self.plugin.clone(), self.settings, policy, opened)
            }
            SyncStart::Snapshot(record) => {
                let bytes = self.open_snapshot(record)?;
                self.report_reload(record.time, record.seq, &record.vote, &bytes);
                info!(
                    "bevy_synq: session {} resumes from the snapshot at {} ms ({} bytes), {} events to replay",
                    self.ids.session,
                    record.time,
                    bytes.len(),
                    sync.events.len()
                );
                ModelRuntime::restore(self.plugin.clone(), self.settings, policy, &bytes).map_err(|e| e.to_string())?
            }
            SyncStart::Resume => {
                if model.runtime.is_none() {
                    return Err("the reflector offered a resume, but this client has no model".into());
                }
                // Seamless: keep the model and what is queued; the events continue right after.
                let seamless = self.within_rejoin_limit();
                info!(
                    "bevy_synq: view {} rejoined {} ({} events to catch up)",
                    self.ids.view,
                    if seamless { "seamlessly" } else { "after the rejoin limit" },
                    sync.events.len()
                );
                self.pending.extend(sync.events.iter().cloned());
                self.resend_after_sync(model, sync);
                self.target_time = self.target_time.max(sync.time);
                self.phase = Phase::Running;
                self.lost_at = None;
                self.retry_delay_ms = 0;
                self.reconnects += 1;
                if !seamless {
                    self.synced = false;
                    self.status = SynqStatus::Syncing { progress: 0.0 };
                }
                return Ok(());
            }
        };
        if let Some(old) = model.runtime.as_ref() {
            warn!("bevy_synq: view {} could not rejoin seamlessly; resyncing from the session's state", self.ids.view);
            self.reconnects += 1;
            if runtime.now_ms() < old.now_ms() && sync.time < old.now_ms() {
                // The reflector offers an older state than this replica ran: it lost (or rolled
                // back) part of the session's history.
                let reason = format!(
                    "the reflector holds an older state of the session ({} ms) than this replica ran ({} ms): \
                     part of its history was lost",
                    sync.time,
                    old.now_ms()
                );
                error!("bevy_synq: {reason}");
                self.problems.push(SynqProblem::DataLost(reason));
            }
        }
        self.lost_at = None;
        self.retry_delay_ms = 0;
        self.resync = false;
        self.catch_up_from = runtime.now_ms();
        self.shadow.reset();
        model.runtime = Some(runtime);
        self.resend_after_sync(model, sync);
        self.pending = sync.events.iter().cloned().collect();
        self.target_time = sync.time;
        self.phase = Phase::Running;
        self.synced = false;
        self.status = SynqStatus::Syncing { progress: 0.0 };
        Ok(())
    }

    /// Opens the session's snapshot and checks that it holds the state the replicas voted for:
    /// a member elected to upload cannot hand late joiners any other state.
    fn open_snapshot(&self, record: &SnapshotRecord) -> Result<Vec<u8>, String> {
        let bytes = self
            .key()
            .open(SealKind::Snapshot, &Binding::Session(self.ids.session), &record.data)
            .map_err(|e| format!("cannot open the session snapshot: {e}"))?;
        if self.key().vote_digest(&crate::snapshot::state_hash(&bytes)) != record.vote {
            return Err(format!(
                "the session snapshot at {} ms does not hold the state the replicas voted for",
                record.time
            ));
        }
        Ok(bytes)
    }

    /// Opens an external message. A view event that does not open is not an error: every replica
    /// fails to open it alike (same ciphertext, same key), so it is skipped in its place.
    fn open_external(&self, event: &StampedEvent) -> External {
        let body = match &event.body {
            EventBody::View { sender, sent, payload } => {
                let binding = Binding::SessionView(self.ids.session, *sender);
                match self.key().open(SealKind::Event, &binding, payload) {
                    Ok(plaintext) => ExternalBody::View { sender: *sender, sent: *sent, plaintext },
                    Err(error) => {
                        let reason = format!("event {} does not open: {error}", event.seq);
                        ExternalBody::Unopenable { sender: *sender, sent: *sent, reason }
                    }
                }
            }
            EventBody::Users { joined, left, reset } => {
                ExternalBody::Users { joined: joined.clone(), left: left.clone(), reset: *reset }
            }
            EventBody::SnapshotRequest => ExternalBody::SnapshotRequest,
        };
        External { time: event.time, seq: event.seq, body }
    }

    /// Executes what the reflector sent: everything when synced, a bounded slice when catching up.
    pub(crate) fn simulate(&mut self, model: &mut ModelWorld) {
        if self.config.resync_on_divergence && self.diverged_from_consensus() {
            warn!("bevy_synq: view {} holds another state than the consensus; reloading it", self.ids.view);
            self.resync();
        }
        if !matches!(self.phase, Phase::Running) {
            return;
        }
        let Some(runtime) = model.runtime.as_mut() else { return };
        // The shadow replica (a test mode) makes last frame's calls, then records this frame's.
        let shadowing = self.config.shadow != ShadowCheck::Off;
        if shadowing {
            self.shadow_catch_up();
            // Points passed outside this function: a fresh start's first point.
            self.shadow_record(runtime, shadow::Call::Nothing);
        }
        let started = Instant::now();
        let (max_messages, max_time) = self.config.catch_up.effective();
        let mut executed = 0usize;
        let mut failure = None;
        while let Some(event) = self.pending.front() {
            if !self.synced && (executed >= max_messages || started.elapsed() >= max_time) {
                break;
            }
            let external = self.open_external(event);
            // Skip what a resumed model already executed.
            let outcome =
                if synq_protocol::seq_le(external.seq, runtime.last_seq()) && runtime.now_ms() >= external.time {
                    Ok(())
                } else {
                    let copy = shadowing.then(|| external.clone());
                    let outcome = runtime.execute(external);
                    if let (Ok(()), Some(copy)) = (&outcome, copy) {
                        self.shadow_record(runtime, shadow::Call::Execute(copy));
                    }
                    outcome
                };
            match outcome {
                Ok(()) => {}
                Err(RuntimeError::TimeWentBack { now, got }) => {
                    // The reflector holds an older state than this replica (it lost or rolled back
                    // its storage): resync from what it has rather than fail.
                    let reason = format!(
                        "the reflector's session time went back from {now} ms to {got} ms (it lost part of the \
                         session's history); resyncing from its state"
                    );
                    self.problems.push(SynqProblem::DataLost(reason.clone()));
                    self.resync = true;
                    return self.lost(reason);
                }
                Err(error) => {
                    failure = Some(error.to_string());
                    break;
                }
            }
            self.pending.pop_front();
            executed += 1;
        }
        if failure.is_none() && self.pending.is_empty() {
            if self.synced {
                runtime.advance_to(self.target_time);
                self.shadow_record(runtime, shadow::Call::Advance(self.target_time));
            } else {
                // Fast-forward through quiet time in slices too.
                let step = u64::from(self.config.step_ms).max(1);
                while runtime.now_ms() < self.target_time && started.elapsed() < max_time {
                    let next = (runtime.now_ms() + step * 64).min(self.target_time);
                    runtime.advance_to(next);
                    self.shadow_record(runtime, shadow::Call::Advance(next));
                }
            }
        }
        let now = runtime.now_ms();
        let caught_up = self.pending.is_empty() && now >= self.target_time;
        if !self.synced {
            if caught_up && runtime.views().contains(self.ids.view) {
                self.synced = true;
                self.status = SynqStatus::Synced;
                info!("bevy_synq: view {} synced at {} ms", self.ids.view, now);
            } else {
                let span = self.target_time.saturating_sub(self.catch_up_from).max(1);
                let progress = (now.saturating_sub(self.catch_up_from) as f32 / span as f32).clamp(0.0, 1.0);
                self.status = SynqStatus::Syncing { progress };
            }
        }
        self.after_simulation(model);
        if let Some(reason) = failure {
            self.fail(format!("the model cannot continue: {reason}"));
        }
    }

    fn after_simulation(&mut self, model: &mut ModelWorld) {
        let Some(runtime) = model.runtime.as_mut() else { return };
        let points = std::mem::take(&mut runtime.points);
        self.shadow.points_drained();
        let problems = std::mem::take(&mut runtime.problems);
        for request in std::mem::take(&mut runtime.persist_requests) {
            synq_debug!(
                self.config.debug,
                PERSIST,
                "persist request at {} ms: {} bytes, hash {}",
                request.time,
                request.json.len(),
                synq_protocol::ids::base64url(&request.hash[..12])
            );
            let vote = self.key().vote_digest(&request.hash);
            if self.synced {
                let purpose = VotePurpose::Persist;
                let (time, seq) = (request.time, request.seq);
                self.send(ClientMessage::HashVote(HashVote { purpose, time, seq, vote, parts: Vec::new() }));
            }
            let (time, seq, json) = (request.time, request.seq, request.json);
            self.recent_persists.push_back(PastPersist { time, seq, vote, json });
            if self.recent_persists.len() > KEPT_POINTS {
                self.recent_persists.pop_front();
            }
        }
        for point in points {
            synq_debug!(
                self.config.debug,
                SNAPSHOT,
                "snapshot point at {} ms (seq {}): {} bytes, hash {}",
                point.time,
                point.seq,
                point.bytes.len(),
                synq_protocol::ids::base64url(&point.hash[..12])
            );
            self.history.push(HashRecord { time: point.time, seq: point.seq, hash: point.hash });
            if self.history.len() >= 2 * KEPT_HISTORY {
                // Trim in bulk: one shift per KEPT_HISTORY points, not one per point.
                self.history.drain(..KEPT_HISTORY);
            }
            let vote = self.key().vote_digest(&point.hash);
            if self.synced {
                let purpose = VotePurpose::Snapshot;
                let parts = point.parts.iter().map(|(_, hash)| self.key().vote_digest(hash)).collect();
                self.send(ClientMessage::HashVote(HashVote { purpose, time: point.time, seq: point.seq, vote, parts }));
            }
            let part_names = point.parts.into_iter().map(|(name, _)| name).collect();
            self.recent_points.push_back(PastPoint {
                time: point.time,
                seq: point.seq,
                vote,
                bytes: point.bytes,
                part_names,
            });
            if self.recent_points.len() > KEPT_POINTS {
                self.recent_points.pop_front();
            }
        }
        for problem in problems {
            match &problem {
                ModelProblem::UnregisteredComponents(names) => error!(
                    "bevy_synq: model entities carry unregistered components {names:?}: they are not in the snapshot \
                     and vanish at every snapshot point; register them with ModelApp::register_component"
                ),
                ModelProblem::UnregisteredResources(names) => error!(
                    "bevy_synq: the model world holds unregistered resources {names:?}: they are not in the \
                     snapshot, so at every snapshot point one inserted after ModelPlugin::build vanishes and one \
                     changed since is reset; register them with ModelApp::init_resource / insert_resource / \
                     register_resource"
                ),
                ModelProblem::ModelComponentsOnInternalEntities(names) => error!(
                    "bevy_synq: registered components were inserted into the model's internal entities \
                     (resources, observers, systems): {names:?}; they are not model entities and are dropped at the \
                     next snapshot point. Spawn a model entity instead"
                ),
                other => warn!("bevy_synq: {other:?}"),
            }
            self.problems.push(SynqProblem::Model(problem));
        }
    }
}

impl SynqClient {
    /// Whether a divergence reported this frame puts this replica outside the consensus (it
    /// voted, and not with the largest group).
    fn diverged_from_consensus(&self) -> bool {
        self.divergences.iter().any(|d| {
            !d.in_consensus
                && d.groups.iter().skip(1).any(|group| group.contains(&self.ids.view))
                // A late tally about the state this replica already dropped.
                && self.reloaded_after.is_none_or(|after| d.time > after)
        })
    }
}

/// The next reconnect delay: `min(30 s, (delay + 100 ms) * (1 + random))`, as Croquet does.
fn jittered(delay_ms: u64) -> u64 {
    use chacha20poly1305::aead::rand_core::RngCore;
    let random = f64::from(chacha20poly1305::aead::OsRng.next_u32()) / f64::from(u32::MAX);
    (((delay_ms + 100) as f64) * (1.0 + random)).min(30_000.0) as u64
}
