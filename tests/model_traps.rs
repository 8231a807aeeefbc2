//! Model code without silent traps: each trap that does not make replicas diverge but loses state
//! or fails deep inside Bevy is reported with the rule and the fix — at startup when it can be
//! seen in the code, at the snapshot point when it can only be seen in the state. Where the model
//! runs, several replicas and a late joiner still end with identical hashes.

mod common;

use bevy::prelude::*;
use bevy_synq::prelude::*;
use bevy_synq::{ModelProblem, ModelRuntime, ModelWorld, RuntimeOptions};
use common::{Harness, test_session};
use serde::{Deserialize, Serialize};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};

#[derive(Component, Serialize, Deserialize)]
struct Counter(u64);

fn spawn_counter(mut commands: Commands) {
    commands.spawn(Counter(0));
}

/// Runs `build` with a subscriber that records the warnings logged on this thread.
fn warnings_while(build: impl FnOnce()) -> Vec<String> {
    let recorder = Recorder::default();
    let seen = recorder.0.clone();
    tracing::subscriber::with_default(recorder, build);
    seen.lock().unwrap().clone()
}

#[derive(Default)]
struct Recorder(Arc<Mutex<Vec<String>>>);

impl tracing::Subscriber for Recorder {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() <= tracing::Level::WARN
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        self.0.lock().unwrap().push(message.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// The panic message of building an app around `model` (`SynqPlugin` builds the model when it is
/// added), if it panics.
fn startup_panic(model: impl ModelPlugin) -> Option<String> {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let mut app = App::new();
        app.add_plugins(MinimalPlugins).add_plugins(SynqPlugin::idle(model));
    }));
    outcome.err().map(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    })
}

/// Several replicas and a late joiner run `model`; they end converged (same time, same hashes, no
/// divergence, no problem reported).
fn runs_converged(name: &str, model: impl ModelPlugin + Copy) -> Harness {
    let mut session = test_session(name);
    session.snapshot_policy.every_ms = 1_000;
    let mut h = Harness::new(session, move || model);
    h.add_client(|_| {});
    h.add_client(|_| {});
    h.run_rounds(25, 100);
    h.add_client(|_| {});
    h.run_rounds(30, 100);
    h.settle();
    assert!(h.assert_converged() >= 2, "too few shared snapshot points");
    h
}

// 1. A `Local` in a model system resets at every snapshot point: warned about, once, at startup.

fn count_steps_in_a_local(mut steps: Local<u64>, mut counters: Query<&mut Counter>) {
    *steps += 1;
    for mut counter in &mut counters {
        counter.0 = *steps;
    }
}

fn local_model(model: &mut ModelApp) {
    model
        .register_component::<Counter>()
        .add_systems(ModelInit, spawn_counter)
        .add_systems(ModelUpdate, count_steps_in_a_local);
}

#[test]
fn a_local_in_a_model_system_is_warned_about_with_the_fix() {
    let warnings = warnings_while(|| {
        App::new().add_plugins(MinimalPlugins).add_plugins(SynqPlugin::idle(local_model));
    });
    let warning = warnings
        .iter()
        .find(|w| w.contains("count_steps_in_a_local"))
        .unwrap_or_else(|| panic!("no warning about the Local: {warnings:?}"));
    assert!(warning.contains("`Local<u64>`"), "{warning}");
    assert!(warning.contains("snapshot point"), "{warning}");
    assert!(warning.contains("ModelApp::init_resource"), "the fix is missing: {warning}");

    // Once: the model is built again at every snapshot point, the warning is not.
    let again = warnings_while(|| {
        App::new().add_plugins(MinimalPlugins).add_plugins(SynqPlugin::idle(local_model));
    });
    assert!(!again.iter().any(|w| w.contains("count_steps_in_a_local")), "warned twice: {again:?}");

    // It is a warning, not an error: the model runs, and replicas agree.
    runs_converged("trap-local", local_model);
}

