//! Persistence across code versions: what version 1 of an app persists reaches version 2's init,
//! migrated; the throttle, the election of one uploader, and the guards of the persistence guide.
//!
//! The version-to-version tests run against a real `synq-reflector` process over UDP with a data
//! directory on disk (and one against two edges of a NATS JetStream cluster); the throttle test needs 25 s of model time and runs on the in-process
//! reflector with a virtual clock (the same reflector core).

mod common;
#[path = "../crates/synq_reflector/tests/common/nats.rs"]
mod nats;

use bevy::prelude::*;
use bevy_synq::prelude::*;
use bevy_synq::protocol::crypto::{Binding, KdfParams, SealKind, SessionKey};
use bevy_synq::{Migrations, ModelProblem, ModelWorld, PersistError, PersistSession, Persisted, SynqClient};
use common::process::{ReflectorProcess, data_dir, model_resource, run_for, run_until, synced, udp_app};
use common::{Harness, status, test_session};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(30);

/// Version 1's document.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
struct ScoresV1 {
    names: Vec<String>,
    points: Vec<u32>,
}

/// Version 2's document.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
struct ScoresV2 {
    table: BTreeMap<String, u32>,
}

#[derive(Serialize, Deserialize, Clone)]
struct AddScore {
    name: String,
    points: u32,
}

#[derive(Resource, Serialize, Deserialize, Clone, Default, Debug)]
struct BoardV1(ScoresV1);

#[derive(Resource, Serialize, Deserialize, Clone, Default, Debug)]
struct BoardV2 {
    table: BTreeMap<String, u32>,
    loaded_from_version: Option<u32>,
    init_runs: u32,
    persist_errors: Vec<String>,
}

fn model_v1(model: &mut ModelApp) {
    model
        .init_resource::<BoardV1>()
        .add_view_event::<AddScore>()
        .add_persistence(Migrations::<ScoresV1>::new(1))
        .add_systems(ModelInit, |persisted: Res<Persisted<ScoresV1>>, mut board: ResMut<BoardV1>| {
            if let Some(data) = &persisted.data {
                board.0 = data.clone();
            }
        })
        .add_observer(|add: On<FromView<AddScore>>, mut board: ResMut<BoardV1>, mut persist: PersistSession| {
            board.0.names.push(add.name.clone());
            board.0.points.push(add.points);
            persist.persist(&board.0).expect("persists");
        });
}

fn v2_with(migrations: fn() -> Migrations<ScoresV2>) -> impl Fn(&mut ModelApp) + Send + Sync {
    move |model: &mut ModelApp| {
        model
            .init_resource::<BoardV2>()
            .add_view_event::<AddScore>()
            .add_persistence(migrations())
            .add_systems(ModelInit, |persisted: Res<Persisted<ScoresV2>>, mut board: ResMut<BoardV2>| {
                board.init_runs += 1;
                board.loaded_from_version = persisted.stored_version;
                if let Some(data) = &persisted.data {
                    board.table = data.table.clone();
                }
            })
            .add_observer(|add: On<FromView<AddScore>>, mut board: ResMut<BoardV2>, mut persist: PersistSession| {
                board.table.insert(add.name.clone(), add.points);
                let document = ScoresV2 { table: board.table.clone() };
                if let Err(error) = persist.persist(&document) {
                    board.persist_errors.push(error.to_string());
                }
            });
    }
}

fn migrations_v2() -> Migrations<ScoresV2> {
    Migrations::new(2).step(1, |v1: ScoresV1| ScoresV2 { table: v1.names.into_iter().zip(v1.points).collect() })
}

/// Version 2 without the migration from version 1: loading fails.
fn broken_migrations_v2() -> Migrations<ScoresV2> {
    Migrations::new(2)
}

fn session(name: &str, view: u64, password: &str) -> SessionConfig {
    let mut session = SessionConfig::new("io.bevy-synq.tests", name, password);
    session.kdf = KdfParams::INSECURE_FAST;
    session.view_id = Some(ViewId(view));
    session.snapshot_policy.every_ms = 500;
    session
}

fn publish(app: &mut App, name: &str, points: u32) {
    app.world_mut()
        .run_system_once_with(
            |In((name, points)): In<(String, u32)>, mut publish: Publish<AddScore>| {
                publish.send(AddScore { name, points });
            },
            (name.to_string(), points),
        )
        .expect("publishes");
}

use bevy::ecs::system::RunSystemOnce;

