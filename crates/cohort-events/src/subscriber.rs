//! The `/api/events/out` websocket client: one task owns the socket and feeds a channel of
//! matching events, which workers and runners watch to learn at once that a flow run is being
//! cancelled (`prefect/events/clients.py: PrefectEventSubscriber`; server side
//! `prefect/server/api/events.py: stream_workspace_events_out`,
//! `prefect/server/events/stream.py`).
//!
//! The protocol, as Prefect's client speaks it:
//! * connect with subprotocol `prefect`, ping and wait for the pong, then authenticate with
//!   `{"type":"auth","token":…}` (the auth string, or the API key on Prefect Cloud; no
//!   `Authorization` header on this socket) and expect `{"type":"auth_success"}`;
//! * send `{"type":"filter","filter":<EventFilter>}` with `occurred` overwritten to
//!   `{since: <cursor>, until: now + 365 days}`. `until` must lie in the future because the
//!   server applies the whole filter, `occurred` included, to live events too;
//! * the server never acknowledges the filter; it backfills stored events from `since`
//!   (clamped to 15 minutes ago, `PREFECT_SERVER_EVENTS_MAXIMUM_WEBSOCKET_BACKFILL`), oldest
//!   first, then streams live ones, each as `{"type":"event","event":<ReceivedEvent>}`;
//! * every event moves the cursor to `event.occurred − 1 min`, so a reconnection resubscribes
//!   from just before the newest event seen and the backfill covers the gap; events are
//!   de-duplicated by id, which makes the overlap harmless.
//!
//! Differences from Prefect, on purpose: reconnection never gives up, a clean close (1000)
//! reconnects too (Prefect ends the iteration, and a worker would silently lose its
//! cancellation feed), the cursor starts when [`subscribe`] is called rather than at the first
//! successful connection (so events during an initial outage are backfilled), the cursor never
//! moves past `now − 1 min` (an event stamped in the future must not blind the feed), a
//! malformed event is skipped rather than ending the stream, and a keepalive ping left
//! unanswered for [`SubscriberTuning::pong_timeout`] counts as a dead connection (as the
//! `websockets` library's keepalive does for Prefect).
//!
//! What the server cannot promise: it subscribes to the live stream before it queries the
//! backfill, but an event published before the filter arrived and persisted only after the
//! backfill query (persistence is batched) is seen by neither. Consumers that must not miss a
//! cancellation poll once after [`Subscription::connected`] turns true, as well as while it is
//! false.

mod seen;

#[cfg(test)]
mod fake_events_out_server;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use futures_util::{SinkExt as _, StreamExt as _};
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Bytes, Message};
use url::Url;

use crate::backoff::Backoff;
use crate::connect::{self, describe_close, ConnectError, Handshake, Socket};
use crate::emitter::EventsAuth;
use crate::event::Event;

pub use crate::connect::events_out_url;
use seen::SeenEvents;

/// How far back the first subscription reaches (`PrefectEventSubscriber._reconnect`:
/// `now − 1 minute`).
pub const INITIAL_LOOKBACK: TimeDelta = TimeDelta::minutes(1);
/// How far before the newest event seen a resubscription starts
/// (`PrefectEventSubscriber.__anext__`: `event.occurred − 1 minute`).
pub const REPLAY_MARGIN: TimeDelta = TimeDelta::minutes(1);
/// The `until` of every subscription: far enough ahead that live events always match
/// (`PrefectEventSubscriber._reconnect`: `now + 365 days`).
pub const SUBSCRIPTION_HORIZON: TimeDelta = TimeDelta::days(365);

/// Where to connect and what to ask for.
#[derive(Debug, Clone)]
pub struct SubscriberConfig {
    /// `PREFECT_API_URL`, e.g. `http://127.0.0.1:4200/api`; the socket is `…/events/out` on
    /// the `ws`/`wss` scheme.
    pub api_url: Url,
    /// How to authenticate. Both modes send the auth frame on this socket: `Token` carries
    /// `PREFECT_API_AUTH_STRING` (or null), `Bearer` carries the Cloud API key
    /// (`PrefectCloudEventSubscriber`).
    pub auth: EventsAuth,
    /// `User-Agent` on the upgrade request.
    pub user_agent: String,
    /// The `EventFilter` JSON without `occurred`, e.g.
    /// `{"event": {"name": ["prefect.flow-run.Cancelling"]}}`; `null` means every event. The
    /// subscriber sets `occurred` itself, replacing any given here. Must be a JSON object:
    /// anything else is logged as an error and no connection is attempted (the
    /// [`Subscription`] stays disconnected, so consumers keep polling).
    pub filter: serde_json::Value,
}

