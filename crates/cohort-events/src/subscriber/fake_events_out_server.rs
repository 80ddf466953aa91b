//! An in-process fake of the Prefect server's `/api/events/out` endpoint, for subscriber
//! tests: it accepts websockets on `127.0.0.1:0`, performs (or refuses) the auth handshake,
//! reads the filter, backfills stored events whose `occurred` lies in the filter's window
//! (oldest first), then streams published events through the same window, and drops or closes
//! connections on cue. Mirrors `prefect/server/api/events.py: stream_workspace_events_out`
//! and `prefect/server/events/stream.py` (live events are filtered on `occurred` too; an
//! event both backfilled and live is sent once per connection).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::event::Event;

/// How the server answers the auth frame.
#[derive(Debug, Clone)]
pub(super) enum AuthAnswer {
    /// `{"type":"auth_success"}`.
    Success,
    /// Close with 1008 and this reason, as Prefect does for a bad token.
    ClosePolicy(&'static str),
}

/// What the server does once it has the filter.
#[derive(Debug, Clone)]
pub(super) enum AfterFilter {
    /// Backfill, then stream live events until told otherwise.
    Serve,
    /// Never read or write again: keepalive pings go unanswered.
    Stall,
    /// Close at once with this code and reason (1002 `Invalid filter: …` in Prefect).
    Close(u16, &'static str),
}

/// The script for one connection.
#[derive(Debug, Clone)]
pub(super) struct Script {
    pub auth: AuthAnswer,
    pub after_filter: AfterFilter,
}

impl Script {
    pub(super) fn serve() -> Self {
        Script {
            auth: AuthAnswer::Success,
            after_filter: AfterFilter::Serve,
        }
    }
}

/// What one connection saw and sent.
#[derive(Debug, Clone, Default)]
pub(super) struct ConnectionRecord {
    pub path: String,
    pub user_agent: Option<String>,
    pub subprotocol: Option<String>,
    pub authorization: Option<String>,
    /// The auth frame's exact text.
    pub auth_frame: Option<String>,
    /// The filter frame, parsed.
    pub filter_frame: Option<Value>,
    /// Ids of the events sent on this connection, backfill first.
    pub sent: Vec<String>,
    /// How many pings the client sent (the handshake's included).
    pub pings: usize,
    /// Backfilled and streaming live events: published events and [`Control`]s reach it.
    pub live: bool,
}

impl ConnectionRecord {
    /// `filter.occurred.since` of the filter frame.
    pub(super) fn since(&self) -> DateTime<Utc> {
        occurred_bound(self.filter_frame.as_ref().expect("a filter frame"), "since")
    }

    /// `filter.occurred.until` of the filter frame.
    pub(super) fn until(&self) -> DateTime<Utc> {
        occurred_bound(self.filter_frame.as_ref().expect("a filter frame"), "until")
    }
}

fn occurred_bound(frame: &Value, bound: &str) -> DateTime<Utc> {
    let text = frame["filter"]["occurred"][bound]
        .as_str()
        .unwrap_or_else(|| panic!("filter.occurred.{bound} is a string: {frame}"));
    DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("filter.occurred.{bound} `{text}`: {e}"))
        .with_timezone(&Utc)
}

/// What the test tells live connections.
#[derive(Debug, Clone)]
enum Control {
    /// A newly published `ReceivedEvent`.
    Event(Arc<Value>),
    /// Drop TCP without a close frame.
    Drop,
    /// Close cleanly (1000).
    CloseNormal,
}

type Scripts = Arc<dyn Fn(usize) -> Script + Send + Sync>;

/// State shared by the accept loop, its connections and the test.
struct Shared {
    records: Mutex<Vec<ConnectionRecord>>,
    /// Stored `ReceivedEvent`s, for backfill. Held while publishing, so a connection
    /// snapshots the store and joins the live stream atomically.
    store: Mutex<Vec<Arc<Value>>>,
    control: broadcast::Sender<Control>,
}

/// The fake server; stops (and drops its connections) when dropped.
pub(super) struct FakeEventsOutServer {
    port: u16,
    shared: Arc<Shared>,
    accept_loop: tokio::task::JoinHandle<()>,
}

impl FakeEventsOutServer {
    /// Starts a server whose n-th connection (from 0) follows `scripts(n)`.
    pub(super) async fn start(scripts: impl Fn(usize) -> Script + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local addr").port();
        let shared = Arc::new(Shared {
            records: Mutex::new(Vec::new()),
            store: Mutex::new(Vec::new()),
            control: broadcast::channel(1024).0,
        });
        let accept_loop = tokio::spawn(accept_loop(listener, Arc::new(scripts), shared.clone()));
        FakeEventsOutServer {
            port,
            shared,
            accept_loop,
        }
    }

