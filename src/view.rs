//! The view side: reading the model from ordinary Bevy systems, and publishing events to it.
//!
//! View systems are normal systems of the app. They read the model through [`Model`] and
//! [`ModelQuery`], which only ever hand out shared references (`ReadOnlyQueryData`): a view
//! cannot change the model — the compiler refuses it. Views influence the model only by
//! publishing events with [`Publish`], which travel through the reflector to every replica.
//!
//! To learn which model entities appeared, went away or changed since the last frame, add
//! [`ModelChangesPlugin`] and read its messages ([`changes`]).

pub mod changes;

pub use changes::{
    ModelChangesPlugin, ModelChangesSystems, ModelEntityChanged, ModelEntityDespawned, ModelEntitySpawned,
};

use bevy::ecs::query::{QueryData, QueryFilter, QueryState, ReadOnlyQueryData};
use bevy::ecs::system::{Deferred, SystemBuffer, SystemMeta, SystemParam};
use bevy::ecs::world::DeferredWorld;
use bevy::ecs::world::WorldId;
use bevy::prelude::*;
use serde::Serialize;
use std::marker::PhantomData;
use tracing::error;

use crate::client::{ModelWorld, Outbox};
use crate::model::{ModelEntities, ModelId, ModelTime, ModelViews};

/// Read-only access to this replica's model world from a view system.
///
/// ```
/// # use bevy::prelude::*;
/// # use bevy_synq::prelude::*;
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Resource, Serialize, Deserialize)] struct Score(u32);
/// fn hud(model: Model) {
///     if let Some(score) = model.resource::<Score>() {
///         info!("score {} at {} ms", score.0, model.now_ms());
///     }
/// }
/// ```
#[derive(SystemParam)]
pub struct Model<'w> {
    model: Res<'w, ModelWorld>,
}

impl Model<'_> {
    /// The model world, once the session has started (`None` before the first sync).
    pub fn world(&self) -> Option<&World> {
        self.model.runtime.as_ref().map(|r| r.world())
    }

    /// A model resource.
    pub fn resource<T: Resource>(&self) -> Option<&T> {
        self.world()?.get_resource::<T>()
    }

    /// A component of a model entity.
    pub fn get<T: Component>(&self, entity: Entity) -> Option<&T> {
        self.world()?.get::<T>(entity)
    }

    /// A component of the model entity with this id.
    pub fn get_by_id<T: Component>(&self, id: ModelId) -> Option<&T> {
        self.get::<T>(self.entity(id)?)
    }

    /// The current `Entity` of a model entity (they change at snapshot points; ids do not).
    pub fn entity(&self, id: ModelId) -> Option<Entity> {
        self.resource::<ModelEntities>()?.get(id)
    }

    /// Model time in ms (0 before the session started).
    pub fn now_ms(&self) -> u64 {
        self.resource::<ModelTime>().map_or(0, |t| t.now_ms())
    }

    /// The views in the session, as the model knows them.
    pub fn views(&self) -> Option<&ModelViews> {
        self.resource::<ModelViews>()
    }

    /// Whether the model has started (restored or initialised).
    pub fn is_running(&self) -> bool {
        self.model.runtime.is_some()
    }
}

/// A cached query over the model world.
pub struct ModelQueryCache<D: QueryData + 'static, F: QueryFilter + 'static> {
    state: Option<(WorldId, QueryState<D, F>)>,
}

impl<D: QueryData + 'static, F: QueryFilter + 'static> Default for ModelQueryCache<D, F> {
    fn default() -> Self {
        Self { state: None }
    }
}

