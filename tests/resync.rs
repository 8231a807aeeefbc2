//! A diverged replica: it is sent the consensus snapshot and names the entities it differs in,
//! without reloading; and it reloads the consensus snapshot (`SynqSession::resync`, or
//! automatically with `SessionConfig::resync_on_divergence`), names what differed, and agrees with
//! the others — and with a late joiner — from then on.

mod common;

use bevy::ecs::system::RunSystemOnce;
use bevy::prelude::*;
use bevy_synq::prelude::*;
use bevy_synq::{EntityDifference, ReloadReport, StartKind};
use common::{Harness, model_time, test_session};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Component, Serialize, Deserialize)]
struct Counter(u64);

#[derive(Component, Serialize, Deserialize)]
struct Steady(u64);

/// A model with a glitch the test can trigger on one replica: a hidden value added once to the
/// counter of that replica only, so it diverges for good (until it reloads).
fn glitchy_model(glitch: Arc<AtomicU64>) -> impl Fn(&mut ModelApp) + Send + Sync {
    move |model: &mut ModelApp| {
        let glitch = glitch.clone();
        model
            .register_component::<Counter>()
            .register_component::<Steady>()
            .add_systems(ModelInit, |mut commands: Commands| {
                commands.spawn(Counter(0));
                commands.spawn(Steady(0));
            })
            .add_systems(ModelUpdate, move |mut counters: Query<&mut Counter>, mut steady: Query<&mut Steady>| {
                let extra = glitch.swap(0, Ordering::Relaxed);
                for mut counter in &mut counters {
                    counter.0 += 1 + extra;
                }
                for mut steady in &mut steady {
                    steady.0 += 1;
                }
            });
    }
}

/// A harness whose replicas each have their own glitch switch, in the order they were added.
fn harness(session: SessionConfig) -> (Harness, Arc<Mutex<Vec<Arc<AtomicU64>>>>) {
    let glitches: Arc<Mutex<Vec<Arc<AtomicU64>>>> = Arc::default();
    let factory = {
        let glitches = glitches.clone();
        move || {
            let glitch = Arc::new(AtomicU64::new(0));
            glitches.lock().unwrap().push(glitch.clone());
            glitchy_model(glitch)
        }
    };
    (Harness::new(session, factory), glitches)
}

fn session(name: &str) -> SessionConfig {
    let mut session = test_session(name);
    session.snapshot_policy.every_ms = 1_000;
    session
}

fn reloads(h: &Harness, app: usize) -> Vec<ReloadReport> {
    h.problems(app)
        .into_iter()
        .filter_map(|p| match p {
            SynqProblem::ReloadedConsensus(report) => Some(report),
            _ => None,
        })
        .collect()
}

fn explained(h: &Harness, app: usize) -> Vec<ReloadReport> {
    h.problems(app)
        .into_iter()
        .filter_map(|p| match p {
            SynqProblem::DivergedFromConsensus(report) => Some(report),
            _ => None,
        })
        .collect()
}

/// Checks the reload report: the counter of entity 1 differed, nothing else.
fn assert_names_the_counter(report: &ReloadReport) {
    let counter = std::any::type_name::<Counter>();
    assert_eq!(report.differing, vec![format!("component {counter}")], "{report:?}");
    assert_eq!(report.entities, vec![EntityDifference::Components(ModelId::from_raw(1), vec![counter.to_string()])]);
}

/// After the reload: a late joiner, and every replica agrees at every point after `since`.
fn assert_agree_from_now_on(h: &mut Harness, since: u64) {
    // Tallies of the points before the reload come within a second.
    h.run_rounds(30, 100);
    h.clear_reports();
    h.add_client(|_| {});
    h.run_rounds(40, 100);
    h.settle();
    let shared = h.assert_converged_since(since);
    assert!(shared >= 3, "only {shared} shared points after the reload");
}

