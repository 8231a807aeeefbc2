//! The change feed (`ModelChangesPlugin`): every spawn, despawn and component change of the model
//! appears exactly once, in the frame after it happened, on every replica with the same ids; a
//! snapshot point (the canonical rebuild) shows up as nothing; a late joiner's first synced
//! frame reports its whole world as spawned.

mod common;

use bevy::ecs::system::RunSystemOnce;
use bevy::prelude::*;
use bevy_synq::prelude::*;
use common::{Harness, test_session};
use serde::{Deserialize, Serialize};
use std::any::type_name;
use std::collections::BTreeMap;

#[derive(Component, Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
struct Value(u32);

#[derive(Component, Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
struct Tag;

/// Spawns, changes, tags, untags and despawns entities on a schedule of model time only.
fn step(time: Res<ModelTime>, mut commands: Commands, mut values: Query<(Entity, &ModelId, &mut Value, Has<Tag>)>) {
    let n = time.now_ms() / 50;
    for (entity, id, mut value, tagged) in &mut values {
        let id = id.get();
        if (id + n).is_multiple_of(4) {
            value.0 += 1;
        }
        if value.0 >= 6 && id.is_multiple_of(2) {
            commands.entity(entity).despawn();
        } else if (id + n).is_multiple_of(7) && !tagged {
            commands.entity(entity).insert(Tag);
        } else if (id + n).is_multiple_of(11) && tagged {
            commands.entity(entity).remove::<Tag>();
        }
    }
    if n.is_multiple_of(3) {
        commands.spawn(Value(0));
    }
}

fn model(model: &mut ModelApp) {
    model
        .register_component::<Value>()
        .register_component::<Tag>()
        .add_systems(ModelInit, |mut commands: Commands| {
            for i in 0..5 {
                commands.spawn(Value(i));
            }
        })
        .add_systems(ModelUpdate, step);
}

type State = BTreeMap<ModelId, (u32, bool)>;

