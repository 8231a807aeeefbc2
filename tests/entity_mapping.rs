//! `Entity` values in model state survive snapshot points: a `ChildOf` hierarchy (with its
//! `Children` order), components and resources holding entities, and references to entities that
//! are gone — on long-running replicas and on a late joiner that restored them from a snapshot.

mod common;

use bevy::ecs::entity::MapEntities;
use bevy::prelude::*;
use bevy_synq::ModelWorld;
use bevy_synq::prelude::*;
use common::{Harness, test_session};
use serde::{Deserialize, Serialize};

/// A model entity's name in these tests.
#[derive(Component, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Node(u32);

/// Steps the model ran, to script changes at fixed steps.
#[derive(Resource, Serialize, Deserialize, Default, Clone, Debug)]
struct Script(u32);

/// Each parent's fold of its children's names in `Children` order: a replica whose `Children`
/// order differed would have another state hash from then on.
#[derive(Component, Serialize, Deserialize, Default, Clone, Copy, Debug)]
struct Fold(u64);

const ROOT: u32 = 1;
const A: u32 = 2;
const X: u32 = 3;
const B: u32 = 4;
const C: u32 = 5;
const A1: u32 = 6;
const A2: u32 = 7;
const B1: u32 = 8;

/// 200 ms snapshot points (4 steps of 50 ms).
fn session(name: &str) -> SessionConfig {
    let mut session = test_session(name);
    session.snapshot_policy.every_ms = 200;
    session
}

fn named(nodes: &Query<(Entity, &Node)>, name: u32) -> Option<Entity> {
    nodes.iter().find(|(_, node)| node.0 == name).map(|(entity, _)| entity)
}

/// ROOT ─ A ─ X, A1, A2; ROOT ─ B ─ B1; ROOT ─ C. Then, each a few snapshot points apart: X moves
/// to ROOT (last in its `Children`, though its `ModelId` is lower than B's and C's) at step 10, B1
/// is despawned at step 20, A with its children at step 40.
fn hierarchy_model(model: &mut ModelApp) {
    model
        .register_component::<Node>()
        .register_component::<ChildOf>()
        .register_component::<Fold>()
        .init_resource::<Script>()
        .add_systems(ModelInit, |mut commands: Commands| {
            let root = commands.spawn((Node(ROOT), Fold::default())).id();
            let a = commands.spawn((Node(A), Fold::default(), ChildOf(root))).id();
            commands.spawn((Node(X), ChildOf(a)));
            let b = commands.spawn((Node(B), Fold::default(), ChildOf(root))).id();
            commands.spawn((Node(C), ChildOf(root)));
            commands.spawn((Node(A1), ChildOf(a)));
            commands.spawn((Node(A2), ChildOf(a)));
            commands.spawn((Node(B1), ChildOf(b)));
        })
        .add_systems(
            ModelUpdate,
            (
                |mut script: ResMut<Script>, nodes: Query<(Entity, &Node)>, mut commands: Commands| {
                    script.0 += 1;
                    let find = |name| named(&nodes, name).expect("scripted node exists");
                    match script.0 {
                        10 => {
                            commands.entity(find(X)).insert(ChildOf(find(ROOT)));
                        }
                        20 => commands.entity(find(B1)).despawn(),
                        40 => commands.entity(find(A)).despawn(),
                        _ => {}
                    }
                },
                |mut parents: Query<(&Children, &mut Fold)>, nodes: Query<&Node>| {
                    for (children, mut fold) in &mut parents {
                        for child in children {
                            let name = nodes.get(*child).map_or(999, |node| node.0);
                            fold.0 = fold.0.wrapping_mul(31).wrapping_add(u64::from(name));
                        }
                    }
                },
            )
                .chain(),
        );
}

