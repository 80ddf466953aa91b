//! In-process fault-injecting proxy in front of a real Prefect server: the project's one allowed
//! kind of fake, used only for faults a real server can't be made to produce on demand (bursts of
//! 503/429, a server that goes down and comes back, websockets dropped mid-stream, a websocket
//! endpoint the server does not have, a request held in flight at a chosen moment).
//!
//! Everything that is not an injected fault is forwarded untouched to the real server, so the
//! worker under test still talks to real Prefect semantics. Plain HTTP requests go through hyper
//! (keep-alive works, because the worker's client pools connections); websocket upgrades are
//! tunnelled as raw TCP so frames pass through byte for byte. The proxy runs on its own thread
//! with its own tokio runtime, so the blocking `#[test]` functions can drive it directly.

// Each test binary that pulls in `util` uses only part of this API; without this every unused
// method would be a dead-code warning there (and `clippy -D warnings` would fail).
#![allow(dead_code)]
// A test fixture on real sockets and threads: wall-clock time is the point.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, HOST, RETRY_AFTER};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

/// Counters since the proxy started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// TCP connections accepted (HTTP and websocket); lets tests see that keep-alive is reused.
    pub connections: u64,
    /// HTTP requests forwarded to upstream and answered with upstream's response.
    pub forwarded: u64,
    /// HTTP requests answered with an injected failure, instead of being forwarded or (see
    /// [`FaultProxy::fail_next_after_forwarding`]) after being forwarded.
    pub failed: u64,
    /// Websocket connections seen (upgrade requests tunnelled to upstream or refused).
    pub websockets: u64,
    /// Websocket upgrades answered with an HTTP error instead (see `refuse_websockets`).
    pub refused_websockets: u64,
    /// HTTP requests held back by a `hold_next` rule (released or not).
    pub held: u64,
}

