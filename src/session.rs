//! Sessions at run time: [`SynqSession`] joins, leaves and switches sessions from any system.
//!
//! Requests are queued and carried out at the start of the next frame's
//! [`SynqSystems::Receive`](crate::SynqSystems::Receive), in order. Joining derives the session
//! key on Bevy's async compute task pool (Argon2id takes tens of milliseconds), so no frame waits
//! for it; the client connects once the key is ready. Leaving tells the reflector at once (the
//! other replicas see the view exit), drops the model world and the connection, and returns to
//! [`SynqState::Disconnected`](crate::SynqState::Disconnected). Joining while in a session leaves
//! it first: switching is leave + join, and the new session starts clean.

use bevy::ecs::system::SystemParam;
use bevy::prelude::*;
use bevy::tasks::{AsyncComputeTaskPool, TaskPool};
use std::sync::Arc;
use synq_protocol::crypto::SessionKey;
use synq_protocol::ids::{ViewId, hash_parts};
use tracing::{error, info};

use crate::client::{ModelWorld, Outbox, SessionIds, SynqClient};
use crate::config::SessionConfig;
use crate::debug::synq_debug;
use crate::model::app::ModelPlugin;
use crate::plugin::{ReflectorTarget, session_ids_of};
use crate::status::{SynqState, SynqStatus};
use crate::transport::{Connector, SharedConnector};

/// Joins and leaves sessions from any system.
///
/// ```
/// use bevy::prelude::*;
/// use bevy_synq::prelude::*;
///
/// /// The menu's "Play" button: join the room the player typed.
/// fn play(mut session: SynqSession, keys: Res<ButtonInput<KeyCode>>) {
///     if keys.just_pressed(KeyCode::Enter) {
///         session.join(SessionConfig::new("io.example.game", "room-42", "secret"), ReflectorTarget::Embedded);
///     }
///     if keys.just_pressed(KeyCode::Escape) {
///         session.leave();
///     }
/// }
///
/// # fn model(_: &mut ModelApp) {}
/// App::new()
///     .add_plugins(MinimalPlugins)
///     .add_plugins(SynqPlugin::idle(model))
///     .init_resource::<ButtonInput<KeyCode>>()
///     .add_systems(Update, play)
///     .update();
/// ```
#[derive(SystemParam)]
pub struct SynqSession<'w> {
    requests: ResMut<'w, SessionRequests>,
    status: Res<'w, SynqStatus>,
    client: Option<Res<'w, SynqClient>>,
}

impl SynqSession<'_> {
    /// Joins `session` on `reflector` (leaving the current session first, if any).
    pub fn join(&mut self, session: SessionConfig, reflector: ReflectorTarget) {
        self.requests.queue.push(SessionRequest::Join(Box::new(session), reflector));
    }

    /// Leaves the current session (nothing happens when not in one).
    pub fn leave(&mut self) {
        self.requests.queue.push(SessionRequest::Leave);
    }

    /// Reloads the session's consensus state (nothing happens when not in a session): the
    /// client rejoins without resuming its model, restores the reflector's latest snapshot — the
    /// state the largest group of replicas voted for — and catches up. For a replica that
    /// diverged ([`DivergenceDetected::in_consensus`](crate::DivergenceDetected::in_consensus) is
    /// `false`); see [`SynqClient::resync`].
    ///
    /// ```
    /// use bevy::prelude::*;
    /// use bevy_synq::prelude::*;
    ///
    /// /// Reload when this replica is outside the consensus.
    /// fn reload_when_diverged(mut divergences: MessageReader<DivergenceDetected>, mut session: SynqSession) {
    ///     if divergences.read().any(|d| !d.in_consensus) {
    ///         session.resync();
    ///     }
    /// }
    ///
    /// # fn model(_: &mut ModelApp) {}
    /// App::new()
    ///     .add_plugins(MinimalPlugins)
    ///     .add_plugins(SynqPlugin::idle(model))
    ///     .add_systems(Update, reload_when_diverged)
    ///     .update();
    /// ```
    pub fn resync(&mut self) {
        self.requests.queue.push(SessionRequest::Resync);
    }

    /// The connection state as of this frame (see [`SynqState`]).
    pub fn state(&self) -> SynqState {
        SynqState::from(&*self.status)
    }

    /// The session this client is in or joining; `None` when not in one.
    pub fn ids(&self) -> Option<SessionIds> {
        self.client.as_ref().map(|client| client.ids())
    }
}

/// Join and leave requests, carried out in order at the start of the next frame.
#[derive(Resource, Default)]
pub(crate) struct SessionRequests {
    queue: Vec<SessionRequest>,
}

enum SessionRequest {
    Join(Box<SessionConfig>, ReflectorTarget),
    Leave,
    Resync,
}

/// The model every session of this app runs, and what it registers (for the session ids).
#[derive(Resource, Clone)]
pub(crate) struct SessionModel {
    pub(crate) plugin: Arc<dyn ModelPlugin>,
    pub(crate) signature: Arc<Vec<(&'static str, &'static str)>>,
}

