//! An in-process fake of the Prefect server's `/api/events/in` endpoint, for emitter tests:
//! it accepts websockets on `127.0.0.1:0`, performs (or refuses) the auth handshake, records
//! what arrives, and misbehaves on cue (drops the connection, stops reading so pings go
//! unanswered). Mirrors `prefect/server/utilities/subscriptions.py: accept_prefect_socket`
//! and `prefect/server/api/events.py: stream_events_in`.

use std::sync::{Arc, Mutex};

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// How the server answers the auth frame.
#[derive(Debug, Clone)]
pub(super) enum AuthAnswer {
    /// `{"type":"auth_success"}`.
    Success,
    /// Close with 1008 and this reason, as Prefect does for a bad token.
    ClosePolicy(&'static str),
}

/// What the server does once authenticated.
#[derive(Debug, Clone)]
pub(super) enum AfterAuth {
    /// Read and record everything (pings are answered by tungstenite as they are read).
    Serve,
    /// Record this many events, then drop the TCP connection without a close frame.
    DropAfter(usize),
    /// Never read again: nothing more is recorded and no ping is answered.
    Stall,
}

/// The script for one connection.
#[derive(Debug, Clone)]
pub(super) struct Script {
    pub auth: AuthAnswer,
    pub after_auth: AfterAuth,
}

impl Script {
    pub(super) fn serve() -> Self {
        Script {
            auth: AuthAnswer::Success,
            after_auth: AfterAuth::Serve,
        }
    }
}

/// What one connection saw.
#[derive(Debug, Clone, Default)]
pub(super) struct ConnectionRecord {
    pub path: String,
    pub user_agent: Option<String>,
    pub subprotocol: Option<String>,
    pub authorization: Option<String>,
    /// The auth frame's exact text, when the client used the `prefect` subprotocol.
    pub auth_frame: Option<String>,
    /// Event frames' exact text, in arrival order.
    pub events: Vec<String>,
    pub pings: usize,
}

impl ConnectionRecord {
    /// Event ids in arrival order.
    pub(super) fn event_ids(&self) -> Vec<String> {
        self.events
            .iter()
            .map(|text| {
                let value: serde_json::Value =
                    serde_json::from_str(text).expect("event frames are JSON");
                value["id"].as_str().expect("events have ids").to_owned()
            })
            .collect()
    }
}

type Scripts = Arc<dyn Fn(usize) -> Script + Send + Sync>;

/// The fake server; stops (and drops its connections) when dropped.
pub(super) struct FakeEventsServer {
    port: u16,
    records: Arc<Mutex<Vec<ConnectionRecord>>>,
    accept_loop: tokio::task::JoinHandle<()>,
}

impl FakeEventsServer {
    /// Starts a server whose n-th connection (from 0) follows `scripts(n)`.
    pub(super) async fn start(scripts: impl Fn(usize) -> Script + Send + Sync + 'static) -> Self {
        Self::start_on(0, scripts).await
    }

    /// Like [`start`](Self::start), on a chosen port (a server that "comes back").
    pub(super) async fn start_on(
        port: u16,
        scripts: impl Fn(usize) -> Script + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind 127.0.0.1");
        let port = listener.local_addr().expect("local addr").port();
        let records = Arc::new(Mutex::new(Vec::new()));
        let scripts: Scripts = Arc::new(scripts);
        let accept_loop = tokio::spawn(accept_loop(listener, scripts, records.clone()));
        FakeEventsServer {
            port,
            records,
            accept_loop,
        }
    }

    /// The API URL a client should be configured with.
    pub(super) fn api_url(&self) -> url::Url {
        url::Url::parse(&format!("http://127.0.0.1:{}/api", self.port)).expect("valid url")
    }

    /// A snapshot of every connection so far.
    pub(super) fn connections(&self) -> Vec<ConnectionRecord> {
        self.records.lock().expect("records lock").clone()
    }
}

impl Drop for FakeEventsServer {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    scripts: Scripts,
    records: Arc<Mutex<Vec<ConnectionRecord>>>,
) {
    // Connection tasks live in the set, so aborting this loop ends them too.
    let mut connections = JoinSet::new();
    let mut index = 0;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let script = scripts(index);
        let slot = {
            let mut records = records.lock().expect("records lock");
            records.push(ConnectionRecord::default());
            records.len() - 1
        };
        connections.spawn(serve_connection(stream, script, records.clone(), slot));
        index += 1;
    }
}

async fn serve_connection(
    stream: TcpStream,
    script: Script,
    records: Arc<Mutex<Vec<ConnectionRecord>>>,
    slot: usize,
) {
    let record = |update: &dyn Fn(&mut ConnectionRecord)| {
        update(&mut records.lock().expect("records lock")[slot])
    };
    let wants_prefect = Arc::new(Mutex::new(false));
    // The callback's signature is tungstenite's, large error type included.
    #[allow(clippy::result_large_err)]
    let callback = {
        let records = records.clone();
        let wants_prefect = wants_prefect.clone();
        move |request: &Request, mut response: Response| -> Result<Response, ErrorResponse> {
            let header = |name: &str| {
                request
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let subprotocol = header("sec-websocket-protocol");
            let prefect = subprotocol
                .as_deref()
                .is_some_and(|p| p.split(',').any(|p| p.trim() == "prefect"));
            if prefect {
                response.headers_mut().insert(
                    "sec-websocket-protocol",
                    http::HeaderValue::from_static("prefect"),
                );
            }
            *wants_prefect.lock().expect("flag lock") = prefect;
            let mut records = records.lock().expect("records lock");
            let entry = &mut records[slot];
            entry.path = request.uri().path().to_owned();
            entry.user_agent = header("user-agent");
            entry.subprotocol = subprotocol;
            entry.authorization = header("authorization");
            Ok(response)
        }
    };
    let Ok(mut socket) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };

    // Without the subprotocol the server runs in "legacy mode": no auth frame.
    let expects_auth = *wants_prefect.lock().expect("flag lock");
    if expects_auth {
        let auth_frame = loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => break text.as_str().to_owned(),
                Some(Ok(Message::Ping(_))) => record(&|r| r.pings += 1),
                Some(Ok(_)) => continue,
                _ => return,
            }
        };
        record(&|r| r.auth_frame = Some(auth_frame.clone()));
        match &script.auth {
            AuthAnswer::Success => {
                if socket
                    .send(Message::text(r#"{"type":"auth_success"}"#))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            AuthAnswer::ClosePolicy(reason) => {
                let frame = CloseFrame {
                    code: CloseCode::Policy,
                    reason: (*reason).into(),
                };
                let _ = socket.close(Some(frame)).await;
                // Let the close handshake finish before the socket is dropped.
                while let Some(Ok(_)) = socket.next().await {}
                return;
            }
        }
    }

    let mut events_seen = 0;
    loop {
        if matches!(script.after_auth, AfterAuth::Stall) {
            std::future::pending::<()>().await;
        }
        match socket.next().await {
            Some(Ok(Message::Text(text))) => {
                record(&|r| r.events.push(text.as_str().to_owned()));
                events_seen += 1;
                if matches!(script.after_auth, AfterAuth::DropAfter(n) if events_seen >= n) {
                    return; // dropping the socket closes TCP without a close frame
                }
            }
            Some(Ok(Message::Ping(_))) => record(&|r| r.pings += 1),
            Some(Ok(_)) => continue,
            _ => return,
        }
    }
}