#[test]
fn a_local_in_a_model_observer_is_warned_about() {
    #[derive(Event, Serialize, Deserialize)]
    struct Ping;
    fn model(model: &mut ModelApp) {
        model.add_timer_event::<Ping>().add_observer(|_: On<Ping>, mut seen: Local<u32>| *seen += 1);
    }
    let warnings = warnings_while(|| {
        App::new().add_plugins(MinimalPlugins).add_plugins(SynqPlugin::idle(model));
    });
    assert!(
        warnings.iter().any(|w| w.contains("model observer") && w.contains("`Local<u32>`")),
        "no warning about the observer's Local: {warnings:?}"
    );
}

// 2. Unregistered resources: not in the snapshot.

#[derive(Resource, Default)]
struct Score(u64);

fn keep_score(mut score: ResMut<Score>, mut counters: Query<&mut Counter>) {
    score.0 += 1;
    for mut counter in &mut counters {
        counter.0 = score.0;
    }
}

/// Inserted in `ModelInit` without registering it: it would vanish at the first snapshot point,
/// and `keep_score` would then fail with Bevy's "Resource does not exist". Refused at startup.
fn score_inserted_in_init(model: &mut ModelApp) {
    model
        .register_component::<Counter>()
        .add_systems(ModelInit, (spawn_counter, |mut commands: Commands| commands.insert_resource(Score(0))))
        .add_systems(ModelUpdate, keep_score);
}

#[test]
fn an_unregistered_resource_inserted_in_init_is_refused_at_startup_with_the_fix() {
    let message = startup_panic(score_inserted_in_init).expect("the model was accepted");
    assert!(message.contains("`keep_score`"), "the system is not named: {message}");
    assert!(message.contains("`Score`"), "the resource is not named: {message}");
    assert!(message.contains("ModelApp::init_resource::<Score>()"), "the fix is missing: {message}");
    assert!(message.contains("register_resource"), "the fix is missing: {message}");
}

/// Inserted by `build` without registering it, and changed by a system: reset at every snapshot
/// point. Warned about at startup, and reported as a model problem at the snapshot point.
fn score_inserted_at_build(model: &mut ModelApp) {
    model.register_component::<Counter>().add_systems(ModelInit, spawn_counter).add_systems(ModelUpdate, keep_score);
    model.world_mut().init_resource::<Score>();
}

#[test]
fn an_unregistered_resource_set_at_build_and_changed_is_warned_about_with_the_fix() {
    let warnings = warnings_while(|| {
        App::new().add_plugins(MinimalPlugins).add_plugins(SynqPlugin::idle(score_inserted_at_build));
    });
    let warning =
        warnings.iter().find(|w| w.contains("Score")).unwrap_or_else(|| panic!("no warning about Score: {warnings:?}"));
    assert!(warning.contains("`keep_score`") && warning.contains("reset"), "{warning}");
    assert!(warning.contains("ModelApp::insert_resource"), "the fix is missing: {warning}");
}

/// An exclusive system inserts an unregistered resource: nothing in the code's access shows it,
/// the snapshot point does.
fn resource_inserted_by_an_exclusive_system(model: &mut ModelApp) {
    model.register_component::<Counter>().add_systems(ModelInit, spawn_counter).add_systems(
        ModelUpdate,
        |world: &mut World| {
            let steps = world.resource::<ModelTime>().steps();
            world.insert_resource(Score(steps));
        },
    );
}

#[test]
fn unregistered_resources_are_reported_at_the_snapshot_point() {
    let mut session = test_session("trap-resource-point");
    session.snapshot_policy.every_ms = 1_000;
    let mut h = Harness::new(session, || resource_inserted_by_an_exclusive_system);
    h.add_client(|_| {});
    h.add_client(|_| {});
    h.run_rounds(25, 100);
    h.add_client(|_| {});
    h.run_rounds(30, 100);
    h.settle();
    for app in 0..h.apps.len() {
        let problems = h.problems(app);
        let reported: Vec<_> = problems
            .iter()
            .filter_map(|p| match p {
                SynqProblem::Model(ModelProblem::UnregisteredResources(names)) => Some(names),
                _ => None,
            })
            .collect();
        assert_eq!(reported.len(), 1, "replica {app}: reported once, not at every point: {problems:?}");
        assert!(reported[0].iter().any(|n| n.ends_with("::Score")), "replica {app}: {problems:?}");
    }
    // The resource was never part of the state: every replica, the late joiner too, agrees.
    h.clear_reports();
    h.assert_converged();
}

// 3. App resources such as `Time` do not exist in the model world.

