//! The shadow replica (`ShadowCheck`): a second copy of the model, restored at a snapshot point
//! and fed the same messages, finds hidden state with ONE client — no second replica needed.

mod common;

use bevy::prelude::*;
use bevy_synq::prelude::*;
use bevy_synq::{EntityDifference, ShadowCheck, ShadowMismatch};
use common::adversarial::{self, with_bot};
use common::{Harness, test_session};
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Component, Serialize, Deserialize)]
struct Counter(u64);

/// A counter outside the model world: every copy of the model in the process advances it.
static HIDDEN: AtomicU64 = AtomicU64::new(0);

fn static_model(model: &mut ModelApp) {
    model
        .register_component::<Counter>()
        .add_systems(ModelInit, |mut commands: Commands| {
            commands.spawn(Counter(0));
            commands.spawn(Counter(0));
        })
        .add_systems(ModelUpdate, |mut counters: Query<(&ModelId, &mut Counter)>| {
            let hidden = HIDDEN.fetch_add(1, Ordering::Relaxed);
            for (id, mut counter) in &mut counters {
                // Only the first entity reads the hidden state: the report names that one.
                if id.get() == 1 {
                    counter.0 = counter.0.wrapping_mul(31).wrapping_add(hidden);
                } else {
                    counter.0 += 1;
                }
            }
        });
}

fn mismatches(h: &Harness, app: usize) -> Vec<ShadowMismatch> {
    h.problems(app)
        .into_iter()
        .filter_map(|p| match p {
            SynqProblem::ShadowMismatch(m) => Some(m),
            _ => None,
        })
        .collect()
}

fn shadow_session(name: &str, shadow: ShadowCheck) -> SessionConfig {
    let mut session = test_session(name).with_shadow(shadow);
    session.snapshot_policy.every_ms = 1_000;
    session
}

#[test]
fn a_static_read_by_the_model_is_caught_with_one_client() {
    let mut h = Harness::new(shadow_session("shadow-static", ShadowCheck::EveryPoint), || static_model);
    let solo = h.add_client(|_| {});
    h.run_rounds(40, 100);

    assert!(h.divergences(solo).is_empty(), "one client: no other replica to diverge from");
    let found = mismatches(&h, solo);
    assert!(!found.is_empty(), "the hidden static was missed: {:?}", h.problems(solo));
    let first = &found[0];
    let counter = std::any::type_name::<Counter>();
    assert_eq!(first.differing, vec![format!("component {counter}")], "{first:?}");
    assert!(first.since < first.time, "{first:?}");
    // Entity by entity: only the entity that reads the static differs.
    assert_eq!(first.entities, vec![EntityDifference::Components(ModelId::from_raw(1), vec![counter.to_string()])]);
    // Every interval is checked, and each finds it.
    assert!(found.len() >= 3, "{found:?}");
}

thread_local! {
    static PER_THREAD: Cell<u64> = const { Cell::new(0) };
}

#[test]
fn a_thread_local_read_by_the_model_is_caught() {
    fn model(model: &mut ModelApp) {
        model
            .register_component::<Counter>()
            .add_systems(ModelInit, |mut commands: Commands| {
                commands.spawn(Counter(0));
            })
            .add_systems(ModelUpdate, |mut counters: Query<&mut Counter>| {
                let hidden = PER_THREAD.with(|cell| {
                    cell.set(cell.get() + 1);
                    cell.get()
                });
                for mut counter in &mut counters {
                    counter.0 = hidden;
                }
            });
    }
    let mut h = Harness::new(shadow_session("shadow-thread-local", ShadowCheck::EveryPoint), || model);
    let solo = h.add_client(|_| {});
    h.run_rounds(30, 100);
    assert!(!mismatches(&h, solo).is_empty(), "the thread-local was missed");
}

#[test]
fn std_hash_map_iteration_order_is_caught() {
    /// Folds the keys of a `std` `HashMap` in iteration order: the order depends on the map's
    /// random seed, so every copy of the model computes another value.
    #[derive(Resource, Default, Serialize, Deserialize)]
    struct Folded(u64);

    fn model(model: &mut ModelApp) {
        model.init_resource::<Folded>().add_systems(ModelUpdate, |mut folded: ResMut<Folded>| {
            let map: std::collections::HashMap<u64, ()> = (0..32).map(|k| (k, ())).collect();
            for key in map.keys() {
                folded.0 = folded.0.wrapping_mul(33).wrapping_add(*key);
            }
        });
    }
    let mut h = Harness::new(shadow_session("shadow-hashmap", ShadowCheck::EveryPoint), || model);
    let solo = h.add_client(|_| {});
    h.run_rounds(30, 100);
    let found = mismatches(&h, solo);
    assert!(!found.is_empty(), "HashMap order was missed");
    let folded = format!("resource {}", std::any::type_name::<Folded>());
    assert_eq!(found[0].differing, vec![folded], "{:?}", found[0]);
}

