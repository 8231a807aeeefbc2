//! [`JetStreamStorage`]: sessions kept in a NATS JetStream cluster, so that another reflector can
//! resume a session after the one serving it died.

use std::collections::HashMap;
use std::future::{Future, IntoFuture};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::CreateStreamErrorKind;
use async_nats::jetstream::{self, consumer, message::PublishMessage, object_store, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use synq_protocol::ids::{PersistentId, SessionId};
use synq_protocol::seq_le;
use synq_protocol::wire::{PersistRecord, SessionTime, SnapshotRecord, StampedEvent};

use super::log::LogRecord;
use super::{Claim, SessionMeta, Storage, StorageDamage, StorageError, StoredSession, missing_seqs};

mod claims;
pub use claims::{CLAIM_SUBJECTS, CLAIMS_STREAM};

/// The stream holding every session's event log.
pub const LOG_STREAM: &str = "SYNQ_LOG";
/// The subjects of [`LOG_STREAM`]: `synq.log.<session id>`.
pub const LOG_SUBJECTS: &str = "synq.log.*";
/// The object store bucket of sessions' metadata (key: the session id).
pub const SESSIONS_BUCKET: &str = "SYNQ_SESSIONS";
/// The object store bucket of sessions' latest snapshots (key: the session id; a snapshot set
/// aside when a session starts over is kept as `<session id>.superseded`).
pub const SNAPSHOTS_BUCKET: &str = "SYNQ_SNAPSHOTS";
/// The object store bucket of persisted data (key: the persistent id).
pub const PERSISTED_BUCKET: &str = "SYNQ_PERSISTED";
/// The object store bucket of pinned membership keys (key: the persistent id). An object store,
/// not a key-value bucket: async-nats' key-value buckets need a newer server than nats-server
/// 2.9, which Debian ships.
pub const MEMBERS_BUCKET: &str = "SYNQ_MEMBERS";

/// An encoded log record and the message id it is published with (events have one).
type Record = (Bytes, Option<String>);

/// The first byte of every record and object this backend writes: the encoding's version.
const FORMAT_VERSION: u8 = 1;

/// Objects larger than this are not read (a snapshot or persisted data is far smaller).
const MAX_OBJECT_BYTES: usize = 1 << 30;

/// How long the JetStream server remembers a message id: a second writer of the same event
/// sequence number within this window is refused (see [`StorageError::Conflict`]).
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// How [`JetStreamStorage::connect`] sets up and uses the cluster.
#[derive(Clone, Debug)]
pub struct JetStreamOptions {
    /// Replicas of the stream and buckets it creates; `None`: 3 on a clustered server (a cluster
    /// of fewer than 3 JetStream servers needs this set), 1 on a server without clustering.
    /// Streams and buckets that exist already are used as they are (a warning names those with
    /// fewer replicas).
    pub replicas: Option<usize>,
    /// The longest any single request to the cluster (a publish's acknowledgement, a read, …)
    /// may take before it fails with [`StorageError::Unavailable`].
    pub timeout: Duration,
    /// How long [`JetStreamStorage::connect`] keeps retrying to reach the cluster and set up the
    /// stream and buckets (a cluster that just started has no JetStream leader for a few seconds).
    pub connect_timeout: Duration,
    /// Where clients reach this reflector. With it, the storage claims every session before the
    /// reflector loads it ([`Storage::claim`], in [`CLAIMS_STREAM`]), so that of several
    /// reflectors sharing the cluster exactly one serves a session and the others send its
    /// clients there. `None`: no claims, for a storage only one reflector uses at a time (tools,
    /// tests).
    pub advertise: Option<std::net::SocketAddr>,
    /// How long a claim lasts unless renewed (it is renewed every third of it). When the
    /// reflector serving a session dies, another one may take the session over this long after
    /// the last renewal.
    pub claim_ttl: Duration,
}

impl Default for JetStreamOptions {
    fn default() -> Self {
        Self {
            replicas: None,
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(30),
            advertise: None,
            claim_ttl: Duration::from_secs(3),
        }
    }
}

/// Sessions, snapshots, persisted data and membership keys in a NATS JetStream cluster.
///
/// ```text
/// stream SYNQ_LOG, subject synq.log.<session id>   events and clock marks since the snapshot
/// object store SYNQ_SESSIONS, <session id>         session metadata              (atomic put)
/// object store SYNQ_SNAPSHOTS, <session id>        latest snapshot               (atomic put)
/// object store SYNQ_PERSISTED, <persistent id>     persisted data                (atomic put)
/// object store SYNQ_MEMBERS, <persistent id>      pinned membership key         (atomic put)
/// ```
///
/// Every record and object starts with a version byte, then its postcard encoding. Durability:
/// a write returns once JetStream acknowledged it, that is once a quorum of the stream's
/// replicas stored it, so [`Storage::sync`] has nothing left to do. An object store put publishes
/// the object's chunks, then its metadata in one message that replaces the old one: a reader
/// gets the old or the new object (its SHA-256 digest is checked), never a mix.
///
/// Events are published with the message id `<session id>:<generation>:<seq>` (the generation
/// changes when a session starts over): JetStream keeps one message per id within its
/// duplicate window (2 minutes). A duplicate acknowledgement is checked against the stored
/// message: this process's own event (an earlier attempt whose acknowledgement was lost) is
/// fine; another writer's is [`StorageError::Conflict`], so if two reflectors serve one session
/// the second to store a sequence number is refused instead of forking the log. This is a fence,
/// not ownership: see `docs/cluster.md`.
///
/// Damage: a record or object that does not decode is handled as [`DiskStorage`](super::DiskStorage)
/// handles damaged files (records skipped and reported in [`StoredSession::damage`]; other
/// objects reported as [`StorageError::Corrupt`]) but nothing is rewritten: the damaged
/// messages stay where they are for an operator, and are reported on every load.
///
/// The client runs on a small Tokio runtime (one worker thread, so the connection is kept alive
/// between calls) owned by the storage; every call blocks on it. Each request is bounded by
/// [`JetStreamOptions::timeout`]; a failed one is retried until that much time has passed since
/// the first attempt, then the call fails with [`StorageError::Unavailable`].
pub struct JetStreamStorage {
    runtime: tokio::runtime::Runtime,
    jetstream: jetstream::Context,
    log: stream::Stream,
    sessions: Bucket,
    snapshots: Bucket,
    persisted: Bucket,
    members: Bucket,
    timeout: Duration,
    /// What this process knows of the sessions it loaded or wrote.
    known: HashMap<SessionId, Known>,
    /// The sessions this reflector claimed, if it claims sessions.
    claims: Option<claims::Claims>,
}

/// What the storage keeps in memory about a session.
#[derive(Clone, Copy, Debug)]
struct Known {
    /// The session's generation (its message ids' middle part).
    generation: u64,
    /// The latest time recorded for the session.
    time: SessionTime,
}

/// A session's metadata object: the metadata and the generation of its log.
#[derive(Serialize, Deserialize)]
struct MetaObject {
    generation: u64,
    meta: SessionMeta,
}

/// The log subject of a session.
fn log_subject(session: &SessionId) -> String {
    format!("synq.log.{session}")
}

/// `value` encoded with the version byte in front.
fn encode<T: Serialize>(value: &T) -> Result<Bytes, StorageError> {
    postcard::to_extend(value, vec![FORMAT_VERSION])
        .map(Bytes::from)
        .map_err(|e| StorageError::Unavailable { action: "encoding a record", reason: e.to_string() })
}

/// Decodes bytes written by [`encode`]; the error says what is wrong with them.
fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, String> {
    match bytes.split_first() {
        None => Err("empty".into()),
        Some((&FORMAT_VERSION, body)) => match postcard::take_from_bytes(body) {
            Ok((value, [])) => Ok(value),
            Ok((_, rest)) => Err(format!("undecodable: {} bytes too many", rest.len())),
            Err(e) => Err(format!("undecodable: {e}")),
        },
        Some((version, _)) => Err(format!("unknown format version {version}")),
    }
}

fn unavailable(action: &'static str) -> impl FnOnce(String) -> StorageError {
    move |reason| StorageError::Unavailable { action, reason }
}

/// Where an object is, for the server's log.
fn object_path(bucket: &str, key: &str) -> PathBuf {
    PathBuf::from(format!("nats:{bucket}/{key}"))
}

/// A new session generation: the current time in nanoseconds (distinct for every start of a
/// session; all that matters is that it differs from the previous one's).
fn new_generation() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
}

