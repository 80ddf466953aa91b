//! The `/api/events/in` websocket client: a cloneable [`Emitter`] handle in front of one task
//! that owns the socket (`prefect/events/clients.py: PrefectEventsClient`).
//!
//! What the task does, as Prefect's client does it:
//! * connect (subprotocol `prefect`), ping and wait for the pong, then authenticate with
//!   `{"type":"auth","token":…}` and expect `{"type":"auth_success"}` (Prefect Cloud instead
//!   takes `Authorization: bearer <key>` on the upgrade request and no auth frame);
//! * send each event as one text frame; the server never acknowledges events, so sent events
//!   stay "unconfirmed" until a websocket ping sent after them is answered: a pong proves
//!   everything written before its ping reached the server ("checkpointing", every 700
//!   events and every 30 s);
//! * on any socket failure, reconnect (jittered exponential backoff, capped, forever) and
//!   re-send every unconfirmed event in order before new ones; the server de-duplicates by
//!   event id, so a re-send is harmless while a loss is not.
//!
//! With [`Emitter::spawn_durable`], every event is also committed to an [`Outbox`] (a redb
//! file under `PREFECT_HOME`, written by its own thread) before `emit` resolves and before it
//! is sent, deleted only when a pong confirms it, and loaded and re-sent first after a
//! restart, of the process or of the task ([`Emitter::restart`]); see [`outbox`] for the
//! bound and the cost.
//! [`Emitter::spawn`] keeps events in memory only.
//!
//! Differences from Prefect, on purpose: reconnection never gives up (Prefect gives up after
//! 10 attempts and drops the event), and a ping left unanswered for `pong_timeout` counts as
//! a dead connection.

pub mod outbox;
mod task;

#[cfg(test)]
mod fake_events_server;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use uuid::Uuid;

use crate::event::Event;
use crate::sink::{Emitted, EventSink};

pub use crate::connect::{events_in_url, ConnectError};
pub use outbox::{Outbox, OutboxError, OutboxOptions, OutboxStats};

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct EmitterConfig {
    /// `PREFECT_API_URL`, e.g. `http://127.0.0.1:4200/api`; the socket is `…/events/in` on
    /// the `ws`/`wss` scheme.
    pub api_url: url::Url,
    /// How to authenticate.
    pub auth: EventsAuth,
    /// `User-Agent` on the upgrade request (the server parses `prefect/<version>` out of it).
    pub user_agent: String,
}

/// How the events socket authenticates.
#[derive(Clone)]
pub enum EventsAuth {
    /// Self-hosted server: first frame `{"type":"auth","token":<token or null>}`; a token
    /// (`PREFECT_API_AUTH_STRING`) is also sent as `Authorization: Basic …` for proxies.
    Token(Option<String>),
    /// Prefect Cloud: `Authorization: bearer <api key>` on the upgrade, no auth frame.
    Bearer(String),
}

impl std::fmt::Debug for EventsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print credentials.
        match self {
            EventsAuth::Token(None) => f.write_str("Token(None)"),
            EventsAuth::Token(Some(_)) => f.write_str("Token(Some(<redacted>))"),
            EventsAuth::Bearer(_) => f.write_str("Bearer(<redacted>)"),
        }
    }
}

/// Timing knobs; the defaults are Prefect's (`checkpoint_every=700`, `checkpoint_interval=30`)
/// plus Cohort's reconnection policy. Tests shrink them.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Ping after this many sent-but-unconfirmed events.
    pub checkpoint_every: usize,
    /// Ping at least this often while events are unconfirmed.
    pub checkpoint_interval: Duration,
    /// A ping unanswered for this long means the connection is dead.
    pub pong_timeout: Duration,
    /// Budget for TCP/TLS connect, upgrade, first ping/pong and authentication.
    pub connect_timeout: Duration,
    /// Budget for writing one frame.
    pub write_timeout: Duration,
    /// First reconnection delay (before jitter).
    pub backoff_base: Duration,
    /// Largest reconnection delay.
    pub backoff_cap: Duration,
    /// A connection that lived this long resets the backoff (the next reconnect is
    /// immediate, like Prefect's first retries).
    pub healthy_after: Duration,
    /// After [`Emitter::close`], how long the task keeps trying to confirm what is pending.
    pub close_grace: Duration,
    /// After a reconnect, events confirmed within this long before the connection was lost
    /// are sent again (up to
    /// [`RESEND_CONFIRMED_MAX`]): a confirmation means the server *received* an event, not
    /// that it stored it — Prefect's server queues events in memory and writes them in
    /// batches, so a server that stopped may have lost what it confirmed last. The server
    /// stores an event id once, so a copy of a stored event costs nothing. Zero disables it.
    pub resend_confirmed_within: Duration,
}

