//! Which worker of a pool claims which run, so that workers racing on one pool do not all
//! propose Pending for every run.
//!
//! Prefect's workers race: each one polls, and each proposes Pending for every run it found;
//! the server accepts one and rejects the others (`prefect/workers/base.py:
//! BaseWorker._propose_pending_state`). With four workers a run costs three rejected proposals,
//! and the server pays for each. Cohort's workers agree on an owner per run instead, with no
//! message between them: rendezvous hashing of the run id over the names of the pool's workers
//! this worker knows (the server's list of online workers, and the workers seen submitting runs
//! of the pool). The owner claims the run as soon as it sees it; the others defer theirs by
//! [`DEFER`], and claim it then only if nobody has (the owner may be gone, busy at its
//! `--limit`, or a worker that does not take part, such as Prefect's own). An owner seen
//! submitting in that time is at work on its share, and gets it once more; so does, once, an
//! owner whose run came due while a burst was being scheduled (it held its poll until the
//! burst was over, `crate::burst`).
//!
//! Only the cost depends on it, never correctness: two workers with different views may both
//! claim a run (the server still accepts one), or both defer it (it is claimed [`DEFER`] later).
//!
//! A worker that says it stopped (`prefect.worker.stopped`) owns nothing from then on, though
//! the server lists it online for a while yet (until its last heartbeat is three intervals old,
//! `prefect/server/models/workers.py`): its runs would otherwise wait [`DEFER`] each. It takes
//! part again once it says it started, or is seen submitting. So does an owner that let a run
//! pass: it does not take part (Prefect's own worker on the pool), or no longer runs without
//! having said so, and the server's list of online workers, read again, does not bring it back
//! until [`FORGOTTEN`] has passed.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;
use uuid::Uuid;

/// How long a worker that does not own a run waits for its owner to claim it.
pub const DEFER: Duration = Duration::from_secs(3);

/// The same on an idle pool (a run scheduled with no other for a while): there its owner
/// claims at once (pickup takes about 100 ms), so a run still scheduled after this is one its
/// owner will not claim.
pub const DEFER_IDLE: Duration = Duration::from_secs(1);

/// A peer not heard of (listed online, or seen submitting) for this long is forgotten.
const FORGOTTEN: Duration = Duration::from_secs(120);

/// The pool's list of online workers is read again when it is older than this, at the next
/// poll that finds runs (never on an idle pool).
pub const RELIST: Duration = Duration::from_secs(60);

/// The list read at start is read again this long after, whether or not runs came: workers
/// starting beside this one have heartbeated by then, and runs created later (a burst) do
/// not find the read in their midst.
pub const START_RELIST: Duration = Duration::from_secs(2);

/// The workers of a pool this worker knows of, itself included.
#[derive(Debug)]
pub struct Peers {
    me: String,
    /// Other workers, by name, with when they were last listed online or seen submitting.
    others: HashMap<String, Instant>,
    /// Workers that said they stopped or let a run of theirs pass, with when: the server's
    /// list of online workers does not bring them back until [`FORGOTTEN`] has passed.
    left_out: HashMap<String, Instant>,
    /// Other workers, by name, with when they were last seen starting or submitting a run.
    active: HashMap<String, Instant>,
    listed: Option<Instant>,
}

impl Peers {
    pub fn new(me: impl Into<String>) -> Self {
        Self {
            me: me.into(),
            others: HashMap::new(),
            left_out: HashMap::new(),
            active: HashMap::new(),
            listed: None,
        }
    }

    /// The server's list of online workers was read: `names` are online (this worker among
    /// them, or not yet).
    pub fn listed<'a>(&mut self, names: impl IntoIterator<Item = &'a str>, now: Instant) {
        self.listed = Some(now);
        self.left_out
            .retain(|_, at| now.saturating_duration_since(*at) < FORGOTTEN);
        for name in names {
            if !self.left_out.contains_key(name) && name != self.me {
                self.others.insert(name.to_owned(), now);
            }
        }
    }

    /// The list read as this worker starts: workers starting beside it may not be on it yet,
    /// so it is read again [`START_RELIST`] later, or at the first poll that finds runs if
    /// that comes first, whatever its age.
    pub fn listed_at_start<'a>(&mut self, names: impl IntoIterator<Item = &'a str>, now: Instant) {
        self.listed(names, now);
        self.listed = None;
    }

    /// Whether the list of online workers should be read again.
    pub fn relist_due(&self, now: Instant) -> bool {
        self.listed
            .is_none_or(|at| now.saturating_duration_since(at) >= RELIST)
    }

    /// A worker was seen submitting a run of the pool, or starting.
    pub fn seen(&mut self, name: &str, now: Instant) {
        if name != self.me {
            self.left_out.remove(name);
            self.others.insert(name.to_owned(), now);
            self.active.insert(name.to_owned(), now);
        }
    }

    /// Whether `name` was seen starting or submitting a run within `window` before `now`: a
    /// worker at work on a burst's runs, which may not have come to all of its share yet.
    pub fn active_within(&self, name: &str, window: Duration, now: Instant) -> bool {
        self.active
            .get(name)
            .is_some_and(|at| now.saturating_duration_since(*at) <= window)
    }

    /// A worker said it stopped: it owns nothing until it is seen again.
    pub fn stopped(&mut self, name: &str, now: Instant) {
        self.absent(name, now);
        self.active.remove(name);
    }

    /// The owner of a run did not claim it within [`DEFER`]: it does not take part (or no
    /// longer runs), so it owns nothing until it is seen submitting again, whatever the
    /// server's list says.
    pub fn absent(&mut self, name: &str, now: Instant) {
        if name != self.me {
            self.others.remove(name);
            self.left_out.insert(name.to_owned(), now);
        }
    }

    /// Whether `name` is one of the workers sharing the pool's runs (not left out).
    pub fn takes_part(&self, name: &str) -> bool {
        self.others.contains_key(name)
    }

    /// How many workers share the pool's runs, this one included.
    pub fn count(&mut self, now: Instant) -> usize {
        self.others
            .retain(|_, at| now.saturating_duration_since(*at) < FORGOTTEN);
        self.active
            .retain(|_, at| now.saturating_duration_since(*at) < FORGOTTEN);
        1 + self.others.len()
    }

    /// The worker that claims `run` first: the highest score among the known workers.
    pub fn owner(&mut self, run: Uuid, now: Instant) -> &str {
        self.count(now);
        let mut best = (score(run, &self.me), self.me.as_str());
        for name in self.others.keys() {
            let s = score(run, name);
            if (s, name.as_str()) > best {
                best = (s, name.as_str());
            }
        }
        best.1
    }

    #[cfg(test)]
    pub fn owns(&mut self, run: Uuid, now: Instant) -> bool {
        let me = self.me.clone();
        self.owner(run, now) == me
    }
}