/// What reading a session's log found.
#[derive(Default)]
struct ReadLog {
    /// Intact records, with their stream sequence numbers.
    records: Vec<(u64, LogRecord)>,
    /// Records that did not decode.
    skipped: u32,
    /// Their bytes.
    skipped_bytes: u64,
    /// The stream sequence number of the last message read.
    last_sequence: Option<u64>,
}

impl JetStreamStorage {
    /// Connects to the cluster (any of `urls`, e.g. `nats://127.0.0.1:4222`) and creates the
    /// stream and buckets if they are missing, retrying for up to
    /// [`JetStreamOptions::connect_timeout`].
    pub fn connect(urls: &[String], options: JetStreamOptions) -> Result<Self, StorageError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("synq-jetstream")
            .enable_all()
            .build()
            .map_err(|e| StorageError::Unavailable { action: "starting the NATS client", reason: e.to_string() })?;
        if urls.is_empty() {
            return Err(StorageError::Unavailable {
                action: "connecting to NATS",
                reason: "no server URL given".into(),
            });
        }
        let addrs = urls
            .iter()
            .map(|url| url.parse::<async_nats::ServerAddr>().map_err(|e| format!("{url}: {e}")))
            .collect::<Result<Vec<_>, _>>()
            .map_err(unavailable("connecting to NATS"))?;
        let timeout = options.timeout;
        let deadline = Instant::now() + options.connect_timeout;
        let client = runtime.block_on(async {
            let connect = async_nats::ConnectOptions::new()
                .connection_timeout(timeout)
                .request_timeout(Some(timeout))
                .retry_on_initial_connect()
                .connect(addrs);
            match tokio::time::timeout_at(deadline.into(), connect).await {
                Ok(Ok(client)) => Ok(client),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("no server answered in time".to_string()),
            }
        });
        let client = client.map_err(unavailable("connecting to NATS"))?;

