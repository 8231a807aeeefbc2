//! Hosting a reflector that other devices reach: a [`UdpReflector`] served on a background thread
//! ([`HostedReflector`]), and the addresses other machines can reach it on
//! ([`reachable_addresses`]).
//!
//! A game that hosts for friends binds all interfaces (`0.0.0.0`), puts the first reachable
//! address in the join link it shows, and lets its own clients dial the loopback address:
//!
//! ```
//! use synq_reflector::server::{HostedReflector, UdpReflectorConfig};
//!
//! let config = UdpReflectorConfig { listen: "0.0.0.0:0".parse().unwrap(), ..Default::default() };
//! let host = HostedReflector::start(config).unwrap();
//! // What goes into the join link: a LAN address, or 127.0.0.1 on a machine without any.
//! println!("join at udp://{}", host.link_addr());
//! // This process's own clients dial the loopback address.
//! assert!(host.local_client_addr().ip().is_loopback());
//! host.stop();
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use super::{ServerError, UdpReflector, UdpReflectorConfig};

/// One address of a network interface, as the OS reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Candidate {
    ip: IpAddr,
    /// The interface is administratively up.
    up: bool,
    /// The interface has a carrier (a cable, a Wi-Fi association, a peer).
    running: bool,
    /// The interface is a loopback one.
    loopback: bool,
}

/// The addresses other devices can reach a socket bound to `bind` on, best first.
///
/// * A specific address (`192.168.1.20:5800`, `127.0.0.1:5800`) is returned as it is: the socket
///   answers on nothing else.
/// * An unspecified one (`0.0.0.0`, `::`) yields every address of the machine's interfaces that
///   are up, with `bind`'s port, except loopback addresses and IPv6 link-local ones (`fe80::/10`,
///   which need an interface scope that links cannot carry). `0.0.0.0` reaches IPv4 only; `::`
///   both families (Linux's dual-stack default), IPv4 first. Interfaces with a carrier come
///   before those without one (a Docker bridge with no container, for example), and IPv4
///   link-local addresses (`169.254.0.0/16`) after the others of their family.
///
/// The list is empty when the machine has no such address or the interfaces cannot be listed
/// (on non-Unix systems only the address of the default route is found). Nothing here panics.
///
/// ```
/// use synq_reflector::server::reachable_addresses;
///
/// // A specific bind: just that address.
/// let bound = "192.0.2.7:5800".parse().unwrap();
/// assert_eq!(reachable_addresses(bound), vec![bound]);
///
/// // All interfaces: the machine's LAN addresses (if any), never a loopback one.
/// for addr in reachable_addresses("0.0.0.0:5800".parse().unwrap()) {
///     assert!(!addr.ip().is_loopback());
///     assert_eq!(addr.port(), 5800);
/// }
/// ```
pub fn reachable_addresses(bind: SocketAddr) -> Vec<SocketAddr> {
    if !bind.ip().is_unspecified() {
        return vec![bind];
    }
    select(bind, interface_candidates())
}

/// Keeps the candidates a socket bound to the unspecified address `bind` is reachable on and
/// orders them (see [`reachable_addresses`]).
fn select(bind: SocketAddr, candidates: Vec<Candidate>) -> Vec<SocketAddr> {
    let want_v6 = bind.is_ipv6();
    let mut kept: Vec<Candidate> = Vec::new();
    for candidate in candidates {
        let usable = candidate.up
            && !candidate.loopback
            && !candidate.ip.is_loopback()
            && !candidate.ip.is_unspecified()
            && !candidate.ip.is_multicast()
            && match candidate.ip {
                IpAddr::V4(_) => true,
                IpAddr::V6(ip) => want_v6 && !is_unicast_link_local(ip) && ip.to_ipv4_mapped().is_none(),
            };
        if usable && !kept.iter().any(|k| k.ip == candidate.ip) {
            kept.push(candidate);
        }
    }
    // A stable sort: the OS's order (interface index) decides among equals.
    kept.sort_by_key(|c| {
        let (family, link_local) = match c.ip {
            IpAddr::V4(ip) => (0, ip.is_link_local()),
            IpAddr::V6(_) => (1, false),
        };
        (family, !c.running, link_local)
    });
    kept.into_iter().map(|c| SocketAddr::new(c.ip, bind.port())).collect()
}

