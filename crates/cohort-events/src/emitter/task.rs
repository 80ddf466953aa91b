//! The single owner of the events socket: a `select!` loop over handle commands and socket
//! state, with one `handle_*` method per input.
//!
//! Bookkeeping: `pending` holds every accepted event not yet confirmed, in emit order, each
//! with a sequence number. While connected, `Connection::sent` of them (a prefix) have been
//! written on the current socket; a new connection starts at 0 and writes them all again
//! (`PrefectEventsClient._reconnect` re-emits `_unconfirmed_events`). A ping remembers the
//! last sequence number written before it; its pong confirms that prefix
//! (`PrefectEventsClient._checkpoint`).
//!
//! With an outbox, sequence numbers are the outbox's keys: `pending` mirrors the outbox, a
//! pong also deletes the prefix it confirms from the outbox, and events the outbox dropped to
//! respect its bound are dropped from `pending` too.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, Instant};
use tokio_tungstenite::tungstenite::{self, Bytes, Message};
use url::Url;

use super::outbox::{Outbox, Stored};
use super::{Command, EmitterConfig, Outgoing, Shared, Slot, Tuning};
use crate::backoff::Backoff;
use crate::connect::{self, describe_close, ConnectError, Handshake, Socket};

// Sockets are large; boxing keeps the state and wake-up enums small.
type Attempt = Pin<Box<dyn Future<Output = Result<Box<Socket>, ConnectError>> + Send>>;

/// Where the socket is.
enum State {
    /// No socket; try again at `retry_at`.
    Disconnected { retry_at: Instant },
    /// Handshake in progress (polled by the loop, so commands are served meanwhile).
    Connecting { attempt: Attempt },
    /// Authenticated socket.
    Connected(Box<Connection>),
}

struct Connection {
    socket: Socket,
    opened_at: Instant,
    /// How many of `pending` (from the front) were written on this socket.
    sent: usize,
    /// The ping awaiting its pong, if any; one at a time.
    ping: Option<Ping>,
    /// Next time-based checkpoint.
    checkpoint_at: Instant,
}

struct Ping {
    nonce: u64,
    /// Sequence number of the last event written before the ping.
    through: u64,
    deadline: Instant,
}

struct Pending {
    seq: u64,
    outgoing: Outgoing,
}

/// A flush waiting for every event up to `through` to be confirmed.
struct Waiter {
    through: u64,
    reply: oneshot::Sender<()>,
}

/// What woke the loop up, besides a command.
enum Wake {
    RetryDue,
    Handshake(Result<Box<Socket>, ConnectError>),
    Frame(Option<Result<Message, tungstenite::Error>>),
    CheckpointDue,
    PongOverdue,
    CloseDeadline,
    ReportDue,
}

enum Input {
    Command(Option<Command>),
    Wake(Wake),
}

pub(super) struct EmitterTask {
    config: EmitterConfig,
    tuning: Tuning,
    url: Result<Url, Arc<ConnectError>>,
    commands: mpsc::UnboundedReceiver<Command>,
    commands_open: bool,
    shared: Arc<Shared>,
    state: State,
    pending: VecDeque<Pending>,
    /// Events confirmed lately, oldest first, with when: re-sent after a reconnect
    /// ([`Tuning::resend_confirmed_within`]).
    recent: VecDeque<(Instant, Pending)>,
    /// When the last connection was lost: "recently" is counted back from then, since a
    /// server that went down with it may have been down long.
    lost_at: Option<Instant>,
    next_seq: u64,
    waiters: Vec<Waiter>,
    backoff: Backoff,
    next_nonce: u64,
    ever_connected: bool,
    /// Set by [`Command::Close`]: finish once `pending` is empty or at this instant.
    closing_deadline: Option<Instant>,
    gave_up: bool,
    outbox: Option<Outbox>,
    /// Next periodic outbox report (durable emitters only).
    report_at: Option<Instant>,
}

