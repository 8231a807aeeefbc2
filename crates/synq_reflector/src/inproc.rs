//! The in-process transport: clients and a reflector in one process, connected by crossbeam
//! channels. It is the embedded default for solo play and what the plugin's tests run on.
//!
//! Two ways to drive the reflector:
//! * [`EmbeddedReflector::spawn`] runs it on its own thread against the real clock;
//! * [`ManualReflector`] runs it only when [`ManualReflector::pump`] is called, at a time the
//!   caller chooses — deterministic tests with virtual time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, unbounded};
use synq_protocol::wire::{ClientMessage, ServerMessage};

use crate::core::{ClientId, Output, Reflector, ReflectorConfig};

enum Inbound {
    Connect(ClientId, Sender<Arc<ServerMessage>>),
    Message(ClientId, Box<ClientMessage>),
    Disconnect(ClientId),
    Shutdown,
}

/// Opens connections to an in-process reflector. Cheap to clone.
#[derive(Clone)]
pub struct InProcessHandle {
    inbox: Sender<Inbound>,
    next_client: Arc<AtomicU64>,
}

impl InProcessHandle {
    /// Opens a new connection.
    pub fn connect(&self) -> InProcessConnection {
        let id = self.next_client.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = unbounded();
        let _ = self.inbox.send(Inbound::Connect(id, tx));
        InProcessConnection { id, inbox: self.inbox.clone(), incoming: rx, closed: false }
    }
}

/// One client's connection to an in-process reflector. Dropping it disconnects.
pub struct InProcessConnection {
    id: ClientId,
    inbox: Sender<Inbound>,
    incoming: Receiver<Arc<ServerMessage>>,
    closed: bool,
}

impl InProcessConnection {
    /// Sends a message to the reflector. Returns `false` once the reflector is gone.
    pub fn send(&self, message: ClientMessage) -> bool {
        !self.closed && self.inbox.send(Inbound::Message(self.id, Box::new(message))).is_ok()
    }

    /// The next message from the reflector, if one is waiting. `Err` once the connection is
    /// closed (by the reflector, or because it stopped).
    pub fn try_recv(&self) -> Result<Option<Arc<ServerMessage>>, ConnectionClosed> {
        match self.incoming.try_recv() {
            Ok(message) => Ok(Some(message)),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(ConnectionClosed),
        }
    }

    /// Closes the connection.
    pub fn close(&mut self) {
        if !self.closed {
            self.closed = true;
            let _ = self.inbox.send(Inbound::Disconnect(self.id));
        }
    }
}

impl Drop for InProcessConnection {
    fn drop(&mut self) {
        self.close();
    }
}

/// The reflector closed the connection or stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("connection to the in-process reflector closed")]
pub struct ConnectionClosed;

struct Hub {
    core: Reflector,
    inbox: Receiver<Inbound>,
    clients: std::collections::HashMap<ClientId, Sender<Arc<ServerMessage>>>,
}

impl Hub {
    /// Handles one inbound item; `false` on shutdown.
    fn handle(&mut self, now: u64, inbound: Inbound) -> bool {
        match inbound {
            Inbound::Connect(id, tx) => {
                self.clients.insert(id, tx);
                self.core.connect(now, id);
            }
            Inbound::Message(id, message) => self.core.handle(now, id, *message),
            Inbound::Disconnect(id) => {
                self.clients.remove(&id);
                self.core.disconnect(now, id);
            }
            Inbound::Shutdown => return false,
        }
        true
    }

    fn dispatch(&mut self, now: u64) {
        let mut closed = Vec::new();
        for output in self.core.drain_outputs() {
            match output {
                Output::Send { client, message } => {
                    if let Some(tx) = self.clients.get(&client) {
                        let _ = tx.send(message);
                    }
                }
                Output::Close { client, reason } => {
                    if let Some(tx) = self.clients.remove(&client) {
                        let _ = tx.send(Arc::new(ServerMessage::Error(reason)));
                    }
                    closed.push(client);
                }
            }
        }
        if !closed.is_empty() {
            for client in closed {
                self.core.disconnect(now, client);
            }
            // Disconnects can produce outputs (a leave batch when a session empties).
            self.dispatch(now);
        }
    }
}

/// An in-process reflector driven by the caller, at times the caller chooses.
pub struct ManualReflector {
    hub: Hub,
    handle: InProcessHandle,
}

impl ManualReflector {
    /// A reflector with the given configuration.
    pub fn new(config: ReflectorConfig) -> Self {
        let (tx, rx) = unbounded();
        Self {
            hub: Hub { core: Reflector::new(config), inbox: rx, clients: Default::default() },
            handle: InProcessHandle { inbox: tx, next_client: Arc::new(AtomicU64::new(1)) },
        }
    }

    /// Opens connections to this reflector.
    pub fn handle(&self) -> InProcessHandle {
        self.handle.clone()
    }

    /// Handles everything clients sent so far and whatever timers are due at `now` (ms of the
    /// caller's clock, which must not go backwards).
    pub fn pump(&mut self, now: u64) {
        loop {
            match self.hub.inbox.try_recv() {
                Ok(inbound) => {
                    self.hub.handle(now, inbound);
                }
                Err(_) => break,
            }
            self.hub.dispatch(now);
        }
        self.hub.core.poll(now);
        self.hub.dispatch(now);
    }

    /// The state machine, for inspection.
    pub fn core(&self) -> &Reflector {
        &self.hub.core
    }
}

/// An in-process reflector on its own thread, against the real clock. Stops when dropped.
pub struct EmbeddedReflector {
    handle: InProcessHandle,
    thread: Option<JoinHandle<()>>,
}

impl EmbeddedReflector {
    /// Starts the reflector thread.
    pub fn spawn(config: ReflectorConfig) -> Self {
        let (tx, rx) = unbounded();
        let handle = InProcessHandle { inbox: tx, next_client: Arc::new(AtomicU64::new(1)) };
        let mut hub = Hub { core: Reflector::new(config), inbox: rx, clients: Default::default() };
        let thread = std::thread::Builder::new()
            .name("synq-reflector".into())
            .spawn(move || {
                let epoch = Instant::now();
                let now = || epoch.elapsed().as_millis() as u64;
                loop {
                    let timeout = match hub.core.next_deadline() {
                        Some(deadline) => Duration::from_millis(deadline.saturating_sub(now())),
                        None => Duration::from_millis(100),
                    };
                    match hub.inbox.recv_timeout(timeout) {
                        Ok(inbound) => {
                            let t = now();
                            if !hub.handle(t, inbound) {
                                break;
                            }
                            hub.dispatch(t);
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                    let t = now();
                    hub.core.poll(t);
                    hub.dispatch(t);
                }
            })
            .expect("spawning the reflector thread");
        Self { handle, thread: Some(thread) }
    }

    /// Opens connections to this reflector.
    pub fn handle(&self) -> InProcessHandle {
        self.handle.clone()
    }
}

impl Drop for EmbeddedReflector {
    fn drop(&mut self) {
        let _ = self.handle.inbox.send(Inbound::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
