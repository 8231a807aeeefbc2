//! Describing a model: [`ModelPlugin`] and [`ModelApp`].

use bevy::ecs::observer::IntoObserver;
use bevy::ecs::schedule::{IntoScheduleConfigs, ScheduleLabel, SingleThreadedExecutor};
use bevy::ecs::system::ScheduleSystem;
use bevy::prelude::*;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::events::{ViewMessageIndex, ViewOutbox};
use super::ids::{ModelEntities, ModelId, ModelIdAllocator};
use super::persist::{Migrations, PersistOutbox, PersistState, PersistVersion, Persisted};
use super::registry::ModelRegistry;
use super::registry::PersistenceEntry;
use super::rng::ModelRng;
use super::runtime::{ModelViews, SnapshotBook};
use super::time::{FutureQueue, ModelInit, ModelTime, ModelUpdate};
use super::timers::TimerIndex;

/// Describes a model: its registered types, systems and observers.
///
/// bevy_synq calls [`ModelPlugin::build`] on a fresh model world when a session starts, and again
/// at every snapshot point, when every replica rebuilds its model world from the canonical
/// snapshot. `build` must therefore be a pure function of the plugin's fields: register the same
/// things in the same order every time.
///
/// A plain `fn(&mut ModelApp)` is a `ModelPlugin`.
///
/// ```
/// use bevy::prelude::*;
/// use bevy_synq::prelude::*;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Component, Serialize, Deserialize)]
/// struct Counter(u32);
///
/// fn count(mut counters: Query<&mut Counter>) {
///     for mut counter in &mut counters {
///         counter.0 += 1;
///     }
/// }
///
/// fn model(model: &mut ModelApp) {
///     model
///         .register_component::<Counter>()
///         .add_systems(ModelInit, |mut commands: Commands| {
///             commands.spawn(Counter(0));
///         })
///         .add_systems(ModelUpdate, count);
/// }
/// ```
pub trait ModelPlugin: Send + Sync + 'static {
    /// Registers the model's types, systems and observers.
    fn build(&self, model: &mut ModelApp);
}

impl<F: Fn(&mut ModelApp) + Send + Sync + 'static> ModelPlugin for F {
    fn build(&self, model: &mut ModelApp) {
        self(model)
    }
}

/// The builder a [`ModelPlugin`] fills in: a model world under construction.
pub struct ModelApp {
    pub(crate) world: World,
    pub(crate) registry: ModelRegistry,
}

/// Settings of the model world that every replica must share.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WorldSettings {
    pub step_ms: u32,
    pub seed: [u8; 32],
}

impl ModelApp {
    /// A model world with bevy_synq's own resources, before the app's registrations.
    pub(crate) fn new(settings: WorldSettings) -> Self {
        let mut world = World::new();
        // Fixed order: in Bevy 0.19 resources are entities, and their order is part of the
        // world's structure.
        world.insert_resource(ModelTime { now_ms: 0, step_ms: settings.step_ms, steps: 0 });
        world.insert_resource(ModelRng::from_seed(settings.seed));
        world.insert_resource(FutureQueue::new(synq_protocol::INITIAL_SEQ));
        world.insert_resource(ModelViews::default());
        world.insert_resource(ModelIdAllocator::default());
        world.insert_resource(SnapshotBook::default());
        world.insert_resource(ModelEntities::default());
        world.insert_resource(ViewOutbox::default());
        world.insert_resource(PersistState::default());
        world.insert_resource(PersistOutbox::default());
        world.register_component::<ModelId>();
        for label in [ModelInit.intern(), ModelUpdate.intern()] {
            let mut schedule = Schedule::new(label);
            schedule.set_executor(SingleThreadedExecutor::new());
            world.add_schedule(schedule);
        }
        Self { world, registry: ModelRegistry::default() }
    }

    /// Runs the plugin and indexes what it registered.
    pub(crate) fn build(settings: WorldSettings, plugin: &dyn ModelPlugin) -> Self {
        let mut app = Self::new(settings);
        plugin.build(&mut app);
        app.world.init_resource::<ViewMessageIndex>();
        app.world.init_resource::<TimerIndex>();
        app
    }

    /// Registers a component type as model state: it is part of every snapshot, and entities that
    /// have it get a [`ModelId`].
    pub fn register_component<T: Component + Serialize + DeserializeOwned>(&mut self) -> &mut Self {
        if self.registry.component::<T>() {
            self.world.register_component::<T>();
            self.world.register_required_components::<T, ModelId>();
        }
        self
    }

    /// Registers a resource type as model state (part of every snapshot). Insert it in
    /// [`ModelInit`] or with [`ModelApp::insert_resource`].
    pub fn register_resource<T: Resource + Serialize + DeserializeOwned>(&mut self) -> &mut Self {
        self.registry.resource::<T>();
        self
    }

