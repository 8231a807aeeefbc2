//! Snapshots: the canonical encoding of a whole model world, its hash, and the rebuild.
//!
//! The encoding is a pure function of the model's state, never of its history: entities are
//! written sorted by [`ModelId`], components and resources in registration order, each value with
//! postcard. Two replicas in the same state produce the same bytes, and rebuilding from those
//! bytes gives structurally identical worlds (same entity ids, archetypes and iteration order),
//! which is why every replica — not only a late joiner — rebuilds at each snapshot point.
//!
//! Layout: `b"SYNQSNAP"`, format version (u16 LE), the registry fingerprint (32 bytes), the
//! runtime's own state, the registered resources (a presence byte each), the entity count, then
//! per entity its id, a presence bitmask and its components; last, for each registered
//! relationship component (like `ChildOf`), the order in which each target with two sources or
//! more (like `Children`) lists them. `Entity` values inside components and resources are written
//! in a canonical form that does not depend on the world's allocation history, and mapped to the
//! rebuilt world's entities; see `model::entity_refs` and `docs/determinism.md`.
//!
//! # The rebuild is invisible to model code
//!
//! * **Observers do not run** while a world is rebuilt: they are taken out of the world before the
//!   first value is restored and put back after the last (with their state, `Local`s included).
//!   Nothing the rebuild inserts triggers `On<Add, T>`, `On<Insert, T>`, `On<Remove, T>` or any
//!   other observer, and commands queued during the rebuild are applied before they come back.
//! * **Component hooks do run** (`#[component(on_add = …)]`, `on_insert`, and hooks registered
//!   with `World::register_component_hooks`): Bevy 0.19 has no way to insert a component without
//!   its hooks. They run once per restored value (a resource when it is inserted, an entity's
//!   components when its row is inserted, entities in [`ModelId`] order, then relationship
//!   components such as `ChildOf` in their targets' order) on every replica alike,
//!   late joiners included, while [`rebuilding`] returns `true`: a hook that does more than keep
//!   derived data up to date (an index, say) should return early then.
//! * **Internal entities are not model entities.** In Bevy 0.19 resources, observers and
//!   registered systems are entities. The model world hides them from every query that does not
//!   name them (default query filters on `IsResource` and [`ModelInternal`]), so a query with
//!   only optional terms, or `Query<Entity>`, sees model entities only; the snapshot never
//!   carries them.

use bevy::ecs::component::ComponentId;
use bevy::ecs::observer::ObserverDescriptor;
use bevy::ecs::query::Allow;
use bevy::ecs::relationship::RelationshipAccessor;
use bevy::ecs::resource::IsResource;
use bevy::ecs::system::SystemIdMarker;
use bevy::prelude::*;
use bevy::ptr::{OwningPtr, Ptr};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::alloc::Layout;
use std::collections::BTreeSet;
use std::ptr::NonNull;

use crate::model::entity_refs::{CaptureMapper, RestoreMapper};
use crate::model::ids::{ModelId, ModelIdAllocator};
use crate::model::persist::PersistState;
use crate::model::registry::{DecodedResource, ModelRegistry, encode_into};
use crate::model::rng::ModelRng;
use crate::model::runtime::{ModelViews, SnapshotBook};
use crate::model::time::{FutureQueue, ModelTime};
use synq_protocol::Hash32;

const MAGIC: &[u8; 8] = b"SYNQSNAP";
const FORMAT: u16 = 2;

/// Why a snapshot could not be taken or restored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    /// A registered type failed to serialize.
    #[error("could not encode {what}: {source}")]
    Encode {
        /// Which type.
        what: String,
        /// The serializer's error.
        source: postcard::Error,
    },
    /// The bytes are not a snapshot of this model.
    #[error("not a snapshot of this model: {0}")]
    Foreign(String),
    /// The bytes are damaged or were written by other model code.
    #[error("could not decode {what} from the snapshot: {source}")]
    Decode {
        /// What was being decoded.
        what: String,
        /// The deserializer's error.
        source: postcard::Error,
    },
}

/// The runtime's own state, written first.
#[derive(Serialize, Deserialize)]
struct RuntimeState {
    time: ModelTime,
    rng: ModelRng,
    queue: FutureQueue,
    views: BTreeSet<synq_protocol::ViewId>,
    sent: std::collections::BTreeMap<synq_protocol::ViewId, synq_protocol::wire::SentId>,
    ids: ModelIdAllocator,
    book: SnapshotBook,
    persist: PersistState,
}

/// Marks the model world's internal entities that are not resources: observers and registered
/// (one-shot) systems get it as a required component. Queries in the model world skip entities
/// with it unless they name it (`Allow<ModelInternal>`, `With<ModelInternal>`), as they skip
/// resource entities (`IsResource`) and Bevy's `Disabled` ones.
#[derive(Component, Clone, Copy, Debug, Default)]
pub struct ModelInternal;

/// Makes a model world's internal entities invisible to model queries: `IsResource` and
/// [`ModelInternal`] become default query filters, and observers and registered systems require
/// [`ModelInternal`]. It must run before any query, system or observer of the model exists:
/// `ModelApp::new` runs it first. Running it again changes nothing.
pub(crate) fn prepare_model_world(world: &mut World) {
    world.register_disabling_component::<IsResource>();
    world.register_disabling_component::<ModelInternal>();
    // Errors mean "already required" (or an observer existed before: not in a model world).
    let _ = world.try_register_required_components::<Observer, ModelInternal>();
    let _ = world.try_register_required_components::<SystemIdMarker, ModelInternal>();
}

