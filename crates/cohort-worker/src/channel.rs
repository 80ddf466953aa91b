//! Worker liveness: the 3.8.8 worker channel (`/work_pools/{pool}/workers/connect`) with its
//! heartbeats and pool snapshots, and the REST heartbeat plus pool re-read as the fallback
//! (`prefect/workers/_worker_channel/_sync.py: WorkPoolWorkerChannel.sync`).
//!
//! One task owns the socket. It keeps the shared work pool fresh from snapshots (or REST reads)
//! so the submitter renders each run with the pool's current base job template.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use cohort_api::models::WorkPool;
use cohort_api::retry::{jittered, Backoff};
use cohort_api::PrefectClient;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use crate::cleanup::{self, Cleaner};
use crate::submit::SharedPool;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Who this worker is on the channel. Its `Debug` leaves the credentials out.
#[derive(Clone)]
pub struct ChannelConfig {
    pub pool_name: String,
    pub worker_name: String,
    pub worker_type: String,
    pub heartbeat_interval: Duration,
    pub work_queue_names: Vec<String>,
    pub default_base_job_template: Value,
    /// The hello's `worker_metadata` (`null` for a process worker).
    pub worker_metadata: Value,
    /// Request `cleanup_delivery.v1` and handle `cancelling_timeout_teardown.v1`.
    pub handles_cleanup: bool,
    /// First frame token: the auth string (self-hosted) or key; `None` sends `null`.
    pub auth_token: Option<String>,
    /// `Authorization` header for the upgrade request (Cloud, or proxies in front of a server).
    pub authorization: Option<String>,
}

impl std::fmt::Debug for ChannelConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |secret: &Option<String>| secret.as_ref().map(|_| "<redacted>");
        f.debug_struct("ChannelConfig")
            .field("pool_name", &self.pool_name)
            .field("worker_name", &self.worker_name)
            .field("worker_type", &self.worker_type)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("work_queue_names", &self.work_queue_names)
            .field("auth_token", &redacted(&self.auth_token))
            .field("authorization", &redacted(&self.authorization))
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
enum ChannelError {
    /// The server will never accept this channel (no endpoint, auth, protocol): use REST.
    #[error("{0}")]
    Terminal(String),
    /// Worth another try after a pause.
    #[error("{0}")]
    Retryable(String),
}

