//! A counting HTTP proxy between the workers and the Prefect server: every REST request is
//! counted by method and normalized endpoint (`GET /flow_runs/{id}`), every websocket
//! connection by path (`WS /events/in`), then passed on untouched.
//!
//! HTTP/1.1 with keep-alive on both sides: each client connection is served by hyper, and
//! requests go upstream through a pooled hyper client, bodies streamed both ways. A
//! websocket upgrade is sent upstream on a connection of its own; once the server answers
//! `101`, both upgraded connections are joined and bytes copied both ways until either side
//! closes. The proxy runs on its own thread with a single-threaded tokio runtime, so the
//! blocking driver uses it directly, and its CPU is the driver's, not the server's.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::UPGRADE;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

type Body = BoxBody<Bytes, hyper::Error>;

/// What went through the proxy: counts by `METHOD /endpoint` (REST) and `WS /path`
/// (websocket connections opened), and the answers that were errors (≥ 400, or no answer).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub by_endpoint: BTreeMap<String, u64>,
    /// `METHOD /endpoint STATUS` of error answers (`502` when the server gave none).
    pub errors: BTreeMap<String, u64>,
}

impl Tally {
    /// What was added since `earlier` (a snapshot of the same proxy).
    pub fn since(&self, earlier: &Tally) -> Tally {
        let diff = |now: &BTreeMap<String, u64>, then: &BTreeMap<String, u64>| {
            now.iter()
                .filter_map(|(k, v)| {
                    let d = v.saturating_sub(then.get(k).copied().unwrap_or(0));
                    (d > 0).then(|| (k.clone(), d))
                })
                .collect()
        };
        Tally {
            by_endpoint: diff(&self.by_endpoint, &earlier.by_endpoint),
            errors: diff(&self.errors, &earlier.errors),
        }
    }

    /// REST requests (websocket connections excluded).
    pub fn requests(&self) -> u64 {
        self.by_endpoint
            .iter()
            .filter(|(k, _)| !k.starts_with("WS "))
            .map(|(_, v)| v)
            .sum()
    }

    /// Websocket connections opened.
    pub fn websockets(&self) -> u64 {
        self.by_endpoint
            .iter()
            .filter(|(k, _)| k.starts_with("WS "))
            .map(|(_, v)| v)
            .sum()
    }
}

