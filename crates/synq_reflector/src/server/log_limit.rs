//! Counted, rate-limited log lines for what an attacker can make happen at line rate (malformed
//! datagrams, packets netcode refuses, refused connections): one line per cause per interval
//! instead of one per datagram.
//!
//! renetcode logs an error for every packet it refuses; the binary silences it
//! (`renetcode=off`) and installs [`netcode_error_counter`] instead, which only counts those errors,
//! so that the transport can attribute them to the datagram it just handed over and report them
//! here.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[cfg(feature = "cli")]
use tracing::level_filters::LevelFilter;
#[cfg(feature = "cli")]
use tracing::{Event, Level, Metadata, Subscriber};
#[cfg(feature = "cli")]
use tracing_subscriber::{
    filter::filter_fn,
    layer::{Context, Layer},
    registry::LookupSpan,
};

/// How often a cause is reported at most.
pub(crate) const REPORT_EVERY: Duration = Duration::from_secs(10);

/// Distinct addresses remembered per cause and interval: past this, the line says "at least".
const MAX_ADDRESSES: usize = 1024;

/// Errors and warnings renetcode logged since start, counted by [`netcode_error_counter`].
static NETCODE_ERRORS: AtomicU64 = AtomicU64::new(0);

/// How many errors and warnings renetcode logged so far (zero unless [`netcode_error_counter`] is
/// installed).
pub(crate) fn netcode_errors() -> u64 {
    NETCODE_ERRORS.load(Ordering::Relaxed)
}

/// A [`tracing_subscriber`] layer that counts the errors and warnings renetcode logs (it logs one
/// for every packet it refuses) without formatting them, so that the UDP reflector can report
/// them as one counted line every few seconds. It carries its own filter: install it next to a
/// formatting layer whose filter silences `renetcode`, e.g.
///
/// ```
/// use tracing_subscriber::prelude::*;
///
/// let filter = tracing_subscriber::EnvFilter::new("info,renetcode=off");
/// let subscriber = tracing_subscriber::registry()
///     .with(tracing_subscriber::fmt::layer().with_filter(filter))
///     .with(synq_reflector::server::netcode_error_counter());
/// # drop(subscriber);
/// ```
#[cfg(feature = "cli")]
pub fn netcode_error_counter<S>() -> impl Layer<S> + Send + Sync + 'static
where
    S: Subscriber + for<'span> LookupSpan<'span>,
{
    let filter = filter_fn(|metadata: &Metadata<'_>| {
        *metadata.level() <= Level::WARN && metadata.target().starts_with("renetcode")
    })
    .with_max_level_hint(LevelFilter::WARN);
    NetcodeErrorCounter.with_filter(filter)
}

#[cfg(feature = "cli")]
struct NetcodeErrorCounter;

#[cfg(feature = "cli")]
impl<S: Subscriber> Layer<S> for NetcodeErrorCounter {
    fn on_event(&self, _: &Event<'_>, _: Context<'_, S>) {
        NETCODE_ERRORS.fetch_add(1, Ordering::Relaxed);
    }
}

struct Cause {
    what: &'static str,
    count: u64,
    addresses: HashSet<IpAddr>,
    since: Instant,
}

/// Counts occurrences per cause and source address, and logs each cause at most once per
/// interval: the first occurrence at once, then a summary of what followed.
pub(crate) struct LogLimit {
    interval: Duration,
    causes: Vec<Cause>,
    /// When each cause was last logged.
    logged: Vec<(&'static str, Instant)>,
}

impl LogLimit {
    pub fn new(interval: Duration) -> Self {
        Self { interval, causes: Vec::new(), logged: Vec::new() }
    }

    /// Counts one occurrence of `what` (a short phrase such as "malformed datagrams dropped (too
    /// short)") from `addr`, and logs if the interval allows.
    pub fn record(&mut self, what: &'static str, addr: IpAddr, now: Instant) {
        let index = match self.causes.iter().position(|c| c.what == what) {
            Some(index) => index,
            None => {
                self.causes.push(Cause { what, count: 0, addresses: HashSet::new(), since: now });
                self.causes.len() - 1
            }
        };
        let cause = &mut self.causes[index];
        cause.count += 1;
        if cause.addresses.len() < MAX_ADDRESSES {
            cause.addresses.insert(addr);
        }
        if self.due(what, now) {
            let cause = self.causes.swap_remove(index);
            self.log(cause, now);
        }
    }

    /// Logs the causes whose interval has passed since they were last logged.
    pub fn poll(&mut self, now: Instant) {
        if self.causes.is_empty() {
            return;
        }
        let mut i = 0;
        while i < self.causes.len() {
            if self.due(self.causes[i].what, now) {
                let cause = self.causes.swap_remove(i);
                self.log(cause, now);
            } else {
                i += 1;
            }
        }
    }

    fn due(&self, what: &'static str, now: Instant) -> bool {
        self.logged
            .iter()
            .find(|(w, _)| *w == what)
            .is_none_or(|(_, at)| now.saturating_duration_since(*at) >= self.interval)
    }

    fn log(&mut self, cause: Cause, now: Instant) {
        let addresses = cause.addresses.len();
        let at_least = if addresses >= MAX_ADDRESSES { "at least " } else { "" };
        let seconds = now.saturating_duration_since(cause.since).as_secs_f64();
        tracing::warn!(
            "{} {}, from {at_least}{addresses} address{} in {seconds:.1} s",
            cause.count,
            cause.what,
            if addresses == 1 { "" } else { "es" },
        );
        match self.logged.iter_mut().find(|(w, _)| *w == cause.what) {
            Some(entry) => entry.1 = now,
            None => self.logged.push((cause.what, now)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_the_first_occurrence_then_once_per_interval() {
        let start = Instant::now();
        let addr: IpAddr = [127, 0, 0, 1].into();
        let mut limit = LogLimit::new(Duration::from_secs(10));
        limit.record("things", addr, start);
        assert!(limit.causes.is_empty(), "the first one is logged at once");
        for i in 0..1000 {
            limit.record("things", addr, start + Duration::from_millis(i));
        }
        limit.record("other things", addr, start);
        assert_eq!(limit.causes.len(), 1, "another cause has its own interval");
        limit.poll(start + Duration::from_secs(5));
        assert_eq!(limit.causes[0].count, 1000);
        limit.poll(start + Duration::from_secs(10));
        assert!(limit.causes.is_empty());
    }
}
