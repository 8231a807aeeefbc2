//! Heartbeat ticks that overtake events. Over UDP a tick travels as an unreliable datagram of its
//! own, outside the ordered channel that carries events, so it can arrive before events stamped
//! earlier (`synq_protocol::udp`, "Ticks"). A client must not advance model time past an event it
//! has not received: each tick names the last sequence number it vouches for, and a client that
//! does not hold it yet ignores the tick.
//!
//! Here one replica's connection holds every message but ticks back for a few frames, so every
//! tick sent in that time overtakes them; a second replica has an ordinary connection, and a late
//! joiner arrives in the middle. All three must agree on the state (which folds in the model time
//! of every event) at every shared snapshot point and at the end, and the overtaken replica must
//! report no problem: without the guard it saw session time go back and resynced.

use std::collections::VecDeque;
use std::sync::Arc;

use bevy::ecs::system::RunSystemOnce;
use bevy::prelude::*;
use bevy_synq::prelude::*;
use bevy_synq::protocol::wire::{ClientMessage, ServerMessage};
use bevy_synq::reflector::inproc::InProcessHandle;
use bevy_synq::testing::{Divergences, Harness, Problems, record_divergences, record_problems, test_session};
use bevy_synq::transport::{Connection, Connector};
use bevy_synq::{ModelWorld, SynqPlugin};
use serde::{Deserialize, Serialize};

/// Frames a non-tick message is held back on the overtaken replica's connection.
const HOLD_FRAMES: u64 = 5;
/// Virtual milliseconds per frame: five frames span two heartbeat periods (50 ms).
const FRAME_MS: u64 = 20;

#[derive(Serialize, Deserialize, Clone)]
struct Mark(u64);

/// Folds in each mark and the model time it executed at: a replica that executed an event at
/// another time holds another state.
#[derive(Resource, Serialize, Deserialize, Clone, Default, Debug, PartialEq)]
struct Timeline {
    marks: u64,
    fold: u64,
}

fn model(model: &mut ModelApp) {
    model.init_resource::<Timeline>().add_view_event::<Mark>().add_observer(
        |mark: On<FromView<Mark>>, time: Res<ModelTime>, mut timeline: ResMut<Timeline>| {
            timeline.marks += 1;
            timeline.fold = timeline.fold.wrapping_mul(1_000_003).wrapping_add(mark.0 ^ time.now_ms() << 20);
        },
    );
}

/// Connects to an in-process reflector through [`Overtaken`] connections.
struct Overtaking(InProcessHandle);

impl Connector for Overtaking {
    fn connect(&mut self) -> Result<Box<dyn Connection>, String> {
        let inner = Connector::connect(&mut self.0)?;
        Ok(Box::new(Overtaken { inner, held: VecDeque::new(), frame: 0, frame_over: false, overtook: 0 }))
    }

    fn describe(&self) -> String {
        "an in-process reflector whose ticks overtake the other messages".into()
    }
}

/// Hands ticks over at once and every other message [`HOLD_FRAMES`] frames late (a frame ends
/// when the client polled everything there was).
struct Overtaken {
    inner: Box<dyn Connection>,
    held: VecDeque<(u64, Arc<ServerMessage>)>,
    frame: u64,
    frame_over: bool,
    /// Ticks handed over while older messages were still held.
    overtook: u64,
}

impl Connection for Overtaken {
    fn send(&mut self, message: ClientMessage) -> bool {
        self.inner.send(message)
    }

    fn poll(&mut self) -> Result<Option<Arc<ServerMessage>>, String> {
        if self.frame_over {
            self.frame_over = false;
            self.frame += 1;
        }
        while let Some(message) = self.inner.poll()? {
            if matches!(*message, ServerMessage::Tick { .. }) {
                if !self.held.is_empty() {
                    self.overtook += 1;
                    OVERTAKEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                return Ok(Some(message));
            }
            self.held.push_back((self.frame, message));
        }
        if self.held.front().is_some_and(|(at, _)| self.frame >= at + HOLD_FRAMES) {
            return Ok(self.held.pop_front().map(|(_, message)| message));
        }
        self.frame_over = true;
        Ok(None)
    }
}

/// Ticks that overtook held messages, over every [`Overtaken`] connection of the test.
static OVERTAKEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn mark(app: &mut App, value: u64) {
    app.world_mut()
        .run_system_once_with(|In(v): In<u64>, mut publish: Publish<Mark>| publish.send(Mark(v)), value)
        .unwrap();
}

fn timeline(app: &App) -> Timeline {
    let model = app.world().resource::<ModelWorld>();
    model.runtime().and_then(|runtime| runtime.world().get_resource::<Timeline>()).cloned().unwrap_or_default()
}

#[test]
fn ticks_that_overtake_events_are_ignored_until_the_events_arrive() {
    let mut session = test_session("tick-overtaking");
    session.snapshot_policy.every_ms = 400;
    let mut h = Harness::new(session.clone(), || model);

    // The overtaken replica, built as the harness builds its clients but on the wrapped connector.
    let mut overtaken = App::new();
    overtaken.add_plugins(MinimalPlugins);
    let mut overtaken_session = session.clone();
    overtaken_session.view_id = Some(ViewId(100));
    let target = ReflectorTarget::custom(Overtaking(h.reflector.handle()));
    overtaken.add_plugins(SynqPlugin::joining(model, overtaken_session, target));
    overtaken.init_resource::<Divergences>().init_resource::<Problems>();
    overtaken.add_systems(Last, (record_divergences, record_problems));
    overtaken.finish();
    overtaken.cleanup();
    h.apps.push(overtaken);
    h.add_client(|_| {});

    // Marks now and then, with quiet spells of several heartbeats between them.
    let mut value = 0;
    for round in 0..150u64 {
        if round == 70 {
            h.add_client(|_| {}); // the late joiner
        }
        if round % 7 == 3 {
            value += 1;
            let sender = (value % 2) as usize;
            mark(&mut h.apps[sender], value);
        }
        h.round(FRAME_MS);
    }
    h.run_rounds(2 * HOLD_FRAMES as usize, FRAME_MS);
    h.settle();

    let overtook = OVERTAKEN.load(std::sync::atomic::Ordering::Relaxed);
    assert!(overtook >= 10, "only {overtook} ticks overtook held messages: the test did not exercise the guard");
    let timelines: Vec<Timeline> = h.apps.iter().map(timeline).collect();
    assert_eq!(timelines[0].marks, value, "the overtaken replica executed every mark");
    assert!(timelines.windows(2).all(|w| w[0] == w[1]), "replicas disagree: {timelines:?}");
    let shared = h.assert_converged();
    assert!(shared >= 3, "only {shared} snapshot points shared");
}