/// At most this many recently confirmed events are kept for re-sending.
pub const RESEND_CONFIRMED_MAX: usize = 10_000;

impl Default for Tuning {
    fn default() -> Self {
        Self {
            checkpoint_every: 700,
            checkpoint_interval: Duration::from_secs(30),
            pong_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(30),
            healthy_after: Duration::from_secs(10),
            close_grace: Duration::from_secs(2),
            // Prefect's persister writes every 5 s by default; a backlog takes longer.
            resend_confirmed_within: Duration::from_secs(30),
        }
    }
}

/// Why [`Emitter::flush`] did not confirm everything.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    /// The deadline passed first. Not retryable as such, but the events are still queued
    /// and the emitter keeps trying to deliver them.
    #[error(
        "{unconfirmed} event(s) not confirmed by the events server after {waited:?} \
         ({connection}){}",
        last_error.as_ref().map(|e| format!("; last connection error: {e}")).unwrap_or_default()
    )]
    Timeout {
        /// Events still waiting for a pong when the deadline passed.
        unconfirmed: usize,
        /// How long the flush waited.
        waited: Duration,
        /// `connected` or `disconnected` at the deadline.
        connection: &'static str,
        /// The latest failure to connect, if any (e.g. an authentication rejection).
        #[source]
        last_error: Option<Arc<ConnectError>>,
    },
    /// The emitter task has ended (after [`Emitter::close`], or it panicked).
    #[error("the event emitter has shut down; unconfirmed events were dropped")]
    Closed,
}

/// An event already validated and serialized, as the task keeps it.
#[derive(Debug)]
struct Outgoing {
    id: Uuid,
    name: String,
    /// The text frame; cheap to clone for re-sends.
    json: Utf8Bytes,
}

/// Where a durable event sits in the outbox.
#[derive(Debug, Clone, Copy)]
struct Slot {
    /// Its key in the outbox (the task uses it as the sequence number).
    seq: u64,
    /// The outbox dropped every event up to this key to respect its bound.
    dropped_through: Option<u64>,
}

impl Outgoing {
    /// Rebuilds an event from its stored wire JSON; `None` if it is not an event.
    fn from_stored(json: &str) -> Option<Outgoing> {
        let value: serde_json::Value = serde_json::from_str(json).ok()?;
        let id = value.get("id")?.as_str()?.parse().ok()?;
        let name = value.get("event")?.as_str()?.to_owned();
        Some(Outgoing {
            id,
            name,
            json: json.to_owned().into(),
        })
    }
}

enum Command {
    Emit(Outgoing, Option<Slot>),
    Flush(oneshot::Sender<()>),
    Close,
}

/// State handles read without a round trip to the task.
#[derive(Debug, Default)]
struct Shared {
    /// Incremented by [`Emitter::emit`], decremented by the task on confirmation.
    unconfirmed: AtomicUsize,
    connected: AtomicBool,
    last_error: Mutex<Option<Arc<ConnectError>>>,
}

impl Shared {
    fn last_error(&self) -> Option<Arc<ConnectError>> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_last_error(&self, error: Option<Arc<ConnectError>>) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = error;
    }
}

/// Cloneable handle to the emitter task. Dropping every handle closes the task like
/// [`Emitter::close`].
#[derive(Clone)]
pub struct Emitter {
    /// The task's command channel; replaced by [`Emitter::restart`].
    commands: Arc<Commands>,
    shared: Arc<Shared>,
    outbox: Option<Outbox>,
    /// What a restarted task needs.
    setup: Arc<(EmitterConfig, Tuning)>,
}

type Commands = RwLock<mpsc::UnboundedSender<Command>>;

impl Emitter {
    /// Starts the task with Prefect's default checkpointing. Needs a tokio runtime.
    pub fn spawn(config: EmitterConfig) -> (Emitter, JoinHandle<()>) {
        Self::spawn_with(config, Tuning::default())
    }

