//! Persistence across code versions: `persist_session` and the data handed to init.
//!
//! A change to the model code makes a new session (the session id hashes the code), and a new
//! session starts from `ModelInit`. To carry users' data over, the model persists a *document* —
//! canonical JSON, independent of the model's current structure — with [`PersistSession`]. When a
//! never-seen session of the same app id and name starts, the latest document is handed to the
//! model's init as [`Persisted<T>`], migrated to the current version.
//!
//! Built in, so apps need not write them by hand (the safeguards of Croquet's persistence guide):
//! * identical documents are not uploaded twice;
//! * uploads are throttled: the first one goes promptly, later calls within 25 s of model time
//!   are coalesced and the newest document goes when the cool-off ends;
//! * exactly one replica uploads each document (elected by the reflector from the replicas whose
//!   documents agree), so a diverged replica never overwrites the consensus;
//! * while persisted data is being loaded (during `ModelInit`) nothing is saved, and if loading
//!   failed, persisting is disabled for the session, so broken code cannot overwrite good data.

use bevy::ecs::system::SystemParam;
use bevy::prelude::*;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::marker::PhantomData;
use synq_protocol::Hash32;
use synq_protocol::canonical_json;

use super::runtime::SnapshotBook;
use super::time::{FutureKind, FutureQueue, ModelTime};

/// Model time between two uploads of persisted data.
pub const PERSIST_COOL_OFF_MS: u64 = 25_000;

/// The throttle's state. Part of the snapshot.
#[derive(Resource, Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PersistState {
    /// Hash of the latest document persisted (or loaded).
    pub last_hash: Option<Hash32>,
    /// No upload before this model time.
    pub cool_off_until: u64,
    /// The newest document waiting for the cool-off to end.
    pub pending: Option<String>,
    /// Whether a flush is queued for the end of the cool-off.
    pub flush_scheduled: bool,
    /// Set when persisted data failed to load: persisting is disabled for the session.
    pub disabled: Option<String>,
    /// Set while `ModelInit` runs with persisted data.
    pub loading: bool,
}

/// A document the model asked to persist: every replica produces it at the same model time; the
/// client votes on it and the elected one uploads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersistRequest {
    /// Model time of the request.
    pub time: u64,
    /// The last external sequence number before it.
    pub seq: u32,
    /// The canonical JSON document (`{"data":…,"version":N}`).
    pub json: String,
    /// SHA-256 of `json`.
    pub hash: Hash32,
}

/// Requests produced since the runtime last collected them. Not part of the snapshot.
#[derive(Resource, Default)]
pub(crate) struct PersistOutbox(pub Vec<PersistRequest>);

/// The version of the document the model persists, set by
/// [`ModelApp::add_persistence`](crate::ModelApp::add_persistence).
#[derive(Resource, Clone, Copy, Debug)]
pub(crate) struct PersistVersion(pub u32);

/// Why a persist call did nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PersistError {
    /// The document is not valid canonical JSON (NaN, maps with non-string keys…).
    #[error("cannot persist: {0}")]
    Encode(String),
    /// Persisted data failed to load in this session; persisting is disabled so that broken code
    /// cannot overwrite good data.
    #[error("persisting is disabled in this session: {0}")]
    Disabled(String),
    /// The model has no persistence (see `ModelApp::add_persistence`).
    #[error("the model did not call ModelApp::add_persistence")]
    NotConfigured,
}

/// What a persist call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PersistOutcome {
    /// The document will be uploaded now.
    Uploading,
    /// The document waits for the cool-off to end (a newer call replaces it).
    Deferred,
    /// The document equals the last persisted one: nothing to do.
    Unchanged,
    /// Persisted data is being loaded (in `ModelInit`): the document is remembered as the
    /// current one, but not uploaded.
    Loading,
}

#[derive(Serialize)]
struct Envelope<'a, T: Serialize> {
    version: u32,
    data: &'a T,
}

/// Persists the session's document from model code — Croquet's `persistSession`.
///
/// ```
/// # use bevy::prelude::*;
/// # use bevy_synq::prelude::*;
/// # use serde::{Deserialize, Serialize};
/// # use std::collections::BTreeMap;
/// #[derive(Resource, Serialize, Deserialize, Default)]
/// struct HighScores(BTreeMap<String, u32>);
///
/// fn save(scores: Res<HighScores>, mut persist: PersistSession) {
///     if scores.is_changed() {
///         let _ = persist.persist(&*scores);
///     }
/// }
/// ```
#[derive(SystemParam)]
pub struct PersistSession<'w> {
    state: ResMut<'w, PersistState>,
    outbox: ResMut<'w, PersistOutbox>,
    queue: ResMut<'w, FutureQueue>,
    time: Res<'w, ModelTime>,
    book: Res<'w, SnapshotBook>,
    version: Option<Res<'w, PersistVersion>>,
}

