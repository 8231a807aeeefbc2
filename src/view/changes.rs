//! The change feed: which model entities appeared, went away or changed since the view's last
//! frame, as Bevy messages.
//!
//! The model world is rebuilt from its canonical snapshot at every snapshot point, which
//! renumbers its entities and resets Bevy's change ticks, so neither `Entity` nor `Changed<T>`
//! can say what changed across frames. The feed compares by value instead: for each model
//! entity, keyed by its [`ModelId`], it keeps a 64-bit digest of the encoding of each registered
//! component, and each frame compares the model against what it kept. A rebuild changes no value,
//! so it shows up as nothing at all.
//!
//! The feed is opt-in ([`ModelChangesPlugin`]): it encodes every registered component of every
//! model entity once per frame (roughly 0.1–0.2 µs per component; see `benches/change_feed.rs`).
//!
//! What a frame reports, once the client is synced (nothing is written while it is not):
//!
//! * [`ModelEntityDespawned`], then [`ModelEntitySpawned`], then [`ModelEntityChanged`], each in
//!   ascending [`ModelId`] order, so every replica writes the same messages for the same change.
//! * The first synced frame of a session — a late joiner's, or anyone's after a join from the
//!   menu — reports every entity of the model as spawned. Frames spent syncing (a late join, a
//!   resync) are summed up into the first synced frame after them.
//! * Leaving or switching sessions reports every entity known as despawned.
//! * A change is reported once per frame however many times the model made it; a value changed
//!   and changed back within one frame is no change.

use bevy::platform::collections::HashMap;
use bevy::platform::hash::FixedHasher;
use bevy::prelude::*;
use std::any::type_name;
use std::hash::BuildHasher;

use crate::client::{ModelWorld, SessionIds};
use crate::model::ModelId;
use crate::plugin::SynqSystems;
use crate::status::{SynqConnection, SynqStatus};

/// A model entity appeared (see the [module documentation](self)).
#[derive(Message, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ModelEntitySpawned(pub ModelId);

/// A model entity went away (see the [module documentation](self)).
#[derive(Message, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ModelEntityDespawned(pub ModelId);

/// Registered components of a model entity changed value, or were added or removed (see the
/// [module documentation](self)).
#[derive(Message, Clone, Debug, PartialEq, Eq)]
pub struct ModelEntityChanged {
    /// The entity.
    pub id: ModelId,
    /// The type names (`std::any::type_name`) of the components that changed, in registration
    /// order.
    pub components: Vec<&'static str>,
}

impl ModelEntityChanged {
    /// Whether component `T` is among those that changed.
    pub fn contains<T: Component>(&self) -> bool {
        self.components.contains(&type_name::<T>())
    }
}

/// Adds the change feed: [`ModelEntitySpawned`], [`ModelEntityDespawned`] and
/// [`ModelEntityChanged`] messages, written in `PreUpdate` after [`SynqSystems::Simulate`]
/// (in [`ModelChangesSystems`]), so view systems in `Update` read them with a `MessageReader`.
///
/// ```no_run
/// # use bevy::prelude::*;
/// # use bevy_synq::prelude::*;
/// fn labels(mut spawned: MessageReader<ModelEntitySpawned>, mut gone: MessageReader<ModelEntityDespawned>) {
///     for ModelEntitySpawned(id) in spawned.read() { /* spawn a label for `id` */ }
///     for ModelEntityDespawned(id) in gone.read() { /* despawn it */ }
/// }
/// # let mut app = App::new();
/// app.add_plugins(ModelChangesPlugin).add_systems(Update, labels);
/// ```
pub struct ModelChangesPlugin;

/// The system set that writes the change feed (in `PreUpdate`, after [`SynqSystems::Simulate`]).
#[derive(SystemSet, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ModelChangesSystems;

impl Plugin for ModelChangesPlugin {
    fn build(&self, app: &mut App) {
        app.init_resource::<ChangeTracker>()
            .add_message::<ModelEntitySpawned>()
            .add_message::<ModelEntityDespawned>()
            .add_message::<ModelEntityChanged>()
            .configure_sets(PreUpdate, ModelChangesSystems.after(SynqSystems::Simulate))
            .add_systems(PreUpdate, track_model_changes.in_set(ModelChangesSystems));
    }
}

/// What the view saw of one entity.
struct Seen {
    /// The frame that last saw it.
    frame: u32,
    /// A digest per registered component (0: absent).
    digests: Box<[u64]>,
}

/// What the view saw last frame, by [`ModelId`].
#[derive(Resource, Default)]
pub struct ChangeTracker {
    session: Option<SessionIds>,
    seen: HashMap<ModelId, Seen>,
    frame: u32,
    scratch: Vec<u8>,
}

