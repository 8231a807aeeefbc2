//! The Bevy plugin: [`SynqPlugin`] and the systems that drive a session each frame.

use bevy::prelude::*;
use bevy::state::app::StatesPlugin;
use std::sync::{Arc, Mutex};
use synq_protocol::CodeHasher;
use synq_protocol::ids::{AppId, CodeHash, IdOptions, PersistentId, SessionId, SessionName};
#[cfg(feature = "embedded")]
use synq_reflector::inproc::InProcessHandle;

use crate::client::{ModelWorld, Outbox, SynqClient};
use crate::config::SessionConfig;
use crate::debug::synq_debug;
use crate::model::app::{ModelApp, ModelPlugin, WorldSettings};
use crate::session::{SessionModel, SessionRequests, apply_session_requests, leave_on_exit, start_session};
use crate::status::{DivergenceDetected, SynqConnection, SynqProblem, SynqState, SynqStatus};
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
    #[cfg(feature = "embedded")]
    Embedded,
    /// An in-process reflector already running (several apps in one process, tests).
    #[cfg(feature = "embedded")]
    InProcess(InProcessHandle),
    /// A `synq-reflector` over UDP (renet + netcode) at this address.
    #[cfg(feature = "udp")]
    Udp(std::net::SocketAddr),
    /// Any other transport (see [`ReflectorTarget::custom`]). Every join through this target
    /// connects through the same connector.
    Custom(Arc<Mutex<Box<dyn Connector>>>),
}

impl ReflectorTarget {
    /// A target that connects through `connector`, e.g. a transport of your own.
    ///
    /// ```no_run
    /// use bevy_synq::prelude::*;
    /// use bevy_synq::protocol::udp::DEFAULT_PROTOCOL_ID;
    /// use bevy_synq::transport::udp::UdpConnector;
    ///
    /// let connector = UdpConnector::new("127.0.0.1:5800".parse().unwrap(), DEFAULT_PROTOCOL_ID);
    /// let target = ReflectorTarget::custom(connector);
    /// ```
    pub fn custom(connector: impl Connector) -> Self {
        ReflectorTarget::Custom(Arc::new(Mutex::new(Box::new(connector))))
    }
}

/// Adds a replicated model to an app.
///
/// [`SynqPlugin::new`] joins a session at startup; [`SynqPlugin::idle`] starts outside any session,
/// for games that join from a menu with [`SynqSession`](crate::SynqSession). Either way the app can
/// leave, join and switch sessions at any time; every session runs the same model.
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
    /// The session to join at startup, and where.
    startup: Option<(SessionConfig, ReflectorTarget)>,
}

impl SynqPlugin {
    /// A plugin running `model` that joins `session` at startup, on an embedded reflector unless
    /// [`SynqPlugin::with_reflector`] says otherwise.
    #[cfg(feature = "embedded")]
    pub fn new(model: impl ModelPlugin, session: SessionConfig) -> Self {
        Self { model: Arc::new(model), startup: Some((session, ReflectorTarget::Embedded)) }
    }

    /// A plugin running `model` that joins `session` on `reflector` at startup.
    pub fn joining(model: impl ModelPlugin, session: SessionConfig, reflector: ReflectorTarget) -> Self {
        Self { model: Arc::new(model), startup: Some((session, reflector)) }
    }

    /// A plugin running `model` in no session yet: the app starts in
    /// [`SynqState::Disconnected`](crate::SynqState::Disconnected) and joins with
    /// [`SynqSession::join`](crate::SynqSession::join).
    pub fn idle(model: impl ModelPlugin) -> Self {
        Self { model: Arc::new(model), startup: None }
    }