impl PersistSession<'_> {
    /// Persists `document` (subject to the throttle and the guards; see the module docs).
    pub fn persist<T: Serialize>(&mut self, document: &T) -> Result<PersistOutcome, PersistError> {
        let version = self.version.as_ref().ok_or(PersistError::NotConfigured)?.0;
        if let Some(reason) = &self.state.disabled {
            return Err(PersistError::Disabled(reason.clone()));
        }
        let json = canonical_json::to_canonical_string(&Envelope { version, data: document })
            .map_err(|e| PersistError::Encode(e.to_string()))?;
        let hash = synq_protocol::ids::sha256(json.as_bytes());
        let now = self.time.now_ms;
        let state = &mut *self.state;
        if state.loading {
            state.last_hash = Some(hash);
            return Ok(PersistOutcome::Loading);
        }
        if state.last_hash == Some(hash) {
            state.pending = None;
            return Ok(PersistOutcome::Unchanged);
        }
        if now >= state.cool_off_until {
            state.last_hash = Some(hash);
            state.cool_off_until = now + PERSIST_COOL_OFF_MS;
            state.pending = None;
            let seq = self.book.last_external_seq;
            self.outbox.0.push(PersistRequest { time: now, seq, json, hash });
            return Ok(PersistOutcome::Uploading);
        }
        state.pending = Some(json);
        if !state.flush_scheduled {
            state.flush_scheduled = true;
            self.queue.push(state.cool_off_until, FutureKind::PersistFlush);
        }
        Ok(PersistOutcome::Deferred)
    }

    /// Persists the document `build` returns; `build` runs only when persisting is possible.
    pub fn persist_with<T: Serialize>(&mut self, build: impl FnOnce() -> T) -> Result<PersistOutcome, PersistError> {
        if let Some(reason) = &self.state.disabled {
            return Err(PersistError::Disabled(reason.clone()));
        }
        self.persist(&build())
    }

    /// Reports that the app's own loading of persisted data failed: persisting is disabled for
    /// this session (the stored data stays as it is).
    pub fn loading_failed(&mut self, reason: impl Into<String>) {
        self.state.disabled = Some(reason.into());
    }

    /// Whether persisting is disabled in this session, and why.
    pub fn disabled(&self) -> Option<&str> {
        self.state.disabled.as_deref()
    }
}

/// Runs at the end of a cool-off: uploads the newest deferred document.
pub(crate) fn flush(world: &mut World) {
    let now = world.resource::<ModelTime>().now_ms;
    let seq = world.resource::<SnapshotBook>().last_external_seq;
    let mut state = world.resource_mut::<PersistState>();
    state.flush_scheduled = false;
    let Some(json) = state.pending.take() else { return };
    if state.disabled.is_some() {
        return;
    }
    let hash = synq_protocol::ids::sha256(json.as_bytes());
    if state.last_hash == Some(hash) {
        return;
    }
    state.last_hash = Some(hash);
    state.cool_off_until = now + PERSIST_COOL_OFF_MS;
    world.resource_mut::<PersistOutbox>().0.push(PersistRequest { time: now, seq, json, hash });
}

/// The persisted data handed to `ModelInit`, migrated to the current version. Present only while
/// `ModelInit` runs.
#[derive(Resource, Debug)]
pub struct Persisted<T: Send + Sync + 'static> {
    /// The document, if the session's persistent id had one and it loaded.
    pub data: Option<T>,
    /// The version the document was stored with.
    pub stored_version: Option<u32>,
    /// Why loading failed, if it did (persisting is then disabled for the session).
    pub error: Option<String>,
}

type Step = Box<dyn Fn(serde_json::Value) -> Result<serde_json::Value, String> + Send + Sync>;

/// The current version of a persisted document type and how older versions become it.
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// # use bevy_synq::Migrations;
/// #[derive(Serialize, Deserialize)]
/// struct ScoresV1 { names: Vec<String>, points: Vec<u32> }
/// #[derive(Serialize, Deserialize)]
/// struct ScoresV2 { entries: Vec<(String, u32)> }
/// #[derive(Serialize, Deserialize)]
/// struct Scores { entries: Vec<Entry> }
/// #[derive(Serialize, Deserialize)]
/// struct Entry { initials: String, points: u32 }
///
/// let migrations = Migrations::<Scores>::new(3)
///     .step(1, |v1: ScoresV1| ScoresV2 { entries: v1.names.into_iter().zip(v1.points).collect() })
///     .step(2, |v2: ScoresV2| Scores {
///         entries: v2.entries.into_iter().map(|(initials, points)| Entry { initials, points }).collect(),
///     });
/// # let _ = migrations;
/// ```
pub struct Migrations<T> {
    current: u32,
    steps: BTreeMap<u32, Step>,
    marker: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> Migrations<T> {
    /// Documents of type `T` are version `current`.
    pub fn new(current: u32) -> Self {
        Self { current, steps: BTreeMap::new(), marker: PhantomData }
    }

    /// How a version-`from` document (`A`) becomes a version-`from + 1` document (`B`).
    pub fn step<A: DeserializeOwned + 'static, B: Serialize + 'static>(
        mut self,
        from: u32,
        migrate: fn(A) -> B,
    ) -> Self {
        self.steps.insert(
            from,
            Box::new(move |value| {
                let old: A =
                    serde_json::from_value(value).map_err(|e| format!("version {from} does not decode: {e}"))?;
                serde_json::to_value(migrate(old)).map_err(|e| format!("migration from version {from}: {e}"))
            }),
        );
        self
    }

    /// The current version.
    pub fn current(&self) -> u32 {
        self.current
    }

    /// Decodes a stored document (`{"data":…,"version":N}`) and migrates it to `T`.
    pub fn load(&self, json: &[u8]) -> Result<(T, u32), String> {
        #[derive(Deserialize)]
        struct Stored {
            version: u32,
            data: serde_json::Value,
        }
        let stored: Stored =
            serde_json::from_slice(json).map_err(|e| format!("the persisted document does not decode: {e}"))?;
        if stored.version > self.current {
            return Err(format!(
                "the persisted document is version {}, newer than this code's version {}",
                stored.version, self.current
            ));
        }
        let mut value = stored.data;
        for version in stored.version..self.current {
            let step = self
                .steps
                .get(&version)
                .ok_or_else(|| format!("no migration from version {version} to {}", version + 1))?;
            value = step(value)?;
        }
        let data = serde_json::from_value(value)
            .map_err(|e| format!("the migrated document does not decode as version {}: {e}", self.current))?;
        Ok((data, stored.version))
    }
}