        // The context spawns its acknowledgement task on the runtime.
        let jetstream = {
            let _runtime = runtime.enter();
            jetstream::ContextBuilder::new().timeout(timeout).build(client)
        };
        // A cluster that just started elects its JetStream leader first: retry until then.
        let (replicas, (log, sessions, snapshots, persisted, members)) = runtime
            .block_on(async {
                loop {
                    let last_error = match tokio::time::timeout(timeout, set_up(&jetstream, options.replicas)).await {
                        Ok(Ok(done)) => return Ok(done),
                        Ok(Err(e)) => e,
                        Err(_) => "no answer in time".to_string(),
                    };
                    if Instant::now() >= deadline {
                        return Err(last_error);
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            })
            .map_err(unavailable("setting up the JetStream stream and buckets"))?;
        tracing::info!(replicas, stream = LOG_STREAM, "JetStream storage ready");
        let claims = match options.advertise {
            Some(advertise) => {
                let set_up = claims::Claims::set_up(&jetstream, replicas, advertise, options.claim_ttl);
                Some(runtime.block_on(bounded("setting up the claims stream", timeout, set_up))?)
            }
            None => None,
        };
        Ok(Self {
            runtime,
            jetstream,
            log,
            sessions,
            snapshots,
            persisted,
            members,
            timeout,
            known: HashMap::new(),
            claims,
        })
    }
}

/// The stream and buckets, created if missing.
type Handles = (stream::Stream, Bucket, Bucket, Bucket, Bucket);

/// Gets or creates the stream and buckets; returns the replicas they were created with.
async fn set_up(jetstream: &jetstream::Context, replicas: Option<usize>) -> Result<(usize, Handles), String> {
    let log_config = |replicas| stream::Config {
        name: LOG_STREAM.into(),
        subjects: vec![LOG_SUBJECTS.into()],
        storage: stream::StorageType::File,
        num_replicas: replicas,
        duplicate_window: DUPLICATE_WINDOW,
        allow_direct: true,
        ..Default::default()
    };
    let log = match jetstream.get_or_create_stream(log_config(replicas.unwrap_or(3))).await {
        // Not clustered, and no replicas asked for: one.
        Err(e)
            if replicas.is_none()
                && matches!(e.kind(), CreateStreamErrorKind::JetStream(ref error)
                    if error.error_code() == ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED) =>
        {
            jetstream.get_or_create_stream(log_config(1)).await
        }
        result => result,
    };
    let log = log.map_err(|e| format!("stream {LOG_STREAM}: {e}"))?;
    let replicas = replicas.unwrap_or(if log.cached_info().cluster.is_some() { 3 } else { 1 }).max(1);
    let mut buckets = Vec::new();
    for name in [SESSIONS_BUCKET, SNAPSHOTS_BUCKET, PERSISTED_BUCKET, MEMBERS_BUCKET] {
        let store = match jetstream.get_object_store(name).await {
            Ok(store) => store,
            Err(_) => jetstream
                .create_object_store(object_store::Config {
                    bucket: name.into(),
                    storage: stream::StorageType::File,
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("bucket {name}: {e}"))?,
        };
        let stream = jetstream.get_stream(format!("OBJ_{name}")).await.map_err(|e| format!("bucket {name}: {e}"))?;
        buckets.push(Bucket { name, store, stream });
    }
    let infos = std::iter::once(&log).chain(buckets.iter().map(|bucket| &bucket.stream)).map(|s| s.cached_info());
    for info in infos {
        if info.config.num_replicas < replicas {
            tracing::warn!(
                stream = info.config.name,
                replicas = info.config.num_replicas,
                wanted = replicas,
                "an existing JetStream stream has fewer replicas than configured: it is used as it is"
            );
        }
    }
    let members = buckets.pop().expect("four buckets");
    let persisted = buckets.pop().expect("four buckets");
    let snapshots = buckets.pop().expect("four buckets");
    let sessions = buckets.pop().expect("four buckets");
    Ok((replicas, (log, sessions, snapshots, persisted, members)))
}

/// Awaits `future` for at most `timeout`; failures and timeouts become
/// [`StorageError::Unavailable`].
async fn bounded<T, E: std::fmt::Display>(
    action: &'static str,
    timeout: Duration,
    future: impl IntoFuture<Output = Result<T, E>>,
) -> Result<T, StorageError> {
    match tokio::time::timeout(timeout, future.into_future()).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(StorageError::Unavailable { action, reason: e.to_string() }),
        Err(_) => Err(StorageError::Unavailable { action, reason: format!("no answer within {timeout:?}") }),
    }
}

/// An object store bucket: its store (for puts) and its stream (for reads).
struct Bucket {
    name: &'static str,
    store: object_store::ObjectStore,
    stream: stream::Stream,
}

/// Reads an object whole; `None` if there is none. A read that fails its digest check, or an
/// object too large, is [`StorageError::Corrupt`].
///
/// The chunks are read one by one with message gets from the bucket's stream leader, not
/// through a consumer as async-nats' own reader does: creating a consumer waits for the
/// cluster's metadata leader, which after losing a node takes far longer to come back than the
/// stream's leader.
async fn get_object(
    bucket: &Bucket,
    key: &str,
    what: &'static str,
    timeout: Duration,
) -> Result<Option<Vec<u8>>, StorageError> {
    let action = "reading an object";
    let corrupt = |reason: String| StorageError::Corrupt { path: object_path(bucket.name, key), what, reason };
    // The object's metadata, from the stream's leader: async-nats' `ObjectStore::info` asks any
    // replica (a direct get), which may not have the latest put yet.
    let meta_subject = {
        use base64::Engine;
        format!("$O.{}.M.{}", bucket.name, base64::engine::general_purpose::URL_SAFE.encode(key))
    };
    let meta = match tokio::time::timeout(timeout, bucket.stream.get_last_raw_message_by_subject(&meta_subject)).await {
        Ok(Ok(message)) => message,
        Ok(Err(e)) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => return Ok(None),
        Ok(Err(e)) => return Err(StorageError::Unavailable { action, reason: e.to_string() }),
        Err(_) => return Err(StorageError::Unavailable { action, reason: format!("no answer within {timeout:?}") }),
    };
    let info: object_store::ObjectInfo =
        serde_json::from_slice(&meta.payload).map_err(|e| corrupt(format!("undecodable object metadata: {e}")))?;
    if info.deleted {
        return Ok(None);
    }
    if info.size > MAX_OBJECT_BYTES {
        return Err(corrupt(format!("{} bytes, more than the {MAX_OBJECT_BYTES} read", info.size)));
    }
    let subject = format!("$O.{}.C.{}", bucket.name, info.nuid);
    let mut bytes = Vec::with_capacity(info.size);
    let mut next = 1;
    for _ in 0..info.chunks {
        let get = bucket.stream.raw_message_builder().sequence(next).next_by_subject(subject.clone()).send();
        let chunk = bounded(action, timeout, get).await?;
        bytes.extend_from_slice(&chunk.payload);
        if bytes.len() > info.size {
            return Err(corrupt(format!("more than the {} bytes its metadata names", info.size)));
        }
        next = chunk.sequence + 1;
    }
    if bytes.len() != info.size {
        return Err(corrupt(format!("{} bytes, not the {} its metadata names", bytes.len(), info.size)));
    }
    let digest = {
        use base64::Engine;
        use sha2::Digest;
        format!("SHA-256={}", base64::engine::general_purpose::URL_SAFE.encode(sha2::Sha256::digest(&bytes)))
    };
    if info.digest.as_deref() != Some(digest.as_str()) {
        return Err(corrupt("digest mismatch".into()));
    }
    Ok(Some(bytes))
}

/// Reads an object and decodes it; `None` if there is none. A damaged object is
/// [`StorageError::Corrupt`] and left in place.
async fn load_object<T: for<'de> Deserialize<'de>>(
    bucket: &Bucket,
    key: &str,
    what: &'static str,
    timeout: Duration,
) -> Result<Option<T>, StorageError> {
    let Some(bytes) = get_object(bucket, key, what, timeout).await? else {
        return Ok(None);
    };
    match decode(&bytes) {
        Ok(value) => Ok(Some(value)),
        Err(reason) => {
            let error = StorageError::Corrupt { path: object_path(bucket.name, key), what, reason };
            tracing::error!(%error, "damaged object left in place");
            Err(error)
        }
    }
}

/// Replaces an object (atomically for readers: see [`JetStreamStorage`]).
async fn put_object(bucket: &Bucket, key: &str, bytes: Bytes, timeout: Duration) -> Result<(), StorageError> {
    // The put publishes one message per 128 KiB chunk, each acknowledged: bound it per chunk.
    let chunks = (bytes.len() / (128 * 1024) + 1) as u32;
    let mut reader: &[u8] = &bytes;
    bounded("storing an object", timeout * chunks.saturating_add(2), bucket.store.put(key, &mut reader))
        .await
        .map(|_| ())
}

/// Reads a session's whole log subject.
async fn read_log(stream: &stream::Stream, subject: &str, timeout: Duration) -> Result<ReadLog, StorageError> {
    let action = "reading an event log";
    let last = match tokio::time::timeout(timeout, stream.get_last_raw_message_by_subject(subject)).await {
        Ok(Ok(message)) => message.sequence,
        Ok(Err(e)) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => return Ok(ReadLog::default()),
        Ok(Err(e)) => return Err(StorageError::Unavailable { action, reason: e.to_string() }),
        Err(_) => return Err(StorageError::Unavailable { action, reason: format!("no answer within {timeout:?}") }),
    };
    let mut read = ReadLog::default();
    match read_by_consumer(stream, subject, last, timeout, &mut read).await {
        Ok(()) => Ok(read),
        Err(error) => {
            // The consumer could not be created or failed (after a node was lost, the cluster's
            // metadata leader may not be back yet): read what is left one message at a time from
            // the stream's leader.
            tracing::warn!(subject, %error, "reading an event log through a consumer failed; reading it message by message");
            let next = read.last_sequence.map_or(1, |seq| seq + 1);
            read_by_gets(stream, subject, next, last, timeout, &mut read).await?;
            Ok(read)
        }
    }
}

/// Reads a log subject up to stream sequence `last` through an ordered consumer (fast: batched).
async fn read_by_consumer(
    stream: &stream::Stream,
    subject: &str,
    last: u64,
    timeout: Duration,
    read: &mut ReadLog,
) -> Result<(), StorageError> {
    let action = "reading an event log";
    let config = consumer::pull::OrderedConfig {
        filter_subject: subject.to_string(),
        deliver_policy: consumer::DeliverPolicy::All,
        ..Default::default()
    };
    // Normally a matter of milliseconds; when it takes long, reading message by message is faster.
    let consumer = bounded(action, timeout / 5, stream.create_consumer(config)).await?;
    let mut messages = bounded(action, timeout, consumer.messages()).await?;
    while read.last_sequence.is_none_or(|seq| seq < last) {
        let message = match tokio::time::timeout(timeout, messages.next()).await {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(e))) => return Err(StorageError::Unavailable { action, reason: e.to_string() }),
            Ok(None) => return Err(StorageError::Unavailable { action, reason: "the consumer ended early".into() }),
            Err(_) => {
                return Err(StorageError::Unavailable { action, reason: format!("no answer within {timeout:?}") });
            }
        };
        let sequence =
            message.info().map_err(|e| StorageError::Unavailable { action, reason: e.to_string() })?.stream_sequence;
        read.add(subject, sequence, &message.payload);
    }
    Ok(())
}