/// Whether the model world is being rebuilt from a snapshot right now: `true` only while
/// component hooks run for restored values (observers never run then; see the
/// [module documentation](self)). A hook that arms timers, spawns, counts or otherwise acts on
/// "a new value" should return early when this is `true`: the value is not new, it was restored.
///
/// ```
/// use bevy::ecs::lifecycle::HookContext;
/// use bevy::ecs::world::DeferredWorld;
/// use bevy::prelude::*;
///
/// #[derive(Component)]
/// #[component(on_add = on_add_ship)]
/// struct Ship;
///
/// fn on_add_ship(world: DeferredWorld, context: HookContext) {
///     if bevy_synq::snapshot::rebuilding(&world) {
///         return;
///     }
///     // … a ship was really spawned …
///     let _ = context.entity;
/// }
/// ```
pub fn rebuilding(world: &World) -> bool {
    world.get_resource::<SnapshotBook>().is_some_and(|book| book.rebuilding)
}

/// The fingerprint of a registry: the hash of its registrations in order.
pub(crate) fn fingerprint(registry: &ModelRegistry) -> Hash32 {
    let mut hasher = Sha256::new();
    for (kind, name) in &registry.signature {
        hasher.update(kind.as_bytes());
        hasher.update([0]);
        hasher.update(name.as_bytes());
        hasher.update([0]);
    }
    hasher.finalize().into()
}

/// SHA-256 of snapshot bytes: the state hash replicas compare.
pub fn state_hash(bytes: &[u8]) -> Hash32 {
    Sha256::digest(bytes).into()
}

fn encode_err(what: &str) -> impl FnOnce(postcard::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Encode { what: what.to_string(), source }
}

/// Encodes the whole model world canonically.
pub(crate) fn capture(world: &mut World, registry: &ModelRegistry) -> Result<Vec<u8>, SnapshotError> {
    capture_impl(world, registry, false).map(|(bytes, _)| bytes)
}

/// A named part of the model state and its hash: the runtime's own state, each registered
/// resource, the entity ids (with which registered component types each entity has), each
/// registered component type (its values, in entity order). Replicas that diverge compare parts
/// to say *what* differs.
pub type StatePart = (String, Hash32);

/// Encodes the whole model world canonically, and hashes each part of it separately.
pub(crate) fn capture_with_parts(
    world: &mut World,
    registry: &ModelRegistry,
) -> Result<(Vec<u8>, Vec<StatePart>), SnapshotError> {
    capture_impl(world, registry, true)
}

fn capture_impl(
    world: &mut World,
    registry: &ModelRegistry,
    with_parts: bool,
) -> Result<(Vec<u8>, Vec<StatePart>), SnapshotError> {
    let mut entities: Vec<(ModelId, Entity)> = {
        let mut query = world.query::<(Entity, &ModelId)>();
        query.iter(world).map(|(entity, id)| (*id, entity)).collect()
    };
    entities.sort_unstable_by_key(|(id, _)| *id);
    // From here the world is only read through shared references, except that each value's
    // `Entity` values are mapped to their canonical form in place and back while it is encoded
    // (`encode_ptr`): this function holds the world exclusively, so nothing else can see that.
    let world: &World = world;
    let mut mapper = CaptureMapper::new(world, &entities);

    let mut out = Vec::with_capacity(64 + entities.len() * 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT.to_le_bytes());
    out.extend_from_slice(&fingerprint(registry));
    let state = RuntimeState {
        time: *world.resource::<ModelTime>(),
        rng: world.resource::<ModelRng>().clone(),
        queue: world.resource::<FutureQueue>().clone(),
        views: world.resource::<ModelViews>().views.clone(),
        sent: world.resource::<ModelViews>().sent.clone(),
        ids: *world.resource::<ModelIdAllocator>(),
        book: world.resource::<SnapshotBook>().clone(),
        persist: world.resource::<PersistState>().clone(),
    };
    let mut parts: Vec<StatePart> = Vec::new();
    let state_at = out.len();
    postcard::to_io(&state, &mut out).map_err(encode_err("the runtime state"))?;
    if with_parts {
        parts.push(("runtime state (time, RNG, timers, views, ids)".into(), Sha256::digest(&out[state_at..]).into()));
    }

    for entry in &registry.resources {
        let at = out.len();
        out.push(0);
        // SAFETY: this function holds the world exclusively; no reference to a resource is alive.
        if unsafe { (entry.encode)(world, &mut out, &mut mapper) }.map_err(encode_err(entry.name))? {
            out[at] = 1;
        }
        if with_parts {
            parts.push((format!("resource {}", entry.name), Sha256::digest(&out[at..]).into()));
        }
    }

    let components = world.components();
    let ids: Vec<Option<ComponentId>> = registry.components.iter().map(|c| components.get_id(c.type_id)).collect();
    let mask_len = registry.components.len().div_ceil(8);
    // The registered components of each archetype, found once per archetype (indexed by its id).
    let mut layouts: Vec<Option<RowLayout>> = Vec::new();
    // The bytes each part hash covers, hashed at the end (one SHA-256 call per part), as the
    // snapshot encodes them: each entity's id and presence mask, and per component type the
    // values in entity order.
    let (mut id_part, mut component_parts): (Vec<u8>, Vec<Vec<u8>>) = if with_parts {
        let guess = entities.len() * 8;
        (Vec::with_capacity(guess), registry.components.iter().map(|_| Vec::with_capacity(guess)).collect())
    } else {
        (Vec::new(), Vec::new())
    };
    encode_into(&(entities.len() as u64), &mut out).map_err(encode_err("the entity count"))?;
    for &(id, entity) in &entities {
        let entity = world.entity(entity);
        let archetype = entity.archetype();
        let index = archetype.id().index();
        if layouts.len() <= index {
            layouts.resize_with(index + 1, || None);
        }
        let layout = layouts[index].get_or_insert_with(|| RowLayout::of(archetype, &ids, mask_len));
        let id_at = out.len();
        encode_into(&id.0, &mut out).map_err(encode_err("a model id"))?;
        out.extend_from_slice(&layout.mask);
        if with_parts {
            id_part.extend_from_slice(&out[id_at..]);
        }
        for &(i, component) in &layout.present {
            let entry = &registry.components[i];
            let value_at = out.len();
            let value = entity.get_by_id(component).expect("the archetype holds the component");
            // SAFETY: `component` is the id of `entry`'s type in this world, which this function
            // holds exclusively; no reference to the value is alive.
            unsafe { (entry.encode_ptr)(value, &mut out, &mut mapper) }.map_err(encode_err(entry.name))?;
            if with_parts {
                component_parts[i].extend_from_slice(&out[value_at..]);
            }
        }
    }
    if with_parts {
        parts.push(("entity ids".into(), Sha256::digest(&id_part).into()));
        for (entry, bytes) in registry.components.iter().zip(component_parts) {
            parts.push((format!("component {}", entry.name), Sha256::digest(&bytes).into()));
        }
    }

    // The order of each relationship's targets (`Children`), which the rebuild reproduces: only
    // in snapshots of models that register a relationship.
    for (entry, id) in registry.components.iter().zip(&ids) {
        if !entry.relationship {
            continue;
        }
        let orders = relationship_orders(world, *id, &entities, &mut mapper);
        let at = out.len();
        encode_into(&orders, &mut out).map_err(encode_err("a relationship order"))?;
        if with_parts {
            parts.push((format!("relationship order {}", entry.name), Sha256::digest(&out[at..]).into()));
        }
    }
    Ok((out, parts))
}