/// A read-only query over the model world, for view systems: `ModelQuery<(&Ship, &Position)>`.
///
/// Views cannot change the model: a mutable query does not compile.
///
/// ```compile_fail
/// # use bevy::prelude::*;
/// # use bevy_synq::prelude::*;
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Component, Serialize, Deserialize)] struct Position(f32, f32);
/// fn cheat(mut positions: ModelQuery<&mut Position>) {} // `&mut Position` is not read-only
/// ```
///
/// Call [`ModelQuery::try_query`] for a Bevy `Query` with all its methods, or use the shortcuts.
/// Model entities are renumbered at snapshot points; identify them across frames by [`ModelId`]
/// ([`ModelQuery::get_by_id`]).
///
/// **Change detection does not work here.** The model world is rebuilt at every snapshot point
/// (which resets its change ticks) and a `ModelQuery` keeps no tick of the frames it saw, so
/// `Changed<T>`, `Added<T>` and `Ref::is_changed` do not tell what changed since the view's last
/// frame (they match everything, or at least far too much). Use the change feed instead:
/// [`ModelChangesPlugin`] and its [`ModelEntityChanged`], [`ModelEntitySpawned`] and
/// [`ModelEntityDespawned`] messages.
///
/// ```
/// # use bevy::prelude::*;
/// # use bevy_synq::prelude::*;
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Component, Serialize, Deserialize)] struct Position(Vec2);
/// fn draw(mut positions: ModelQuery<(&ModelId, &Position)>) {
///     for (id, position) in positions.iter() {
///         # let _ = (id, position);
///     }
/// }
/// ```
#[derive(SystemParam)]
pub struct ModelQuery<'w, 's, D: ReadOnlyQueryData + 'static, F: QueryFilter + 'static = ()> {
    model: Res<'w, ModelWorld>,
    cache: Local<'s, ModelQueryCache<D, F>>,
    marker: PhantomData<fn() -> (D, F)>,
}

impl<D: ReadOnlyQueryData + 'static, F: QueryFilter + 'static> ModelQuery<'_, '_, D, F> {
    /// The query, or `None` before the session started.
    pub fn try_query(&mut self) -> Option<Query<'_, '_, D, F>> {
        let world = self.model.runtime.as_ref()?.world();
        let cache = &mut self.cache.state;
        if cache.as_ref().is_none_or(|(id, _)| *id != world.id()) {
            *cache = Some((world.id(), QueryState::<D, F>::try_new(world)?));
        }
        let (_, state) = cache.as_mut()?;
        state.update_archetypes(world);
        Some(state.query_manual(world))
    }

    /// Iterates the query's items; empty before the session started.
    pub fn iter(&mut self) -> impl Iterator<Item = D::Item<'_, '_>> {
        self.try_query().into_iter().flat_map(|query| query.into_iter())
    }

    /// The item of one model entity, if it matches.
    pub fn get(&mut self, entity: Entity) -> Option<D::Item<'_, '_>> {
        self.try_query()?.get_inner(entity).ok()
    }

    /// The item of the model entity with this id, if it exists and matches.
    pub fn get_by_id(&mut self, id: ModelId) -> Option<D::Item<'_, '_>> {
        let entity = self.model.runtime.as_ref()?.world().get_resource::<ModelEntities>()?.get(id)?;
        self.get(entity)
    }

    /// The only matching item, if there is exactly one.
    pub fn single(&mut self) -> Option<D::Item<'_, '_>> {
        self.try_query()?.single_inner().ok()
    }

    /// Number of matching model entities.
    pub fn count(&mut self) -> usize {
        self.try_query().map_or(0, |query| query.iter().count())
    }
}

/// Publishes view → model events of type `T` from a view system.
///
/// The event is sealed with the session key, stamped by the reflector and triggered as
/// [`FromView<T>`](crate::FromView) in the model world of every replica at the same model time.
/// Register `T` in the model with
/// [`ModelApp::add_view_event`](crate::ModelApp::add_view_event). A system may publish several
/// event types (each `Publish<T>` buffers its own events until the system's commands apply).
#[derive(SystemParam)]
pub struct Publish<'s, T: Serialize + Send + Sync + 'static> {
    buffer: Deferred<'s, PublishBuffer<T>>,
}

impl<T: Serialize + Send + Sync + 'static> Publish<'_, T> {
    /// Publishes an event to the model.
    pub fn send(&mut self, event: T) {
        self.buffer.events.push(event);
    }
}

/// The events one `Publish<T>` parameter collected, moved to the [`Outbox`] when the system's
/// deferred work is applied.
pub struct PublishBuffer<T> {
    events: Vec<T>,
}

impl<T> Default for PublishBuffer<T> {
    fn default() -> Self {
        Self { events: Vec::new() }
    }
}

impl<T: Serialize + Send + Sync + 'static> SystemBuffer for PublishBuffer<T> {
    fn queue(&mut self, _system_meta: &SystemMeta, mut world: DeferredWorld) {
        if self.events.is_empty() {
            return;
        }
        match world.get_resource_mut::<Outbox>() {
            Some(mut outbox) => {
                for event in self.events.drain(..) {
                    outbox.push(&event);
                }
            }
            None => {
                error!("bevy_synq: events published without a SynqPlugin; dropped");
                self.events.clear();
            }
        }
    }
}
