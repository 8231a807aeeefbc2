//! View events on their way out: the outbox, the send rate limit, bundling, and keeping every
//! sent event until the session acknowledged it.
//!
//! Each sealed message gets a [`SentId`] (a random origin per client instance and a counter) and
//! stays in `unacked` until the client sees it stamped (its own event comes back, or the restored
//! model says it executed it). After a reconnect whatever is still unacknowledged is sent again,
//! in order, and the reflector stamps each id once: an event published during an outage, or in
//! flight when the connection dropped, is executed exactly once.

use bevy::prelude::*;
use std::collections::VecDeque;
use std::time::Instant;
use synq_protocol::crypto::{Binding, SealKind, Sealed};
use synq_protocol::wire::{ClientMessage, SentId, ViewEvent};
use tracing::{error, warn};

use super::{Phase, SynqClient};
use crate::debug::synq_debug;
use crate::status::SynqProblem;

/// View events waiting to be sealed and sent.
#[derive(Resource, Default)]
pub struct Outbox {
    pub(crate) index: bevy::platform::collections::HashMap<std::any::TypeId, u16>,
    pub(crate) pending: Vec<Vec<u8>>,
}

impl Outbox {
    /// Number of events published but not sent yet (held by the send rate limit, or waiting for
    /// the connection).
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether every published event was sent.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    pub(crate) fn push<T: serde::Serialize + 'static>(&mut self, event: &T) {
        let Some(&index) = self.index.get(&std::any::TypeId::of::<T>()) else {
            error!(
                "bevy_synq: {} was published but never registered with ModelApp::add_view_event; dropped",
                std::any::type_name::<T>()
            );
            return;
        };
        let mut bytes = index.to_le_bytes().to_vec();
        match postcard::to_io(event, &mut bytes) {
            Ok(_) => self.pending.push(bytes),
            Err(e) => error!("bevy_synq: could not encode {}: {e}", std::any::type_name::<T>()),
        }
    }
}

/// Most sealed messages kept unacknowledged; past it, published events wait in the outbox.
const MAX_UNACKED: usize = 1024;

/// Most published events the outbox holds while they cannot be sent; past it, new ones are
/// dropped and reported.
const MAX_PENDING: usize = 16_384;

/// Messages sent per second at most (the reflector allows 60), and in one burst.
const SEND_RATE: f64 = 50.0;

/// A sealed message sent (or to be sent) and not yet seen stamped.
pub(crate) struct Unacked {
    id: SentId,
    payload: Sealed,
}

/// What the client keeps of the events it sent.
pub(crate) struct SentEvents {
    /// Random per client instance.
    origin: u64,
    /// The id of the next message.
    next: u64,
    unacked: VecDeque<Unacked>,
    /// How many of `unacked` went out on the current connection.
    sent_on_connection: usize,
    /// Token bucket of the send rate.
    tokens: f64,
    refilled: Instant,
}

impl SentEvents {
    pub(crate) fn new() -> Self {
        use chacha20poly1305::aead::rand_core::RngCore;
        let origin = chacha20poly1305::aead::OsRng.next_u64();
        Self {
            origin,
            next: 1,
            unacked: VecDeque::new(),
            sent_on_connection: 0,
            tokens: SEND_RATE,
            refilled: Instant::now(),
        }
    }

    /// Forgets what the session stamped: every message up to `id` of this instance.
    pub(crate) fn acknowledge(&mut self, id: SentId) {
        if id.origin != self.origin {
            return;
        }
        while self.unacked.front().is_some_and(|u| u.id.seq <= id.seq) {
            self.unacked.pop_front();
            self.sent_on_connection = self.sent_on_connection.saturating_sub(1);
        }
    }

    /// A new connection: everything unacknowledged goes out again.
    pub(crate) fn resend_all(&mut self) -> usize {
        self.sent_on_connection = 0;
        self.unacked.len()
    }

    /// Messages sent and not acknowledged yet.
    pub(crate) fn unacknowledged(&self) -> usize {
        self.unacked.len()
    }
}