/// Runs until `shutdown`; never fails: every channel problem degrades to the REST heartbeat.
pub async fn run(
    client: PrefectClient,
    config: ChannelConfig,
    pool: SharedPool,
    infra: Arc<dyn cohort_infra::Infrastructure>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let mut has_been_healthy = false;
    let mut channel_available = true;
    // A channel that was up and is lost is reconnected before anything goes over REST: under
    // load the server closes channels (1011 `heartbeat_persistence_failed` when SQLite is
    // busy), and a REST heartbeat and pool read at each loss would add to that load. Prefect's
    // worker reconnects too (`prefect/workers/_worker_channel/`).
    let mut just_lost = false;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        if channel_available {
            let attempt = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = tokio::time::timeout(SETUP_TIMEOUT, connect(&client, &config)) => r,
            };
            match attempt {
                Ok(Ok((socket, ready, consumer_id))) => {
                    has_been_healthy = true;
                    backoff.reset();
                    let interval = ready
                        .pointer("/payload/effective_heartbeat_interval_seconds")
                        .and_then(Value::as_f64)
                        .map(Duration::from_secs_f64)
                        .unwrap_or(config.heartbeat_interval);
                    if let Some(wp) = ready.pointer("/payload/initial_snapshot/work_pool") {
                        apply_snapshot(&pool, wp);
                    }
                    tracing::debug!(pool = %config.pool_name, "worker channel connected");
                    let cleaner =
                        Cleaner::new(Arc::new(client.clone()), infra.clone(), pool.clone());
                    cohort_metrics::metrics().worker_channel(true);
                    let ended = healthy(
                        socket,
                        &config,
                        &consumer_id,
                        interval,
                        &pool,
                        cleaner,
                        &shutdown,
                    )
                    .await;
                    cohort_metrics::metrics().worker_channel(false);
                    match ended {
                        Ok(()) => return,
                        Err(ChannelError::Terminal(reason)) => {
                            tracing::info!(%reason, "worker channel closed for good; using REST heartbeats");
                            channel_available = false;
                        }
                        Err(ChannelError::Retryable(reason)) => {
                            tracing::debug!(%reason, "worker channel lost; reconnecting");
                            just_lost = true;
                        }
                    }
                }
                Ok(Err(ChannelError::Terminal(reason))) if !has_been_healthy => {
                    tracing::info!(%reason, "worker channel unavailable; using REST heartbeats");
                    channel_available = false;
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "worker channel setup failed"),
                Err(_) => tracing::debug!("worker channel setup timed out"),
            }
        }
        // Not connected: REST keeps the worker visible and the pool fresh meanwhile.
        if std::mem::take(&mut just_lost) {
            let pause = backoff.next_delay().min(config.heartbeat_interval);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
            continue;
        }
        rest_sync(&client, &config, &pool).await;
        let pause = if channel_available {
            backoff.next_delay().min(config.heartbeat_interval)
        } else {
            jittered(config.heartbeat_interval, 0.3)
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// REST fallback: heartbeat and re-read the pool.
async fn rest_sync(client: &PrefectClient, config: &ChannelConfig, pool: &RwLock<Arc<WorkPool>>) {
    let secs = config.heartbeat_interval.as_secs().max(1);
    if let Err(e) = client
        .worker_heartbeat(&config.pool_name, &config.worker_name, secs)
        .await
    {
        tracing::warn!(error = %e, "worker heartbeat failed");
    }
    match client.read_work_pool(&config.pool_name).await {
        Ok(Some(wp)) => *pool.write().expect("pool lock poisoned") = Arc::new(wp),
        Ok(None) => tracing::warn!(pool = %config.pool_name, "work pool not found"),
        Err(e) => tracing::warn!(error = %e, "could not read the work pool"),
    }
}

fn apply_snapshot(pool: &RwLock<Arc<WorkPool>>, work_pool: &Value) {
    match serde_json::from_value::<WorkPool>(work_pool.clone()) {
        Ok(wp) => *pool.write().expect("pool lock poisoned") = Arc::new(wp),
        Err(e) => tracing::debug!(error = %e, "ignoring unreadable work pool snapshot"),
    }
}

fn frame(kind: &str, payload: Value) -> Message {
    Message::text(
        json!({
            "type": kind,
            "id": uuid::Uuid::now_v7(),
            "sent_at": chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
            "payload": payload,
        })
        .to_string(),
    )
}

/// Channel URL: API URL with the scheme swapped, then the pool's connect path
/// (`prefect/workers/_worker_channel/_transport.py`).
fn channel_url(api_url: &url::Url, pool: &str) -> Result<url::Url, ChannelError> {
    let mut url = api_url.clone();
    let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
    url.set_scheme(scheme)
        .map_err(|_| ChannelError::Terminal("cannot build the worker channel URL".into()))?;
    url.path_segments_mut()
        .map_err(|_| ChannelError::Terminal("cannot build the worker channel URL".into()))?
        .pop_if_empty()
        .extend(["work_pools", pool, "workers", "connect"]);
    Ok(url)
}

async fn connect(
    client: &PrefectClient,
    config: &ChannelConfig,
) -> Result<(Socket, Value, Value), ChannelError> {
    use tokio_tungstenite::tungstenite::Error as WsError;
    let url = channel_url(client.api_url(), &config.pool_name)?;
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| ChannelError::Terminal(e.to_string()))?;
    let headers = request.headers_mut();
    headers.insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static("prefect"),
    );
    if let Ok(ua) = HeaderValue::from_str(&cohort_api::user_agent()) {
        headers.insert("User-Agent", ua);
    }
    if let Some(auth) = config
        .authorization
        .as_deref()
        .and_then(|a| HeaderValue::from_str(a).ok())
    {
        headers.insert("Authorization", auth);
    }
    let (mut socket, _) = match tokio_tungstenite::connect_async_with_config(
        request,
        Some(cohort_events::ws_config()),
        false,
    )
    .await
    {
        Ok(ok) => ok,
        Err(WsError::Http(resp)) => {
            let status = resp.status().as_u16();
            return Err(if status >= 500 {
                ChannelError::Retryable(format!("upgrade answered {status}"))
            } else {
                ChannelError::Terminal(format!("upgrade answered {status}"))
            });
        }
        Err(e) => return Err(ChannelError::Terminal(e.to_string())),
    };
    socket
        .send(Message::text(
            json!({"type": "auth", "token": config.auth_token}).to_string(),
        ))
        .await
        .map_err(|e| ChannelError::Retryable(e.to_string()))?;
    expect_frame(&mut socket, "auth_success").await?;
    let (capabilities, handled, max_cleanup) = if config.handles_cleanup {
        (
            json!([
                "worker_heartbeat.v1",
                "work_pool_snapshot.v1",
                cleanup::CAPABILITY
            ]),
            json!([cleanup::CANCELLING_TIMEOUT_TEARDOWN]),
            1,
        )
    } else {
        (
            json!(["worker_heartbeat.v1", "work_pool_snapshot.v1"]),
            json!([]),
            0,
        )
    };
    let hello = json!({
        "consumer_id": uuid::Uuid::now_v7(),
        "worker_name": config.worker_name,
        "worker_type": config.worker_type,
        "heartbeat_interval_seconds": config.heartbeat_interval.as_secs().max(1),
        "supported_channel_versions": ["work_pool_worker_channel.v1"],
        "requested_capabilities": capabilities,
        "work_queue_names": config.work_queue_names,
        "handled_cleanup_kinds": handled,
        "max_cleanup_concurrency": max_cleanup,
        // The worker creates the pool itself over REST before connecting.
        "create_pool_if_not_found": false,
        "default_base_job_template": config.default_base_job_template,
        "worker_metadata": config.worker_metadata,
    });
    let consumer_id = hello["consumer_id"].clone();
    socket
        .send(frame("worker.hello.v1", hello))
        .await
        .map_err(|e| ChannelError::Retryable(e.to_string()))?;
    let ready = expect_frame(&mut socket, "worker.ready.v1").await?;
    Ok((socket, ready, consumer_id))
}