    /// Registers a resource and inserts its default value.
    pub fn init_resource<T: Resource + Default + Serialize + DeserializeOwned>(&mut self) -> &mut Self {
        self.register_resource::<T>();
        self.world.init_resource::<T>();
        self
    }

    /// Registers a resource and inserts `value`.
    pub fn insert_resource<T: Resource + Serialize + DeserializeOwned>(&mut self, value: T) -> &mut Self {
        self.register_resource::<T>();
        self.world.insert_resource(value);
        self
    }

    /// Registers a view → model event type. Views publish it with
    /// [`Publish<T>`](crate::view::Publish); the model handles [`FromView<T>`](crate::FromView)
    /// with an observer.
    pub fn add_view_event<T: Serialize + DeserializeOwned + Send + Sync + 'static>(&mut self) -> &mut Self {
        self.registry.view_event::<T>();
        self
    }

    /// Registers an event type that model code schedules with
    /// [`ModelTimers::after`](crate::ModelTimers::after).
    pub fn add_timer_event<T: Event + Serialize + DeserializeOwned>(&mut self) -> &mut Self
    where
        for<'a> T::Trigger<'a>: Default,
    {
        if self.registry.timer::<T>() {
            let index = (self.registry.timers.len() - 1) as u16;
            self.world.get_resource_or_init::<TimerIndex>().by_type.insert(std::any::TypeId::of::<T>(), index);
        }
        self
    }

    /// Registers a model → view message type: model systems send it with
    /// [`ToView<T>`](crate::ToView), and view systems read it with `MessageReader<T>`.
    pub fn add_view_message<T: Message>(&mut self) -> &mut Self {
        if self.registry.view_message::<T>() {
            let index = (self.registry.view_messages.len() - 1) as u16;
            self.world.get_resource_or_init::<ViewMessageIndex>().by_type.insert(std::any::TypeId::of::<T>(), index);
        }
        self
    }

    /// Gives the model persistence across code versions: documents of type `T` (the current
    /// version, see [`Migrations`]) are persisted with
    /// [`PersistSession`](crate::PersistSession), and when a never-seen session of the same app
    /// id and name starts, `ModelInit` finds the latest one, migrated, in
    /// `Res<Persisted<T>>`.
    pub fn add_persistence<T: serde::Serialize + DeserializeOwned + Send + Sync + 'static>(
        &mut self,
        migrations: Migrations<T>,
    ) -> &mut Self {
        let version = migrations.current();
        self.registry.signature.push(("persistence", std::any::type_name::<T>()));
        self.world.insert_resource(PersistVersion(version));
        self.registry.persistence = Some(PersistenceEntry {
            load: Box::new(move |world, json| {
                let (persisted, error) = match json.map(|json| migrations.load(json)) {
                    None => (Persisted::<T> { data: None, stored_version: None, error: None }, None),
                    Some(Ok((data, stored))) => {
                        (Persisted { data: Some(data), stored_version: Some(stored), error: None }, None)
                    }
                    Some(Err(error)) => {
                        (Persisted { data: None, stored_version: None, error: Some(error.clone()) }, Some(error))
                    }
                };
                world.insert_resource(persisted);
                error
            }),
            remove: |world| {
                world.remove_resource::<Persisted<T>>();
            },
        });
        self
    }

    /// Adds systems to a model schedule ([`ModelInit`] or [`ModelUpdate`]). They run on the
    /// single-threaded executor, in an order that is the same on every replica; order systems
    /// whose commands interact with `.chain()` or `.after()`.
    pub fn add_systems<M>(
        &mut self,
        schedule: impl ScheduleLabel,
        systems: impl IntoScheduleConfigs<ScheduleSystem, M>,
    ) -> &mut Self {
        let mut schedules = self.world.resource_mut::<Schedules>();
        match schedules.get_mut(schedule.intern()) {
            Some(existing) => {
                existing.add_systems(systems);
            }
            None => {
                let mut new = Schedule::new(schedule);
                new.set_executor(SingleThreadedExecutor::new());
                new.add_systems(systems);
                schedules.insert(new);
            }
        }
        self
    }

    /// Adds an observer to the model world: the way to handle view events
    /// ([`FromView<T>`](crate::FromView)), [`ViewJoined`](crate::ViewJoined) /
    /// [`ViewExited`](crate::ViewExited), timers and model → model events.
    pub fn add_observer<M>(&mut self, observer: impl IntoObserver<M>) -> &mut Self {
        self.world.add_observer(observer);
        self
    }

    /// The model world under construction, for setup the builder does not cover.
    pub fn world_mut(&mut self) -> &mut World {
        &mut self.world
    }
}