/// Timing and memory knobs; the defaults suit a worker. Tests shrink them.
#[derive(Debug, Clone)]
pub struct SubscriberTuning {
    /// Budget for TCP/TLS connect, upgrade, first ping/pong, authentication and the filter.
    pub connect_timeout: Duration,
    /// Ping this often while subscribed; the server sends nothing while no event matches, so
    /// this is the only way to notice a dead peer (`websockets`' `ping_interval`, 20 s).
    pub keepalive_interval: Duration,
    /// A ping unanswered for this long means the connection is dead (`ping_timeout`, 20 s).
    pub pong_timeout: Duration,
    /// First reconnection delay (before jitter).
    pub backoff_base: Duration,
    /// Largest reconnection delay; also the pace of retries after an authentication
    /// rejection or a refused filter.
    pub backoff_cap: Duration,
    /// A subscription that lived this long resets the backoff (the next reconnect is
    /// immediate: load balancers drop idle sockets).
    pub healthy_after: Duration,
    /// How long an event id is remembered for de-duplication. Must exceed the server's
    /// backfill window (15 minutes) plus [`REPLAY_MARGIN`], so that nothing a resubscription
    /// replays is delivered twice. Prefect uses 120 s, which lets a reconnection after a
    /// longer outage deliver duplicates.
    pub seen_ttl: Duration,
    /// At most this many ids are remembered; the oldest are forgotten first.
    pub seen_capacity: usize,
    /// Capacity of [`Subscription::events`]. While it and an equal internal buffer are full
    /// the socket is not read (the server drops what a slow subscriber cannot take, and a
    /// long stall costs a reconnection, which the backfill repairs).
    pub buffer: usize,
}

impl Default for SubscriberTuning {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(20),
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(30),
            healthy_after: Duration::from_secs(10),
            seen_ttl: Duration::from_secs(20 * 60),
            seen_capacity: 100_000,
            buffer: 256,
        }
    }
}

/// The consumer's side of a subscription. Dropping [`Subscription::events`] ends the task.
#[derive(Debug)]
pub struct Subscription {
    /// Every matching event once (de-duplicated by id, also across reconnects), in arrival
    /// order: backfill oldest first, then live. The server's `received` field is dropped.
    pub events: mpsc::Receiver<Event>,
    /// True while a live subscription is established (the filter was sent on an
    /// authenticated socket); consumers run a polling fallback while false.
    pub connected: watch::Receiver<bool>,
}

/// Why a subscription could not be established or was lost. Every variant is retried; the
/// ones [`SubscribeError::is_rejection`] names wait [`SubscriberTuning::backoff_cap`], since
/// only a configuration change fixes them.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    /// Connecting or authenticating failed (see [`ConnectError`]; an authentication
    /// rejection is a rejection).
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// [`SubscriberConfig::filter`] is not a JSON object. Not fixed by retrying; no
    /// connection is attempted.
    #[error("the event filter must be a JSON object or null, not `{filter}`")]
    FilterNotAnObject {
        /// The configured filter.
        filter: String,
    },
    /// Sending the filter frame failed or timed out. Retryable.
    #[error("events websocket {url}: sending the filter: {reason}")]
    SendFilter {
        /// The socket URL.
        url: Url,
        /// What went wrong.
        reason: String,
    },
    /// The server closed the subscription with 1002 (protocol error): it refused the filter
    /// (`"Invalid filter: …"`) or did not take it for a filter message. A rejection.
    #[error("events websocket {url} refused the subscription: {reason}")]
    FilterRefused {
        /// The socket URL.
        url: Url,
        /// Close code and reason.
        reason: String,
    },
    /// An established subscription ended: a close frame (clean ones included), a socket
    /// error, end of stream, or an unanswered keepalive ping. Retryable at once after a
    /// healthy subscription.
    #[error("events websocket {url}: subscription lost: {reason}")]
    Lost {
        /// The socket URL.
        url: Url,
        /// What ended it.
        reason: String,
    },
}