/// Each node's name, its parent's name, and its children's names in `Children` order, by name;
/// checks that `ChildOf` and `Children` agree.
fn structure(app: &App) -> Vec<(u32, Option<u32>, Vec<u32>)> {
    let world = app.world().resource::<ModelWorld>().runtime().expect("model running").world();
    let name = |entity: Entity| world.get::<Node>(entity).expect("a node").0;
    let state = world.try_query::<(Entity, &Node)>().expect("nodes registered");
    let mut nodes: Vec<_> = state
        .iter_manual(world)
        .map(|(entity, node)| {
            let parent = world.get::<ChildOf>(entity).map(|child_of| child_of.parent());
            if let Some(parent) = parent {
                let siblings = world.get::<Children>(parent).expect("a parent has Children");
                assert!(siblings.contains(&entity), "{} is not among its parent's Children", node.0);
            }
            let children = world.get::<Children>(entity).map_or(Vec::new(), |c| c.iter().map(name).collect());
            (node.0, parent.map(name), children)
        })
        .collect();
    nodes.sort();
    nodes
}

fn script_step(app: &App) -> u32 {
    app.world().resource::<ModelWorld>().runtime().expect("model running").world().resource::<Script>().0
}

#[test]
fn a_child_of_hierarchy_keeps_its_shape_and_order_across_snapshot_points_and_for_a_late_joiner() {
    let mut h = Harness::new(session("hierarchy"), || hierarchy_model);
    h.add_client(|_| {});
    h.add_client(|_| {});
    // Past X's move and B1's despawn, several snapshot points later, before A goes.
    h.run_rounds(20, 50);
    h.settle();
    let late = h.add_client(|_| {});
    h.run_rounds(12, 50);
    h.settle();
    assert!((21..40).contains(&script_step(&h.apps[late])), "at step {}", script_step(&h.apps[late]));
    assert!(matches!(h.client(late).started_from(), Some(bevy_synq::StartKind::Snapshot { .. })));
    let before_a_goes = vec![
        (ROOT, None, vec![A, B, C, X]),
        (A, Some(ROOT), vec![A1, A2]),
        (X, Some(ROOT), vec![]),
        (B, Some(ROOT), vec![]),
        (C, Some(ROOT), vec![]),
        (A1, Some(A), vec![]),
        (A2, Some(A), vec![]),
    ];
    for app in &h.apps {
        assert_eq!(structure(app), before_a_goes);
    }

    // A goes with its children; then more points pass.
    h.run_rounds(30, 50);
    h.settle();
    assert!(script_step(&h.apps[0]) > 50);
    let after =
        vec![(ROOT, None, vec![B, C, X]), (X, Some(ROOT), vec![]), (B, Some(ROOT), vec![]), (C, Some(ROOT), vec![])];
    for app in &h.apps {
        assert_eq!(structure(app), after);
    }
    assert!(h.assert_converged() >= 6, "too few shared snapshot points");
}