/// Lists the sources of a relationship target (Bevy's type-erased `RelationshipTarget::iter`).
///
/// # Safety
/// The pointer must point to a value of the target component the function was found for.
pub(crate) type SourcesOf = for<'a> unsafe fn(Ptr<'a>) -> Box<dyn Iterator<Item = Entity> + 'a>;

/// The target component of the relationship component `relationship` (`Children` for `ChildOf`),
/// and how to list a target's sources in order; `None` while the world has no value of either.
pub(crate) fn relationship_target(
    world: &World,
    relationship: Option<ComponentId>,
) -> Option<(ComponentId, SourcesOf)> {
    let components = world.components();
    let Some(RelationshipAccessor::Relationship { relationship_target, .. }) =
        components.get_info(relationship?)?.relationship_accessor()
    else {
        return None;
    };
    match components.get_info(*relationship_target)?.relationship_accessor() {
        Some(RelationshipAccessor::RelationshipTarget { iter, .. }) => Some((*relationship_target, *iter)),
        _ => None,
    }
}

/// Each target entity of one relationship with two sources or more, by position, and its
/// sources in the target's order, by position (the canonical forms' indices).
type RelationshipOrders = Vec<(u32, Vec<u32>)>;

fn relationship_orders(
    world: &World,
    relationship: Option<ComponentId>,
    entities: &[(ModelId, Entity)],
    mapper: &mut CaptureMapper,
) -> RelationshipOrders {
    let Some((target, iter)) = relationship_target(world, relationship) else { return Vec::new() };
    let mut orders = Vec::new();
    for (position, &(_, entity)) in entities.iter().enumerate() {
        let Ok(sources) = world.entity(entity).get_by_id(target) else { continue };
        // SAFETY: `sources` points to a value of `target`, the component this accessor belongs to.
        let sources: Vec<u32> = unsafe { iter(sources) }.map(|source| mapper.canonical(source).index_u32()).collect();
        if sources.len() >= 2 {
            orders.push((position as u32, sources));
        }
    }
    orders
}

/// Which registered components the entities of one archetype have: their presence mask as the
/// snapshot writes it, and `(index in the registry, component id)` in registration order.
struct RowLayout {
    mask: Vec<u8>,
    present: Vec<(usize, ComponentId)>,
}

impl RowLayout {
    fn of(archetype: &bevy::ecs::archetype::Archetype, ids: &[Option<ComponentId>], mask_len: usize) -> Self {
        let mut mask = vec![0; mask_len];
        let mut present = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            if let Some(id) = *id
                && archetype.contains(id)
            {
                mask[i / 8] |= 1 << (i % 8);
                present.push((i, id));
            }
        }
        Self { mask, present }
    }
}

fn decode_err(what: &str) -> impl FnOnce(postcard::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Decode { what: what.to_string(), source }
}

/// Restores a snapshot into a freshly built model world (built by the same model plugin).
///
/// Observers are out of the world meanwhile, and [`rebuilding`] is `true` for component hooks;
/// see the [module documentation](self).
pub(crate) fn restore(bytes: &[u8], world: &mut World, registry: &ModelRegistry) -> Result<(), SnapshotError> {
    if bytes.len() < 42 || &bytes[..8] != MAGIC {
        return Err(SnapshotError::Foreign("missing snapshot header".into()));
    }
    let format = u16::from_le_bytes([bytes[8], bytes[9]]);
    if format != FORMAT {
        return Err(SnapshotError::Foreign(format!("snapshot format {format}, this build reads {FORMAT}")));
    }
    if bytes[10..42] != fingerprint(registry) {
        return Err(SnapshotError::Foreign("it was written by a model with other registered types".into()));
    }
    let observers = pause_observers(world);
    world.resource_mut::<SnapshotBook>().rebuilding = true;
    let restored = restore_contents(&bytes[42..], world, registry);
    // What hooks queued runs now, while observers are still out and `rebuilding` is still true.
    world.flush();
    world.resource_mut::<SnapshotBook>().rebuilding = false;
    resume_observers(world, observers);
    restored
}