    /// Starts the task with explicit timing.
    pub fn spawn_with(config: EmitterConfig, tuning: Tuning) -> (Emitter, JoinHandle<()>) {
        let (commands, receiver) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared::default());
        let task = task::EmitterTask::new(
            config.clone(),
            tuning.clone(),
            receiver,
            shared.clone(),
            None,
        );
        let handle = tokio::spawn(task.run());
        let emitter = Emitter {
            commands: Arc::new(RwLock::new(commands)),
            shared,
            outbox: None,
            setup: Arc::new((config, tuning)),
        };
        (emitter, handle)
    }

    /// Starts the task with a durable [`Outbox`]: events it holds from a previous process are
    /// loaded and sent first, in order; every [`emit`](Self::emit) commits its event to the
    /// outbox before it resolves; a pong deletes what it confirms. Fails only when the outbox
    /// cannot be read.
    pub fn spawn_durable(
        config: EmitterConfig,
        tuning: Tuning,
        outbox: Outbox,
    ) -> Result<(Emitter, JoinHandle<()>), OutboxError> {
        let backlog = outbox.load()?;
        log_backlog(&outbox, &backlog, "from a previous run");
        let (commands, receiver) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared::default());
        let mut task = task::EmitterTask::new(
            config.clone(),
            tuning.clone(),
            receiver,
            shared.clone(),
            Some(outbox.clone()),
        );
        task.load_backlog(backlog);
        let handle = tokio::spawn(task.run());
        let emitter = Emitter {
            commands: Arc::new(RwLock::new(commands)),
            shared,
            outbox: Some(outbox),
            setup: Arc::new((config, tuning)),
        };
        Ok((emitter, handle))
    }

    /// A new task for these handles, for a supervisor to run after the previous task ended
    /// without [`close`](Self::close) (it panicked). It takes over the command channel. A
    /// durable emitter's new task starts from the outbox: every event emitted and not yet
    /// confirmed, in order, each exactly once, so nothing is lost; an in-memory emitter's
    /// unconfirmed events died with the old task (logged). Fails only when the outbox cannot
    /// be read.
    pub async fn restart(&self) -> Result<impl Future<Output = ()> + Send + 'static, OutboxError> {
        let (commands, receiver) = mpsc::unbounded_channel();
        let swap = {
            let handles = self.commands.clone();
            let shared = self.shared.clone();
            move || {
                *handles.write().unwrap_or_else(|p| p.into_inner()) = commands;
                shared.unconfirmed.store(0, Ordering::Relaxed);
                shared.connected.store(false, Ordering::Relaxed);
            }
        };
        let (config, tuning) = (*self.setup).clone();
        let mut task = task::EmitterTask::new(
            config,
            tuning,
            receiver,
            self.shared.clone(),
            self.outbox.clone(),
        );
        match &self.outbox {
            Some(outbox) => {
                // On the outbox's writer thread, between two commits: every event committed
                // so far is in the backlog, every later one reaches the new channel.
                let backlog = outbox.reload(Box::new(swap)).await?;
                log_backlog(outbox, &backlog, "after the emitter task stopped");
                task.load_backlog(backlog);
            }
            None => {
                let lost = self.unconfirmed();
                swap();
                if lost > 0 {
                    tracing::error!(
                        lost,
                        "the event emitter task stopped; its unconfirmed events are lost"
                    );
                }
            }
        }
        Ok(task.run())
    }

    /// Queues `event` for delivery; resolves once it is as safe as this emitter makes it. An
    /// event that fails validation is logged and dropped here: the server would drop the
    /// connection over it, and the resend would loop forever.
    ///
    /// The event is queued when `emit` is called, whether or not the future is awaited. For
    /// an in-memory emitter the future is ready at once. For a durable one it resolves once
    /// the event is committed to the outbox (a redb transaction with an `fsync`, made on the
    /// outbox's own writer thread, never on the caller's; emits made meanwhile share the next
    /// commit), and the task sends the event only after that commit. If the commit fails the
    /// error is logged and the event is still delivered from memory (use
    /// [`try_emit`](Self::try_emit) to see the error).
    pub fn emit(&self, event: Event) -> impl Future<Output = ()> + Send + 'static {
        let committed = self.try_emit(event);
        async move {
            if let Err(error) = committed.await {
                tracing::error!(%error, "could not write the event to the outbox; it is queued in memory only and is lost if the worker stops before the server confirms it");
            }
        }
    }

    /// Like [`emit`](Self::emit), but resolves to the outbox's error when a durable emitter
    /// could not commit the event (it is still queued in memory and sent).
    pub fn try_emit(
        &self,
        event: Event,
    ) -> impl Future<Output = Result<(), OutboxError>> + Send + 'static {
        let committed = self.queue(event);
        async move {
            match committed {
                Some(committed) => committed.await,
                None => Ok(()),
            }
        }
    }

    /// The synchronous half of [`try_emit`](Self::try_emit): validates and queues; for a
    /// durable emitter, returns the commit to wait for.
    fn queue(
        &self,
        event: Event,
    ) -> Option<impl Future<Output = Result<(), OutboxError>> + Send + 'static> {
        let json = match event.to_wire_json() {
            Ok(json) => json,
            Err(error) => {
                tracing::error!(event = %event.event, id = %event.id, %error, "dropping invalid event");
                return None;
            }
        };
        let stored = self.outbox.as_ref().map(|_| json.clone());
        let outgoing = Outgoing {
            id: event.id,
            name: event.event,
            json: json.into(),
        };
        let (Some(outbox), Some(stored)) = (&self.outbox, stored) else {
            enqueue(&self.commands, &self.shared, outgoing, None);
            return None;
        };
        // The writer hands the event to the task only once it is committed, in key order.
        // What it holds must not own an `Outbox` (the writer would end up dropping its own).
        let (commands, shared) = (self.commands.clone(), self.shared.clone());
        let hand_on: outbox::Enqueue = Box::new(move |appended: outbox::Appended| {
            let slot = Slot {
                seq: appended.seq,
                dropped_through: appended.dropped_through,
            };
            enqueue(&commands, &shared, outgoing, Some(slot));
        });
        Some(outbox.append(stored, hand_on))
    }

    /// Events in the durable outbox (committed, not yet confirmed), as of the latest commit;
    /// `None` for an in-memory emitter.
    pub fn outbox_depth(&self) -> Option<usize> {
        self.outbox.as_ref().map(Outbox::depth)
    }

    /// The durable outbox, if any.
    pub fn outbox(&self) -> Option<&Outbox> {
        self.outbox.as_ref()
    }

    /// Waits until every event emitted before this call is confirmed by the server (a ping is
    /// sent now rather than at the next checkpoint), or `timeout` passes.
    pub async fn flush(&self, timeout: Duration) -> Result<(), FlushError> {
        let (reply, confirmed) = oneshot::channel();
        if self.send(Command::Flush(reply)).is_err() {
            return Err(FlushError::Closed);
        }
        match tokio::time::timeout(timeout, confirmed).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(FlushError::Closed),
            Err(_) => Err(FlushError::Timeout {
                unconfirmed: self.unconfirmed(),
                waited: timeout,
                connection: if self.is_connected() {
                    "connected"
                } else {
                    "disconnected"
                },
                last_error: self.last_error(),
            }),
        }
    }

    /// Asks the task to finish: it keeps trying to confirm pending events for
    /// [`Tuning::close_grace`], then closes the socket and ends. Events still unconfirmed then
    /// are logged as lost.
    pub fn close(&self) {
        let _ = self.send(Command::Close);
    }

    fn send(&self, command: Command) -> Result<(), mpsc::error::SendError<Command>> {
        self.commands
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .send(command)
    }

    /// Events accepted but not yet confirmed by a pong (queued, in flight, or awaiting a
    /// resend).
    pub fn unconfirmed(&self) -> usize {
        self.shared.unconfirmed.load(Ordering::Relaxed)
    }

    /// Whether the socket is currently up and authenticated.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }

    /// The latest connection failure, cleared by a successful connection.
    pub fn last_error(&self) -> Option<Arc<ConnectError>> {
        self.shared.last_error()
    }
}