/// Keeps an embedded reflector running as long as the session that started it.
#[cfg(feature = "embedded")]
#[derive(Resource)]
pub struct EmbeddedReflectorHandle(#[allow(dead_code)] synq_reflector::inproc::EmbeddedReflector);

/// Carries out queued join and leave requests.
pub(crate) fn apply_session_requests(world: &mut World) {
    let requests = std::mem::take(&mut world.resource_mut::<SessionRequests>().queue);
    for request in requests {
        match request {
            SessionRequest::Leave => leave(world, "left the session".into()),
            SessionRequest::Resync => {
                if let Some(mut client) = world.get_resource_mut::<SynqClient>() {
                    client.resync();
                }
            }
            SessionRequest::Join(session, reflector) => {
                leave(world, "switching sessions".into());
                start_session(world, *session, reflector);
            }
        }
    }
}

/// Leaves the session when the app exits, so the other replicas see this view exit at once
/// rather than after the reflector's leave delay.
pub(crate) fn leave_on_exit(world: &mut World) {
    if world.resource::<Messages<AppExit>>().is_empty() {
        return;
    }
    leave(world, "the app exits".into());
}

/// Starts joining `session` on `reflector`; a session that cannot be joined (a bad name, an
/// unusable target) leaves the app disconnected, with the reason.
pub(crate) fn start_session(world: &mut World, session: SessionConfig, reflector: ReflectorTarget) {
    if let Err(reason) = join(world, session, reflector) {
        error!("bevy_synq: cannot join: {reason}");
        set_status(world, SynqStatus::Disconnected { reason });
    }
}

fn set_status(world: &mut World, status: SynqStatus) {
    if *world.resource::<SynqStatus>() != status {
        world.write_message(status.clone());
        *world.resource_mut::<SynqStatus>() = status;
    }
}

/// Ends the current session, if any: tells the reflector, drops the client, the model and what
/// views published but did not send.
fn leave(world: &mut World, reason: String) {
    let Some(mut client) = world.remove_resource::<SynqClient>() else { return };
    client.leave();
    drop(client);
    #[cfg(feature = "embedded")]
    world.remove_resource::<EmbeddedReflectorHandle>();
    world.resource_mut::<ModelWorld>().runtime = None;
    world.resource_mut::<Outbox>().pending.clear();
    set_status(world, SynqStatus::Disconnected { reason });
}

fn random_view_id() -> ViewId {
    use chacha20poly1305::aead::rand_core::RngCore;
    ViewId(chacha20poly1305::aead::OsRng.next_u64())
}

/// Starts joining `session`: the client is in place at once (ids known), its key derives on the
/// task pool.
fn join(world: &mut World, session: SessionConfig, reflector: ReflectorTarget) -> Result<(), String> {
    let model = world.resource::<SessionModel>().clone();
    let mut session = session;
    session.debug = session.debug | crate::DebugFlags::from_env();
    let (persistent, session_id) = session_ids_of(&model.signature, &session)?;
    let view = session.view_id.unwrap_or_else(random_view_id);
    synq_debug!(
        session.debug,
        SESSION,
        "app {} name {:?}: persistent id {persistent}, session id {session_id}, view {view}",
        session.app_id,
        session.name
    );
    let connector: Box<dyn Connector> = match reflector {
        #[cfg(feature = "embedded")]
        ReflectorTarget::Embedded => {
            let reflector =
                synq_reflector::inproc::EmbeddedReflector::spawn(synq_reflector::ReflectorConfig::default());
            let handle = reflector.handle();
            world.insert_resource(EmbeddedReflectorHandle(reflector));
            Box::new(handle)
        }
        #[cfg(feature = "embedded")]
        ReflectorTarget::InProcess(handle) => Box::new(handle),
        #[cfg(feature = "udp")]
        ReflectorTarget::Udp(addr) => {
            Box::new(crate::transport::udp::UdpConnector::new(addr, synq_protocol::udp::DEFAULT_PROTOCOL_ID))
        }
        ReflectorTarget::Custom(connector) => Box::new(SharedConnector(connector)),
    };
    info!(
        "bevy_synq: view {view} joining session {session_id} ({}/{}) via {}",
        session.app_id,
        session.name,
        connector.describe()
    );
    let (password, kdf) = (session.password.clone(), session.kdf);
    let key = AsyncComputeTaskPool::get_or_init(TaskPool::default)
        .spawn(async move { SessionKey::derive(&password, &persistent, kdf).map_err(|e| e.to_string()) });
    let seed = hash_parts(&[b"bevy_synq rng seed v1", session_id.as_bytes()]);
    let ids = SessionIds { session: session_id, persistent, view };
    world.insert_resource(SynqClient::new(session, ids, key, model.plugin, seed, connector));
    set_status(world, SynqStatus::Connecting);
    Ok(())
}