/// Version 1 plays and persists; everyone leaves; version 2 (other code, so a new session) starts
/// from version 1's data, migrated; a later client of version 2 resumes from the snapshot.
fn play_version_1(reflector: &ReflectorProcess, name: &str, password: &str, both_scores: bool) {
    let mut a = udp_app(model_v1, session(name, 1, password), reflector.addr);
    let mut b = udp_app(model_v1, session(name, 2, password), reflector.addr);
    run_until(&mut [&mut a, &mut b], TIMEOUT, |apps| apps.iter().all(|app| synced(app)));
    publish(&mut a, "ada", 120);
    if both_scores {
        publish(&mut b, "bob", 80);
    }
    let scores = if both_scores { 2 } else { 1 };
    let uploads = |apps: &[&mut App]| -> u32 {
        apps.iter().map(|app| app.world().resource::<SynqClient>().persist_uploads()).sum()
    };
    run_until(&mut [&mut a, &mut b], TIMEOUT, |apps| {
        uploads(apps) >= 1 && model_resource::<BoardV1>(apps[0]).is_some_and(|b| b.0.names.len() == scores)
    });
    if both_scores {
        // The second score arrived within the cool-off: it is uploaded when the cool-off ends, 25 s
        // of model time later. Version 2 must see both scores: wait for that upload.
        run_until(&mut [&mut a, &mut b], Duration::from_secs(40), |apps| uploads(apps) >= 2);
    }
    run_for(&mut [&mut a, &mut b], Duration::from_millis(200));
}