/// One frame's changes, each list in ascending id order.
#[derive(Default, Debug, PartialEq, Eq)]
pub struct FrameChanges {
    /// Entities that went away.
    pub despawned: Vec<ModelId>,
    /// Entities that appeared.
    pub spawned: Vec<ModelId>,
    /// Entities whose components changed, with the names of those components.
    pub changed: Vec<(ModelId, Vec<&'static str>)>,
}

impl ChangeTracker {
    /// Forgets everything, reporting every entity seen as despawned.
    fn forget(&mut self, changes: &mut FrameChanges) {
        changes.despawned.extend(self.seen.drain().map(|(id, _)| id));
        changes.despawned.sort_unstable();
    }

    /// Compares a runtime's model with what was seen, and remembers it (benchmarks, tools).
    #[doc(hidden)]
    pub fn diff_runtime(&mut self, runtime: &mut crate::model::ModelRuntime) -> FrameChanges {
        let (world, registry) = runtime.world_and_registry();
        self.diff(world, registry)
    }

    /// Compares `world` with what was seen, and remembers it.
    pub(crate) fn diff(&mut self, world: &World, registry: &crate::model::registry::ModelRegistry) -> FrameChanges {
        let mut changes = FrameChanges::default();
        self.frame = self.frame.wrapping_add(1);
        let frame = self.frame;
        let Some(state) = world.try_query::<(EntityRef, &ModelId)>() else {
            self.forget(&mut changes);
            return changes;
        };
        let count = registry.components.len();
        let mut digests = vec![0u64; count];
        for (entity, id) in state.iter_manual(world) {
            for (entry, digest) in registry.components.iter().zip(digests.iter_mut()) {
                self.scratch.clear();
                *digest = match (entry.encode)(&entity, &mut self.scratch) {
                    Ok(true) => FixedHasher.hash_one(&self.scratch[..]).max(1),
                    // Absent, or not encodable (the snapshot reports that).
                    _ => 0,
                };
            }
            match self.seen.get_mut(id) {
                Some(seen) if seen.digests.len() == count => {
                    seen.frame = frame;
                    if *seen.digests != *digests {
                        let names = registry
                            .components
                            .iter()
                            .zip(seen.digests.iter().zip(&digests))
                            .filter(|(_, (old, new))| old != new)
                            .map(|(entry, _)| entry.name)
                            .collect();
                        seen.digests.copy_from_slice(&digests);
                        changes.changed.push((*id, names));
                    }
                }
                _ => {
                    self.seen.insert(*id, Seen { frame, digests: digests.clone().into_boxed_slice() });
                    changes.spawned.push(*id);
                }
            }
        }
        self.seen.retain(|id, seen| {
            let keep = seen.frame == frame;
            if !keep {
                changes.despawned.push(*id);
            }
            keep
        });
        changes.despawned.sort_unstable();
        changes.spawned.sort_unstable();
        changes.changed.sort_unstable_by_key(|(id, _)| *id);
        changes
    }
}

/// Writes the change feed for this frame.
fn track_model_changes(
    model: Option<ResMut<ModelWorld>>,
    status: Option<Res<SynqStatus>>,
    connection: Option<Res<SynqConnection>>,
    mut tracker: ResMut<ChangeTracker>,
    mut spawned: MessageWriter<ModelEntitySpawned>,
    mut despawned: MessageWriter<ModelEntityDespawned>,
    mut changed: MessageWriter<ModelEntityChanged>,
) {
    // Without a `SynqPlugin` there is nothing to report.
    let (Some(mut model), Some(status), Some(connection)) = (model, status, connection) else { return };
    let mut changes = FrameChanges::default();
    let model = model.bypass_change_detection();
    let runtime = model.runtime.as_mut();
    if runtime.is_none() || tracker.session != connection.session {
        // Out of a session, or in another one: the ids seen named other things.
        tracker.forget(&mut changes);
        tracker.session = connection.session;
    }
    if let Some(runtime) = runtime
        && status.is_synced()
    {
        let (world, registry) = runtime.world_and_registry();
        let more = tracker.diff(world, registry);
        changes.despawned.extend(more.despawned);
        changes.spawned = more.spawned;
        changes.changed = more.changed;
    }
    despawned.write_batch(changes.despawned.into_iter().map(ModelEntityDespawned));
    spawned.write_batch(changes.spawned.into_iter().map(ModelEntitySpawned));
    changed.write_batch(changes.changed.into_iter().map(|(id, components)| ModelEntityChanged { id, components }));
}
