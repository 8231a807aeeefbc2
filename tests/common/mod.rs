//! The determinism harness: K headless Bevy apps on one in-process reflector, driven by a virtual
//! clock, with helpers to add late joiners and to compare every replica's state hashes.
#![allow(dead_code)]

pub mod adversarial;
pub mod hostile;
pub mod process;
pub mod sum;

use bevy::prelude::*;
use bevy_synq::prelude::*;
use bevy_synq::protocol::crypto::KdfParams;
use bevy_synq::reflector::ReflectorConfig;
use bevy_synq::reflector::inproc::ManualReflector;
use bevy_synq::{HashRecord, ModelWorld, SynqClient};
use std::collections::BTreeMap;

/// Builds the model plugin for one replica (each replica gets its own instance).
pub type ModelFactory = Box<dyn Fn() -> Box<dyn Fn(&mut ModelApp) + Send + Sync>>;

/// Several replicas of one session on a virtual clock.
pub struct Harness {
    pub reflector: ManualReflector,
    pub now: u64,
    pub apps: Vec<App>,
    pub session: SessionConfig,
    factory: ModelFactory,
    next_view: u64,
}

/// A session config for tests: cheap key derivation, 50 ms steps.
pub fn test_session(name: &str) -> SessionConfig {
    let mut session = SessionConfig::new("io.bevy-synq.tests", name, "correct horse");
    session.kdf = KdfParams::INSECURE_FAST;
    // The virtual clock stands still while a test inspects its apps: never mistake that for a
    // dead reflector.
    session.silence_limit = std::time::Duration::from_secs(3600);
    // The send rate limit runs on the wall clock, which stands still relative to the virtual
    // one: lift it, so that what bots publish goes out in the frame they publish it.
    session.event_rate_limit = 1_000_000;
    session
}

impl Harness {
    pub fn new(session: SessionConfig, factory: ModelFactory) -> Self {
        Self {
            reflector: ManualReflector::new(ReflectorConfig::default()),
            now: 0,
            apps: Vec::new(),
            session,
            factory,
            next_view: 1,
        }
    }

    /// Adds a client app (optionally with extra setup, e.g. a bot) and returns its index.
    pub fn add_client_with(&mut self, session: SessionConfig, setup: impl FnOnce(&mut App)) -> usize {
        let mut session = session;
        session.view_id = Some(ViewId(self.next_view));
        self.next_view += 1;
        let model = (self.factory)();
        let mut app = App::new();
        app.add_plugins(MinimalPlugins);
        app.add_plugins(
            SynqPlugin::new(model, session).with_reflector(ReflectorTarget::InProcess(self.reflector.handle())),
        );
        app.init_resource::<Divergences>().init_resource::<Problems>();
        app.add_systems(Last, (record_divergences, record_problems));
        setup(&mut app);
        app.finish();
        app.cleanup();
        self.apps.push(app);
        self.apps.len() - 1
    }

    pub fn add_client(&mut self, setup: impl FnOnce(&mut App)) -> usize {
        self.add_client_with(self.session.clone(), setup)
    }

    /// Advances the virtual clock by `ms` and runs one frame of every app.
    pub fn round(&mut self, ms: u64) {
        self.now += ms;
        self.reflector.pump(self.now);
        for app in &mut self.apps {
            app.update();
        }
        self.reflector.pump(self.now);
    }

    pub fn run_rounds(&mut self, rounds: usize, ms: u64) {
        for _ in 0..rounds {
            self.round(ms);
        }
    }

    /// Runs frames until every replica is synced and has executed everything the reflector sent.
    pub fn settle(&mut self) {
        for _ in 0..2000 {
            self.round(0);
            if self.apps.iter().all(|app| {
                let client = app.world().resource::<SynqClient>();
                client.is_synced() && model_time(app) == client.reflector_time()
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

    pub fn client(&self, index: usize) -> &SynqClient {
        self.apps[index].world().resource::<SynqClient>()
    }

    pub fn view_id(&self, index: usize) -> ViewId {
        self.client(index).ids().view
    }

    /// Asserts that every replica is at the same model time with the same state hash, and that
    /// replicas agree at every snapshot point they share. Returns the number of shared points.
    pub fn assert_converged(&mut self) -> usize {
        let times: Vec<u64> = self.apps.iter().map(model_time).collect();
        assert!(times.windows(2).all(|w| w[0] == w[1]), "replicas at different model times: {times:?}");
        let hashes: Vec<_> = self.apps.iter_mut().map(current_hash).collect();
        assert!(
            hashes.windows(2).all(|w| w[0] == w[1]),
            "replicas hold different states at {} ms: {:?}",
            times[0],
            hashes.iter().map(|h| hex(&h[..6])).collect::<Vec<_>>()
        );
        let mut shared = 0;
        type Votes = Vec<(usize, [u8; 32])>;
        let mut by_point: BTreeMap<(u64, u32), Votes> = BTreeMap::new();
        for (i, app) in self.apps.iter().enumerate() {
            for HashRecord { time, seq, hash } in app.world().resource::<SynqClient>().hash_history() {
                by_point.entry((*time, *seq)).or_default().push((i, *hash));
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

    pub fn divergences(&self, index: usize) -> Vec<DivergenceDetected> {
        self.apps[index].world().resource::<Divergences>().0.clone()
    }
}

/// Every divergence a replica reported.
#[derive(Resource, Default)]
pub struct Divergences(pub Vec<DivergenceDetected>);

/// Every problem a replica reported.
#[derive(Resource, Default)]
pub struct Problems(pub Vec<SynqProblem>);

pub fn record_problems(mut reader: MessageReader<SynqProblem>, mut all: ResMut<Problems>) {
    all.0.extend(reader.read().cloned());
}

fn record_divergences(mut reader: MessageReader<DivergenceDetected>, mut all: ResMut<Divergences>) {
    all.0.extend(reader.read().cloned());
}

/// A member's raw connection to the harness's reflector, joined to `session` as `view` with `key`:
/// it speaks the wire protocol directly (what a broken or malicious client could send).
pub fn member_connection(
    h: &mut Harness,
    key: &bevy_synq::protocol::crypto::SessionKey,
    session: bevy_synq::protocol::SessionId,
    persistent: bevy_synq::protocol::PersistentId,
    view: ViewId,
) -> bevy_synq::reflector::inproc::InProcessConnection {
    use bevy_synq::protocol::wire::{ClientMessage, ServerMessage};
    let connection = h.reflector.handle().connect();
    h.round(0);
    let challenge = match connection.try_recv().unwrap().as_deref() {
        Some(ServerMessage::Challenge(challenge)) => *challenge,
        other => panic!("expected a challenge, got {other:?}"),
    };
    let join =
        bevy_synq::protocol::membership::member_join(key, &challenge, &h.session.app_id, session, persistent, view);
    assert!(connection.send(ClientMessage::Join(join)));
    h.round(0);
    connection
}

pub fn model_time(app: &App) -> u64 {
    app.world().resource::<ModelWorld>().runtime().map_or(0, |r| r.now_ms())
}

pub fn status(app: &App) -> SynqStatus {
    app.world().resource::<SynqStatus>().clone()
}

pub fn current_hash(app: &mut App) -> [u8; 32] {
    let mut model = app.world_mut().resource_mut::<ModelWorld>();
    model.runtime_mut().expect("model running").state_hash().expect("state encodes")
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