impl EmitterTask {
    pub(super) fn new(
        config: EmitterConfig,
        tuning: Tuning,
        commands: mpsc::UnboundedReceiver<Command>,
        shared: Arc<Shared>,
        outbox: Option<Outbox>,
    ) -> Self {
        let url = connect::events_in_url(&config.api_url).map_err(Arc::new);
        let backoff = Backoff::new(tuning.backoff_base, tuning.backoff_cap);
        Self {
            config,
            tuning,
            url,
            commands,
            commands_open: true,
            shared,
            state: State::Disconnected {
                retry_at: Instant::now(),
            },
            pending: VecDeque::new(),
            recent: VecDeque::new(),
            lost_at: None,
            next_seq: 0,
            waiters: Vec::new(),
            backoff,
            next_nonce: 0,
            ever_connected: false,
            closing_deadline: None,
            gave_up: false,
            report_at: outbox
                .as_ref()
                .map(|o| Instant::now() + o.options().report_interval),
            outbox,
        }
    }

    /// Queues events a previous process left in the outbox, ahead of anything new.
    pub(super) fn load_backlog(&mut self, backlog: Vec<Stored>) {
        for stored in backlog {
            let outgoing = match Outgoing::from_stored(&stored.json) {
                Some(outgoing) => outgoing,
                None => {
                    tracing::error!(
                        seq = stored.seq,
                        "event outbox holds an entry that is not an event; skipping it"
                    );
                    continue;
                }
            };
            self.next_seq = stored.seq + 1;
            self.pending.push_back(Pending {
                seq: stored.seq,
                outgoing,
            });
        }
        // Added, not stored: after a restart, events emitted since the channel was taken
        // over are counted already.
        self.shared
            .unconfirmed
            .fetch_add(self.pending.len(), Ordering::Relaxed);
    }

    pub(super) async fn run(mut self) {
        while !self.finished() {
            let input = tokio::select! {
                command = self.commands.recv(), if self.commands_open => Input::Command(command),
                wake = next_wake(&mut self.state, self.closing_deadline) => Input::Wake(wake),
                () = sleep_until_some(self.report_at) => Input::Wake(Wake::ReportDue),
            };
            match input {
                Input::Command(Some(Command::Emit(outgoing, slot))) => {
                    self.handle_emit(outgoing, slot).await
                }
                Input::Command(Some(Command::Flush(reply))) => self.handle_flush(reply).await,
                Input::Command(Some(Command::Close)) => self.handle_close().await,
                Input::Command(None) => {
                    // Every handle is gone: nobody can emit or flush any more.
                    self.commands_open = false;
                    self.handle_close().await;
                }
                Input::Wake(Wake::RetryDue) => self.handle_retry_due(),
                Input::Wake(Wake::Handshake(result)) => self.handle_handshake(result).await,
                Input::Wake(Wake::Frame(frame)) => self.handle_frame(frame).await,
                Input::Wake(Wake::CheckpointDue) => self.handle_checkpoint_due().await,
                Input::Wake(Wake::PongOverdue) => {
                    let timeout = self.tuning.pong_timeout;
                    self.connection_lost(format!("no pong within {timeout:?}"));
                }
                Input::Wake(Wake::CloseDeadline) => self.gave_up = true,
                Input::Wake(Wake::ReportDue) => self.handle_report_due(),
            }
        }
        self.shutdown().await;
    }

    fn finished(&self) -> bool {
        self.closing_deadline.is_some() && (self.pending.is_empty() || self.gave_up)
    }

    async fn handle_emit(&mut self, outgoing: Outgoing, slot: Option<Slot>) {
        tracing::trace!(event = %outgoing.name, id = %outgoing.id, "queueing event");
        if let Some(through) = slot.and_then(|s| s.dropped_through) {
            self.drop_through(through);
        }
        let seq = slot.map_or(self.next_seq, |s| s.seq);
        self.next_seq = seq + 1;
        self.pending.push_back(Pending { seq, outgoing });
        self.write_and_checkpoint().await;
    }

    /// Forgets events the outbox dropped to respect its bound (it logged them).
    fn drop_through(&mut self, through: u64) {
        let mut dropped = 0;
        while self.pending.front().is_some_and(|p| p.seq <= through) {
            self.pending.pop_front();
            if let State::Connected(connection) = &mut self.state {
                connection.sent = connection.sent.saturating_sub(1);
            }
            dropped += 1;
        }
        if dropped > 0 {
            self.shared
                .unconfirmed
                .fetch_sub(dropped, Ordering::Relaxed);
            self.answer_waiters();
        }
    }