async fn expect_frame(socket: &mut Socket, kind: &str) -> Result<Value, ChannelError> {
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(text))) => {
                let v: Value = serde_json::from_str(&text)
                    .map_err(|_| ChannelError::Terminal("malformed frame".into()))?;
                if v["type"] == kind {
                    return Ok(v);
                }
                return Err(ChannelError::Terminal(format!(
                    "expected {kind}, got {}",
                    v["type"]
                )));
            }
            Some(Ok(Message::Close(close))) => return Err(classify_close(close.as_ref())),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(ChannelError::Retryable(e.to_string())),
            None => return Err(ChannelError::Retryable("connection closed".into())),
        }
    }
}

fn classify_close(
    close: Option<&tokio_tungstenite::tungstenite::protocol::CloseFrame>,
) -> ChannelError {
    let (code, reason) = close
        .map(|c| (c.code, c.reason.to_string()))
        .unwrap_or((CloseCode::Abnormal, String::new()));
    let text = format!("closed by server ({code}: {reason})");
    match code {
        CloseCode::Policy | CloseCode::Protocol => ChannelError::Terminal(text),
        _ => ChannelError::Retryable(text),
    }
}

async fn healthy(
    mut socket: Socket,
    config: &ChannelConfig,
    consumer_id: &Value,
    interval: Duration,
    pool: &RwLock<Arc<WorkPool>>,
    (cleaner, mut replies): (
        Cleaner,
        tokio::sync::mpsc::UnboundedReceiver<cleanup::Reply>,
    ),
    shutdown: &CancellationToken,
) -> Result<(), ChannelError> {
    // The first heartbeat goes one interval after ready, as Prefect's does.
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    let mut last_sequence = 0u64;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = socket.close(None).await;
                return Ok(());
            }
            _ = ticker.tick() => {
                let payload = json!({
                    "consumer_id": consumer_id,
                    "worker_name": config.worker_name,
                    "heartbeat_interval_seconds": interval.as_secs().max(1),
                });
                socket.send(frame("worker.heartbeat.v1", payload)).await
                    .map_err(|e| ChannelError::Retryable(e.to_string()))?;
            }
            Some((kind, payload)) = replies.recv() => {
                socket.send(frame(kind, payload)).await
                    .map_err(|e| ChannelError::Retryable(e.to_string()))?;
            }
            msg = socket.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    let Ok(v) = serde_json::from_str::<Value>(&text) else { continue };
                    if v["type"] == "cleanup.message.v1" && config.handles_cleanup {
                        cleaner.handle(&v["payload"]);
                    } else if v["type"] == "cleanup.operation_result.v1" {
                        tracing::debug!(result = %v["payload"], "clean-up operation result");
                    } else if v["type"] == "work_pool.snapshot.v1" {
                        let seq = v.pointer("/payload/snapshot_sequence").and_then(Value::as_u64).unwrap_or(0);
                        // Only newer snapshots apply (sequence restarts per connection).
                        if seq > last_sequence {
                            last_sequence = seq;
                            if let Some(wp) = v.pointer("/payload/work_pool") {
                                apply_snapshot(pool, wp);
                            }
                        }
                    }
                }
                Some(Ok(Message::Close(close))) => return Err(classify_close(close.as_ref())),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(ChannelError::Retryable(e.to_string())),
                None => return Err(ChannelError::Retryable("connection closed".into())),
            }
        }
    }
}

