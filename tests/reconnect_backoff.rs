//! Reconnecting backs off: against a reflector that keeps refusing (here: it is full), the delay
//! between attempts grows (Croquet's `min(30 s, (d + 100 ms)(1 + random))`) instead of retrying
//! every 100–200 ms forever; and a zero catch-up budget means "no limit", not "never".

mod common;

use bevy::prelude::*;
use bevy_synq::prelude::*;
use bevy_synq::reflector::ReflectorConfig;
use bevy_synq::reflector::inproc::ManualReflector;
use common::adversarial::{self, with_bot};
use common::{Harness, test_session};
use std::time::{Duration, Instant};

#[test]
fn refused_reconnects_back_off() {
    let mut reflector = ManualReflector::new(ReflectorConfig { max_sessions: 0, ..Default::default() });
    let mut app = App::new();
    app.add_plugins(MinimalPlugins);
    app.add_plugins(
        SynqPlugin::new(adversarial::model, test_session("full"))
            .with_reflector(ReflectorTarget::InProcess(reflector.handle())),
    );
    app.finish();
    app.cleanup();
    let start = Instant::now();
    let mut now = 0;
    while start.elapsed() < Duration::from_secs(3) {
        now += 5;
        reflector.pump(now);
        app.update();
        reflector.pump(now);
        std::thread::sleep(Duration::from_millis(5));
    }
    let attempts = reflector.core().connections_accepted();
    // Delays 0, ≥ 100, ≥ 200, ≥ 300 ms … (each at least the previous + 100 ms): at most 8 attempts
    // fit in 3 s; without backoff it would be 15 or more.
    assert!((2..=8).contains(&attempts), "{attempts} attempts in 3 s");
    assert!(!app.world().resource::<SynqStatus>().is_synced());
}

#[test]
fn a_zero_catch_up_budget_means_no_limit() {
    let mut h = Harness::new(test_session("budget"), Box::new(|| Box::new(adversarial::model)));
    h.add_client(with_bot(1));
    h.run_rounds(30, 100);
    let mut unlimited = test_session("budget");
    unlimited.catch_up = bevy_synq::CatchUpBudget { max_messages: 0, max_time: Duration::ZERO };
    let late = h.add_client_with(unlimited, |_| {});
    h.run_rounds(10, 100);
    h.settle();
    assert!(h.client(late).is_synced());
    h.assert_converged();
}