    fn handle_report_due(&mut self) {
        if let Some(outbox) = &self.outbox {
            outbox.log_report();
            self.report_at = Some(Instant::now() + outbox.options().report_interval);
        }
    }

    async fn handle_flush(&mut self, reply: oneshot::Sender<()>) {
        let Some(last) = self.pending.back() else {
            let _ = reply.send(());
            return;
        };
        self.waiters.push(Waiter {
            through: last.seq,
            reply,
        });
        self.write_and_checkpoint().await;
    }

    async fn handle_close(&mut self) {
        if self.closing_deadline.is_none() {
            self.closing_deadline = Some(Instant::now() + self.tuning.close_grace);
            tracing::debug!(
                unconfirmed = self.pending.len(),
                "closing the event emitter"
            );
        }
        self.write_and_checkpoint().await;
    }

    fn handle_retry_due(&mut self) {
        match &self.url {
            Ok(url) => {
                let handshake = Handshake::events_in(url.clone(), &self.config);
                let timeout = self.tuning.connect_timeout;
                let attempt = async move { connect::open(&handshake, timeout).await.map(Box::new) };
                self.state = State::Connecting {
                    attempt: Box::pin(attempt),
                };
            }
            Err(error) => {
                tracing::error!(%error, "events cannot be sent");
                self.shared.set_last_error(Some(error.clone()));
                self.state = State::Disconnected {
                    retry_at: Instant::now() + self.backoff.longest(),
                };
            }
        }
    }

    async fn handle_handshake(&mut self, result: Result<Box<Socket>, ConnectError>) {
        let socket = match result {
            Ok(socket) => socket,
            Err(error) => return self.connect_failed(error),
        };
        let url = self.url_text();
        if self.ever_connected {
            let recent = self.requeue_recent();
            tracing::info!(%url, resending = self.pending.len(), recently_confirmed = recent, "reconnected to the events websocket");
        } else {
            tracing::info!(%url, "connected to the events websocket");
        }
        self.ever_connected = true;
        self.shared.connected.store(true, Ordering::Relaxed);
        self.shared.set_last_error(None);
        let now = Instant::now();
        self.state = State::Connected(Box::new(Connection {
            socket: *socket,
            opened_at: now,
            sent: 0,
            ping: None,
            checkpoint_at: now + self.tuning.checkpoint_interval,
        }));
        self.write_and_checkpoint().await;
    }

    fn connect_failed(&mut self, error: ConnectError) {
        let url = self.url_text();
        let waiting = self.pending.len();
        if error.is_auth_rejection() {
            // Retrying soon cannot help; keep the events and try again slowly in case the
            // server's auth string or our key changes.
            let delay = self.backoff.longest();
            tracing::error!(%url, %error, waiting, retry_in = ?delay, "events websocket rejected our credentials; check PREFECT_API_AUTH_STRING / PREFECT_API_KEY");
            self.state = State::Disconnected {
                retry_at: Instant::now() + delay,
            };
        } else {
            let delay = self.backoff.next_delay();
            tracing::warn!(%url, %error, waiting, retry_in = ?delay, "could not connect to the events websocket");
            self.state = State::Disconnected {
                retry_at: Instant::now() + delay,
            };
        }
        self.shared.set_last_error(Some(Arc::new(error)));
    }

    async fn handle_frame(&mut self, frame: Option<Result<Message, tungstenite::Error>>) {
        match frame {
            Some(Ok(Message::Pong(payload))) => self.handle_pong(&payload).await,
            Some(Ok(Message::Close(frame))) => {
                self.connection_lost(format!(
                    "server closed the connection ({})",
                    describe_close(frame.as_ref())
                ));
            }
            // tungstenite answers pings itself; the server sends nothing else on this socket.
            Some(Ok(other)) => {
                tracing::debug!(?other, "ignoring unexpected frame from the events server")
            }
            Some(Err(error)) => self.connection_lost(error.to_string()),
            None => self.connection_lost("connection closed".to_owned()),
        }
    }

