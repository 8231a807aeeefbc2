//! Stable identities of model entities.
//!
//! `Entity` ids are not stable in a replicated model: every replica rebuilds its model world from
//! the canonical snapshot at each snapshot point, which renumbers entities. Every model entity
//! therefore carries a [`ModelId`], handed out by a counter that is part of the snapshot. Views
//! and events refer to model entities by `ModelId`; [`ModelEntities`] finds the current `Entity`.
//! Inside the model, components and resources may hold `Entity` values that Bevy's entity
//! mapping reaches (`#[entities]` fields, `ChildOf`): the rebuild maps them.

use bevy::ecs::lifecycle::HookContext;
use bevy::ecs::world::DeferredWorld;
use bevy::platform::collections::HashMap;
use bevy::prelude::*;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The stable id of a model entity. Added automatically to every entity that has a registered
/// model component; the same on every replica and across snapshots.
#[derive(Component, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[component(on_add = model_id_added, on_remove = model_id_removed)]
pub struct ModelId(pub(crate) u64);

impl ModelId {
    /// The raw value (never 0 for an entity of a model world).
    pub fn get(self) -> u64 {
        self.0
    }

    /// Builds an id from its raw value, e.g. one carried in an event.
    pub fn from_raw(raw: u64) -> Self {
        Self(raw)
    }
}

impl fmt::Debug for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModelId({})", self.0)
    }
}

impl fmt::Display for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "M{}", self.0)
    }
}

/// Hands out [`ModelId`]s. Part of the snapshot.
#[derive(Resource, Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct ModelIdAllocator {
    pub next: u64,
}

impl Default for ModelIdAllocator {
    fn default() -> Self {
        Self { next: 1 }
    }
}

/// Finds the current `Entity` of a [`ModelId`] in the model world.
///
/// Derived from the entities themselves (not part of the snapshot), so it can never disagree with
/// them.
#[derive(Resource, Default, Debug)]
pub struct ModelEntities {
    map: HashMap<ModelId, Entity>,
}

impl ModelEntities {
    /// The entity with this id, if it exists.
    pub fn get(&self, id: ModelId) -> Option<Entity> {
        self.map.get(&id).copied()
    }

    /// Number of model entities.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the model has no entities.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

fn model_id_added(mut world: DeferredWorld, context: HookContext) {
    let Some(current) = world.get::<ModelId>(context.entity).copied() else { return };
    let id = if current.0 == 0 {
        let Some(mut allocator) = world.get_resource_mut::<ModelIdAllocator>() else { return };
        let id = ModelId(allocator.next);
        allocator.next += 1;
        if let Some(mut component) = world.get_mut::<ModelId>(context.entity) {
            *component = id;
        }
        id
    } else {
        current
    };
    if let Some(mut index) = world.get_resource_mut::<ModelEntities>() {
        index.map.insert(id, context.entity);
    }
}

fn model_id_removed(mut world: DeferredWorld, context: HookContext) {
    let Some(id) = world.get::<ModelId>(context.entity).copied() else { return };
    if let Some(mut index) = world.get_resource_mut::<ModelEntities>() {
        index.map.remove(&id);
    }
}
