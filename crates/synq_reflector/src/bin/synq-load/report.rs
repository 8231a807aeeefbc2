//! The figures of one run, and how they are printed.

use std::path::PathBuf;
use std::time::Duration;

use crate::client::ThreadStats;
use crate::system::{Memory, cpus};

/// Latency percentiles over the window's fully delivered events, in ms.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Latency {
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
}

impl Latency {
    /// The percentiles of `latencies` (ns; nearest rank); `None` when there are none.
    pub(crate) fn of(mut latencies: Vec<u64>) -> Option<Self> {
        latencies.sort_unstable();
        let last = *latencies.last()?;
        let pct = |p: f64| {
            let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
            ms(latencies[i])
        };
        Some(Self { p50: pct(0.50), p99: pct(0.99), max: ms(last) })
    }
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// What one run measured.
pub(crate) struct Report {
    pub(crate) sessions: u32,
    pub(crate) clients: u32,
    pub(crate) rate: f64,
    pub(crate) payload_bytes: u32,
    pub(crate) warmup: f64,
    /// The measured window, seconds.
    pub(crate) secs: f64,
    pub(crate) connect_time: Duration,
    /// Events sent in the window.
    pub(crate) sent: u64,
    /// Their deliveries (events × receivers that got them).
    pub(crate) deliveries: u64,
    /// Events of the window that some receiver never got.
    pub(crate) incomplete: u64,
    pub(crate) latency: Option<Latency>,
    pub(crate) stats: ThreadStats,
    /// The reflector's CPU seconds over the window.
    pub(crate) reflector_cpu: Option<f64>,
    /// The tool's own CPU seconds over the window.
    pub(crate) tool_cpu: Option<f64>,
    /// The whole machine's busy share over the window, %.
    pub(crate) machine_busy: Option<f64>,
    /// The machine's UDP datagrams in, out and dropped (receive buffer full) over the window.
    pub(crate) udp: Option<[u64; 3]>,
    pub(crate) loadavg: Option<String>,
    /// The reflector's memory before any client connected.
    pub(crate) memory_before: Option<Memory>,
    /// … once every client had joined and the warm-up passed (the window's start).
    pub(crate) memory_settled: Option<Memory>,
    /// … at the window's end.
    pub(crate) memory_end: Option<Memory>,
    /// Its high-water mark (VmHWM) after the drain, KiB.
    pub(crate) memory_peak: Option<u64>,
    /// Instructions the reflector executed in the window (`--callgrind`).
    pub(crate) instructions: Option<Result<u64, String>>,
    /// Callgrind's file for the window (`--callgrind`).
    pub(crate) callgrind_file: Option<PathBuf>,
    /// How a spawned reflector ended.
    pub(crate) reflector_exit: Option<String>,
}

impl Report {
    /// No events: the run measures what idle sessions cost.
    pub(crate) fn idle(&self) -> bool {
        self.rate == 0.0
    }

    /// Errors reported by the reflector (all codes).
    pub(crate) fn errors(&self) -> u64 {
        self.stats.errors.values().sum()
    }

    /// The load was sustained: every event of the window reached every receiver, no errors, no
    /// disconnections (and, unless idle, something was sent).
    pub(crate) fn clean(&self) -> bool {
        self.incomplete == 0 && self.errors() == 0 && self.stats.disconnected == 0 && (self.sent > 0 || self.idle())
    }

    /// Why the run was not clean, e.g. `12 incomplete, 3 errors`.
    pub(crate) fn problems(&self) -> String {
        let mut problems = Vec::new();
        if self.sent == 0 && !self.idle() {
            problems.push("nothing sent".to_string());
        }
        if self.incomplete > 0 {
            problems.push(format!("{} incomplete", self.incomplete));
        }
        if self.errors() > 0 {
            let codes: Vec<String> = self.stats.errors.iter().map(|(code, n)| format!("{n}× {code}")).collect();
            problems.push(format!("errors: {}", codes.join(", ")));
        }
        if self.stats.disconnected > 0 {
            problems.push(format!("{} disconnected", self.stats.disconnected));
        }
        problems.join(", ")
    }

    pub(crate) fn delivered_per_second(&self) -> f64 {
        self.deliveries as f64 / self.secs
    }

    /// The reflector's CPU over the window, % of one core.
    pub(crate) fn reflector_cpu_percent(&self) -> Option<f64> {
        self.reflector_cpu.map(|c| c / self.secs * 100.0)
    }

    /// Reflector CPU µs per delivered message.
    pub(crate) fn us_per_delivery(&self) -> Option<f64> {
        self.reflector_cpu.filter(|_| self.deliveries > 0).map(|c| c * 1e6 / self.deliveries as f64)
    }

    /// What each session added to the reflector's resident memory once joined, KiB
    /// (settled − before, over the sessions; negative when the reflector returned memory).
    pub(crate) fn rss_per_session_kib(&self) -> Option<f64> {
        let (before, settled) = (self.memory_before?, self.memory_settled?);
        Some((settled.rss_kib as f64 - before.rss_kib as f64) / self.sessions as f64)
    }

    /// Instructions in the window per delivered message.
    pub(crate) fn instructions_per_delivery(&self) -> Option<f64> {
        match &self.instructions {
            Some(Ok(ir)) if self.deliveries > 0 => Some(*ir as f64 / self.deliveries as f64),
            _ => None,
        }
    }

    /// Instructions in the window per session and second.
    pub(crate) fn instructions_per_session_second(&self) -> Option<f64> {
        match &self.instructions {
            Some(Ok(ir)) => Some(*ir as f64 / self.sessions as f64 / self.secs),
            _ => None,
        }
    }

