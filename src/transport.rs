//! How a client reaches its reflector.
//!
//! A [`Connector`] opens [`Connection`]s; the client reconnects through it. The in-process
//! transport (crossbeam channels) is implemented here; a network transport implements the same
//! two traits.

use std::sync::{Arc, Mutex};
use synq_protocol::wire::{ClientMessage, ServerMessage};
#[cfg(feature = "embedded")]
use synq_reflector::inproc::{InProcessConnection, InProcessHandle};

/// An open connection to a reflector.
pub trait Connection: Send + Sync + 'static {
    /// Queues a message for the reflector; `false` if the connection is closed.
    fn send(&mut self, message: ClientMessage) -> bool;
    /// The next message from the reflector, if any; `Err` once the connection is closed.
    fn poll(&mut self) -> Result<Option<Arc<ServerMessage>>, String>;
    /// The round-trip time to the reflector, when the transport measures it.
    fn rtt(&self) -> Option<std::time::Duration> {
        None
    }
}

/// Opens connections to a reflector.
pub trait Connector: Send + Sync + 'static {
    /// Opens a new connection.
    fn connect(&mut self) -> Result<Box<dyn Connection>, String>;
    /// Where it connects, for logs.
    fn describe(&self) -> String;
    /// The reflector said another reflector of its cluster serves the session, at `to`
    /// ([`ServerMessage::Redirect`](synq_protocol::wire::ServerMessage::Redirect)): the next
    /// [`connect`](Self::connect) goes there. A transport that cannot reach a socket address
    /// refuses, as by default.
    fn redirect(&mut self, to: std::net::SocketAddr) -> Result<(), String> {
        Err(format!("{} cannot follow a redirect to {to}", self.describe()))
    }
    /// The reflector could not serve this client now (unavailable, full, shutting down): the
    /// next [`connect`](Self::connect) may go to another reflector, if the connector knows
    /// several. By default nothing changes.
    fn try_another(&mut self) {}
}

/// A connector shared by every join through one [`ReflectorTarget::Custom`](crate::ReflectorTarget::Custom).
pub(crate) struct SharedConnector(pub(crate) Arc<Mutex<Box<dyn Connector>>>);

impl Connector for SharedConnector {
    fn connect(&mut self) -> Result<Box<dyn Connection>, String> {
        self.0.lock().map_err(|_| "the custom connector panicked earlier".to_string())?.connect()
    }

    fn describe(&self) -> String {
        self.0.lock().map_or_else(|_| "a custom connector (poisoned)".into(), |c| c.describe())
    }

    fn redirect(&mut self, to: std::net::SocketAddr) -> Result<(), String> {
        self.0.lock().map_err(|_| "the custom connector panicked earlier".to_string())?.redirect(to)
    }

    fn try_another(&mut self) {
        if let Ok(mut connector) = self.0.lock() {
            connector.try_another();
        }
    }
}

#[cfg(feature = "embedded")]
impl Connection for InProcessConnection {
    fn send(&mut self, message: ClientMessage) -> bool {
        InProcessConnection::send(self, message)
    }

    fn poll(&mut self) -> Result<Option<Arc<ServerMessage>>, String> {
        self.try_recv().map_err(|e| e.to_string())
    }
}

#[cfg(feature = "embedded")]
impl Connector for InProcessHandle {
    fn connect(&mut self) -> Result<Box<dyn Connection>, String> {
        Ok(Box::new(InProcessHandle::connect(self)))
    }

    fn describe(&self) -> String {
        "in-process reflector".into()
    }
}

#[cfg(feature = "udp")]
pub mod udp;