fn restore_contents(bytes: &[u8], world: &mut World, registry: &ModelRegistry) -> Result<(), SnapshotError> {
    let (state, mut rest) = postcard::take_from_bytes::<RuntimeState>(bytes).map_err(decode_err("runtime state"))?;
    world.insert_resource(state.time);
    world.insert_resource(state.rng);
    world.insert_resource(state.queue);
    let mut views = world.resource_mut::<ModelViews>();
    views.views = state.views;
    views.sent = state.sent;
    world.insert_resource(state.ids);
    world.insert_resource(SnapshotBook { rebuilding: true, ..state.book });
    world.insert_resource(state.persist);

    // Resources are decoded first and inserted once the entities they may refer to exist.
    let mut resources: Vec<Option<DecodedResource>> = Vec::with_capacity(registry.resources.len());
    for entry in &registry.resources {
        let (&present, after) = rest.split_first().ok_or_else(|| SnapshotError::Foreign("truncated".into()))?;
        rest = after;
        match present {
            0 => resources.push(None),
            1 => {
                let (value, after) = (entry.decode)(rest).map_err(decode_err(entry.name))?;
                resources.push(Some(value));
                rest = after;
            }
            _ => return Err(SnapshotError::Foreign(format!("bad presence byte for {}", entry.name))),
        }
    }

    let (count, after) = postcard::take_from_bytes::<u64>(rest).map_err(decode_err("the entity count"))?;
    rest = after;
    let mask_len = registry.components.len().div_ceil(8);
    // Each entity takes at least a byte, so the count can be checked before allocating anything.
    let count = match u32::try_from(count) {
        Ok(count) if count as usize <= rest.len() => count,
        _ => return Err(SnapshotError::Foreign(format!("claims {count} entities in {} bytes", rest.len()))),
    };
    // Every entity is allocated before any value is decoded, so that an `Entity` in a value maps
    // to its referent wherever that is in the order (see `model::entity_refs`).
    let entities: Vec<Entity> = world.entity_allocator().alloc_many(count).collect();
    let mut mapper = RestoreMapper::new(&entities);
    for (entry, value) in registry.resources.iter().zip(resources) {
        match value {
            None => (entry.remove)(world),
            Some(value) => (entry.insert)(value, world, &mut mapper),
        }
    }

    // Each entity is decoded into a scratch row (slot 0: its ModelId, slot 1 + i: the registry's
    // component i) and inserted whole: one archetype move per entity, into its final archetype.
    // Relationship components wait (their bytes are kept) until every row is in.
    let model_id = world.register_component::<ModelId>();
    let component_ids: Vec<ComponentId> = registry.components.iter().map(|entry| (entry.register)(world)).collect();
    let scratch =
        ScratchRow::new(std::iter::once(Layout::new::<ModelId>()).chain(registry.components.iter().map(|c| c.layout)));
    let mut row_ids: Vec<ComponentId> = Vec::with_capacity(component_ids.len() + 1);
    let mut row_entries: Vec<usize> = Vec::with_capacity(component_ids.len());
    // Per registered relationship type: (entity position, its encoded value), in entity order.
    let mut relations: Vec<Vec<(u32, &[u8])>> = vec![Vec::new(); registry.components.len()];
    for (position, &entity) in entities.iter().enumerate() {
        let (raw_id, after) = postcard::take_from_bytes::<u64>(rest).map_err(decode_err("a model id"))?;
        if after.len() < mask_len || raw_id == 0 {
            return Err(SnapshotError::Foreign("truncated entity".into()));
        }
        let (mask, mut values) = after.split_at(mask_len);
        row_ids.clear();
        row_entries.clear();
        // SAFETY: slot 0 has ModelId's layout.
        unsafe { scratch.slot(0).cast::<ModelId>().write(ModelId(raw_id)) };
        row_ids.push(model_id);
        for (i, entry) in registry.components.iter().enumerate() {
            if mask[i / 8] & (1 << (i % 8)) == 0 {
                continue;
            }
            let value_bytes = values;
            // SAFETY: slot 1 + i has the layout of entry i's type and holds no live value.
            if let Err(error) = unsafe { (entry.decode_into)(&mut values, scratch.slot(1 + i), &mut mapper) } {
                for &j in &row_entries {
                    // SAFETY: slot 1 + j holds the value decoded above, which is not used again.
                    unsafe { (registry.components[j].drop_in_place)(scratch.slot(1 + j)) };
                }
                return Err(decode_err(entry.name)(error));
            }
            if entry.relationship {
                // Decoded to check it and find its end; inserted again from its bytes below.
                // SAFETY: slot 1 + i holds the value just decoded, which is not used again.
                unsafe { (entry.drop_in_place)(scratch.slot(1 + i)) };
                let len = value_bytes.len() - values.len();
                relations[i].push((position as u32, &value_bytes[..len]));
                continue;
            }
            row_ids.push(component_ids[i]);
            row_entries.push(i);
        }
        rest = values;
        let slots = std::iter::once(0).chain(row_entries.iter().map(|i| 1 + i));
        // SAFETY: each slot holds a value decoded above, which the row moves out (or the arm
        // below drops).
        let row = slots.map(|slot| unsafe { OwningPtr::new(scratch.slot(slot)) });
        match world.spawn_empty_at(entity) {
            // SAFETY: each id in `row_ids` is the id in this world of the type whose value the
            // matching slot holds (in the same order); the row moves those values out of the slots.
            Ok(mut spawned) => unsafe {
                spawned.insert_by_ids(&row_ids, row);
            },
            Err(error) => {
                for &j in &row_entries {
                    // SAFETY: slot 1 + j holds a value decoded above, which is not used again.
                    unsafe { (registry.components[j].drop_in_place)(scratch.slot(1 + j)) };
                }
                return Err(SnapshotError::Foreign(format!("cannot spawn a restored entity: {error}")));
            }
        }
    }

    // Relationship components, in the order their targets listed their sources (their hooks
    // rebuild the targets, like `Children`, in that order), then any others in entity order.
    for (i, entry) in registry.components.iter().enumerate() {
        if !entry.relationship {
            continue;
        }
        let (orders, after) =
            postcard::take_from_bytes::<RelationshipOrders>(rest).map_err(decode_err("a relationship order"))?;
        rest = after;
        let pending = &relations[i];
        let mut inserted = vec![false; pending.len()];
        let listed = orders.iter().flat_map(|(_, sources)| sources.iter().copied());
        let order = listed.filter_map(|position| pending.binary_search_by_key(&position, |(p, _)| *p).ok());
        for at in order.chain(0..pending.len()).collect::<Vec<_>>() {
            if std::mem::replace(&mut inserted[at], true) {
                continue;
            }
            let (position, mut value) = pending[at];
            // SAFETY: slot 1 + i has the layout of entry i's type and holds no live value.
            unsafe { (entry.decode_into)(&mut value, scratch.slot(1 + i), &mut mapper) }
                .map_err(decode_err(entry.name))?;
            match world.get_entity_mut(entities[position as usize]) {
                // SAFETY: `component_ids[i]` is the id of the type whose value the slot holds; the
                // insert moves it out.
                Ok(mut source) => unsafe {
                    source.insert_by_id(component_ids[i], OwningPtr::new(scratch.slot(1 + i)));
                },
                // A hook despawned it meanwhile: the value goes.
                // SAFETY: the slot holds the value just decoded, which is not used again.
                Err(_) => unsafe { (entry.drop_in_place)(scratch.slot(1 + i)) },
            }
        }
    }
    if !rest.is_empty() {
        return Err(SnapshotError::Foreign(format!("{} trailing bytes", rest.len())));
    }
    Ok(())
}

