//! Snapshot hot paths for 1k / 10k / 100k entities with 3 small components:
//!
//! * `capture_encode_hash`: encode the model world canonically and SHA-256 it;
//! * `restore`: build a model world from the plugin and rebuild it from the bytes (a late joiner);
//! * `snapshot_point`: one whole snapshot point as every replica runs it — encode with the
//!   per-part hashes, hash, build a fresh model world and rebuild it from the bytes.
//!
//! Run: `cargo bench --bench snapshot`
//!
//! For an instruction count of one snapshot point (valgrind's callgrind):
//! `SYNQ_ONE_SNAPSHOT_POINT=10000 valgrind --tool=callgrind --toggle-collect='*one_snapshot_point*' target/release/deps/snapshot-<hash>`

use bevy::prelude::*;
use bevy_synq::prelude::*;
use bevy_synq::{ModelRuntime, RuntimeOptions, SnapshotPolicy, snapshot};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use serde::{Deserialize, Serialize};
use std::hint::black_box;
use std::time::Duration;

#[derive(Component, Serialize, Deserialize, Clone, Copy)]
struct Position(f32, f32);

#[derive(Component, Serialize, Deserialize, Clone, Copy)]
struct Velocity(f32, f32);

#[derive(Component, Serialize, Deserialize, Clone, Copy)]
struct Kind(u32);

#[derive(Resource, Serialize, Deserialize, Clone, Copy)]
struct Population(u32);

fn model(model: &mut ModelApp) {
    model
        .register_component::<Position>()
        .register_component::<Velocity>()
        .register_component::<Kind>()
        .register_resource::<Population>()
        .add_systems(ModelInit, |mut commands: Commands, population: Res<Population>, mut rng: ResMut<ModelRng>| {
            for i in 0..population.0 {
                commands.spawn((
                    Position(rng.range_f32(0.0, 1000.0), rng.range_f32(0.0, 1000.0)),
                    Velocity(rng.range_f32(-3.0, 3.0), rng.range_f32(-3.0, 3.0)),
                    Kind(i % 7),
                ));
            }
        });
}

fn options(every_events: u32) -> RuntimeOptions {
    RuntimeOptions { snapshot_policy: SnapshotPolicy { every_ms: u64::MAX, every_events }, ..Default::default() }
}

fn plugin(n: u32) -> impl Fn(&mut ModelApp) + Send + Sync + 'static {
    move |app: &mut ModelApp| {
        model(app);
        app.world_mut().insert_resource(Population(n));
    }
}

/// A runtime of `n` entities whose every external message is a snapshot point.
fn runtime(n: u32) -> ModelRuntime {
    ModelRuntime::start_fresh(plugin(n), options(1))
}

/// One snapshot point: an empty join/leave notice, after which a point is due.
#[inline(never)]
fn snapshot_point(rt: &mut ModelRuntime) {
    let seq = rt.last_seq().wrapping_add(1);
    let now = rt.now_ms();
    rt.execute_users(now, seq, Vec::new(), Vec::new()).expect("in order");
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("snapshot");
    group.sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    for n in [1_000u32, 10_000, 100_000] {
        let mut rt = runtime(n);
        let bytes = rt.capture().expect("encodes");
        println!("{n} entities: snapshot of {} bytes", bytes.len());
        group.throughput(Throughput::Elements(u64::from(n)));
        group.bench_with_input(BenchmarkId::new("capture_encode_hash", n), &n, |b, _| {
            b.iter(|| {
                let bytes = rt.capture().expect("encodes");
                snapshot::state_hash(&bytes)
            })
        });
        group.bench_with_input(BenchmarkId::new("restore", n), &n, |b, _| {
            b.iter(|| ModelRuntime::from_snapshot(plugin(n), options(u32::MAX), &bytes).expect("restores"))
        });
        group.bench_with_input(BenchmarkId::new("snapshot_point", n), &n, |b, _| {
            b.iter(|| {
                snapshot_point(&mut rt);
                black_box(rt.now_ms())
            })
        });
        drop(rt);
    }
    group.finish();
}

criterion_group!(benches, bench);

/// What callgrind measures (`--toggle-collect='*one_snapshot_point*'`).
#[inline(never)]
fn one_snapshot_point(rt: &mut ModelRuntime) {
    snapshot_point(rt);
}

fn main() {
    if let Ok(n) = std::env::var("SYNQ_ONE_SNAPSHOT_POINT") {
        let n: u32 = n.parse().expect("SYNQ_ONE_SNAPSHOT_POINT=<entities>");
        let mut rt = runtime(n);
        // A first point outside the measurement, so that the measured one starts from a world
        // that was itself rebuilt (what every point but the first sees).
        snapshot_point(&mut rt);
        one_snapshot_point(&mut rt);
        println!("two snapshot points at {n} entities done (callgrind counts the second)");
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
