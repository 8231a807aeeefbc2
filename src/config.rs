//! How a client joins a session.

use std::time::Duration;
use synq_protocol::ViewId;
use synq_protocol::crypto::KdfParams;

use crate::model::SnapshotPolicy;

/// Everything that identifies a session and how this client takes part in it.
///
/// `app_id`, `name`, the model code, `step_ms` and `snapshot_policy` make up the session's
/// identity: clients that differ in any of them are in different sessions. The password never
/// leaves the client.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Reverse-DNS app id, e.g. `io.example.multiblaster`.
    pub app_id: String,
    /// Session name; with the app id it makes the persistent id.
    pub name: String,
    /// Session password: the session key is derived from it. Never sent anywhere.
    pub password: String,
    /// Argon2id parameters for the key ([`KdfParams::RECOMMENDED`] unless testing).
    pub kdf: KdfParams,
    /// The model's fixed step in ms of model time (default 50, i.e. 20 Hz).
    pub step_ms: u32,
    /// Heartbeat tick period requested from the reflector, in ms (default 50).
    pub tick_ms: u32,
    /// When snapshot points happen.
    pub snapshot_policy: SnapshotPolicy,
    /// How much catching up a late joiner does per frame.
    pub catch_up: CatchUpBudget,
    /// After a lost connection, a client that is back within this limit (and missed nothing)
    /// continues seamlessly: its view notices nothing. Later, it resyncs from the latest
    /// snapshot. Croquet's `rejoinLimit`; default 1000 ms.
    pub rejoin_limit: Duration,
    /// After this long without a word from the reflector (it ticks every `tick_ms` when nothing
    /// else flows), the client considers the connection lost and reconnects; at least 20 ticks.
    /// Default 2 s.
    pub silence_limit: Duration,
    /// At most this many sealed messages per second go to the reflector; events published faster
    /// are bundled (in order, up to 16 KiB per bundle). Croquet's `eventRateLimit`; default 20.
    pub event_rate_limit: u32,
    /// The key the reflector asks of this app, if it controls access.
    pub api_key: Option<String>,
    /// Debug output to log (added to what `SYNQ_DEBUG` names).
    pub debug: crate::DebugFlags,
    /// This client's view id; random when `None`.
    pub view_id: Option<ViewId>,
    /// Source text of the model code, fed into the code hash: any change makes a new session.
    pub model_sources: Vec<(String, String)>,
    /// Forces the code hash (debugging only: join a session of other code on purpose).
    pub code_hash_override: Option<synq_protocol::CodeHash>,
    /// A test mode: run a second copy of the model beside this replica's and compare the two at
    /// snapshot points, so that hidden state is caught with a single client (see
    /// [`ShadowCheck`]). Off by default; not part of the session's identity.
    pub shadow: ShadowCheck,
    /// When the replicas' votes show that this replica's state differs from the consensus
    /// ([`DivergenceDetected::in_consensus`](crate::DivergenceDetected::in_consensus) is `false`),
    /// reload the consensus state at once, as [`SynqClient::resync`](crate::SynqClient::resync)
    /// does. Off by default: the divergence is reported and the replica keeps running its own
    /// state until the app resyncs it.
    pub resync_on_divergence: bool,
}

impl SessionConfig {
    /// A session of `app_id` named `name`, with `password`.
    pub fn new(app_id: impl Into<String>, name: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            app_id: app_id.into(),
            name: name.into(),
            password: password.into(),
            kdf: KdfParams::RECOMMENDED,
            step_ms: 50,
            tick_ms: 50,
            snapshot_policy: SnapshotPolicy::default(),
            catch_up: CatchUpBudget::default(),
            rejoin_limit: Duration::from_millis(1000),
            silence_limit: Duration::from_secs(2),
            event_rate_limit: 20,
            api_key: None,
            debug: crate::DebugFlags::NONE,
            view_id: None,
            model_sources: Vec::new(),
            code_hash_override: None,
            shadow: ShadowCheck::Off,
            resync_on_divergence: false,
        }
    }

    /// Feeds model source text into the code hash, typically `include_str!("model.rs")`.
    pub fn with_model_source(mut self, name: impl Into<String>, text: impl Into<String>) -> Self {
        self.model_sources.push((name.into(), text.into()));
        self
    }

    /// Turns the shadow replica on (a test mode, see [`ShadowCheck`]).
    pub fn with_shadow(mut self, shadow: ShadowCheck) -> Self {
        self.shadow = shadow;
        self
    }
}

