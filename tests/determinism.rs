//! Determinism: several replicas and late joiners of an adversarial model end with identical
//! state hashes at identical model times.

mod common;

use common::adversarial::{self, with_bot};
use common::{Harness, test_session};

fn adversarial_harness(name: &str) -> Harness {
    let mut session = test_session(name);
    session.snapshot_policy.every_ms = 5_000;
    Harness::new(session, Box::new(|| Box::new(adversarial::model)))
}

#[test]
fn two_replicas_agree() {
    let mut h = adversarial_harness("smoke");
    h.add_client(with_bot(1));
    h.add_client(with_bot(2));
    h.run_rounds(200, 50);
    for app in &mut h.apps {
        app.world_mut().resource_mut::<adversarial::Bot>().active = false;
    }
    h.settle();
    let shared = h.assert_converged();
    assert!(shared >= 2, "only {shared} shared snapshot points");
}

/// The main proof: 4 replicas from the start, a joiner right after a snapshot point and one long
/// after, seeded-random input from every client, 10,000 model steps.
#[test]
fn four_replicas_and_two_late_joiners_agree_over_ten_thousand_steps() {
    let mut h = adversarial_harness("main");
    for seed in 0..4 {
        h.add_client(with_bot(100 + seed));
    }
    // Steps are 50 ms; rounds of 200 ms run four steps each: 2,510 rounds make 10,040 steps.
    let total_rounds = 2_510;
    let mut joined_after_point = None;
    let mut joined_late = None;
    for round in 0..total_rounds {
        h.round(200);
        if joined_after_point.is_none() && round > 300 {
            // Join right after a snapshot point: watch replica 0 pass one.
            let last_point = h.client(0).hash_history().last().map(|r| r.time);
            if last_point.is_some_and(|t| t + 200 >= common::model_time(&h.apps[0])) {
                joined_after_point = Some(h.add_client(with_bot(200)));
            }
        }
        if joined_late.is_none() && round == 1_850 {
            joined_late = Some(h.add_client(with_bot(300)));
        }
    }
    assert!(joined_after_point.is_some() && joined_late.is_some());
    for app in &mut h.apps {
        app.world_mut().resource_mut::<adversarial::Bot>().active = false;
    }
    h.settle();
    let steps = h.apps[0]
        .world()
        .resource::<bevy_synq::ModelWorld>()
        .runtime()
        .unwrap()
        .world()
        .resource::<bevy_synq::ModelTime>()
        .steps();
    assert!(steps >= 10_000, "only {steps} steps");
    let shared = h.assert_converged();
    let stats = h.apps[0]
        .world()
        .resource::<bevy_synq::ModelWorld>()
        .runtime()
        .unwrap()
        .world()
        .resource::<adversarial::Stats>()
        .clone();
    println!(
        "steps {steps}, shared snapshot points {shared}, stats: hits {} spawned {} expired {} pokes {}",
        stats.hits, stats.spawned, stats.expired, stats.pokes
    );
    for joiner in [joined_after_point.unwrap(), joined_late.unwrap()] {
        let start = h.client(joiner).started_from();
        assert!(matches!(start, Some(bevy_synq::StartKind::Snapshot { .. })), "joiner {joiner} started {start:?}");
    }
    assert!(
        stats.hits > 50 && stats.spawned > 100 && stats.expired > 0 && stats.pokes > 50,
        "the model did too little: hits {} spawned {} expired {} pokes {}",
        stats.hits,
        stats.spawned,
        stats.expired,
        stats.pokes
    );
    assert!(shared >= 50, "only {shared} shared snapshot points");
}