impl SubscribeError {
    /// True for failures that retrying soon cannot fix: rejected credentials, a refused filter,
    /// a filter that is not an object.
    pub fn is_rejection(&self) -> bool {
        match self {
            SubscribeError::Connect(error) => error.is_auth_rejection(),
            SubscribeError::FilterNotAnObject { .. } | SubscribeError::FilterRefused { .. } => true,
            SubscribeError::SendFilter { .. } | SubscribeError::Lost { .. } => false,
        }
    }
}

/// Starts the subscription task with [`SubscriberTuning::default`]. Needs a tokio runtime.
/// The task runs until [`Subscription::events`] is dropped.
pub fn subscribe(config: SubscriberConfig) -> (Subscription, JoinHandle<()>) {
    subscribe_with(config, SubscriberTuning::default())
}

/// Starts the subscription task with explicit tuning.
pub fn subscribe_with(
    config: SubscriberConfig,
    tuning: SubscriberTuning,
) -> (Subscription, JoinHandle<()>) {
    let (events_tx, events) = mpsc::channel(tuning.buffer.max(1));
    let (connected_tx, connected) = watch::channel(false);
    let task = SubscriberTask::new(config, tuning, events_tx, connected_tx);
    let handle = tokio::spawn(task.run());
    (Subscription { events, connected }, handle)
}

/// `{"type":"filter","filter":…}` with `occurred` set to `[since, now + 365 days]`
/// (`PrefectEventSubscriber._reconnect`), timestamps in pydantic's UTC form.
fn filter_frame(
    filter: &serde_json::Map<String, serde_json::Value>,
    since: DateTime<Utc>,
    now: DateTime<Utc>,
) -> String {
    let timestamp = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Micros, true);
    let mut filter = filter.clone();
    filter.insert(
        "occurred".to_owned(),
        serde_json::json!({
            "since": timestamp(since),
            "until": timestamp(now + SUBSCRIPTION_HORIZON),
        }),
    );
    serde_json::json!({"type": "filter", "filter": filter}).to_string()
}

/// The filter as a JSON object; `null` is the empty filter (`EventFilter()`).
fn filter_object(
    filter: &serde_json::Value,
) -> Result<serde_json::Map<String, serde_json::Value>, SubscribeError> {
    match filter {
        serde_json::Value::Object(map) => Ok(map.clone()),
        serde_json::Value::Null => Ok(serde_json::Map::new()),
        other => Err(SubscribeError::FilterNotAnObject {
            filter: other.to_string(),
        }),
    }
}

/// One frame from the server; only `event` frames are expected.
#[derive(Deserialize)]
struct ServerFrame {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    event: Option<serde_json::Value>,
}

// Sockets are large; boxing keeps the state and wake-up enums small.
type Attempt = Pin<Box<dyn Future<Output = Result<Box<Socket>, SubscribeError>> + Send>>;

/// Where the subscription is.
enum State {
    /// No socket; try again at `retry_at`.
    Waiting { retry_at: Instant },
    /// Handshake and filter in progress, subscribing from `since`.
    Connecting {
        attempt: Attempt,
        since: DateTime<Utc>,
    },
    /// The filter was sent; events flow.
    Subscribed(Box<Connection>),
}

struct Connection {
    socket: Socket,
    opened_at: Instant,
    /// Next keepalive ping.
    ping_at: Instant,
    /// The keepalive ping awaiting its pong: its payload and deadline.
    ping: Option<(u64, Instant)>,
}

/// What woke the loop up, besides the consumer.
enum Wake {
    RetryDue,
    Subscribed(Result<Box<Socket>, SubscribeError>),
    Frame(Option<Result<Message, tungstenite::Error>>),
    KeepaliveDue,
    PongOverdue,
}

