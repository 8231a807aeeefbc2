//! The canonical rebuild at every snapshot point is invisible to model code: observers do not
//! run for the entities and resources it restores (an `On<Add, T>` observer counts exactly the
//! real spawns, and a timer it arms fires once per spawn), and component hooks, which Bevy 0.19
//! cannot skip, run while `bevy_synq::snapshot::rebuilding` says so — on every replica and on a
//! late joiner alike.

mod common;

use bevy::ecs::lifecycle::HookContext;
use bevy::ecs::world::DeferredWorld;
use bevy::prelude::*;
use bevy_synq::ModelWorld;
use bevy_synq::prelude::*;
use common::{Harness, test_session};
use serde::{Deserialize, Serialize};

/// A model entity whose hooks count, and whose `Add` observer arms a timer.
#[derive(Component, Serialize, Deserialize, Clone, Copy, Debug)]
#[component(on_add = ship_added, on_insert = ship_inserted)]
struct Ship(u32);

/// What model code saw. Registered: part of the snapshot, so replicas that saw different things
/// have different state hashes.
#[derive(Resource, Serialize, Deserialize, Default, Clone, Debug, PartialEq, Eq)]
struct Counts {
    spawned: u64,
    observed_add: u64,
    observed_insert: u64,
    observed_remove: u64,
    expired: u64,
    /// `on_add` hook calls outside rebuilds (it checks `rebuilding`).
    hook_add_real: u64,
    /// Every `on_add` hook call, rebuilds included.
    hook_add_all: u64,
    /// `on_insert` hook calls outside rebuilds.
    hook_insert_real: u64,
    /// `On<Insert, Level>` calls (a resource is restored at every rebuild too).
    observed_resource: u64,
    /// `Level`'s `on_insert` hook calls outside rebuilds.
    hook_resource_real: u64,
}

#[derive(Resource, Serialize, Deserialize, Default, Clone, Debug)]
#[component(on_insert = level_inserted)]
struct Level(u32);

#[derive(Event, Serialize, Deserialize, Clone, Copy, Debug)]
struct Expire(ModelId);

const SHIPS: u64 = 24;
const LIFETIME_MS: u64 = 700;

fn ship_added(mut world: DeferredWorld, _: HookContext) {
    let rebuilding = bevy_synq::snapshot::rebuilding(&world);
    let mut counts = world.resource_mut::<Counts>();
    counts.hook_add_all += 1;
    if !rebuilding {
        counts.hook_add_real += 1;
    }
}

fn ship_inserted(mut world: DeferredWorld, _: HookContext) {
    if !bevy_synq::snapshot::rebuilding(&world) {
        world.resource_mut::<Counts>().hook_insert_real += 1;
    }
}

fn level_inserted(mut world: DeferredWorld, _: HookContext) {
    // Resources are restored at every rebuild, with their hooks.
    if !bevy_synq::snapshot::rebuilding(&world) {
        world.resource_mut::<Counts>().hook_resource_real += 1;
    }
}

fn model(model: &mut ModelApp) {
    model
        .register_component::<Ship>()
        .init_resource::<Counts>()
        .init_resource::<Level>()
        .add_timer_event::<Expire>()
        .add_systems(ModelUpdate, spawn_ships)
        .add_observer(
            |add: On<Add, Ship>, ids: Query<&ModelId>, mut timers: ModelTimers, mut counts: ResMut<Counts>| {
                counts.observed_add += 1;
                let id = *ids.get(add.entity).expect("a ship has a ModelId");
                timers.after(LIFETIME_MS, Expire(id));
            },
        )
        .add_observer(|_: On<Insert, Ship>, mut counts: ResMut<Counts>| counts.observed_insert += 1)
        .add_observer(|_: On<Remove, Ship>, mut counts: ResMut<Counts>| counts.observed_remove += 1)
        .add_observer(|_: On<Insert, Level>, mut counts: ResMut<Counts>| counts.observed_resource += 1)
        .add_observer(
            |expire: On<Expire>, entities: Res<ModelEntities>, mut commands: Commands, mut counts: ResMut<Counts>| {
                counts.expired += 1;
                if let Some(entity) = entities.get(expire.0) {
                    commands.entity(entity).despawn();
                }
            },
        );
}

fn spawn_ships(time: Res<ModelTime>, mut counts: ResMut<Counts>, level: Res<Level>, mut commands: Commands) {
    if counts.spawned < SHIPS && time.steps().is_multiple_of(3) {
        commands.spawn(Ship(counts.spawned as u32));
        counts.spawned += 1;
        commands.insert_resource(Level(level.0 + 1));
    }
}

fn counts(app: &App) -> Counts {
    let runtime = app.world().resource::<ModelWorld>().runtime().expect("model running");
    runtime.world().resource::<Counts>().clone()
}

fn ships(app: &App) -> usize {
    let runtime = app.world().resource::<ModelWorld>().runtime().expect("model running");
    runtime.world().resource::<ModelEntities>().len()
}

#[test]
fn rebuilds_fire_no_observers_and_hooks_know_they_run_in_a_rebuild() {
    let mut session = test_session("rebuild-is-silent");
    // A snapshot point every 400 ms: ships (alive 700 ms) live across several points.
    session.snapshot_policy.every_ms = 400;
    let mut h = Harness::new(session, Box::new(|| Box::new(model)));
    h.add_client(|_| {});
    h.add_client(|_| {});
    h.run_rounds(20, 100);
    let mid = counts(&h.apps[0]);
    assert!(mid.spawned > 0 && mid.spawned < SHIPS, "the late joiner should join while ships spawn: {mid:?}");
    assert!(ships(&h.apps[0]) > 0, "ships should be alive across snapshot points");
    // It restores a snapshot that holds live ships and pending timers.
    let late = h.add_client(|_| {});
    h.run_rounds(60, 100);
    h.settle();
    let shared = h.assert_converged();
    assert!(shared >= 3, "only {shared} snapshot points shared");

    for (i, app) in h.apps.iter().enumerate() {
        let counts = counts(app);
        let who = if i == late { "the late joiner" } else { "a replica" };
        assert_eq!(counts.spawned, SHIPS, "{who}: {counts:?}");
        assert_eq!(counts.observed_add, SHIPS, "{who}: On<Add, Ship> ran for rebuilds: {counts:?}");
        assert_eq!(counts.observed_insert, SHIPS, "{who}: On<Insert, Ship> ran for rebuilds: {counts:?}");
        assert_eq!(counts.observed_remove, SHIPS, "{who}: On<Remove, Ship> ran for rebuilds: {counts:?}");
        assert_eq!(counts.expired, SHIPS, "{who}: a timer armed on Add fired other than once per ship: {counts:?}");
        assert_eq!(counts.observed_resource, SHIPS, "{who}: On<Insert, Level> ran for rebuilds: {counts:?}");
        assert_eq!(counts.hook_add_real, SHIPS, "{who}: {counts:?}");
        assert_eq!(counts.hook_insert_real, SHIPS, "{who}: {counts:?}");
        // One more: `init_resource` in the plugin inserted it when the session started.
        assert_eq!(counts.hook_resource_real, SHIPS + 1, "{who}: {counts:?}");
        // Hooks do run at rebuilds (Bevy cannot skip them), once per restored ship — the same
        // number on every replica, which the equal state hashes above already prove.
        assert!(counts.hook_add_all > counts.hook_add_real, "{who}: no hook ran at a rebuild: {counts:?}");
        assert_eq!(ships(app), 0, "{who}: every ship expired");
    }
}
