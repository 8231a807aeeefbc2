//! The Bevy plugin: [`SynqPlugin`] and the systems that drive a session each frame.

use bevy::prelude::*;
use std::sync::{Arc, Mutex};
use synq_protocol::CodeHasher;
use synq_protocol::crypto::SessionKey;
use synq_protocol::ids::{AppId, CodeHash, IdOptions, PersistentId, SessionId, SessionName, ViewId, hash_parts};
use synq_reflector::ReflectorConfig;
use synq_reflector::inproc::{EmbeddedReflector, InProcessHandle};

use crate::client::{ModelWorld, Outbox, SessionIds, SynqClient};
use crate::config::SessionConfig;
use crate::debug::synq_debug;
use crate::model::app::{ModelApp, ModelPlugin, WorldSettings};
use crate::status::{DivergenceDetected, SynqProblem, SynqStatus};
use crate::transport::Connector;

/// The phases of a session in each frame, in order.
///
/// `Receive` and `Simulate` run in `PreUpdate`: by `Update`, view systems see the model at the
/// latest reflector time. `Send` runs in `PostUpdate` and sends what views published.
#[derive(SystemSet, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SynqSystems {
    /// Connect, and take in what the reflector sent.
    Receive,
    /// Run the model up to the reflector's time; deliver model → view messages.
    Simulate,
    /// Seal and send the events views published.
    Send,
}

/// Where the client's reflector is.
#[derive(Clone)]
pub enum ReflectorTarget {
    /// Start a reflector inside this process, on its own thread (solo play, local tests).
    Embedded,
    /// An in-process reflector already running (several apps in one process, tests).
    InProcess(InProcessHandle),
    /// A `synq-reflector` over UDP (renet + netcode) at this address.
    Udp(std::net::SocketAddr),
    /// Any other transport.
    Custom(Arc<Mutex<Option<Box<dyn Connector>>>>),
}

/// Adds a replicated model to an app.
///
/// ```no_run
/// use bevy::prelude::*;
/// use bevy_synq::prelude::*;
///
/// fn model(model: &mut ModelApp) {
///     // register components, resources, systems, observers…
/// }
///
/// App::new()
///     .add_plugins(MinimalPlugins)
///     .add_plugins(SynqPlugin::new(model, SessionConfig::new("io.example.demo", "lobby", "secret")))
///     .run();
/// ```
pub struct SynqPlugin {
    model: Arc<dyn ModelPlugin>,
    session: SessionConfig,
    reflector: ReflectorTarget,
}

impl SynqPlugin {
    /// A plugin running `model` in the session `session`, on an embedded reflector.
    pub fn new(model: impl ModelPlugin, session: SessionConfig) -> Self {
        Self { model: Arc::new(model), session, reflector: ReflectorTarget::Embedded }
    }

    /// Uses another reflector.
    pub fn with_reflector(mut self, reflector: ReflectorTarget) -> Self {
        self.reflector = reflector;
        self
    }
}