#[test]
fn a_diverged_replica_is_told_which_entities_differ_once() {
    let (mut h, glitches) = harness(session("diverged-named"));
    for _ in 0..3 {
        h.add_client(|_| {});
    }
    h.run_rounds(20, 100);
    let diverged = 2;
    glitches.lock().unwrap()[diverged].store(5, Ordering::Relaxed);
    // It stays diverged for several snapshot points (one a second).
    for _ in 0..60 {
        h.round(100);
    }
    assert!(h.divergences(diverged).len() >= 3, "{:?}", h.divergences(diverged));
    let reports = explained(&h, diverged);
    assert_eq!(reports.len(), 1, "told once per divergence, not at every point: {:?}", h.problems(diverged));
    assert_names_the_counter(&reports[0]);
    assert_eq!(reports[0].time, h.divergences(diverged)[0].time, "the report is of the first diverged point");
    // The replicas in the consensus are not told anything, and nobody reloaded.
    for app in [0, 1] {
        assert!(explained(&h, app).is_empty(), "{:?}", h.problems(app));
    }
    assert_eq!(h.client(diverged).resyncs(), 0);
}

#[test]
fn a_diverged_replica_resyncs_and_agrees_again() {
    let (mut h, glitches) = harness(session("resync-manual"));
    for _ in 0..3 {
        h.add_client(|_| {});
    }
    h.run_rounds(20, 100);
    let diverged = 2;
    glitches.lock().unwrap()[diverged].store(5, Ordering::Relaxed);
    for _ in 0..30 {
        h.round(100);
        if !h.divergences(diverged).is_empty() {
            break;
        }
    }
    let divergence = h.divergences(diverged).first().cloned().expect("the divergence was not reported");
    assert!(!divergence.in_consensus, "{divergence:?}");
    assert_eq!(divergence.groups[0], vec![h.view_id(0), h.view_id(1)], "{divergence:?}");
    assert_eq!(divergence.groups[1], vec![h.view_id(diverged)], "{divergence:?}");

    // Reload through the run-time session API.
    let since = model_time(&h.apps[diverged]) + 1;
    h.apps[diverged].world_mut().run_system_once(|mut session: SynqSession| session.resync()).unwrap();
    for _ in 0..30 {
        h.round(100);
        if h.client(diverged).is_synced() && h.client(diverged).resyncs() == 1 {
            break;
        }
    }
    let client = h.client(diverged);
    assert_eq!(client.resyncs(), 1);
    assert!(client.is_synced(), "{:?}", client.status());
    assert!(matches!(client.started_from(), Some(StartKind::Snapshot { .. })), "{:?}", client.started_from());
    let reports = reloads(&h, diverged);
    assert_eq!(reports.len(), 1, "{:?}", h.problems(diverged));
    assert_names_the_counter(&reports[0]);
    assert_agree_from_now_on(&mut h, since);
}

#[test]
fn resync_on_divergence_reloads_automatically() {
    let mut session = session("resync-auto");
    session.resync_on_divergence = true;
    let (mut h, glitches) = harness(session);
    for _ in 0..3 {
        h.add_client(|_| {});
    }
    h.run_rounds(20, 100);
    let diverged = 2;
    glitches.lock().unwrap()[diverged].store(5, Ordering::Relaxed);
    let mut since = 0;
    for _ in 0..40 {
        h.round(100);
        if h.client(diverged).resyncs() > 0 && since == 0 {
            since = model_time(&h.apps[diverged]) + 1;
        }
        if since > 0 && h.client(diverged).is_synced() {
            break;
        }
    }
    assert_eq!(h.client(diverged).resyncs(), 1, "no automatic reload");
    assert!(h.divergences(diverged).iter().any(|d| !d.in_consensus));
    // The replicas in the consensus never reload.
    assert_eq!((h.client(0).resyncs(), h.client(1).resyncs()), (0, 0));
    let reports = reloads(&h, diverged);
    assert_eq!(reports.len(), 1, "{:?}", h.problems(diverged));
    assert_names_the_counter(&reports[0]);
    assert_agree_from_now_on(&mut h, since);
}
