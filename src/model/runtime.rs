//! The model runtime: one replica's model world, stepped only by external messages and its own
//! future messages, with snapshot points at which it rebuilds itself canonically.

use bevy::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use synq_protocol::wire::SentId;
use synq_protocol::{Hash32, INITIAL_SEQ, ViewId};

use super::app::{ModelApp, ModelPlugin, WorldSettings};
use super::events::{ViewExited, ViewJoined, ViewOutbox};
use super::ids::ModelId;
use super::persist::{PersistOutbox, PersistState};
use super::registry::ModelRegistry;
use super::time::{FutureKind, FutureQueue, ModelInit, ModelTime, ModelUpdate};
use crate::snapshot::{self, SnapshotError};

/// The views currently in the session, as the model knows them (from join/leave notices).
/// Part of the snapshot.
#[derive(Resource, Debug, Default, Clone)]
pub struct ModelViews {
    pub(crate) views: BTreeSet<ViewId>,
    /// The last view event executed from each view that may send events again: after a
    /// reconnect, its client knows which of its events the session executed.
    pub(crate) sent: BTreeMap<ViewId, SentId>,
}

impl ModelViews {
    /// Whether this view is in the session.
    pub fn contains(&self, view: ViewId) -> bool {
        self.views.contains(&view)
    }

    /// The views in the session, in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = ViewId> + '_ {
        self.views.iter().copied()
    }

    /// Number of views in the session.
    pub fn len(&self) -> usize {
        self.views.len()
    }

    /// Whether no view is in the session.
    pub fn is_empty(&self) -> bool {
        self.views.is_empty()
    }

    /// The last event of `view` the model executed, if its client numbers its events.
    pub fn last_sent(&self, view: ViewId) -> Option<SentId> {
        self.sent.get(&view).copied()
    }
}

/// When the next snapshot point comes. Part of the snapshot.
///
/// `ModelApp::new` inserts it before the model plugin runs; its `on_add` hook then makes the
/// model world's internal entities invisible to model queries
/// ([`prepare_model_world`](crate::snapshot::prepare_model_world)).
#[derive(Resource, Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SnapshotBook {
    pub last_external_seq: u32,
    pub last_snapshot_time: u64,
    pub externals_since: u32,
    pub requested: bool,
    /// True while the world is rebuilt from a snapshot (see [`snapshot::rebuilding`]); not part
    /// of the snapshot.
    #[serde(skip)]
    pub rebuilding: bool,
}

/// When snapshot points happen. Part of the session's identity: every replica must use the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SnapshotPolicy {
    /// A snapshot point after this many milliseconds of model time since the last one.
    pub every_ms: u64,
    /// Or after this many external messages since the last one, whichever comes first.
    pub every_events: u32,
}

impl Default for SnapshotPolicy {
    fn default() -> Self {
        Self { every_ms: 10_000, every_events: 2_000 }
    }
}

/// An external message, opened: what the reflector stamped, with the payload decrypted.
#[derive(Debug, Clone)]
pub(crate) struct External {
    pub time: u64,
    pub seq: u32,
    pub body: ExternalBody,
}

#[derive(Debug, Clone)]
pub(crate) enum ExternalBody {
    View {
        sender: ViewId,
        sent: Option<SentId>,
        plaintext: Vec<u8>,
    },
    /// A view event that does not open with the session key: it takes its place in the order
    /// (time, sequence) and is skipped, the same way on every replica.
    Unopenable {
        sender: ViewId,
        sent: Option<SentId>,
        reason: String,
    },
    Users {
        joined: Vec<ViewId>,
        left: Vec<ViewId>,
        reset: bool,
    },
    SnapshotRequest,
}

/// A snapshot point this replica passed: its time, position and state hash, and the bytes.
#[derive(Debug, Clone)]
pub struct SnapshotPoint {
    /// Model time of the point.
    pub time: u64,
    /// The last external sequence number executed before it.
    pub seq: u32,
    /// SHA-256 of the canonical snapshot.
    pub hash: Hash32,
    /// The canonical snapshot.
    pub bytes: Arc<Vec<u8>>,
    /// The hash of each part of the state (see [`snapshot::StatePart`]).
    pub parts: Vec<snapshot::StatePart>,
}

