//! The worker: start-up against the server, then one loop that polls, claims into free slots and
//! reaps finished runs, then a phased shutdown (`prefect/workers/base.py: BaseWorker`).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use cohort_api::models::WorkPool;
use cohort_api::retry::jittered;
use cohort_api::{while_starting, ApiError, NotReady, PrefectClient};
use cohort_events::related::{self, Named};
use cohort_events::subscriber::SubscriberConfig;
use cohort_events::{names, Event, EventSink, EventsAuth};
use cohort_infra::Infrastructure;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::burst::{self, Burst};
use crate::channel::{self, ChannelConfig};
use crate::health::{self, LastPolled};
use crate::journal::Journal;
use crate::peers::{self, Peers};
use crate::recover::{self, Recovery};
use crate::submit::{self, Outcome, PollReads, RunContext, SharedPool};
use crate::wake;
use cohort_execution::cancel::{self, Cancellable};
use cohort_execution::execution::{Executor, LogShipper};
use cohort_supervise::{Role, Supervisor};

/// Everything `cohort worker start` decides before the worker meets the server.
#[derive(Clone)]
pub struct WorkerOptions {
    pub pool: String,
    pub name: String,
    /// `--type`; `None` takes the pool's type (or the first supported type when creating it).
    pub worker_type: Option<String>,
    pub work_queues: Vec<String>,
    /// `--limit`: at most this many runs at once; `None` is unlimited.
    pub limit: Option<usize>,
    pub prefetch: Duration,
    pub query_interval: Duration,
    pub heartbeat_interval: Duration,
    pub run_once: bool,
    /// Used only when the worker creates the pool.
    pub base_job_template: Option<Value>,
    pub create_pool_if_not_found: bool,
    /// How long a shutdown waits for running flows before stopping them.
    pub drain_timeout: Duration,
    /// SIGTERM → SIGKILL grace when stopping a flow-run process.
    pub termination_grace: Duration,
    /// The web server (`PREFECT_WORKER_WEBSERVER_HOST:PORT`): `/metrics` always, the
    /// health probes with `--with-healthcheck`.
    pub webserver: Option<Webserver>,
    /// The event outbox, whose depth and oldest event `/metrics` reads at each scrape.
    pub outbox: Option<cohort_events::emitter::Outbox>,
    /// `PREFECT_*` settings to pass on to flow-run processes.
    pub settings_env: Vec<(String, String)>,
    /// Wake the poller on the pool's `Scheduled` events (off: poll only, as Prefect does;
    /// `COHORT_EVENT_WAKE=0`, for comparison).
    pub event_wake: bool,
    /// Token and header for the websocket handshakes.
    pub auth_token: Option<String>,
    /// How the events websockets authenticate.
    pub events_auth: EventsAuth,
    pub authorization: Option<String>,
}

/// Where the worker's web server listens and what it serves.
#[derive(Debug, Clone, Copy)]
pub struct Webserver {
    pub addr: SocketAddr,
    /// `GET /health`, `/livez` and `/readyz` (`--with-healthcheck`) besides `/metrics`.
    pub health: bool,
}

/// Credentials (and the settings passed on to flows, which can hold `PREFECT_API_KEY`) are
/// never printed, whatever the log level.
impl std::fmt::Debug for WorkerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |secret: &Option<String>| secret.as_ref().map(|_| "<redacted>");
        let settings: Vec<&str> = self.settings_env.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("WorkerOptions")
            .field("pool", &self.pool)
            .field("name", &self.name)
            .field("worker_type", &self.worker_type)
            .field("work_queues", &self.work_queues)
            .field("limit", &self.limit)
            .field("prefetch", &self.prefetch)
            .field("query_interval", &self.query_interval)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("run_once", &self.run_once)
            .field("create_pool_if_not_found", &self.create_pool_if_not_found)
            .field("drain_timeout", &self.drain_timeout)
            .field("termination_grace", &self.termination_grace)
            .field("webserver", &self.webserver)
            .field("settings_env (names only)", &settings)
            .field("event_wake", &self.event_wake)
            .field("auth_token", &redacted(&self.auth_token))
            .field("events_auth", &self.events_auth)
            .field("authorization", &redacted(&self.authorization))
            .finish_non_exhaustive()
    }
}

