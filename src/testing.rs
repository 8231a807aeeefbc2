//! A determinism test harness for your model (cargo feature `testing`).
//!
//! [`Harness`] runs several replicas of one session in one process: headless Bevy apps with a
//! [`SynqPlugin`] each, on one [`ManualReflector`] driven by a virtual clock, so a test decides
//! exactly when time passes and when each app runs a frame. Add clients at any time (a client
//! added later is a late joiner: it restores the latest snapshot and replays the events since),
//! run rounds, [`settle`](Harness::settle), and [`assert_converged`](Harness::assert_converged):
//! every replica must hold the same state hash at every snapshot point they share and at the end,
//! and none may have reported a divergence or a problem.
//!
//! Use it from your own `tests/`, with the feature on in your dev-dependencies:
//!
//! ```toml
//! [dev-dependencies]
//! bevy_synq = { version = "0.1", features = ["testing"] }
//! ```
//!
//! Together with the shadow replica ([`ShadowCheck`](crate::ShadowCheck)), which finds hidden
//! state with a single client, this is how to test a model for determinism; see
//! `docs/debugging-desyncs.md`.
//!
//! ```
//! use bevy::prelude::*;
//! use bevy_synq::prelude::*;
//! use bevy_synq::testing::{Harness, test_session};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Component, Serialize, Deserialize)]
//! struct Counter(u64);
//!
//! fn model(model: &mut ModelApp) {
//!     model
//!         .register_component::<Counter>()
//!         .add_systems(ModelInit, |mut commands: Commands| {
//!             commands.spawn(Counter(0));
//!         })
//!         .add_systems(ModelUpdate, |mut counters: Query<&mut Counter>| {
//!             for mut counter in &mut counters {
//!                 counter.0 += 1;
//!             }
//!         });
//! }
//!
//! let mut session = test_session("counter");
//! session.snapshot_policy.every_ms = 1_000;
//! let mut h = Harness::new(session, || model);
//! h.add_client(|_| {});
//! h.add_client(|_| {});
//! h.run_rounds(20, 100); // 2 s of session time, one frame of every app per 100 ms
//! h.add_client(|_| {}); // a late joiner
//! h.run_rounds(20, 100);
//! h.settle();
//! let shared_points = h.assert_converged();
//! assert!(shared_points >= 2);
//! ```

use bevy::prelude::*;
use std::collections::BTreeMap;
use synq_protocol::ViewId;
use synq_protocol::crypto::KdfParams;
use synq_reflector::ReflectorConfig;
use synq_reflector::inproc::ManualReflector;

use crate::client::{HashRecord, ModelWorld, SynqClient};
use crate::config::SessionConfig;
use crate::model::ModelPlugin;
use crate::plugin::{ReflectorTarget, SynqPlugin};
use crate::status::{DivergenceDetected, SynqProblem, SynqStatus};

/// Makes the plugin of one more replica (each replica gets its own model plugin instance).
type PluginFactory = Box<dyn Fn(SessionConfig, ReflectorTarget) -> SynqPlugin>;

/// Several replicas of one session on a virtual clock. See the [module documentation](self).
pub struct Harness {
    /// The reflector every client of the harness connects to; [`Harness::round`] pumps it.
    pub reflector: ManualReflector,
    /// The virtual clock: the reflector's time in ms.
    pub now: u64,
    /// The clients' apps, in the order they were added.
    pub apps: Vec<App>,
    /// The session [`Harness::add_client`] joins.
    pub session: SessionConfig,
    factory: PluginFactory,
    next_view: u64,
}

/// A session config for tests: cheap key derivation, 50 ms steps, no silence timeout (the
/// virtual clock stands still while a test inspects its apps) and no send rate limit (it runs on
/// the wall clock, which stands still relative to the virtual one).
pub fn test_session(name: &str) -> SessionConfig {
    let mut session = SessionConfig::new("io.bevy-synq.tests", name, "correct horse");
    session.kdf = KdfParams::INSECURE_FAST;
    session.silence_limit = std::time::Duration::from_secs(3600);
    session.event_rate_limit = 1_000_000;
    session
}

