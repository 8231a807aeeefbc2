//! Event logs made durable on a thread of their own: an `fdatasync` takes from a fraction of a
//! millisecond to tens of milliseconds, and a hundred active sessions' logs synced in the
//! reflector's loop held every session's events back for up to 50 ms once a second.

use std::fs::File;
use std::io;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;

use synq_protocol::ids::SessionId;

/// Open handles of event logs to sync (each a duplicate of the log's own descriptor).
pub(super) type Batch = Vec<(SessionId, File)>;

/// The thread that syncs batches of logs, one batch at a time.
pub(super) struct Syncer {
    requests: Option<SyncSender<Batch>>,
    failures: Receiver<(SessionId, io::Error)>,
    thread: Option<JoinHandle<()>>,
}

impl Syncer {
    pub(super) fn start() -> io::Result<Self> {
        // One batch waiting beside the one being synced: a slow disk holds the next batch back
        // (its logs stay marked and go with a later one) instead of stalling the caller.
        let (requests, batches) = mpsc::sync_channel::<Batch>(1);
        let (report, failures) = mpsc::channel();
        let thread = std::thread::Builder::new().name("synq-fsync".into()).spawn(move || {
            for batch in batches {
                for (session, file) in batch {
                    if let Err(error) = file.sync_data() {
                        let _ = report.send((session, error));
                    }
                }
            }
        })?;
        Ok(Self { requests: Some(requests), failures, thread: Some(thread) })
    }

    /// Hands `batch` to the thread; gives it back if the thread is still busy with earlier ones.
    pub(super) fn submit(&self, batch: Batch) -> Result<(), Batch> {
        let Some(requests) = &self.requests else { return Err(batch) };
        match requests.try_send(batch) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(batch) | TrySendError::Disconnected(batch)) => Err(batch),
        }
    }

    /// A sync that failed since the last call, if any.
    pub(super) fn failure(&self) -> Option<(SessionId, io::Error)> {
        self.failures.try_recv().ok()
    }

    /// Waits until every batch handed over is synced.
    pub(super) fn finish(&mut self) {
        self.requests = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.finish();
    }
}
