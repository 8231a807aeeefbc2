//! Tallies: divergence reports, and uploading what the reflector elected this client to upload.

use bevy::prelude::*;
use synq_protocol::crypto::{Binding, SealKind};
use synq_protocol::ids::ViewId;
use synq_protocol::membership::{self, MemberSignature};
use synq_protocol::wire::{ClientMessage, PersistRecord, SnapshotRecord, Tally, VotePurpose};
use tracing::{error, info};

use super::SynqClient;
use crate::debug::synq_debug;
use crate::status::DivergenceDetected;

impl SynqClient {
    pub(super) fn tally(&mut self, tally: &Tally) {
        if tally.groups.len() > 1 {
            let groups: Vec<Vec<ViewId>> = tally.groups.iter().map(|g| g.views.clone()).collect();
            let described: Vec<String> = tally
                .groups
                .iter()
                .map(|g| {
                    let views: Vec<String> = g.views.iter().map(ToString::to_string).collect();
                    format!("{}… [{}]", &synq_protocol::ids::base64url(&g.vote)[..8], views.join(", "))
                })
                .collect();
            // Name what differs: compare each dissenting group's part hashes with the consensus'.
            let names = self
                .recent_points
                .iter()
                .find(|p| p.time == tally.time && p.seq == tally.seq)
                .map(|p| p.part_names.clone())
                .unwrap_or_default();
            let consensus = &tally.groups[0];
            let mut differing: Vec<String> = Vec::new();
            for group in &tally.groups[1..] {
                for (i, (ours, theirs)) in consensus.parts.iter().zip(&group.parts).enumerate() {
                    let name = names.get(i).cloned().unwrap_or_else(|| format!("part #{i}"));
                    if ours != theirs && !differing.contains(&name) {
                        differing.push(name);
                    }
                }
            }
            error!(
                "bevy_synq: session {} diverged at model time {} ms (seq {}): {} groups of replicas: {}; what differs from the consensus: {}",
                self.ids.session,
                tally.time,
                tally.seq,
                tally.groups.len(),
                described.join(" | "),
                if differing.is_empty() { "unknown".to_string() } else { differing.join(", ") }
            );
            let in_consensus = consensus.views.contains(&self.ids.view);
            self.divergences.push(DivergenceDetected {
                time: tally.time,
                seq: tally.seq,
                groups,
                in_consensus,
                differing,
            });
        }
        if tally.purpose == VotePurpose::Persist {
            if tally.uploader == Some(self.ids.view) {
                let Some(past) = self.recent_persists.iter().find(|p| p.time == tally.time && p.seq == tally.seq)
                else {
                    return;
                };
                let binding = Binding::Persistent(self.ids.persistent);
                let data = self.key().seal(SealKind::Persisted, &binding, past.json.as_bytes());
                info!("bevy_synq: uploading persisted data at {} ms ({} bytes)", past.time, past.json.len());
                synq_debug!(self.config.debug, PERSIST, "elected to upload the document of {} ms", past.time);
                let mut record =
                    PersistRecord { time: past.time, vote: past.vote, data, signature: MemberSignature::EMPTY };
                membership::sign_persist(self.key(), &self.ids.persistent, &mut record);
                self.send(ClientMessage::PersistUpload(record));
                self.persist_uploads += 1;
            }
            return;
        }
        if tally.uploader == Some(self.ids.view) {
            let Some(point) = self.recent_points.iter().find(|p| p.time == tally.time && p.seq == tally.seq) else {
                return;
            };
            synq_debug!(
                self.config.debug,
                SNAPSHOT,
                "elected to upload the snapshot of {} ms ({} bytes)",
                point.time,
                point.bytes.len()
            );
            let data = self.key().seal(SealKind::Snapshot, &Binding::Session(self.ids.session), &point.bytes);
            let signature = MemberSignature::EMPTY;
            let mut record = SnapshotRecord { time: point.time, seq: point.seq, vote: point.vote, data, signature };
            membership::sign_snapshot(self.key(), &self.ids.session, &mut record);
            self.send(ClientMessage::SnapshotUpload(record));
        }
    }
}