impl Harness {
    /// A harness whose clients join `session` with the model `model()` builds (called once per
    /// client, so that every replica has its own plugin instance, as on separate machines).
    pub fn new<P: ModelPlugin>(session: SessionConfig, model: impl Fn() -> P + 'static) -> Self {
        Self {
            reflector: ManualReflector::new(ReflectorConfig::default()),
            now: 0,
            apps: Vec::new(),
            session,
            factory: Box::new(move |session, reflector| SynqPlugin::joining(model(), session, reflector)),
            next_view: 1,
        }
    }

    /// Adds a client app that joins `session` (with the next view id: 1, 2, …), after `setup`
    /// (e.g. a bot's systems), and returns its index. It connects in the next round: the key
    /// derivation (on a task pool, in wall-clock time) is awaited here, so when a client joins in
    /// virtual time does not depend on the machine's load.
    pub fn add_client_with(&mut self, session: SessionConfig, setup: impl FnOnce(&mut App)) -> usize {
        let mut session = session;
        session.view_id = Some(ViewId(self.next_view));
        self.next_view += 1;
        let mut app = App::new();
        app.add_plugins(MinimalPlugins);
        app.add_plugins((self.factory)(session, ReflectorTarget::InProcess(self.reflector.handle())));
        app.init_resource::<Divergences>().init_resource::<Problems>();
        app.add_systems(Last, (record_divergences, record_problems));
        setup(&mut app);
        app.finish();
        app.cleanup();
        // The session key derives on a task pool: wait for it on the wall clock (the virtual one
        // stands still), so that the client connects in the next round whatever the load.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            app.update();
            let client = app.world().get_resource::<SynqClient>();
            if client.is_none_or(SynqClient::key_ready) || std::time::Instant::now() > deadline {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        self.apps.push(app);
        self.apps.len() - 1
    }

    /// Adds a client app that joins the harness's session; see [`Harness::add_client_with`].
    pub fn add_client(&mut self, setup: impl FnOnce(&mut App)) -> usize {
        self.add_client_with(self.session.clone(), setup)
    }

    /// Advances the virtual clock by `ms` and runs one frame of every app (with the reflector
    /// pumped before and after).
    pub fn round(&mut self, ms: u64) {
        self.now += ms;
        self.reflector.pump(self.now);
        for app in &mut self.apps {
            app.update();
        }
        self.reflector.pump(self.now);
    }

    /// Runs `rounds` rounds of `ms` each.
    pub fn run_rounds(&mut self, rounds: usize, ms: u64) {
        for _ in 0..rounds {
            self.round(ms);
        }
    }

    /// Runs frames (without advancing the clock) until every replica is synced and has executed
    /// everything the reflector sent. Panics after 2,000 frames.
    pub fn settle(&mut self) {
        for _ in 0..2000 {
            self.round(0);
            if self.apps.iter().all(|app| {
                app.world()
                    .get_resource::<SynqClient>()
                    .is_some_and(|client| client.is_synced() && model_time(app) == client.reflector_time())
            }) {
                // One more frame so the last tick has been executed everywhere.
                self.round(0);
                return;
            }
        }
        panic!(
            "replicas did not settle: {:?}",
            self.apps.iter().map(|a| (model_time(a), status(a))).collect::<Vec<_>>()
        );
    }

    /// The client of app `index`. Panics if that app is not in a session.
    pub fn client(&self, index: usize) -> &SynqClient {
        self.apps[index].world().resource::<SynqClient>()
    }

    /// The client of app `index`, mutably (e.g. to [`resync`](SynqClient::resync) it).
    pub fn client_mut(&mut self, index: usize) -> Mut<'_, SynqClient> {
        self.apps[index].world_mut().resource_mut::<SynqClient>()
    }

    /// The view id of app `index`.
    pub fn view_id(&self, index: usize) -> ViewId {
        self.client(index).ids().view
    }

    /// Asserts that every replica is at the same model time with the same state hash, that
    /// replicas agree at every snapshot point they share, and that none reported a divergence
    /// or a problem. Returns the number of shared points.
    pub fn assert_converged(&mut self) -> usize {
        self.assert_converged_since(0)
    }