    /// The API URL a client should be configured with.
    pub(super) fn api_url(&self) -> url::Url {
        url::Url::parse(&format!("http://127.0.0.1:{}/api", self.port)).expect("valid url")
    }

    /// A snapshot of every connection so far.
    pub(super) fn connections(&self) -> Vec<ConnectionRecord> {
        self.shared.records.lock().expect("records lock").clone()
    }

    /// Stores `event` (for later backfills) and streams it to the live connections whose
    /// window includes it.
    pub(super) fn publish(&self, event: &Event) {
        let mut received: Value =
            serde_json::from_str(&event.to_wire_json().expect("valid event")).expect("JSON");
        received["received"] = Value::String(Utc::now().to_rfc3339());
        let received = Arc::new(received);
        let mut store = self.shared.store.lock().expect("store lock");
        store.push(received.clone());
        let _ = self.shared.control.send(Control::Event(received));
    }

    /// Waits until connection `n` streams live events.
    pub(super) async fn wait_live(&self, n: usize) {
        for _ in 0..500 {
            if self.connections().get(n).is_some_and(|c| c.live) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("connection {n} never went live: {:#?}", self.connections());
    }

    /// Drops every live connection without a close frame.
    pub(super) fn drop_connections(&self) {
        let _ = self.shared.control.send(Control::Drop);
    }

    /// Closes every live connection with 1000, as a server shutting down does.
    pub(super) fn close_connections_normally(&self) {
        let _ = self.shared.control.send(Control::CloseNormal);
    }
}

impl Drop for FakeEventsOutServer {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

async fn accept_loop(listener: TcpListener, scripts: Scripts, shared: Arc<Shared>) {
    // Connection tasks live in the set, so aborting this loop ends them too.
    let mut connections = JoinSet::new();
    let mut index = 0;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let script = scripts(index);
        let slot = {
            let mut records = shared.records.lock().expect("records lock");
            records.push(ConnectionRecord::default());
            records.len() - 1
        };
        connections.spawn(serve_connection(stream, script, shared.clone(), slot));
        index += 1;
    }
}

async fn serve_connection(stream: TcpStream, script: Script, shared: Arc<Shared>, slot: usize) {
    let record = |update: &dyn Fn(&mut ConnectionRecord)| {
        update(&mut shared.records.lock().expect("records lock")[slot])
    };
    // The callback's signature is tungstenite's, large error type included.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, mut response: Response| -> Result<Response, ErrorResponse> {
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let subprotocol = header("sec-websocket-protocol");
        if subprotocol
            .as_deref()
            .is_some_and(|p| p.split(',').any(|p| p.trim() == "prefect"))
        {
            response.headers_mut().insert(
                "sec-websocket-protocol",
                http::HeaderValue::from_static("prefect"),
            );
        }
        record(&|r| {
            r.path = request.uri().path().to_owned();
            r.user_agent = header("user-agent");
            r.subprotocol = subprotocol.clone();
            r.authorization = header("authorization");
        });
        Ok(response)
    };
    let Ok(mut socket) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };

