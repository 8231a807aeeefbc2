//! The runtime's overhead per external message and per fixed step, against the same observer and
//! systems on a plain Bevy `World` in the same run.
//!
//! Run: `cargo bench --bench model_step`

use bevy::ecs::schedule::{ScheduleLabel, SingleThreadedExecutor};
use bevy::prelude::*;
use bevy_synq::prelude::*;
use bevy_synq::{ModelRuntime, RuntimeOptions, SnapshotPolicy};
use criterion::{Criterion, criterion_group, criterion_main};
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Serialize, Deserialize, Clone, Copy)]
struct Bump(u32);

#[derive(Resource, Serialize, Deserialize, Default)]
struct Total(u64);

#[derive(Component, Serialize, Deserialize, Clone, Copy)]
struct Position(f32, f32);

#[derive(Component, Serialize, Deserialize, Clone, Copy)]
struct Velocity(f32, f32);

fn on_bump(bump: On<FromView<Bump>>, mut total: ResMut<Total>) {
    total.0 += u64::from(bump.0);
}

fn movement(mut bodies: Query<(&mut Position, &Velocity)>) {
    for (mut p, v) in &mut bodies {
        p.0 = (p.0 + v.0).rem_euclid(1000.0);
        p.1 = (p.1 + v.1).rem_euclid(1000.0);
    }
}

fn spawn_bodies(mut commands: Commands) {
    for i in 0..1000 {
        commands.spawn((Position(i as f32, 0.0), Velocity(1.0, 0.5)));
    }
}

fn model(model: &mut ModelApp) {
    model
        .register_component::<Position>()
        .register_component::<Velocity>()
        .init_resource::<Total>()
        .add_view_event::<Bump>()
        .add_observer(on_bump)
        .add_systems(ModelInit, spawn_bodies)
        .add_systems(ModelUpdate, movement);
}

#[derive(ScheduleLabel, Clone, Debug, PartialEq, Eq, Hash)]
struct PlainUpdate;

fn bench(c: &mut Criterion) {
    let options = RuntimeOptions {
        snapshot_policy: SnapshotPolicy { every_ms: u64::MAX, every_events: u32::MAX },
        ..Default::default()
    };
    let mut group = c.benchmark_group("model_step");
    group.warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));

    // Baseline: the same observer on a plain World, triggered directly.
    let mut plain = World::new();
    plain.init_resource::<Total>();
    plain.add_observer(on_bump);
    group.bench_function("plain_world_trigger", |b| {
        b.iter(|| {
            plain.trigger(FromView { view: ViewId(1), event: Bump(1) });
            plain.flush();
        })
    });

    // The runtime: decode, order checks, trigger, flush, snapshot-point check.
    let mut runtime = ModelRuntime::start_fresh(model, options);
    let mut seq = bevy_synq::protocol::INITIAL_SEQ;
    let time = runtime.now_ms();
    group.bench_function("runtime_external_event", |b| {
        b.iter(|| {
            seq = seq.wrapping_add(1);
            runtime.execute_view_event(time, seq, ViewId(1), &Bump(1)).expect("in order");
        })
    });

    // A fixed step over 1,000 entities: plain schedule vs the runtime's future-message step.
    let mut plain = World::new();
    let mut schedule = Schedule::new(PlainUpdate);
    schedule.set_executor(SingleThreadedExecutor::new());
    schedule.add_systems(movement);
    plain.add_schedule(schedule);
    plain.run_system_once(spawn_bodies).expect("spawns");
    group.bench_function("plain_world_step_1k", |b| b.iter(|| plain.run_schedule(PlainUpdate)));

    let mut runtime = ModelRuntime::start_fresh(model, options);
    let mut now = runtime.now_ms();
    group.bench_function("runtime_step_1k", |b| {
        b.iter(|| {
            now += 50;
            runtime.advance(now);
        })
    });
    group.finish();
}

use bevy::ecs::system::RunSystemOnce;

criterion_group!(benches, bench);
criterion_main!(benches);
