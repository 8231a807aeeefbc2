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
//! per entity its id, a presence bitmask and its components.

use bevy::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;

use crate::model::ids::{ModelId, ModelIdAllocator};
use crate::model::persist::PersistState;
use crate::model::registry::ModelRegistry;
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
/// resource, the set of entity ids, each registered component type. Replicas that diverge
/// compare parts to say *what* differs.
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
    let world: &World = world;

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
        if (entry.encode)(world, &mut out).map_err(encode_err(entry.name))? {
            out[at] = 1;
        }
        if with_parts {
            parts.push((format!("resource {}", entry.name), Sha256::digest(&out[at..]).into()));
        }
    }

    let mut id_hasher = Sha256::new();
    let mut component_hashers: Vec<Sha256> = registry.components.iter().map(|_| Sha256::new()).collect();
    postcard::to_io(&(entities.len() as u64), &mut out).map_err(encode_err("the entity count"))?;
    let mask_len = registry.components.len().div_ceil(8);
    for (id, entity) in entities {
        let entity = world.entity(entity);
        postcard::to_io(&id.0, &mut out).map_err(encode_err("a model id"))?;
        if with_parts {
            id_hasher.update(id.0.to_le_bytes());
        }
        let mask_at = out.len();
        out.resize(mask_at + mask_len, 0);
        for (i, entry) in registry.components.iter().enumerate() {
            let value_at = out.len();
            if (entry.encode)(&entity, &mut out).map_err(encode_err(entry.name))? {
                out[mask_at + i / 8] |= 1 << (i % 8);
                if with_parts {
                    component_hashers[i].update(id.0.to_le_bytes());
                    component_hashers[i].update(&out[value_at..]);
                }
            }
        }
    }
    if with_parts {
        parts.push(("entity ids".into(), id_hasher.finalize().into()));
        for (entry, hasher) in registry.components.iter().zip(component_hashers) {
            parts.push((format!("component {}", entry.name), hasher.finalize().into()));
        }
    }
    Ok((out, parts))
}

fn decode_err(what: &str) -> impl FnOnce(postcard::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Decode { what: what.to_string(), source }
}

/// Restores a snapshot into a freshly built model world (built by the same model plugin).
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
    let (state, mut rest) =
        postcard::take_from_bytes::<RuntimeState>(&bytes[42..]).map_err(decode_err("runtime state"))?;
    world.insert_resource(state.time);
    world.insert_resource(state.rng);
    world.insert_resource(state.queue);
    let mut views = world.resource_mut::<ModelViews>();
    views.views = state.views;
    views.sent = state.sent;
    world.insert_resource(state.ids);
    world.insert_resource(state.book);
    world.insert_resource(state.persist);

    for entry in &registry.resources {
        let (&present, after) = rest.split_first().ok_or_else(|| SnapshotError::Foreign("truncated".into()))?;
        rest = after;
        match present {
            0 => (entry.remove)(world),
            1 => rest = (entry.insert)(rest, world).map_err(decode_err(entry.name))?,
            _ => return Err(SnapshotError::Foreign(format!("bad presence byte for {}", entry.name))),
        }
    }

    let (count, after) = postcard::take_from_bytes::<u64>(rest).map_err(decode_err("the entity count"))?;
    rest = after;
    let mask_len = registry.components.len().div_ceil(8);
    // Each entity takes at least a byte, so the count can be checked before allocating anything.
    if count as usize > rest.len() {
        return Err(SnapshotError::Foreign(format!("claims {count} entities in {} bytes", rest.len())));
    }
    for _ in 0..count {
        let (raw_id, after) = postcard::take_from_bytes::<u64>(rest).map_err(decode_err("a model id"))?;
        if after.len() < mask_len || raw_id == 0 {
            return Err(SnapshotError::Foreign("truncated entity".into()));
        }
        let (mask, mut values) = after.split_at(mask_len);
        let mut entity = world.spawn(ModelId(raw_id));
        for (i, entry) in registry.components.iter().enumerate() {
            if mask[i / 8] & (1 << (i % 8)) != 0 {
                values = (entry.insert)(values, &mut entity).map_err(decode_err(entry.name))?;
            }
        }
        rest = values;
    }
    if !rest.is_empty() {
        return Err(SnapshotError::Foreign(format!("{} trailing bytes", rest.len())));
    }
    world.flush();
    Ok(())
}