    /// [`Harness::assert_converged`], comparing only the snapshot points at or after model time
    /// `since` (e.g. after a diverged replica reloaded the consensus state; clear what was
    /// reported before with [`Harness::clear_reports`]).
    pub fn assert_converged_since(&mut self, since: u64) -> usize {
        let times: Vec<u64> = self.apps.iter().map(model_time).collect();
        assert!(times.windows(2).all(|w| w[0] == w[1]), "replicas at different model times: {times:?}");
        let hashes: Vec<_> = self.apps.iter_mut().map(current_hash).collect();
        assert!(
            hashes.windows(2).all(|w| w[0] == w[1]),
            "replicas hold different states at {} ms: {:?}",
            times.first().copied().unwrap_or_default(),
            hashes.iter().map(|h| hex(&h[..6])).collect::<Vec<_>>()
        );
        let mut shared = 0;
        type Votes = Vec<(usize, [u8; 32])>;
        let mut by_point: BTreeMap<(u64, u32), Votes> = BTreeMap::new();
        for (i, app) in self.apps.iter().enumerate() {
            for HashRecord { time, seq, hash } in app.world().resource::<SynqClient>().hash_history() {
                if *time >= since {
                    by_point.entry((*time, *seq)).or_default().push((i, *hash));
                }
            }
        }
        for ((time, seq), votes) in &by_point {
            if votes.len() > 1 {
                shared += 1;
                assert!(
                    votes.windows(2).all(|w| w[0].1 == w[1].1),
                    "replicas disagree at the snapshot point {time} ms / seq {seq}: {:?}",
                    votes.iter().map(|(i, h)| (*i, hex(&h[..6]))).collect::<Vec<_>>()
                );
            }
        }
        for app in &self.apps {
            let divergences = &app.world().resource::<Divergences>().0;
            assert!(divergences.is_empty(), "divergence reported: {divergences:?}");
            let problems = &app.world().resource::<Problems>().0;
            assert!(problems.is_empty(), "problems reported: {problems:?}");
        }
        shared
    }

    /// Every divergence app `index` reported so far.
    pub fn divergences(&self, index: usize) -> Vec<DivergenceDetected> {
        self.apps[index].world().resource::<Divergences>().0.clone()
    }

    /// Every problem app `index` reported so far.
    pub fn problems(&self, index: usize) -> Vec<SynqProblem> {
        self.apps[index].world().resource::<Problems>().0.clone()
    }

    /// Forgets the divergences and problems every app reported so far.
    pub fn clear_reports(&mut self) {
        for app in &mut self.apps {
            app.world_mut().resource_mut::<Divergences>().0.clear();
            app.world_mut().resource_mut::<Problems>().0.clear();
        }
    }
}

/// Every divergence a harness app reported (a resource of each app).
#[derive(Resource, Default)]
pub struct Divergences(pub Vec<DivergenceDetected>);

/// Every problem a harness app reported (a resource of each app).
#[derive(Resource, Default)]
pub struct Problems(pub Vec<SynqProblem>);

/// Collects [`SynqProblem`] messages into [`Problems`] (the harness adds it to every app).
pub fn record_problems(mut reader: MessageReader<SynqProblem>, mut all: ResMut<Problems>) {
    all.0.extend(reader.read().cloned());
}

/// Collects [`DivergenceDetected`] messages into [`Divergences`] (the harness adds it to every app).
pub fn record_divergences(mut reader: MessageReader<DivergenceDetected>, mut all: ResMut<Divergences>) {
    all.0.extend(reader.read().cloned());
}

/// The model time of an app's replica (0 without a model).
pub fn model_time(app: &App) -> u64 {
    app.world().resource::<ModelWorld>().runtime().map_or(0, |r| r.now_ms())
}

/// An app's connection status.
pub fn status(app: &App) -> SynqStatus {
    app.world().resource::<SynqStatus>().clone()
}

/// The hash of an app's current model state. Panics without a model.
pub fn current_hash(app: &mut App) -> [u8; 32] {
    let mut model = app.world_mut().resource_mut::<ModelWorld>();
    model.runtime.as_mut().expect("model running").state_hash().expect("state encodes")
}

/// Lowercase hex, for messages.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
