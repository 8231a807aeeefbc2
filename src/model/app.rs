//! Describing a model: [`ModelPlugin`] and [`ModelApp`].

use bevy::ecs::error::FallbackErrorHandler;
use bevy::ecs::schedule::{IntoScheduleConfigs, ScheduleLabel, SingleThreadedExecutor};
use bevy::ecs::system::{IntoObserverSystem, ScheduleSystem};
use bevy::prelude::*;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::events::{ViewMessageIndex, ViewOutbox};
use super::ids::{ModelEntities, ModelId, ModelIdAllocator};
use super::lint::{self, Lints};
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
    pub(crate) lints: Lints,
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
        // Before anything of the model exists: internal entities stay out of model queries.
        crate::snapshot::prepare_model_world(&mut world);
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
        // A system parameter that fails validation says what the model world holds.
        world.insert_resource(FallbackErrorHandler(lint::model_error_handler));
        world.register_component::<ModelId>();
        for label in [ModelInit.intern(), ModelUpdate.intern()] {
            let mut schedule = Schedule::new(label);
            schedule.set_executor(SingleThreadedExecutor::new());
            world.add_schedule(schedule);
        }
        Self { world, registry: ModelRegistry::default(), lints: Lints::default() }
    }

    /// Runs the plugin, indexes what it registered, and checks and builds the model schedules.
    ///
    /// # Panics
    ///
    /// If a model system or observer reads a resource that is neither registered nor inserted by
    /// the plugin (`Res<Time>`, a resource inserted unregistered in `ModelInit`), or if two model
    /// systems have conflicting access and no order (see [`ModelApp::allow_ambiguities`]). The
    /// message names the systems and the fix. `SynqPlugin` builds the model when it is added to
    /// the app, so these errors show at startup, before any session.
    pub(crate) fn build(settings: WorldSettings, plugin: &dyn ModelPlugin) -> Self {
        let mut app = Self::new(settings);
        plugin.build(&mut app);
        app.world.init_resource::<ViewMessageIndex>();
        app.world.init_resource::<TimerIndex>();
        lint::check_build(&mut app.world, &app.registry, &app.lints);
        app
    }

    /// Registers a component type as model state: it is part of every snapshot, and entities that
    /// have it get a [`ModelId`].
    ///
    /// `Entity` values in it survive snapshot points when Bevy's entity mapping can reach them:
    /// fields marked `#[entities]` in `#[derive(Component)]`, or `#[component(map_entities)]`.
    /// A relationship (`ChildOf`, or your own `#[relationship(relationship_target = …)]`) is
    /// registered like any component; its target (`Children`) is rebuilt from it, in the same
    /// order. See `docs/determinism.md` ("Entities in model state").
    ///
    /// ```
    /// use bevy::prelude::*;
    /// use bevy_synq::prelude::*;
    /// use serde::{Deserialize, Serialize};
    ///
    /// #[derive(Component, Serialize, Deserialize)]
    /// struct Hp(u32);
    ///
    /// /// Points at another model entity; `#[entities]` keeps it pointing there.
    /// #[derive(Component, Serialize, Deserialize)]
    /// struct Target(#[entities] Entity);
    ///
    /// fn model(model: &mut ModelApp) {
    ///     model
    ///         .register_component::<Hp>()
    ///         .register_component::<Target>()
    ///         .register_component::<ChildOf>()
    ///         .add_systems(ModelInit, |mut commands: Commands| {
    ///             let ship = commands.spawn(Hp(10)).id();
    ///             commands.spawn((Hp(1), ChildOf(ship)));
    ///             commands.spawn((Hp(5), Target(ship)));
    ///         });
    /// }
    /// ```
    ///
    /// # Panics
    ///
    /// If `T` is the target side of a relationship (like `Children`): it is derived from the
    /// relationship components pointing at it; register the relationship (like `ChildOf`).
    /// bevy_synq tells the two sides apart as Bevy's derives make them: a relationship is
    /// immutable, its target mutable.
    pub fn register_component<T: Component + Serialize + DeserializeOwned>(&mut self) -> &mut Self {
        assert!(
            !super::registry::is_relationship_target::<T>(),
            "bevy_synq: {} is the target side of a relationship (like `Children`); the model world \
             rebuilds it from the relationship components that point at it. Register the \
             relationship component (like `ChildOf`) instead.",
            std::any::type_name::<T>()
        );
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
    /// single-threaded executor, in an order that is the same on every replica.
    ///
    /// Systems whose data access conflicts (one writes what the other reads or writes) must be
    /// ordered with `.chain()`, `.before()` or `.after()`: the model schedules are built with
    /// Bevy's ambiguity detection at error level, and building the model panics naming the two
    /// systems. Opt out per pair with `.ambiguous_with(other)`, per system with
    /// `.ambiguous_with_all()`, or for the whole model with [`ModelApp::allow_ambiguities`].
    /// Systems that interact only through `Commands` have no conflicting access, so Bevy cannot
    /// see them: order those too.
    ///
    /// A system that keeps state in a `Local` is warned about (once): `Local`s are not part of the
    /// snapshot and restart from their default at every snapshot point. Keep such state in a
    /// registered resource or component.
    pub fn add_systems<M>(
        &mut self,
        schedule: impl ScheduleLabel,
        systems: impl IntoScheduleConfigs<ScheduleSystem, M>,
    ) -> &mut Self {
        let mut schedules = self.world.resource_mut::<Schedules>();
        let label = schedule.intern();
        if !schedules.contains(label) {
            let mut new = Schedule::new(label);
            new.set_executor(SingleThreadedExecutor::new());
            schedules.insert(new);
        }
        let existing = schedules.get_mut(label).expect("inserted above");
        let before: Vec<_> = existing.graph().systems.iter().map(|(key, _, _)| key).collect();
        existing.add_systems(systems);
        let added: Vec<String> = existing
            .graph()
            .systems
            .iter()
            .filter(|(key, _, _)| !before.contains(key))
            .map(|(_, system, _)| system.name().to_string())
            .collect();
        self.lints.note_locals("system", std::any::type_name::<M>(), &added);
        self
    }

    /// Adds an observer to the model world: the way to handle view events
    /// ([`FromView<T>`](crate::FromView)), [`ViewJoined`](crate::ViewJoined) /
    /// [`ViewExited`](crate::ViewExited), timers and model → model events.
    ///
    /// Its resource accesses are checked when the model is built, like those of systems, and a
    /// `Local` in it is warned about (see [`ModelApp::add_systems`]).
    pub fn add_observer<E: Event, B: Bundle, M>(&mut self, observer: impl IntoObserverSystem<E, B, M>) -> &mut Self {
        let mut system = IntoObserverSystem::into_system(observer);
        let name = system.name().to_string();
        self.lints.note_locals("observer", std::any::type_name::<M>(), std::slice::from_ref(&name));
        // Initialising it here (the observer does it again when it is added, keeping its state)
        // tells which resources it reads and writes.
        let access = system.initialize(&mut self.world);
        self.lints.note_observer(name, access);
        self.world.add_observer(Observer::new(system));
        self
    }

    /// Turns off the ambiguity check of the model schedules (see [`ModelApp::add_systems`]):
    /// unordered model systems with conflicting access then run in the order the schedule
    /// happens to be built in — the same on every replica running the same code, but one that
    /// changes when systems are added or removed. Prefer ordering them, or `.ambiguous_with`
    /// for pairs whose order does not matter.
    pub fn allow_ambiguities(&mut self) -> &mut Self {
        self.lints.allow_ambiguities = true;
        self
    }

    /// The model world under construction, for setup the builder does not cover.
    ///
    /// What is inserted here is not registered: a resource inserted here is not part of the
    /// snapshot, and every rebuild inserts it again with its `build` value. That is fine for
    /// constants; a model system that changes one is warned about, and the change reported as
    /// [`ModelProblem::UnregisteredResources`](crate::ModelProblem::UnregisteredResources) at the
    /// next snapshot point. Model state belongs in [`ModelApp::insert_resource`] or
    /// [`ModelApp::init_resource`].
    pub fn world_mut(&mut self) -> &mut World {
        &mut self.world
    }
}
