//! Supervision of the long-lived background tasks (the worker channel and its heartbeats, the
//! cancel and wake watchers, the health server, the event emitter): each runs under a
//! [`Supervisor`] that restarts it, with jittered exponential backoff, whenever it ends or
//! panics before its stop token is cancelled, logs an error naming it (with the panic message),
//! and keeps a health record the `/livez` and `/readyz` probes read
//! (the worker's health endpoints). Without this, a task that died was noticed only at shutdown, and the
//! worker went on claiming runs while silently no longer heartbeating or hearing
//! cancellations ("liveness without progress").
//!
//! What a task's state means for the probes is its [`Role`]; a task that keeps dying (it has
//! failed [`Policy::crash_loop_after`] times in a row without running
//! [`Policy::healthy_after`] in between) makes `/livez` fail whatever its role, so an
//! orchestrator restarts the process.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cohort_api::retry::Backoff;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What a task being down means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The process cannot do its job without it, and would lose work (the event emitter):
    /// `/livez` and `/readyz` fail while it is down.
    Vital,
    /// The worker cannot do its whole job without it for now (heartbeats, hearing
    /// cancellations): `/readyz` fails while it is down.
    Ready,
    /// Helps, but the worker does its job without it (event-driven pickup, which the poll
    /// backs up; the health server itself): only a crash loop shows.
    Helper,
}

/// Restart timing.
#[derive(Debug, Clone)]
pub struct Policy {
    /// First restart delay (before jitter); doubles with each failure in a row.
    pub backoff_base: Duration,
    /// Longest restart delay.
    pub backoff_cap: Duration,
    /// A run this long resets the backoff and the count of failures in a row.
    pub healthy_after: Duration,
    /// This many failures in a row is a crash loop: `/livez` fails.
    pub crash_loop_after: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(30),
            healthy_after: Duration::from_secs(60),
            crash_loop_after: 5,
        }
    }
}

/// One task's health record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskHealth {
    pub role: Role,
    /// Set while the task is down, waiting for its restart: since when.
    pub down_since: Option<Instant>,
    /// Restarts so far.
    pub restarts: u32,
    /// Failures since the task last ran for [`Policy::healthy_after`].
    pub failures_in_a_row: u32,
    /// How it last ended ("panicked: …", "ended").
    pub last_failure: Option<String>,
}

/// The health of every supervised task, shared with the probes; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Health {
    tasks: Arc<Mutex<BTreeMap<&'static str, TaskHealth>>>,
    crash_loop_after: u32,
}

impl Health {
    /// A copy of the record of `name`, if it is supervised.
    pub fn task(&self, name: &str) -> Option<TaskHealth> {
        self.lock().get(name).cloned()
    }