    /// The one-line summary (everything measured).
    pub(crate) fn summary_line(&self) -> String {
        let secs = self.secs;
        let pct = |v: Option<f64>| v.map_or("n/a".to_string(), |c| format!("{:.0} %", c / secs * 100.0));
        let latency = self
            .latency
            .map_or("n/a".to_string(), |l| format!("p50 {:.3} ms p99 {:.3} ms max {:.3} ms", l.p50, l.p99, l.max));
        let expected_rate = self.sessions as f64 * self.clients as f64 * self.rate * self.clients as f64;
        let udp = self.udp.map_or("n/a".to_string(), |[i, o, d]| {
            format!("{:.0} in/s, {:.0} out/s, {d} dropped (receive buffer full)", i as f64 / secs, o as f64 / secs)
        });
        let mb = |m: Option<Memory>| m.map_or("n/a".to_string(), |m| format!("{:.1} MB", m.rss_kib as f64 / 1024.0));
        let memory = format!(
            "reflector RSS {} before clients, {} joined, {} at the end, peak {}{}",
            mb(self.memory_before),
            mb(self.memory_settled),
            mb(self.memory_end),
            self.memory_peak.map_or("n/a".to_string(), |k| format!("{:.1} MB", k as f64 / 1024.0)),
            self.rss_per_session_kib().map_or(String::new(), |k| format!(" ({k:.1} KiB per session)")),
        );
        let instructions = match &self.instructions {
            None => String::new(),
            Some(Err(e)) => format!(", instructions n/a ({e})"),
            Some(Ok(ir)) => format!(
                ", instructions in the window {ir} ({} per delivery, {:.0} per session-second; {})",
                self.instructions_per_delivery().map_or("n/a".to_string(), |v| format!("{v:.0}")),
                self.instructions_per_session_second().unwrap_or(f64::NAN),
                self.callgrind_file.as_ref().map_or(String::new(), |f| f.display().to_string()),
            ),
        };
        format!(
            "synq-load: S={} N={} E={}/s payload={}B {secs:.0}s (+{}s warm-up) on {} cpus: joined in {:.2?} ({} connection \
             attempts retried), sent {} ({:.0}/s), \
             delivered {} ({:.0}/s, {:.1} % of offered), latency {latency}, incomplete {}, errors {} {:?}, \
             disconnected {}, reflector CPU {} ({} µs/delivery), tool CPU {}, machine busy {}, max send lag {:.2?} \
             ({} sends > 1 ms late), snapshots {}, UDP datagrams (whole machine) {udp}, {memory}{instructions}, \
             reflector {}, loadavg before {}",
            self.sessions,
            self.clients,
            self.rate,
            self.payload_bytes,
            self.warmup,
            cpus(),
            self.connect_time,
            self.stats.connect_retries,
            self.sent,
            self.sent as f64 / secs,
            self.deliveries,
            self.delivered_per_second(),
            if expected_rate > 0.0 { self.delivered_per_second() / expected_rate * 100.0 } else { 100.0 },
            self.incomplete,
            self.errors(),
            self.stats.errors,
            self.stats.disconnected,
            pct(self.reflector_cpu),
            self.us_per_delivery().map_or("n/a".to_string(), |v| format!("{v:.2}")),
            pct(self.tool_cpu),
            self.machine_busy.map_or("n/a".to_string(), |b| format!("{b:.0} % of {} cpus", cpus())),
            self.stats.max_send_lag,
            self.stats.late_sends,
            self.stats.snapshots_uploaded,
            self.reflector_exit.as_deref().unwrap_or("not spawned"),
            self.loadavg.as_deref().unwrap_or("n/a"),
        )
    }

    /// The Markdown header of [`Report::table_row`].
    pub(crate) const TABLE_HEADER: &str = "| S | N | E/s | payload B | sent/s | delivered/s | p50 ms | p99 ms | max ms | reflector CPU | µs/delivery | tool CPU | incomplete | errors |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|";

    /// One Markdown table row (a single run's columns).
    pub(crate) fn table_row(&self) -> String {
        let secs = self.secs;
        let pct = |v: Option<f64>| v.map_or("n/a".to_string(), |c| format!("{:.0} %", c / secs * 100.0));
        let l = self.latency.unwrap_or(Latency { p50: f64::NAN, p99: f64::NAN, max: f64::NAN });
        format!(
            "| {} | {} | {} | {} | {:.0} | {:.0} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} | {} |",
            self.sessions,
            self.clients,
            self.rate,
            self.payload_bytes,
            self.sent as f64 / secs,
            self.delivered_per_second(),
            l.p50,
            l.p99,
            l.max,
            pct(self.reflector_cpu),
            self.us_per_delivery().map_or("n/a".to_string(), |v| format!("{v:.2}")),
            pct(self.tool_cpu),
            self.incomplete,
            self.errors() + self.stats.disconnected as u64,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        // 1..=100 ms: the 50th value is 50 ms, the 99th 99 ms.
        let latencies: Vec<u64> = (1..=100u64).rev().map(|v| v * 1_000_000).collect();
        assert_eq!(Latency::of(latencies), Some(Latency { p50: 50.0, p99: 99.0, max: 100.0 }));
        assert_eq!(Latency::of(vec![2_000_000]), Some(Latency { p50: 2.0, p99: 2.0, max: 2.0 }));
        assert_eq!(Latency::of(Vec::new()), None);
    }
}
