//! The registered model types, type-erased, in registration order.
//!
//! The registry is what lets the snapshot encode and rebuild a model world it knows nothing about
//! at compile time, and what lets the runtime decode view events and timers. Its order is fixed by
//! the app's [`ModelPlugin`](crate::ModelPlugin) and is part of the model code hash.

use bevy::ecs::component::{ComponentId, ComponentMutability};
use bevy::ecs::world::EntityRef;
use bevy::prelude::*;
use bevy::ptr::Ptr;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::alloc::Layout;
use std::any::{Any, TypeId, type_name};
use std::ptr::NonNull;
use synq_protocol::ViewId;

use super::entity_refs::{CaptureMapper, RestoreMapper};
use super::events::FromView;

/// Whether `T` is the source side of a relationship (`ChildOf`, a type with
/// `#[relationship(relationship_target = …)]`): Bevy's derive makes those immutable, and their
/// targets (`Children`) mutable.
pub(crate) fn is_relationship<T: Component>() -> bool {
    T::relationship_accessor().is_some() && !<T::Mutability as ComponentMutability>::MUTABLE
}

/// Whether `T` is the target side of a relationship (`Children`, a type with
/// `#[relationship_target(relationship = …)]`).
pub(crate) fn is_relationship_target<T: Component>() -> bool {
    T::relationship_accessor().is_some() && <T::Mutability as ComponentMutability>::MUTABLE
}

/// Encodes and restores one registered component type.
pub(crate) struct ComponentEntry {
    pub name: &'static str,
    pub type_id: TypeId,
    /// Appends the component's encoding if the entity has it; returns whether it did.
    pub encode: fn(&EntityRef, &mut Vec<u8>) -> Result<bool, postcard::Error>,
    /// The type's memory layout: where the rebuild decodes a value before it moves whole rows.
    pub layout: Layout,
    /// Registers the type in a world (a no-op if it is) and returns its id there.
    pub register: fn(&mut World) -> ComponentId,
    /// Appends the canonical encoding of the value behind the pointer: its `Entity` values mapped
    /// to their canonical form (see [`super::entity_refs`]) in place, then back.
    ///
    /// # Safety
    /// The pointer must point to a value of this entry's type, in a world the caller holds
    /// exclusively (the value is changed, then changed back), with no reference to it alive.
    pub encode_ptr: unsafe fn(Ptr<'_>, &mut Vec<u8>, &mut CaptureMapper) -> Result<(), postcard::Error>,
    /// Decodes one value from the front of the bytes (advancing them), maps its `Entity` values
    /// from their canonical form, and writes it to `dst`, without dropping what was there.
    ///
    /// # Safety
    /// `dst` must be valid for writes of this entry's type and aligned for it.
    pub decode_into: unsafe fn(&mut &[u8], NonNull<u8>, &mut RestoreMapper) -> postcard::Result<()>,
    /// Drops a value `decode_into` wrote (when the rebuild stops before it could insert it).
    ///
    /// # Safety
    /// `ptr` must point to a valid value of this entry's type, which is not used afterwards.
    pub drop_in_place: unsafe fn(NonNull<u8>),
    /// Whether the type is a relationship (like `ChildOf`): the rebuild inserts its values after
    /// every entity's row, in the order their targets (like `Children`) list them.
    pub relationship: bool,
}

/// Appends the postcard encoding of `value` to `out` (what `postcard::to_io` writes, without the
/// `io::Write` detour per byte).
pub(crate) fn encode_into<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), postcard::Error> {
    postcard::serialize_with_flavor(value, VecFlavor(out))
}

/// A postcard output that appends to a `Vec`.
struct VecFlavor<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for VecFlavor<'_> {
    type Output = ();

    #[inline]
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    #[inline]
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// See [`ComponentEntry::encode_ptr`]. For a type without entities (`Component::map_entities`
/// left as Bevy's default no-op) the mapping compiles to nothing.
unsafe fn encode_ptr<T: Component + Serialize>(
    ptr: Ptr<'_>,
    out: &mut Vec<u8>,
    mapper: &mut CaptureMapper,
) -> Result<(), postcard::Error> {
    // SAFETY: the caller guarantees that `ptr` points to a `T` in storage it holds exclusively
    // (the pointer comes from the storage's own allocation, not from a shared reference), and
    // that no reference to the value is alive: this is the only one until it is dropped below.
    let value = unsafe { &mut *ptr.as_ptr().cast::<T>() };
    T::map_entities(value, mapper);
    let encoded = encode_into(&*value, out);
    T::map_entities(value, &mut mapper.original());
    encoded
}