/// See the module doc. Dropping it stops the proxy and closes every connection.
pub struct CountingProxy {
    addr: SocketAddr,
    tally: Arc<Mutex<Tally>>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl CountingProxy {
    /// Listen on 127.0.0.1 (a free port) and forward to `upstream`, the server's
    /// `http://host:port` (paths are passed on as the client sent them).
    pub fn start(upstream: &str) -> Result<CountingProxy> {
        let upstream: Uri = upstream.parse().context("proxy upstream URL")?;
        let authority = upstream
            .authority()
            .context("proxy upstream URL has no host")?
            .to_string();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("proxy: bind")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("proxy: tokio runtime")?;
        let tally = Arc::new(Mutex::new(Tally::default()));
        let (shutdown, stopped) = oneshot::channel();
        let shared = Arc::new(Shared {
            authority,
            // The server closes a connection idle for 5 s (`PREFECT_SERVER_API_KEEPALIVE_TIMEOUT`);
            // a request sent on it as it closes fails unanswered. The client's own pool has
            // that race with the server either way; the proxy must not add its own, so it
            // drops upstream connections well before the server would.
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(2))
                .pool_timer(TokioTimer::new())
                .build(HttpConnector::new()),
            tally: tally.clone(),
        });
        let thread = std::thread::Builder::new()
            .name("counting-proxy".into())
            .spawn(move || {
                runtime.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => {
                            tokio::select! {
                                () = accept_loop(shared, listener) => {}
                                _ = stopped => {}
                            }
                        }
                        Err(e) => eprintln!("[bench] proxy: cannot listen: {e}"),
                    }
                });
                // Dropping the runtime here drops every connection task, so every socket.
            })
            .context("proxy: spawn thread")?;
        Ok(CountingProxy {
            addr,
            tally,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// A proxy in front of the server whose API is at `api_url` (`http://host:port/api`), and
    /// the `PREFECT_API_URL` that goes through it.
    pub fn in_front_of(api_url: &str) -> Result<(CountingProxy, String)> {
        let upstream = api_url
            .strip_suffix("/api")
            .context("the server's API URL ends in /api")?;
        let proxy = CountingProxy::start(upstream)?;
        let api = format!("{}/api", proxy.url());
        Ok((proxy, api))
    }

    /// `http://127.0.0.1:<port>` (append `/api` for `PREFECT_API_URL`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The counts so far.
    pub fn snapshot(&self) -> Tally {
        self.tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Shared {
    /// `host:port` of the server.
    authority: String,
    client: Client<HttpConnector, Incoming>,
    tally: Arc<Mutex<Tally>>,
}

impl Shared {
    fn count(&self, key: String, error: Option<u16>) {
        let mut t = self
            .tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match error {
            None => *t.by_endpoint.entry(key).or_default() += 1,
            Some(status) => *t.errors.entry(format!("{key} {status}")).or_default() += 1,
        }
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let shared = shared.clone();
                tokio::spawn(serve(shared, stream));
            }
            Err(e) => {
                // Out of file descriptors, say: back off rather than spin.
                eprintln!("[bench] proxy: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve(shared: Arc<Shared>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |req| handle(shared.clone(), req));
    // Errors here are clients hanging up mid-request, or the proxy stopping.
    let _ = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
}

fn is_websocket_upgrade<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    if is_websocket_upgrade(&req) {
        let key = format!("WS {}", normalize(&path));
        shared.count(key.clone(), None);
        return Ok(match websocket(&shared, req).await {
            Ok(resp) => resp,
            Err(e) => {
                shared.count(key, Some(502));
                bad_gateway(&e)
            }
        });
    }
    let key = format!("{} {}", req.method(), normalize(&path));
    shared.count(key.clone(), None);
    let (mut parts, body) = req.into_parts();
    let pq = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    parts.uri = match format!("http://{}{pq}", shared.authority).parse() {
        Ok(u) => u,
        Err(e) => return Ok(bad_gateway(&e.to_string())),
    };
    match shared
        .client
        .request(Request::from_parts(parts, body))
        .await
    {
        Ok(resp) => {
            if resp.status().as_u16() >= 400 {
                shared.count(key, Some(resp.status().as_u16()));
            }
            Ok(resp.map(BodyExt::boxed))
        }
        Err(e) => {
            // Rare and worth seeing: the worker retries, so it shows up in the counts.
            eprintln!("[bench] proxy: {key}: no answer from the server: {e:?}");
            shared.count(key, Some(502));
            Ok(bad_gateway(&e.to_string()))
        }
    }
}

/// Send the upgrade request upstream on a fresh connection; on `101`, join the two upgraded
/// connections (after this answer reaches the client) and copy bytes until either closes.
async fn websocket(shared: &Shared, mut req: Request<Incoming>) -> Result<Response<Body>, String> {
    let downstream = hyper::upgrade::on(&mut req);
    let stream = TcpStream::connect(&shared.authority)
        .await
        .map_err(|e| format!("connect {}: {e}", shared.authority))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(resp.map(BodyExt::boxed));
    }
    let upstream = hyper::upgrade::on(&mut resp);
    tokio::spawn(async move {
        if let (Ok(down), Ok(up)) = (downstream.await, upstream.await) {
            let mut down = TokioIo::new(down);
            let mut up = TokioIo::new(up);
            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
        }
    });
    // The 101 and its Connection/Upgrade headers go back to the client as the server sent
    // them; hyper switches the client connection over once it is written.
    Ok(resp.map(BodyExt::boxed))
}

fn bad_gateway(why: &str) -> Response<Body> {
    let body = format!(r#"{{"exception_message":"counting proxy: {why}"}}"#);
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = StatusCode::BAD_GATEWAY;
    resp
}

/// `/api/flow_runs/0b2c…/set_state` → `/flow_runs/{id}/set_state`: the `/api` prefix goes,
/// ids become `{id}`, and the names of pools, queues and workers (unique to each benchmark
/// pool) become `{name}`.
pub fn normalize(path: &str) -> String {
    let path = path.strip_prefix("/api").unwrap_or(path);
    let mut out = String::new();
    let mut prev = "";
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        out.push('/');
        if is_uuid(seg) {
            out.push_str("{id}");
        } else if is_named(prev, seg) {
            out.push_str("{name}");
        } else {
            out.push_str(seg);
        }
        prev = seg;
    }
    if out.is_empty() || path.ends_with('/') {
        out.push('/');
    }
    out
}

/// A segment after `work_pools/`, `queues/`, `workers/` or `name/` that is not an action
/// (`workers/connect` is the worker channel's websocket, `server/api/workers.py`).
fn is_named(prev: &str, seg: &str) -> bool {
    const ACTIONS: [&str; 8] = [
        "connect",
        "filter",
        "count",
        "heartbeat",
        "paginate",
        "get_scheduled_flow_runs",
        "schedule",
        "name",
    ];
    matches!(prev, "work_pools" | "queues" | "workers" | "name") && !ACTIONS.contains(&seg)
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_normalized() {
        let id = "0b2c3d4e-1111-2222-3333-444455556666";
        assert_eq!(
            normalize(&format!("/api/flow_runs/{id}/set_state")),
            "/flow_runs/{id}/set_state"
        );
        assert_eq!(
            normalize(&format!("/api/flow_runs/{id}")),
            "/flow_runs/{id}"
        );
        assert_eq!(normalize("/api/logs/"), "/logs/");
        assert_eq!(
            normalize("/api/work_pools/bench-server-cohort-r0-1a2b3c/get_scheduled_flow_runs"),
            "/work_pools/{name}/get_scheduled_flow_runs"
        );
        assert_eq!(
            normalize("/api/work_pools/p/workers/heartbeat"),
            "/work_pools/{name}/workers/heartbeat"
        );
        assert_eq!(
            normalize("/api/work_pools/p/workers/w-1"),
            "/work_pools/{name}/workers/{name}"
        );
        assert_eq!(normalize("/api/work_pools/filter"), "/work_pools/filter");
        assert_eq!(
            normalize("/api/work_pools/p/workers/connect"),
            "/work_pools/{name}/workers/connect"
        );
        assert_eq!(normalize("/api/events/in"), "/events/in");
        assert_eq!(normalize("/api/"), "/");
        assert_eq!(normalize("/api"), "/");
    }

    #[test]
    fn tallies_subtract() {
        let mut a = Tally::default();
        a.by_endpoint.insert("GET /x".into(), 2);
        let mut b = a.clone();
        *b.by_endpoint.get_mut("GET /x").unwrap() += 3;
        b.by_endpoint.insert("WS /events/in".into(), 1);
        let d = b.since(&a);
        assert_eq!(d.requests(), 3);
        assert_eq!(d.websockets(), 1);
        assert!(a.since(&a).by_endpoint.is_empty());
    }
}