#[test]
fn version_2_starts_from_version_1s_data_migrated_and_later_clients_resume_from_the_snapshot() {
    let dir = data_dir("persist-v1-v2");
    let reflector = ReflectorProcess::start(&dir, None);
    play_version_1(&reflector, "scores", "pw", true);

    let mut c = udp_app(v2_with(migrations_v2), session("scores", 3, "pw"), reflector.addr);
    run_until(&mut [&mut c], TIMEOUT, |apps| synced(apps[0]));
    let board = model_resource::<BoardV2>(&c).expect("version 2 runs");
    assert_eq!(board.loaded_from_version, Some(1));
    assert_eq!(board.table, BTreeMap::from([("ada".to_string(), 120), ("bob".to_string(), 80)]));
    assert_eq!(board.init_runs, 1);

    // The game continues in version 2.
    publish(&mut c, "cy", 99);
    run_until(&mut [&mut c], TIMEOUT, |apps| model_resource::<BoardV2>(apps[0]).is_some_and(|b| b.table.len() == 3));
    run_for(&mut [&mut c], Duration::from_millis(1200)); // a snapshot point passes and is uploaded

    let mut d = udp_app(v2_with(migrations_v2), session("scores", 4, "pw"), reflector.addr);
    run_until(&mut [&mut c, &mut d], TIMEOUT, |apps| synced(apps[1]));
    assert!(matches!(d.world().resource::<SynqClient>().started_from(), Some(bevy_synq::StartKind::Snapshot { .. })));
    let later = model_resource::<BoardV2>(&d).unwrap();
    assert_eq!(later.init_runs, 1, "init is not called again");
    assert_eq!(later.table.len(), 3);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn version_2_on_another_edge_of_a_cluster_starts_from_what_version_1_persisted_through_the_first() {
    if !nats::nats_available(
        "version_2_on_another_edge_of_a_cluster_starts_from_what_version_1_persisted_through_the_first",
    ) {
        return;
    }
    let cluster = nats::NatsCluster::start("persist", 3);
    let first = ReflectorProcess::start_cluster(&cluster.url_list(), &[]);
    let second = ReflectorProcess::start_cluster(&cluster.url_list(), &[]);
    play_version_1(&first, "cluster-scores", "pw", false);

    // Version 2 is another session (another session id): a client reaching only the second edge
    // starts it there, from what version 1 persisted through the first.
    let mut c = udp_app(v2_with(migrations_v2), session("cluster-scores", 3, "pw"), second.addr);
    run_until(&mut [&mut c], TIMEOUT, |apps| synced(apps[0]));
    let reflector = c.world().resource::<SynqConnection>().reflector.clone().unwrap_or_default();
    assert!(reflector.contains(&second.addr.to_string()), "served by {reflector}");
    let board = model_resource::<BoardV2>(&c).expect("version 2 runs");
    assert_eq!(board.loaded_from_version, Some(1));
    assert_eq!(board.table, BTreeMap::from([("ada".to_string(), 120)]));
}

/// The one persisted document in the data directory (`persisted/<persistent id>.bin`).
fn persisted_path(dir: &std::path::Path) -> std::path::PathBuf {
    let files = std::fs::read_dir(dir.join("persisted")).unwrap().map(|entry| entry.unwrap().path());
    let mut documents = files.filter(|path| path.extension().is_some_and(|e| e == "bin"));
    documents.next().expect("one persisted document")
}

fn persisted_file(dir: &std::path::Path) -> Vec<u8> {
    std::fs::read(persisted_path(dir)).unwrap()
}

fn problems(app: &App) -> Vec<SynqProblem> {
    app.world().resource::<common::Problems>().0.clone()
}

#[test]
fn a_failing_loader_is_reported_and_overwrites_nothing() {
    let dir = data_dir("persist-broken");
    let reflector = ReflectorProcess::start(&dir, None);
    play_version_1(&reflector, "broken", "pw", false);
    let before = persisted_file(&dir);

    let mut c = udp_app(v2_with(broken_migrations_v2), session("broken", 3, "pw"), reflector.addr);
    run_until(&mut [&mut c], TIMEOUT, |apps| synced(apps[0]));
    let reported = problems(&c);
    assert!(
        reported.iter().any(|p| matches!(p, SynqProblem::Model(ModelProblem::PersistLoadFailed(reason)) if reason.contains("no migration from version 1"))),
        "the failure did not reach the app: {reported:?}"
    );
    // The session continues, but persisting is disabled.
    publish(&mut c, "cy", 99);
    run_until(&mut [&mut c], TIMEOUT, |apps| {
        model_resource::<BoardV2>(apps[0]).is_some_and(|b| !b.persist_errors.is_empty())
    });
    let board = model_resource::<BoardV2>(&c).unwrap();
    assert!(board.persist_errors[0].contains("disabled"), "{:?}", board.persist_errors);
    run_for(&mut [&mut c], Duration::from_millis(500));
    assert_eq!(persisted_file(&dir), before, "the stored data changed");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_wrong_password_cannot_read_persisted_data() {
    let dir = data_dir("persist-password");
    let reflector = ReflectorProcess::start(&dir, None);
    play_version_1(&reflector, "locked", "right password", false);
    let before = persisted_file(&dir);

    // A new code version with the wrong password: the reflector refuses the join (the persistent
    // id's membership key is pinned), before any download.
    let mut c = udp_app(v2_with(migrations_v2), session("locked", 3, "wrong password"), reflector.addr);
    run_until(&mut [&mut c], TIMEOUT, |apps| matches!(status(apps[0]), SynqStatus::Disconnected { .. }));
    let SynqStatus::Disconnected { reason } = status(&c) else { unreachable!() };
    assert!(reason.contains("wrong session password"), "no clear error: {reason}");
    assert!(c.world().resource::<ModelWorld>().runtime().is_none(), "a non-member got a model");
    publish(&mut c, "eve", 1);
    run_for(&mut [&mut c], Duration::from_millis(500));
    assert_eq!(persisted_file(&dir), before, "data readable only with the right password was overwritten");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_damaged_persisted_document_is_reported_to_the_model_and_kept() {
    let dir = data_dir("persist-damaged");
    let reflector = ReflectorProcess::start(&dir, None);
    play_version_1(&reflector, "damaged", "pw", false);
    drop(reflector);
    let path = persisted_path(&dir);
    let mut damaged = std::fs::read(&path).unwrap();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x20;
    std::fs::write(&path, &damaged).unwrap();

    let reflector = ReflectorProcess::start(&dir, None);
    let mut c = udp_app(v2_with(migrations_v2), session("damaged", 3, "pw"), reflector.addr);
    run_until(&mut [&mut c], TIMEOUT, |apps| synced(apps[0]));
    let reported = problems(&c);
    assert!(
        reported.iter().any(
            |p| matches!(p, SynqProblem::Model(ModelProblem::PersistLoadFailed(reason)) if reason.contains("damaged"))
        ),
        "not reported to the model: {reported:?}"
    );
    publish(&mut c, "eve", 1);
    run_for(&mut [&mut c], Duration::from_millis(500));
    assert_eq!(std::fs::read(&path).unwrap(), damaged, "the damaged document was overwritten");
    let _ = std::fs::remove_dir_all(dir);
}

// ---- The throttle (virtual time, in-process reflector) ----

#[derive(Serialize, Deserialize, Clone)]
enum Command {
    /// Persist a changing document once per step, this many times.
    Burst(u32),
    /// Persist the current document again.
    Again,
    /// Try to persist a map with integer keys.
    IntegerKeys,
}

#[derive(Resource, Serialize, Deserialize, Clone, Default, Debug)]
struct Counter {
    value: u32,
    burst_left: u32,
    outcomes: Vec<String>,
}

fn throttle_model(model: &mut ModelApp) {
    model
        .init_resource::<Counter>()
        .add_view_event::<Command>()
        .add_persistence(Migrations::<u32>::new(1))
        .add_observer(|command: On<FromView<Command>>, mut counter: ResMut<Counter>, mut persist: PersistSession| {
            match command.event {
                Command::Burst(n) => counter.burst_left = n,
                Command::Again => {
                    let outcome = persist.persist(&counter.value);
                    counter.outcomes.push(format!("{outcome:?}"));
                }
                Command::IntegerKeys => {
                    let map = BTreeMap::from([(1u32, 2u32)]);
                    match persist.persist(&map) {
                        Err(PersistError::Encode(reason)) => counter.outcomes.push(reason),
                        other => counter.outcomes.push(format!("unexpected: {other:?}")),
                    }
                }
            }
        })
        .add_systems(ModelUpdate, |mut counter: ResMut<Counter>, mut persist: PersistSession| {
            if counter.burst_left > 0 {
                counter.burst_left -= 1;
                counter.value += 1;
                let outcome = persist.persist(&counter.value);
                counter.outcomes.push(format!("{outcome:?}"));
            }
        });
}

fn send(h: &mut Harness, client: usize, command: Command) {
    h.apps[client]
        .world_mut()
        .run_system_once_with(|In(command): In<Command>, mut publish: Publish<Command>| publish.send(command), command)
        .unwrap();
}

#[test]
fn a_burst_of_persist_calls_makes_one_prompt_upload_and_one_at_the_end_of_the_cool_off() {
    let mut h = Harness::new(test_session("throttle"), Box::new(|| Box::new(throttle_model)));
    for _ in 0..4 {
        h.add_client(|_| {});
    }
    h.run_rounds(10, 100);
    send(&mut h, 0, Command::Burst(100)); // 100 calls in 100 steps = 5 s of model time
    h.run_rounds(100, 100); // 10 s
    let uploads = |h: &Harness| -> Vec<u32> { (0..4).map(|i| h.client(i).persist_uploads()).collect() };
    assert_eq!(uploads(&h).iter().sum::<u32>(), 1, "one prompt upload, by one replica: {:?}", uploads(&h));
    h.run_rounds(200, 100); // 20 s more: the cool-off has ended
    assert_eq!(uploads(&h).iter().sum::<u32>(), 2, "and one when the cool-off ends: {:?}", uploads(&h));

    let counter = common::process::model_resource::<Counter>(&h.apps[1]).unwrap();
    assert_eq!(counter.value, 100);
    assert_eq!(counter.outcomes.iter().filter(|o| o.contains("Uploading")).count(), 1);
    assert_eq!(counter.outcomes.iter().filter(|o| o.contains("Deferred")).count(), 99);

    // What the reflector holds is the final document, sealed.
    let ids = h.client(0).ids();
    let record = h.reflector.core().persisted(&ids.persistent).expect("stored").clone();
    let key = SessionKey::derive("correct horse", &ids.persistent, KdfParams::INSECURE_FAST).unwrap();
    let json = key.open(SealKind::Persisted, &Binding::Persistent(ids.persistent), &record.data).unwrap();
    assert_eq!(String::from_utf8(json).unwrap(), r#"{"data":100,"version":1}"#);

    // Identical data is not uploaded again.
    send(&mut h, 2, Command::Again);
    h.run_rounds(300, 100);
    assert_eq!(uploads(&h).iter().sum::<u32>(), 2);
    let counter = common::process::model_resource::<Counter>(&h.apps[0]).unwrap();
    assert_eq!(counter.outcomes.last().map(String::as_str), Some("Ok(Unchanged)"));

    // Maps whose keys are not strings are refused with a clear error.
    send(&mut h, 3, Command::IntegerKeys);
    h.run_rounds(5, 100);
    let counter = common::process::model_resource::<Counter>(&h.apps[0]).unwrap();
    assert!(counter.outcomes.last().unwrap().contains("map key"), "{:?}", counter.outcomes.last());
    h.settle();
    h.assert_converged();
}

#[test]
fn persisted_data_can_be_exported_and_imported_with_the_password() {
    let dir = data_dir("persist-cli");
    let reflector = ReflectorProcess::start(&dir, None);
    play_version_1(&reflector, "backup", "pw", false);
    drop(reflector); // the CLI works on a stopped reflector's data directory

    let cli = |args: &[&str], stdin: Option<&str>| {
        use std::io::Write;
        let mut command = std::process::Command::new(common::process::reflector_binary());
        command.args(["persisted"]).args(args).args(["--data-dir"]).arg(&dir);
        command.args(["--app-id", "io.bevy-synq.tests", "--name", "backup", "--insecure-fast-kdf"]);
        command
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = command.spawn().unwrap();
        if let Some(text) = stdin {
            child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        }
        drop(child.stdin.take());
        child.wait_with_output().unwrap()
    };
    let exported = cli(&["export", "--password", "pw"], None);
    assert!(exported.status.success(), "{}", String::from_utf8_lossy(&exported.stderr));
    let json = String::from_utf8(exported.stdout).unwrap();
    assert_eq!(json.trim(), r#"{"data":{"names":["ada"],"points":[120]},"version":1}"#);

    let wrong = cli(&["export", "--password", "nope"], None);
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("wrong session password"));

    let edited = r#"{"version": 1, "data": {"names": ["ada", "zed"], "points": [120, 7]}}"#;
    let imported = cli(&["import", "--password", "pw", "-"], Some(edited));
    assert!(imported.status.success(), "{}", String::from_utf8_lossy(&imported.stderr));

    let reflector = ReflectorProcess::start(&dir, None);
    let mut c = udp_app(v2_with(migrations_v2), session("backup", 3, "pw"), reflector.addr);
    run_until(&mut [&mut c], TIMEOUT, |apps| synced(apps[0]));
    let board = model_resource::<BoardV2>(&c).unwrap();
    assert_eq!(board.table, BTreeMap::from([("ada".to_string(), 120), ("zed".to_string(), 7)]));
    let _ = std::fs::remove_dir_all(dir);
}

// ---- A diverged replica never overwrites the consensus ----

#[derive(Resource)]
struct Skew(u32);

/// Persists a document that depends on process-local state: the replica built with a skew
/// disagrees with the others.
fn skewed_model(skew: u32) -> impl Fn(&mut ModelApp) + Send + Sync {
    move |model: &mut ModelApp| {
        model
            .init_resource::<Counter>()
            .add_view_event::<Command>()
            .add_persistence(Migrations::<u32>::new(1))
            .add_observer(|_: On<FromView<Command>>, skew: Res<Skew>, mut persist: PersistSession| {
                persist.persist(&(42 + skew.0)).expect("persists");
            });
        model.world_mut().insert_resource(Skew(skew));
    }
}

#[test]
fn a_diverged_replica_never_overwrites_the_consensus_data() {
    let built = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let factory = {
        let built = built.clone();
        Box::new(move || -> Box<dyn Fn(&mut ModelApp) + Send + Sync> {
            // One ModelPlugin per replica: the third one is skewed.
            let n = built.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Box::new(skewed_model(if n == 2 { 1000 } else { 0 }))
        })
    };
    let mut h = Harness::new(test_session("dissident"), factory);
    for _ in 0..3 {
        h.add_client(|_| {});
    }
    h.run_rounds(10, 100);
    // The dissident is the one that asks: it would be the first to vote, and still must not win.
    send(&mut h, 2, Command::Again);
    h.run_rounds(30, 100);
    let uploads: Vec<u32> = (0..3).map(|i| h.client(i).persist_uploads()).collect();
    assert_eq!(uploads.iter().sum::<u32>(), 1, "{uploads:?}");
    assert_eq!(uploads[2], 0, "the diverged replica uploaded");
    let ids = h.client(0).ids();
    let record = h.reflector.core().persisted(&ids.persistent).expect("stored").clone();
    let key = SessionKey::derive("correct horse", &ids.persistent, KdfParams::INSECURE_FAST).unwrap();
    let json = key.open(SealKind::Persisted, &Binding::Persistent(ids.persistent), &record.data).unwrap();
    assert_eq!(String::from_utf8(json).unwrap(), r#"{"data":42,"version":1}"#);
    assert!(!h.divergences(0).is_empty(), "the disagreement was not reported");
}
