//! The cost of the view change feed (`ModelChangesPlugin`) per frame: encoding and digesting
//! every registered component of every model entity and comparing with the last frame, at 1k and
//! 10k entities, with nothing changed and with every entity moved (a model step, measured alone
//! too, for reference).
//!
//! Run: `cargo bench --bench change_feed`

use bevy::prelude::*;
use bevy_synq::prelude::*;
use bevy_synq::view::changes::ChangeTracker;
use bevy_synq::{ModelRuntime, RuntimeOptions, SnapshotPolicy};
use criterion::{Criterion, criterion_group, criterion_main};
use serde::{Deserialize, Serialize};
use std::hint::black_box;
use std::time::Duration;

#[derive(Component, Serialize, Deserialize, Clone, Copy)]
struct Position(f32, f32);

#[derive(Component, Serialize, Deserialize, Clone, Copy)]
struct Velocity(f32, f32);

#[derive(Component, Serialize, Deserialize, Clone, Copy)]
struct Health(u32);

fn movement(mut bodies: Query<(&mut Position, &Velocity)>) {
    for (mut p, v) in &mut bodies {
        p.0 = (p.0 + v.0).rem_euclid(1000.0);
        p.1 = (p.1 + v.1).rem_euclid(1000.0);
    }
}

fn model<const N: usize>(model: &mut ModelApp) {
    model
        .register_component::<Position>()
        .register_component::<Velocity>()
        .register_component::<Health>()
        .add_systems(ModelInit, |mut commands: Commands| {
            for i in 0..N {
                commands.spawn((Position(i as f32, 0.0), Velocity(1.0, 0.5), Health(100)));
            }
        })
        .add_systems(ModelUpdate, movement);
}

fn run(c: &mut Criterion, n: usize, plugin: fn(&mut ModelApp)) {
    let options = RuntimeOptions {
        snapshot_policy: SnapshotPolicy { every_ms: u64::MAX, every_events: u32::MAX },
        ..Default::default()
    };
    let mut group = c.benchmark_group(format!("change_feed_{n}"));
    group.warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3)).sample_size(20);

    let mut runtime = ModelRuntime::start_fresh(plugin, options);
    let mut tracker = ChangeTracker::default();
    assert_eq!(tracker.diff_runtime(&mut runtime).spawned.len(), n);
    group.bench_function("diff_unchanged", |b| b.iter(|| black_box(tracker.diff_runtime(&mut runtime))));

    let mut time = runtime.now_ms();
    group.bench_function("step_only", |b| {
        b.iter(|| {
            time += 50;
            runtime.advance(time);
        })
    });
    group.bench_function("step_and_diff_all_moved", |b| {
        b.iter(|| {
            time += 50;
            runtime.advance(time);
            let changes = tracker.diff_runtime(&mut runtime);
            assert_eq!(changes.changed.len(), n);
            black_box(changes)
        })
    });
    group.finish();
}

fn bench(c: &mut Criterion) {
    run(c, 1_000, model::<1_000>);
    run(c, 10_000, model::<10_000>);
}

criterion_group!(benches, bench);
criterion_main!(benches);