/// `fe80::/10`.
fn is_unicast_link_local(ip: Ipv6Addr) -> bool {
    ip.segments()[0] & 0xffc0 == 0xfe80
}

/// Every address of every interface, from `getifaddrs(3)`; empty if that fails.
#[cfg(unix)]
fn interface_candidates() -> Vec<Candidate> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `list` is a valid out-pointer; on success it holds a list freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        tracing::warn!("cannot list the network interfaces: {}", std::io::Error::last_os_error());
        return Vec::new();
    }
    let mut candidates = Vec::new();
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: `entry` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*entry };
        entry = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: a non-null `ifa_addr` points to a sockaddr whose family tells its real type,
        // which is at least as large as the struct read for that family.
        let ip = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
                }
                libc::AF_INET6 => {
                    let sin6 = &*ifa.ifa_addr.cast::<libc::sockaddr_in6>();
                    IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
                }
                _ => continue,
            }
        };
        let flags = ifa.ifa_flags as libc::c_int;
        candidates.push(Candidate {
            ip,
            up: flags & libc::IFF_UP != 0,
            running: flags & libc::IFF_RUNNING != 0,
            loopback: flags & libc::IFF_LOOPBACK != 0,
        });
    }
    // SAFETY: the list getifaddrs returned, freed once; no reference into it outlives this.
    unsafe { libc::freeifaddrs(list) };
    candidates
}

/// Without `getifaddrs`: the source address of the default route, found by "connecting" a UDP
/// socket (which sends nothing) to a documentation address.
#[cfg(not(unix))]
fn interface_candidates() -> Vec<Candidate> {
    let probe = |bind: SocketAddr, target: SocketAddr| {
        let socket = std::net::UdpSocket::bind(bind).ok()?;
        socket.connect(target).ok()?;
        socket.local_addr().ok().map(|a| a.ip())
    };
    let routes = [
        probe(SocketAddr::from(([0, 0, 0, 0], 0)), SocketAddr::from(([192, 0, 2, 1], 9))),
        probe(
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
            SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1), 9)),
        ),
    ];
    routes
        .into_iter()
        .flatten()
        .map(|ip| Candidate { ip, up: true, running: true, loopback: ip.is_loopback() })
        .collect()
}

/// A [`UdpReflector`] serving on a background thread of its own, until [`HostedReflector::stop`]
/// or until it is dropped: what a game runs to host a session that other devices join.
///
/// Bind all interfaces (`0.0.0.0`, port 0 for a free one or a chosen port) so that other
/// machines reach it; [`HostedReflector::reachable_addresses`] lists where, and
/// [`HostedReflector::link_addr`] is the one to put in a join link. The process's own clients
/// dial [`HostedReflector::local_client_addr`].
///
/// # Which source address replies come from
///
/// A socket bound to all interfaces replies from the address the kernel picks for the route back
/// to the client. With one address per subnet (the usual LAN) that is the address the client
/// dialled; on a machine with several addresses in one subnet it may not be, and clients, which
/// ignore datagrams from any other address than the one they dialled, then never hear back. Bind
/// the address the link names (for example `192.168.1.20:5800`) on such machines.
///
/// # Example
///
/// ```
/// use synq_reflector::server::{HostedReflector, UdpReflectorConfig};
///
/// let config = UdpReflectorConfig { listen: "0.0.0.0:0".parse().unwrap(), ..Default::default() };
/// let host = HostedReflector::start(config).unwrap();
/// assert_ne!(host.local_addr().port(), 0, "the free port it got");
/// for addr in host.reachable_addresses() {
///     println!("reachable at udp://{addr}");
/// }
/// drop(host); // stops it too
/// ```
pub struct HostedReflector {
    local_addr: SocketAddr,
    reachable: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for HostedReflector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostedReflector")
            .field("local_addr", &self.local_addr)
            .field("reachable", &self.reachable)
            .field("running", &self.is_running())
            .finish()
    }
}