/// Reads a log subject from stream sequence `next` up to `last` one message at a time.
async fn read_by_gets(
    stream: &stream::Stream,
    subject: &str,
    mut next: u64,
    last: u64,
    timeout: Duration,
    read: &mut ReadLog,
) -> Result<(), StorageError> {
    while next <= last {
        let get = stream.raw_message_builder().sequence(next).next_by_subject(subject.to_string()).send();
        let message = bounded("reading an event log", timeout, get).await?;
        read.add(subject, message.sequence, &message.payload);
        next = message.sequence + 1;
    }
    Ok(())
}

impl ReadLog {
    /// Takes in the record at stream sequence `sequence`.
    fn add(&mut self, subject: &str, sequence: u64, payload: &[u8]) {
        match decode::<LogRecord>(payload) {
            Ok(record) => self.records.push((sequence, record)),
            Err(reason) => {
                tracing::error!(subject, sequence, %reason, "damaged event log record skipped (left in place)");
                self.skipped += 1;
                self.skipped_bytes += payload.len() as u64;
            }
        }
        self.last_sequence = Some(sequence);
    }

    /// The latest time its records hold.
    fn time(&self) -> SessionTime {
        let times = self.records.iter().map(|(_, record)| match record {
            LogRecord::Event(event) => event.time,
            LogRecord::Mark(time) => *time,
        });
        times.max().unwrap_or(0)
    }
}