    /// Joins the startup session on `reflector` (no effect on an idle plugin).
    pub fn with_reflector(mut self, reflector: ReflectorTarget) -> Self {
        if let Some((_, target)) = self.startup.as_mut() {
            *target = reflector;
        }
        self
    }
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

pub(crate) fn session_ids_of(
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
        let settings = WorldSettings { step_ms: 50, seed: [0; 32] };
        let probe = ModelApp::build(settings, self.model.as_ref());
        let mut outbox = Outbox::default();
        for (index, entry) in probe.registry.view_events.iter().enumerate() {
            outbox.index.insert(entry.type_id, index as u16);
        }
        for entry in &probe.registry.view_messages {
            (entry.add_to_app)(app);
        }
        let model = SessionModel { plugin: self.model.clone(), signature: Arc::new(probe.registry.signature.clone()) };
        drop(probe);
        if !app.is_plugin_added::<StatesPlugin>() {
            app.add_plugins(StatesPlugin);
        }
        app.init_resource::<ModelWorld>()
            .insert_resource(outbox)
            .insert_resource(model)
            .init_resource::<SessionRequests>()
            .insert_resource(SynqStatus::Disconnected { reason: "not in a session".into() })
            .init_resource::<SynqConnection>()
            .init_state::<SynqState>()
            .add_message::<SynqStatus>()
            .add_message::<DivergenceDetected>()
            .add_message::<SynqProblem>()
            .configure_sets(PreUpdate, (SynqSystems::Receive, SynqSystems::Simulate).chain())
            .add_systems(PreUpdate, apply_session_requests.in_set(SynqSystems::Receive))
            .add_systems(PreUpdate, (receive_and_simulate, update_connection).chain().in_set(SynqSystems::Simulate))
            .add_systems(PostUpdate, send.in_set(SynqSystems::Send))
            .add_systems(Last, leave_on_exit);
        if let Some((session, reflector)) = &self.startup {
            // Joined here rather than at the first frame, so that the client (its ids, its status)
            // is there as soon as the app is built; the key still derives on the task pool.
            start_session(app.world_mut(), session.clone(), reflector.clone());
        }
    }
}

/// Receives, simulates, and hands model output to the app. Exclusive: it writes messages of
/// types only known at run time.
fn receive_and_simulate(world: &mut World) {
    if !world.contains_resource::<SynqClient>() {
        return;
    }
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

/// Keeps [`SynqConnection`] and the [`SynqState`] current.
fn update_connection(
    status: Res<SynqStatus>,
    client: Option<Res<SynqClient>>,
    mut connection: ResMut<SynqConnection>,
    state: Res<State<SynqState>>,
    mut next: ResMut<NextState<SynqState>>,
) {
    // Compared before anything is copied: the strings change only when the session or the
    // status does, and this runs every frame.
    let reflector = client.as_ref().map(|c| c.reflector());
    let reason = match &*status {
        SynqStatus::Disconnected { reason } => Some(reason.as_str()),
        _ => None,
    };
    let numbers = (
        client.as_ref().map(|c| c.ids()),
        match &*status {
            SynqStatus::Syncing { progress } => *progress,
            SynqStatus::Synced => 1.0,
            _ => 0.0,
        },
        client.as_ref().and_then(|c| c.rtt()),
        client.as_ref().map_or(0, |c| c.backlog()),
        client.as_ref().map_or(0, |c| c.unacknowledged_events()),
        client.as_ref().map_or(0, |c| c.reconnects()),
    );
    let current = &*connection;
    let held =
        (current.session, current.progress, current.rtt, current.backlog, current.unacknowledged, current.reconnects);
    if held != numbers || current.reflector.as_deref() != reflector || current.reason.as_deref() != reason {
        let (session, progress, rtt, backlog, unacknowledged, reconnects) = numbers;
        *connection = SynqConnection {
            session,
            reflector: reflector.map(str::to_owned),
            progress,
            reason: reason.map(str::to_owned),
            rtt,
            backlog,
            unacknowledged,
            reconnects,
        };
    }
    let wanted = match (state.get(), SynqState::from(&*status)) {
        // A client that restored and caught up within one frame (a fresh session, a small one)
        // still passes through `Syncing`, so `OnEnter`/`OnExit(Syncing)` always run.
        (SynqState::Connecting, SynqState::Synced) => SynqState::Syncing,
        (_, wanted) => wanted,
    };
    if *state.get() != wanted {
        next.set(wanted);
    }
}

/// Sends what views published; outside a session, drops it (there is no one to send it to).
fn send(client: Option<ResMut<SynqClient>>, mut outbox: ResMut<Outbox>) {
    match client {
        Some(mut client) => client.flush(&mut outbox),
        None => outbox.pending.clear(),
    }
}