/// See [`ComponentEntry::decode_into`].
unsafe fn decode_into<T: Component + DeserializeOwned>(
    bytes: &mut &[u8],
    dst: NonNull<u8>,
    mapper: &mut RestoreMapper,
) -> Result<(), postcard::Error> {
    let (mut value, rest) = postcard::take_from_bytes::<T>(bytes)?;
    *bytes = rest;
    T::map_entities(&mut value, mapper);
    // SAFETY: the caller guarantees that `dst` is valid for writes of a `T` and aligned.
    unsafe { dst.cast::<T>().write(value) };
    Ok(())
}

/// See [`ComponentEntry::drop_in_place`].
unsafe fn drop_in_place<T>(ptr: NonNull<u8>) {
    // SAFETY: the caller guarantees that `ptr` points to a valid `T` that is not used afterwards.
    unsafe { ptr.cast::<T>().drop_in_place() };
}

/// A decoded resource value, waiting for the rebuild to allocate the entities it may refer to.
pub(crate) type DecodedResource = Box<dyn Any + Send>;

/// A decoded resource value and the bytes after it.
pub(crate) type DecodedAndRest<'a> = postcard::Result<(DecodedResource, &'a [u8])>;

/// Encodes and restores one registered resource type.
pub(crate) struct ResourceEntry {
    pub name: &'static str,
    /// Appends the resource's canonical encoding if the world has it; returns whether it did.
    ///
    /// # Safety
    /// The caller must hold the world exclusively, with no reference to the resource alive: the
    /// value's `Entity` values are mapped in place and back (as [`ComponentEntry::encode_ptr`]
    /// does).
    pub encode: unsafe fn(&World, &mut Vec<u8>, &mut CaptureMapper) -> Result<bool, postcard::Error>,
    /// Decodes one value from the front of the bytes; returns it and the rest.
    pub decode: for<'a> fn(&'a [u8]) -> DecodedAndRest<'a>,
    /// Maps a decoded value's `Entity` values from their canonical form and inserts it.
    pub insert: fn(DecodedResource, &mut World, &mut RestoreMapper),
    pub remove: fn(&mut World),
}

/// Decodes a view event and triggers it in the model world.
pub(crate) struct ViewEventEntry {
    pub name: &'static str,
    pub type_id: TypeId,
    pub trigger: fn(&mut World, ViewId, &[u8]) -> Result<(), postcard::Error>,
}

/// Decodes a timer event and triggers it in the model world.
pub(crate) struct TimerEntry {
    pub name: &'static str,
    pub trigger: fn(&mut World, &[u8]) -> Result<(), postcard::Error>,
}

/// Registers a model → view message type in the app and delivers values of it.
pub(crate) struct ViewMessageEntry {
    pub name: &'static str,
    pub add_to_app: fn(&mut App),
    pub deliver: fn(&mut World, Box<dyn Any + Send + Sync>),
}

/// Inserts `Persisted<T>` from the persisted JSON (if any); returns the load error, if any.
pub(crate) type PersistLoader = Box<dyn Fn(&mut World, Option<&[u8]>) -> Option<String> + Send + Sync>;

/// Loads persisted data into `Persisted<T>` before `ModelInit`, and removes it after.
pub(crate) struct PersistenceEntry {
    pub load: PersistLoader,
    pub remove: fn(&mut World),
}

