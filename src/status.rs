//! What the app hears about the session: the connection as a Bevy state, its details,
//! divergence, problems.

use bevy::prelude::*;
use std::time::Duration;
use synq_protocol::ViewId;

use crate::client::SessionIds;
use crate::model::ModelProblem;

/// The connection to the session, as a Bevy [`States`]: schedule systems with
/// `in_state(SynqState::Synced)`, react with `OnEnter(SynqState::Synced)`.
///
/// It changes in `PreUpdate` (after [`SynqSystems::Simulate`](crate::SynqSystems::Simulate)) and
/// takes effect at the state transition before `Update`, so `OnEnter` systems run in the frame the
/// client got there. [`SynqStatus`] carries the same with details, as a resource and a message.
///
/// A join always goes `Connecting` → `Syncing` → `Synced`: a client that restored the session
/// and caught up within one frame (a fresh or small session) is `Syncing` for that one frame, so
/// `OnEnter(SynqState::Syncing)` and `OnExit(SynqState::Syncing)` run on every join.
///
/// ```
/// use bevy::prelude::*;
/// use bevy_synq::prelude::*;
///
/// fn hide_loading_screen() {}
/// fn play() {}
///
/// # fn model(_: &mut ModelApp) {}
/// let mut app = App::new();
/// app.add_plugins(MinimalPlugins)
///     .add_plugins(SynqPlugin::idle(model))
///     .add_systems(OnEnter(SynqState::Synced), hide_loading_screen)
///     .add_systems(Update, play.run_if(in_state(SynqState::Synced)));
/// app.update();
/// assert_eq!(*app.world().resource::<State<SynqState>>().get(), SynqState::Disconnected);
/// ```
#[derive(States, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SynqState {
    /// Not in a session: before the first join, after leaving, or after a final refusal.
    #[default]
    Disconnected,
    /// Deriving the session key, reaching the reflector, or reconnecting after the rejoin limit.
    Connecting,
    /// Restoring the session's state and executing the backlog.
    Syncing,
    /// Caught up: the model runs live and this client's view has joined it.
    Synced,
}

impl From<&SynqStatus> for SynqState {
    fn from(status: &SynqStatus) -> Self {
        match status {
            SynqStatus::Connecting => SynqState::Connecting,
            SynqStatus::Syncing { .. } => SynqState::Syncing,
            SynqStatus::Synced => SynqState::Synced,
            SynqStatus::Disconnected { .. } => SynqState::Disconnected,
        }
    }
}

/// Details of the connection to the session, kept current every frame (for a HUD, a loading bar
/// or diagnostics).
#[derive(Resource, Clone, Debug, Default, PartialEq)]
pub struct SynqConnection {
    /// The session this client is in or joining, and its view id; `None` when not in one.
    pub session: Option<SessionIds>,
    /// Where the reflector is, e.g. `the reflector at udp://192.168.1.10:5800`.
    pub reflector: Option<String>,
    /// How much of the backlog is executed while syncing, from 0 to 1 (1 once synced).
    pub progress: f32,
    /// Why the client is disconnected (left, refused, unreachable); `None` otherwise.
    pub reason: Option<String>,
    /// The round-trip time to the reflector, when the transport measures it (UDP does).
    pub rtt: Option<Duration>,
    /// Messages from the reflector waiting to be executed.
    pub backlog: usize,
    /// Events this client sent that the session has not been seen to stamp yet.
    pub unacknowledged: usize,
    /// How many times the connection was restored after a loss, in this session.
    pub reconnects: u32,
}

/// Where this client stands in its session. Also a resource, kept current.
#[derive(Resource, Message, Clone, Debug, PartialEq)]
pub enum SynqStatus {
    /// Opening a connection to the reflector, waiting for the session's state.
    Connecting,
    /// Restoring the session and executing the backlog; `progress` goes from 0 to 1.
    Syncing {
        /// Fraction of the backlog executed.
        progress: f32,
    },
    /// Caught up: the model runs live, and this client's own view has joined the model.
    Synced,
    /// Not connected; `reason` says why.
    Disconnected {
        /// Why.
        reason: String,
    },
}

impl SynqStatus {
    /// Whether the status is [`SynqStatus::Synced`].
    pub fn is_synced(&self) -> bool {
        matches!(self, SynqStatus::Synced)
    }
}

/// Replicas computed different state hashes at the same snapshot point: the model is not
/// deterministic (see `docs/debugging-desyncs.md`).
#[derive(Message, Clone, Debug, PartialEq, Eq)]
pub struct DivergenceDetected {
    /// Model time of the snapshot point.
    pub time: u64,
    /// The last external sequence number before it.
    pub seq: u32,
    /// The groups of replicas that agree with each other; the consensus first.
    pub groups: Vec<Vec<ViewId>>,
    /// Whether this replica is in the consensus group.
    pub in_consensus: bool,
    /// The parts of the model state that differ between the consensus and the other groups, e.g.
    /// `component my_game::Position` or `resource my_game::Score`: where to start looking.
    ///
    /// A replica outside the consensus learns the entities too, shortly after: the reflector
    /// sends it the consensus snapshot of the point, and it reports
    /// [`SynqProblem::DivergedFromConsensus`] with the entities (by `ModelId`) and components
    /// its state differs in.
    pub differing: Vec<String>,
}