    async fn handle_pong(&mut self, payload: &[u8]) {
        let State::Connected(connection) = &mut self.state else {
            return;
        };
        let Some(ping) = connection
            .ping
            .take_if(|p| payload == p.nonce.to_be_bytes())
        else {
            tracing::debug!("ignoring a pong that answers no checkpoint");
            return;
        };
        // Everything written before the ping has reached the server.
        let mut confirmed = 0;
        let now = Instant::now();
        while connection.sent > 0 && self.pending.front().is_some_and(|p| p.seq <= ping.through) {
            let done = self.pending.pop_front().expect("checked non-empty");
            if !self.tuning.resend_confirmed_within.is_zero() {
                self.recent.push_back((now, done));
            }
            connection.sent -= 1;
            confirmed += 1;
        }
        self.prune_recent(now);
        tracing::debug!(
            confirmed,
            unconfirmed = self.pending.len(),
            "events checkpointed"
        );
        self.shared
            .unconfirmed
            .fetch_sub(confirmed, Ordering::Relaxed);
        if let Some(outbox) = &self.outbox {
            // Committed on the outbox's writer thread; waited for so that a flush answered
            // below finds the outbox without what it confirmed. A failure (logged by the
            // writer) only means these events are re-sent after the next start, which the
            // server's de-duplication makes harmless.
            let _ = outbox.delete_through(ping.through).await;
        }
        self.answer_waiters();
        self.write_and_checkpoint().await;
    }

    async fn handle_checkpoint_due(&mut self) {
        let State::Connected(connection) = &mut self.state else {
            return;
        };
        connection.checkpoint_at = Instant::now() + self.tuning.checkpoint_interval;
        if connection.sent > 0 && connection.ping.is_none() {
            let result = send_ping(
                connection,
                &self.pending,
                &mut self.next_nonce,
                &self.tuning,
            )
            .await;
            if let Err(reason) = result {
                self.connection_lost(reason);
            }
        }
    }

    /// Writes whatever this socket has not carried yet, then pings if a checkpoint is due:
    /// `checkpoint_every` events unconfirmed, or someone (a flush, a close) is waiting.
    async fn write_and_checkpoint(&mut self) {
        let State::Connected(connection) = &mut self.state else {
            return;
        };
        let mut result = write_unsent(connection, &self.pending, self.tuning.write_timeout).await;
        let someone_waiting = !self.waiters.is_empty() || self.closing_deadline.is_some();
        let wanted = connection.sent >= self.tuning.checkpoint_every || someone_waiting;
        if result.is_ok() && wanted && connection.sent > 0 && connection.ping.is_none() {
            result = send_ping(
                connection,
                &self.pending,
                &mut self.next_nonce,
                &self.tuning,
            )
            .await;
        }
        if let Err(reason) = result {
            self.connection_lost(reason);
        }
    }

    fn prune_recent(&mut self, now: Instant) {
        let window = self.tuning.resend_confirmed_within;
        while self
            .recent
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > window)
            || self.recent.len() > super::RESEND_CONFIRMED_MAX
        {
            self.recent.pop_front();
        }
    }

    /// Puts the recently confirmed events back in front of `pending` (their sequence numbers
    /// are lower than any pending one, and the outbox no longer holds them, so a new pong
    /// simply drops them again). Returns how many.
    fn requeue_recent(&mut self) -> usize {
        let lost_at = self.lost_at.take().unwrap_or_else(Instant::now);
        self.prune_recent(lost_at);
        let n = self.recent.len();
        for (_, event) in self.recent.drain(..).rev() {
            self.pending.push_front(event);
        }
        self.shared.unconfirmed.fetch_add(n, Ordering::Relaxed);
        n
    }

    /// Drops the socket and schedules a reconnect. A connection that was healthy for a while
    /// reconnects at once (load balancers drop idle sockets); otherwise back off.
    fn connection_lost(&mut self, reason: String) {
        let State::Connected(connection) = &self.state else {
            return;
        };
        let delay = if connection.opened_at.elapsed() >= self.tuning.healthy_after {
            self.backoff.reset();
            Duration::ZERO
        } else {
            self.backoff.next_delay()
        };
        tracing::warn!(url = %self.url_text(), %reason, unconfirmed = self.pending.len(), retry_in = ?delay, "events websocket connection lost; will reconnect and re-send unconfirmed events");
        self.shared.connected.store(false, Ordering::Relaxed);
        self.lost_at = Some(Instant::now());
        self.state = State::Disconnected {
            retry_at: Instant::now() + delay,
        };
    }

    fn answer_waiters(&mut self) {
        let oldest_pending = self.pending.front().map(|p| p.seq);
        let mut still_waiting = Vec::new();
        for waiter in self.waiters.drain(..) {
            if oldest_pending.is_none_or(|oldest| oldest > waiter.through) {
                let _ = waiter.reply.send(());
            } else if !waiter.reply.is_closed() {
                still_waiting.push(waiter);
            }
        }
        self.waiters = still_waiting;
    }

    fn url_text(&self) -> String {
        match &self.url {
            Ok(url) => url.to_string(),
            Err(_) => self.config.api_url.to_string(),
        }
    }

    async fn shutdown(mut self) {
        if let State::Connected(connection) = &mut self.state {
            let close = connection.socket.close(None);
            let _ = tokio::time::timeout(Duration::from_secs(1), close).await;
        }
        self.shared.connected.store(false, Ordering::Relaxed);
        if self.pending.is_empty() {
            tracing::debug!("event emitter closed; every event was confirmed");
        } else if let Some(outbox) = &self.outbox {
            tracing::info!(
                unconfirmed = self.pending.len(),
                path = %outbox.path().display(),
                "event emitter closed with unconfirmed events; they stay in the outbox and are sent at the next start"
            );
        } else {
            let first = &self.pending[0].outgoing;
            tracing::warn!(
                unconfirmed = self.pending.len(),
                first_event = %first.name,
                first_id = %first.id,
                "event emitter closed with unconfirmed events; they may not have reached the server"
            );
        }
    }
}