/// One entity's decoded values before they are inserted: one aligned slot per type.
struct ScratchRow {
    base: NonNull<u8>,
    layout: Layout,
    offsets: Vec<usize>,
}

impl ScratchRow {
    fn new(layouts: impl Iterator<Item = Layout>) -> Self {
        let mut layout = Layout::new::<()>();
        let mut offsets = Vec::new();
        for slot in layouts {
            let (extended, offset) = layout.extend(slot).expect("component layouts fit in memory");
            layout = extended;
            offsets.push(offset);
        }
        let layout = Layout::from_size_align(layout.size().max(1), layout.align()).expect("valid layout");
        // SAFETY: the layout has a non-zero size.
        let base = NonNull::new(unsafe { std::alloc::alloc(layout) })
            .unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self { base, layout, offsets }
    }

    /// The slot of type `index`, aligned for it.
    fn slot(&self, index: usize) -> NonNull<u8> {
        // SAFETY: every offset lies within the allocation (or at its end, for zero-sized types).
        unsafe { self.base.add(self.offsets[index]) }
    }
}

impl Drop for ScratchRow {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.base.as_ptr(), self.layout) };
    }
}

/// An observer taken out of the world while it is rebuilt: its entity, what it observed (its
/// descriptor, which taking it out empties), and the observer itself.
type PausedObserver = (Entity, ObserverDescriptor, Observer);

/// Takes every observer out of the world (in entity order), so that nothing the rebuild inserts
/// or removes triggers one. Their entities stay.
fn pause_observers(world: &mut World) -> Vec<PausedObserver> {
    let mut entities: Vec<Entity> = {
        let mut query = world.query_filtered::<Entity, (With<Observer>, Allow<ModelInternal>)>();
        query.iter(world).collect()
    };
    entities.sort_unstable();
    let mut paused = Vec::with_capacity(entities.len());
    for entity in entities {
        let Some(descriptor) = world.get::<Observer>(entity).map(|o| o.descriptor().clone()) else {
            continue;
        };
        // Its `on_remove` hook unregisters it (and empties its descriptor); `take` applies that
        // at once.
        if let Some(observer) = world.entity_mut(entity).take::<Observer>() {
            paused.push((entity, descriptor, observer));
        }
    }
    paused
}