impl JetStreamStorage {
    /// Runs `attempt` on the runtime until it succeeds, fails otherwise than
    /// [`StorageError::Unavailable`], or [`JetStreamOptions::timeout`] has passed since the first
    /// attempt started (each attempt bounds its own requests: a call returns within about twice
    /// the timeout). Every operation retried this way is idempotent; while the cluster elects a
    /// new leader after losing a node, requests fail fast and a retry gets through.
    fn retrying<'a, T, F>(&'a self, attempt: impl Fn() -> F) -> Result<T, StorageError>
    where
        F: Future<Output = Result<T, StorageError>> + 'a,
    {
        let deadline = Instant::now() + self.timeout;
        self.runtime.block_on(async {
            loop {
                match attempt().await {
                    Err(StorageError::Unavailable { action, reason }) if Instant::now() + RETRY_PAUSE < deadline => {
                        tracing::warn!(action, %reason, "JetStream request failed; retrying");
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                    result => return result,
                }
            }
        })
    }

    /// What is known of a session, read from the cluster if this process has not yet.
    fn known(&mut self, session: &SessionId) -> Result<Known, StorageError> {
        if let Some(known) = self.known.get(session) {
            return Ok(*known);
        }
        let key = session.to_string();
        let timeout = self.timeout;
        let (meta, read) = self.retrying(|| async {
            let meta = load_object::<MetaObject>(&self.sessions, &key, "session metadata", timeout).await?;
            let read = read_log(&self.log, &log_subject(session), timeout).await?;
            Ok::<_, StorageError>((meta, read))
        })?;
        let known = Known { generation: meta.map_or(0, |m| m.generation), time: read.time() };
        self.known.insert(*session, known);
        Ok(known)
    }

    /// Publishes encoded records to a session's log, pipelined, and awaits every
    /// acknowledgement; returns them in order. A failed attempt is retried whole (see
    /// [`JetStreamStorage::retrying`]): events carry message ids, so JetStream stores each once;
    /// a clock mark or a republished event stored twice is harmless (see
    /// [`Storage::load_session`]).
    fn publish(
        &self,
        session: &SessionId,
        records: &[Record],
    ) -> Result<Vec<jetstream::publish::PublishAck>, StorageError> {
        let mut acks = self.publish_to_logs(&[(log_subject(session), records)])?;
        Ok(acks.pop().unwrap_or_default())
    }

    /// Publishes encoded records to several logs (subject, records), all pipelined in one
    /// attempt, and returns each log's acknowledgements in order; retried whole like
    /// [`JetStreamStorage::publish`].
    fn publish_to_logs(
        &self,
        logs: &[(String, &[Record])],
    ) -> Result<Vec<Vec<jetstream::publish::PublishAck>>, StorageError> {
        let timeout = self.timeout;
        self.retrying(|| async {
            let attempt = async {
                let mut pending = Vec::with_capacity(logs.len());
                for (subject, records) in logs {
                    let mut futures = Vec::with_capacity(records.len());
                    for (payload, id) in records.iter() {
                        let mut message = PublishMessage::build().payload(payload.clone());
                        if let Some(id) = id {
                            message = message.message_id(id);
                        }
                        futures.push(self.jetstream.send_publish(subject.clone(), message).await?);
                    }
                    pending.push(futures);
                }
                let mut acks = Vec::with_capacity(pending.len());
                for futures in pending {
                    let mut log_acks = Vec::with_capacity(futures.len());
                    for ack in futures {
                        log_acks.push(ack.await?);
                    }
                    acks.push(log_acks);
                }
                Ok::<_, async_nats::Error>(acks)
            };
            bounded("appending to an event log", timeout, attempt).await
        })
    }
}