#[test]
fn the_wall_clock_read_by_the_model_is_caught() {
    fn model(model: &mut ModelApp) {
        model
            .register_component::<Counter>()
            .add_systems(ModelInit, |mut commands: Commands| {
                commands.spawn(Counter(0));
            })
            .add_systems(ModelUpdate, |mut counters: Query<&mut Counter>| {
                let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
                for mut counter in &mut counters {
                    counter.0 = nanos as u64;
                }
            });
    }
    let mut h = Harness::new(shadow_session("shadow-clock", ShadowCheck::EveryPoint), || model);
    let solo = h.add_client(|_| {});
    h.run_rounds(30, 100);
    assert!(!mismatches(&h, solo).is_empty(), "the wall clock was missed");
}

/// State shared with the app (an `Arc` the model plugin captured) that a view system changes
/// between frames: the shadow runs a frame after the real replica, so it reads another value.
#[test]
fn state_a_view_changes_between_frames_is_caught() {
    fn model(shared: Arc<AtomicU64>) -> impl Fn(&mut ModelApp) + Send + Sync {
        move |model: &mut ModelApp| {
            let shared = shared.clone();
            model
                .register_component::<Counter>()
                .add_systems(ModelInit, |mut commands: Commands| {
                    commands.spawn(Counter(0));
                })
                .add_systems(ModelUpdate, move |mut counters: Query<&mut Counter>| {
                    for mut counter in &mut counters {
                        counter.0 += shared.load(Ordering::Relaxed);
                    }
                });
        }
    }
    let shared = Arc::new(AtomicU64::new(0));
    let mut h = Harness::new(shadow_session("shadow-view-state", ShadowCheck::EveryPoint), {
        let shared = shared.clone();
        move || model(shared.clone())
    });
    let solo = h.add_client(move |app| {
        app.add_systems(Update, move || {
            shared.fetch_add(1, Ordering::Relaxed);
        });
    });
    h.run_rounds(30, 100);
    assert!(!mismatches(&h, solo).is_empty(), "state shared with a view was missed");
}

#[test]
fn a_clean_model_runs_many_points_without_a_report() {
    let mut session = shadow_session("shadow-clean", ShadowCheck::EveryPoint);
    session.snapshot_policy.every_ms = 500;
    let mut h = Harness::new(session, || adversarial::model);
    let solo = h.add_client(with_bot(1));
    h.run_rounds(100, 100); // 10 s: about 20 snapshot points, with a bot publishing events
    h.apps[solo].world_mut().resource_mut::<adversarial::Bot>().active = false;
    h.settle();
    let points = h.client(solo).hash_history().len();
    assert!(points >= 15, "only {points} snapshot points");
    let checks = h.client(solo).shadow_checks();
    assert!(checks + 2 >= points as u64, "the shadow was compared at {checks} of {points} points");
    assert!(h.problems(solo).is_empty(), "false report: {:?}", h.problems(solo));
    h.assert_converged();
}

#[test]
fn every_nth_point_checks_one_interval_in_n() {
    let mut session = shadow_session("shadow-nth", ShadowCheck::EveryNthPoint(3));
    session.snapshot_policy.every_ms = 500;
    let mut h = Harness::new(session, || static_model);
    let solo = h.add_client(|_| {});
    h.run_rounds(100, 100); // about 20 points: a shadow starts at every third
    let found = mismatches(&h, solo);
    let checks = h.client(solo).shadow_checks();
    assert!((4..=8).contains(&checks), "compared at {checks} points");
    assert_eq!(found.len() as u64, checks, "{found:?}");
}

#[test]
fn a_clean_model_with_the_shadow_agrees_with_a_second_replica_and_a_late_joiner() {
    let mut h = Harness::new(shadow_session("shadow-late", ShadowCheck::EveryPoint), || adversarial::model);
    h.add_client(with_bot(1));
    h.add_client(with_bot(2));
    h.run_rounds(40, 100);
    // A late joiner with the shadow on too: its first shadow starts at the first point it passes.
    h.add_client(with_bot(3));
    h.run_rounds(60, 100);
    for app in &mut h.apps {
        app.world_mut().resource_mut::<adversarial::Bot>().active = false;
    }
    h.settle();
    let shared = h.assert_converged();
    assert!(shared >= 5, "only {shared} shared points");
    for i in 0..h.apps.len() {
        assert!(h.client(i).shadow_checks() >= 3, "replica {i}: the shadow was compared at too few points");
    }
}