/// Points at another unit; `#[entities]` keeps it pointing there across snapshot points.
#[derive(Component, Serialize, Deserialize, Clone, Copy, Debug)]
struct Target(#[entities] Entity);

/// What each unit saw of its target, step by step (its target's name, summed).
#[derive(Component, Serialize, Deserialize, Default, Clone, Copy, Debug)]
struct Seen(u64);

/// A resource holding entities, mapped with Bevy's `MapEntities` derive.
#[derive(Resource, MapEntities, Serialize, Deserialize, Clone, Debug)]
struct Focus {
    #[entities]
    main: Entity,
    #[entities]
    all: Vec<Entity>,
}

impl Default for Focus {
    fn default() -> Self {
        Self { main: Entity::PLACEHOLDER, all: Vec::new() }
    }
}

/// Five units in a ring (each targets the next; the last targets the first, an entity before it
/// in snapshot order), and `Focus` on three of them. At step 12 a sixth unit is spawned and unit 1
/// retargeted to it.
fn reference_model(model: &mut ModelApp) {
    model
        .register_component::<Node>()
        .register_component::<Target>()
        .register_component::<Seen>()
        .init_resource::<Script>()
        .init_resource::<Focus>()
        .add_systems(ModelInit, |mut commands: Commands| {
            let units: Vec<Entity> = (1..=5).map(|name| commands.spawn((Node(name), Seen::default())).id()).collect();
            for (i, unit) in units.iter().enumerate() {
                commands.entity(*unit).insert(Target(units[(i + 1) % units.len()]));
            }
            commands.insert_resource(Focus { main: units[2], all: vec![units[4], units[0], units[2]] });
        })
        .add_systems(
            ModelUpdate,
            (
                |mut script: ResMut<Script>, nodes: Query<(Entity, &Node)>, mut commands: Commands| {
                    script.0 += 1;
                    if script.0 == 12 {
                        let six = commands.spawn((Node(6), Seen::default())).id();
                        let one = named(&nodes, 1).expect("unit 1");
                        commands.entity(six).insert(Target(one));
                        commands.entity(one).insert(Target(six));
                    }
                },
                |mut units: Query<(&Target, &mut Seen)>, nodes: Query<&Node>, focus: Res<Focus>| {
                    let main = nodes.get(focus.main).map_or(0, |node| u64::from(node.0));
                    for (target, mut seen) in &mut units {
                        seen.0 += nodes.get(target.0).map_or(1000, |node| u64::from(node.0)) * 10 + main;
                    }
                },
            )
                .chain()
                .in_set(ScriptSet),
        );
}

/// Each unit's name and its target's name (`None`: its target is not a unit).
fn targets(world: &World) -> Vec<(u32, Option<u32>)> {
    let state = world.try_query::<(&Node, &Target)>().expect("registered");
    let mut targets: Vec<_> =
        state.iter_manual(world).map(|(node, target)| (node.0, world.get::<Node>(target.0).map(|n| n.0))).collect();
    targets.sort();
    targets
}

fn model_world(app: &App) -> &World {
    app.world().resource::<ModelWorld>().runtime().expect("model running").world()
}

#[test]
fn components_and_resources_holding_entities_keep_their_referents_across_points_and_a_late_join() {
    let mut h = Harness::new(session("references"), || reference_model);
    h.add_client(|_| {});
    h.add_client(|_| {});
    h.run_rounds(20, 50);
    h.settle();
    let late = h.add_client(|_| {});
    h.run_rounds(20, 50);
    h.settle();
    assert!(script_step(&h.apps[late]) > 30);
    assert!(matches!(h.client(late).started_from(), Some(bevy_synq::StartKind::Snapshot { .. })));
    for app in &h.apps {
        let world = model_world(app);
        assert_eq!(
            targets(world),
            vec![(1, Some(6)), (2, Some(3)), (3, Some(4)), (4, Some(5)), (5, Some(1)), (6, Some(1))]
        );
        let focus = world.resource::<Focus>();
        let name = |entity: Entity| world.get::<Node>(entity).map(|node| node.0);
        assert_eq!(name(focus.main), Some(3));
        assert_eq!(focus.all.iter().map(|entity| name(*entity)).collect::<Vec<_>>(), [Some(5), Some(1), Some(3)]);
    }
    assert!(h.assert_converged() >= 6, "too few shared snapshot points");
}

/// Unit 3 is despawned at step 6: unit 2's `Target` and two `Focus` entries then refer to an
/// entity that is gone, and `Focus` also holds `Entity::PLACEHOLDER`.
fn dangling_model(model: &mut ModelApp) {
    reference_model(model);
    model.add_systems(
        ModelUpdate,
        (|script: Res<Script>, nodes: Query<(Entity, &Node)>, mut focus: ResMut<Focus>, mut commands: Commands| {
            if script.0 == 6 {
                let three = named(&nodes, 3).expect("unit 3");
                commands.entity(three).despawn();
                focus.main = three;
                focus.all = vec![three, Entity::PLACEHOLDER, named(&nodes, 4).expect("unit 4"), three];
            }
        })
        .after(ScriptSet),
    );
}

/// The reference model's systems (the dangling model's runs after them).
#[derive(SystemSet, Clone, Debug, PartialEq, Eq, Hash)]
struct ScriptSet;

#[test]
fn a_reference_to_a_despawned_entity_becomes_the_placeholder_at_the_next_point_on_every_replica() {
    let mut h = Harness::new(session("dangling"), || dangling_model);
    h.add_client(|_| {});
    h.add_client(|_| {});
    h.run_rounds(20, 50);
    h.settle();
    let late = h.add_client(|_| {});
    h.run_rounds(10, 50);
    h.settle();
    assert!(script_step(&h.apps[late]) > 16);
    for app in &h.apps {
        let world = model_world(app);
        assert_eq!(world.get::<Target>(unit(world, 2)).expect("unit 2 has a target").0, Entity::PLACEHOLDER);
        let focus = world.resource::<Focus>();
        assert_eq!(focus.main, Entity::PLACEHOLDER);
        assert_eq!(focus.all, vec![Entity::PLACEHOLDER, Entity::PLACEHOLDER, unit(world, 4), Entity::PLACEHOLDER]);
    }
    h.assert_converged();
}

fn unit(world: &World, name: u32) -> Entity {
    let state = world.try_query::<(Entity, &Node)>().expect("registered");
    state.iter_manual(world).find(|(_, node)| node.0 == name).map(|(entity, _)| entity).expect("unit exists")
}

/// A relationship of the game's own: who likes whom. `LikedBy` lists the fans in the order they
/// came.
#[derive(Component, Serialize, Deserialize, Clone, Copy, Debug)]
#[relationship(relationship_target = LikedBy)]
struct Likes(Entity);

#[derive(Component, Debug)]
#[relationship_target(relationship = Likes)]
struct LikedBy(Vec<Entity>);

/// Persons 1 to 4; 4, then 2, then 3 come to like 1 (one a step); at step 8 person 2 turns to 4.
fn fans_model(model: &mut ModelApp) {
    model.register_component::<Node>().register_component::<Likes>().init_resource::<Script>().add_systems(
        ModelUpdate,
        |mut script: ResMut<Script>, nodes: Query<(Entity, &Node)>, mut commands: Commands| {
            script.0 += 1;
            let find = |name| named(&nodes, name).expect("person exists");
            match script.0 {
                1 => {
                    for name in 1..=4 {
                        commands.spawn(Node(name));
                    }
                }
                2..=4 => {
                    let fan = [4, 2, 3][script.0 as usize - 2];
                    commands.entity(find(fan)).insert(Likes(find(1)));
                }
                8 => {
                    commands.entity(find(2)).insert(Likes(find(4)));
                }
                _ => {}
            }
        },
    );
}

/// Each person's fans by name, in `LikedBy` order.
fn fans(world: &World) -> Vec<(u32, Vec<u32>)> {
    let state = world.try_query::<(&Node, Option<&LikedBy>)>().expect("registered");
    let name = |entity: &Entity| world.get::<Node>(*entity).expect("a person").0;
    let mut fans: Vec<_> = state
        .iter_manual(world)
        .map(|(node, liked)| (node.0, liked.map_or(Vec::new(), |liked| liked.0.iter().map(name).collect())))
        .collect();
    fans.sort();
    fans
}

#[test]
fn a_relationship_of_the_game_keeps_its_targets_order_across_points_and_a_late_join() {
    let mut h = Harness::new(session("fans"), || fans_model);
    h.add_client(|_| {});
    h.add_client(|_| {});
    h.run_rounds(14, 50);
    h.settle();
    let late = h.add_client(|_| {});
    h.run_rounds(12, 50);
    h.settle();
    assert!(script_step(&h.apps[late]) > 10);
    for app in &h.apps {
        assert_eq!(fans(model_world(app)), vec![(1, vec![4, 3]), (2, vec![]), (3, vec![]), (4, vec![2])]);
    }
    assert!(h.assert_converged() >= 4, "too few shared snapshot points");
}

#[test]
#[should_panic(expected = "target side of a relationship")]
fn registering_the_target_of_a_relationship_is_refused() {
    #[derive(Component, Serialize, Deserialize)]
    #[relationship(relationship_target = Followers)]
    struct Follows(Entity);

    #[derive(Component, Serialize, Deserialize)]
    #[relationship_target(relationship = Follows)]
    struct Followers(Vec<Entity>);

    let _ = bevy_synq::ModelRuntime::start_fresh(
        |model: &mut ModelApp| {
            model.register_component::<Follows>().register_component::<Followers>();
        },
        bevy_synq::RuntimeOptions::default(),
    );
}