/// Something in the model that the app should hear about; the same on every replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelProblem {
    /// The persisted data handed to this fresh session could not be opened or loaded. The
    /// session runs without it, and persisting is disabled so that the stored data is kept.
    PersistLoadFailed(String),
    /// A view event could not be opened (not sealed with the session key), decoded (bad
    /// encoding) or named a type the model does not know; it was skipped on every replica.
    BadViewEvent {
        /// Who sent it.
        sender: ViewId,
        /// What went wrong.
        reason: String,
    },
    /// A timer's event could not be decoded; it was skipped.
    BadTimer(String),
    /// Model entities carry components that are not registered: they are not part of the
    /// snapshot and vanish at every snapshot point.
    UnregisteredComponents(Vec<String>),
    /// Entities with no registered component at all exist in the model world: they are not part
    /// of the snapshot and vanish at every snapshot point.
    UntrackedEntities(Vec<String>),
    /// Registered model components were inserted into internal entities of the model world (a
    /// resource's entity, an observer, a registered system), e.g. through an `Entity` that
    /// names one. Those are not model entities: the snapshot does not carry them, and the
    /// components vanish at the next snapshot point. Each entry names the components and the
    /// entity.
    ModelComponentsOnInternalEntities(Vec<String>),
    /// Resources in the model world that are not registered, so the snapshot does not carry them:
    /// those inserted after `ModelPlugin::build` (in `ModelInit`, by a system, an observer or a
    /// command) vanish at every snapshot point, and a system that reads one later fails; those
    /// `build` inserted and the model changed since are reset to their build-time value. Register
    /// them with `ModelApp::init_resource`, `ModelApp::insert_resource`, or
    /// `ModelApp::register_resource` and an insert in `ModelInit`. (Resources `build` inserts and
    /// nothing changes are constants every rebuild restores: not reported.)
    UnregisteredResources(Vec<String>),
    /// The snapshot could not be encoded; the model keeps running without this snapshot point.
    SnapshotFailed(String),
}

/// Why the runtime refused an external message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    /// An external message is missing: the reflector's sequence has a gap.
    #[error("external message gap: expected sequence {expected}, got {got}")]
    Gap {
        /// The sequence number that should have come.
        expected: u32,
        /// The one that came.
        got: u32,
    },
    /// The event type is not registered with the model.
    #[error("{0} is not a registered view event")]
    Unregistered(&'static str),
    /// An external message is stamped before the model's current time.
    #[error("external message at {got} ms is earlier than model time {now} ms")]
    TimeWentBack {
        /// Model time.
        now: u64,
        /// The message's time.
        got: u64,
    },
}

/// Settings for a runtime driven directly, without a session: tools, replays and benchmarks.
#[derive(Clone, Copy, Debug)]
pub struct RuntimeOptions {
    /// The fixed step of [`ModelUpdate`] in ms.
    pub step_ms: u32,
    /// Seed of the model RNG.
    pub seed: [u8; 32],
    /// When snapshot points happen.
    pub snapshot_policy: SnapshotPolicy,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self { step_ms: 50, seed: [0; 32], snapshot_policy: SnapshotPolicy::default() }
    }
}

/// One replica's model.
pub struct ModelRuntime {
    world: World,
    plugin: Arc<dyn ModelPlugin>,
    registry: Arc<ModelRegistry>,
    settings: WorldSettings,
    policy: SnapshotPolicy,
    /// Snapshot points passed since the owner last drained them.
    pub(crate) points: Vec<SnapshotPoint>,
    /// Problems found since the owner last drained them.
    pub(crate) problems: Vec<ModelProblem>,
    /// Persist requests since the owner last drained them.
    pub(crate) persist_requests: Vec<super::persist::PersistRequest>,
    reported: BTreeSet<String>,
}

impl ModelRuntime {
    fn build(plugin: &Arc<dyn ModelPlugin>, settings: WorldSettings) -> (World, ModelRegistry) {
        let app = ModelApp::build(settings, plugin.as_ref());
        (app.world, app.registry)
    }

