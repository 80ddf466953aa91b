//! Readings from `/proc`: a process's CPU time and resident memory, its process tree, and
//! a background sampler that records both over time.
//!
//! A worker's own CPU time is its process CPU clock (`clock_getcpuclockid(3)`: all its
//! threads, exited ones included, in nanoseconds), falling back to `utime + stime` of
//! `/proc/<pid>/stat`, which only counts whole clock ticks (10 ms): too coarse for Cohort's
//! start-up. For a tree it is the sum over the live processes of `utime + stime + cutime + cstime`: the
//! `c*` fields hold the CPU of children that process has already reaped (the `true`
//! commands of the burst, finished flow-run engines), and never that of live ones, so the
//! sum counts everything once. Resident memory is `VmRSS` of `/proc/<pid>/status`; a
//! tree's RSS is a plain sum, which counts pages shared between the processes (libc, the
//! Python interpreter) once per process. [`tree_pss_kib`] gives the proportional share
//! (`Pss` of `smaps_rollup`) for when that matters.

use std::collections::HashMap;
use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use chrono::{DateTime, Utc};

/// The fields of `/proc/<pid>/stat` the benchmarks use.
#[derive(Debug, Clone, Copy)]
pub struct Stat {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    /// `utime + stime`, in clock ticks.
    pub cpu_ticks: u64,
    /// `cutime + cstime` (reaped children), in clock ticks.
    pub child_cpu_ticks: u64,
    /// `true` for a zombie (`Z`): exited, not yet reaped.
    pub zombie: bool,
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on every Linux this runs on).
pub fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// Parse `/proc/<pid>/stat`; `None` when the process is gone.
pub fn stat(pid: i32) -> Option<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<Stat> {
    // `pid (comm) state ppid pgrp …`: comm may hold spaces and parentheses, so split at
    // the last `)`.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let pid = text[..open].trim().parse().ok()?;
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let field = |i: usize| -> Option<u64> { rest.get(i)?.parse().ok() };
    Some(Stat {
        pid,
        ppid: rest.get(1)?.parse().ok()?,
        pgid: rest.get(2)?.parse().ok()?,
        cpu_ticks: field(11)? + field(12)?,
        child_cpu_ticks: field(13)? + field(14)?,
        zombie: rest.first() == Some(&"Z"),
    })
}

/// CPU seconds of process `pid` from its CPU-time clock (ns resolution), if readable.
pub fn process_cpu_s(pid: i32) -> Option<f64> {
    use nix::time::{clock_getcpuclockid, clock_gettime};
    let clock = clock_getcpuclockid(nix::unistd::Pid::from_raw(pid)).ok()?;
    let t = clock_gettime(clock).ok()?;
    Some(t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
}

/// `VmRSS` and `VmHWM` (peak RSS) of `/proc/<pid>/status`, in KiB; `None` when gone
/// (zombies have neither).
pub fn rss_kib(pid: i32) -> Option<(u64, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some((kib("VmRSS:")?, kib("VmHWM:")?))
}

/// A numeric field of `/proc/<pid>/status` (`RssAnon`, `RssFile`, `Threads`, …), without
/// its unit.
pub fn status_field(pid: i32, key: &str) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `Pss` of `/proc/<pid>/smaps_rollup`, in KiB.
pub fn pss_kib(pid: i32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Resident memory by mapping (`/proc/<pid>/smaps`), in KiB, largest first: file-backed
/// mappings by file name, the others as `[heap]`, `[stack]`, `[anon]`.
pub fn rss_by_mapping(pid: i32) -> Vec<(String, u64)> {
    let Ok(text) = fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return Vec::new();
    };
    let mut by_name: HashMap<String, u64> = HashMap::new();
    let mut current = String::from("[anon]");
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            // `start-end perms offset dev inode [path]`
            let path: Vec<&str> = fields.skip(4).collect();
            current = match path.join(" ") {
                p if p.is_empty() => "[anon]".to_owned(),
                p => p.rsplit('/').next().unwrap_or(&p).to_owned(),
            };
        } else if first == "Rss:" {
            let kib: u64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            *by_name.entry(current.clone()).or_default() += kib;
        }
    }
    let mut out: Vec<(String, u64)> = by_name.into_iter().filter(|(_, k)| *k > 0).collect();
    out.sort_by_key(|(_, k)| std::cmp::Reverse(*k));
    out
}

/// `/proc/<pid>/cmdline`, arguments joined by spaces.
pub fn cmdline(pid: i32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// Every process on the machine (no `/proc/<pid>/task/*/children` on this kernel, so a
/// tree is found by scanning).
pub fn all() -> Vec<Stat> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(stat)
        .collect()
}

