//! Networking for the windowed game: where the reflector is, and the join link.
//!
//! * Hosting (no option): an [`EmbeddedUdpReflector`] — a [`UdpReflector`] on a background
//!   thread, bound to 127.0.0.1 on a free port — that other processes join with the printed link.
//! * `--join LINK`: the reflector, app id, session name and password all come from the link.
//! * `--reflector ADDR`: a standalone `synq-reflector`; name and password from `--name` /
//!   `--password`, or random.
//!
//! Every client (this player and its bots) reaches the reflector over UDP
//! ([`ReflectorTarget::Udp`]), so a joining process is on an equal footing.

use bevy_synq::ReflectorTarget;
use bevy_synq::protocol::link::{JoinLink, random_password, random_session_name};
use bevy_synq::protocol::{AppId, SessionName};
use bevy_synq::reflector::server::{UdpReflector, UdpReflectorConfig};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use crate::APP_ID;

/// A UDP reflector serving on a thread of its own until [`EmbeddedUdpReflector::stop`].
pub struct EmbeddedUdpReflector {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EmbeddedUdpReflector {
    /// Binds 127.0.0.1 on a free port and starts serving (sessions in memory only).
    pub fn start() -> Result<Self, String> {
        let config = UdpReflectorConfig { listen: SocketAddr::from(([127, 0, 0, 1], 0)), ..Default::default() };
        let mut reflector = UdpReflector::bind(config).map_err(|e| format!("cannot start the reflector: {e}"))?;
        let addr = reflector.local_addr();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("multiblaster-reflector".into())
            .spawn(move || reflector.run(&flag))
            .map_err(|e| format!("cannot start the reflector thread: {e}"))?;
        Ok(Self { addr, stop, thread: Some(thread) })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving (clients are told the reflector shuts down) and waits for the thread.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// How this process takes part.
pub enum Role {
    /// It runs the reflector others join.
    Host(EmbeddedUdpReflector),
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
        let name = name.map_or_else(|| random_session_name().as_str().to_string(), str::to_string);
        let password = password.map_or_else(random_password, str::to_string);
        let (addr, role) = match reflector {
            Some(text) => {
                let addr = match text.parse::<SocketAddr>() {
                    Ok(addr) => addr,
                    Err(_) => {
                        let (host, port) = text.rsplit_once(':').ok_or("--reflector: expected host:port")?;
                        resolve(host, port.parse().map_err(|e| format!("--reflector: port: {e}"))?)?
                    }
                };
                (addr, Role::Standalone)
            }
            None => {
                let reflector = EmbeddedUdpReflector::start()?;
                (reflector.addr(), Role::Host(reflector))
            }
        };
        let link = make_link(addr, &name, &password)?;
        Ok(Self { target: ReflectorTarget::Udp(addr), name, password, link, role })
    }

    /// Prints the welcome: what this process does, the join link and its QR code.
    pub fn print_welcome(&self) {
        let what = match &self.role {
            Role::Host(reflector) => format!("hosting on the embedded reflector at {}", reflector.addr()),
            Role::Joined => "joining a running game".to_string(),
            Role::Standalone => "on a standalone synq-reflector".to_string(),
        };
        println!("Multiblaster — session \"{}\", {what}", self.name);
        println!("Join from another terminal with:");
        println!("  cargo run --release --example multiblaster --features render -- --join '{}'", self.link);
        println!("Join link: {}", self.link);
        match crate::qr::encode(self.link.as_bytes()) {
            Some(code) => println!("{}", code.to_terminal()),
            None => println!("(the link is too long for the built-in QR code)"),
        }
    }

    /// Stops the embedded reflector, if this process runs one.
    pub fn stop(self) {
        if let Role::Host(reflector) = self.role {
            reflector.stop();
        }
    }
}