    /// The tasks that make the process not live: a vital task down, or any task in a crash
    /// loop; each with why, for the probe's body.
    pub fn not_live(&self) -> BTreeMap<&'static str, String> {
        self.failing(|role| role == Role::Vital)
    }

    /// The tasks that make the worker not ready: any but a helper down, or any in a crash
    /// loop.
    pub fn not_ready(&self) -> BTreeMap<&'static str, String> {
        self.failing(|role| role != Role::Helper)
    }

    /// Tasks in a crash loop (up or down: failures in a row reset only after a long enough
    /// run), and tasks down whose role `counts`.
    fn failing(&self, counts: impl Fn(Role) -> bool) -> BTreeMap<&'static str, String> {
        let now = Instant::now();
        self.lock()
            .iter()
            .filter_map(|(name, task)| {
                let crash_loop = task.failures_in_a_row >= self.crash_loop_after.max(1);
                let down = task.down_since.filter(|_| counts(task.role));
                if !crash_loop && down.is_none() {
                    return None;
                }
                let why = task.last_failure.as_deref().unwrap_or("ended");
                let mut text = if crash_loop {
                    format!(
                        "keeps failing ({} times in a row): {why}",
                        task.failures_in_a_row
                    )
                } else {
                    format!("restarting: {why}")
                };
                if let Some(since) = task.down_since {
                    let down_for = now.duration_since(since).as_secs_f64();
                    text.push_str(&format!("; down for {down_for:.0} s"));
                }
                text.push_str(&format!("; {} restart(s) so far", task.restarts));
                Some((*name, text))
            })
            .collect()
    }

    fn update(&self, name: &'static str, change: impl FnOnce(&mut TaskHealth)) {
        if let Some(task) = self.lock().get_mut(name) {
            change(task);
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<&'static str, TaskHealth>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Runs named background tasks and restarts them; cheap to clone.
#[derive(Debug, Clone)]
pub struct Supervisor {
    health: Health,
    policy: Policy,
    loops: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Default for Supervisor {
    fn default() -> Self {
        Self::new(Policy::default())
    }
}

impl Supervisor {
    pub fn new(policy: Policy) -> Self {
        Self {
            health: Health {
                tasks: Arc::default(),
                crash_loop_after: policy.crash_loop_after,
            },
            policy,
            loops: Arc::default(),
        }
    }

    /// A supervisor that reports to the same [`Health`] but whose [`join`](Self::join) waits
    /// only for its own tasks (those stopped by one token, e.g. the worker's, while the
    /// emitter's go on).
    pub fn scope(&self) -> Supervisor {
        Supervisor {
            health: self.health.clone(),
            policy: self.policy.clone(),
            loops: Arc::default(),
        }
    }

    /// What the probes read.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Runs `start()` as task `name` on its own tokio task, and again (after a backoff) each
    /// time it ends or panics while `stop` is not cancelled. The task is expected to watch
    /// `stop` itself and end when it is cancelled; once `stop` is cancelled, an end is final.
    pub fn spawn<F, Fut>(&self, name: &'static str, role: Role, stop: CancellationToken, start: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.health.lock().insert(
            name,
            TaskHealth {
                role,
                down_since: None,
                restarts: 0,
                failures_in_a_row: 0,
                last_failure: None,
            },
        );
        let handle = tokio::spawn(supervise(
            name,
            start,
            stop,
            self.health.clone(),
            self.policy.clone(),
        ));
        self.loops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(handle);
    }

    /// Waits until every supervised task has ended for good (after their stop tokens).
    pub async fn join(&self) {
        let loops = std::mem::take(&mut *self.loops.lock().unwrap_or_else(|p| p.into_inner()));
        for handle in loops {
            let _ = handle.await;
        }
    }
}

/// Supervises a durable emitter's task (as returned by
/// [`Emitter::spawn_durable`](cohort_events::Emitter::spawn_durable)) as `event-emitter`, a
/// [`Role::Vital`] task: if it ends or panics before `stop`, a new task is started with
/// [`Emitter::restart`](cohort_events::Emitter::restart), which sends everything the outbox
/// holds first, so no event is lost (events emitted meanwhile are committed and wait in the
/// outbox). Cancel `stop` before [`Emitter::close`](cohort_events::Emitter::close), whose end
/// is final.
pub fn supervise_emitter(
    supervisor: &Supervisor,
    emitter: &cohort_events::Emitter,
    task: JoinHandle<()>,
    stop: CancellationToken,
) {
    let mut first = Some(task);
    let emitter = emitter.clone();
    supervisor.spawn(EMITTER, Role::Vital, stop, move || {
        let (first, emitter) = (first.take(), emitter.clone());
        async move {
            match first {
                Some(task) => {
                    if let Err(e) = task.await {
                        if e.is_panic() {
                            // For the supervisor to report.
                            std::panic::resume_unwind(e.into_panic());
                        }
                    }
                }
                None => match emitter.restart().await {
                    Ok(run) => run.await,
                    Err(error) => {
                        tracing::error!(%error, "cannot restart the event emitter from its outbox");
                    }
                },
            }
        }
    });
}

/// The event emitter's task name.
pub const EMITTER: &str = "event-emitter";

/// The loop that owns one task: start, wait for its end, decide, back off, start again.
async fn supervise<F, Fut>(
    name: &'static str,
    mut start: F,
    stop: CancellationToken,
    health: Health,
    policy: Policy,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut backoff = Backoff::new(policy.backoff_base, policy.backoff_cap);
    loop {
        let started = Instant::now();
        let ended = tokio::spawn(start()).await;
        let why = match ended {
            Ok(()) => "ended".to_owned(),
            Err(e) if e.is_panic() => format!("panicked: {}", panic_message(e.into_panic())),
            Err(_) => "was cancelled".to_owned(),
        };
        if stop.is_cancelled() {
            if why != "ended" {
                tracing::error!(task = name, "background task {name} {why} while stopping");
            }
            return;
        }
        if started.elapsed() >= policy.healthy_after {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        let mut restarts = 0;
        health.update(name, |task| {
            if started.elapsed() >= policy.healthy_after {
                task.failures_in_a_row = 0;
            }
            task.failures_in_a_row += 1;
            task.down_since = Some(Instant::now());
            task.last_failure = Some(why.clone());
            restarts = task.restarts;
        });
        tracing::error!(
            task = name,
            restarts,
            "background task {name} {why}; restarting it in {:.1} s",
            delay.as_secs_f64()
        );
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        health.update(name, |task| {
            task.down_since = None;
            task.restarts += 1;
        });
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(a non-text panic payload)".to_owned())
}

/// When the poller last completed a poll, shared between the poller and the health endpoint.
#[derive(Debug, Clone)]
pub struct LastPolled {
    start: tokio::time::Instant,
    millis: Arc<AtomicU64>,
}

impl Default for LastPolled {
    fn default() -> Self {
        Self::new()
    }
}

impl LastPolled {
    /// Counts as polled now: Prefect also treats start-up as a poll.
    pub fn new() -> Self {
        Self {
            start: tokio::time::Instant::now(),
            millis: Arc::new(AtomicU64::new(0)),
        }
    }

    /// As if last touched `ago` (for probes' tests).
    pub fn polled_ago(ago: Duration) -> Self {
        let now = tokio::time::Instant::now();
        Self {
            start: now.checked_sub(ago).unwrap_or(now),
            millis: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.millis.store(ms, Ordering::Relaxed);
    }

    pub fn age(&self) -> Duration {
        let then = Duration::from_millis(self.millis.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(then)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn policy() -> Policy {
        Policy {
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(30),
            healthy_after: Duration::from_secs(60),
            crash_loop_after: 3,
        }
    }

    /// Lets spawned tasks run up to their next wait (paused time does not move meanwhile).
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_panics_is_restarted_with_backoff_and_the_probes_show_it() {
        let supervisor = Supervisor::new(policy());
        let stop = CancellationToken::new();
        let starts = Arc::new(AtomicU32::new(0));
        supervisor.spawn("channel", Role::Ready, stop.clone(), {
            let starts = starts.clone();
            let stop = stop.clone();
            move || {
                let n = starts.fetch_add(1, Ordering::SeqCst);
                let stop = stop.clone();
                async move {
                    if n == 0 {
                        panic!("socket state corrupted");
                    }
                    stop.cancelled().await;
                }
            }
        });
        settle().await;
        assert_eq!(starts.load(Ordering::SeqCst), 1);
        let health = supervisor.health();
        let task = health.task("channel").unwrap();
        assert!(task.down_since.is_some());
        assert_eq!(
            task.last_failure.as_deref(),
            Some("panicked: socket state corrupted")
        );
        let not_ready = health.not_ready();
        assert!(
            not_ready["channel"].contains("restarting: panicked: socket state corrupted"),
            "{not_ready:?}"
        );
        assert!(
            health.not_live().is_empty(),
            "one failure is not a crash loop"
        );

        // Not before the backoff (1 s ± 20 %), then restarted.
        tokio::time::advance(Duration::from_millis(700)).await;
        settle().await;
        assert_eq!(
            starts.load(Ordering::SeqCst),
            1,
            "restarted only after a backoff"
        );
        tokio::time::advance(Duration::from_millis(600)).await;
        settle().await;
        assert_eq!(starts.load(Ordering::SeqCst), 2);
        let task = health.task("channel").unwrap();
        assert_eq!((task.down_since, task.restarts), (None, 1));
        assert!(health.not_ready().is_empty());

        stop.cancel();
        supervisor.join().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_ends_is_restarted_and_one_that_keeps_failing_is_not_live() {
        let supervisor = Supervisor::new(policy());
        let stop = CancellationToken::new();
        let starts = Arc::new(AtomicU32::new(0));
        supervisor.spawn("wake", Role::Helper, stop.clone(), {
            let starts = starts.clone();
            move || {
                starts.fetch_add(1, Ordering::SeqCst);
                async {}
            }
        });
        settle().await;
        let health = supervisor.health();
        assert_eq!(
            health.task("wake").unwrap().last_failure.as_deref(),
            Some("ended")
        );
        assert!(
            health.not_ready().is_empty(),
            "a helper down is still ready"
        );
        assert!(health.not_live().is_empty());

        // Backoffs of about 1, 2 s: the third end in a row is a crash loop.
        for _ in 0..2 {
            tokio::time::advance(Duration::from_secs(3)).await;
            settle().await;
        }
        assert_eq!(starts.load(Ordering::SeqCst), 3);
        let not_live = health.not_live();
        assert!(
            not_live["wake"].contains("keeps failing (3 times in a row)"),
            "{not_live:?}"
        );
        assert!(health.not_ready().contains_key("wake"));
        stop.cancel();
        supervisor.join().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_vital_task_down_is_not_live() {
        let supervisor = Supervisor::new(policy());
        let stop = CancellationToken::new();
        let mut first = true;
        supervisor.spawn("emitter", Role::Vital, stop.clone(), {
            let stop = stop.clone();
            move || {
                let fail = std::mem::take(&mut first);
                let stop = stop.clone();
                async move {
                    assert!(!fail, "emitter task bug");
                    stop.cancelled().await;
                }
            }
        });
        settle().await;
        let health = supervisor.health();
        assert!(health.not_live().contains_key("emitter"));
        assert!(health.not_ready().contains_key("emitter"));
        tokio::time::advance(Duration::from_secs(2)).await;
        settle().await;
        assert!(health.not_live().is_empty());
        stop.cancel();
        supervisor.join().await;
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_stops_restarts() {
        let supervisor = Supervisor::new(policy());
        let stop = CancellationToken::new();
        let starts = Arc::new(AtomicU32::new(0));
        supervisor.spawn("cancel-watcher", Role::Ready, stop.clone(), {
            let starts = starts.clone();
            move || {
                starts.fetch_add(1, Ordering::SeqCst);
                async {}
            }
        });
        settle().await;
        assert_eq!(starts.load(Ordering::SeqCst), 1);
        // Stopped while waiting to restart: no restart, and join returns.
        stop.cancel();
        supervisor.join().await;
        tokio::time::advance(Duration::from_secs(120)).await;
        settle().await;
        assert_eq!(starts.load(Ordering::SeqCst), 1);

        // A task that ends because it was stopped is not restarted either.
        let supervisor = Supervisor::new(policy());
        let stop = CancellationToken::new();
        let starts = Arc::new(AtomicU32::new(0));
        supervisor.spawn("heartbeat", Role::Ready, stop.clone(), {
            let starts = starts.clone();
            let stop = stop.clone();
            move || {
                starts.fetch_add(1, Ordering::SeqCst);
                let stop = stop.clone();
                async move { stop.cancelled().await }
            }
        });
        settle().await;
        stop.cancel();
        supervisor.join().await;
        assert_eq!(starts.load(Ordering::SeqCst), 1);
        assert!(supervisor.health().not_ready().is_empty());
    }
    /// The emitter's task ends before its stop (here: closed, as a task would end on a bug):
    /// the supervisor starts a new one from the outbox, and emits reach it.
    #[tokio::test]
    async fn the_emitter_task_is_restarted_from_its_outbox() {
        use cohort_events::emitter::{Emitter, EmitterConfig, EventsAuth, Outbox, Tuning};
        use cohort_events::{Event, Resource};

        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path().join("outbox.redb")).unwrap();
        // Nothing listens there: events stay unconfirmed, in the outbox.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = EmitterConfig {
            api_url: format!("http://127.0.0.1:{port}/api").parse().unwrap(),
            auth: EventsAuth::Token(None),
            user_agent: "cohort-test".to_owned(),
        };
        let tuning = Tuning {
            close_grace: Duration::ZERO,
            ..Tuning::default()
        };
        let (emitter, task) = Emitter::spawn_durable(config, tuning, outbox).unwrap();
        let supervisor = Supervisor::new(Policy {
            backoff_base: Duration::from_millis(10),
            backoff_cap: Duration::from_millis(10),
            ..policy()
        });
        let stop = CancellationToken::new();
        supervise_emitter(&supervisor, &emitter, task, stop.clone());
        let event = |n: u32| {
            Event::new(
                "cohort.test",
                Resource::new(format!("cohort.test.{n}")),
                vec![],
            )
        };
        emitter.emit(event(1)).await;

        emitter.close();
        let health = supervisor.health();
        while health.task(EMITTER).unwrap().restarts == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            health.task(EMITTER).unwrap().last_failure.as_deref(),
            Some("ended")
        );
        assert!(health.not_live().is_empty(), "running again");
        emitter.emit(event(2)).await;
        assert_eq!(emitter.outbox_depth(), Some(2));
        assert_eq!(
            emitter.unconfirmed(),
            2,
            "the new task holds the backlog and the new event"
        );
        let flushed = emitter.flush(Duration::from_millis(50)).await;
        assert!(
            matches!(flushed, Err(cohort_events::FlushError::Timeout { .. })),
            "a live task answers (nobody confirms): {flushed:?}"
        );

        stop.cancel();
        emitter.close();
        supervisor.join().await;
    }
}