#[test]
fn res_time_in_a_model_system_is_refused_at_startup_naming_model_time() {
    fn model(model: &mut ModelApp) {
        model.add_systems(ModelUpdate, |time: Res<Time>| {
            let _ = time.elapsed();
        });
    }
    let message = startup_panic(model).expect("the model was accepted");
    assert!(message.contains("`Time`"), "{message}");
    assert!(message.contains("Res<ModelTime>"), "ModelTime is not named: {message}");
}

#[test]
fn res_time_in_a_model_observer_is_refused_at_startup_naming_model_time() {
    #[derive(Serialize, Deserialize)]
    struct Poke;
    fn model(model: &mut ModelApp) {
        model.add_view_event::<Poke>().add_observer(|_: On<FromView<Poke>>, time: Res<Time>| {
            let _ = time.elapsed();
        });
    }
    let message = startup_panic(model).expect("the model was accepted");
    assert!(message.contains("model observer"), "{message}");
    assert!(message.contains("Res<ModelTime>"), "ModelTime is not named: {message}");
}

#[test]
fn a_registered_resource_never_inserted_fails_with_what_the_model_world_holds() {
    #[derive(Resource, Serialize, Deserialize)]
    struct Ghost(u32);
    fn read_ghost(ghost: Res<Ghost>) {
        let _ = ghost.0;
    }
    fn model(model: &mut ModelApp) {
        model.register_resource::<Ghost>().add_systems(ModelUpdate, read_ghost);
    }
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let mut runtime = ModelRuntime::start_fresh(model, RuntimeOptions::default());
        runtime.advance(100);
    }));
    let payload = outcome.expect_err("a missing resource went unnoticed");
    let message = payload.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("`read_ghost`") && message.contains("Res<Ghost>"), "{message}");
    assert!(message.contains("register_resource") && message.contains("ModelInit"), "the fix is missing: {message}");
}

// 5. Unordered model systems with conflicting access.

fn add_one(mut counters: Query<&mut Counter>) {
    for mut counter in &mut counters {
        counter.0 += 1;
    }
}

fn double(mut counters: Query<&mut Counter>) {
    for mut counter in &mut counters {
        counter.0 = counter.0 * 2 % 1_000_003;
    }
}

fn ambiguous_model(model: &mut ModelApp) {
    model
        .register_component::<Counter>()
        .add_systems(ModelInit, spawn_counter)
        .add_systems(ModelUpdate, (add_one, double));
}

#[test]
fn ambiguous_model_systems_are_refused_at_startup_naming_both_and_the_fix() {
    let message = startup_panic(ambiguous_model).expect("the ambiguity was accepted");
    assert!(message.contains("add_one") && message.contains("double"), "the systems are not named: {message}");
    assert!(message.contains("Counter"), "the conflict is not named: {message}");
    assert!(message.contains(".chain()") && message.contains("allow_ambiguities"), "the fix is missing: {message}");

    // Ordered, the model builds and runs.
    fn ordered(model: &mut ModelApp) {
        model
            .register_component::<Counter>()
            .add_systems(ModelInit, spawn_counter)
            .add_systems(ModelUpdate, (add_one, double).chain());
    }
    runs_converged("trap-ordered", ordered);
}

#[test]
fn allow_ambiguities_opts_out_and_replicas_still_agree() {
    fn model(model: &mut ModelApp) {
        ambiguous_model(model);
        model.allow_ambiguities();
    }
    assert_eq!(startup_panic(model), None);
    runs_converged("trap-allowed-ambiguity", model);
}

// 6. Views cannot get the runtime mutably; tests hash and capture through read-only methods.

#[test]
fn the_model_world_hashes_and_captures_without_handing_out_the_runtime() {
    let mut h = runs_converged("trap-hash", local_model);
    let model = &mut *h.apps[0].world_mut().resource_mut::<ModelWorld>();
    let before = model.runtime().expect("running").now_ms();
    let bytes = model.capture().expect("running").expect("encodes");
    let hash = model.state_hash().expect("running").expect("encodes");
    assert_eq!(hash, bevy_synq::snapshot::state_hash(&bytes));
    assert_eq!(model.runtime().expect("running").now_ms(), before, "hashing changed the model");
}