/// Fault-injecting proxy; see the module docs. Dropping it stops the proxy and closes every
/// connection it holds.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1:0 and forwards to `upstream` (e.g. `"http://127.0.0.1:4200"`).
    pub fn start(upstream: &str) -> FaultProxy {
        let upstream_url = reqwest::Url::parse(upstream)
            .unwrap_or_else(|e| panic!("fault proxy: bad upstream URL {upstream:?}: {e}"));
        let host = upstream_url
            .host_str()
            .unwrap_or_else(|| panic!("fault proxy: upstream URL {upstream:?} has no host"));
        let port = upstream_url
            .port_or_known_default()
            .unwrap_or_else(|| panic!("fault proxy: upstream URL {upstream:?} has no port"));
        // The websocket tunnel is raw TCP, so it needs the socket address rather than the URL.
        let upstream_authority = format!("{host}:{port}");
        // Request paths are forwarded as the client sent them (they already contain "/api").
        let upstream_base = upstream.trim_end_matches('/').to_owned();

        // Bind with std so `start` works whether or not the caller is inside a runtime, and so the
        // port is known before returning.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("fault proxy: bind");
        listener
            .set_nonblocking(true)
            .expect("fault proxy: set_nonblocking");
        let addr = listener.local_addr().expect("fault proxy: local_addr");

        let client = reqwest::Client::builder()
            // The proxy must be transparent: redirects, compression and any HTTP(S)_PROXY from the
            // environment are the worker's business, not the proxy's.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .no_gzip()
            .no_brotli()
            .no_deflate()
            .no_zstd()
            .build()
            .expect("fault proxy: reqwest client");

        let shared = Arc::new(Shared {
            upstream_base,
            upstream_authority,
            client,
            faults: Mutex::new(Faults {
                next: Vec::new(),
                random_p: 0.0,
                random_status: 503,
                // Fixed seed: a failing test replays the same sequence of random faults.
                rng: 0x5eed_f00d_cafe_babe,
            }),
            conns: Mutex::new(Conns::default()),
            refuse_ws: Mutex::new(None),
            hold: Mutex::new(None),
            release: tokio::sync::watch::channel(false).0,
            connections: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            websockets: AtomicU64::new(0),
            refused_websockets: AtomicU64::new(0),
            held: AtomicU64::new(0),
            endpoints: Mutex::new(BTreeMap::new()),
        });

        let (commands, command_rx) = mpsc::unbounded_channel();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fault-proxy")
            .enable_all()
            .build()
            .expect("fault proxy: tokio runtime");
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener =
                        TcpListener::from_std(listener).expect("fault proxy: from_std listener");
                    accept_loop(thread_shared, listener, addr, command_rx).await;
                });
            })
            .expect("fault proxy: spawn thread");

        FaultProxy {
            addr,
            shared,
            commands,
            thread: Some(thread),
        }
    }

    /// Base URL of the proxy, e.g. `"http://127.0.0.1:40123"` (callers append `"/api"`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answer the next `n` HTTP requests whose method and path (with query), e.g.
    /// `"PATCH /api/work_pools/x"`, contain `path_contains` (any request if `None`) with
    /// `status` instead of forwarding them. The body is Prefect's error
    /// shape, e.g. `{"exception_message":"Service Unavailable"}` for 503; a 429 also carries
    /// `Retry-After: 1`. Calls add up: each rule is used in the order given. Websocket handshakes
    /// are never failed, so a reconnecting websocket can't eat a failure meant for a REST call.
    pub fn fail_next(&self, n: usize, status: u16, path_contains: Option<&str>) {
        check_status(status);
        lock(&self.shared.faults).next.push(FailNext {
            remaining: n,
            status,
            path_contains: path_contains.map(str::to_owned),
            after_forwarding: false,
        });
    }

    /// Like [`Self::fail_next`], but each matching request is first forwarded to the server,
    /// which acts on it, and only its answer is replaced by `status`: a gateway timing out
    /// (504) after the upstream did the work, so the client cannot tell it succeeded. Rules of
    /// both kinds share one queue, used in the order given.
    pub fn fail_next_after_forwarding(&self, n: usize, status: u16, path_contains: Option<&str>) {
        check_status(status);
        lock(&self.shared.faults).next.push(FailNext {
            remaining: n,
            status,
            path_contains: path_contains.map(str::to_owned),
            after_forwarding: true,
        });
    }

    /// Answer each HTTP request with `status` with probability `p` (0.0..=1.0) until changed;
    /// `p = 0.0` turns it off. Uses a fixed-seed RNG, and `fail_next` rules take precedence.
    pub fn fail_randomly(&self, p: f64, status: u16) {
        assert!(
            (0.0..=1.0).contains(&p),
            "fault proxy: probability {p} not in 0.0..=1.0"
        );
        check_status(status);
        let mut faults = lock(&self.shared.faults);
        faults.random_p = p;
        faults.random_status = status;
    }

    /// While `down` is true the proxy behaves like a server that is not running: its listening
    /// socket is closed, so new connections are refused, and every open connection (pooled
    /// keep-alive ones and websockets) is dropped. Setting it back to false listens again on the
    /// same port, so `url()` stays valid. Returns once the change has taken effect.
    pub fn set_down(&self, down: bool) {
        let (ack, ack_rx) = std_mpsc::channel();
        self.commands
            .send(Command::SetDown(down, ack))
            .expect("fault proxy: proxy thread is gone");
        match ack_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("fault proxy: set_down({down}) failed: {e}"),
            Err(e) => panic!("fault proxy: set_down({down}) got no answer: {e}"),
        }
    }

    /// Close every open websocket connection now (both sides' sockets are dropped without a close
    /// frame, as when the network or the server goes away). Returns once they are closed.
    pub fn drop_websockets(&self) {
        let ids = self.shared.abort_conns(|kind| kind == ConnKind::WebSocket);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.shared.all_gone(&ids) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// From now on, answer every websocket upgrade whose path contains `path_contains` with
    /// `status` (body `{"detail":"Not Found"}` for 404, Prefect's error shape otherwise) and
    /// close the connection, as a server without that endpoint does; other websockets pass.
    pub fn refuse_websockets(&self, path_contains: &str, status: u16) {
        check_status(status);
        *lock(&self.shared.refuse_ws) = Some((path_contains.to_owned(), status));
    }

    /// Hold back the next HTTP request whose path contains `path_contains` and whose body
    /// contains `body_contains`: it reaches the server only after [`Self::release_held`] (or
    /// when the proxy is dropped, which closes it unanswered). One request per call; a new call
    /// replaces a rule that has not matched yet.
    pub fn hold_next(&self, path_contains: &str, body_contains: &str) {
        self.shared.release.send_replace(false);
        *lock(&self.shared.hold) = Some(HoldRule {
            path_contains: path_contains.to_owned(),
            body_contains: body_contains.to_owned(),
        });
    }

    /// Waits until a request is held by a `hold_next` rule; false after `timeout`.
    pub fn wait_until_held(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.shared.held.load(Ordering::SeqCst) == 0 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Lets a held request (and any later one the rule catches) go on to the server.
    pub fn release_held(&self) {
        *lock(&self.shared.hold) = None;
        self.shared.release.send_replace(true);
    }

    /// HTTP requests answered so far, by endpoint: `"METHOD /api/path"` with every UUID in the
    /// path written `{id}` and the query left out, followed by ` -> STATUS` when the answer was
    /// not a success (so a retried 503 shows as its own line).
    pub fn endpoint_counts(&self) -> BTreeMap<String, u64> {
        lock(&self.shared.endpoints).clone()
    }

    /// Counters: connections accepted, requests forwarded, requests failed on purpose,
    /// websocket connections seen and refused, requests held.
    pub fn stats(&self) -> ProxyStats {
        ProxyStats {
            connections: self.shared.connections.load(Ordering::SeqCst),
            forwarded: self.shared.forwarded.load(Ordering::SeqCst),
            failed: self.shared.failed.load(Ordering::SeqCst),
            websockets: self.shared.websockets.load(Ordering::SeqCst),
            refused_websockets: self.shared.refused_websockets.load(Ordering::SeqCst),
            held: self.shared.held.load(Ordering::SeqCst),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Shutdown);
        if let Some(thread) = self.thread.take() {
            // A panic on the proxy thread has already been printed; re-raising it from a drop
            // could abort a test that is already unwinding.
            let _ = thread.join();
        }
    }
}

fn check_status(status: u16) {
    assert!(
        StatusCode::from_u16(status).is_ok(),
        "fault proxy: {status} is not an HTTP status code"
    );
}

/// Lock, ignoring poisoning: a panicking test thread must not turn every later proxy call (or the
/// proxy's own connection bookkeeping) into a second panic.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

enum Command {
    SetDown(bool, std_mpsc::Sender<Result<(), String>>),
    Shutdown,
}

struct FailNext {
    remaining: usize,
    status: u16,
    path_contains: Option<String>,
    /// Forward first, then answer `status` in place of upstream's response.
    after_forwarding: bool,
}

/// What to do with one request.
#[derive(Clone, Copy)]
struct Injected {
    status: u16,
    after_forwarding: bool,
}

struct HoldRule {
    path_contains: String,
    body_contains: String,
}

struct Faults {
    next: Vec<FailNext>,
    random_p: f64,
    random_status: u16,
    rng: u64,
}

impl Faults {
    /// The failure to inject for this request (`"PATCH /api/work_pools/x"`: the method, a
    /// space, then the path and query), if any.
    fn decide(&mut self, request_line: &str) -> Option<Injected> {
        if let Some(rule) = self.next.iter_mut().find(|r| {
            r.remaining > 0
                && r.path_contains
                    .as_deref()
                    .is_none_or(|p| request_line.contains(p))
        }) {
            rule.remaining -= 1;
            let injected = Injected {
                status: rule.status,
                after_forwarding: rule.after_forwarding,
            };
            self.next.retain(|r| r.remaining > 0);
            return Some(injected);
        }
        if self.random_p > 0.0 && self.next_unit() < self.random_p {
            return Some(Injected {
                status: self.random_status,
                after_forwarding: false,
            });
        }
        None
    }

    /// Uniform in [0, 1) from splitmix64: tiny, seedable, and needs no extra dependency.
    fn next_unit(&mut self) -> f64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // Top 53 bits: exactly what an f64 mantissa holds, so the casts lose nothing.
        #[allow(clippy::cast_precision_loss)]
        let unit = (z >> 11) as f64 / (1u64 << 53) as f64;
        unit
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ConnKind {
    /// Accepted, request head not seen yet.
    Pending,
    Http,
    WebSocket,
}

#[derive(Default)]
struct Conns {
    next_id: u64,
    open: HashMap<u64, (ConnKind, AbortHandle)>,
}

struct Shared {
    upstream_base: String,
    upstream_authority: String,
    client: reqwest::Client,
    faults: Mutex<Faults>,
    conns: Mutex<Conns>,
    /// `(path_contains, status)` of `refuse_websockets`.
    refuse_ws: Mutex<Option<(String, u16)>>,
    /// The pending `hold_next` rule; taken by the request it catches.
    hold: Mutex<Option<HoldRule>>,
    /// True once held requests may go on.
    release: tokio::sync::watch::Sender<bool>,
    connections: AtomicU64,
    forwarded: AtomicU64,
    failed: AtomicU64,
    websockets: AtomicU64,
    refused_websockets: AtomicU64,
    held: AtomicU64,
    /// Requests answered (forwarded or failed), by [`endpoint_key`].
    endpoints: Mutex<BTreeMap<String, u64>>,
}

impl Shared {
    fn count_endpoint(&self, method: &Method, path_and_query: &str, status: u16) {
        *lock(&self.endpoints)
            .entry(endpoint_key(method, path_and_query, status))
            .or_default() += 1;
    }
    fn set_kind(&self, id: u64, kind: ConnKind) {
        if let Some(entry) = lock(&self.conns).open.get_mut(&id) {
            entry.0 = kind;
        }
    }

    /// Aborts the matching connection tasks; returns their ids so callers can wait for them.
    fn abort_conns(&self, which: impl Fn(ConnKind) -> bool) -> Vec<u64> {
        let conns = lock(&self.conns);
        conns
            .open
            .iter()
            .filter(|(_, (kind, _))| which(*kind))
            .map(|(id, (_, handle))| {
                handle.abort();
                *id
            })
            .collect()
    }

    /// True once none of `ids` is open any more; a task leaves the map when its future is dropped,
    /// i.e. after its sockets are closed.
    fn all_gone(&self, ids: &[u64]) -> bool {
        let conns = lock(&self.conns);
        ids.iter().all(|id| !conns.open.contains_key(id))
    }
}

/// Removes a connection from the registry when its task ends or is aborted.
struct ConnGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        lock(&self.shared.conns).open.remove(&self.id);
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    addr: SocketAddr,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let mut listener = Some(listener);
    loop {
        tokio::select! {
            accepted = accept(listener.as_ref()) => match accepted {
                Ok((stream, _)) => spawn_conn(&shared, stream),
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    eprintln!("fault proxy: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            command = commands.recv() => match command {
                None | Some(Command::Shutdown) => break,
                Some(Command::SetDown(true, ack)) => {
                    // Closing the listening socket is what makes connects fail with "connection
                    // refused", exactly as when the server process is gone.
                    listener = None;
                    close_all(&shared).await;
                    let _ = ack.send(Ok(()));
                }
                Some(Command::SetDown(false, ack)) => {
                    let result = if listener.is_none() {
                        rebind(addr).await.map(|l| listener = Some(l))
                    } else {
                        Ok(())
                    };
                    let _ = ack.send(result);
                }
            }
        }
    }
    close_all(&shared).await;
}

async fn accept(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// Listen again on the same port after `set_down(false)`, so the URL handed out stays valid.
async fn rebind(addr: SocketAddr) -> Result<TcpListener, String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let attempt = (|| {
            let socket = TcpSocket::new_v4()?;
            // Connections we closed linger in TIME_WAIT on this port; SO_REUSEADDR lets us listen
            // again anyway.
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            socket.listen(1024)
        })();
        match attempt {
            Ok(listener) => return Ok(listener),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("could not listen on {addr} again: {e}"))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn close_all(shared: &Arc<Shared>) {
    let ids = shared.abort_conns(|_| true);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !shared.all_gone(&ids) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn spawn_conn(shared: &Arc<Shared>, stream: TcpStream) {
    shared.connections.fetch_add(1, Ordering::SeqCst);
    // Hold the registry lock across spawn + insert so a task that ends at once can't remove its
    // entry before it was inserted (which would leave a stale entry behind).
    let mut conns = lock(&shared.conns);
    let id = conns.next_id;
    conns.next_id += 1;
    let guard = ConnGuard {
        shared: shared.clone(),
        id,
    };
    let task_shared = shared.clone();
    let task = tokio::spawn(async move {
        let _guard = guard;
        serve_conn(task_shared, id, stream).await;
    });
    conns
        .open
        .insert(id, (ConnKind::Pending, task.abort_handle()));
}

async fn serve_conn(shared: Arc<Shared>, id: u64, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let Some(head) = peek_head(&stream).await else {
        return;
    };
    if is_websocket_upgrade(&head) {
        shared.set_kind(id, ConnKind::WebSocket);
        shared.websockets.fetch_add(1, Ordering::SeqCst);
        let refusal = lock(&shared.refuse_ws)
            .as_ref()
            .filter(|(path, _)| request_path(&head).contains(path.as_str()))
            .map(|(_, status)| *status);
        match refusal {
            Some(status) => {
                shared.refused_websockets.fetch_add(1, Ordering::SeqCst);
                refuse_upgrade(stream, &head, status).await;
            }
            None => tunnel(&shared, stream).await,
        }
    } else {
        shared.set_kind(id, ConnKind::Http);
        let service = service_fn(move |request| handle(shared.clone(), request));
        if let Err(e) = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service)
            .await
        {
            // Usually a client hanging up mid-request, or upstream unreachable (see `handle`).
            eprintln!("fault proxy: connection ended with error: {e}");
        }
    }
}

/// Peeks (without consuming) at the first request head, so hyper or the tunnel still sees every
/// byte. `None` if the client closed without sending anything.
async fn peek_head(stream: &TcpStream) -> Option<String> {
    let mut buf = vec![0u8; 16 * 1024];
    let started = Instant::now();
    loop {
        let n = stream.peek(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        let seen = &buf[..n];
        let complete = seen.windows(4).any(|w| w == b"\r\n\r\n");
        // A head that fills the buffer, or trickles in for too long, is judged on what we have.
        if complete || n == buf.len() || started.elapsed() > Duration::from_secs(5) {
            return Some(String::from_utf8_lossy(seen).into_owned());
        }
        // `peek` returns at once while data is buffered, so wait a little for the rest.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn is_websocket_upgrade(head: &str) -> bool {
    head.split("\r\n")
        .skip(1)
        .take_while(|line| !line.is_empty())
        .filter_map(|line| line.split_once(':'))
        .any(|(name, value)| {
            name.trim().eq_ignore_ascii_case("upgrade")
                && value.to_ascii_lowercase().contains("websocket")
        })
}

/// The path (with query) of a request head's request line.
fn request_path(head: &str) -> &str {
    head.split("\r\n")
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .unwrap_or("")
}

/// Answers a websocket upgrade with a plain HTTP error and closes the connection. The head is
/// read first (an upgrade has no body), so closing does not reset the connection before the
/// client has read the answer.
async fn refuse_upgrade(mut stream: TcpStream, head: &str, status: u16) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let head_len = head.find("\r\n\r\n").map_or(head.len(), |i| i + 4);
    let mut consumed = vec![0u8; head_len];
    if stream.read_exact(&mut consumed).await.is_err() {
        return;
    }
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::NOT_FOUND);
    let body = if status == StatusCode::NOT_FOUND {
        r#"{"detail":"Not Found"}"#.to_owned()
    } else {
        let reason = status.canonical_reason().unwrap_or("Injected fault");
        format!(r#"{{"exception_message":"{reason}"}}"#)
    };
    let response = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-fault-proxy: injected\r\nconnection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Raw TCP pass-through for a websocket; the task is aborted to drop it.
async fn tunnel(shared: &Shared, mut client: TcpStream) {
    let mut upstream = match TcpStream::connect(&shared.upstream_authority).await {
        Ok(upstream) => upstream,
        Err(e) => {
            // Dropping the client socket mirrors a server that is not there.
            eprintln!(
                "fault proxy: websocket upstream {} unreachable: {e}",
                shared.upstream_authority
            );
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Headers that describe one hop, not the message; a proxy must not pass them on.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, BoxError> {
    let (parts, body) = request.into_parts();
    // Read the body even for injected failures: an unread body would stop hyper from reusing
    // the connection, and the real server reads it too.
    let body = body.collect().await?.to_bytes();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();

    let hold = {
        let mut rule = lock(&shared.hold);
        let matches = rule.as_ref().is_some_and(|r| {
            path_and_query.contains(&r.path_contains)
                && String::from_utf8_lossy(&body).contains(&r.body_contains)
        });
        matches && rule.take().is_some()
    };
    if hold {
        let mut released = shared.release.subscribe();
        shared.held.fetch_add(1, Ordering::SeqCst);
        // Err only when the proxy is gone, which drops this connection anyway.
        let _ = released.wait_for(|go| *go).await;
    }

    let injected = lock(&shared.faults).decide(&format!("{} {path_and_query}", parts.method));
    if let Some(Injected {
        status,
        after_forwarding: false,
    }) = injected
    {
        shared.failed.fetch_add(1, Ordering::SeqCst);
        shared.count_endpoint(&parts.method, &path_and_query, status);
        return Ok(injected_response(status));
    }

    let url = format!("{}{}", shared.upstream_base, path_and_query);
    let mut upstream_request = shared.client.request(parts.method.clone(), url);
    for (name, value) in &parts.headers {
        // Host names the proxy; Content-Length is recomputed by reqwest from the body.
        if name != HOST && name != CONTENT_LENGTH && !is_hop_by_hop(name) {
            upstream_request = upstream_request.header(name, value);
        }
    }
    // On error (upstream unreachable) the client connection is closed without an answer, which
    // is what the worker would see talking to the dead server directly.
    let upstream_response = upstream_request.body(body).send().await?;
    let status = upstream_response.status();
    let headers = upstream_response.headers().clone();
    let body = upstream_response.bytes().await?;
    if let Some(Injected { status, .. }) = injected {
        // The server has acted; the client only hears the injected failure.
        shared.failed.fetch_add(1, Ordering::SeqCst);
        shared.count_endpoint(&parts.method, &path_and_query, status);
        return Ok(injected_response(status));
    }

    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    for (name, value) in &headers {
        // hyper sets Content-Length from the buffered body, except for HEAD where the body is
        // empty and upstream's length is the meaningful one.
        if is_hop_by_hop(name) || (name == CONTENT_LENGTH && parts.method != Method::HEAD) {
            continue;
        }
        response.headers_mut().append(name, value.clone());
    }
    shared.forwarded.fetch_add(1, Ordering::SeqCst);
    shared.count_endpoint(&parts.method, &path_and_query, status.as_u16());
    Ok(response)
}

/// `"METHOD /api/path"` with UUID segments as `{id}` and no query, plus ` -> STATUS` unless 2xx.
fn endpoint_key(method: &Method, path_and_query: &str, status: u16) -> String {
    let path = path_and_query.split('?').next().unwrap_or("");
    let path: Vec<&str> = path
        .split('/')
        .map(|segment| {
            if uuid::Uuid::parse_str(segment).is_ok() {
                "{id}"
            } else {
                segment
            }
        })
        .collect();
    let mut key = format!("{method} {}", path.join("/"));
    if !(200..300).contains(&status) {
        key.push_str(&format!(" -> {status}"));
    }
    key
}

/// The error shape of Prefect (a `FastAPI` app), so the worker parses it as it would a real failure.
fn injected_response(status: u16) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let reason = status.canonical_reason().unwrap_or("Injected fault");
    let body = format!(r#"{{"exception_message":"{reason}"}}"#);
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if status == StatusCode::TOO_MANY_REQUESTS {
        // Prefect's server sends Retry-After on 429; a short one keeps tests fast.
        headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    // Lets a confused test author tell an injected failure from a real one in a capture.
    headers.insert(
        HeaderName::from_static("x-fault-proxy"),
        HeaderValue::from_static("injected"),
    );
    response
}