    let Some(auth_frame) = next_text(&mut socket, &record).await else {
        return;
    };
    record(&|r| r.auth_frame = Some(auth_frame.clone()));
    match script.auth {
        AuthAnswer::Success => {
            let reply = Message::text(r#"{"type":"auth_success"}"#);
            if socket.send(reply).await.is_err() {
                return;
            }
        }
        AuthAnswer::ClosePolicy(reason) => return close(socket, CloseCode::Policy, reason).await,
    }

    let Some(filter_frame) = next_text(&mut socket, &record).await else {
        return;
    };
    let filter: Value = match serde_json::from_str(&filter_frame) {
        Ok(filter) => filter,
        Err(_) => return close(socket, CloseCode::Protocol, "Invalid filter").await,
    };
    record(&|r| r.filter_frame = Some(filter.clone()));
    if filter["type"] != "filter" {
        return close(socket, CloseCode::Protocol, "Expected 'filter' message").await;
    }
    let (since, until) = {
        let record = &shared.records.lock().expect("records lock")[slot];
        (record.since(), record.until())
    };
    match script.after_filter {
        AfterFilter::Serve => {}
        AfterFilter::Stall => return std::future::pending().await,
        AfterFilter::Close(code, reason) => return close(socket, code.into(), reason).await,
    }

    // Subscribe to the live stream first, then backfill (as the server does).
    let in_window = |event: &Value| {
        let occurred = DateTime::parse_from_rfc3339(event["occurred"].as_str().expect("occurred"))
            .expect("RFC 3339")
            .with_timezone(&Utc);
        since <= occurred && occurred <= until
    };
    let (mut live, mut backfill) = {
        let store = shared.store.lock().expect("store lock");
        let backfill: Vec<Arc<Value>> = store.iter().filter(|e| in_window(e)).cloned().collect();
        (shared.control.subscribe(), backfill)
    };
    backfill.sort_by_key(|e| e["occurred"].as_str().map(str::to_owned));
    let mut backfilled = HashSet::new();
    for event in backfill {
        let id = event["id"].as_str().expect("id").to_owned();
        if send_event(&mut socket, &event).await.is_err() {
            return;
        }
        record(&|r| r.sent.push(id.clone()));
        backfilled.insert(id);
    }
    record(&|r| r.live = true);
    loop {
        tokio::select! {
            control = live.recv() => match control {
                Ok(Control::Event(event)) => {
                    let id = event["id"].as_str().expect("id").to_owned();
                    if !in_window(&event) || backfilled.remove(&id) {
                        continue;
                    }
                    if send_event(&mut socket, &event).await.is_err() {
                        return;
                    }
                    record(&|r| r.sent.push(id.clone()));
                }
                Ok(Control::Drop) => return, // dropping the socket closes TCP, no close frame
                Ok(Control::CloseNormal) => return close(socket, CloseCode::Normal, "").await,
                Err(_) => return,
            },
            // Reading is what answers the client's pings.
            frame = socket.next() => match frame {
                Some(Ok(Message::Ping(_))) => record(&|r| r.pings += 1),
                Some(Ok(_)) => {}
                _ => return,
            },
        }
    }
}

async fn next_text(
    socket: &mut WebSocketStream<TcpStream>,
    record: &impl Fn(&dyn Fn(&mut ConnectionRecord)),
) -> Option<String> {
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(text))) => return Some(text.as_str().to_owned()),
            Some(Ok(Message::Ping(_))) => record(&|r| r.pings += 1),
            Some(Ok(_)) => continue,
            _ => return None,
        }
    }
}

async fn send_event(
    socket: &mut WebSocketStream<TcpStream>,
    event: &Value,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    let frame = serde_json::json!({"type": "event", "event": event});
    socket.send(Message::text(frame.to_string())).await
}

async fn close(mut socket: WebSocketStream<TcpStream>, code: CloseCode, reason: &'static str) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = socket.close(Some(frame)).await;
    // Let the close handshake finish before the socket is dropped.
    while let Some(Ok(_)) = socket.next().await {}
}
