//! The harness catches state that lives outside the snapshot: replicas that hold it diverge, and
//! the divergence is detected and reported — not missed.

mod common;

use bevy::prelude::*;
use bevy_synq::ModelProblem;
use bevy_synq::prelude::*;
use common::{Harness, test_session};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Component, Serialize, Deserialize)]
struct Counter(u64);

/// Process-local state smuggled into the model: each replica has its own copy, and a late joiner's
/// copy starts from zero.
#[derive(Resource)]
struct Smuggled(Arc<AtomicU64>);

fn leaky_model(counter: Arc<AtomicU64>) -> impl Fn(&mut ModelApp) + Send + Sync {
    move |model: &mut ModelApp| {
        model
            .register_component::<Counter>()
            .add_systems(ModelInit, |mut commands: Commands| {
                commands.spawn(Counter(0));
            })
            .add_systems(ModelUpdate, |smuggled: Res<Smuggled>, mut counters: Query<&mut Counter>| {
                let hidden = smuggled.0.fetch_add(1, Ordering::Relaxed);
                for mut counter in &mut counters {
                    counter.0 = hidden;
                }
            });
        model.world_mut().insert_resource(Smuggled(counter.clone()));
    }
}

#[test]
fn state_outside_the_snapshot_is_detected_as_divergence() {
    let mut session = test_session("hidden");
    session.snapshot_policy.every_ms = 1_000;
    let mut h = Harness::new(session, Box::new(|| Box::new(leaky_model(Arc::new(AtomicU64::new(0))))));
    h.add_client(|_| {});
    h.add_client(|_| {});
    h.run_rounds(30, 100);
    // A late joiner restores the snapshot, but its smuggled counter starts again from zero.
    let late = h.add_client(|_| {});
    h.run_rounds(60, 100);

    let reported: Vec<_> = (0..h.apps.len()).flat_map(|i| h.divergences(i)).collect();
    assert!(!reported.is_empty(), "the divergence was missed");
    let divergence = &reported[0];
    assert!(divergence.groups.len() >= 2, "{divergence:?}");
    let late_view = h.view_id(late);
    assert!(
        divergence.groups.iter().skip(1).any(|g| g.contains(&late_view)),
        "the late joiner should be outside the consensus: {divergence:?}"
    );
    assert!(h.apps.iter().any(|app| !app.world().resource::<common::Divergences>().0.is_empty()));
    // It names what differs: the counter the smuggled state is written into, nothing else.
    assert_eq!(divergence.differing, vec![format!("component {}", std::any::type_name::<Counter>())], "{divergence:?}");
}

#[derive(Component)]
struct NotRegistered;

fn model_with_unregistered_component(model: &mut ModelApp) {
    model
        .register_component::<Counter>()
        .add_systems(ModelInit, |mut commands: Commands| {
            commands.spawn((Counter(0), NotRegistered));
        })
        .add_systems(ModelUpdate, |mut counters: Query<&mut Counter>| {
            for mut counter in &mut counters {
                counter.0 += 1;
            }
        });
}

#[test]
fn unregistered_components_are_reported() {
    let mut h = Harness::new(test_session("unregistered"), Box::new(|| Box::new(model_with_unregistered_component)));
    let app = h.add_client(|_| {});
    h.run_rounds(5, 100);
    let problems = &h.apps[app].world().resource::<common::Problems>().0;
    assert!(
        problems.iter().any(|p| matches!(p, SynqProblem::Model(ModelProblem::UnregisteredComponents(names)) if names.iter().any(|n| n.contains("NotRegistered")))),
        "not reported: {problems:?}"
    );
    assert!(
        !problems.iter().any(|p| matches!(p, SynqProblem::Model(ModelProblem::UntrackedEntities(_)))),
        "false report: {problems:?}"
    );
}

/// `Local`s in model systems are rebuilt at every snapshot point on every replica, like the rest
/// of the world: they reset identically everywhere, so they cannot make replicas diverge (but they
/// do not survive a snapshot point — keep state in registered components and resources).
#[test]
fn locals_reset_at_snapshot_points_on_every_replica() {
    fn model(model: &mut ModelApp) {
        model
            .register_component::<Counter>()
            .add_systems(ModelInit, |mut commands: Commands| {
                commands.spawn(Counter(0));
            })
            .add_systems(ModelUpdate, |mut local: Local<u64>, mut counters: Query<&mut Counter>| {
                *local += 1;
                for mut counter in &mut counters {
                    counter.0 = *local;
                }
            });
    }
    let mut session = test_session("locals");
    session.snapshot_policy.every_ms = 1_000;
    let mut h = Harness::new(session, Box::new(|| Box::new(model)));
    h.add_client(|_| {});
    h.run_rounds(25, 100);
    h.add_client(|_| {});
    h.run_rounds(40, 100);
    h.settle();
    h.assert_converged();
}
