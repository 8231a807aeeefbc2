//! The shadow replica (a test mode, [`ShadowCheck`]) and state comparisons.
//!
//! The shadow is a second copy of the model, restored from a snapshot point's bytes with a fresh
//! [`ModelRuntime`] built by the same model plugin. Every call the real runtime makes in a frame
//! (execute an external message, advance to a time) is recorded with the snapshot points it
//! passed, and the shadow makes the same calls at the start of the next frame — a frame later on
//! the wall clock, with the app's frame in between — then the two are compared at the points
//! both passed. A shadow lives from the point it was restored from to the next point.
//!
//! The comparison of two states entity by entity also serves reloads: a replica outside the
//! consensus that reloads the consensus snapshot names what differed.

use bevy::prelude::*;
use std::collections::BTreeMap;
use synq_protocol::wire::SnapshotRecord;
use tracing::{error, warn};

use super::SynqClient;
use crate::config::ShadowCheck;
use crate::model::ModelId;
use crate::model::runtime::{External, ModelRuntime, RuntimeError, SnapshotPoint};
use crate::status::{EntityDifference, MAX_ENTITY_DIFFERENCES, ReloadReport, ShadowMismatch, SynqProblem};

/// What the real replica did in one call, for the shadow to do again.
pub(super) enum Call {
    /// Nothing: the points were passed while the model was built (a fresh start).
    Nothing,
    /// Executed an external message.
    Execute(External),
    /// Ran its own messages up to a time.
    Advance(u64),
}

/// One call of the real replica, and the snapshot points it passed in it.
struct Recorded {
    call: Call,
    points: Vec<SnapshotPoint>,
}

/// A running shadow: the second copy and the model time of the point it was restored from.
struct Running {
    runtime: ModelRuntime,
    since: u64,
}

/// The shadow's bookkeeping in the client.
#[derive(Default)]
pub(super) struct Shadow {
    running: Option<Running>,
    /// What the real replica did since the shadow last caught up.
    recorded: Vec<Recorded>,
    /// How many of the real runtime's undrained `points` were recorded already.
    seen: usize,
    /// How many snapshot points the real replica passed (for `EveryNthPoint`).
    count: u64,
    /// How many snapshot points a shadow was compared at.
    checks: u64,
}

impl Shadow {
    /// The real runtime was replaced (a sync): start over.
    pub(super) fn reset(&mut self) {
        self.running = None;
        self.recorded.clear();
        self.seen = 0;
    }

    /// The real runtime's points were drained.
    pub(super) fn points_drained(&mut self) {
        self.seen = 0;
    }
}

impl SynqClient {
    /// How many snapshot points the shadow replica ([`SessionConfig::shadow`](crate::SessionConfig::shadow))
    /// was compared with this replica at, matching or not: a test can check that the shadow ran.
    pub fn shadow_checks(&self) -> u64 {
        self.shadow.checks
    }

    /// Records a call the real runtime made (and the snapshot points it passed) for the shadow.
    pub(super) fn shadow_record(&mut self, runtime: &ModelRuntime, call: Call) {
        if self.config.shadow == ShadowCheck::Off {
            return;
        }
        let points = runtime.points.get(self.shadow.seen..).unwrap_or_default().to_vec();
        self.shadow.seen = runtime.points.len();
        if matches!(call, Call::Nothing) && points.is_empty() {
            return;
        }
        self.shadow.recorded.push(Recorded { call, points });
    }

    /// The shadow makes the calls the real runtime made since it last caught up, and is compared
    /// at the points both passed.
    pub(super) fn shadow_catch_up(&mut self) {
        for recorded in std::mem::take(&mut self.shadow.recorded) {
            self.shadow_follow(recorded);
        }
    }

    fn shadow_follow(&mut self, Recorded { call, points }: Recorded) {
        // The running shadow makes the same call; it is checked at the points it passes.
        if let Some(mut running) = self.shadow.running.take() {
            match apply(&mut running.runtime, &call) {
                Ok(passed) if passed.is_empty() && points.is_empty() => self.shadow.running = Some(running),
                Ok(passed) => self.shadow_compare(running.since, &points, &passed),
                Err(error) => warn!("bevy_synq: the shadow replica cannot follow: {error}; it starts again"),
            }
        }
        // A new shadow starts at the last of these points the policy picks.
        let mut start = None;
        for (i, _) in points.iter().enumerate() {
            self.shadow.count += 1;
            if self.config.shadow.starts_at(self.shadow.count) {
                start = Some(i);
            }
        }
        let Some(i) = start else { return };
        let point = &points[i];
        let mut runtime = match ModelRuntime::restore(
            self.plugin.clone(),
            self.settings,
            self.config.snapshot_policy,
            &point.bytes,
        ) {
            Ok(runtime) => runtime,
            Err(error) => {
                warn!("bevy_synq: the shadow replica cannot restore the snapshot of {} ms: {error}", point.time);
                return;
            }
        };
        // The rest of the call after the point: a point inside an external message's advance
        // comes before the message itself (its sequence number is the previous one).
        let rest = match &call {
            Call::Execute(external) if external.seq != point.seq => Call::Execute(external.clone()),
            Call::Advance(time) => Call::Advance(*time),
            _ => Call::Nothing,
        };
        let since = point.time;
        match apply(&mut runtime, &rest) {
            Ok(passed) if passed.is_empty() && points.len() == i + 1 => {
                self.shadow.running = Some(Running { runtime, since });
            }
            Ok(passed) => self.shadow_compare(since, &points[i + 1..], &passed),
            Err(error) => warn!("bevy_synq: the shadow replica cannot follow: {error}; it starts again"),
        }
    }