/// Keeps an embedded reflector running as long as the app.
#[derive(Resource)]
pub struct EmbeddedReflectorHandle(#[allow(dead_code)] EmbeddedReflector);

fn random_view_id() -> ViewId {
    use chacha20poly1305::aead::rand_core::RngCore;
    ViewId(chacha20poly1305::aead::OsRng.next_u64())
}

/// Computes the code hash of a model: its registrations in order and the source text fed in
/// (see [`SessionConfig::with_model_source`]).
pub fn model_code_hash(model: &dyn ModelPlugin, session: &SessionConfig) -> CodeHash {
    code_hash_of(&probe(model, session).registry.signature, session)
}

/// Builds the model once, to read what it registers.
fn probe(model: &dyn ModelPlugin, session: &SessionConfig) -> ModelApp {
    ModelApp::build(WorldSettings { step_ms: session.step_ms, seed: [0; 32] }, model)
}

fn code_hash_of(signature: &[(&'static str, &'static str)], session: &SessionConfig) -> CodeHash {
    let mut hasher = CodeHasher::new();
    for (kind, name) in signature {
        hasher.registered(kind, name);
    }
    for (name, text) in &session.model_sources {
        hasher.source(name, text);
    }
    if let Some(forced) = session.code_hash_override {
        hasher.hash_override(forced);
    }
    let hash = hasher.finish();
    let flags = session.debug | crate::DebugFlags::from_env();
    for entry in hasher.entries() {
        synq_debug!(flags, HASHING, "{} {}", synq_protocol::ids::base64url(&entry.hash[..9]), entry.label);
    }
    synq_debug!(flags, HASHING, "code hash {hash}{}", if hasher.is_overridden() { " (overridden)" } else { "" });
    hash
}

/// The options that make up a session's identity besides the code.
#[derive(serde::Serialize)]
struct IdentityOptions {
    step_ms: u32,
    snapshot_every_ms: u64,
    snapshot_every_events: u32,
}

/// Derives the ids of a session, checking the app id and the name.
pub fn session_ids(model: &dyn ModelPlugin, session: &SessionConfig) -> Result<(PersistentId, SessionId), String> {
    session_ids_of(&probe(model, session).registry.signature, session)
}

fn session_ids_of(
    signature: &[(&'static str, &'static str)],
    session: &SessionConfig,
) -> Result<(PersistentId, SessionId), String> {
    let app = AppId::new(&session.app_id).map_err(|e| e.to_string())?;
    let name = SessionName::new(&session.name).map_err(|e| e.to_string())?;
    let persistent = PersistentId::derive(&app, &name, &IdOptions::none());
    let options = IdOptions::from_serialize(&IdentityOptions {
        step_ms: session.step_ms,
        snapshot_every_ms: session.snapshot_policy.every_ms,
        snapshot_every_events: session.snapshot_policy.every_events,
    })
    .map_err(|e| e.to_string())?;
    let code = code_hash_of(signature, session);
    Ok((persistent, SessionId::derive(&persistent, &code, env!("CARGO_PKG_VERSION"), &options)))
}

impl Plugin for SynqPlugin {
    fn build(&self, app: &mut App) {
        let session = self.session.clone();
        let probe = probe(self.model.as_ref(), &session);
        let mut outbox = Outbox::default();
        for (index, entry) in probe.registry.view_events.iter().enumerate() {
            outbox.index.insert(entry.type_id, index as u16);
        }
        for entry in &probe.registry.view_messages {
            (entry.add_to_app)(app);
        }
        let ids = session_ids_of(&probe.registry.signature, &session);
        drop(probe);

        app.init_resource::<ModelWorld>()
            .insert_resource(outbox)
            .insert_resource(SynqStatus::Connecting)
            .add_message::<SynqStatus>()
            .add_message::<DivergenceDetected>()
            .add_message::<SynqProblem>();
        let (persistent, session_id) = match ids {
            Ok(ids) => ids,
            Err(reason) => {
                error!("bevy_synq: cannot join: {reason}");
                app.insert_resource(SynqStatus::Disconnected { reason });
                return;
            }
        };
        let mut session = session;
        session.debug = session.debug | crate::DebugFlags::from_env();
        let view = session.view_id.unwrap_or_else(random_view_id);
        synq_debug!(
            session.debug,
            SESSION,
            "app {} name {:?}: persistent id {persistent}, session id {session_id}, view {view}",
            session.app_id,
            session.name
        );
        let ids = SessionIds { session: session_id, persistent, view };
        let key = match SessionKey::derive(&session.password, &persistent, session.kdf) {
            Ok(key) => key,
            Err(e) => {
                let reason = format!("cannot derive the session key: {e}");
                error!("bevy_synq: {reason}");
                app.insert_resource(SynqStatus::Disconnected { reason });
                return;
            }
        };
        let seed = hash_parts(&[b"bevy_synq rng seed v1", session_id.as_bytes()]);

        let connector: Box<dyn Connector> = match &self.reflector {
            ReflectorTarget::Embedded => {
                let reflector = EmbeddedReflector::spawn(ReflectorConfig::default());
                let handle = reflector.handle();
                app.insert_resource(EmbeddedReflectorHandle(reflector));
                Box::new(handle)
            }
            ReflectorTarget::InProcess(handle) => Box::new(handle.clone()),
            ReflectorTarget::Udp(addr) => {
                Box::new(crate::transport::udp::UdpConnector::new(*addr, synq_reflector::server::DEFAULT_PROTOCOL_ID))
            }
            ReflectorTarget::Custom(slot) => slot
                .lock()
                .ok()
                .and_then(|mut slot| slot.take())
                .expect("bevy_synq: a custom connector can be used by one plugin only"),
        };
        info!(
            "bevy_synq: view {view} joining session {session_id} ({}/{}) via {}",
            session.app_id,
            session.name,
            connector.describe()
        );

        app.insert_resource(SynqClient::new(session, ids, key, self.model.clone(), seed, connector))
            .configure_sets(PreUpdate, (SynqSystems::Receive, SynqSystems::Simulate).chain())
            .add_systems(PreUpdate, receive_and_simulate.in_set(SynqSystems::Simulate))
            .add_systems(PostUpdate, send.in_set(SynqSystems::Send));
    }
}

/// Receives, simulates, and hands model output to the app. Exclusive: it writes messages of
/// types only known at run time.
fn receive_and_simulate(world: &mut World) {
    world.resource_scope(|world, mut client: Mut<SynqClient>| {
        world.resource_scope(|world, mut model: Mut<ModelWorld>| {
            let before = client.status.clone();
            client.receive(&mut model);
            client.simulate(&mut model);
            let synced = client.is_synced();
            if let Some(runtime) = model.runtime.as_mut() {
                let messages = runtime.take_view_messages();
                if synced {
                    for (index, message) in messages {
                        runtime.deliver_view_message(world, index, message);
                    }
                }
            }
            if client.status != before {
                world.write_message(client.status.clone());
                *world.resource_mut::<SynqStatus>() = client.status.clone();
            }
            for divergence in std::mem::take(&mut client.divergences) {
                world.write_message(divergence);
            }
            for problem in std::mem::take(&mut client.problems) {
                world.write_message(problem);
            }
        });
    });
}

fn send(mut client: ResMut<SynqClient>, mut outbox: ResMut<Outbox>) {
    client.flush(&mut outbox);
}
