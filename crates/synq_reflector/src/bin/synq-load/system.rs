//! What the tool reads from the operating system: CPU time and memory of a process, the machine's
//! load and UDP counters (Linux `/proc`), and the open-file limit.

/// utime + stime of a process, in seconds (Linux /proc); `pid` may be `"self"`.
pub(crate) fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    #[cfg(unix)]
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    #[cfg(not(unix))]
    let hz = 100.0;
    Some(ticks as f64 / hz)
}

/// A process's resident memory, in KiB (Linux /proc/PID/status).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Memory {
    /// Resident now (`VmRSS`).
    pub(crate) rss_kib: u64,
    /// The most it was ever resident (`VmHWM`, the high-water mark).
    pub(crate) peak_kib: u64,
}

/// Reads `pid`'s resident memory.
pub(crate) fn memory(pid: &str) -> Option<Memory> {
    parse_status(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// The `VmRSS` and `VmHWM` lines of a `/proc/PID/status` text (values in kB).
fn parse_status(status: &str) -> Option<Memory> {
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))?;
        let mut words = line.split_whitespace();
        let value = words.next()?.parse().ok()?;
        (words.next()? == "kB").then_some(value)
    };
    Some(Memory { rss_kib: field("VmRSS")?, peak_kib: field("VmHWM")? })
}

/// (busy, total) jiffies of the whole machine (Linux /proc/stat).
pub(crate) fn machine_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let values: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let total: u64 = values.iter().take(8).sum();
    let idle = values.get(3)? + values.get(4).unwrap_or(&0);
    Some((total - idle, total))
}

/// The machine's UDP counters (Linux /proc/net/snmp): datagrams in, out, and dropped for a full
/// receive buffer.
pub(crate) fn udp_counters() -> Option<[u64; 3]> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut lines = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (lines.next()?, lines.next()?);
    let find = |name: &str| -> Option<u64> {
        let i = names.split_whitespace().position(|n| n == name)?;
        values.split_whitespace().nth(i)?.parse().ok()
    };
    Some([find("InDatagrams")?, find("OutDatagrams")?, find("RcvbufErrors")?])
}

/// The machine's load average (1, 5, 15 minutes) as /proc/loadavg writes it.
pub(crate) fn loadavg() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(text.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

/// Logical CPUs available to the tool.
pub(crate) fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Raises the soft limit on open files to the hard limit (every client holds a socket, and a
/// spawned reflector inherits the limit); returns the limit now in force (`None`: no limit known).
pub(crate) fn raise_open_files_limit() -> Result<Option<u64>, String> {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: `limit` is valid for the call.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
            return Err(format!("getrlimit(RLIMIT_NOFILE): {}", std::io::Error::last_os_error()));
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            // SAFETY: `raised` is valid for the call; raising the soft limit up to the hard one is
            // always allowed.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
                return Err(format!("setrlimit(RLIMIT_NOFILE): {}", std::io::Error::last_os_error()));
            }
            limit = raised;
        }
        #[allow(clippy::unnecessary_cast, reason = "rlim_t is not u64 on every Unix")]
        Ok((limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur as u64))
    }
    #[cfg(not(unix))]
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_gives_rss_and_high_water_mark() {
        let status =
            "Name:\tsynq-reflector\nVmPeak:\t  123456 kB\nVmHWM:\t    9876 kB\nVmRSS:\t    5432 kB\nThreads:\t1\n";
        assert_eq!(parse_status(status), Some(Memory { rss_kib: 5432, peak_kib: 9876 }));
    }

    #[test]
    fn status_without_memory_lines_or_with_odd_units_gives_nothing() {
        // A kernel thread has no Vm* lines.
        assert_eq!(parse_status("Name:\tkthreadd\nState:\tS (sleeping)\n"), None);
        assert_eq!(parse_status("VmHWM:\t9876 kB\nVmRSS:\t5432 MB\n"), None);
        assert_eq!(parse_status("VmHWM:\t9876 kB\nVmRSS:\tmany kB\n"), None);
        // `VmRSSx` is not `VmRSS`.
        assert_eq!(parse_status("VmHWM:\t9876 kB\nVmRSSx:\t5432 kB\n"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_has_resident_memory() {
        let memory = memory("self").expect("Linux /proc/self/status");
        assert!(memory.rss_kib > 0 && memory.peak_kib >= memory.rss_kib, "{memory:?}");
    }
}