    /// A model that starts fresh: built, initialised by [`ModelInit`] at time 0, then passed
    /// through its first snapshot point.
    pub(crate) fn fresh(
        plugin: Arc<dyn ModelPlugin>,
        settings: WorldSettings,
        policy: SnapshotPolicy,
        persisted: Option<Result<Vec<u8>, String>>,
    ) -> Self {
        let (mut world, registry) = Self::build(&plugin, settings);
        world.resource_mut::<SnapshotBook>().last_external_seq = INITIAL_SEQ;
        let mut problems = Vec::new();
        let (json, open_error) = match persisted {
            Some(Ok(json)) => (Some(json), None),
            Some(Err(error)) => (None, Some(error)),
            None => (None, None),
        };
        if let Some(entry) = &registry.persistence {
            let load_error = (entry.load)(&mut world, json.as_deref());
            if let Some(error) = open_error.or(load_error) {
                problems.push(ModelProblem::PersistLoadFailed(error.clone()));
                world.resource_mut::<PersistState>().disabled = Some(error);
            } else if json.is_some() {
                world.resource_mut::<PersistState>().loading = true;
            }
        }
        world.run_schedule(ModelInit);
        world.flush();
        if let Some(entry) = &registry.persistence {
            (entry.remove)(&mut world);
        }
        world.resource_mut::<PersistState>().loading = false;
        world.resource_mut::<FutureQueue>().push(0, FutureKind::Step);
        let mut runtime = Self::assemble(world, plugin, registry, settings, policy);
        runtime.problems = problems;
        runtime.collect_persist_requests();
        runtime.snapshot_point();
        runtime
    }

    /// A model restored from a snapshot.
    pub(crate) fn restore(
        plugin: Arc<dyn ModelPlugin>,
        settings: WorldSettings,
        policy: SnapshotPolicy,
        bytes: &[u8],
    ) -> Result<Self, SnapshotError> {
        let (mut world, registry) = Self::build(&plugin, settings);
        snapshot::restore(bytes, &mut world, &registry)?;
        Ok(Self::assemble(world, plugin, registry, settings, policy))
    }

    fn assemble(
        world: World,
        plugin: Arc<dyn ModelPlugin>,
        registry: ModelRegistry,
        settings: WorldSettings,
        policy: SnapshotPolicy,
    ) -> Self {
        Self {
            world,
            plugin,
            registry: Arc::new(registry),
            settings,
            policy,
            points: Vec::new(),
            problems: Vec::new(),
            persist_requests: Vec::new(),
            reported: BTreeSet::new(),
        }
    }

    /// Starts a model fresh, outside any session (tools, replays, benchmarks).
    pub fn start_fresh(model: impl ModelPlugin, options: RuntimeOptions) -> Self {
        let settings = WorldSettings { step_ms: options.step_ms, seed: options.seed };
        Self::fresh(Arc::new(model), settings, options.snapshot_policy, None)
    }

    /// Restores a model from a snapshot, outside any session.
    pub fn from_snapshot(
        model: impl ModelPlugin,
        options: RuntimeOptions,
        bytes: &[u8],
    ) -> Result<Self, SnapshotError> {
        let settings = WorldSettings { step_ms: options.step_ms, seed: options.seed };
        Self::restore(Arc::new(model), settings, options.snapshot_policy, bytes)
    }

    /// Runs the model's own messages (steps, timers) up to `time`, as a heartbeat tick does.
    pub fn advance(&mut self, time: u64) {
        self.advance_to(time);
    }