impl JetStreamStorage {
    /// A duplicate acknowledgement is this process's own event stored by an earlier attempt
    /// (whose acknowledgement was lost), or another writer's: the stored message tells.
    fn check_duplicates(
        &self,
        session: &SessionId,
        events: &[StampedEvent],
        records: &[Record],
        acks: &[jetstream::publish::PublishAck],
    ) -> Result<(), StorageError> {
        for ((event, (payload, _)), ack) in events.iter().zip(records).zip(acks) {
            if !ack.duplicate {
                continue;
            }
            let stored = self.retrying(|| {
                bounded("checking a duplicate event", self.timeout, self.log.get_raw_message(ack.sequence))
            })?;
            if stored.payload != *payload {
                return Err(StorageError::Conflict { session: session.to_string(), seq: event.seq });
            }
        }
        Ok(())
    }
}

/// The pause between two attempts of a failed request.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

impl Storage for JetStreamStorage {
    fn load_session(&mut self, session: &SessionId) -> Result<Option<StoredSession>, StorageError> {
        self.known.remove(session);
        let key = session.to_string();
        let timeout = self.timeout;
        let loaded = self.retrying(|| async {
            let Some(meta) = load_object::<MetaObject>(&self.sessions, &key, "session metadata", timeout).await? else {
                return Ok(None);
            };
            let snapshot = load_object::<SnapshotRecord>(&self.snapshots, &key, "snapshot", timeout).await?;
            let read = read_log(&self.log, &log_subject(session), timeout).await?;
            Ok::<_, StorageError>(Some((meta, snapshot, read)))
        })?;
        let Some((MetaObject { generation, meta }, snapshot, read)) = loaded else {
            return Ok(None);
        };
        let mut events: Vec<StampedEvent> = Vec::new();
        for (_, record) in &read.records {
            let LogRecord::Event(event) = record else { continue };
            // Events a snapshot covers are left out (its log is purged after it is stored), and
            // so are the second copies an interrupted purge leaves.
            let covered = snapshot.as_ref().is_some_and(|s| seq_le(event.seq, s.seq));
            let repeated = events.last().is_some_and(|last| seq_le(event.seq, last.seq));
            if !covered && !repeated {
                events.push(event.clone());
            }
        }
        let time = read.time().max(snapshot.as_ref().map_or(0, |s| s.time));
        let log_lost = read.records.is_empty();
        let missing = missing_seqs(snapshot.as_ref().map(|s| s.seq), &events);
        let damage = (log_lost || read.skipped > 0 || !missing.is_empty()).then_some(StorageDamage {
            header_damaged: log_lost && read.skipped == 0,
            log_lost,
            records_skipped: read.skipped,
            bytes_skipped: read.skipped_bytes,
            missing_seqs: missing,
        });
        self.known.insert(*session, Known { generation, time });
        Ok(Some(StoredSession { meta, snapshot, events, time, damage }))
    }