struct SubscriberTask {
    tuning: SubscriberTuning,
    user_agent: String,
    auth: EventsAuth,
    /// Socket URL and filter object, or why there can be none.
    target: Result<(Url, serde_json::Map<String, serde_json::Value>), Arc<SubscribeError>>,
    /// For log lines when `target` is an error.
    api_url: Url,
    events: mpsc::Sender<Event>,
    connected: watch::Sender<bool>,
    state: State,
    /// Events taken off the socket, waiting for room in `events`.
    ready: VecDeque<Event>,
    seen: SeenEvents,
    /// Where the next subscription starts.
    cursor: DateTime<Utc>,
    backoff: Backoff,
    ever_subscribed: bool,
    next_nonce: u64,
}

impl SubscriberTask {
    fn new(
        config: SubscriberConfig,
        tuning: SubscriberTuning,
        events: mpsc::Sender<Event>,
        connected: watch::Sender<bool>,
    ) -> Self {
        let target = events_out_url(&config.api_url)
            .map_err(SubscribeError::from)
            .and_then(|url| Ok((url, filter_object(&config.filter)?)))
            .map_err(Arc::new);
        Self {
            backoff: Backoff::new(tuning.backoff_base, tuning.backoff_cap),
            seen: SeenEvents::new(tuning.seen_ttl, tuning.seen_capacity),
            ready: VecDeque::new(),
            tuning,
            user_agent: config.user_agent,
            auth: config.auth,
            target,
            api_url: config.api_url,
            events,
            connected,
            state: State::Waiting {
                retry_at: Instant::now(),
            },
            cursor: Utc::now() - INITIAL_LOOKBACK,
            ever_subscribed: false,
            next_nonce: 0,
        }
    }

    async fn run(mut self) {
        loop {
            let room = self.ready.len() < self.tuning.buffer.max(1);
            let wake = tokio::select! {
                biased;
                () = self.events.closed() => break,
                permit = self.events.reserve(), if !self.ready.is_empty() => {
                    match (permit, self.ready.pop_front()) {
                        (Ok(permit), Some(event)) => permit.send(event),
                        (Err(_), _) => break, // the consumer is gone
                        (Ok(_), None) => {}
                    }
                    continue;
                }
                wake = next_wake(&mut self.state), if room => wake,
            };
            match wake {
                Wake::RetryDue => self.handle_retry_due(),
                Wake::Subscribed(result) => self.handle_subscribed(result),
                Wake::Frame(frame) => self.handle_frame(frame),
                Wake::KeepaliveDue => self.handle_keepalive_due().await,
                Wake::PongOverdue => {
                    let reason = format!("no pong within {:?}", self.tuning.pong_timeout);
                    self.subscription_lost(reason, false);
                }
            }
        }
        self.shutdown().await;
    }

    fn handle_retry_due(&mut self) {
        let (url, filter) = match &self.target {
            Ok(target) => target,
            Err(error) => {
                let delay = self.backoff.longest();
                tracing::error!(api_url = %self.api_url, %error, retry_in = ?delay, "cannot subscribe to events; flow-run cancellations are only seen by polling");
                self.state = State::Waiting {
                    retry_at: Instant::now() + delay,
                };
                return;
            }
        };
        let since = self.cursor;
        let frame = filter_frame(filter, since, Utc::now());
        let handshake = Handshake::events_out(url.clone(), &self.user_agent, &self.auth);
        let timeout = self.tuning.connect_timeout;
        tracing::debug!(url = %url, %since, "subscribing to events");
        let attempt = async move { open_subscription(handshake, frame, timeout).await };
        self.state = State::Connecting {
            attempt: Box::pin(attempt),
            since,
        };
    }

    fn handle_subscribed(&mut self, result: Result<Box<Socket>, SubscribeError>) {
        let State::Connecting { since, .. } = &self.state else {
            return;
        };
        let since = *since;
        let socket = match result {
            Ok(socket) => socket,
            Err(error) => return self.connect_failed(&error),
        };
        let url = self.socket_url();
        if self.ever_subscribed {
            tracing::info!(%url, %since, "resubscribed to events");
        } else {
            tracing::info!(%url, %since, "subscribed to events");
        }
        self.ever_subscribed = true;
        let now = Instant::now();
        self.state = State::Subscribed(Box::new(Connection {
            socket: *socket,
            opened_at: now,
            ping_at: now + self.tuning.keepalive_interval,
            ping: None,
        }));
        self.connected.send_replace(true);
    }

