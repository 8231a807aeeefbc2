//! # synq_reflector
//!
//! The reflector of bevy_synq: a small server that never runs game code. For every session it
//! stamps each event a client sends with a session time and a sequence number and broadcasts it to
//! every client of the session, sends heartbeat ticks when no events flow, keeps the latest
//! (encrypted) snapshot and the events since, tallies the replicas' state-hash votes, and keeps
//! the (encrypted) persisted data of each persistent id. It sees only ciphertext.
//!
//! The session logic is a sans-IO state machine, [`Reflector`]: it is fed `(now, client, message)`
//! and answers with [`Output`]s. Drivers move bytes: [`inproc`] connects clients in the same
//! process over crossbeam channels (the embedded default for solo play and tests); [`server`] (the
//! `udp` feature, on by default) serves over UDP. The `cli` feature (on by default) adds what only
//! the `synq-reflector` and `synq-load` binaries need; a game hosting a reflector takes
//! `default-features = false, features = ["udp"]`.
#![deny(missing_docs)]

mod access;
mod core;
pub mod inproc;
#[cfg(feature = "udp")]
pub mod server;
mod session;
pub mod storage;

pub use crate::access::AccessControl;
pub use crate::core::{ClientId, Output, Reflector, ReflectorConfig, TIME_MARK_MS};
