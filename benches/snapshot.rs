//! Snapshot hot paths: capture + encode + hash, and restore (rebuild), for 1k / 10k / 100k
//! entities with 3 small components.
//!
//! Run: `cargo bench --bench snapshot`

use bevy::prelude::*;
use bevy_synq::prelude::*;
use bevy_synq::{ModelRuntime, RuntimeOptions, SnapshotPolicy, snapshot};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use serde::{Deserialize, Serialize};
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

fn options() -> RuntimeOptions {
    RuntimeOptions {
        snapshot_policy: SnapshotPolicy { every_ms: u64::MAX, every_events: u32::MAX },
        ..Default::default()
    }
}

fn runtime(n: u32) -> ModelRuntime {
    ModelRuntime::start_fresh(
        move |app: &mut ModelApp| {
            model(app);
            app.world_mut().insert_resource(Population(n));
        },
        options(),
    )
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
            b.iter(|| {
                ModelRuntime::from_snapshot(
                    move |app: &mut ModelApp| {
                        model(app);
                        app.world_mut().insert_resource(Population(n));
                    },
                    options(),
                    &bytes,
                )
                .expect("restores")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