    fn connect_failed(&mut self, error: &SubscribeError) {
        let url = self.socket_url().clone();
        if error.is_rejection() {
            let delay = self.backoff.longest();
            tracing::error!(%url, %error, retry_in = ?delay, "the events server refused the subscription; check PREFECT_API_AUTH_STRING / PREFECT_API_KEY; flow-run cancellations are only seen by polling meanwhile");
            self.state = State::Waiting {
                retry_at: Instant::now() + delay,
            };
        } else {
            let delay = self.backoff.next_delay();
            tracing::warn!(%url, %error, retry_in = ?delay, "could not subscribe to events");
            self.state = State::Waiting {
                retry_at: Instant::now() + delay,
            };
        }
    }

    fn handle_frame(&mut self, frame: Option<Result<Message, tungstenite::Error>>) {
        match frame {
            Some(Ok(Message::Text(text))) => self.handle_text(text.as_str()),
            Some(Ok(Message::Pong(payload))) => self.handle_pong(&payload),
            Some(Ok(Message::Close(frame))) => {
                // 1002 after the filter is the server refusing it; anything else, a clean
                // 1000 included, is a reason to resubscribe.
                let refused = frame
                    .as_ref()
                    .is_some_and(|f| f.code == CloseCode::Protocol);
                let reason = format!(
                    "server closed the connection ({})",
                    describe_close(frame.as_ref())
                );
                self.subscription_lost(reason, refused);
            }
            // tungstenite answers pings itself.
            Some(Ok(other)) => {
                tracing::debug!(?other, "ignoring unexpected frame from the events server");
            }
            Some(Err(error)) => self.subscription_lost(error.to_string(), false),
            None => self.subscription_lost("connection closed".to_owned(), false),
        }
    }

    fn handle_text(&mut self, text: &str) {
        let frame = match serde_json::from_str::<ServerFrame>(text) {
            Ok(frame) => frame,
            Err(error) => {
                tracing::warn!(%error, frame = %text, "ignoring a malformed frame from the events server");
                return;
            }
        };
        let (kind, Some(event)) = (frame.kind.as_str(), frame.event) else {
            tracing::debug!(kind = %frame.kind, "ignoring a non-event frame from the events server");
            return;
        };
        if kind != "event" {
            tracing::debug!(%kind, "ignoring a non-event frame from the events server");
            return;
        }
        // `ReceivedEvent` is `Event` plus `received`, which deserializing drops.
        let event = match serde_json::from_value::<Event>(event) {
            Ok(event) => event,
            Err(error) => {
                tracing::warn!(%error, "ignoring an event the server sent that does not parse");
                return;
            }
        };
        self.handle_event(event);
    }

    fn handle_event(&mut self, event: Event) {
        if !self.seen.insert(event.id, Instant::now()) {
            tracing::trace!(id = %event.id, event = %event.event, "skipping an event already delivered");
            return;
        }
        self.cursor = advance_cursor(self.cursor, event.occurred, Utc::now());
        tracing::debug!(id = %event.id, event = %event.event, resource = %event.resource.id(), "event received");
        self.ready.push_back(event);
    }

    fn handle_pong(&mut self, payload: &[u8]) {
        let State::Subscribed(connection) = &mut self.state else {
            return;
        };
        if connection
            .ping
            .take_if(|(nonce, _)| payload == nonce.to_be_bytes())
            .is_none()
        {
            tracing::trace!("ignoring a pong that answers no keepalive ping");
        }
    }

    async fn handle_keepalive_due(&mut self) {
        let State::Subscribed(connection) = &mut self.state else {
            return;
        };
        let now = Instant::now();
        connection.ping_at = now + self.tuning.keepalive_interval;
        if connection.ping.is_some() {
            return;
        }
        let nonce = self.next_nonce;
        self.next_nonce += 1;
        let ping = Message::Ping(Bytes::copy_from_slice(&nonce.to_be_bytes()));
        let timeout = self.tuning.pong_timeout;
        match tokio::time::timeout(timeout, connection.socket.send(ping)).await {
            Ok(Ok(())) => connection.ping = Some((nonce, now + timeout)),
            Ok(Err(error)) => {
                self.subscription_lost(format!("sending a keepalive ping: {error}"), false)
            }
            Err(_) => self.subscription_lost(
                format!("sending a keepalive ping took over {timeout:?}"),
                false,
            ),
        }
    }