/// Something went wrong that the app may want to show or act on.
#[derive(Message, Clone, Debug, PartialEq, Eq)]
pub enum SynqProblem {
    /// A problem in the model, the same on every replica.
    Model(ModelProblem),
    /// The reflector refused something this client sent, and dropped it: an event while the
    /// session's buffer is full, while the client sends faster than allowed or while the
    /// reflector is overloaded (its backlog towards this client is too large), or a message over
    /// a size limit. A dropped event is not executed anywhere; the string says which case.
    Refused(String),
    /// The reflector lost part of the session's stored history (damaged storage); the session
    /// continues from what it kept.
    DataLost(String),
    /// The shadow replica (a test mode, [`ShadowCheck`](crate::ShadowCheck)) computed another
    /// state than this replica from the same snapshot and the same messages: the model reads
    /// hidden state. Found by this replica alone, without any other client; unlike a
    /// [`DivergenceDetected`], no other replica is involved.
    ShadowMismatch(ShadowMismatch),
    /// This replica held another state than the consensus at a snapshot point and reloaded the
    /// consensus snapshot of that point ([`SynqClient::resync`](crate::SynqClient::resync), or
    /// [`SessionConfig::resync_on_divergence`](crate::SessionConfig::resync_on_divergence)); before
    /// replacing its state it compared the two, entity by entity.
    ReloadedConsensus(ReloadReport),
    /// This replica's state at a snapshot point differed from the consensus (it was outside the
    /// consensus of a [`DivergenceDetected`]): the reflector sent it the consensus snapshot of
    /// that point, and it compared the two, entity by entity, without reloading. Reported once
    /// per divergence (not again at every point while the replica stays diverged); reload with
    /// [`SynqClient::resync`](crate::SynqClient::resync).
    DivergedFromConsensus(ReloadReport),
}

/// What the shadow replica found: from the snapshot of one point and the same messages, it
/// reached another state than this replica at the next point (see
/// [`ShadowCheck`](crate::ShadowCheck) and `docs/debugging-desyncs.md`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShadowMismatch {
    /// Model time of the snapshot point at which the two copies differ.
    pub time: u64,
    /// The last external sequence number before it.
    pub seq: u32,
    /// Model time of the snapshot point the shadow was restored from.
    pub since: u64,
    /// The parts of the model state that differ, named as in
    /// [`DivergenceDetected::differing`], e.g. `component my_game::Position`; `snapshot point`
    /// when one copy passed a snapshot point that the other did not.
    pub differing: Vec<String>,
    /// The model entities that differ (at most [`MAX_ENTITY_DIFFERENCES`]), this replica being
    /// "here" and the shadow "there".
    pub entities: Vec<EntityDifference>,
}

/// What differed between this replica's state and the consensus snapshot of a point (reported
/// when it diverged, [`SynqProblem::DivergedFromConsensus`], and when it reloaded,
/// [`SynqProblem::ReloadedConsensus`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReloadReport {
    /// Model time of the snapshot point.
    pub time: u64,
    /// The last external sequence number before it.
    pub seq: u32,
    /// The parts of the model state that differ, named as in [`DivergenceDetected::differing`].
    pub differing: Vec<String>,
    /// The model entities that differ (at most [`MAX_ENTITY_DIFFERENCES`]), this replica being
    /// "here" and the consensus "there".
    pub entities: Vec<EntityDifference>,
}

/// At most this many entities are named in a report of two states that differ.
pub const MAX_ENTITY_DIFFERENCES: usize = 64;

/// One model entity, by its [`ModelId`](crate::ModelId), that differs between two copies of a
/// model state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntityDifference {
    /// The entity exists in this replica's state only.
    OnlyHere(crate::ModelId),
    /// The entity exists in the other state only (the consensus, or the shadow).
    OnlyThere(crate::ModelId),
    /// The entity exists in both; these registered components differ (in value, or present in
    /// one state only), e.g. `my_game::Position`.
    Components(crate::ModelId, Vec<String>),
}

impl EntityDifference {
    /// The entity's id.
    pub fn id(&self) -> crate::ModelId {
        match self {
            EntityDifference::OnlyHere(id) | EntityDifference::OnlyThere(id) | EntityDifference::Components(id, _) => {
                *id
            }
        }
    }
}

/// A run condition: the session is synced.
pub fn is_synced(status: Option<Res<SynqStatus>>) -> bool {
    status.is_some_and(|s| s.is_synced())
}