/// A hash of (run, worker) that every worker computes alike, whatever its build: FNV-1a over
/// both, then a finalizer that spreads the bits (splitmix64's). `std`'s hasher may change
/// between Rust releases, and workers of different builds must agree.
fn score(run: Uuid, worker: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in run.as_bytes().iter().chain(worker.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<Uuid> {
        (0..n as u128).map(Uuid::from_u128).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn alone_owns_everything() {
        let mut peers = Peers::new("a");
        let now = Instant::now();
        assert!(ids(50).into_iter().all(|id| peers.owns(id, now)));
        assert_eq!(peers.count(now), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn every_run_has_exactly_one_owner_and_the_share_is_even() {
        let names = ["w1", "w2", "w3", "w4"];
        let now = Instant::now();
        let mut views: Vec<Peers> = names
            .iter()
            .map(|me| {
                let mut p = Peers::new(*me);
                p.listed(names, now);
                p
            })
            .collect();
        let mut owned = [0usize; 4];
        for id in ids(4000) {
            let owners: Vec<usize> = (0..4).filter(|i| views[*i].owns(id, now)).collect();
            assert_eq!(owners.len(), 1, "run {id} owned by {owners:?}");
            owned[owners[0]] += 1;
        }
        for n in owned {
            assert!((800..1200).contains(&n), "uneven shares: {owned:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn peers_are_forgotten_and_absent_owners_dropped() {
        let mut peers = Peers::new("a");
        let now = Instant::now();
        peers.seen("b", now);
        peers.seen("a", now);
        assert_eq!(peers.count(now), 2);
        let of_b = ids(100)
            .into_iter()
            .find(|id| peers.owner(*id, now) == "b")
            .expect("b owns some run");
        peers.absent("b", now);
        assert!(peers.owns(of_b, now));
        // Still listed online by the server (Prefect's own worker, or one killed): not taken
        // back, until forgotten.
        peers.listed(["a", "b"], now + RELIST);
        assert!(peers.owns(of_b, now + RELIST));
        let later = now + FORGOTTEN;
        peers.listed(["a", "b"], later);
        assert!(!peers.owns(of_b, later));
        // Seen submitting: taken back at once.
        peers.absent("b", later);
        peers.seen("b", later);
        assert!(!peers.owns(of_b, later));
        assert_eq!(peers.count(later + FORGOTTEN), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopped_worker_owns_nothing_until_it_starts_again() {
        let mut peers = Peers::new("a");
        let now = Instant::now();
        peers.listed(["a", "b"], now);
        let of_b = ids(100)
            .into_iter()
            .find(|id| peers.owner(*id, now) == "b")
            .expect("b owns some run");
        peers.stopped("b", now);
        assert!(peers.owns(of_b, now));
        // Still listed online by the server: not taken back.
        let later = now + RELIST;
        peers.listed(["a", "b"], later);
        assert!(peers.owns(of_b, later));
        assert_eq!(peers.count(later), 1);
        // Started again under the same name.
        peers.seen("b", later);
        assert!(!peers.owns(of_b, later));
        // A stop long ago no longer hides a worker the server lists.
        peers.stopped("b", later);
        let much_later = later + FORGOTTEN;
        peers.listed(["a", "b"], much_later);
        assert!(!peers.owns(of_b, much_later));
    }

    #[tokio::test(start_paused = true)]
    async fn relisting_is_due_at_first_and_after_a_while() {
        let mut peers = Peers::new("a");
        let now = Instant::now();
        assert!(peers.relist_due(now));
        peers.listed_at_start(["a", "b"], now);
        assert_eq!(peers.count(now), 2);
        assert!(peers.relist_due(now), "the start's list is read again");
        peers.listed(["a", "b"], now);
        assert!(!peers.relist_due(now + RELIST / 2));
        assert!(peers.relist_due(now + RELIST));
    }

    #[test]
    fn score_is_stable_across_builds() {
        // Computed by an independent implementation of the same function: workers of different
        // releases must rank runs alike.
        assert_eq!(score(Uuid::nil(), "w"), score(Uuid::nil(), "w"));
        assert_ne!(score(Uuid::nil(), "w1"), score(Uuid::nil(), "w2"));
        assert_eq!(score(Uuid::from_u128(1), "worker"), 0xd8f1_d2f7_39d4_c0a6);
    }
}
