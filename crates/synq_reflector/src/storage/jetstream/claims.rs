//! Session claims: which reflector of a cluster serves a session.
//!
//! One stream, [`CLAIMS_STREAM`], keeps at most one message per subject
//! `synq.claim.<session id>`: the session's current claim (the address clients reach its
//! reflector at, and whether it was released). Messages expire [`JetStreamOptions::claim_ttl`]
//! after they were written (the stream's maximum age), so a claim that is not renewed lapses.
//!
//! A claim is taken or renewed by a publish conditioned on the subject's last sequence
//! (`Nats-Expected-Last-Subject-Sequence`): 0 when the subject holds nothing, otherwise the
//! sequence read (taking over a released or lapsed claim, or one of an earlier process at this
//! reflector's own address) or last written (renewing). The stream's leader checks the condition
//! and stores the message in one step, so of two reflectors racing for a session exactly one
//! wins, and a reflector whose claim another one took over learns it at its next renewal.
//!
//! [`JetStreamOptions::claim_ttl`]: super::JetStreamOptions::claim_ttl

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::{self, message::PublishMessage, stream};
use serde::{Deserialize, Serialize};
use synq_protocol::ids::SessionId;

use super::{decode, encode};
use crate::storage::{Claim, StorageError};

/// The stream of session claims.
pub const CLAIMS_STREAM: &str = "SYNQ_CLAIMS";
/// The subjects of [`CLAIMS_STREAM`]: `synq.claim.<session id>`.
pub const CLAIM_SUBJECTS: &str = "synq.claim.*";

/// The stream's configuration: one message per session, expiring after `ttl`.
fn stream_config(replicas: usize, ttl: Duration) -> stream::Config {
    stream::Config {
        name: CLAIMS_STREAM.into(),
        subjects: vec![CLAIM_SUBJECTS.into()],
        storage: stream::StorageType::File,
        num_replicas: replicas,
        max_messages_per_subject: 1,
        max_age: ttl,
        // Within the maximum age, as JetStream requires; no message ids are used.
        duplicate_window: ttl,
        allow_direct: true,
        ..Default::default()
    }
}

/// What a claim message holds.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct ClaimRecord {
    /// Where clients reach the reflector that holds the claim.
    owner: SocketAddr,
    /// The reflector let the session go (it unloaded it): anyone may take it.
    released: bool,
}

/// A claim this reflector holds.
struct Held {
    /// The stream sequence of its latest message.
    sequence: u64,
    /// When it was last written.
    renewed_at: Instant,
}

/// The claims of one reflector.
pub(super) struct Claims {
    stream: stream::Stream,
    advertise: SocketAddr,
    ttl: Duration,
    held: HashMap<SessionId, Held>,
    next_renewal: Instant,
}

fn subject(session: &SessionId) -> String {
    format!("synq.claim.{session}")
}

/// Why a claim could not be written.
enum WriteError {
    /// Another reflector wrote the subject since it was read.
    Lost,
    /// The cluster did not answer.
    Failed(StorageError),
}

impl Claims {
    /// Gets or creates [`CLAIMS_STREAM`] with `replicas` and `ttl`.
    pub(super) async fn set_up(
        jetstream: &jetstream::Context,
        replicas: usize,
        advertise: SocketAddr,
        ttl: Duration,
    ) -> Result<Self, async_nats::jetstream::context::CreateStreamError> {
        let stream = jetstream.get_or_create_stream(stream_config(replicas, ttl)).await?;
        Ok(Self { stream, advertise, ttl, held: HashMap::new(), next_renewal: Instant::now() })
    }

    /// Whether this reflector holds the claim on `session`.
    pub(super) fn holds(&self, session: &SessionId) -> bool {
        self.held.contains_key(session)
    }

    /// Takes the claim on `session` unless another reflector holds it.
    pub(super) async fn claim(
        &mut self,
        jetstream: &jetstream::Context,
        session: &SessionId,
        timeout: Duration,
    ) -> Result<Claim, StorageError> {
        if self.holds(session) {
            return Ok(Claim::Owned);
        }
        let subject = subject(session);
        // A race lost between the read and the write is settled by reading the winner's claim.
        for _ in 0..3 {
            let expected = match self.read(&subject, timeout).await? {
                None => 0,
                Some((sequence, record)) if record.released || record.owner == self.advertise => sequence,
                Some((_, record)) => return Ok(Claim::ServedBy(record.owner)),
            };
            match self.write(jetstream, &subject, false, expected, timeout).await {
                Ok(sequence) => {
                    self.held.insert(*session, Held { sequence, renewed_at: Instant::now() });
                    return Ok(Claim::Owned);
                }
                Err(WriteError::Lost) => continue,
                Err(WriteError::Failed(error)) => return Err(error),
            }
        }
        Err(StorageError::Unavailable {
            action: "claiming a session",
            reason: "other reflectors kept taking it".into(),
        })
    }

