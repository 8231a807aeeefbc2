//! Views that publish faster than the event rate limit: their events are bundled, in order, and
//! every replica executes every one of them; events too large for the wire are refused clearly.

mod common;

use bevy::ecs::system::RunSystemOnce;
use bevy::prelude::*;
use bevy_synq::prelude::*;
use common::{Harness, test_session};
use serde::{Deserialize, Serialize};
use synq_reflector::ReflectorConfig;
use synq_reflector::inproc::ManualReflector;

#[derive(Serialize, Deserialize, Clone)]
struct Tick(u32);

#[derive(Serialize, Deserialize, Clone)]
struct Blob(Vec<u8>);

#[derive(Resource, Serialize, Deserialize, Clone, Default, Debug, PartialEq)]
struct Log(Vec<(u64, u32)>);

fn model(model: &mut ModelApp) {
    model
        .init_resource::<Log>()
        .add_view_event::<Tick>()
        .add_view_event::<Blob>()
        .add_observer(|tick: On<FromView<Tick>>, mut log: ResMut<Log>| log.0.push((tick.view.0, tick.0)));
}

fn publish_many(app: &mut App, from: u32, count: u32) {
    app.world_mut()
        .run_system_once_with(
            |In((from, count)): In<(u32, u32)>, mut publish: Publish<Tick>| {
                for i in from..from + count {
                    publish.send(Tick(i));
                }
            },
            (from, count),
        )
        .unwrap();
}

#[test]
fn a_burst_of_events_is_bundled_and_executed_in_order_everywhere() {
    let mut session = test_session("bundles");
    session.event_rate_limit = 20; // the default
    let mut h = Harness::new(session, Box::new(|| Box::new(model)));
    let a = h.add_client(|_| {});
    let b = h.add_client(|_| {});
    h.run_rounds(5, 100);
    let session = h.client(a).ids().session;
    let before = h.reflector.core().buffered_events(&session).unwrap();
    // 300 events in 3 frames from one view, 100 from the other: far above 20 sends per second.
    for frame in 0..3 {
        publish_many(&mut h.apps[a], frame * 100, 100);
        publish_many(&mut h.apps[b], 10_000 + frame * 100, 34);
        h.round(10);
    }
    // The rate limit is wall-clock: give the held-back bundles real time to go out.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while common::process::model_resource::<Log>(&h.apps[b]).unwrap().0.len() < 402 {
        assert!(std::time::Instant::now() < deadline, "events never arrived");
        h.round(20);
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    h.settle();
    let log = common::process::model_resource::<Log>(&h.apps[a]).unwrap();
    let from_a: Vec<u32> = log.0.iter().filter(|(v, _)| *v == h.view_id(a).0).map(|(_, n)| *n).collect();
    assert_eq!(from_a, (0..300).collect::<Vec<_>>(), "lost or reordered");
    assert_eq!(log.0.len(), 300 + 102);
    let sent = h.reflector.core().buffered_events(&session).unwrap() - before;
    assert!(sent <= 8, "{sent} messages reached the reflector for 402 events: not bundled");
    h.assert_converged();
}

#[test]
fn an_event_too_large_for_the_wire_is_refused_with_a_reason() {
    let mut h = Harness::new(test_session("large"), Box::new(|| Box::new(model)));
    let a = h.add_client(|_| {});
    h.run_rounds(5, 100);
    h.apps[a].world_mut().run_system_once(|mut publish: Publish<Blob>| publish.send(Blob(vec![7; 20_000]))).unwrap();
    h.run_rounds(3, 100);
    let problems = &h.apps[a].world().resource::<common::Problems>().0;
    assert!(
        problems.iter().any(|p| matches!(p, SynqProblem::Refused(reason) if reason.contains("exceeds"))),
        "{problems:?}"
    );
}

#[test]
fn one_system_may_publish_several_event_types() {
    let mut h = Harness::new(test_session("two-types"), Box::new(|| Box::new(model)));
    let a = h.add_client(|_| {});
    h.run_rounds(5, 100);
    h.apps[a]
        .world_mut()
        .run_system_once(|mut ticks: Publish<Tick>, mut blobs: Publish<Blob>| {
            ticks.send(Tick(7));
            blobs.send(Blob(vec![1, 2, 3]));
            ticks.send(Tick(8));
        })
        .unwrap();
    h.run_rounds(5, 100);
    let log = common::process::model_resource::<Log>(&h.apps[a]).unwrap();
    assert_eq!(log.0.iter().map(|(_, n)| *n).collect::<Vec<_>>(), vec![7, 8]);
}

#[test]
fn events_over_the_reflectors_rate_are_dropped_and_the_sender_is_told() {
    // The reflector admits 2 events per second per client; the view sends one per 10 ms frame.
    let mut h = Harness::new(test_session("over-rate"), Box::new(|| Box::new(model)));
    h.reflector = ManualReflector::new(ReflectorConfig { max_events_per_second: 2, ..Default::default() });
    let a = h.add_client(|_| {});
    h.add_client(|_| {});
    h.run_rounds(5, 100);
    for i in 0..10 {
        publish_many(&mut h.apps[a], i, 1);
        h.round(10);
    }
    h.run_rounds(5, 100);
    let late = h.add_client(|_| {});
    h.run_rounds(10, 100);
    h.settle();

    let problems = std::mem::take(&mut h.apps[a].world_mut().resource_mut::<common::Problems>().0);
    assert!(
        problems.iter().any(|p| matches!(p, SynqProblem::Refused(reason) if reason.contains("events per second"))),
        "the sender was told: {problems:?}"
    );
    // Nobody else was told anything, and every replica agrees.
    h.assert_converged();
    let log = common::process::model_resource::<Log>(&h.apps[late]).unwrap();
    let executed: Vec<u32> = log.0.iter().map(|(_, n)| *n).collect();
    assert!(!executed.is_empty() && executed.len() < 10, "some were admitted, the rest dropped: {executed:?}");
    assert!(executed.windows(2).all(|w| w[0] < w[1]), "in order: {executed:?}");
}