/// One frame as a view saw it.
#[derive(Debug, Clone, PartialEq)]
struct Frame {
    time: u64,
    synced: bool,
    state: State,
    despawned: Vec<ModelId>,
    spawned: Vec<ModelId>,
    changed: Vec<(ModelId, Vec<&'static str>)>,
}

impl Frame {
    fn is_empty(&self) -> bool {
        self.despawned.is_empty() && self.spawned.is_empty() && self.changed.is_empty()
    }
}

#[derive(Resource, Default)]
struct Log(Vec<Frame>);

fn record(
    model: Model,
    status: Res<SynqStatus>,
    mut values: ModelQuery<(&ModelId, &Value, Has<Tag>)>,
    mut spawned: MessageReader<ModelEntitySpawned>,
    mut despawned: MessageReader<ModelEntityDespawned>,
    mut changed: MessageReader<ModelEntityChanged>,
    mut log: ResMut<Log>,
) {
    let state: State = values.iter().map(|(id, value, tagged)| (*id, (value.0, tagged))).collect();
    // `get_by_id` agrees with the iteration.
    for (id, (value, tagged)) in &state {
        assert_eq!(values.get_by_id(*id).map(|(_, v, t)| (v.0, t)), Some((*value, *tagged)));
        assert_eq!(model.get_by_id::<Value>(*id).map(|v| v.0), Some(*value));
    }
    log.0.push(Frame {
        time: model.now_ms(),
        synced: status.is_synced(),
        state,
        despawned: despawned.read().map(|m| m.0).collect(),
        spawned: spawned.read().map(|m| m.0).collect(),
        changed: changed.read().map(|m| (m.id, m.components.clone())).collect(),
    });
}

fn setup(app: &mut App) {
    app.add_plugins(ModelChangesPlugin).init_resource::<Log>().add_systems(Update, record);
}

/// Checks a view's frames against the states it saw: each frame reports exactly the difference
/// from the last synced frame. Returns the synced frames.
fn check(frames: &[Frame]) -> Vec<Frame> {
    let mut before = State::new();
    let mut synced = Vec::new();
    for frame in frames {
        if !frame.synced {
            // Nothing while not synced, except everything despawned on leaving the session.
            assert!(frame.spawned.is_empty() && frame.changed.is_empty(), "reported while not synced: {frame:?}");
            if !frame.despawned.is_empty() {
                assert_eq!(frame.despawned, before.keys().copied().collect::<Vec<_>>());
                before.clear();
            }
            continue;
        }
        let spawned: Vec<_> = frame.state.keys().filter(|id| !before.contains_key(id)).copied().collect();
        let despawned: Vec<_> = before.keys().filter(|id| !frame.state.contains_key(id)).copied().collect();
        let changed: Vec<_> = frame
            .state
            .iter()
            .filter_map(|(id, now)| {
                let was = before.get(id)?;
                let mut components = Vec::new();
                if was.0 != now.0 {
                    components.push(type_name::<Value>());
                }
                if was.1 != now.1 {
                    components.push(type_name::<Tag>());
                }
                (!components.is_empty()).then_some((*id, components))
            })
            .collect();
        assert_eq!(frame.spawned, spawned, "spawned at {} ms", frame.time);
        assert_eq!(frame.despawned, despawned, "despawned at {} ms", frame.time);
        assert_eq!(frame.changed, changed, "changed at {} ms", frame.time);
        for (_, components) in &frame.changed {
            let message = ModelEntityChanged { id: ModelId::from_raw(0), components: components.clone() };
            assert_eq!(message.contains::<Value>(), components.contains(&type_name::<Value>()));
        }
        before = frame.state.clone();
        synced.push(frame.clone());
    }
    synced
}

fn log(h: &Harness, index: usize) -> Vec<Frame> {
    h.apps[index].world().resource::<Log>().0.clone()
}

#[test]
fn the_feed_reports_every_change_once_and_rebuilds_not_at_all() {
    let mut session = test_session("change-feed");
    session.snapshot_policy.every_ms = 300;
    let mut h = Harness::new(session, || model);
    h.add_client(setup);
    h.add_client(setup);
    h.run_rounds(40, 50);
    let late = h.add_client(setup);
    h.run_rounds(40, 50);
    h.settle();
    let shared_points = h.assert_converged();
    assert!(shared_points >= 5, "{shared_points} shared snapshot points");

    let first = check(&log(&h, 0));
    let second = check(&log(&h, 1));
    let joiner = check(&log(&h, late));

    // Something happened of every kind, and the first synced frame reported the initial world.
    let count = |frames: &[Frame], f: fn(&Frame) -> usize| frames.iter().map(f).sum::<usize>();
    assert!(count(&first, |f| f.despawned.len()) >= 3);
    assert!(count(&first, |f| f.spawned.len()) >= 10);
    assert!(count(&first, |f| f.changed.len()) >= 10);
    assert!(first.iter().flat_map(|f| &f.changed).any(|(_, c)| c.contains(&type_name::<Tag>())));
    assert_eq!(first[0].spawned, first[0].state.keys().copied().collect::<Vec<_>>());

    // The replicas that ran from the start saw the same frames (the same ids in the same frames)
    // once both were synced: each is synced when it executed its own view-join, and the first
    // one's may be stamped a batch period before the second one's.
    let changes = |frames: &[Frame]| {
        frames
            .iter()
            .filter(|f| !f.is_empty())
            .map(|f| (f.time, f.despawned.clone(), f.spawned.clone(), f.changed.clone()))
            .collect::<Vec<_>>()
    };
    let both_synced = first[0].time.max(second[0].time);
    let since = |frames: &[Frame], from: u64| changes(frames).into_iter().filter(|c| c.0 > from).collect::<Vec<_>>();
    assert!(!since(&first, both_synced).is_empty());
    assert_eq!(since(&first, both_synced), since(&second, both_synced));

    // The late joiner's first synced frame reports its whole world as spawned; after it, it sees
    // what the others saw.
    let start = &joiner[0];
    assert!(start.time > 0);
    assert_eq!(start.spawned, start.state.keys().copied().collect::<Vec<_>>());
    assert!(start.despawned.is_empty() && start.changed.is_empty());
    assert_eq!(since(&joiner, start.time), since(&first, start.time));
    let at_start = first.iter().rfind(|f| f.time <= start.time).expect("a frame before the join");
    assert_eq!(at_start.state, start.state);
}

#[test]
fn leaving_the_session_reports_everything_despawned() {
    let mut h = Harness::new(test_session("change-feed-leave"), || model);
    h.add_client(setup);
    h.run_rounds(10, 50);
    h.settle();
    let known = h.apps[0].world().resource::<Log>().0.last().unwrap().state.clone();
    h.apps[0].world_mut().run_system_once(|mut session: SynqSession| session.leave()).unwrap();
    h.run_rounds(2, 50);
    let frames = log(&h, 0);
    let gone: Vec<ModelId> = frames.iter().rev().take(2).flat_map(|f| f.despawned.clone()).collect();
    assert_eq!(gone, known.keys().copied().collect::<Vec<_>>());
}
