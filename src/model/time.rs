//! Model time, the model's schedules and the future-message queue.

use bevy::ecs::schedule::ScheduleLabel;
use bevy::prelude::*;
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::collections::VecDeque;
use synq_protocol::seq_le;

/// Runs once, when a session starts fresh (never after a snapshot restore). Spawn the initial
/// model state here.
#[derive(ScheduleLabel, Clone, Debug, PartialEq, Eq, Hash)]
pub struct ModelInit;

/// Runs every fixed step of model time (50 ms by default; see `SessionConfig::step_ms`).
#[derive(ScheduleLabel, Clone, Debug, PartialEq, Eq, Hash)]
pub struct ModelUpdate;

/// The model's clock: reflector time, never wall-clock time. Part of the snapshot.
#[derive(Resource, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelTime {
    pub(crate) now_ms: u64,
    pub(crate) step_ms: u32,
    pub(crate) steps: u64,
}

impl ModelTime {
    /// Milliseconds since the session started. Constant within one message handler.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Seconds since the session started.
    pub fn now_secs(&self) -> f64 {
        self.now_ms as f64 / 1000.0
    }

    /// The fixed step of [`ModelUpdate`] in milliseconds.
    pub fn step_ms(&self) -> u32 {
        self.step_ms
    }

    /// How many [`ModelUpdate`] steps have run since the session started.
    pub fn steps(&self) -> u64 {
        self.steps
    }
}

/// What an internal (future) message does when it comes due.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum FutureKind {
    /// Run [`ModelUpdate`] and schedule the next step.
    Step,
    /// Trigger the registered timer event with this index, decoded from the payload.
    Timer { event: u16, payload: Vec<u8> },
    /// Upload the newest deferred persisted document (the end of a cool-off).
    PersistFlush,
}

/// A message the model sent to its own future.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FutureMessage {
    pub time: u64,
    pub seq: u32,
    pub kind: FutureKind,
}

fn order(a: &FutureMessage, b: &FutureMessage) -> Ordering {
    a.time.cmp(&b.time).then_with(|| {
        if a.seq == b.seq {
            Ordering::Equal
        } else if seq_le(a.seq, b.seq) {
            Ordering::Less
        } else {
            Ordering::Greater
        }
    })
}

/// The queue of future messages, ordered by (time, sequence with 32-bit wrap-around). Part of
/// the snapshot.
#[derive(Resource, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FutureQueue {
    pub next_seq: u32,
    pub messages: VecDeque<FutureMessage>,
}

impl FutureQueue {
    pub fn new(initial_seq: u32) -> Self {
        Self { next_seq: initial_seq, messages: VecDeque::new() }
    }

    /// Queues a message; returns its sequence number.
    pub fn push(&mut self, time: u64, kind: FutureKind) -> u32 {
        self.next_seq = self.next_seq.wrapping_add(1);
        let message = FutureMessage { time, seq: self.next_seq, kind };
        let at = self.messages.partition_point(|m| order(m, &message) == Ordering::Less);
        self.messages.insert(at, message);
        self.next_seq
    }

    /// Removes and returns the first message due at or before `time`.
    pub fn pop_due(&mut self, time: u64) -> Option<FutureMessage> {
        if self.messages.front()?.time <= time { self.messages.pop_front() } else { None }
    }

    /// Cancels a queued message by its sequence number.
    pub fn cancel(&mut self, seq: u32) -> bool {
        match self.messages.iter().position(|m| m.seq == seq && matches!(m.kind, FutureKind::Timer { .. })) {
            Some(at) => {
                self.messages.remove(at);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_orders_by_time_then_wrapping_sequence() {
        let mut q = FutureQueue::new(0xFFFF_FFFD);
        let a = q.push(10, FutureKind::Step); // seq FFFF_FFFE
        let b = q.push(10, FutureKind::Step); // seq FFFF_FFFF
        let c = q.push(10, FutureKind::Step); // seq 0 (wrapped): still after b
        let d = q.push(5, FutureKind::Step);
        let order: Vec<u32> = std::iter::from_fn(|| q.pop_due(100)).map(|m| m.seq).collect();
        assert_eq!(order, vec![d, a, b, c]);
        assert_eq!(c, 0);
    }

    #[test]
    fn pop_due_respects_time() {
        let mut q = FutureQueue::new(0);
        q.push(20, FutureKind::Step);
        assert!(q.pop_due(19).is_none());
        assert!(q.pop_due(20).is_some());
    }
}