/// The channel's protocol against `FakeChannelServer`, an in-process fake of the server's
/// end of `/work_pools/{pool}/workers/connect` on a loopback socket, for what a real server
/// cannot be made to send on demand (a stale snapshot, a clean-up, a policy close). The real
/// channel runs end to end in the `cohort` crate's tests.
#[cfg(test)]
mod tests {
    use super::*;
    use cohort_api::models::StateType;
    use cohort_api::ClientConfig;
    use cohort_fakes::{InProcessPrefect, ScriptedInfrastructure};
    use tokio::net::TcpListener;
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;

    type ServerSocket = WebSocketStream<TcpStream>;

    /// The server's end, on a loopback port.
    struct FakeChannelServer {
        listener: TcpListener,
    }

    impl FakeChannelServer {
        async fn bind() -> Self {
            Self {
                listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            }
        }

        fn client(&self) -> PrefectClient {
            let port = self.listener.local_addr().unwrap().port();
            PrefectClient::new(ClientConfig {
                api_url: format!("http://127.0.0.1:{port}/api").parse().unwrap(),
                api_key: None,
                auth_string: None,
                max_retries: 0,
                request_timeout: Duration::from_secs(5),
                retry_base_delay: Duration::from_secs(1),
            })
            .unwrap()
        }