/// The shadow replica, a test mode in the spirit of GGRS's `SyncTestSession`: it finds model
/// state that is not a function of the snapshot and the messages — hidden state — with a single
/// client, in a unit test or a single-player run.
///
/// At a snapshot point the client restores a second copy of the model (the *shadow*) from that
/// point's snapshot bytes, with a fresh [`ModelRuntime`](crate::ModelRuntime) built by the same
/// [`ModelPlugin`](crate::ModelPlugin), feeds it exactly the external messages the real replica
/// executes afterwards — one frame later — and compares the two state hashes at the next snapshot
/// point. When they differ, it reports [`SynqProblem::ShadowMismatch`](crate::SynqProblem::ShadowMismatch)
/// naming the parts of the state that differ (components, resources, entity ids, the runtime's
/// own state), and logs an error.
///
/// What it catches: state that the model reads from outside its world and that changes between
/// the two runs — a `static` or a `thread_local` the model writes (both copies advance it), an
/// `Arc` captured by the model plugin (both copies share it), the wall clock (the shadow runs a
/// frame later), `std` `HashMap`/`HashSet` iteration order (every map gets its own random seed),
/// `rand`'s thread RNG, and state a view system changes between frames. What it cannot catch:
/// hidden state that reads the same for both copies — a value set once at startup, a platform
/// difference (`f32::sin` on another CPU or OS, another build of the code), a config file or an
/// environment variable that differs between machines — and anything before the first snapshot
/// point (`ModelInit`). State *inside* the model world that the snapshot does not carry (an
/// unregistered component, a `Local`) is not hidden state here: every replica, this one included,
/// rebuilds its world from the snapshot at each point, so it resets alike everywhere (and
/// unregistered components are reported as [`ModelProblem`](crate::ModelProblem)s).
///
/// The shadow doubles the model's cost while it runs and restores a world at each point it
/// starts from: use it in tests and debug builds.
///
/// ```
/// use bevy_synq::ShadowCheck;
/// use bevy_synq::prelude::*;
///
/// let session = SessionConfig::new("io.example.game", "test", "secret").with_shadow(ShadowCheck::EveryPoint);
/// assert_eq!(session.shadow, ShadowCheck::EveryPoint);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ShadowCheck {
    /// No shadow (the default).
    #[default]
    Off,
    /// Check every interval between two snapshot points: a shadow starts at every point and is
    /// compared at the next one.
    EveryPoint,
    /// Check one interval in `n`: a shadow starts at every `n`th snapshot point (the first one
    /// included) and is compared at the next point, so the model's cost grows by about `1/n`.
    /// `EveryNthPoint(0)` and `EveryNthPoint(1)` are `EveryPoint`.
    EveryNthPoint(u32),
}

impl ShadowCheck {
    /// Whether a shadow starts at the `count`th snapshot point (counted from 1).
    pub(crate) fn starts_at(self, count: u64) -> bool {
        match self {
            ShadowCheck::Off => false,
            ShadowCheck::EveryPoint => true,
            ShadowCheck::EveryNthPoint(n) => (count.saturating_sub(1)).is_multiple_of(u64::from(n.max(1))),
        }
    }
}

/// How much of a late joiner's backlog is executed per frame, so the app stays responsive.
///
/// A zero in either field means "no limit" for it (a frame that executes nothing would never
/// catch up).
#[derive(Clone, Copy, Debug)]
pub struct CatchUpBudget {
    /// At most this many external messages per frame while catching up (0: no limit).
    pub max_messages: usize,
    /// At most this much wall time per frame while catching up (zero: no limit).
    pub max_time: Duration,
}

impl CatchUpBudget {
    /// The budget with zeros read as "no limit".
    pub(crate) fn effective(self) -> (usize, Duration) {
        let messages = if self.max_messages == 0 { usize::MAX } else { self.max_messages };
        let time = if self.max_time.is_zero() { Duration::MAX } else { self.max_time };
        (messages, time)
    }
}

impl Default for CatchUpBudget {
    fn default() -> Self {
        Self { max_messages: 5_000, max_time: Duration::from_millis(8) }
    }
}