    /// Renews the claims when due (every third of the time to live) and returns those lost:
    /// taken over by another reflector, or not renewed for two thirds of the time to live (so
    /// this reflector stops serving a session before another one may take it).
    /// Whether [`Claims::renew`] has anything to do now (checked without entering the runtime:
    /// the reflector asks on every poll, every few milliseconds).
    pub(super) fn renewal_due(&self) -> bool {
        !self.held.is_empty() && Instant::now() >= self.next_renewal
    }

    pub(super) async fn renew(&mut self, jetstream: &jetstream::Context) -> Vec<SessionId> {
        let now = Instant::now();
        if !self.renewal_due() {
            return Vec::new();
        }
        self.next_renewal = now + self.ttl / 3;
        let timeout = self.ttl / 3;
        let payload = match encode(&ClaimRecord { owner: self.advertise, released: false }) {
            Ok(payload) => payload,
            Err(_) => return Vec::new(),
        };
        // Every renewal is published before any acknowledgement is awaited.
        let mut pending = Vec::with_capacity(self.held.len());
        for (session, held) in &self.held {
            let message =
                PublishMessage::build().payload(payload.clone()).expected_last_subject_sequence(held.sequence);
            pending.push((*session, jetstream.send_publish(subject(session), message).await));
        }
        let mut lost = Vec::new();
        for (session, sent) in pending {
            let result = match sent {
                Ok(ack) => tokio::time::timeout(timeout, ack.into_future()).await.ok(),
                Err(error) => Some(Err(error)),
            };
            let held = self.held.get_mut(&session).expect("held above");
            match result {
                Some(Ok(ack)) => {
                    held.sequence = ack.sequence;
                    held.renewed_at = now;
                }
                Some(Err(error)) if error.kind() == PublishErrorKind::WrongLastSequence => {
                    tracing::warn!(%session, "another reflector took the session over");
                    lost.push(session);
                }
                failed => {
                    let reason = failed.map_or("no answer in time".to_string(), |r| {
                        r.err().map(|e| e.to_string()).unwrap_or_default()
                    });
                    if now.duration_since(held.renewed_at) >= self.ttl * 2 / 3 {
                        tracing::warn!(%session, %reason, "the claim could not be renewed in time");
                        lost.push(session);
                    } else {
                        tracing::debug!(%session, %reason, "claim renewal failed; retrying");
                    }
                }
            }
        }
        for session in &lost {
            self.held.remove(session);
        }
        lost
    }

    /// Lets `session` go, so that another reflector may take it at once.
    pub(super) async fn release(&mut self, jetstream: &jetstream::Context, session: &SessionId, timeout: Duration) {
        let Some(held) = self.held.remove(session) else { return };
        if let Err(WriteError::Failed(error)) =
            self.write(jetstream, &subject(session), true, held.sequence, timeout).await
        {
            tracing::debug!(%session, %error, "could not release the claim; it lapses on its own");
        }
    }

    /// The subject's claim and its sequence, if it holds one.
    async fn read(&self, subject: &str, timeout: Duration) -> Result<Option<(u64, ClaimRecord)>, StorageError> {
        let read = tokio::time::timeout(timeout, self.stream.get_last_raw_message_by_subject(subject)).await;
        let message = match read {
            Ok(Ok(message)) => message,
            Ok(Err(e)) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(None),
            Ok(Err(e)) => {
                return Err(StorageError::Unavailable { action: "reading a session claim", reason: e.to_string() });
            }
            Err(_) => {
                let reason = format!("no answer within {timeout:?}");
                return Err(StorageError::Unavailable { action: "reading a session claim", reason });
            }
        };
        match decode::<ClaimRecord>(&message.payload) {
            Ok(record) => Ok(Some((message.sequence, record))),
            // A claim nobody can read holds nobody: it is taken over.
            Err(reason) => {
                tracing::warn!(subject, %reason, "an undecodable session claim is taken over");
                Ok(Some((message.sequence, ClaimRecord { owner: self.advertise, released: true })))
            }
        }
    }

    /// Writes this reflector's claim if the subject's last sequence is `expected`.
    async fn write(
        &self,
        jetstream: &jetstream::Context,
        subject: &str,
        released: bool,
        expected: u64,
        timeout: Duration,
    ) -> Result<u64, WriteError> {
        let payload = encode(&ClaimRecord { owner: self.advertise, released }).map_err(WriteError::Failed)?;
        let message = PublishMessage::build().payload(payload).expected_last_subject_sequence(expected);
        let publish = async {
            let ack = jetstream.send_publish(subject.to_string(), message).await?;
            ack.await
        };
        match tokio::time::timeout(timeout, publish).await {
            Ok(Ok(ack)) => Ok(ack.sequence),
            Ok(Err(e)) if e.kind() == PublishErrorKind::WrongLastSequence => Err(WriteError::Lost),
            Ok(Err(e)) => Err(WriteError::Failed(StorageError::Unavailable {
                action: "writing a session claim",
                reason: e.to_string(),
            })),
            Err(_) => Err(WriteError::Failed(StorageError::Unavailable {
                action: "writing a session claim",
                reason: format!("no answer within {timeout:?}"),
            })),
        }
    }
}