/// Why the worker could not start. Each is final: retrying with the same input will not help.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A wrong URL or credentials (a server that is down or busy is waited for).
    #[error(transparent)]
    Server(#[from] NotReady),
    #[error("work pool {pool:?} has type {pool_type:?}, but this worker was started with --type {worker_type:?}")]
    PoolTypeMismatch {
        pool: String,
        pool_type: String,
        worker_type: String,
    },
    #[error("worker type {worker_type:?} is not supported: Cohort runs {} work pools", supported.join(", "))]
    UnsupportedType {
        worker_type: String,
        supported: Vec<&'static str>,
    },
    #[error("work pool {pool:?} has type {pool_type:?}: Cohort runs {} work pools only", supported.join(", "))]
    UnsupportedPoolType {
        pool: String,
        pool_type: String,
        supported: Vec<&'static str>,
    },
    #[error("work pool {0:?} not found, and --no-create-pool-if-not-found was given")]
    PoolNotFound(String),
    #[error("worker name {0:?} may not contain '/' or '%'")]
    InvalidName(String),
    #[error("cannot serve the healthcheck on {addr}")]
    Healthcheck {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Api(#[from] ApiError),
}

impl StartError {
    fn from_api(client: &PrefectClient, e: ApiError) -> Self {
        let url = client.api_url().to_string();
        if e.is_auth() {
            NotReady::Unauthorized { url, source: e }.into()
        } else if e.is_transient() {
            NotReady::Unreachable { url, source: e }.into()
        } else {
            StartError::Api(e)
        }
    }
}

/// A started worker, ready to [`Worker::run`].
pub struct Worker {
    client: PrefectClient,
    options: WorkerOptions,
    pool: SharedPool,
    worker_type: String,
    prefect_version: String,
}

impl Worker {
    /// Meets the server: its version, the pool (created when absent), the type checks against
    /// the infrastructure types this build can run (`supported`, the first one the default).
    /// The caller then builds the infrastructure of [`Worker::worker_type`] to [`Worker::run`].
    pub async fn start(
        client: PrefectClient,
        options: WorkerOptions,
        supported: &[&'static str],
    ) -> Result<Self, StartError> {
        if options.name.contains('/') || options.name.contains('%') {
            return Err(StartError::InvalidName(options.name));
        }
        if let Some(t) = options
            .worker_type
            .as_deref()
            .filter(|t| !supported.contains(t))
        {
            return Err(StartError::UnsupportedType {
                worker_type: t.to_owned(),
                supported: supported.to_vec(),
            });
        }
        let prefect_version = cohort_api::wait_for_server(&client).await?;
        let pool = match while_starting(&client, "reading the work pool", || {
            client.read_work_pool(&options.pool)
        })
        .await
        .map_err(|e| StartError::from_api(&client, e))?
        {
            Some(pool) => pool,
            None if !options.create_pool_if_not_found => {
                return Err(StartError::PoolNotFound(options.pool.clone()))
            }
            None => {
                let pool_type = options
                    .worker_type
                    .as_deref()
                    .or(supported.first().copied())
                    .unwrap_or_default();
                let pool = while_starting(&client, "creating the work pool", || {
                    client.create_work_pool(
                        &options.pool,
                        pool_type,
                        options.base_job_template.as_ref(),
                    )
                })
                .await
                .map_err(|e| StartError::from_api(&client, e))?;
                tracing::info!("Work pool '{}' created.", pool.name);
                pool
            }
        };
        // Prefect only warns on a mismatch and then renders a foreign template into a process
        // job; Cohort refuses, because nothing good can come of it (docs/compat.md).
        if let Some(t) = options
            .worker_type
            .as_deref()
            .filter(|t| *t != pool.pool_type)
        {
            return Err(StartError::PoolTypeMismatch {
                pool: pool.name,
                pool_type: pool.pool_type,
                worker_type: t.to_owned(),
            });
        }
        let Some(worker_type) = supported.iter().find(|t| **t == pool.pool_type) else {
            return Err(StartError::UnsupportedPoolType {
                pool: pool.name,
                pool_type: pool.pool_type,
                supported: supported.to_vec(),
            });
        };
        if pool.is_paused {
            tracing::warn!(
                "Work pool '{}' is paused. No flow runs will be submitted until it is resumed.",
                pool.name
            );
        }
        Ok(Self {
            client,
            options,
            pool: Arc::new(RwLock::new(Arc::new(pool))),
            worker_type: (*worker_type).to_owned(),
            prefect_version,
        })
    }

    pub fn name(&self) -> &str {
        &self.options.name
    }

    /// The pool's type: the infrastructure [`Worker::run`] must be given.
    pub fn worker_type(&self) -> &str {
        &self.worker_type
    }

    /// The pool's base job template as read at start (an infrastructure takes defaults from
    /// it, e.g. the namespace its runs' Jobs go to).
    pub fn base_job_template(&self) -> serde_json::Value {
        self.pool
            .read()
            .expect("pool lock poisoned")
            .base_job_template
            .clone()
    }

    /// A pool found with an empty base job template gets the infrastructure's default, as
    /// Prefect's worker gives it at start-up (`BaseWorker._update_local_work_pool_info`).
    async fn fill_empty_template(&self, infra: &dyn Infrastructure) -> Result<(), StartError> {
        let name = {
            let pool = self.pool.read().expect("pool lock poisoned");
            if pool
                .base_job_template
                .as_object()
                .is_some_and(|o| !o.is_empty())
            {
                return Ok(());
            }
            pool.name.clone()
        };
        let template = infra.default_base_job_template();
        while_starting(&self.client, "filling the pool's base job template", || {
            self.client.update_work_pool_template(&name, &template)
        })
        .await
        .map_err(|e| StartError::from_api(&self.client, e))?;
        let mut pool = self.pool.write().expect("pool lock poisoned");
        let mut updated = WorkPool::clone(&pool);
        updated.base_job_template = template;
        *pool = Arc::new(updated);
        Ok(())
    }

    pub fn prefect_version(&self) -> &str {
        &self.prefect_version
    }

    fn pool_named(&self) -> Named {
        let pool = self.pool.read().expect("pool lock poisoned");
        Named {
            id: pool.id,
            name: pool.name.clone(),
        }
    }

    /// Serves until `shutdown` (or, with `--run-once`, one poll and its runs), then stops in
    /// phases: no new claims → drain running flows up to the drain deadline (or until `force`)
    /// → stop what is left → `prefect.worker.stopped`.
    ///
    /// The background tasks (worker channel, cancel and wake watchers, health server) run
    /// under `supervisor`, which restarts any that ends or panics and whose health the probes
    /// read (so they see the emitter too when the caller supervises it there).
    pub async fn run(
        self,
        sink: Arc<dyn EventSink>,
        state: WorkerState,
        infra: Arc<dyn Infrastructure>,
        supervisor: &Supervisor,
        shutdown: CancellationToken,
        force: CancellationToken,
    ) -> Result<(), StartError> {
        debug_assert_eq!(infra.worker_type(), self.worker_type);
        self.fill_empty_template(infra.as_ref()).await?;
        let background = CancellationToken::new();
        let tasks = supervisor.scope();
        let resource =
            related::worker_resource(&self.worker_type, &self.options.name, &self.prefect_version);
        let logs_closed = CancellationToken::new();
        let (logs, log_shipper) = LogShipper::start(self.client.clone(), logs_closed.clone());
        let ctx = Arc::new(RunContext {
            executor: Executor {
                api: Arc::new(self.client.clone()),
                sink: sink.clone(),
                // Prefect's process worker cancels through a per-run executor context whose
                // runner is named "standalone" (`prefect/runner/_flow_run_executor.py`).
                runner_resource: related::runner_resource("standalone", &self.prefect_version),
                termination_grace: self.options.termination_grace,
                // A worker's second signal is its drain's end: stops keep their grace.
                hurry: CancellationToken::new(),
                cancel_on_shutdown: None,
                logs: Some(logs),
            },
            infra: infra.clone(),
            journal: state.journal,
            worker_name: self.options.name.clone(),
            worker_type: self.worker_type.clone(),
            resource: resource.clone(),
            pool: self.pool.clone(),
            settings_env: self.options.settings_env.clone(),
            count_final_states: self.options.webserver.is_some(),
            burst: Burst::default(),
        });
        let cancellable = Cancellable::default();
        let last_polled = LastPolled::new();
        let loop_turned = LastPolled::new();
        cohort_metrics::metrics().worker_started(&self.worker_type, env!("CARGO_PKG_VERSION"));
        if let Some(Webserver { addr, health }) = self.options.webserver {
            // Bound now, so a taken port fails start-up; a restart binds again.
            let listener = health::bind(addr)
                .await
                .map_err(|source| StartError::Healthcheck { addr, source })?;
            let probes = health::Probes {
                last_polled: last_polled.clone(),
                loop_turned: loop_turned.clone(),
                window: self.options.query_interval * 30,
                interval: self.options.query_interval,
                journal: ctx.journal.clone(),
                tasks: supervisor.health(),
                outbox: self.options.outbox.clone(),
                health,
            };
            let mut bound = Some(listener);
            let stop = background.clone();
            tasks.spawn("health-server", Role::Helper, background.clone(), move || {
                let (bound, probes, stop) = (bound.take(), probes.clone(), stop.clone());
                async move {
                    let listener = match bound {
                        Some(l) => l,
                        None => match health::bind(addr).await {
                            Ok(l) => l,
                            Err(e) => {
                                tracing::error!(error = %e, %addr, "cannot bind the healthcheck again");
                                return;
                            }
                        },
                    };
                    health::serve(listener, probes, stop).await;
                }
            });
        }
        // Heartbeats and cancellations: the worker is not ready without them.
        let feed = SubscriberConfig {
            api_url: self.client.api_url().clone(),
            auth: self.options.events_auth.clone(),
            user_agent: cohort_api::user_agent(),
            filter: json!({"event": {"name": cancel::CANCEL_EVENTS}}),
        };
        let (client, watched, interval, stop) = (
            self.client.clone(),
            cancellable.clone(),
            self.options.query_interval,
            background.clone(),
        );
        tasks.spawn(
            "cancel-watcher",
            Role::Ready,
            background.clone(),
            move || {
                cancel::watch(
                    client.clone(),
                    feed.clone(),
                    watched.clone(),
                    interval,
                    stop.clone(),
                )
            },
        );
        let hello = infra.channel_hello();
        let channel_config = ChannelConfig {
            pool_name: self.options.pool.clone(),
            worker_name: self.options.name.clone(),
            worker_type: self.worker_type.clone(),
            heartbeat_interval: self.options.heartbeat_interval,
            work_queue_names: self.options.work_queues.clone(),
            default_base_job_template: infra.default_base_job_template(),
            worker_metadata: hello.worker_metadata.unwrap_or(Value::Null),
            handles_cleanup: hello.handles_cleanup,
            auth_token: self.options.auth_token.clone(),
            authorization: self.options.authorization.clone(),
        };
        let (client, pool, stop) = (self.client.clone(), self.pool.clone(), background.clone());
        let channel_infra = infra.clone();
        tasks.spawn(
            "worker-channel",
            Role::Ready,
            background.clone(),
            move || {
                channel::run(
                    client.clone(),
                    channel_config.clone(),
                    pool.clone(),
                    channel_infra.clone(),
                    stop.clone(),
                )
            },
        );

        let pool_related = vec![related::work_pool(&self.pool_named())];
        let started = Event::new(
            names::WORKER_STARTED,
            resource.clone(),
            pool_related.clone(),
        );
        sink.emit(started.clone()).await;
        tracing::info!("Worker '{}' started!", self.options.name);

        let (wake_tx, wake_rx) = tokio::sync::mpsc::channel(64);
        if self.options.event_wake {
            // Only hastens pickup (the poll backs it up): down, the worker is still ready.
            let feed = SubscriberConfig {
                api_url: self.client.api_url().clone(),
                auth: self.options.events_auth.clone(),
                user_agent: cohort_api::user_agent(),
                filter: wake::filter(self.pool_named().id),
            };
            let stop = background.clone();
            tasks.spawn(
                "wake-watcher",
                Role::Helper,
                background.clone(),
                move || wake::watch(feed.clone(), wake_tx.clone(), stop.clone()),
            );
        }
        let mut poller = Poller::new(&self, ctx, wake_rx, cancellable, last_polled, loop_turned);
        if let Some(legacy) = &state.legacy {
            crate::state::take_over(&poller.ctx, legacy).await;
        }
        poller.recover().await;
        poller.serve(&shutdown).await;
        poller.drain(&force).await;
        // The runs' last log lines go before `stopped`.
        drop(poller);
        logs_closed.cancel();
        let _ = log_shipper.await;

        background.cancel();
        tasks.join().await;
        infra.shutdown().await;
        let stopped = Event::new(names::WORKER_STOPPED, resource, pool_related).follow(&started);
        sink.emit(stopped).await;
        tracing::info!("Worker '{}' stopped!", self.options.name);
        Ok(())
    }
}

/// What a worker keeps on disk so that a restart loses nothing: the claim journal (its
/// infrastructure keeps the rest).
pub struct WorkerState {
    pub journal: Journal,
    /// What a worker of the same name left in an earlier release's layout, to take over before
    /// recovery (see [`crate::state`]).
    pub legacy: Option<crate::state::LegacyState>,
}

/// The poll loop's state; owned by one task.
struct Poller<'w> {
    /// The pool's runs seen entering Scheduled or Pending (event-driven pickup).
    wake: tokio::sync::mpsc::Receiver<wake::Seen>,
    /// Runs seen entering Scheduled since the last poll and not seen claimed since.
    unclaimed: HashSet<Uuid>,
    /// The pool's workers, to tell which runs this one claims first (see [`crate::peers`]);
    /// `None` when it claims every run it finds, as Prefect's worker does (no event feed).
    peers: Option<Peers>,
    /// Runs found that another worker owns, claimed at their deadline if nobody has by then.
    deferred: HashMap<Uuid, Deferred>,
    worker: &'w Worker,
    ctx: Arc<RunContext>,
    cancellable: Cancellable,
    slots: Option<Arc<Semaphore>>,
    runs: JoinSet<Outcome>,
    task_runs: HashMap<tokio::task::Id, Uuid>,
    /// Runs being submitted or supervised; never claimed twice.
    in_flight: HashSet<Uuid>,
    /// Cancelled to stop every flow-run process at the drain deadline.
    terminate: CancellationToken,
    last_polled: LastPolled,
    /// Every poll attempt (liveness).
    loop_turned: LastPolled,
    /// When the last poll started.
    last_poll: Option<tokio::time::Instant>,
    /// The pool's first `Scheduled` event since the last poll (the latest is in
    /// `ctx.burst`).
    burst_started: Option<tokio::time::Instant>,
    /// How many polls in a row have missed runs this worker owns (see
    /// [`Poller::handle_poll`]).
    missed_polls: u32,
}

/// When to poll next, as a poll found.
#[derive(Default)]
struct NextPolls {
    /// The earliest run it saw due after the prefetch window.
    due: Option<tokio::time::Instant>,
    /// Again, for runs this worker owns that it missed; skipped, as a poll woken by events,
    /// if their Pending events come first.
    again: Option<tokio::time::Instant>,
}

/// When to poll, as the pool's events ask.
enum Wake {
    /// For runs this worker owns: the time given replaces any earlier one (a burst postpones
    /// its poll until it is over).
    Owned(tokio::time::Instant),
    /// For runs other workers own, if they have not claimed them by then.
    Fallback(tokio::time::Instant),
}

/// The least time between the start of a poll and a poll woken by a `Scheduled` event: a burst
/// of runs created one after another costs a poll per this period, not one per run (a poll
/// finds every run scheduled so far).
const EVENT_POLL_GAP: Duration = Duration::from_secs(1);

/// How soon a run this worker owns, heard scheduled, is polled for again when a poll did not
/// find it (another worker's poll held it; see `Poller::handle_poll`): doubled at each poll
/// that misses it again, jittered by [`SKIPPED_REPOLL_JITTER`] either way, up to
/// [`SKIPPED_REPOLLS`] times. At most 2.1 s in all, within the time the pool's other workers
/// leave it to its owner ([`peers::DEFER`]).
const SKIPPED_REPOLL: Duration = Duration::from_millis(200);
const SKIPPED_REPOLLS: u32 = 3;
/// The owners of a burst's runs poll together at its end, and poll again together if their
/// polls met: spread, their second polls mostly do not.
const SKIPPED_REPOLL_JITTER: f64 = 0.5;

/// The wait before the `n`-th poll again (from 0), before its spread.
fn repoll_wait(n: u32) -> Duration {
    SKIPPED_REPOLL * 2u32.pow(n)
}

/// With other workers on the pool the gap grows with their number, so that the pool's
/// workers together poll about once per [`EVENT_POLL_GAP`] in a burst, however many they are;
/// up to this.
const EVENT_POLL_GAP_MAX: Duration = Duration::from_secs(4);

/// The longest a worker's regular poll is spread to with other workers on the pool (see
/// [`Poller::poll_interval`]): with its jitter, under the minute after which the server marks
/// a work queue not ready (`prefect/server/models/work_queues.py:
/// WORK_QUEUE_LAST_POLLED_TIMEOUT`), should this worker's queues be polled by it alone.
const SPREAD_POLL_MAX: Duration = Duration::from_secs(40);

/// The jitter of the regular poll, either way.
const POLL_JITTER: f64 = 0.3;

/// A run another worker owns, found by a poll.
struct Deferred {
    /// When it is claimed if a poll then still finds it scheduled.
    at: tokio::time::Instant,
    owner: String,
    /// Whether its wait was extended once already, its owner being at work on other runs.
    extended: bool,
    /// Whether its wait was extended once already for a burst that was being scheduled.
    burst_extended: bool,
}

impl Deferred {
    fn new(at: tokio::time::Instant, owner: String) -> Self {
        Deferred {
            at,
            owner,
            extended: false,
            burst_extended: false,
        }
    }
}

impl<'w> Poller<'w> {
    fn new(
        worker: &'w Worker,
        ctx: Arc<RunContext>,
        wake: tokio::sync::mpsc::Receiver<wake::Seen>,
        cancellable: Cancellable,
        last_polled: LastPolled,
        loop_turned: LastPolled,
    ) -> Self {
        let options = &worker.options;
        Poller {
            wake,
            worker,
            ctx,
            cancellable,
            slots: options.limit.map(|n| Arc::new(Semaphore::new(n))),
            runs: JoinSet::new(),
            task_runs: HashMap::new(),
            in_flight: HashSet::new(),
            terminate: CancellationToken::new(),
            last_polled,
            loop_turned,
            last_poll: None,
            burst_started: None,
            missed_polls: 0,
            unclaimed: HashSet::new(),
            peers: (options.event_wake && !options.run_once)
                .then(|| Peers::new(options.name.clone())),
            deferred: HashMap::new(),
        }
    }

    async fn serve(&mut self, shutdown: &CancellationToken) {
        self.relist_peers(true).await;
        // The start's list, provisional, is read again shortly, out of any burst to come.
        let mut start_relist = self
            .peers
            .is_some()
            .then(|| tokio::time::Instant::now() + peers::START_RELIST);
        let opts = &self.worker.options;
        let mut next_poll = tokio::time::Instant::now();
        // Polls woken by events, skipped if by then every run they were for has been claimed.
        let mut owned_poll: Option<tokio::time::Instant> = None;
        let mut fallback_poll: Option<tokio::time::Instant> = None;
        let mut polled = false;
        loop {
            if opts.run_once && polled && self.runs.is_empty() {
                return;
            }
            // Deferred runs come due with a poll, not a claim each: by then their owners have
            // mostly claimed them, and their `Pending` events may lag under load, so the poll
            // (one read) tells which are left rather than a rejected proposal per run.
            // Nor in the middle of a burst.
            let deferred_at = self.deferred.values().map(|d| d.at).min().map(|at| {
                self.ctx
                    .burst
                    .last()
                    .map_or(at, |last| at.max(last + burst::QUIET))
            });
            let wake_at = [owned_poll, fallback_poll, deferred_at]
                .into_iter()
                .flatten()
                .fold(next_poll, |a, b| a.min(b));
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                Some(joined) = self.runs.join_next_with_id(), if !self.runs.is_empty() => {
                    self.handle_run_finished(joined);
                }
                Some(seen) = self.wake.recv(), if !opts.run_once => {
                    match self.handle_seen(seen, owned_poll.is_some()) {
                        Some(Wake::Owned(at)) => owned_poll = Some(at),
                        Some(Wake::Fallback(at)) => {
                            fallback_poll = Some(fallback_poll.map_or(at, |t| t.min(at)));
                        }
                        None => {}
                    }
                    // Nor does a poll for other workers' runs go in the middle of a burst.
                    if let (Some(at), Some(last)) = (fallback_poll, self.ctx.burst.last()) {
                        fallback_poll = Some(at.max(last + burst::QUIET));
                    }
                }
                _ = tokio::time::sleep_until(start_relist.unwrap_or(wake_at)), if start_relist.is_some() => {
                    start_relist = None;
                    self.relist_peers(false).await;
                }
                _ = tokio::time::sleep_until(wake_at), if !(opts.run_once && polled) => {
                    let now = tokio::time::Instant::now();
                    let by_event = next_poll > now;
                    let deferred_due = self.deferred.values().any(|d| d.at <= now);
                    (owned_poll, fallback_poll) = (None, None);
                    self.burst_started = None;
                    if by_event && self.unclaimed.is_empty() && !deferred_due {
                        tracing::debug!("the runs this poll was woken for are claimed; not polling");
                        continue;
                    }
                    let next = self.handle_poll(shutdown).await;
                    owned_poll = next.again;
                    polled = true;
                    next_poll =
                        tokio::time::Instant::now() + jittered(self.poll_interval(), POLL_JITTER);
                    if let Some(due) = next.due {
                        next_poll = next_poll.min(due);
                    }
                }
            }
        }
    }

    /// Books what the pool's events say; returns when to poll for a newly scheduled run. For
    /// a run this worker owns, on an idle pool: after [`burst::SETTLE`] (a run scheduled within
    /// it makes a burst); in a burst (runs scheduled less than [`burst::QUIET`] apart), when
    /// the burst is over, at most [`burst::MAX_WAIT`] after its first run, and never sooner
    /// than a gap after the last poll started (at most one poll in flight, since polls run on
    /// this task, and one pending). Any run scheduled postpones a pending poll
    /// (`owned_pending`) the same way. For a run another worker owns: when its owner should
    /// have claimed it, a poll skipped if it has.
    fn handle_seen(&mut self, seen: wake::Seen, owned_pending: bool) -> Option<Wake> {
        let now = tokio::time::Instant::now();
        match seen {
            wake::Seen::Claimed(id) => {
                self.unclaimed.remove(&id);
                self.deferred.remove(&id);
                None
            }
            wake::Seen::Active(name) => {
                if let Some(peers) = &mut self.peers {
                    peers.seen(&name, now);
                }
                None
            }
            wake::Seen::Stopped(name) => {
                if let Some(peers) = &mut self.peers {
                    peers.stopped(&name, now);
                }
                // Its runs found waiting are claimed now.
                for d in self.deferred.values_mut().filter(|d| d.owner == name) {
                    d.at = d.at.min(now);
                }
                None
            }
            wake::Seen::Scheduled(id) => {
                self.unclaimed.insert(id);
                let quiet = self.ctx.burst.scheduled(now);
                let (workers, owner) = match &mut self.peers {
                    None => (1, None),
                    Some(peers) => (
                        peers.count(now),
                        Some(peers.owner(id, now).to_owned())
                            .filter(|o| *o != self.worker.options.name),
                    ),
                };
                match owner {
                    // On an idle pool the owner claims a run at once, or is gone (stopped
                    // before this worker started, say, so that it never heard): the run is
                    // claimed if a poll still finds it scheduled after a short wait.
                    Some(owner) if quiet && !owned_pending => {
                        self.deferred
                            .entry(id)
                            .or_insert(Deferred::new(now + peers::DEFER_IDLE, owner));
                        return None;
                    }
                    Some(_) if !owned_pending => {
                        return Some(Wake::Fallback(now + peers::DEFER));
                    }
                    _ => {}
                }
                let first = *self.burst_started.get_or_insert(now);
                // A lone run is polled for after the settle only, however recent the last
                // poll: the gap spaces a burst's polls, and runs scheduled at least a quiet
                // second apart cost a poll each anyway. Kept to a regular poll's, it delayed a
                // lone run by up to a second, one time in ten with 10 s polls.
                if quiet && !owned_pending {
                    return Some(Wake::Owned(now + burst::SETTLE));
                }
                let at = (now + burst::QUIET).min(first + burst::MAX_WAIT);
                let gap = (EVENT_POLL_GAP * workers as u32).min(EVENT_POLL_GAP_MAX);
                Some(Wake::Owned(
                    self.last_poll.map_or(at, |t| (t + gap).max(at)),
                ))
            }
        }
    }

    /// Reads the pool's online workers when the list is stale: at start (`at_start`), again
    /// [`peers::START_RELIST`] later or at the first poll that finds runs, whichever comes
    /// first (workers starting beside this one may have missed the first list), then at most
    /// once per [`peers::RELIST`] and only at a poll that found runs, or an idle one with other
    /// workers known, never while a burst is being created (the pool's workers would each
    /// read it then, beside the client creating the runs). Workers starting and stopping in
    /// between are known by their events. A failure keeps what is known.
    async fn relist_peers(&mut self, at_start: bool) {
        let now = tokio::time::Instant::now();
        let Some(peers) = self.peers.as_mut().filter(|p| p.relist_due(now)) else {
            return;
        };
        match self
            .ctx
            .api()
            .read_online_workers(&self.worker.options.pool)
            .await
        {
            Ok(workers) if at_start => {
                peers.listed_at_start(workers.iter().map(|w| w.name.as_str()), now);
            }
            Ok(workers) => peers.listed(workers.iter().map(|w| w.name.as_str()), now),
            Err(e) => {
                tracing::debug!(error = %e, "could not list the pool's workers");
                if !at_start {
                    peers.listed([], now);
                }
            }
        }
    }

    /// The time between regular polls. Prefect's workers each poll every query interval, so
    /// a pool's idle polls grow with its workers. With the pool's events, a poll is only the
    /// safety net (a new run wakes its owner at once, a run due later sets a timer, other
    /// workers claim what an owner lets pass), so the workers of a pool spread it: each polls
    /// once per interval per worker it knows, and the pool is still polled about once per
    /// interval, however many they are; up to [`SPREAD_POLL_MAX`]. Without event wake-up, or
    /// restricted to some of the pool's queues (which its peers may not poll), a worker
    /// polls every interval, as Prefect's does.
    fn poll_interval(&mut self) -> Duration {
        let base = self.worker.options.query_interval;
        match &mut self.peers {
            Some(peers) if self.worker.options.work_queues.is_empty() => {
                let workers = u32::try_from(peers.count(tokio::time::Instant::now())).unwrap_or(1);
                (base * workers).min(SPREAD_POLL_MAX.max(base))
            }
            _ => base,
        }
    }

    /// A slot for one more run: `Some(None)` with no `--limit`, `None` with none free.
    fn slot(&self) -> Option<Option<tokio::sync::OwnedSemaphorePermit>> {
        match &self.slots {
            None => Some(None),
            Some(sem) => sem.clone().try_acquire_owned().ok().map(Some),
        }
    }

    /// Polls and claims the runs due within the prefetch window into free slots. The poll
    /// looks one query interval further ahead than that: the runs it sees there are not
    /// claimed, but the earliest sets when to poll again (returned), so a run scheduled for
    /// later is claimed on time without being read on its own.
    async fn handle_poll(&mut self, shutdown: &CancellationToken) -> NextPolls {
        let opts = &self.worker.options;
        self.loop_turned.touch();
        self.last_poll = Some(tokio::time::Instant::now());
        // Prefect truncates the prefetch window to whole seconds.
        let prefetch = chrono::Duration::seconds(opts.prefetch.as_secs() as i64);
        // As far as the next regular poll may be: a run due before it sets the time to poll.
        let lookahead = chrono::Duration::from_std(self.poll_interval().mul_f64(1.0 + POLL_JITTER))
            .unwrap_or_default();
        let before = chrono::Utc::now() + prefetch + lookahead;
        let result = tokio::select! {
            _ = shutdown.cancelled() => return NextPolls::default(),
            r = self.ctx.api().get_scheduled_flow_runs(&opts.pool, &opts.work_queues, before) => r,
        };
        // The poll sees every run scheduled so far.
        let heard = std::mem::take(&mut self.unclaimed);
        let now = tokio::time::Instant::now();
        let scheduled = match result {
            // On an idle pool the list is read again (when due) only with other workers
            // known: they would be forgotten otherwise, and the polls no longer spread. A
            // worker alone hears of newcomers by their `started` events.
            Ok(s) => {
                let now = tokio::time::Instant::now();
                if !s.is_empty() || self.peers.as_mut().is_some_and(|p| p.count(now) > 1) {
                    self.relist_peers(false).await;
                }
                s
            }
            Err(e) => {
                tracing::error!(error = %e, "failed to poll for scheduled flow runs");
                // Deferred runs that came due wait for the next poll to find them again.
                self.deferred.retain(|_, d| d.at > now);
                return NextPolls::default();
            }
        };
        self.last_polled.touch();
        if !scheduled.is_empty() {
            tracing::debug!(count = scheduled.len(), "found scheduled flow runs");
        }
        let horizon = chrono::Utc::now() + prefetch;
        let reads = Arc::new(PollReads::default());
        let found: HashSet<Uuid> = scheduled.iter().map(|e| e.flow_run.id).collect();
        // On PostgreSQL the server's poll skips the runs another poll holds at that moment
        // (`FOR UPDATE SKIP LOCKED`,
        // `prefect/server/database/sql/postgres/get-runs-from-worker-queues.sql.jinja`): the
        // pool's workers, polling together at a burst's end, each found part of it or none,
        // and the owners' runs were left to the others' deferral; with a 100-run burst their
        // second polls, 200 ms later, met as often. Runs this worker owns, heard scheduled and
        // not claimed since, that the poll did not find stay heard and are polled for again
        // shortly, a few times at most, the wait doubled and spread each time (a run heard of
        // and deleted since costs those polls and no more).
        let me = &self.worker.options.name;
        let missed: Vec<Uuid> = heard
            .into_iter()
            .filter(|id| {
                !found.contains(id)
                    && !self.in_flight.contains(id)
                    && self.peers.as_mut().is_none_or(|p| p.owner(*id, now) == me)
            })
            .collect();
        let mut again = None;
        if missed.is_empty() || self.missed_polls >= SKIPPED_REPOLLS {
            self.missed_polls = 0;
        } else {
            tracing::debug!(
                count = missed.len(),
                "the poll missed runs heard scheduled; polling again"
            );
            let wait = jittered(repoll_wait(self.missed_polls), SKIPPED_REPOLL_JITTER);
            again = Some(now + wait);
            self.missed_polls += 1;
            self.unclaimed.extend(missed);
        }
        let mut next_due: Option<tokio::time::Instant> = None;
        for entry in scheduled {
            let run = entry.flow_run;
            if self.in_flight.contains(&run.id) {
                continue;
            }
            if let Some(due) = run
                .next_scheduled_start_time
                .or(run.expected_start_time)
                .filter(|due| *due > horizon)
            {
                let wait = (due - horizon).to_std().unwrap_or_default();
                let at = tokio::time::Instant::now() + wait;
                next_due = Some(next_due.map_or(at, |t| t.min(at)));
                continue;
            }
            // Another worker's run waits for its owner (once per run, from the poll that
            // found it first); still scheduled once that time is up, it is claimed, and its
            // owner owns nothing more until seen submitting. An owner seen submitting within
            // that time is working through its share of a burst (one write at a time, and on
            // SQLite some answered 503 and sent again): it gets the time once more, rather
            // than a rejected proposal from this worker for each run it has not reached yet.
            if let Some(peers) = &mut self.peers {
                match self.deferred.get_mut(&run.id) {
                    Some(d) if d.at > now => continue,
                    // Its owner, like every worker of the pool, held its poll until the burst
                    // was over, and polls about now: claimed now, the run is mostly a rejected
                    // proposal, and its owner, left out as absent, costs a rejected proposal
                    // for each run of its share that this worker then claims as its own.
                    Some(d)
                        if !d.burst_extended
                            && peers.takes_part(&d.owner)
                            && self.ctx.burst.within(now, peers::DEFER) =>
                    {
                        tracing::debug!(flow_run = %run.id, owner = %d.owner, "a burst was being scheduled; waiting once more");
                        d.at = now + peers::DEFER;
                        d.burst_extended = true;
                        continue;
                    }
                    Some(d) if !d.extended && peers.active_within(&d.owner, peers::DEFER, now) => {
                        tracing::debug!(flow_run = %run.id, owner = %d.owner, "its owner is at work; waiting once more");
                        d.at = now + peers::DEFER;
                        d.extended = true;
                        continue;
                    }
                    Some(d) => {
                        tracing::info!(flow_run = %run.id, owner = %d.owner, "claiming a run its owner has let pass");
                        peers.absent(&d.owner, now);
                        self.deferred.remove(&run.id);
                    }
                    None => {
                        let owner = peers.owner(run.id, now);
                        if owner != self.worker.options.name {
                            let owner = owner.to_owned();
                            self.deferred
                                .insert(run.id, Deferred::new(now + peers::DEFER, owner));
                            continue;
                        }
                    }
                }
            }
            // A slot first, then the claim; with no slot free, stop claiming this round.
            let Some(permit) = self.slot() else {
                tracing::debug!("concurrency limit reached; leaving the remaining runs");
                break;
            };
            let (ctx, reads) = (self.ctx.clone(), reads.clone());
            self.spawn_run(run.id, permit, move |cancel, terminate| {
                submit::submit(ctx, run, None, reads, cancel, terminate)
            });
        }
        // Deferred runs no longer scheduled were claimed (by their owners, mostly); those due
        // but left unclaimed (no slot free) wait for a poll to find them again.
        self.deferred
            .retain(|id, d| found.contains(id) && d.at > now);
        NextPolls {
            due: next_due,
            again,
        }
    }

    /// Supervises one run on its own task, cancellable, holding its slot (if any).
    fn spawn_run<F, Fut>(
        &mut self,
        id: Uuid,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
        run: F,
    ) where
        F: FnOnce(CancellationToken, CancellationToken) -> Fut,
        Fut: std::future::Future<Output = Outcome> + Send + 'static,
    {
        let span = tracing::info_span!("flow_run", id = %id);
        let fut = run(self.cancellable.register(id), self.terminate.child_token());
        let handle = self.runs.spawn(
            async move {
                let _slot = permit;
                fut.await
            }
            .instrument(span),
        );
        self.task_runs.insert(handle.id(), id);
        self.in_flight.insert(id);
        cohort_metrics::metrics().in_flight(self.in_flight.len(), self.worker.options.limit);
        self.deferred.remove(&id);
    }

    /// Takes up what an earlier worker of this name left in the journal (see [`recover`]):
    /// re-adopted and resumed runs hold slots like any other, even beyond `--limit`, since
    /// they are running already.
    async fn recover(&mut self) {
        let mut claims = match self.ctx.journal.claims() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the claim journal; runs of an earlier worker will not be recovered");
                return;
            }
        };
        let journaled: Vec<_> = claims.iter().map(|c| c.flow_run_id).collect();
        let pool_id = self.ctx.pool.read().expect("pool lock poisoned").id;
        // Runs still running that only the infrastructure remembers are journaled as claims
        // first, so they are taken up like any other (and again if this start fails).
        let orphans = self
            .ctx
            .infra
            .orphans(&self.ctx.worker_name, pool_id, &journaled)
            .await;
        for id in orphans {
            tracing::info!(flow_run = %id, "found a flow run of an earlier worker of this name still running");
            let claim = crate::journal::Claim::new(id);
            if let Err(e) = self.ctx.journal.record(&claim).await {
                tracing::error!(error = %e, "could not journal the found flow run");
            }
            claims.push(claim);
        }
        let journaled: Vec<_> = claims.iter().map(|c| c.flow_run_id).collect();
        self.ctx
            .infra
            .sweep(&self.ctx.worker_name, pool_id, &journaled)
            .await;
        if claims.is_empty() {
            return;
        }
        tracing::info!(
            claims = claims.len(),
            "recovering the flow runs of an earlier worker from the claim journal"
        );
        for claim in claims {
            let id = claim.flow_run_id;
            let permit = self
                .slots
                .as_ref()
                .and_then(|sem| sem.clone().try_acquire_owned().ok());
            let ctx = self.ctx.clone();
            match recover::reconcile(&ctx, claim).await {
                Recovery::Adopt(claim, started) => {
                    tracing::info!(flow_run = %id, infrastructure = %started.identifier(), "re-adopting flow run");
                    self.spawn_run(id, permit, move |cancel, terminate| {
                        recover::adopted(ctx, claim, started, cancel, terminate)
                    });
                }
                Recovery::Resume(claim, run) => {
                    tracing::info!(flow_run = %id, "resuming the submission of a claimed flow run that was never launched");
                    self.spawn_run(id, permit, move |cancel, terminate| {
                        submit::submit(
                            ctx,
                            *run,
                            Some(claim),
                            Default::default(),
                            cancel,
                            terminate,
                        )
                    });
                }
                Recovery::Forget(claim, why) => {
                    tracing::info!(flow_run = %id, "forgetting a journaled claim: {why}");
                    recover::forget_claim(&ctx, &claim).await;
                }
                Recovery::Keep(why) => {
                    tracing::warn!(flow_run = %id, "cannot reconcile a journaled claim now ({why}); it is kept for the next start");
                }
            }
        }
    }

    fn handle_run_finished(
        &mut self,
        joined: Result<(tokio::task::Id, Outcome), tokio::task::JoinError>,
    ) {
        let task = match &joined {
            Ok((task, _)) => *task,
            Err(e) => e.id(),
        };
        let run = self.task_runs.remove(&task);
        if let Some(run) = run {
            self.in_flight.remove(&run);
            self.cancellable.remove(&run);
        }
        cohort_metrics::metrics().in_flight(self.in_flight.len(), self.worker.options.limit);
        match joined {
            Ok((_, outcome)) => tracing::debug!(flow_run = ?run, ?outcome, "flow run finished"),
            Err(e) => tracing::error!(flow_run = ?run, error = %e, "flow run supervisor failed"),
        }
    }

    /// Lets running flows finish up to the drain deadline (or a second signal), then stops them.
    async fn drain(&mut self, force: &CancellationToken) {
        if self.runs.is_empty() {
            return;
        }
        let deadline = self.worker.options.drain_timeout;
        tracing::info!(
            runs = self.runs.len(),
            ?deadline,
            "waiting for running flow runs before stopping"
        );
        let drained = tokio::select! {
            _ = force.cancelled() => false,
            r = tokio::time::timeout(deadline, self.join_all()) => r.is_ok(),
        };
        if !drained {
            tracing::warn!(
                runs = self.runs.len(),
                "stopping the flow runs still running"
            );
            self.terminate.cancel();
            self.join_all().await;
        }
    }

    async fn join_all(&mut self) {
        while let Some(joined) = self.runs.join_next_with_id().await {
            self.handle_run_finished(joined);
        }
    }
}