impl EventSink for Emitter {
    fn emit(&self, event: Event) -> Emitted {
        Box::pin(Emitter::emit(self, event))
    }
}

/// Counts `outgoing` as unconfirmed and hands it to the task; counted here rather than by the
/// task, so `unconfirmed()` right after an emit already includes the event (the task
/// subtracts what pongs confirm).
fn enqueue(commands: &Commands, shared: &Shared, outgoing: Outgoing, slot: Option<Slot>) {
    shared.unconfirmed.fetch_add(1, Ordering::Relaxed);
    let sent = commands
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .send(Command::Emit(outgoing, slot));
    if let Err(mpsc::error::SendError(Command::Emit(lost, _))) = sent {
        shared.unconfirmed.fetch_sub(1, Ordering::Relaxed);
        if slot.is_some() {
            tracing::warn!(event = %lost.name, id = %lost.id, "event emitter has shut down; event kept in the outbox for the next start");
        } else {
            tracing::warn!(event = %lost.name, id = %lost.id, "event emitter has shut down; event dropped");
        }
    }
}

fn log_backlog(outbox: &Outbox, backlog: &[outbox::Stored], when: &str) {
    if let Some(first) = backlog.first() {
        tracing::info!(
            path = %outbox.path().display(),
            events = backlog.len(),
            first_seq = first.seq,
            "event outbox holds events {when}; sending them first"
        );
    }
}