    fn create_session(&mut self, session: &SessionId, meta: &SessionMeta) -> Result<(), StorageError> {
        self.known.remove(session);
        let key = session.to_string();
        let timeout = self.timeout;
        let generation = new_generation();
        self.retrying(|| async {
            // Starting a stored session over (it continues from a replica): its snapshot is set
            // aside, never served again, and kept for the operator.
            if let Some(old) = get_object(&self.snapshots, &key, "snapshot", timeout).await? {
                put_object(&self.snapshots, &format!("{key}.superseded"), Bytes::from(old), timeout).await?;
                bounded("setting a snapshot aside", timeout, self.snapshots.store.delete(&key)).await?;
            }
            // The log first: a session is only there once its metadata is, and then it has a log.
            let purge = self.log.purge().filter(log_subject(session));
            bounded("starting an event log", timeout, purge).await?;
            Ok::<_, StorageError>(())
        })?;
        self.publish(session, &[(encode(&LogRecord::Mark(0))?, None)])?;
        let object = encode(&MetaObject { generation, meta: meta.clone() })?;
        self.retrying(|| put_object(&self.sessions, &key, object.clone(), timeout))?;
        self.known.insert(*session, Known { generation, time: 0 });
        Ok(())
    }

    fn append_events(&mut self, session: &SessionId, events: &[StampedEvent]) -> Result<(), StorageError> {
        let mut results = self.append_batches(&[(*session, events.to_vec())]);
        results.pop().unwrap_or(Ok(()))
    }

    /// Publishes every session's events in one pipelined attempt (one round trip for them all),
    /// then checks the duplicates per session: a session whose metadata cannot be read, or whose
    /// sequence number another writer stored, fails alone.
    fn append_batches(&mut self, batches: &[(SessionId, Vec<StampedEvent>)]) -> Vec<Result<(), StorageError>> {
        let mut results: Vec<Option<Result<(), StorageError>>> = batches.iter().map(|_| None).collect();
        // Each planned log: its batch's index and its encoded records (payload, message id).
        let mut planned: Vec<(usize, Vec<Record>)> = Vec::new();
        for (index, (session, events)) in batches.iter().enumerate() {
            if events.is_empty() {
                results[index] = Some(Ok(()));
                continue;
            }
            let records = self.known(session).and_then(|known| {
                events
                    .iter()
                    .map(|e| {
                        let id = format!("{session}:{}:{}", known.generation, e.seq);
                        Ok((encode(&LogRecord::Event(e.clone()))?, Some(id)))
                    })
                    .collect::<Result<Vec<_>, StorageError>>()
            });
            match records {
                Ok(records) => planned.push((index, records)),
                Err(error) => results[index] = Some(Err(error)),
            }
        }
        let logs: Vec<(String, &[Record])> =
            planned.iter().map(|(index, records)| (log_subject(&batches[*index].0), records.as_slice())).collect();
        match self.publish_to_logs(&logs) {
            Err(error) => {
                let reason = error.to_string();
                for (index, _) in &planned {
                    let reason = reason.clone();
                    results[*index] =
                        Some(Err(StorageError::Unavailable { action: "appending to an event log", reason }));
                }
            }
            Ok(acks) => {
                for ((index, records), acks) in planned.iter().zip(acks) {
                    let (session, events) = &batches[*index];
                    if let Some(known) = self.known.get_mut(session) {
                        known.time = events.iter().map(|e| e.time).fold(known.time, u64::max);
                    }
                    results[*index] = Some(self.check_duplicates(session, events, records, &acks));
                }
            }
        }
        results.into_iter().map(|result| result.unwrap_or(Ok(()))).collect()
    }

