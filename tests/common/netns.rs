//! Two network namespaces joined by a veth pair: two "machines" on one LAN, for tests that must
//! cross a real network interface (not loopback). Needs root and `ip` (iproute2).
//!
//! Tests that use it fail with a clear message when either is missing, unless `SYNQ_SKIP_NETNS=1`
//! is set (then [`Lan::create`] returns `None` and the test returns early).

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

/// The environment variable that lets tests needing namespaces pass where they cannot run.
pub const SKIP_VAR: &str = "SYNQ_SKIP_NETNS";

/// Two namespaces, `a` and `b`, each with loopback up and one end of a veth pair, addressed
/// `a_ip`/24 and `b_ip`/24. Everything is deleted when dropped (also when the test panicked).
pub struct Lan {
    /// The first namespace's name.
    pub a: String,
    /// The second namespace's name.
    pub b: String,
    /// The address of the veth end in `a`.
    pub a_ip: Ipv4Addr,
    /// The address of the veth end in `b`.
    pub b_ip: Ipv4Addr,
    /// The veth end created as `a`'s, in the initial namespace until moved (deleted on drop in
    /// case creation stopped half-way).
    veth_a: String,
    /// Whether each namespace was created (only those are deleted).
    made: Vec<String>,
}

/// Runs `ip` with `args`; the error carries its stderr.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `ip {}`: {e}", args.join(" ")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Why namespaces cannot be made here (not root, no `ip`), if they cannot.
fn missing_requirement() -> Option<String> {
    let euid = std::fs::read_to_string("/proc/self/status").ok().and_then(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1)?.parse::<u32>().ok())
    });
    match euid {
        Some(0) => {}
        Some(uid) => return Some(format!("network namespaces need root (running as uid {uid})")),
        None => return Some("network namespaces need Linux with /proc (cannot tell the user id)".into()),
    }
    match Command::new("ip").arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status() {
        Ok(status) if status.success() => None,
        Ok(status) => Some(format!("`ip -V` failed ({status}): install iproute2")),
        Err(e) => Some(format!("the `ip` command (iproute2) is missing: {e}")),
    }
}

/// Fails the test with `why`, or returns `None` when [`SKIP_VAR`] is `1`.
fn cannot<T>(why: &str) -> Option<T> {
    if std::env::var(SKIP_VAR).as_deref() == Ok("1") {
        eprintln!("skipped: {why} ({SKIP_VAR}=1)");
        return None;
    }
    panic!("{why}. This test needs root and iproute2's `ip` to make network namespaces; set {SKIP_VAR}=1 to skip it.");
}

impl Lan {
    /// Makes the namespaces and the link, named after `tag` and this process's id (so that
    /// concurrent runs do not collide). `None` when they cannot be made and [`SKIP_VAR`] is set.
    pub fn create(tag: &str) -> Option<Self> {
        if let Some(why) = missing_requirement() {
            return cannot(&why);
        }
        let pid = std::process::id();
        let subnet = (pid % 250) as u8 + 1;
        let mut lan = Self {
            a: format!("synq-{tag}-{pid}-a"),
            b: format!("synq-{tag}-{pid}-b"),
            a_ip: Ipv4Addr::new(10, 77, subnet, 1),
            b_ip: Ipv4Addr::new(10, 77, subnet, 2),
            // Interface names have at most 15 bytes.
            veth_a: format!("sq{pid}a"),
            made: Vec::new(),
        };
        match lan.build() {
            Ok(()) => Some(lan),
            Err(why) => cannot(&format!("cannot set up the network namespaces: {why}")),
        }
    }

    fn build(&mut self) -> Result<(), String> {
        let veth_b = format!("sq{}b", std::process::id());
        for ns in [self.a.clone(), self.b.clone()] {
            ip(&["netns", "add", &ns])?;
            self.made.push(ns);
        }
        ip(&["link", "add", &self.veth_a, "type", "veth", "peer", "name", &veth_b])?;
        for (ns, veth, addr) in [(&self.a, &self.veth_a, self.a_ip), (&self.b, &veth_b, self.b_ip)] {
            ip(&["link", "set", veth, "netns", ns])?;
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", veth])?;
            ip(&["-n", ns, "link", "set", veth, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// A command that runs `program` inside the namespace `ns`.
    pub fn command(ns: &str, program: &std::path::Path) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", ns]).arg(program);
        command
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end inside it, and so the pair; the veth is
        // deleted by name too in case it was never moved.
        let _ = ip(&["link", "del", &self.veth_a]);
        for ns in self.made.drain(..) {
            if let Err(e) = ip(&["netns", "del", &ns]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}
