//! Networking for the windowed game: where the reflector is, and the join link.
//!
//! * Hosting (no option): a [`HostedReflector`] — a UDP reflector on a background thread — bound
//!   to every interface (`0.0.0.0`), on port 5800 when it is free, else on a free port. The join
//!   link carries the first address other devices reach it on (127.0.0.1 when the machine has
//!   none), so a player on another machine of the LAN joins with it; this process's own clients
//!   dial 127.0.0.1.
//! * `--join LINK`: the reflector, app id, session name and password all come from the link.
//! * `--reflector ADDR`: a standalone `synq-reflector`; name and password from `--name` /
//!   `--password`, or random.
//!
//! Every client (this player and its bots) reaches the reflector over UDP
//! ([`ReflectorTarget::Udp`]), so a joining process is on an equal footing.

use bevy_synq::ReflectorTarget;
use bevy_synq::protocol::link::{DEFAULT_PORT, JoinLink, random_password, random_session_name};
use bevy_synq::protocol::{AppId, SessionName};
use bevy_synq::reflector::server::{HostedReflector, ServerError, UdpReflectorConfig};
use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};

use crate::APP_ID;

/// Starts the reflector this process hosts: every interface, port [`DEFAULT_PORT`] (what a
/// firewall rule most likely allows) or, when that is taken, a free one. Sessions live in memory.
fn start_reflector() -> Result<HostedReflector, String> {
    let on_port = |port| {
        HostedReflector::start(UdpReflectorConfig {
            listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
            ..Default::default()
        })
    };
    match on_port(DEFAULT_PORT) {
        Err(ServerError::Bind { .. }) => on_port(0),
        other => other,
    }
    .map_err(|e| format!("cannot start the reflector: {e}"))
}

/// How this process takes part.
pub enum Role {
    /// It runs the reflector others join.
    Host(HostedReflector),
    /// It joined another process's game.
    Joined,
    /// It uses a standalone `synq-reflector`.
    Standalone,
}

/// The reflector to use and the session's name, password and join link.
pub struct Network {
    /// Where every client of this process connects.
    pub target: ReflectorTarget,
    /// The session name.
    pub name: String,
    /// The session password.
    pub password: String,
    /// The join link others use (it carries the password).
    pub link: String,
    /// How this process takes part.
    pub role: Role,
}

fn resolve(host: &str, port: u16) -> Result<SocketAddr, String> {
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}:{port}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host}:{port} resolves to no address"))
}

/// The given session name and password, or random ones.
fn name_and_password(name: Option<&str>, password: Option<&str>) -> (String, String) {
    (
        name.map_or_else(|| random_session_name().as_str().to_string(), str::to_string),
        password.map_or_else(random_password, str::to_string),
    )
}

fn make_link(addr: SocketAddr, name: &str, password: &str) -> Result<String, String> {
    let link = JoinLink {
        host: addr.ip().to_string(),
        port: addr.port(),
        app_id: AppId::new(APP_ID).map_err(|e| e.to_string())?,
        name: SessionName::new(name).map_err(|e| format!("session name: {e}"))?,
        password: Some(password.to_string()),
    };
    Ok(link.to_string())
}

impl Network {
    /// Sets up networking from the command line's `--join`, `--reflector`, `--name` and
    /// `--password`.
    pub fn open(
        join: Option<&str>,
        reflector: Option<&str>,
        name: Option<&str>,
        password: Option<&str>,
    ) -> Result<Self, String> {
        if let Some(text) = join {
            let link = JoinLink::parse(text).map_err(|e| format!("--join: {e}"))?;
            if link.app_id.as_str() != APP_ID {
                return Err(format!("--join: the link is for the app {}, not {APP_ID}", link.app_id));
            }
            let password = link
                .password
                .clone()
                .or_else(|| password.map(str::to_string))
                .ok_or("--join: the link has no password (#pw=…); give it with --password")?;
            let addr = resolve(&link.host, link.port)?;
            let name = link.name.as_str().to_string();
            return Ok(Self {
                target: ReflectorTarget::Udp(addr),
                link: make_link(addr, &name, &password).unwrap_or_else(|_| text.to_string()),
                name,
                password,
                role: Role::Joined,
            });
        }
        let Some(text) = reflector else { return Self::host(name, password) };
        let (name, password) = name_and_password(name, password);
        let addr = match text.parse::<SocketAddr>() {
            Ok(addr) => addr,
            Err(_) => {
                let (host, port) = text.rsplit_once(':').ok_or("--reflector: expected host:port")?;
                resolve(host, port.parse().map_err(|e| format!("--reflector: port: {e}"))?)?
            }
        };
        let link = make_link(addr, &name, &password)?;
        Ok(Self { target: ReflectorTarget::Udp(addr), name, password, link, role: Role::Standalone })
    }

    /// Hosts a session (random name and password unless given) on a reflector of this process
    /// that other devices can reach: the link carries its first LAN address.
    pub fn host(name: Option<&str>, password: Option<&str>) -> Result<Self, String> {
        let (name, password) = name_and_password(name, password);
        let reflector = start_reflector()?;
        let link = make_link(reflector.link_addr(), &name, &password)?;
        Ok(Self {
            target: ReflectorTarget::Udp(reflector.local_client_addr()),
            name,
            password,
            link,
            role: Role::Host(reflector),
        })
    }

    /// Prints the welcome: what this process does, the join link and its QR code.
    pub fn print_welcome(&self) {
        let what = match &self.role {
            Role::Host(reflector) => format!("hosting on UDP port {}", reflector.local_addr().port()),
            Role::Joined => "joining a running game".to_string(),
            Role::Standalone => "on a standalone synq-reflector".to_string(),
        };
        println!("Multiblaster — session \"{}\", {what}", self.name);
        if let Role::Host(reflector) = &self.role {
            let port = reflector.local_addr().port();
            match reflector.reachable_addresses() {
                [] => println!("This machine has no network address but 127.0.0.1: only players on it can join."),
                addresses => {
                    println!("Other devices reach this game at:");
                    for addr in addresses {
                        println!("  {addr}");
                    }
                    println!("(the link uses the first; the firewall must let UDP port {port} in)");
                }
            }
        }
        println!("Join from another terminal or machine with:");
        println!("  cargo run --release --example multiblaster --features render -- --join '{}'", self.link);
        println!("Join link: {}", self.link);
        match crate::qr::encode(self.link.as_bytes()) {
            Some(code) => println!("{}", code.to_terminal()),
            None => println!("(the link is too long for a QR code)"),
        }
    }

    /// Stops the hosted reflector, if this process runs one (clients are told it shuts down).
    pub fn stop(self) {
        if let Role::Host(reflector) = self.role {
            reflector.stop();
        }
    }
}