/// Puts the observers back: each registers again (its `on_add` hook) for the same events,
/// components and entities, and keeps its system's state.
fn resume_observers(world: &mut World, paused: Vec<PausedObserver>) {
    for (entity, descriptor, observer) in paused {
        // A typed observer's `on_add` hook adds its event and components again: listed twice, they
        // register once. A dynamic one's hook adds nothing: what it observed comes from here.
        let watched: Vec<Entity> =
            descriptor.entities().iter().copied().filter(|watched| world.get_entity(*watched).is_ok()).collect();
        let mut observer = observer.with_components(descriptor.components().iter().copied()).with_entities(watched);
        for &event_key in descriptor.event_keys() {
            // SAFETY: the observer observed this event before it was paused, so the events with
            // this key are the ones its system takes.
            observer = unsafe { observer.with_event_key(event_key) };
        }
        if let Ok(mut entity) = world.get_entity_mut(entity) {
            entity.insert(observer);
        }
    }
    world.flush();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::app::{ModelApp, ModelPlugin, WorldSettings};
    use crate::model::runtime::{ModelRuntime, RuntimeOptions};
    use crate::model::time::ModelInit;
    use bevy::ecs::lifecycle::HookContext;
    use bevy::ecs::world::DeferredWorld;
    use serde::Deserializer;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Component, Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
    struct Pos(f32, f32);

    /// Owns heap memory: the rebuild must move it, not copy or leak it.
    #[derive(Component, Serialize, Deserialize, Clone, Debug, PartialEq)]
    struct Label(String);

    /// Zero-sized.
    #[derive(Component, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Default)]
    struct Tag;

    /// Aligned beyond what an allocator hands out by default for small sizes.
    #[repr(align(32))]
    #[derive(Component, Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
    struct Wide([u64; 4]);

    #[derive(Resource, Serialize, Deserialize, Default, Clone, Debug)]
    struct Score(u64);

    /// `On<Add, Pos>` calls, counted by model code.
    #[derive(Resource, Serialize, Deserialize, Default, Clone, Debug)]
    struct Observed(u64);

    /// What `Hooked`'s `on_add` hook saw `rebuilding` say, in order.
    #[derive(Resource, Serialize, Deserialize, Default, Clone, Debug)]
    struct HookLog(Vec<bool>);

    #[derive(Component, Serialize, Deserialize, Clone, Copy, Debug)]
    #[component(on_add = hooked)]
    struct Hooked;

    fn hooked(mut world: DeferredWorld, _: HookContext) {
        let rebuilding = rebuilding(&world);
        world.resource_mut::<HookLog>().0.push(rebuilding);
    }

    const SETTINGS: WorldSettings = WorldSettings { step_ms: 50, seed: [7; 32] };

    fn options() -> RuntimeOptions {
        RuntimeOptions { step_ms: SETTINGS.step_ms, seed: SETTINGS.seed, ..Default::default() }
    }

    /// 40 entities in several archetypes (with holes from despawns) and resources.
    fn model(app: &mut ModelApp) {
        app.register_component::<Pos>()
            .register_component::<Label>()
            .register_component::<Tag>()
            .register_component::<Wide>()
            .init_resource::<Score>()
            .init_resource::<Observed>()
            .add_systems(ModelInit, |mut commands: Commands, mut score: ResMut<Score>| {
                let mut spawned = Vec::new();
                for i in 0..40u32 {
                    let mut entity = commands.spawn(Pos(i as f32, 0.5));
                    if i % 2 == 0 {
                        entity.insert(Label(format!("entity {i}")));
                    }
                    if i % 3 == 0 {
                        entity.insert(Tag);
                    }
                    if i % 5 == 0 {
                        entity.insert(Wide([u64::from(i); 4]));
                    }
                    spawned.push(entity.id());
                }
                for (i, entity) in spawned.into_iter().enumerate() {
                    if i % 7 == 3 {
                        commands.entity(entity).despawn();
                    }
                }
                score.0 = 7;
            });
    }

    /// `On<Add>` calls of an observer told its component at run time (`with_component`).
    #[derive(Resource, Serialize, Deserialize, Default, Clone, Debug)]
    struct ObservedByComponentId(u64);

    /// [`model`] and two observers that count `Pos` added: a typed one, and one given the
    /// component's id.
    fn observed_model(app: &mut ModelApp) {
        model(app);
        app.init_resource::<ObservedByComponentId>()
            .add_observer(|_: On<Add, Pos>, mut observed: ResMut<Observed>| observed.0 += 1)
            // Observes `Label` too, so that adding a `Label` runs observers of `Add`.
            .add_observer(|_: On<Add, Label>| {});
        let pos = app.world_mut().register_component::<Pos>();
        app.world_mut().spawn(
            Observer::new(|_: On<Add>, mut observed: ResMut<ObservedByComponentId>| observed.0 += 1)
                .with_component(pos),
        );
    }

    /// The model, and 10 entities whose `on_add` hook logs what `rebuilding` says.
    fn hooked_model(app: &mut ModelApp) {
        model(app);
        app.register_component::<Hooked>().init_resource::<HookLog>().add_systems(
            ModelInit,
            |mut commands: Commands| {
                for _ in 0..10 {
                    commands.spawn(Hooked);
                }
            },
        );
    }

    fn snapshot_of(plugin: impl ModelPlugin) -> Vec<u8> {
        ModelRuntime::start_fresh(plugin, options()).capture().expect("encodes")
    }

    fn rebuilt(plugin: &dyn ModelPlugin, bytes: &[u8]) -> (World, ModelRegistry) {
        let app = ModelApp::build(SETTINGS, plugin);
        let (mut world, registry) = (app.world, app.registry);
        restore(bytes, &mut world, &registry).expect("restores");
        (world, registry)
    }

    fn model_entities(world: &mut World) -> Vec<(Entity, ModelId)> {
        world.query::<(Entity, &ModelId)>().iter(world).map(|(entity, id)| (entity, *id)).collect()
    }

    #[test]
    fn a_rebuild_reencodes_to_the_same_bytes_and_two_rebuilds_are_identical() {
        let bytes = snapshot_of(observed_model);
        let (mut a, registry) = rebuilt(&observed_model, &bytes);
        let (mut b, _) = rebuilt(&observed_model, &bytes);
        assert_eq!(capture(&mut a, &registry).expect("encodes"), bytes);
        assert_eq!(capture_with_parts(&mut b, &registry).expect("encodes").0, bytes);

        // Same entities, ids, iteration order and archetypes; the same next id.
        let (entities_a, entities_b) = (model_entities(&mut a), model_entities(&mut b));
        assert_eq!(entities_a.len(), 40 - 6);
        assert_eq!(entities_a, entities_b);
        assert_eq!(a.archetypes().len(), b.archetypes().len());
        assert_eq!(a.entities().len(), b.entities().len());
        assert_eq!(a.spawn_empty().id(), b.spawn_empty().id());

        // Values moved in intact, in archetypes of their own types.
        let mut by_id: Vec<_> = entities_a.iter().map(|(entity, id)| (*id, *entity)).collect();
        by_id.sort();
        for (i, (id, entity)) in by_id.into_iter().enumerate() {
            let entity = a.entity(entity);
            let n = entity.get::<Pos>().expect("every entity has a Pos").0 as u32;
            assert_eq!(id.get(), u64::from(n) + 1, "entity #{i}");
            assert_eq!(entity.get::<Label>().map(|l| l.0.clone()), n.is_multiple_of(2).then(|| format!("entity {n}")));
            assert_eq!(entity.contains::<Tag>(), n.is_multiple_of(3));
            assert_eq!(entity.get::<Wide>().copied(), n.is_multiple_of(5).then_some(Wide([u64::from(n); 4])));
            if let Some(wide) = entity.get::<Wide>() {
                assert_eq!(std::ptr::from_ref(wide).addr() % 32, 0);
            }
        }
        assert_eq!(a.resource::<Score>().0, 7);
        assert!(!rebuilding(&a));
    }

    /// The byte format did not change: the snapshot of this model, written by the version before
    /// the row-at-once rebuild (commit 2566453, measured with the same model), has this hash.
    #[test]
    fn the_format_is_what_the_previous_version_wrote() {
        let bytes = snapshot_of(model);
        assert_eq!(bytes.len(), 649);
        let hash: String = state_hash(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hash, "a6f1cfb48e161cde3df26675d6c0798b12272a3d5ad2304cdc496ca963262368");
    }

    #[test]
    fn observers_sleep_through_a_rebuild_and_wake_after() {
        let bytes = snapshot_of(observed_model);
        let (mut world, _) = rebuilt(&observed_model, &bytes);
        // 40 real spawns when the session started; none from the rebuilds since.
        assert_eq!(world.resource::<Observed>().0, 40);
        assert_eq!(world.resource::<ObservedByComponentId>().0, 40);
        world.spawn(Pos(0.0, 0.0));
        world.flush();
        assert_eq!(world.resource::<Observed>().0, 41);
        assert_eq!(world.resource::<ObservedByComponentId>().0, 41);
        // An observer given a component still observes that component only.
        world.spawn(Label("not a Pos".into()));
        world.flush();
        assert_eq!(world.resource::<ObservedByComponentId>().0, 41);
    }

    #[test]
    fn hooks_run_during_a_rebuild_and_know_it() {
        let bytes = snapshot_of(hooked_model);
        let (mut world, _) = rebuilt(&hooked_model, &bytes);
        // 10 real spawns, then one call per restored `Hooked` at every rebuild: the first
        // snapshot point's, this one.
        let log = world.resource::<HookLog>().0.clone();
        assert_eq!(log, [[false; 10], [true; 10], [true; 10]].concat());
        world.spawn(Hooked);
        assert_eq!(world.resource::<HookLog>().0.last(), Some(&false));
    }

    #[test]
    fn internal_entities_are_hidden_from_model_queries() {
        let app = ModelApp::build(SETTINGS, &observed_model);
        let mut world = app.world;
        assert_eq!(world.query::<Entity>().iter(&world).count(), 0);
        assert!(world.query_filtered::<Entity, Allow<IsResource>>().iter(&world).count() >= 10);
        assert_eq!(world.query_filtered::<(), (With<Observer>, Allow<ModelInternal>)>().iter(&world).count(), 3);
        world.spawn(Pos(0.0, 0.0));
        assert_eq!(world.query::<(Entity, Option<&Pos>, Option<&Label>)>().iter(&world).count(), 1);
    }

    /// Not registered: a required component of a registered one.
    #[derive(Component, Default)]
    struct Extra;

    #[derive(Component, Serialize, Deserialize)]
    #[require(Extra)]
    struct NeedsExtra;

    #[test]
    fn required_components_come_with_a_restored_row() {
        fn needs(app: &mut ModelApp) {
            app.register_component::<NeedsExtra>().add_systems(ModelInit, |mut commands: Commands| {
                commands.spawn(NeedsExtra);
            });
        }
        let (mut world, _) = rebuilt(&needs, &snapshot_of(needs));
        assert_eq!(world.query_filtered::<(), (With<NeedsExtra>, With<Extra>)>().iter(&world).count(), 1);
    }

    static DROPPED: AtomicUsize = AtomicUsize::new(0);

    #[derive(Component, Serialize, Deserialize)]
    struct Droppy(String);

    impl Drop for Droppy {
        fn drop(&mut self) {
            DROPPED.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Encodes 255, but refuses to decode it.
    #[derive(Component, Serialize)]
    struct Picky(u8);

    impl<'de> Deserialize<'de> for Picky {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            match u8::deserialize(deserializer)? {
                255 => Err(serde::de::Error::custom("255 is not a Picky")),
                value => Ok(Picky(value)),
            }
        }
    }

    #[test]
    fn a_value_that_does_not_decode_stops_the_rebuild_and_drops_the_row_so_far() {
        fn picky(app: &mut ModelApp) {
            app.register_component::<Droppy>().register_component::<Picky>().add_systems(
                ModelInit,
                |mut commands: Commands| {
                    commands.spawn((Droppy("kept".into()), Picky(1)));
                    commands.spawn((Droppy("decoded, then dropped".into()), Picky(255)));
                },
            );
        }
        let bytes = snapshot_of(picky);
        let app = ModelApp::build(SETTINGS, &picky);
        let (mut world, registry) = (app.world, app.registry);
        let before = DROPPED.load(Ordering::SeqCst);
        let error = restore(&bytes, &mut world, &registry).expect_err("255 does not decode");
        assert!(matches!(&error, SnapshotError::Decode { what, .. } if what.contains("Picky")), "{error}");
        assert_eq!(DROPPED.load(Ordering::SeqCst) - before, 1);
        assert!(!rebuilding(&world));
        drop(world);
        assert_eq!(DROPPED.load(Ordering::SeqCst) - before, 2);
    }

    /// Points at another model entity.
    #[derive(Component, Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
    struct Link(#[entities] Entity);

    fn linked(app: &mut ModelApp) {
        app.register_component::<Pos>().register_component::<Link>().register_component::<ChildOf>();
    }

    /// Six model entities (`ModelId` 1 to 6) spawned in `order` after `junk` entities came and
    /// went: each links to the next (6 to an entity that is gone), 3 and 2 are children of 1 in
    /// that order, 5 of 4. Returns the entities by `ModelId` - 1.
    fn fill(world: &mut World, order: &[u64], junk: usize) -> Vec<Entity> {
        for _ in 0..junk {
            let entity = world.spawn_empty().id();
            world.despawn(entity);
        }
        let mut entities = vec![Entity::PLACEHOLDER; 6];
        for &id in order {
            entities[id as usize - 1] = world.spawn((ModelId::from_raw(id), Pos(id as f32, 0.0))).id();
        }
        let gone = world.spawn_empty().id();
        world.despawn(gone);
        for id in 0..6 {
            let target = if id == 5 { gone } else { entities[id + 1] };
            world.entity_mut(entities[id]).insert(Link(target));
        }
        for (child, parent) in [(2, 0), (1, 0), (4, 3)] {
            world.entity_mut(entities[child]).insert(ChildOf(entities[parent]));
        }
        world.flush();
        entities
    }

    #[test]
    fn entity_references_encode_the_same_whatever_the_allocation_history() {
        let (mut a, registry) = {
            let app = ModelApp::build(SETTINGS, &linked);
            (app.world, app.registry)
        };
        let mut b = ModelApp::build(SETTINGS, &linked).world;
        let in_a = fill(&mut a, &[1, 2, 3, 4, 5, 6], 0);
        let in_b = fill(&mut b, &[6, 5, 4, 3, 2, 1], 5);
        assert_ne!(in_a, in_b, "the two worlds should number their entities differently");
        let bytes = capture(&mut a, &registry).expect("encodes");
        assert_eq!(capture_with_parts(&mut b, &registry).expect("encodes").0, bytes);
        // Capture left the values as they were.
        assert_eq!(a.get::<Link>(in_a[0]), Some(&Link(in_a[1])));
        assert_eq!(b.get::<ChildOf>(in_b[4]), Some(&ChildOf(in_b[3])));

        let (mut rebuilt, _) = rebuilt(&linked, &bytes);
        assert_eq!(capture(&mut rebuilt, &registry).expect("encodes"), bytes);
        let mut by_id: Vec<_> = model_entities(&mut rebuilt).into_iter().map(|(entity, id)| (id, entity)).collect();
        by_id.sort();
        let entity = |id: usize| by_id[id].1;
        for id in 0..5 {
            assert_eq!(rebuilt.get::<Link>(entity(id)), Some(&Link(entity(id + 1))));
        }
        assert_eq!(rebuilt.get::<Link>(entity(5)), Some(&Link(Entity::PLACEHOLDER)));
        assert_eq!(rebuilt.get::<Children>(entity(0)).map(|c| c.to_vec()), Some(vec![entity(2), entity(1)]));
        assert_eq!(rebuilt.get::<Children>(entity(3)).map(|c| c.to_vec()), Some(vec![entity(4)]));
        assert_eq!(rebuilt.get::<ChildOf>(entity(1)), Some(&ChildOf(entity(0))));
    }

    #[test]
    fn parts_name_what_differs() {
        let bytes = snapshot_of(model);
        let (mut a, registry) = rebuilt(&model, &bytes);
        let (mut b, _) = rebuilt(&model, &bytes);
        let some = model_entities(&mut b)[3].0;
        b.get_mut::<Pos>(some).expect("has a Pos").1 = 9.0;
        let (_, parts_a) = capture_with_parts(&mut a, &registry).expect("encodes");
        let (_, parts_b) = capture_with_parts(&mut b, &registry).expect("encodes");
        assert_eq!(parts_a.len(), 1 + 2 + 1 + 4);
        let differing: Vec<_> =
            parts_a.iter().zip(&parts_b).filter(|(a, b)| a != b).map(|(a, _)| a.0.clone()).collect();
        assert_eq!(differing, vec![format!("component {}", std::any::type_name::<Pos>())]);
    }
}