impl HostedReflector {
    /// Binds `config.listen` ([`UdpReflector::bind`]) and starts serving on a thread named
    /// `synq-reflector`.
    ///
    /// ```
    /// use synq_reflector::server::{HostedReflector, UdpReflectorConfig};
    ///
    /// // Only this machine: a loopback bind is reachable on nothing else.
    /// let config = UdpReflectorConfig { listen: "127.0.0.1:0".parse().unwrap(), ..Default::default() };
    /// let host = HostedReflector::start(config).unwrap();
    /// assert_eq!(host.reachable_addresses(), &[host.local_addr()]);
    /// ```
    pub fn start(config: UdpReflectorConfig) -> Result<Self, ServerError> {
        let mut reflector = UdpReflector::bind(config)?;
        let local_addr = reflector.local_addr();
        let reachable = reachable_addresses(local_addr);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("synq-reflector".into())
            .spawn(move || reflector.run(&flag))
            .map_err(|e| ServerError::Transport(format!("cannot start the reflector thread: {e}")))?;
        Ok(Self { local_addr, reachable, stop, thread: Some(thread) })
    }

    /// The address the socket is bound to (with the real port when port 0 was asked for).
    ///
    /// ```
    /// # use synq_reflector::server::{HostedReflector, UdpReflectorConfig};
    /// let config = UdpReflectorConfig { listen: "0.0.0.0:0".parse().unwrap(), ..Default::default() };
    /// let host = HostedReflector::start(config).unwrap();
    /// assert!(host.local_addr().ip().is_unspecified());
    /// ```
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where other devices reach it, best first ([`reachable_addresses`] of
    /// [`HostedReflector::local_addr`], listed when it started). Empty when it is bound to all
    /// interfaces of a machine that has no network address but loopback ones.
    ///
    /// ```
    /// # use synq_reflector::server::{HostedReflector, UdpReflectorConfig};
    /// let config = UdpReflectorConfig { listen: "0.0.0.0:0".parse().unwrap(), ..Default::default() };
    /// let host = HostedReflector::start(config).unwrap();
    /// assert!(host.reachable_addresses().iter().all(|a| !a.ip().is_loopback()));
    /// ```
    pub fn reachable_addresses(&self) -> &[SocketAddr] {
        &self.reachable
    }

    /// The address to put in a join link: the first of
    /// [`HostedReflector::reachable_addresses`], or [`HostedReflector::local_client_addr`] when
    /// there is none (then only this machine can join).
    ///
    /// ```
    /// # use synq_reflector::server::{HostedReflector, UdpReflectorConfig};
    /// let config = UdpReflectorConfig { listen: "0.0.0.0:0".parse().unwrap(), ..Default::default() };
    /// let host = HostedReflector::start(config).unwrap();
    /// assert_eq!(host.link_addr().port(), host.local_addr().port());
    /// ```
    pub fn link_addr(&self) -> SocketAddr {
        self.reachable.first().copied().unwrap_or_else(|| self.local_client_addr())
    }

    /// The address clients in this process (or on this machine) dial: the loopback address of
    /// the bound family when bound to all interfaces, else the bound address.
    ///
    /// ```
    /// # use synq_reflector::server::{HostedReflector, UdpReflectorConfig};
    /// let config = UdpReflectorConfig { listen: "0.0.0.0:0".parse().unwrap(), ..Default::default() };
    /// let host = HostedReflector::start(config).unwrap();
    /// assert_eq!(host.local_client_addr(), ([127, 0, 0, 1], host.local_addr().port()).into());
    /// ```
    pub fn local_client_addr(&self) -> SocketAddr {
        let ip = match self.local_addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        SocketAddr::new(ip, self.local_addr.port())
    }

    /// Whether the serving thread still runs (it ends only when stopped, or if it panicked).
    ///
    /// ```
    /// # use synq_reflector::server::{HostedReflector, UdpReflectorConfig};
    /// let config = UdpReflectorConfig { listen: "127.0.0.1:0".parse().unwrap(), ..Default::default() };
    /// let host = HostedReflector::start(config).unwrap();
    /// assert!(host.is_running());
    /// ```
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|thread| !thread.is_finished())
    }

    /// Stops serving and waits for the thread: every client is told the reflector shuts down
    /// ([`UdpReflector::run`]), which takes up to half a second while clients acknowledge it.
    /// Dropping a `HostedReflector` does the same.
    ///
    /// ```
    /// # use synq_reflector::server::{HostedReflector, UdpReflectorConfig};
    /// let config = UdpReflectorConfig { listen: "127.0.0.1:0".parse().unwrap(), ..Default::default() };
    /// let host = HostedReflector::start(config).unwrap();
    /// let addr = host.local_addr();
    /// host.stop();
    /// // The port is free again.
    /// std::net::UdpSocket::bind(addr).unwrap();
    /// ```
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!(addr = %self.local_addr, "the hosted reflector's thread panicked");
        }
    }
}