    /// Drops the socket and schedules a resubscription. A subscription that was healthy for a
    /// while resubscribes at once; otherwise back off (to the cap after a refusal).
    fn subscription_lost(&mut self, reason: String, refused: bool) {
        let State::Subscribed(connection) = &self.state else {
            return;
        };
        let healthy = connection.opened_at.elapsed() >= self.tuning.healthy_after;
        let delay = if refused {
            self.backoff.longest()
        } else if healthy {
            self.backoff.reset();
            Duration::ZERO
        } else {
            self.backoff.next_delay()
        };
        self.connected.send_replace(false);
        self.state = State::Waiting {
            retry_at: Instant::now() + delay,
        };
        let url = self.socket_url().clone();
        let error = if refused {
            SubscribeError::FilterRefused { url, reason }
        } else {
            SubscribeError::Lost { url, reason }
        };
        if refused {
            tracing::error!(%error, retry_in = ?delay, "the events server refused the subscription filter; flow-run cancellations are only seen by polling meanwhile");
        } else {
            tracing::warn!(%error, retry_in = ?delay, resubscribe_since = %self.cursor, "events subscription lost; will resubscribe");
        }
    }

    /// The socket URL, or the API URL when none can be derived.
    fn socket_url(&self) -> &Url {
        match &self.target {
            Ok((url, _)) => url,
            Err(_) => &self.api_url,
        }
    }

    async fn shutdown(mut self) {
        self.connected.send_replace(false);
        if let State::Subscribed(connection) = &mut self.state {
            let close = connection.socket.close(None);
            let _ = tokio::time::timeout(Duration::from_secs(1), close).await;
        }
        tracing::debug!("events subscription closed: nobody reads it any more");
    }
}

/// The cursor after seeing an event that occurred at `occurred`: `occurred − 1 min` if that
/// is later (`PrefectEventSubscriber.__anext__`), but never past `now − 1 min`, so an event
/// stamped in the future (a skewed clock) cannot make the server filter out everything
/// until that time.
fn advance_cursor(
    cursor: DateTime<Utc>,
    occurred: DateTime<Utc>,
    now: DateTime<Utc>,
) -> DateTime<Utc> {
    let candidate = (occurred - REPLAY_MARGIN).min(now - REPLAY_MARGIN);
    cursor.max(candidate)
}

/// Opens and authenticates a socket, then sends the filter, all within `timeout`.
async fn open_subscription(
    handshake: Handshake,
    frame: String,
    timeout: Duration,
) -> Result<Box<Socket>, SubscribeError> {
    let deadline = Instant::now() + timeout;
    let mut socket = connect::open(&handshake, timeout).await?;
    let url = handshake.url;
    let send = socket.send(Message::text(frame));
    match tokio::time::timeout_at(deadline, send).await {
        Ok(Ok(())) => Ok(Box::new(socket)),
        Ok(Err(error)) => Err(SubscribeError::SendFilter {
            url,
            reason: error.to_string(),
        }),
        Err(_) => Err(SubscribeError::SendFilter {
            url,
            reason: format!("not sent within {timeout:?}"),
        }),
    }
}

/// Waits for whatever the current state can produce; cancel-safe, so a consumer arriving
/// first loses nothing (the handshake future lives in the state and is polled by reference).
async fn next_wake(state: &mut State) -> Wake {
    match state {
        State::Waiting { retry_at } => {
            sleep_until(*retry_at).await;
            Wake::RetryDue
        }
        State::Connecting { attempt, .. } => Wake::Subscribed(attempt.await),
        State::Subscribed(connection) => {
            let pong_deadline = connection.ping.map(|(_, deadline)| deadline);
            tokio::select! {
                frame = connection.socket.next() => Wake::Frame(frame),
                () = sleep_until(connection.ping_at) => Wake::KeepaliveDue,
                () = sleep_until_some(pong_deadline) => Wake::PongOverdue,
            }
        }
    }
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
