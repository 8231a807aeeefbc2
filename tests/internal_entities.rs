//! Resources, observers and registered systems are entities in Bevy 0.19, but they are never
//! model entities: queries in model systems and observers do not see them (even a query with
//! only optional terms, or `Query<Entity>`), the snapshot never carries them, and a registered
//! component inserted into one on purpose is reported as such — not as Bevy's internal components
//! being "unregistered model components".

mod common;

use bevy::ecs::query::Allow;
use bevy::ecs::resource::IsResource;
use bevy::prelude::*;
use bevy_synq::prelude::*;
use bevy_synq::{ModelProblem, ModelWorld};
use common::{Harness, current_hash, hex, test_session};
use serde::{Deserialize, Serialize};

#[derive(Component, Serialize, Deserialize, Clone, Copy, Debug)]
struct A(u32);

#[derive(Component, Serialize, Deserialize, Clone, Copy, Debug)]
struct B(u32);

/// What model code saw.
#[derive(Resource, Serialize, Deserialize, Default, Clone, Debug)]
struct Tally {
    spawned: u64,
    /// Steps at which an optional-only query saw something other than the model entities.
    system_mismatches: u64,
    /// The same, in an observer (observers are built before the model's first step).
    observer_mismatches: u64,
    observer_runs: u64,
    wipes: u64,
    spawned_after_last_wipe: u64,
}

/// The number of model entities, from the snapshot's point of view: entities with a `ModelId`
/// that queries can see.
fn model_entity_count(ids: &Query<(), With<ModelId>>) -> usize {
    ids.iter().count()
}

fn spawn_wave(time: Res<ModelTime>, mut tally: ResMut<Tally>, mut commands: Commands) {
    if time.steps().is_multiple_of(4) {
        commands.spawn(A(tally.spawned as u32));
        commands.spawn((A(0), B(tally.spawned as u32)));
        tally.spawned += 2;
        tally.spawned_after_last_wipe += 2;
    }
}

/// Sees every entity, with optional terms only, and gives the ones without `B` a `B`.
fn touch_everything(
    everything: Query<(Entity, Option<&A>, Option<&B>)>,
    ids: Query<(), With<ModelId>>,
    mut tally: ResMut<Tally>,
    mut commands: Commands,
) {
    if everything.iter().count() != model_entity_count(&ids) {
        tally.system_mismatches += 1;
    }
    for (entity, _, b) in &everything {
        if b.is_none() {
            commands.entity(entity).insert(B(1));
        }
    }
}

/// Despawns everything a plain `Query<Entity>` sees, now and then.
fn wipe(time: Res<ModelTime>, everything: Query<Entity>, mut tally: ResMut<Tally>, mut commands: Commands) {
    if time.steps() % 30 == 15 {
        for entity in &everything {
            commands.entity(entity).despawn();
        }
        tally.wipes += 1;
        tally.spawned_after_last_wipe = 0;
    }
}

fn model(model: &mut ModelApp) {
    model
        .register_component::<A>()
        .register_component::<B>()
        .init_resource::<Tally>()
        .add_systems(ModelUpdate, (spawn_wave, touch_everything, wipe).chain())
        .add_observer(
            |_: On<ViewJoined>,
             everything: Query<(Entity, Option<&A>, Option<&B>)>,
             ids: Query<(), With<ModelId>>,
             mut tally: ResMut<Tally>| {
                tally.observer_runs += 1;
                if everything.iter().count() != model_entity_count(&ids) {
                    tally.observer_mismatches += 1;
                }
            },
        );
}

fn tally(app: &App) -> Tally {
    let runtime = app.world().resource::<ModelWorld>().runtime().expect("model running");
    runtime.world().resource::<Tally>().clone()
}