impl Drop for HostedReflector {
    fn drop(&mut self) {
        self.shut_down();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(ip: &str) -> Candidate {
        Candidate { ip: ip.parse().unwrap(), up: true, running: true, loopback: false }
    }

    #[test]
    fn a_specific_bind_is_returned_as_is() {
        for addr in ["192.0.2.7:5800", "127.0.0.1:1234", "[2001:db8::1]:5800", "[::1]:9"] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(reachable_addresses(addr), vec![addr]);
        }
    }

    #[test]
    fn all_interfaces_excludes_loopback_and_keeps_the_port() {
        for bind in ["0.0.0.0:5800", "[::]:5800"] {
            let bind: SocketAddr = bind.parse().unwrap();
            let addrs = reachable_addresses(bind);
            for addr in &addrs {
                assert!(!addr.ip().is_loopback(), "{addr} from {bind}");
                assert!(!addr.ip().is_unspecified(), "{addr} from {bind}");
                assert_eq!(addr.port(), 5800);
                if let IpAddr::V6(ip) = addr.ip() {
                    assert!(bind.is_ipv6(), "{addr}: an IPv6 address for an IPv4 bind");
                    assert!(!is_unicast_link_local(ip), "{addr}: link-local");
                }
            }
            let first_v6 = addrs.iter().position(SocketAddr::is_ipv6).unwrap_or(addrs.len());
            assert!(addrs[first_v6..].iter().all(SocketAddr::is_ipv6), "IPv4 first: {addrs:?}");
        }
    }

    #[test]
    fn selection_filters_and_orders() {
        let lo = Candidate { loopback: true, ..candidate("127.0.0.1") };
        let lo6 = Candidate { loopback: true, ..candidate("::1") };
        let down = Candidate { up: false, ..candidate("10.0.0.9") };
        let no_carrier = Candidate { running: false, ..candidate("172.17.0.1") };
        let link_local6 = candidate("fe80::1");
        let global6 = candidate("2001:db8::5");
        let apipa = candidate("169.254.3.4");
        let lan = candidate("192.168.1.20");
        let vpn = candidate("10.8.0.2");
        let all = vec![lo, lo6, down, global6, link_local6, no_carrier, apipa, lan, vpn, lan];
        let ips = |bind: &str| -> Vec<String> {
            select(bind.parse().unwrap(), all.clone()).iter().map(|a| a.ip().to_string()).collect()
        };
        assert_eq!(ips("0.0.0.0:1"), ["192.168.1.20", "10.8.0.2", "169.254.3.4", "172.17.0.1"]);
        assert_eq!(ips("[::]:1"), ["192.168.1.20", "10.8.0.2", "169.254.3.4", "172.17.0.1", "2001:db8::5"]);
        assert!(select("0.0.0.0:1".parse().unwrap(), vec![lo, lo6, down]).is_empty());
    }

    #[test]
    fn hosted_reflector_serves_until_stopped() {
        let config = UdpReflectorConfig { listen: "0.0.0.0:0".parse().unwrap(), ..Default::default() };
        let host = HostedReflector::start(config).unwrap();
        let port = host.local_addr().port();
        assert_ne!(port, 0);
        assert!(host.is_running());
        assert_eq!(host.local_client_addr(), SocketAddr::from(([127, 0, 0, 1], port)));
        assert_eq!(host.link_addr(), host.reachable_addresses().first().copied().unwrap_or(host.local_client_addr()));
        assert!(host.reachable_addresses().iter().all(|a| a.port() == port && !a.ip().is_loopback()));
        host.stop();
        // The socket is closed: the port can be bound again.
        std::net::UdpSocket::bind(("0.0.0.0", port)).unwrap();
    }
}