    fn mark_time(&mut self, session: &SessionId, time: SessionTime) -> Result<(), StorageError> {
        self.known(session)?;
        self.publish(session, &[(encode(&LogRecord::Mark(time))?, None)])?;
        let known = self.known.get_mut(session).expect("known above");
        known.time = known.time.max(time);
        Ok(())
    }

    fn store_snapshot(
        &mut self,
        session: &SessionId,
        snapshot: &SnapshotRecord,
        remaining: &[StampedEvent],
    ) -> Result<(), StorageError> {
        // The log after the purge carries the latest time recorded, which may be after the
        // snapshot's.
        let time = self.known(session)?.time.max(snapshot.time);
        let key = session.to_string();
        let timeout = self.timeout;
        let object = encode(snapshot)?;
        self.retrying(|| put_object(&self.snapshots, &key, object.clone(), timeout))?;
        // The remaining events and a clock mark are published again after everything else, then
        // everything before them is purged. Interrupted, the log holds each remaining event
        // twice: loading keeps the first copy.
        let records = remaining
            .iter()
            .cloned()
            .map(LogRecord::Event)
            .chain([LogRecord::Mark(time)])
            .map(|record| Ok((encode(&record)?, None)))
            .collect::<Result<Vec<_>, StorageError>>()?;
        let acks = self.publish(session, &records)?;
        let first = acks.first().expect("a mark at least").sequence;
        let purge = || self.log.purge().filter(log_subject(session)).sequence(first);
        self.retrying(|| bounded("purging an event log", timeout, purge()))?;
        self.known.get_mut(session).expect("known above").time = time;
        Ok(())
    }

    fn load_persisted(&mut self, persistent_id: &PersistentId) -> Result<Option<PersistRecord>, StorageError> {
        let key = persistent_id.to_string();
        self.retrying(|| load_object(&self.persisted, &key, "persisted data", self.timeout))
    }

    fn store_persisted(&mut self, persistent_id: &PersistentId, record: &PersistRecord) -> Result<(), StorageError> {
        let key = persistent_id.to_string();
        let object = encode(record)?;
        self.retrying(|| put_object(&self.persisted, &key, object.clone(), self.timeout))
    }

    fn load_member_key(&mut self, persistent_id: &PersistentId) -> Result<Option<[u8; 32]>, StorageError> {
        let key = persistent_id.to_string();
        self.retrying(|| load_object(&self.members, &key, "membership key", self.timeout))
    }

    fn pin_member_key(&mut self, persistent_id: &PersistentId, key: &[u8; 32]) -> Result<(), StorageError> {
        let name = persistent_id.to_string();
        let object = encode(key)?;
        self.retrying(|| put_object(&self.members, &name, object.clone(), self.timeout))
    }

    /// Nothing to do: every write returned once a quorum of the stream's replicas had stored it.
    fn sync(&mut self) -> Result<(), StorageError> {
        Ok(())
    }

    fn unload_session(&mut self, session: &SessionId) {
        self.known.remove(session);
        if let Some(claims) = self.claims.as_mut() {
            self.runtime.block_on(claims.release(&self.jetstream, session, self.timeout));
        }
    }

    /// Takes the session's claim in [`CLAIMS_STREAM`] unless another reflector holds it (with
    /// [`JetStreamOptions::advertise`] set; otherwise every session is this reflector's).
    fn claim(&mut self, session: &SessionId) -> Result<Claim, StorageError> {
        let Some(claims) = self.claims.as_mut() else { return Ok(Claim::Owned) };
        if claims.holds(session) {
            return Ok(Claim::Owned);
        }
        let claim = self.runtime.block_on(claims.claim(&self.jetstream, session, self.timeout))?;
        // Another reflector may have written the session since this one last did: read it anew.
        self.known.remove(session);
        Ok(claim)
    }

    fn renew_claims(&mut self) -> Vec<SessionId> {
        let Some(claims) = self.claims.as_mut().filter(|claims| claims.renewal_due()) else { return Vec::new() };
        let lost = self.runtime.block_on(claims.renew(&self.jetstream));
        for session in &lost {
            self.known.remove(session);
        }
        lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_decode_only_with_their_version_and_nothing_more() {
        let bytes = encode(&LogRecord::Mark(3_014)).unwrap();
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(decode::<LogRecord>(&bytes), Ok(LogRecord::Mark(3_014)));
        assert_eq!(decode::<LogRecord>(&[]), Err("empty".to_string()));
        let mut future = bytes.to_vec();
        future[0] = 2;
        assert_eq!(decode::<LogRecord>(&future), Err("unknown format version 2".to_string()));
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert_eq!(decode::<LogRecord>(&longer), Err("undecodable: 1 bytes too many".to_string()));
        let cut = &bytes[..1];
        assert!(decode::<LogRecord>(cut).unwrap_err().starts_with("undecodable"));
        // A length prefix claiming far more than there is fails without allocating it.
        assert!(decode::<Vec<u8>>(&[FORMAT_VERSION, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
    }
}