/// `root` (first) and all its live descendants; empty when `root` is gone.
pub fn tree(root: i32) -> Vec<Stat> {
    let procs = all();
    let mut children: HashMap<i32, Vec<usize>> = HashMap::new();
    let mut root_idx = None;
    for (i, p) in procs.iter().enumerate() {
        children.entry(p.ppid).or_default().push(i);
        if p.pid == root {
            root_idx = Some(i);
        }
    }
    let Some(root_idx) = root_idx else {
        return Vec::new();
    };
    let mut out = vec![procs[root_idx]];
    let mut next = 0;
    while next < out.len() {
        if let Some(kids) = children.get(&out[next].pid) {
            out.extend(kids.iter().map(|&i| procs[i]));
        }
        next += 1;
    }
    out
}

/// One reading of a worker and its tree.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Usage {
    /// CPU seconds of the worker process itself.
    pub worker_cpu_s: f64,
    /// CPU seconds of the whole tree (see the module doc).
    pub tree_cpu_s: f64,
    pub worker_rss_kib: u64,
    pub worker_hwm_kib: u64,
    pub tree_rss_kib: u64,
    /// Live processes in the tree, the worker included.
    pub tree_procs: usize,
}

/// Read the worker `pid` and its tree; `None` when the worker is gone.
pub fn usage(pid: i32) -> Option<Usage> {
    let procs = tree(pid);
    let root = procs.first()?;
    let ticks = clock_ticks();
    let root_ticks_s = root.cpu_ticks as f64 / ticks;
    // The clock is exact; the ticks are its value rounded down to 10 ms.
    let worker_cpu_s = process_cpu_s(pid)
        .filter(|c| *c + 0.011 >= root_ticks_s)
        .unwrap_or(root_ticks_s);
    let (worker_rss_kib, worker_hwm_kib) = rss_kib(pid).unwrap_or((0, 0));
    let tree_ticks: u64 = procs.iter().map(|p| p.cpu_ticks + p.child_cpu_ticks).sum();
    let tree_rss_kib = worker_rss_kib
        + procs[1..]
            .iter()
            .filter_map(|p| rss_kib(p.pid).map(|r| r.0))
            .sum::<u64>();
    Some(Usage {
        worker_cpu_s,
        // The worker's exact time stands in for its own ticks.
        tree_cpu_s: tree_ticks as f64 / ticks - root_ticks_s + worker_cpu_s,
        worker_rss_kib,
        worker_hwm_kib,
        tree_rss_kib,
        tree_procs: procs.iter().filter(|p| !p.zombie).count(),
    })
}

/// Proportional set size of the tree of `pid`, in KiB (shared pages split between the
/// processes that map them).
pub fn tree_pss_kib(pid: i32) -> u64 {
    tree(pid).iter().filter_map(|p| pss_kib(p.pid)).sum()
}

/// Live descendants of `pid` whose command line starts with `program` (e.g. the `sleep`
/// children of scenario 5).
pub fn count_descendants_running(pid: i32, program: &str) -> usize {
    tree(pid)
        .iter()
        .skip(1)
        .filter(|p| !p.zombie)
        .filter(|p| {
            cmdline(p.pid)
                .split_whitespace()
                .next()
                .is_some_and(|a| a == program || a.ends_with(&format!("/{program}")))
        })
        .count()
}

/// A thread reading [`usage`] of one process every `every` until stopped.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<(DateTime<Utc>, Usage)>>,
}

impl Sampler {
    pub fn start(pid: i32, every: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = thread::spawn(move || {
            let mut samples = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let now = Utc::now();
                match usage(pid) {
                    Some(u) => samples.push((now, u)),
                    None => break,
                }
                thread::sleep(every);
            }
            samples
        });
        Sampler { stop, handle }
    }

    /// Stop and return the samples, oldest first.
    pub fn finish(self) -> Vec<(DateTime<Utc>, Usage)> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

/// The first sample taken at or after `t` (the last one if all are earlier).
pub fn sample_at(samples: &[(DateTime<Utc>, Usage)], t: DateTime<Utc>) -> Option<Usage> {
    samples
        .iter()
        .find(|(when, _)| *when >= t)
        .or(samples.last())
        .map(|(_, u)| *u)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_and_parens_in_comm() {
        let line = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 7 3 11 2 20 0 1 0 \
                    100 1000 50 18446744073709551615";
        let s = parse_stat(line).unwrap();
        assert_eq!((s.pid, s.ppid, s.pgid), (4242, 1, 4242));
        assert_eq!((s.cpu_ticks, s.child_cpu_ticks), (10, 13));
        assert!(!s.zombie);
    }

    #[test]
    fn cpu_clock_of_self_is_fine_grained() {
        let me = std::process::id() as i32;
        let a = process_cpu_s(me).unwrap();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        let b = process_cpu_s(me).unwrap();
        assert!(b > a, "{a} {b}");
    }

    #[test]
    fn own_tree_has_self_first() {
        let me = std::process::id() as i32;
        let t = tree(me);
        assert_eq!(t.first().map(|s| s.pid), Some(me));
        assert!(usage(me).unwrap().worker_rss_kib > 0);
        assert!(!rss_by_mapping(me).is_empty());
    }
}
