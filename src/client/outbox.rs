//! View events on their way out: the outbox, the send rate limit and bundling.

use bevy::prelude::*;
use std::time::Instant;
use synq_protocol::crypto::{Binding, SealKind};
use synq_protocol::wire::ClientMessage;

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

impl SynqClient {
    /// Seals and sends the view events published this frame.
    pub(crate) fn flush(&mut self, outbox: &mut Outbox) {
        if self.connection.is_none() || !matches!(self.phase, Phase::Running | Phase::AwaitingSync { joined: true, .. })
        {
            return;
        }
        if outbox.pending.is_empty() {
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
            let sealed = self.key.seal(SealKind::Event, &binding, &plaintext);
            if let Some(connection) = self.connection.as_mut() {
                connection.send(ClientMessage::Event(sealed));
            }
        }
        self.last_send = Some(Instant::now());
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