    /// Compares the points the real replica passed with those the shadow passed in the same
    /// calls; reports the first difference.
    fn shadow_compare(&mut self, since: u64, real: &[SnapshotPoint], shadow: &[SnapshotPoint]) {
        for i in 0..real.len().max(shadow.len()) {
            self.shadow.checks += 1;
            let (time, seq, differing, ours, theirs) = match (real.get(i), shadow.get(i)) {
                (Some(r), Some(s)) if (r.time, r.seq) == (s.time, s.seq) => {
                    if r.hash == s.hash {
                        continue;
                    }
                    let differing = r
                        .parts
                        .iter()
                        .zip(&s.parts)
                        .filter(|(a, b)| a != b)
                        .map(|((name, _), _)| name.clone())
                        .collect();
                    (r.time, r.seq, differing, Some(r), Some(s))
                }
                (r, s) => {
                    let (time, seq) = r.or(s).map(|p| (p.time, p.seq)).unwrap_or_default();
                    (time, seq, vec!["snapshot point".to_string()], None, None)
                }
            };
            let entities = match (ours, theirs) {
                (Some(ours), Some(theirs)) => self.entity_differences(&ours.bytes, &theirs.bytes),
                _ => Vec::new(),
            };
            error!(
                "bevy_synq: shadow check: the model state at {time} ms (seq {seq}) is not a function of the snapshot \
                 of {since} ms and the messages since: a second copy of the model, fed the same messages, differs in \
                 {}{}. The model reads hidden state (a static, a thread-local, the wall clock, HashMap order, state \
                 shared with the app): see docs/debugging-desyncs.md",
                differing.join(", "),
                describe_entities(&entities)
            );
            let mismatch = ShadowMismatch { time, seq, since, differing, entities };
            self.problems.push(SynqProblem::ShadowMismatch(mismatch));
            return;
        }
    }

    /// When this replica reloads the snapshot of a point it passed itself with another state,
    /// names what differed (the votes tell: they are digests of the state hashes).
    pub(super) fn report_reload(&mut self, time: u64, seq: u32, vote: &synq_protocol::Hash32, consensus: &[u8]) {
        let Some(ours) = self.recent_points.iter().find(|p| p.time == time && p.seq == seq) else { return };
        if ours.vote == *vote {
            return;
        }
        let ours = ours.bytes.clone();
        let Some((differing, entities)) = self.state_differences(&ours, consensus) else { return };
        error!(
            "bevy_synq: view {} reloads the consensus state of {time} ms (seq {seq}); its own state differed in {}{}",
            self.ids.view,
            if differing.is_empty() { "nothing it can name".to_string() } else { differing.join(", ") },
            describe_entities(&entities)
        );
        self.problems.push(SynqProblem::ReloadedConsensus(ReloadReport { time, seq, differing, entities }));
    }

    /// The reflector sent the consensus snapshot of a point at which this replica's vote was
    /// outside the consensus: names what differs, without reloading.
    pub(super) fn report_divergence(&mut self, record: &SnapshotRecord) {
        let Some(ours) = self.recent_points.iter().find(|p| p.time == record.time && p.seq == record.seq) else {
            warn!(
                "bevy_synq: the consensus snapshot of {} ms arrived after this replica forgot its own state of that point",
                record.time
            );
            return;
        };
        if ours.vote == record.vote {
            return;
        }
        let ours = ours.bytes.clone();
        let consensus = match self.open_snapshot(record) {
            Ok(bytes) => bytes,
            Err(error) => return warn!("bevy_synq: cannot compare with the consensus: {error}"),
        };
        let Some((differing, entities)) = self.state_differences(&ours, &consensus) else { return };
        let (time, seq) = (record.time, record.seq);
        error!(
            "bevy_synq: view {} diverged at {time} ms (seq {seq}): compared with the consensus snapshot, its state \
             differs in {}{}; SynqSession::resync() reloads the consensus",
            self.ids.view,
            if differing.is_empty() { "nothing it can name".to_string() } else { differing.join(", ") },
            describe_entities(&entities)
        );
        self.problems.push(SynqProblem::DivergedFromConsensus(ReloadReport { time, seq, differing, entities }));
    }