    /// Executes a view event as if the reflector had stamped it with `time` and `seq`.
    pub fn execute_view_event<T: serde::Serialize + 'static>(
        &mut self,
        time: u64,
        seq: u32,
        sender: ViewId,
        event: &T,
    ) -> Result<(), RuntimeError> {
        let index = self
            .registry
            .view_events
            .iter()
            .position(|e| e.type_id == std::any::TypeId::of::<T>())
            .ok_or(RuntimeError::Unregistered(std::any::type_name::<T>()))?;
        let mut plaintext = (index as u16).to_le_bytes().to_vec();
        postcard::to_io(event, &mut plaintext).map_err(|_| RuntimeError::Unregistered(std::any::type_name::<T>()))?;
        self.execute(External { time, seq, body: ExternalBody::View { sender, sent: None, plaintext } })
    }

    /// Executes a join/leave notice as if the reflector had stamped it with `time` and `seq`.
    pub fn execute_users(
        &mut self,
        time: u64,
        seq: u32,
        joined: Vec<ViewId>,
        left: Vec<ViewId>,
    ) -> Result<(), RuntimeError> {
        self.execute(External { time, seq, body: ExternalBody::Users { joined, left, reset: false } })
    }

    /// The model world, read-only.
    pub fn world(&self) -> &World {
        &self.world
    }

    /// Model time in ms.
    pub fn now_ms(&self) -> u64 {
        self.world.resource::<ModelTime>().now_ms
    }

    /// The last external sequence number executed.
    pub fn last_seq(&self) -> u32 {
        self.world.resource::<SnapshotBook>().last_external_seq
    }

    /// The views the model knows.
    pub fn views(&self) -> &ModelViews {
        self.world.resource::<ModelViews>()
    }

    /// Encodes the current state canonically (without rebuilding).
    pub fn capture(&mut self) -> Result<Vec<u8>, SnapshotError> {
        snapshot::capture(&mut self.world, &self.registry)
    }

    /// The hash of the current state.
    pub fn state_hash(&mut self) -> Result<Hash32, SnapshotError> {
        self.capture().map(|bytes| snapshot::state_hash(&bytes))
    }

    /// Takes the model → view messages produced so far.
    pub(crate) fn take_view_messages(&mut self) -> Vec<(u16, Box<dyn std::any::Any + Send + Sync>)> {
        std::mem::take(&mut self.world.resource_mut::<ViewOutbox>().messages)
    }

    /// Delivers a model → view message into the app's world.
    pub(crate) fn deliver_view_message(
        &self,
        app_world: &mut World,
        index: u16,
        message: Box<dyn std::any::Any + Send + Sync>,
    ) {
        if let Some(entry) = self.registry.view_messages.get(usize::from(index)) {
            (entry.deliver)(app_world, message);
        }
    }

    /// Runs every future message due up to `time`, then sets model time to `time`.
    pub(crate) fn advance_to(&mut self, time: u64) {
        while let Some(message) = self.world.resource_mut::<FutureQueue>().pop_due(time) {
            self.set_time(message.time);
            match message.kind {
                FutureKind::Step => {
                    let step_ms = u64::from(self.settings.step_ms);
                    self.world.resource_mut::<FutureQueue>().push(message.time + step_ms, FutureKind::Step);
                    self.world.run_schedule(ModelUpdate);
                    self.world.resource_mut::<ModelTime>().steps += 1;
                }
                FutureKind::Timer { event, payload } => {
                    let registry = self.registry.clone();
                    let outcome = match registry.timers.get(usize::from(event)) {
                        Some(entry) => {
                            (entry.trigger)(&mut self.world, &payload).map_err(|e| format!("{}: {e}", entry.name))
                        }
                        None => Err(format!("unknown timer event #{event}")),
                    };
                    if let Err(reason) = outcome {
                        self.problems.push(ModelProblem::BadTimer(reason));
                    }
                }
                FutureKind::PersistFlush => super::persist::flush(&mut self.world),
            }
            self.world.flush();
            self.after_message();
        }
        if time > self.now_ms() {
            self.set_time(time);
        }
    }

    /// Executes one external message: first every future message due by its time, then it.
    pub(crate) fn execute(&mut self, external: External) -> Result<(), RuntimeError> {
        let expected = self.last_seq().wrapping_add(1);
        if external.seq != expected {
            return Err(RuntimeError::Gap { expected, got: external.seq });
        }
        if external.time < self.now_ms() {
            return Err(RuntimeError::TimeWentBack { now: self.now_ms(), got: external.time });
        }
        self.advance_to(external.time);
        {
            let mut book = self.world.resource_mut::<SnapshotBook>();
            book.last_external_seq = external.seq;
            book.externals_since += 1;
        }
        match external.body {
            ExternalBody::View { sender, sent, plaintext } => {
                self.note_sent(sender, sent);
                self.view_event(sender, &plaintext)
            }
            ExternalBody::Unopenable { sender, sent, reason } => {
                self.note_sent(sender, sent);
                self.problems.push(ModelProblem::BadViewEvent { sender, reason })
            }
            ExternalBody::Users { joined, left, reset } => self.users(joined, left, reset),
            ExternalBody::SnapshotRequest => self.world.resource_mut::<SnapshotBook>().requested = true,
        }
        self.world.flush();
        self.after_message();
        Ok(())
    }

    fn set_time(&mut self, time: u64) {
        self.world.resource_mut::<ModelTime>().now_ms = time;
    }

    fn note_sent(&mut self, sender: ViewId, sent: Option<SentId>) {
        if let Some(id) = sent {
            self.world.resource_mut::<ModelViews>().sent.insert(sender, id);
        }
    }

    fn view_event(&mut self, sender: ViewId, plaintext: &[u8]) {
        let registry = self.registry.clone();
        let outcome = match plaintext {
            [0xFF, 0xFF, payload @ ..] => match postcard::from_bytes::<Vec<serde_bytes::ByteBuf>>(payload) {
                // A bundle: the events one view published faster than its send rate, in order.
                Ok(events) => {
                    for event in events.iter().filter(|e| !e.starts_with(&[0xFF, 0xFF])) {
                        self.view_event(sender, event);
                        self.world.flush();
                    }
                    Ok(())
                }
                Err(e) => Err(format!("bad bundle: {e}")),
            },
            [lo, hi, payload @ ..] => {
                let index = u16::from_le_bytes([*lo, *hi]);
                match registry.view_events.get(usize::from(index)) {
                    Some(entry) => {
                        (entry.trigger)(&mut self.world, sender, payload).map_err(|e| format!("{}: {e}", entry.name))
                    }
                    None => Err(format!("unknown view event type #{index}")),
                }
            }
            _ => Err("empty event".to_string()),
        };
        if let Err(reason) = outcome {
            self.problems.push(ModelProblem::BadViewEvent { sender, reason });
        }
    }

    fn users(&mut self, joined: Vec<ViewId>, left: Vec<ViewId>, reset: bool) {
        let mut exits: Vec<ViewId> = left;
        if reset {
            let stale = self.world.resource::<ModelViews>().views.iter().filter(|v| !joined.contains(v)).copied();
            exits.extend(stale.collect::<Vec<_>>());
        }
        for view in exits {
            let mut views = self.world.resource_mut::<ModelViews>();
            views.sent.remove(&view);
            if views.views.remove(&view) {
                self.world.trigger(ViewExited { view });
                self.world.flush();
            }
        }
        for view in joined {
            if self.world.resource_mut::<ModelViews>().views.insert(view) {
                self.world.trigger(ViewJoined { view });
                self.world.flush();
            }
        }
    }

    fn collect_persist_requests(&mut self) {
        let requests = std::mem::take(&mut self.world.resource_mut::<PersistOutbox>().0);
        self.persist_requests.extend(requests);
    }

    fn after_message(&mut self) {
        self.collect_persist_requests();
        let now = self.now_ms();
        let book = self.world.resource::<SnapshotBook>();
        let due = book.requested
            || now.saturating_sub(book.last_snapshot_time) >= self.policy.every_ms
            || book.externals_since >= self.policy.every_events;
        if due {
            self.snapshot_point();
        }
    }

    /// A snapshot point: encode, hash, and rebuild the world from the encoding.
    fn snapshot_point(&mut self) {
        let now = self.now_ms();
        {
            let mut book = self.world.resource_mut::<SnapshotBook>();
            book.last_snapshot_time = now;
            book.externals_since = 0;
            book.requested = false;
        }
        self.check_untracked_state();
        let (bytes, parts) = match snapshot::capture_with_parts(&mut self.world, &self.registry) {
            Ok(captured) => captured,
            Err(error) => {
                self.problems.push(ModelProblem::SnapshotFailed(error.to_string()));
                return;
            }
        };
        let hash = snapshot::state_hash(&bytes);
        // Carry the undelivered view messages over the rebuild.
        let pending = self.take_view_messages();
        let (mut world, registry) = Self::build(&self.plugin, self.settings);
        match snapshot::restore(&bytes, &mut world, &registry) {
            Ok(()) => {
                self.world = world;
                self.world.resource_mut::<ViewOutbox>().messages = pending;
            }
            Err(error) => {
                // Encoding and decoding disagree: a bug in a registered type's serde impls.
                self.problems.push(ModelProblem::SnapshotFailed(format!("the snapshot does not restore: {error}")));
                self.world.resource_mut::<ViewOutbox>().messages = pending;
                return;
            }
        }
        let seq = self.last_seq();
        self.points.push(SnapshotPoint { time: now, seq, hash, bytes: Arc::new(bytes), parts });
    }

    /// Reports model state that the snapshot cannot carry (once per kind).
    ///
    /// Internal entities (resources, observers, registered systems: see
    /// [`snapshot::ModelInternal`]) are never model entities; registered components found on one
    /// are reported as [`ModelProblem::ModelComponentsOnInternalEntities`], not as model entities
    /// with unregistered (Bevy-internal) components.
    fn check_untracked_state(&mut self) {
        use bevy::ecs::resource::IS_RESOURCE;
        let components = self.world.components();
        let model_id = components.component_id::<ModelId>();
        let internal_marker = components.component_id::<snapshot::ModelInternal>();
        let registered: Vec<_> = self.registry.components.iter().filter_map(|c| components.get_id(c.type_id)).collect();
        // Targets of registered relationships (`Children` for `ChildOf`) are rebuilt from them.
        let derived: Vec<_> = self
            .registry
            .components
            .iter()
            .filter(|c| c.relationship)
            .filter_map(|c| snapshot::relationship_target(&self.world, components.get_id(c.type_id)))
            .map(|(target, _)| target)
            .collect();
        let name = |id| components.get_name(id).map(|n| n.to_string()).unwrap_or_else(|| format!("{id:?}"));
        let mut unregistered = BTreeSet::new();
        let mut untracked = BTreeSet::new();
        let mut on_internal = BTreeSet::new();
        for archetype in self.world.archetypes().iter().filter(|a| !a.is_empty()) {
            let names = || archetype.iter_components().filter_map(|id| components.get_name(id)).map(|n| n.to_string());
            let is_resource = archetype.contains(IS_RESOURCE);
            if is_resource || internal_marker.is_some_and(|id| archetype.contains(id)) {
                let model: Vec<String> =
                    archetype.iter_components().filter(|id| registered.contains(id)).map(name).collect();
                if !model.is_empty() {
                    let what = if is_resource {
                        let own = archetype
                            .iter_components()
                            .filter(|&id| id != IS_RESOURCE && Some(id) != model_id && !registered.contains(&id))
                            .map(name)
                            .collect::<Vec<_>>()
                            .join(", ");
                        format!("the entity of the resource {own}")
                    } else {
                        let own = archetype
                            .iter_components()
                            .filter(|&id| Some(id) != model_id && !registered.contains(&id))
                            .map(name)
                            .collect::<Vec<_>>()
                            .join(", ");
                        format!("an internal entity ({own})")
                    };
                    on_internal.insert(format!("{} on {what}", model.join(", ")));
                }
            } else if model_id.is_some_and(|id| archetype.contains(id)) {
                for id in archetype.iter_components() {
                    if Some(id) != model_id
                        && !registered.contains(&id)
                        && !derived.contains(&id)
                        && let Some(name) = components.get_name(id)
                    {
                        unregistered.insert(name.to_string());
                    }
                }
            } else if names().all(|n| !n.starts_with("bevy_ecs::")) {
                untracked.insert(names().collect::<Vec<_>>().join(", "));
            }
        }
        let unregistered: Vec<_> = unregistered.into_iter().filter(|n| self.reported.insert(n.clone())).collect();
        if !unregistered.is_empty() {
            self.problems.push(ModelProblem::UnregisteredComponents(unregistered));
        }
        let untracked: Vec<_> = untracked.into_iter().filter(|n| self.reported.insert(n.clone())).collect();
        if !untracked.is_empty() {
            self.problems.push(ModelProblem::UntrackedEntities(untracked));
        }
        let on_internal: Vec<_> = on_internal.into_iter().filter(|n| self.reported.insert(n.clone())).collect();
        if !on_internal.is_empty() {
            self.problems.push(ModelProblem::ModelComponentsOnInternalEntities(on_internal));
        }
        let resources: Vec<_> = super::lint::unregistered_resources(&self.world, &self.registry)
            .into_iter()
            .filter(|n| self.reported.insert(n.clone()))
            .collect();
        if !resources.is_empty() {
            self.problems.push(ModelProblem::UnregisteredResources(resources));
        }
    }

    /// The world and the registry together, to encode or compare the state part by part (the
    /// shadow replica, reload reports).
    pub(crate) fn world_and_registry(&mut self) -> (&mut World, &ModelRegistry) {
        (&mut self.world, &self.registry)
    }
}
