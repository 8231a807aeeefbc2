//! A hostile client written against the wire protocol: it speaks to a real reflector over UDP
//! through the same transport as the plugin, but sends whatever a test wants.

use bevy_synq::protocol::ViewId;
use bevy_synq::protocol::crypto::SessionKey;
use bevy_synq::protocol::ids::{PersistentId, SessionId};
use bevy_synq::protocol::membership::{self, Challenge};
use bevy_synq::protocol::udp::DEFAULT_PROTOCOL_ID;
use bevy_synq::protocol::wire::{ClientMessage, ErrorCode, Join, ServerMessage};
use bevy_synq::transport::udp::UdpConnector;
use bevy_synq::transport::{Connection, Connector};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// A raw connection to a reflector.
pub struct Hostile {
    connection: Box<dyn Connection>,
    /// Everything received so far.
    pub received: Vec<ServerMessage>,
    /// The connection's challenge, once it arrived.
    pub challenge: Option<Challenge>,
    /// Why the connection closed, once it did.
    pub closed: Option<String>,
}

impl Hostile {
    /// Connects and waits for the reflector's challenge.
    pub fn connect(addr: SocketAddr) -> Self {
        let connection = UdpConnector::new(addr, DEFAULT_PROTOCOL_ID).connect().expect("a UDP socket");
        let mut hostile = Self { connection, received: Vec::new(), challenge: None, closed: None };
        let challenge = hostile.wait_for("the challenge", Duration::from_secs(10), |m| match m {
            ServerMessage::Challenge(challenge) => Some(*challenge),
            _ => None,
        });
        hostile.challenge = challenge;
        assert!(hostile.challenge.is_some(), "no challenge: {:?}", hostile.closed);
        hostile
    }

    /// Sends a message as is.
    pub fn send(&mut self, message: ClientMessage) {
        self.connection.send(message);
    }

    /// Receives what arrived.
    pub fn pump(&mut self) {
        loop {
            match self.connection.poll() {
                Ok(Some(message)) => self.received.push((*message).clone()),
                Ok(None) => return,
                Err(reason) => {
                    self.closed.get_or_insert(reason);
                    return;
                }
            }
        }
    }

    /// Pumps until a message matches `pick` (checking what arrived before too), or `timeout`.
    pub fn wait_for<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pick: impl FnMut(&ServerMessage) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut seen = 0;
        loop {
            self.pump();
            while seen < self.received.len() {
                seen += 1;
                if let Some(found) = pick(&self.received[seen - 1]) {
                    return Some(found);
                }
            }
            if Instant::now() >= deadline || self.closed.is_some() {
                eprintln!("no {what} within {timeout:?}; closed: {:?}", self.closed);
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The error the reflector sent, waiting up to `timeout` for it.
    pub fn error(&mut self, timeout: Duration) -> Option<(ErrorCode, String)> {
        self.wait_for("an error", timeout, |m| match m {
            ServerMessage::Error(e) => Some((e.code, e.message.clone())),
            _ => None,
        })
    }

    /// Whether a `Sync` arrived within `timeout`.
    pub fn synced(&mut self, timeout: Duration) -> bool {
        self.wait_for("a sync", timeout, |m| matches!(m, ServerMessage::Sync(_)).then_some(())).is_some()
    }

    /// A join of `session`, signed by `key` for this connection's challenge.
    pub fn signed_join(
        &self,
        key: &SessionKey,
        app_id: &str,
        session: SessionId,
        persistent: PersistentId,
        view: ViewId,
    ) -> Join {
        membership::member_join(key, &self.challenge.expect("connected"), app_id, session, persistent, view)
    }
}