impl SynqClient {
    /// Seals the view events published this frame and sends what is due, unacknowledged
    /// messages of an earlier connection first.
    pub(crate) fn flush(&mut self, outbox: &mut Outbox) {
        if outbox.pending.len() > MAX_PENDING {
            let dropped = outbox.pending.len() - MAX_PENDING;
            outbox.pending.truncate(MAX_PENDING);
            let reason = format!("the outbox is full ({MAX_PENDING} events unsent): {dropped} new events were dropped");
            warn!("bevy_synq: {reason}");
            self.problems.push(SynqProblem::Refused(reason));
        }
        if self.connection.is_none() || !matches!(self.phase, Phase::Running) {
            return;
        }
        self.seal_pending(outbox);
        self.send_unsent();
    }

    /// Seals what was published into numbered messages (bundled above the send rate).
    fn seal_pending(&mut self, outbox: &mut Outbox) {
        if outbox.pending.is_empty() || self.sent.unacked.len() >= MAX_UNACKED {
            return;
        }
        // Room for the nonce, the tag and the encoding around the plaintext.
        let limit = synq_protocol::Limits::default().max_event_bytes - 64;
        let too_large: Vec<usize> = outbox.pending.iter().filter(|p| p.len() > limit).map(Vec::len).collect();
        for size in too_large {
            let reason = format!("an event of {size} bytes exceeds the {limit}-byte limit and was dropped");
            warn!("bevy_synq: {reason}");
            self.problems.push(SynqProblem::Refused(reason));
        }
        outbox.pending.retain(|p| p.len() <= limit);
        let interval = std::time::Duration::from_secs(1) / self.config.event_rate_limit.max(1);
        if self.last_send.is_some_and(|at| at.elapsed() < interval) {
            return; // wait: what is pending goes out in one bundle
        }
        let pending = std::mem::take(&mut outbox.pending);
        let messages: Vec<Vec<u8>> = if pending.len() == 1 { pending } else { bundle(pending, limit) };
        self.last_send = Some(Instant::now());
        for plaintext in messages {
            synq_debug!(
                self.config.debug,
                SENDS,
                "{} ({} bytes)",
                match u16::from_le_bytes([plaintext[0], plaintext[1]]) {
                    0xFFFF => "a bundle of events".to_string(),
                    index => format!("event type #{index}"),
                },
                plaintext.len()
            );
            let binding = Binding::SessionView(self.ids.session, self.ids.view);
            let payload = self.key().seal(SealKind::Event, &binding, &plaintext);
            let id = SentId { origin: self.sent.origin, seq: self.sent.next };
            self.sent.next += 1;
            self.sent.unacked.push_back(Unacked { id, payload });
        }
    }

    /// Sends the messages not sent on this connection yet, within the send rate.
    fn send_unsent(&mut self) {
        let sent = &mut self.sent;
        let now = Instant::now();
        sent.tokens = (sent.tokens + now.duration_since(sent.refilled).as_secs_f64() * SEND_RATE).min(SEND_RATE);
        sent.refilled = now;
        let Some(connection) = self.connection.as_mut() else { return };
        while sent.sent_on_connection < sent.unacked.len() && sent.tokens >= 1.0 {
            let message = &sent.unacked[sent.sent_on_connection];
            let event = ViewEvent { sent: Some(message.id), payload: message.payload.clone() };
            if !connection.send(ClientMessage::Event(event)) {
                return; // the connection is going; what is left goes out on the next one
            }
            sent.sent_on_connection += 1;
            sent.tokens -= 1.0;
        }
    }
}

/// Packs events into bundles of at most `limit` bytes: `[0xFF, 0xFF]` then the postcard list of
/// the events' own plaintexts, in order.
fn bundle(events: Vec<Vec<u8>>, limit: usize) -> Vec<Vec<u8>> {
    let mut bundles = Vec::new();
    let mut current: Vec<serde_bytes::ByteBuf> = Vec::new();
    let mut size = 8;
    let flush = |current: &mut Vec<serde_bytes::ByteBuf>, bundles: &mut Vec<Vec<u8>>| {
        if !current.is_empty() {
            let mut plaintext = vec![0xFF, 0xFF];
            postcard::to_io(&*current, &mut plaintext).expect("bundles encode");
            bundles.push(plaintext);
            current.clear();
        }
    };
    for event in events {
        if size + event.len() + 4 > limit {
            flush(&mut current, &mut bundles);
            size = 8;
        }
        size += event.len() + 4;
        current.push(serde_bytes::ByteBuf::from(event));
    }
    flush(&mut current, &mut bundles);
    bundles
}