#[test]
fn model_queries_never_see_resources_observers_or_systems() {
    let mut session = test_session("internal-entities");
    session.snapshot_policy.every_ms = 500;
    let mut h = Harness::new(session, Box::new(|| Box::new(model)));
    h.add_client(|_| {});
    h.add_client(|_| {});
    h.run_rounds(30, 100);
    h.add_client(|_| {});
    h.run_rounds(50, 100);
    h.settle();
    // Equal hashes at every shared point, no problem reported (no ghost model entities, no
    // "unregistered" Bevy internals), and the model still runs after every wipe.
    let shared = h.assert_converged();
    assert!(shared >= 3, "only {shared} snapshot points shared");
    for app in &h.apps {
        let tally = tally(app);
        assert_eq!(tally.system_mismatches, 0, "{tally:?}");
        assert_eq!(tally.observer_mismatches, 0, "{tally:?}");
        assert_eq!(tally.observer_runs, 3, "{tally:?}");
        assert!(tally.wipes >= 2, "{tally:?}");
        assert!(tally.spawned_after_last_wipe > 0, "nothing spawned after the last wipe: {tally:?}");
        let runtime = app.world().resource::<ModelWorld>().runtime().expect("model running");
        let model_entities = runtime.world().resource::<ModelEntities>().len() as u64;
        assert_eq!(model_entities, tally.spawned_after_last_wipe, "{tally:?}");
    }
}

#[derive(Resource, Serialize, Deserialize, Default, Clone, Debug)]
struct Score(u64);

/// Reaches a resource's entity on purpose (`Allow<IsResource>`) and inserts a model component
/// into it.
fn misuse(model: &mut ModelApp) {
    model
        .register_component::<A>()
        .init_resource::<Score>()
        .add_systems(ModelInit, |mut commands: Commands| {
            commands.spawn(A(1));
        })
        .add_systems(
            ModelUpdate,
            |time: Res<ModelTime>,
             mut score: ResMut<Score>,
             resource: Query<Entity, (With<Score>, Allow<IsResource>)>,
             mut commands: Commands| {
                score.0 += 1;
                if time.steps() == 10 {
                    commands.entity(resource.single().expect("one Score")).insert(A(99));
                }
            },
        );
}

#[test]
fn a_model_component_on_a_resource_entity_is_reported_and_not_captured() {
    let mut session = test_session("internal-entities-misuse");
    session.snapshot_policy.every_ms = 500;
    let mut h = Harness::new(session, Box::new(|| Box::new(misuse)));
    h.add_client(|_| {});
    h.add_client(|_| {});
    h.run_rounds(20, 100);
    let late = h.add_client(|_| {});
    h.run_rounds(20, 100);
    h.settle();

    let hashes: Vec<_> = h.apps.iter_mut().map(current_hash).collect();
    assert!(hashes.windows(2).all(|w| w[0] == w[1]), "{:?}", hashes.iter().map(|h| hex(&h[..6])).collect::<Vec<_>>());
    for (i, app) in h.apps.iter().enumerate() {
        let problems = &app.world().resource::<common::Problems>().0;
        let reported = problems.iter().any(|p| {
            matches!(p, SynqProblem::Model(ModelProblem::ModelComponentsOnInternalEntities(found))
                if found.iter().any(|f| f.contains("::A on the entity of the resource") && f.contains("::Score")))
        });
        // The late joiner restored a snapshot taken after the point that dropped the component.
        assert_eq!(reported, i != late, "replica {i}: {problems:?}");
        assert!(
            !problems.iter().any(|p| matches!(p, SynqProblem::Model(ModelProblem::UnregisteredComponents(_)))),
            "Bevy internals reported as unregistered model components: {problems:?}"
        );
        // The snapshot point dropped it: one model entity, and the resource is a resource again.
        let runtime = app.world().resource::<ModelWorld>().runtime().expect("model running");
        let world = runtime.world();
        assert_eq!(world.resource::<ModelEntities>().len(), 1);
        let mut with_a = world.try_query_filtered::<&A, Allow<IsResource>>().expect("A is registered");
        assert_eq!(with_a.iter(world).count(), 1);
        assert!(world.resource::<Score>().0 > 10);
    }
}