        /// Accepts one channel (answering the `prefect` subprotocol) and returns its path.
        async fn accept(&self) -> (ServerSocket, String) {
            let (stream, _) = self.listener.accept().await.unwrap();
            let path = Arc::new(std::sync::Mutex::new(String::new()));
            let seen = path.clone();
            // tungstenite's callback type returns its own (large) error response.
            #[allow(clippy::result_large_err)]
            let callback = move |request: &Request, mut response: Response| {
                *seen.lock().unwrap() = request.uri().path().to_owned();
                response.headers_mut().insert(
                    "sec-websocket-protocol",
                    HeaderValue::from_static("prefect"),
                );
                Ok(response)
            };
            let socket = tokio_tungstenite::accept_hdr_async(stream, callback)
                .await
                .unwrap();
            let path = path.lock().unwrap().clone();
            (socket, path)
        }
    }

    async fn next_json(socket: &mut ServerSocket) -> Value {
        loop {
            match socket.next().await.expect("a frame").expect("no error") {
                Message::Text(text) => return serde_json::from_str(&text).unwrap(),
                _ => continue,
            }
        }
    }

    async fn send(socket: &mut ServerSocket, value: Value) {
        socket.send(Message::text(value.to_string())).await.unwrap();
    }

    fn config(handles_cleanup: bool) -> ChannelConfig {
        ChannelConfig {
            pool_name: "pool a".into(),
            worker_name: "w1".into(),
            worker_type: "docker".into(),
            heartbeat_interval: Duration::from_secs(30),
            work_queue_names: vec![],
            default_base_job_template: json!({}),
            worker_metadata: json!({"docker": "28"}),
            handles_cleanup,
            auth_token: Some("admin:pass".into()),
            authorization: None,
        }
    }

    fn pool_json(name: &str) -> Value {
        json!({"id": uuid::Uuid::nil(), "name": name, "type": "docker", "base_job_template": {}})
    }

    /// The server's side of a handshake: auth, hello, ready with a first snapshot. Returns
    /// the auth frame and the hello.
    async fn handshake(socket: &mut ServerSocket) -> (Value, Value) {
        let auth = next_json(socket).await;
        send(socket, json!({"type": "auth_success"})).await;
        let hello = next_json(socket).await;
        send(
            socket,
            json!({"type": "worker.ready.v1", "payload": {
                "effective_heartbeat_interval_seconds": 30,
                "initial_snapshot": {"work_pool": pool_json("first")},
            }}),
        )
        .await;
        (auth, hello)
    }

    fn shared_pool() -> SharedPool {
        Arc::new(RwLock::new(Arc::new(
            serde_json::from_value(pool_json("none")).unwrap(),
        )))
    }

    /// The worker's side: connects, then serves the channel until it ends; clean-ups go to
    /// a scripted infrastructure, their runs are read from `api`.
    async fn connected(
        client: &PrefectClient,
        config: &ChannelConfig,
        pool: &SharedPool,
        api: Arc<InProcessPrefect>,
    ) -> Result<(), ChannelError> {
        let (socket, _, consumer_id) = connect(client, config).await.expect("connected");
        let infra: Arc<dyn cohort_infra::Infrastructure> = ScriptedInfrastructure::new();
        healthy(
            socket,
            config,
            &consumer_id,
            Duration::from_secs(30),
            pool,
            Cleaner::new(api, infra, pool.clone()),
            &CancellationToken::new(),
        )
        .await
    }