/// Everything a model registered, in order.
#[derive(Default)]
pub(crate) struct ModelRegistry {
    pub persistence: Option<PersistenceEntry>,
    pub components: Vec<ComponentEntry>,
    pub resources: Vec<ResourceEntry>,
    pub view_events: Vec<ViewEventEntry>,
    pub timers: Vec<TimerEntry>,
    pub view_messages: Vec<ViewMessageEntry>,
    /// `(kind, type name)` of every registration, in order: part of the code hash.
    pub signature: Vec<(&'static str, &'static str)>,
}

impl ModelRegistry {
    /// Registers a component type; returns `false` if it was registered already.
    pub fn component<T: Component + Serialize + DeserializeOwned>(&mut self) -> bool {
        if self.components.iter().any(|c| c.type_id == TypeId::of::<T>()) {
            return false;
        }
        self.signature.push(("component", type_name::<T>()));
        self.components.push(ComponentEntry {
            name: type_name::<T>(),
            type_id: TypeId::of::<T>(),
            encode: |entity, out| match entity.get::<T>() {
                Some(value) => postcard::to_io(value, out).map(|_| true),
                None => Ok(false),
            },
            layout: Layout::new::<T>(),
            register: |world| world.register_component::<T>(),
            encode_ptr: encode_ptr::<T>,
            decode_into: decode_into::<T>,
            drop_in_place: drop_in_place::<T>,
            relationship: is_relationship::<T>(),
        });
        true
    }

    pub fn resource<T: Resource + Serialize + DeserializeOwned>(&mut self) -> bool {
        if self.resources.iter().any(|r| r.name == type_name::<T>()) {
            return false;
        }
        self.signature.push(("resource", type_name::<T>()));
        self.resources.push(ResourceEntry {
            name: type_name::<T>(),
            encode: |world, out, mapper| {
                let Some(ptr) = world.component_id::<T>().and_then(|id| world.get_resource_by_id(id)) else {
                    return Ok(false);
                };
                // SAFETY: `ptr` points to the `T` resource; the caller holds the world
                // exclusively and no reference to the value is alive (`encode`'s contract).
                unsafe { encode_ptr::<T>(ptr, out, mapper) }.map(|()| true)
            },
            decode: |bytes| {
                let (value, rest) = postcard::take_from_bytes::<T>(bytes)?;
                Ok((Box::new(value) as DecodedResource, rest))
            },
            insert: |value, world, mapper| {
                if let Ok(mut value) = value.downcast::<T>() {
                    T::map_entities(&mut *value, mapper);
                    world.insert_resource(*value);
                }
            },
            remove: |world| {
                world.remove_resource::<T>();
            },
        });
        true
    }

    pub fn view_event<T: Serialize + DeserializeOwned + Send + Sync + 'static>(&mut self) -> bool {
        if self.view_events.iter().any(|e| e.type_id == TypeId::of::<T>()) {
            return false;
        }
        self.signature.push(("view event", type_name::<T>()));
        self.view_events.push(ViewEventEntry {
            name: type_name::<T>(),
            type_id: TypeId::of::<T>(),
            trigger: |world, view, bytes| {
                let event: T = postcard::from_bytes(bytes)?;
                world.trigger(FromView { view, event });
                Ok(())
            },
        });
        true
    }

    pub fn timer<T: Event + Serialize + DeserializeOwned>(&mut self) -> bool
    where
        for<'a> T::Trigger<'a>: Default,
    {
        if self.timers.iter().any(|t| t.name == type_name::<T>()) {
            return false;
        }
        self.signature.push(("timer", type_name::<T>()));
        self.timers.push(TimerEntry {
            name: type_name::<T>(),
            trigger: |world, bytes| {
                let event: T = postcard::from_bytes(bytes)?;
                world.trigger(event);
                Ok(())
            },
        });
        true
    }

    pub fn view_message<T: Message>(&mut self) -> bool {
        if self.view_messages.iter().any(|m| m.name == type_name::<T>()) {
            return false;
        }
        self.signature.push(("view message", type_name::<T>()));
        self.view_messages.push(ViewMessageEntry {
            name: type_name::<T>(),
            add_to_app: |app| {
                app.add_message::<T>();
            },
            deliver: |world, message| {
                if let Ok(message) = message.downcast::<T>() {
                    world.write_message(*message);
                }
            },
        });
        true
    }
}