    /// The parts and the entities that differ between two snapshots of this model.
    fn state_differences(&self, ours: &[u8], theirs: &[u8]) -> Option<(Vec<String>, Vec<EntityDifference>)> {
        let (mut ours, mut theirs) = (self.decode(ours)?, self.decode(theirs)?);
        let parts = |runtime: &mut ModelRuntime| {
            let (world, registry) = runtime.world_and_registry();
            crate::snapshot::capture_with_parts(world, registry).map(|(_, parts)| parts).ok()
        };
        let differing = match (parts(&mut ours), parts(&mut theirs)) {
            (Some(a), Some(b)) => a.iter().zip(&b).filter(|(a, b)| a != b).map(|((name, _), _)| name.clone()).collect(),
            _ => Vec::new(),
        };
        Some((differing, compare_entities(&mut ours, &mut theirs)))
    }

    fn entity_differences(&self, ours: &[u8], theirs: &[u8]) -> Vec<EntityDifference> {
        match (self.decode(ours), self.decode(theirs)) {
            (Some(mut ours), Some(mut theirs)) => compare_entities(&mut ours, &mut theirs),
            _ => Vec::new(),
        }
    }

    fn decode(&self, bytes: &[u8]) -> Option<ModelRuntime> {
        ModelRuntime::restore(self.plugin.clone(), self.settings, self.config.snapshot_policy, bytes)
            .map_err(|error| warn!("bevy_synq: cannot decode a snapshot to compare it: {error}"))
            .ok()
    }
}

/// Makes a call on a runtime; returns the snapshot points it passed. The runtime's other output
/// (problems, persist requests, model → view messages) is dropped: the real replica reports it.
fn apply(runtime: &mut ModelRuntime, call: &Call) -> Result<Vec<SnapshotPoint>, RuntimeError> {
    match call {
        Call::Nothing => {}
        Call::Execute(external) => runtime.execute(external.clone())?,
        Call::Advance(time) => runtime.advance_to(*time),
    }
    runtime.problems.clear();
    runtime.persist_requests.clear();
    drop(runtime.take_view_messages());
    Ok(std::mem::take(&mut runtime.points))
}

/// Each model entity's registered components, encoded, in registration order (`None` where it
/// has none of a type).
type EncodedEntities = BTreeMap<ModelId, Vec<Option<Vec<u8>>>>;

/// The registered component names, and each model entity's components encoded.
fn encoded_entities(runtime: &mut ModelRuntime) -> (Vec<&'static str>, EncodedEntities) {
    let (world, registry) = runtime.world_and_registry();
    let names = registry.components.iter().map(|c| c.name).collect();
    let entities: Vec<(ModelId, Entity)> = {
        let mut query = world.query::<(Entity, &ModelId)>();
        query.iter(world).map(|(entity, id)| (*id, entity)).collect()
    };
    let mut encoded = BTreeMap::new();
    for (id, entity) in entities {
        let entity = world.entity(entity);
        let values = registry
            .components
            .iter()
            .map(|entry| {
                let mut bytes = Vec::new();
                match (entry.encode)(&entity, &mut bytes) {
                    Ok(true) => Some(bytes),
                    Ok(false) => None,
                    // Cannot encode: the snapshot could not have been taken either; call it different.
                    Err(_) => Some(vec![0xFF; 1]),
                }
            })
            .collect();
        encoded.insert(id, values);
    }
    (names, encoded)
}

/// The entities that differ between two states, by `ModelId`, at most `MAX_ENTITY_DIFFERENCES`.
fn compare_entities(ours: &mut ModelRuntime, theirs: &mut ModelRuntime) -> Vec<EntityDifference> {
    let (names, ours) = encoded_entities(ours);
    let (_, theirs) = encoded_entities(theirs);
    let mut differences = Vec::new();
    let ids: std::collections::BTreeSet<ModelId> = ours.keys().chain(theirs.keys()).copied().collect();
    for id in ids {
        let difference = match (ours.get(&id), theirs.get(&id)) {
            (Some(_), None) => EntityDifference::OnlyHere(id),
            (None, Some(_)) => EntityDifference::OnlyThere(id),
            (Some(a), Some(b)) => {
                let components: Vec<String> = a
                    .iter()
                    .zip(b)
                    .zip(&names)
                    .filter(|((a, b), _)| a != b)
                    .map(|(_, name)| name.to_string())
                    .collect();
                if components.is_empty() {
                    continue;
                }
                EntityDifference::Components(id, components)
            }
            (None, None) => continue,
        };
        differences.push(difference);
        if differences.len() == MAX_ENTITY_DIFFERENCES {
            break;
        }
    }
    differences
}

fn describe_entities(entities: &[EntityDifference]) -> String {
    if entities.is_empty() {
        return String::new();
    }
    let described: Vec<String> = entities
        .iter()
        .take(8)
        .map(|difference| match difference {
            EntityDifference::OnlyHere(id) => format!("{id:?} only here"),
            EntityDifference::OnlyThere(id) => format!("{id:?} only there"),
            EntityDifference::Components(id, names) => format!("{id:?} ({})", names.join(", ")),
        })
        .collect();
    let more = if entities.len() > 8 { format!(" and {} more", entities.len() - 8) } else { String::new() };
    format!("; entities: {}{more}", described.join(", "))
}