    #[tokio::test]
    async fn the_hello_asks_for_clean_ups_only_when_the_infrastructure_handles_them() {
        for handles in [true, false] {
            let server = FakeChannelServer::bind().await;
            let client = server.client();
            let config = config(handles);
            let (connected, (auth, hello, path)) = tokio::join!(connect(&client, &config), async {
                let (mut socket, path) = server.accept().await;
                let (auth, hello) = handshake(&mut socket).await;
                (auth, hello, path)
            });
            let (_, ready, consumer_id) = connected.expect("connected");
            assert_eq!(path, "/api/work_pools/pool%20a/workers/connect");
            assert_eq!(auth, json!({"type": "auth", "token": "admin:pass"}));
            assert_eq!(hello["type"], "worker.hello.v1");
            let p = &hello["payload"];
            assert_eq!(p["consumer_id"], consumer_id);
            assert_eq!(p["worker_type"], "docker");
            assert_eq!(p["worker_metadata"], json!({"docker": "28"}));
            assert_eq!(p["create_pool_if_not_found"], false);
            let capabilities = p["requested_capabilities"].as_array().unwrap();
            assert_eq!(
                capabilities.contains(&json!("cleanup_delivery.v1")),
                handles,
                "{p}"
            );
            if handles {
                assert_eq!(
                    p["handled_cleanup_kinds"],
                    json!(["cancelling_timeout_teardown.v1"])
                );
                assert_eq!(p["max_cleanup_concurrency"], 1);
            } else {
                assert_eq!(p["handled_cleanup_kinds"], json!([]));
                assert_eq!(p["max_cleanup_concurrency"], 0);
            }
            assert_eq!(
                ready["payload"]["initial_snapshot"]["work_pool"]["name"],
                "first"
            );
        }
    }

    #[tokio::test]
    async fn snapshots_apply_in_sequence_clean_ups_are_answered_and_a_policy_close_is_final() {
        let server = FakeChannelServer::bind().await;
        let client = server.client();
        let config = config(true);
        let pool = shared_pool();
        let run = uuid::Uuid::new_v4();
        let api = InProcessPrefect::new();
        api.set(run, StateType::Cancelled);
        let worker = connected(&client, &config, &pool, api.clone());
        let server_side = async {
            let (mut socket, _) = server.accept().await;
            handshake(&mut socket).await;
            let snapshot = |seq: u64, name: &str| {
                json!({"type": "work_pool.snapshot.v1",
                       "payload": {"snapshot_sequence": seq, "work_pool": pool_json(name)}})
            };
            send(&mut socket, snapshot(2, "second")).await;
            // Older than the one applied: ignored.
            send(&mut socket, snapshot(1, "stale")).await;
            // A clean-up the scripted infrastructure cannot do: released with the reason.
            send(
                &mut socket,
                json!({"type": "cleanup.message.v1", "payload": {
                    "message_id": "m-1", "reservation_token": "r-1",
                    "kind": "cancelling_timeout_teardown.v1",
                    "target": {"flow_run_id": run, "infrastructure_pid": "x:1"},
                }}),
            )
            .await;
            let reply = next_json(&mut socket).await;
            socket
                .close(Some(CloseFrame {
                    code: CloseCode::Policy,
                    reason: "unauthorized".into(),
                }))
                .await
                .unwrap();
            reply
        };
        let (ended, reply) = tokio::join!(worker, server_side);
        assert!(
            matches!(&ended, Err(ChannelError::Terminal(why)) if why.contains("unauthorized")),
            "{ended:?}"
        );
        assert_eq!(pool.read().unwrap().name, "second");
        assert_eq!(reply["type"], "cleanup.release.v1");
        assert_eq!(
            reply["payload"],
            json!({"message_id": "m-1", "reservation_token": "r-1",
                   "reason": "unsupported_worker_type"})
        );
    }

    #[tokio::test]
    async fn a_server_error_close_is_worth_a_reconnect() {
        let server = FakeChannelServer::bind().await;
        let client = server.client();
        let config = config(false);
        let pool = shared_pool();
        let worker = connected(&client, &config, &pool, InProcessPrefect::new());
        let server_side = async {
            let (mut socket, _) = server.accept().await;
            handshake(&mut socket).await;
            // What SQLite under load makes the real server do.
            socket
                .close(Some(CloseFrame {
                    code: CloseCode::Error,
                    reason: "heartbeat_persistence_failed".into(),
                }))
                .await
                .unwrap();
        };
        let (ended, ()) = tokio::join!(worker, server_side);
        assert!(
            matches!(&ended, Err(ChannelError::Retryable(_))),
            "{ended:?}"
        );
    }
}