/// Waits for whatever the current state can produce; cancel-safe, so a command arriving first
/// loses nothing (the handshake future lives in the state and is polled by reference).
async fn next_wake(state: &mut State, closing_deadline: Option<Instant>) -> Wake {
    let from_state = async {
        match state {
            State::Disconnected { retry_at } => {
                sleep_until(*retry_at).await;
                Wake::RetryDue
            }
            State::Connecting { attempt } => Wake::Handshake(attempt.await),
            State::Connected(connection) => {
                let pong_deadline = connection.ping.as_ref().map(|p| p.deadline);
                tokio::select! {
                    frame = connection.socket.next() => Wake::Frame(frame),
                    () = sleep_until(connection.checkpoint_at) => Wake::CheckpointDue,
                    () = sleep_until_some(pong_deadline) => Wake::PongOverdue,
                }
            }
        }
    };
    tokio::select! {
        wake = from_state => wake,
        () = sleep_until_some(closing_deadline) => Wake::CloseDeadline,
    }
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Writes `pending[connection.sent..]` in order, one text frame each.
async fn write_unsent(
    connection: &mut Connection,
    pending: &VecDeque<Pending>,
    write_timeout: Duration,
) -> Result<(), String> {
    while let Some(next) = pending.get(connection.sent) {
        let frame = Message::Text(next.outgoing.json.clone());
        match tokio::time::timeout(write_timeout, connection.socket.send(frame)).await {
            Ok(Ok(())) => connection.sent += 1,
            Ok(Err(error)) => return Err(format!("sending event {}: {error}", next.outgoing.id)),
            Err(_) => {
                return Err(format!(
                    "sending event {} took over {write_timeout:?}",
                    next.outgoing.id
                ))
            }
        }
    }
    Ok(())
}

/// Pings with a fresh nonce as payload, covering every event written so far.
async fn send_ping(
    connection: &mut Connection,
    pending: &VecDeque<Pending>,
    next_nonce: &mut u64,
    tuning: &Tuning,
) -> Result<(), String> {
    let Some(through) = connection
        .sent
        .checked_sub(1)
        .and_then(|i| pending.get(i))
        .map(|p| p.seq)
    else {
        return Ok(());
    };
    let nonce = *next_nonce;
    *next_nonce += 1;
    let ping = Message::Ping(Bytes::copy_from_slice(&nonce.to_be_bytes()));
    match tokio::time::timeout(tuning.write_timeout, connection.socket.send(ping)).await {
        Ok(Ok(())) => {
            connection.ping = Some(Ping {
                nonce,
                through,
                deadline: Instant::now() + tuning.pong_timeout,
            });
            Ok(())
        }
        Ok(Err(error)) => Err(format!("sending a checkpoint ping: {error}")),
        Err(_) => Err(format!(
            "sending a checkpoint ping took over {:?}",
            tuning.write_timeout
        )),
    }
}