/// Sleeps until `at`, or forever.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{fakes, known_run, Fakes, WORKER};
    use cohort_api::models::StateType;
    use cohort_api::ClientConfig;
    use cohort_fakes::InProcessPrefect;

    /// Prefect's defaults (10 s polls and prefetch), event wake-up on.
    fn options(limit: Option<usize>) -> WorkerOptions {
        WorkerOptions {
            pool: "paused-pool".into(),
            name: WORKER.into(),
            worker_type: None,
            work_queues: vec![],
            limit,
            prefetch: Duration::from_secs(10),
            query_interval: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(30),
            run_once: false,
            base_job_template: None,
            create_pool_if_not_found: true,
            drain_timeout: Duration::from_secs(30),
            termination_grace: Duration::from_secs(30),
            webserver: None,
            outbox: None,
            settings_env: vec![],
            event_wake: true,
            auth_token: None,
            events_auth: EventsAuth::Token(None),
            authorization: None,
        }
    }

    /// A started worker over the fakes: its own client points nowhere, since the poller
    /// talks to the server through the run context's API only.
    fn worker(f: &Fakes, limit: Option<usize>) -> Worker {
        let client = PrefectClient::new(ClientConfig {
            api_url: "http://127.0.0.1:9/api".parse().expect("a URL"),
            api_key: None,
            auth_string: None,
            max_retries: 0,
            request_timeout: Duration::from_secs(1),
            retry_base_delay: Duration::from_secs(1),
        })
        .expect("a client");
        Worker {
            client,
            options: options(limit),
            pool: f.ctx.pool.clone(),
            worker_type: "scripted".into(),
            prefect_version: "3.8.8".into(),
        }
    }

    fn poller<'w>(
        worker: &'w Worker,
        f: &Fakes,
    ) -> (Poller<'w>, tokio::sync::mpsc::Sender<wake::Seen>) {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let poller = Poller::new(
            worker,
            f.ctx.clone(),
            rx,
            Cancellable::default(),
            LastPolled::new(),
            LastPolled::new(),
        );
        (poller, tx)
    }

    /// Lets every run in flight exit 0 (once prepared) and waits for the poller's runs to end.
    async fn finish(f: &Fakes, poller: &mut Poller<'_>) -> usize {
        for id in poller.in_flight.clone() {
            f.infra.script(id).await.exit(0);
        }
        let n = poller.runs.len();
        poller.join_all().await;
        n
    }

    #[tokio::test(start_paused = true)]
    async fn a_poll_claims_the_runs_due_and_polls_again_when_a_later_one_is() {
        let f = fakes(InProcessPrefect::new());
        let due: Vec<Uuid> = (0..3).map(|_| known_run(&f.api, None).id).collect();
        // Due in 15 s: inside the poll's look-ahead (prefetch + one interval), outside the
        // prefetch window, so not claimed yet; its time sets the next poll.
        let mut later = known_run(&f.api, None);
        later.expected_start_time = Some(chrono::Utc::now() + chrono::Duration::seconds(15));
        f.api.add_run(later.clone());
        let w = worker(&f, None);
        let (mut poller, _wake) = poller(&w, &f);

        let next = poller
            .handle_poll(&CancellationToken::new())
            .await
            .due
            .expect("the later run sets the next poll");
        assert_eq!(f.api.polls(), 1);
        let mut claimed: Vec<Uuid> = poller.in_flight.iter().copied().collect();
        claimed.sort();
        let mut want = due.clone();
        want.sort();
        assert_eq!(claimed, want);
        let wait = next - tokio::time::Instant::now();
        assert!(
            wait > Duration::from_secs(4) && wait <= Duration::from_secs(5),
            "{wait:?}"
        );
        assert_eq!(finish(&f, &mut poller).await, 3);
        for id in &due {
            assert_eq!(f.api.state_name(*id), "Submitting");
        }
        assert_eq!(f.api.state(later.id), StateType::Scheduled);

        tokio::time::sleep_until(next).await;
        // Paused time moves the tokio clock only; the server's clock (and the poll's window,
        // taken from the wall clock as the server's timestamps are) has to be moved by hand.
        later.expected_start_time = Some(chrono::Utc::now());
        f.api.add_run(later.clone());
        poller.handle_poll(&CancellationToken::new()).await;
        assert_eq!(
            poller.in_flight.iter().copied().collect::<Vec<_>>(),
            [later.id]
        );
        finish(&f, &mut poller).await;
    }

    #[tokio::test(start_paused = true)]
    async fn with_every_slot_taken_a_poll_claims_nothing_more() {
        let f = fakes(InProcessPrefect::new());
        for _ in 0..3 {
            known_run(&f.api, None);
        }
        let w = worker(&f, Some(1));
        let (mut poller, _wake) = poller(&w, &f);
        poller.handle_poll(&CancellationToken::new()).await;
        assert_eq!(poller.in_flight.len(), 1, "--limit 1");
        // The slot is still held: the next poll claims nothing.
        poller.handle_poll(&CancellationToken::new()).await;
        assert_eq!(poller.in_flight.len(), 1);
        assert_eq!(finish(&f, &mut poller).await, 1);
        assert_eq!(f.infra.launches().len(), 1);
        // Freed: the next poll takes the next run.
        poller.handle_poll(&CancellationToken::new()).await;
        assert_eq!(poller.in_flight.len(), 1);
        finish(&f, &mut poller).await;
        assert_eq!(f.infra.launches().len(), 2);
    }

    /// A client creating `n` runs `gap` apart, each told to the poller by its `Scheduled` event.
    async fn schedule_runs(
        api: &InProcessPrefect,
        wake: &tokio::sync::mpsc::Sender<wake::Seen>,
        n: usize,
        gap: Duration,
    ) -> Vec<Uuid> {
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            let run = known_run(api, None);
            wake.send(wake::Seen::Scheduled(run.id)).await.unwrap();
            ids.push(run.id);
            tokio::time::sleep(gap).await;
        }
        ids
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_scheduled_events_costs_one_poll_at_its_end() {
        let f = fakes(InProcessPrefect::new());
        let w = worker(&f, None);
        let (mut poller, wake) = poller(&w, &f);
        let shutdown = CancellationToken::new();
        let api = f.api.clone();
        let client = async {
            // The start-up poll finds nothing; then a client creates ten runs 30 ms apart.
            tokio::time::sleep(Duration::from_millis(500)).await;
            schedule_runs(&api, &wake, 10, Duration::from_millis(30)).await;
            // Long enough for the burst's poll, short of the next interval's.
            tokio::time::sleep(Duration::from_secs(3)).await;
            shutdown.cancel();
        };
        tokio::join!(poller.serve(&shutdown), client);
        // One poll at start-up, one for the whole burst (not one per event).
        assert_eq!(f.api.polls(), 2);
        assert_eq!(poller.in_flight.len(), 10);
        finish(&f, &mut poller).await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_pools_run_is_polled_for_after_the_settle_and_a_fast_burst_at_its_end() {
        let f = fakes(InProcessPrefect::new());
        let w = worker(&f, None);
        let (mut poller, wake) = poller(&w, &f);
        let shutdown = CancellationToken::new();
        let api = f.api.clone();
        let client = async {
            // A lone run waits only for the settle, though the start-up poll was just before.
            tokio::time::sleep(Duration::from_millis(200)).await;
            schedule_runs(&api, &wake, 1, Duration::ZERO).await;
            tokio::time::sleep(burst::SETTLE / 2).await;
            assert_eq!(api.polls(), 1, "polled for a lone run before the settle");
            tokio::time::sleep(burst::SETTLE).await;
            assert_eq!(api.polls(), 2, "a lone run is polled for after the settle");
            // Later, runs created 30 ms apart: the second comes within the settle, so the
            // first is not polled for while the client is still creating them.
            tokio::time::sleep(Duration::from_secs(3)).await;
            schedule_runs(&api, &wake, 10, Duration::from_millis(30)).await;
            tokio::time::sleep(burst::QUIET - Duration::from_millis(100)).await;
            assert_eq!(api.polls(), 2, "polled in the middle of a burst");
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(api.polls(), 3, "one poll at the burst's end");
            shutdown.cancel();
        };
        tokio::join!(poller.serve(&shutdown), client);
        assert_eq!(poller.in_flight.len(), 11);
        finish(&f, &mut poller).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_well_after_a_lone_run_is_polled_for_after_the_settle_too() {
        let f = fakes(InProcessPrefect::new());
        let w = worker(&f, None);
        let (mut poller, wake) = poller(&w, &f);
        let shutdown = CancellationToken::new();
        let api = f.api.clone();
        let ctx = poller.ctx.clone();
        let client = async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            for polls in [2, 3] {
                schedule_runs(&api, &wake, 1, Duration::ZERO).await;
                tokio::time::sleep(burst::SETTLE + Duration::from_millis(10)).await;
                assert_eq!(
                    api.polls(),
                    polls,
                    "a lone run is polled for after the settle"
                );
                // Nor is its launch held for a burst.
                let now = tokio::time::Instant::now();
                assert_eq!(ctx.burst.over_at(now), None);
                // The next run 0.7 s after this one, as scenario 3 of the bench has it.
                tokio::time::sleep(Duration::from_millis(630)).await;
            }
            shutdown.cancel();
        };
        tokio::join!(poller.serve(&shutdown), client);
        assert_eq!(poller.in_flight.len(), 2);
        finish(&f, &mut poller).await;
    }

    /// Waits for the fake's `polls`-th poll, within `limit`; returns how long that took.
    async fn poll_number(api: &InProcessPrefect, polls: usize, limit: Duration) -> Duration {
        let from = tokio::time::Instant::now();
        while api.polls() < polls {
            assert!(
                from.elapsed() <= limit,
                "no poll {polls} within {limit:?} (polls: {})",
                api.polls()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(api.polls(), polls, "more than one poll at once");
        from.elapsed()
    }

    /// Asserts that the `n`-th poll again (from 0) came as long after the poll before as
    /// [`SKIPPED_REPOLL`] doubled `n` times and spread allows (to the 1 ms steps of
    /// [`poll_number`]).
    fn assert_repoll_wait(n: u32, waited: Duration) {
        let wait = repoll_wait(n);
        let (least, most) = (
            wait.mul_f64(1.0 - SKIPPED_REPOLL_JITTER),
            wait.mul_f64(1.0 + SKIPPED_REPOLL_JITTER) + Duration::from_millis(1),
        );
        assert!(
            (least..=most).contains(&waited),
            "poll again {n} after {waited:?}, not within {least:?}..={most:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_another_poll_held_is_polled_for_again_until_found_a_few_times_at_most() {
        let f = fakes(InProcessPrefect::new());
        let w = worker(&f, None);
        let (mut poller, wake) = poller(&w, &f);
        let shutdown = CancellationToken::new();
        let api = f.api.clone();
        let most = |n: u32| repoll_wait(n).mul_f64(1.0 + SKIPPED_REPOLL_JITTER);
        let client = async {
            poll_number(&api, 1, Duration::from_millis(10)).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let held = schedule_runs(&api, &wake, 1, Duration::ZERO).await;
            api.lock_for_next_poll(&held);
            let waited = poll_number(&api, 2, burst::SETTLE + Duration::from_millis(10)).await;
            assert!(waited >= burst::SETTLE, "polled for after the settle");
            // Held by another poll again.
            api.lock_for_next_poll(&held);
            assert_repoll_wait(
                0,
                poll_number(&api, 3, most(0) + Duration::from_millis(10)).await,
            );
            assert!(api.proposals(held[0]).is_empty(), "claimed, not found");
            assert_repoll_wait(
                1,
                poll_number(&api, 4, most(1) + Duration::from_millis(10)).await,
            );
            tokio::time::sleep(Duration::from_secs(3)).await;
            assert!(!api.proposals(held[0]).is_empty(), "found and claimed");
            assert_eq!(api.polls(), 4, "polled for again once found");
            // A run heard of that no poll finds (deleted since) costs a few polls more, no
            // more.
            let gone = schedule_runs(&api, &wake, 1, Duration::ZERO).await;
            api.delete(gone[0]);
            poll_number(&api, 5, burst::SETTLE + Duration::from_millis(10)).await;
            for n in 0..SKIPPED_REPOLLS {
                let waited =
                    poll_number(&api, 6 + n as usize, most(n) + Duration::from_millis(10)).await;
                assert_repoll_wait(n, waited);
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
            assert_eq!(
                api.polls(),
                5 + SKIPPED_REPOLLS as usize,
                "polled for again more than {SKIPPED_REPOLLS} times"
            );
            shutdown.cancel();
        };
        tokio::join!(poller.serve(&shutdown), client);
        assert_eq!(poller.in_flight.len(), 1, "the held run was claimed");
        finish(&f, &mut poller).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_a_poll_missed_is_not_polled_for_again_once_seen_claimed() {
        let f = fakes(InProcessPrefect::new());
        let w = worker(&f, None);
        let (mut poller, wake) = poller(&w, &f);
        let shutdown = CancellationToken::new();
        let api = f.api.clone();
        let client = async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let held = schedule_runs(&api, &wake, 1, Duration::ZERO).await;
            api.lock_for_next_poll(&held);
            tokio::time::sleep(burst::SETTLE + Duration::from_millis(10)).await;
            assert_eq!(api.polls(), 2, "polled for after the settle");
            // The poll holding it claimed it.
            wake.send(wake::Seen::Claimed(held[0])).await.unwrap();
            tokio::time::sleep(Duration::from_secs(3)).await;
            assert_eq!(api.polls(), 2, "polled for again, though claimed");
            shutdown.cancel();
        };
        tokio::join!(poller.serve(&shutdown), client);
        assert!(poller.in_flight.is_empty());
        finish(&f, &mut poller).await;
    }

    /// Runs another worker (`peer`) owns, out of `runs` known to the fake.
    fn owned_by(poller: &mut Poller<'_>, peer: &str, runs: &[Uuid]) -> Vec<Uuid> {
        let now = tokio::time::Instant::now();
        let peers = poller.peers.as_mut().expect("event wake-up on");
        peers.listed([peer], now);
        let me = poller.worker.options.name.clone();
        runs.iter()
            .copied()
            .filter(|id| peer_owns(&me, peer, *id))
            .collect()
    }

    /// Whether `peer` owns `run` in a view of `me` and `peer` (the poller's [`Peers`]).
    fn peer_owns(me: &str, peer: &str, run: Uuid) -> bool {
        let now = tokio::time::Instant::now();
        let mut peers = Peers::new(me);
        peers.listed([peer], now);
        peers.owner(run, now) == peer
    }

    #[tokio::test(start_paused = true)]
    async fn a_deferred_run_is_claimed_only_if_a_poll_still_finds_it_scheduled() {
        let f = fakes(InProcessPrefect::new());
        let runs: Vec<Uuid> = (0..12).map(|_| known_run(&f.api, None).id).collect();
        let w = worker(&f, None);
        let (mut poller, _wake) = poller(&w, &f);
        let theirs = owned_by(&mut poller, "peer", &runs);
        assert!(theirs.len() >= 2, "the peer owns a share: {theirs:?}");
        let shutdown = CancellationToken::new();

        poller.handle_poll(&shutdown).await;
        assert_eq!(poller.in_flight.len(), runs.len() - theirs.len());
        assert_eq!(poller.deferred.len(), theirs.len());
        // The owner claims all of its runs but the last one in time.
        let (left, claimed) = theirs.split_last().expect("two or more");
        for id in claimed {
            f.api.set(*id, StateType::Pending);
        }
        // Before the deadline a poll claims none of them.
        tokio::time::advance(peers::DEFER / 2).await;
        poller.handle_poll(&shutdown).await;
        assert_eq!(poller.deferred.len(), 1, "the claimed ones are dropped");
        tokio::time::advance(peers::DEFER).await;
        poller.handle_poll(&shutdown).await;
        assert!(poller.in_flight.contains(left));
        assert!(poller.deferred.is_empty());
        for id in claimed {
            assert!(
                f.api.proposals(*id).is_empty(),
                "no proposal for a run its owner claimed"
            );
            assert!(!poller.in_flight.contains(id));
        }
        // The owner that let a run pass owns nothing more until seen again.
        let now = tokio::time::Instant::now();
        assert_eq!(poller.peers.as_mut().expect("peers").count(now), 1);
        finish(&f, &mut poller).await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_owner_at_work_on_its_share_gets_the_time_once_more() {
        let f = fakes(InProcessPrefect::new());
        let runs: Vec<Uuid> = (0..12).map(|_| known_run(&f.api, None).id).collect();
        let w = worker(&f, None);
        let (mut poller, _wake) = poller(&w, &f);
        let theirs = owned_by(&mut poller, "peer", &runs);
        assert!(theirs.len() >= 3, "the peer owns a share: {theirs:?}");
        let shutdown = CancellationToken::new();
        poller.handle_poll(&shutdown).await;
        assert_eq!(poller.deferred.len(), theirs.len());

        // The owner submits its first run as the deadline nears; the others are still
        // scheduled at it.
        let (first, rest) = theirs.split_first().expect("three or more");
        tokio::time::advance(peers::DEFER / 2).await;
        f.api.set(*first, StateType::Pending);
        poller.handle_seen(wake::Seen::Active("peer".into()), false);
        tokio::time::advance(peers::DEFER / 2).await;
        poller.handle_poll(&shutdown).await;
        assert_eq!(poller.deferred.len(), rest.len(), "waiting once more");
        // It claims all but the last in that time: the last is claimed, once.
        let (left, claimed) = rest.split_last().expect("two or more");
        for id in claimed {
            f.api.set(*id, StateType::Pending);
        }
        poller.handle_seen(wake::Seen::Active("peer".into()), false);
        the_last_is_claimed_once(&f, &mut poller, left, std::iter::once(first).chain(claimed))
            .await;
    }

    /// [`peers::DEFER`] later, a poll claims `left`, the one run its owner did not: no third
    /// wait, and no proposal for the runs its owner claimed (`claimed`).
    async fn the_last_is_claimed_once<'a>(
        f: &Fakes,
        poller: &mut Poller<'_>,
        left: &Uuid,
        claimed: impl Iterator<Item = &'a Uuid>,
    ) {
        tokio::time::advance(peers::DEFER).await;
        poller.handle_poll(&CancellationToken::new()).await;
        assert!(poller.deferred.is_empty(), "no third wait");
        assert!(poller.in_flight.contains(left));
        for id in claimed {
            assert!(
                f.api.proposals(*id).is_empty(),
                "no proposal for a claimed run"
            );
        }
        finish(f, poller).await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_owner_holding_its_poll_for_a_burst_gets_the_time_once_more() {
        let f = fakes(InProcessPrefect::new());
        let runs: Vec<Uuid> = (0..12).map(|_| known_run(&f.api, None).id).collect();
        let w = worker(&f, None);
        let (mut poller, _wake) = poller(&w, &f);
        let theirs = owned_by(&mut poller, "peer", &runs);
        assert!(theirs.len() >= 2, "the peer owns a share: {theirs:?}");
        let shutdown = CancellationToken::new();
        poller.handle_poll(&shutdown).await;
        assert_eq!(poller.deferred.len(), theirs.len());

        // A burst is scheduled until just before the deadline: the owner, holding its poll
        // until the burst is over, has claimed none of its runs yet.
        tokio::time::advance(peers::DEFER / 2).await;
        for _ in 0..2 {
            poller.ctx.burst.scheduled(tokio::time::Instant::now());
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        tokio::time::advance(peers::DEFER / 2).await;
        poller.handle_poll(&shutdown).await;
        assert_eq!(poller.deferred.len(), theirs.len(), "waiting once more");
        // It claims all but the last in that time: the last is claimed, once.
        let (left, claimed) = theirs.split_last().expect("two or more");
        for id in claimed {
            f.api.set(*id, StateType::Pending);
        }
        the_last_is_claimed_once(&f, &mut poller, left, claimed.iter()).await;
    }

    #[tokio::test(start_paused = true)]
    async fn deferred_runs_come_due_with_one_poll_and_a_stopped_owners_at_once() {
        let f = fakes(InProcessPrefect::new());
        let runs: Vec<Uuid> = (0..12).map(|_| known_run(&f.api, None).id).collect();
        let w = worker(&f, None);
        let (mut poller, wake) = poller(&w, &f);
        let theirs = owned_by(&mut poller, "peer", &runs);
        assert!(!theirs.is_empty(), "the peer owns a share");
        let shutdown = CancellationToken::new();
        let client = async {
            // The start-up poll defers the peer's runs; the peer then stops, well before
            // the deadline: its runs are claimed by one poll, at once.
            tokio::time::sleep(peers::DEFER / 3).await;
            assert_eq!(f.api.polls(), 1);
            wake.send(wake::Seen::Stopped("peer".into())).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(f.api.polls(), 2);
            tokio::time::sleep(peers::DEFER).await;
            shutdown.cancel();
        };
        tokio::join!(poller.serve(&shutdown), client);
        assert_eq!(f.api.polls(), 2, "nothing more to poll for");
        assert_eq!(poller.in_flight.len(), runs.len());
        finish(&f, &mut poller).await;
    }

    #[tokio::test(start_paused = true)]
    async fn on_an_idle_pool_a_run_its_owner_leaves_is_claimed_after_a_second() {
        let f = fakes(InProcessPrefect::new());
        let w = worker(&f, None);
        let (mut poller, wake) = poller(&w, &f);
        poller
            .peers
            .as_mut()
            .expect("peers")
            .listed(["peer"], tokio::time::Instant::now());
        let shutdown = CancellationToken::new();
        let api = f.api.clone();
        let mut theirs = Vec::new();
        let client = async {
            // The start-up poll finds nothing. Then two runs the peer owns, each on an idle
            // pool: it claims the first (its Pending event comes), and never the second.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let peer_run = |api: &InProcessPrefect| loop {
                let run = known_run(api, None);
                if peer_owns(&w.options.name, "peer", run.id) {
                    return run.id;
                }
                api.delete(run.id);
            };
            let claimed = peer_run(&api);
            wake.send(wake::Seen::Scheduled(claimed)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            api.set(claimed, StateType::Pending);
            wake.send(wake::Seen::Claimed(claimed)).await.unwrap();
            tokio::time::sleep(Duration::from_secs(2)).await;
            assert_eq!(api.polls(), 1, "no poll for a run its owner claimed");

            let left = peer_run(&api);
            wake.send(wake::Seen::Scheduled(left)).await.unwrap();
            tokio::time::sleep(peers::DEFER_IDLE / 2).await;
            assert_eq!(api.polls(), 1, "its owner has a second to claim it");
            tokio::time::sleep(peers::DEFER_IDLE).await;
            assert_eq!(api.polls(), 2);
            theirs = vec![claimed, left];
            shutdown.cancel();
        };
        tokio::join!(poller.serve(&shutdown), client);
        assert_eq!(
            poller.in_flight.iter().copied().collect::<Vec<_>>(),
            [theirs[1]],
            "the run left is claimed by the one poll, the claimed one never"
        );
        assert!(f.api.proposals(theirs[0]).is_empty());
        finish(&f, &mut poller).await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_start_list_of_workers_is_read_again_before_a_burst_not_in_it() {
        let f = fakes(InProcessPrefect::new());
        let w = worker(&f, None);
        let (mut poller, wake) = poller(&w, &f);
        let shutdown = CancellationToken::new();
        let api = f.api.clone();
        let client = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(api.worker_lists(), 1, "read at start");
            tokio::time::sleep(peers::START_RELIST).await;
            assert_eq!(api.worker_lists(), 2, "read again shortly, no run in sight");
            // A burst: its polls find runs, and the list, fresh, is not read in its midst.
            for _ in 0..5 {
                let run = known_run(&api, None);
                wake.send(wake::Seen::Scheduled(run.id)).await.unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
            assert!(
                api.polls() >= 3,
                "the burst was polled for: {}",
                api.polls()
            );
            shutdown.cancel();
        };
        tokio::join!(poller.serve(&shutdown), client);
        assert_eq!(f.api.worker_lists(), 2);
        assert_eq!(poller.in_flight.len(), 5);
        finish(&f, &mut poller).await;
    }

    /// Counts the polls of an idle pool over ten minutes with these other workers online.
    async fn idle_polls_in_ten_minutes(others: &[&str], work_queues: &[&str]) -> usize {
        let f = fakes(InProcessPrefect::new());
        f.api.set_online_workers(others);
        let mut w = worker(&f, None);
        w.options.work_queues = work_queues.iter().map(|q| (*q).to_owned()).collect();
        let (mut poller, _wake) = poller(&w, &f);
        let shutdown = CancellationToken::new();
        let stop = async {
            tokio::time::sleep(Duration::from_secs(600)).await;
            shutdown.cancel();
        };
        tokio::join!(poller.serve(&shutdown), stop);
        f.api.polls()
    }

    #[tokio::test(start_paused = true)]
    async fn the_workers_of_a_pool_spread_its_idle_polls() {
        // Alone: every 10 s (±30 %), as Prefect's worker.
        let alone = idle_polls_in_ten_minutes(&[], &[]).await;
        assert!((50..=75).contains(&alone), "{alone} polls alone");
        // With three others: about every 40 s each, so the pool is still polled about
        // every 10 s; and the others are not forgotten on an idle pool.
        let four = idle_polls_in_ten_minutes(&["b", "c", "d"], &[]).await;
        assert!((12..=20).contains(&four), "{four} polls with three others");
        // Restricted to a queue the others may not poll: every 10 s.
        let queue = idle_polls_in_ten_minutes(&["b", "c", "d"], &["default"]).await;
        assert!(
            (50..=75).contains(&queue),
            "{queue} polls with a queue of its own"
        );
    }

    #[test]
    fn options_never_print_credentials() {
        let options = WorkerOptions {
            settings_env: vec![("PREFECT_API_KEY".into(), "pnu_secret_key".into())],
            auth_token: Some("admin:s3cret".into()),
            events_auth: EventsAuth::Token(Some("admin:s3cret".into())),
            authorization: Some("Basic YWRtaW46czNjcmV0".into()),
            ..options(None)
        };
        for shown in [format!("{options:?}"), format!("{options:#?}")] {
            for secret in ["pnu_secret_key", "s3cret", "YWRtaW46czNjcmV0"] {
                assert!(!shown.contains(secret), "{secret} in {shown}");
            }
            assert!(shown.contains("PREFECT_API_KEY") && shown.contains("<redacted>"));
        }
    }
}
