//! `Entity` values in model state, through a snapshot and back.
//!
//! A snapshot never carries an `Entity` as the model world numbered it: that number depends on the
//! world's allocation history, and the rebuild numbers entities afresh. Each `Entity` that a
//! registered component or resource exposes to Bevy's entity mapping (`#[entities]` fields,
//! `#[component(map_entities)]`, relationships such as `ChildOf`) is written in a canonical form
//! instead, with Bevy's [`EntityMapper`]:
//!
//! * a model entity of the snapshot as its position in the snapshot's entity order (entities
//!   sorted by [`ModelId`]): `Entity::from_raw_u32(position)`;
//! * anything else — a despawned entity, [`Entity::PLACEHOLDER`], an internal entity (resource,
//!   observer) — as "dangling number k": `Entity::from_raw_u32(count + k)`, where `k` numbers the
//!   distinct such entities in the order the capture meets them, so references that were equal
//!   stay equal in the bytes.
//!
//! The rebuild allocates every entity of the snapshot before it decodes the first value, so a
//! reference to an entity further on in the order maps as well as one before. A dangling
//! reference is restored as [`Entity::PLACEHOLDER`].

use bevy::ecs::entity::{EntityHashMap, EntityMapper};
use bevy::prelude::*;

use super::ids::ModelId;

/// The canonical form of the `position`-th entity (or dangling number `position - count`).
fn canonical(position: usize) -> Entity {
    // Positions stay far below `u32::MAX` (entities of one world, and distinct references).
    u32::try_from(position).ok().and_then(Entity::from_raw_u32).unwrap_or(Entity::PLACEHOLDER)
}

/// Maps `Entity` values to their canonical form while a world is captured, and back.
///
/// Capture maps each value in place, encodes it and maps it back ([`CaptureMapper::original`]):
/// both directions are exact (a bijection), so the live world is left as it was.
pub(crate) struct CaptureMapper<'w> {
    world: &'w World,
    /// The model entities in snapshot order (sorted by `ModelId`).
    entities: &'w [(ModelId, Entity)],
    /// The dangling entities met so far, in order, and where each is in that list.
    dangling: Vec<Entity>,
    dangling_index: EntityHashMap<usize>,
}

impl<'w> CaptureMapper<'w> {
    pub(crate) fn new(world: &'w World, entities: &'w [(ModelId, Entity)]) -> Self {
        Self { world, entities, dangling: Vec::new(), dangling_index: EntityHashMap::default() }
    }

    /// The canonical form of `entity`.
    pub(crate) fn canonical(&mut self, entity: Entity) -> Entity {
        if let Some(id) = self.world.get::<ModelId>(entity)
            && let Ok(position) = self.entities.binary_search_by_key(id, |(id, _)| *id)
            && self.entities[position].1 == entity
        {
            return canonical(position);
        }
        let next = self.dangling.len();
        let k = *self.dangling_index.entry(entity).or_insert(next);
        if k == next {
            self.dangling.push(entity);
        }
        canonical(self.entities.len() + k)
    }

    /// The mapper that turns canonical forms back into the entities they stand for.
    pub(crate) fn original(&mut self) -> Original<'_, 'w> {
        Original(self)
    }
}

impl EntityMapper for CaptureMapper<'_> {
    fn get_mapped(&mut self, source: Entity) -> Entity {
        self.canonical(source)
    }

    /// Capture only maps values, it never declares mappings.
    fn set_mapped(&mut self, _source: Entity, _target: Entity) {}
}

/// Maps canonical forms back to the live world's entities (see [`CaptureMapper::original`]).
pub(crate) struct Original<'m, 'w>(&'m mut CaptureMapper<'w>);

impl EntityMapper for Original<'_, '_> {
    fn get_mapped(&mut self, source: Entity) -> Entity {
        let position = source.index_u32() as usize;
        let entities = self.0.entities;
        match entities.get(position) {
            Some((_, entity)) => *entity,
            None => self.0.dangling.get(position - entities.len()).copied().unwrap_or(Entity::PLACEHOLDER),
        }
    }

    fn set_mapped(&mut self, _source: Entity, _target: Entity) {}
}

/// Maps canonical forms to the entities of a world being rebuilt: the `position`-th entity of
/// the snapshot, allocated before any value is decoded; anything else (dangling, or not a
/// canonical form at all) to [`Entity::PLACEHOLDER`].
pub(crate) struct RestoreMapper<'a> {
    entities: &'a [Entity],
}

impl<'a> RestoreMapper<'a> {
    pub(crate) fn new(entities: &'a [Entity]) -> Self {
        Self { entities }
    }
}

impl EntityMapper for RestoreMapper<'_> {
    fn get_mapped(&mut self, source: Entity) -> Entity {
        if source.generation() != bevy::ecs::entity::EntityGeneration::FIRST {
            return Entity::PLACEHOLDER;
        }
        self.entities.get(source.index_u32() as usize).copied().unwrap_or(Entity::PLACEHOLDER)
    }

    fn set_mapped(&mut self, _source: Entity, _target: Entity) {}
}
