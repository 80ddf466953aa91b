//! The supervisor side of Prefect's Attempt Control Session: a loopback TCP listener that the
//! flow-run engine connects back to, so a cancel is delivered as an *intent* before the SIGTERM
//! (the engine then exits 0 and leaves the Cancelled state to us instead of force-writing
//! Crashed), and so the engine can report that it concluded the attempt (an outcome receipt).
//!
//! Mirrors `prefect/runner/_control_channel.py: ControlChannel` against the child side in
//! `prefect/_internal/control_listener.py`, with the framing of
//! `prefect/_internal/attempt_control.py`. The wire protocol, in order:
//!
//! 1. The child sends `<token>\n`. The token is single-use: it is consumed by the first
//!    connection that presents it, whatever happens afterwards.
//! 2. The child sends the hello `b"\x00PF" + [version, capabilities]` (Prefect 3.8.8: `[2, 1]`,
//!    version 2 with receipt support); we answer with the selected version and capabilities.
//! 3. Either we send an intent byte (`c`ancel, `r`eschedule, `q` relinquish) and the child
//!    answers `a` once it has committed it, or the child sends a receipt
//!    `b"\x01" + u32_be(len) + json` (at most 4096 bytes) and we answer `b"\x02"`.
//!    The first of the two that completes is the attempt's conclusion; the session then closes.
//!
//! Anything else closes the connection; the session is best effort, and a supervisor with no
//! conclusion falls back to the exit-code and kill paths.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

/// Env var carrying the listener's port to the child (`PREFECT__CONTROL_PORT`).
pub const CONTROL_PORT_ENV: &str = "PREFECT__CONTROL_PORT";
/// Env var carrying the attempt's single-use token to the child (`PREFECT__CONTROL_TOKEN`).
pub const CONTROL_TOKEN_ENV: &str = "PREFECT__CONTROL_TOKEN";
/// How long Prefect's supervisor waits for the child to acknowledge an intent
/// (`_control_channel.py: _DEFAULT_ACK_TIMEOUT`).
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest receipt payload either side accepts (`attempt_control.py: MAX_RECEIPT_SIZE`).
pub const MAX_RECEIPT_SIZE: usize = 4096;

const NEGOTIATION_PREFIX: [u8; 3] = *b"\x00PF";
const NEGOTIATION_FRAME_SIZE: usize = NEGOTIATION_PREFIX.len() + 2;
const LEGACY_PROTOCOL_VERSION: u8 = 1;
const CURRENT_PROTOCOL_VERSION: u8 = 2;
const RECEIPT_CAPABILITY: u8 = 1 << 0;
const RECEIPT_PREFIX: u8 = 0x01;
const RECEIPT_ACK: u8 = 0x02;
const INTENT_ACK: u8 = b'a';
/// Prefect gives a connection 5 s to present its token (`ControlChannel._handle_connection`).
const TOKEN_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Tokens are 32 hex characters; anything much longer is not a token.
const MAX_TOKEN_LINE: u64 = 1024;

/// What the supervisor asks the engine to do before it sends SIGTERM
/// (`attempt_control.py: Intent`, `BYTE_FOR_INTENT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Intent {
    /// The run is being cancelled; the supervisor writes Cancelled and runs `on_cancellation`.
    Cancel,
    /// The supervisor will propose `AwaitingRetry` (`prefect flow-run execute` on SIGTERM with
    /// `PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR=reschedule`).
    Reschedule,
    /// The supervisor leaves the state alone so the infrastructure retries the attempt.
    Relinquish,
}

impl Intent {
    /// The byte sent on the wire.
    pub fn as_byte(self) -> u8 {
        match self {
            Intent::Cancel => b'c',
            Intent::Reschedule => b'r',
            Intent::Relinquish => b'q',
        }
    }

    /// Prefect's name for the intent (`"cancel"`, `"reschedule"`, `"relinquish"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Intent::Cancel => "cancel",
            Intent::Reschedule => "reschedule",
            Intent::Relinquish => "relinquish",
        }
    }
}

impl fmt::Display for Intent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an attempt concluded, as told by the engine (`attempt_control.py: AttemptConclusion`).
/// Either one means the engine handled the attempt, so the supervisor reports status code 0
/// whatever the exit code (`_flow_run_executor.py: FlowRunExecutor.submit`).
#[derive(Debug, Clone, PartialEq)]
pub enum Conclusion {
    /// An engine outcome receipt, validated as Prefect's `decode_receipt` does: an object with
    /// `"disposition": "ORCHESTRATION_ABORTED"` and nothing else, or
    /// `"disposition": "STATE_REPORTED"` with string `state_id` (a UUID), `state_type`
    /// (1–64 characters) and `state_name`, and nothing else.
    Receipt(serde_json::Value),
    /// The engine committed and acknowledged this intent (`StateOwnershipDelegation`).
    Acknowledged(Intent),
}

/// Result of [`Attempt::signal`] (`_control_channel.py: ControlSignalStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalStatus {
    /// The engine committed the intent; it will exit 0 on the SIGTERM that should follow.
    Acknowledged,
    /// The attempt had already concluded (usually an engine receipt): Prefect's
    /// `CancellationManager.cancel` then does nothing at all — no kill, no state, no event.
    AlreadyConcluded,
    /// Not connected, the engine could not commit the intent, or no ack in time: fall back to
    /// the kill path (the engine will treat the SIGTERM as a crash).
    NotAcknowledged,
}

/// Why a control connection was closed early. Never retryable: the token is spent, so the
/// attempt falls back to the exit-code and kill paths.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    /// The socket failed or the child went away mid-frame.
    #[error("control connection failed")]
    Io(#[from] io::Error),
    /// A byte `0x00` that did not start a well-formed negotiation frame.
    #[error("malformed negotiation frame")]
    MalformedNegotiation,
    /// A receipt before receipt support was negotiated.
    #[error("receipt sent without negotiating receipt support")]
    UnnegotiatedReceipt,
    /// A receipt whose declared length exceeds [`MAX_RECEIPT_SIZE`].
    #[error("receipt of {0} bytes exceeds the {MAX_RECEIPT_SIZE}-byte limit")]
    ReceiptTooLarge(usize),
    /// A receipt payload that `attempt_control.py: decode_receipt` would reject.
    #[error("malformed receipt: {0}")]
    MalformedReceipt(&'static str),
    /// `a` while no intent was pending.
    #[error("intent acknowledgement without a pending intent")]
    UnexpectedAck,
    /// A byte that starts no known message.
    #[error("unexpected byte {0:#04x}")]
    UnexpectedByte(u8),
}

/// Tokens not yet presented, each pointing at the attempt it authenticates. An attempt that has
/// been dropped is removed (and a stale `Weak` is treated the same as a missing token).
type Registry = Mutex<HashMap<String, Weak<AttemptShared>>>;

fn lock(registry: &Registry) -> std::sync::MutexGuard<'_, HashMap<String, Weak<AttemptShared>>> {
    registry.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One loopback listener per supervisor (worker or runner), accepting the engine's connections.
/// Dropping it stops accepting and closes every open control connection.
pub struct ControlListener {
    port: u16,
    registry: Arc<Registry>,
    accept_loop: JoinHandle<()>,
}

impl fmt::Debug for ControlListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlListener")
            .field("port", &self.port)
            .field("pending_tokens", &lock(&self.registry).len())
            .finish()
    }
}

impl ControlListener {
    /// Binds `127.0.0.1:0` and starts accepting. Prefect logs a bind failure and falls back to
    /// kill-only cancellation (`ControlChannel.__aenter__`); the caller decides that here.
    pub async fn bind() -> io::Result<ControlListener> {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await?;
        let port = listener.local_addr()?.port();
        let registry = Arc::new(Registry::default());
        let accept_loop = tokio::spawn(
            AcceptLoop {
                listener,
                registry: registry.clone(),
                connections: JoinSet::new(),
            }
            .run(),
        );
        tracing::debug!(port, "control channel listening on 127.0.0.1");
        Ok(ControlListener {
            port,
            registry,
            accept_loop,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A new attempt with a fresh single-use token (`secrets.token_hex(16)`: 32 hex chars).
    pub fn register(&self) -> Attempt {
        let token = new_token();
        let (state, _) = watch::channel(SessionState::default());
        let (commands, command_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(AttemptShared {
            state,
            commands: Mutex::new(Some(command_rx)),
        });
        lock(&self.registry).insert(token.clone(), Arc::downgrade(&shared));
        Attempt {
            port: self.port,
            token,
            shared,
            commands,
            registry: self.registry.clone(),
        }
    }
}

impl Drop for ControlListener {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection task; each
        // session's guard then marks its attempt closed.
        self.accept_loop.abort();
        // Attempts still waiting for their child can no longer be reached.
        for (_, attempt) in lock(&self.registry).drain() {
            if let Some(attempt) = attempt.upgrade() {
                attempt.state.send_modify(|s| s.phase = Phase::Closed);
            }
        }
    }
}

/// One flow-run attempt's control session; dropping it unregisters the token and closes the
/// connection (`ControlChannel.unregister`).
pub struct Attempt {
    port: u16,
    token: String,
    shared: Arc<AttemptShared>,
    commands: mpsc::UnboundedSender<Command>,
    registry: Arc<Registry>,
}

impl fmt::Debug for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token is a credential for the control port; keep it out of logs.
        let state = self.shared.state.borrow();
        f.debug_struct("Attempt")
            .field("port", &self.port)
            .field("phase", &state.phase)
            .field("conclusion", &state.conclusion)
            .finish_non_exhaustive()
    }
}

impl Attempt {
    /// The env vars the child needs: `PREFECT__CONTROL_PORT`, `PREFECT__CONTROL_TOKEN`.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            (CONTROL_PORT_ENV.to_owned(), self.port.to_string()),
            (CONTROL_TOKEN_ENV.to_owned(), self.token.clone()),
        ]
    }

    /// Sends `intent` if the engine is connected and waits up to `timeout` (Prefect: 1 s) for
    /// the ack. True only if the engine acknowledged it; on false, check [`Attempt::conclusion`]
    /// (or use [`Attempt::signal`]) to tell "already concluded" from "fall back to killing".
    pub async fn send_intent(&self, intent: Intent, timeout: Duration) -> bool {
        self.signal(intent, timeout).await == SignalStatus::Acknowledged
    }

    /// Sends `intent` and reports what happened, as `ControlChannel.signal` does.
    pub async fn signal(&self, intent: Intent, timeout: Duration) -> SignalStatus {
        let mut state = self.shared.state.subscribe();
        {
            let current = state.borrow_and_update();
            if current.conclusion.is_some() {
                tracing::debug!(%intent, "ignoring control intent after the attempt concluded");
                return SignalStatus::AlreadyConcluded;
            }
            if current.phase != Phase::Connected {
                // Prefect has no start-up grace: a child that has not connected yet gets the
                // plain kill path.
                tracing::debug!(%intent, "engine not connected to the control channel");
                return SignalStatus::NotAcknowledged;
            }
        }

        // Bounded as a whole (Prefect bounds only the ack wait) so a child that stops reading
        // cannot hold a cancellation up.
        let outcome = tokio::time::timeout(timeout, async {
            let (reply, delivered) = oneshot::channel();
            if self
                .commands
                .send(Command::Deliver { intent, reply })
                .is_err()
                || !delivered.await.unwrap_or(false)
            {
                return false;
            }
            // The session closes right after any conclusion, so waiting for "closed" also covers
            // a receipt that raced the intent.
            state
                .wait_for(|s| {
                    matches!(s.conclusion, Some(Conclusion::Acknowledged(_)))
                        || s.phase == Phase::Closed
                })
                .await
                .is_ok_and(|s| matches!(s.conclusion, Some(Conclusion::Acknowledged(_))))
        })
        .await;

        match outcome {
            Ok(true) => SignalStatus::Acknowledged,
            Ok(false) => self.fallback_status(),
            Err(_elapsed) => {
                tracing::debug!(%intent, ?timeout, "engine did not acknowledge control intent");
                // Prefect resets the connection when the ack does not come in time.
                let _ = self.commands.send(Command::Close);
                self.fallback_status()
            }
        }
    }

    /// What the engine told us, if anything. Prefect treats either kind as "the attempt
    /// concluded" and reports status code 0 regardless of the exit code.
    pub fn conclusion(&self) -> Option<Conclusion> {
        self.shared.state.borrow().conclusion.clone()
    }

    /// Whether the engine is connected right now.
    pub fn is_connected(&self) -> bool {
        self.shared.state.borrow().phase == Phase::Connected
    }

    /// Waits until the engine has connected and authenticated: true then, false once the
    /// session is over without a live connection. Never resolves for a child that never
    /// connects; wrap it in a timeout.
    pub async fn wait_connected(&self) -> bool {
        let mut state = self.shared.state.subscribe();
        state
            .wait_for(|s| s.phase != Phase::Waiting)
            .await
            .is_ok_and(|s| s.phase == Phase::Connected)
    }

    fn fallback_status(&self) -> SignalStatus {
        if self.shared.state.borrow().conclusion.is_some() {
            SignalStatus::AlreadyConcluded
        } else {
            SignalStatus::NotAcknowledged
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        // A token the child never presented must not authenticate anything later. Dropping
        // `commands` ends a live session.
        lock(&self.registry).remove(&self.token);
    }
}

/// Where one attempt's session is. The token is single-use, so an attempt has at most one
/// connection ever: `Waiting → Connected → Closed`, or `Waiting → Closed` when the listener
/// goes away first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Phase {
    #[default]
    Waiting,
    Connected,
    Closed,
}

#[derive(Debug, Default)]
struct SessionState {
    phase: Phase,
    /// Set once: the first receipt or acknowledged intent wins.
    conclusion: Option<Conclusion>,
}

/// What the attempt and its connection task share.
struct AttemptShared {
    state: watch::Sender<SessionState>,
    /// Taken by the connection that authenticates with the token.
    commands: Mutex<Option<mpsc::UnboundedReceiver<Command>>>,
}

impl AttemptShared {
    fn record(&self, conclusion: Conclusion) -> bool {
        self.state.send_if_modified(|s| {
            if s.conclusion.is_some() {
                return false;
            }
            s.conclusion = Some(conclusion);
            true
        })
    }
}

enum Command {
    /// Write the intent byte; replies whether it went out.
    Deliver {
        intent: Intent,
        reply: oneshot::Sender<bool>,
    },
    /// Close the connection (no ack in time).
    Close,
}

struct AcceptLoop {
    listener: TcpListener,
    registry: Arc<Registry>,
    /// Connection tasks, owned here so they end with the listener.
    connections: JoinSet<()>,
}

impl AcceptLoop {
    async fn run(mut self) {
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _peer)) => {
                        self.connections.spawn(handle_connection(stream, self.registry.clone()));
                    }
                    Err(error) => {
                        // Usually out of file descriptors; don't spin on it.
                        tracing::warn!(%error, "control channel could not accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(joined) = self.connections.join_next(), if !self.connections.is_empty() => {
                    if let Err(error) = joined {
                        if error.is_panic() {
                            tracing::error!(%error, "control connection task panicked");
                        }
                    }
                }
            }
        }
    }
}

/// Authenticates one connection and, if its token is good, runs the attempt's session on it
/// (`ControlChannel._handle_connection`).
async fn handle_connection(stream: TcpStream, registry: Arc<Registry>) {
    // asyncio streams set TCP_NODELAY; an intent byte must not wait behind Nagle.
    let _ = stream.set_nodelay(true);
    let (reader, writer) = stream.into_split();
    let mut reader = BufReader::new(reader);

    let mut line = Vec::new();
    let read = tokio::time::timeout(
        TOKEN_READ_TIMEOUT,
        (&mut reader)
            .take(MAX_TOKEN_LINE)
            .read_until(b'\n', &mut line),
    )
    .await;
    match read {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => {
            tracing::debug!(%error, "control connection failed before authenticating");
            return;
        }
        Err(_elapsed) => {
            tracing::debug!("control connection sent no token in time");
            return;
        }
    }
    let token = String::from_utf8_lossy(&line).trim().to_owned();
    if token.is_empty() {
        return;
    }

    // Authentication consumes the token before the connection is bound, so a replay cannot
    // replace the active child.
    let attempt = lock(&registry).remove(&token).and_then(|a| a.upgrade());
    let Some(attempt) = attempt else {
        tracing::warn!("attempt control session rejected unauthenticated connection");
        return;
    };
    let commands = attempt
        .commands
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    let Some(commands) = commands else {
        return;
    };

    let guard = ClosedOnDrop(attempt.clone());
    attempt.state.send_modify(|s| {
        if s.phase == Phase::Waiting {
            s.phase = Phase::Connected;
        }
    });
    tracing::debug!("engine connected to the attempt control session");
    let session = Session {
        attempt,
        writer,
        commands,
        receipts_negotiated: false,
        pending_intent: None,
    };
    match session.run(reader).await {
        Ok(()) => {}
        Err(SessionError::Io(error)) => {
            tracing::debug!(%error, "attempt control connection failed");
        }
        Err(error) => {
            tracing::warn!(%error, "attempt control session received a malformed message");
        }
    }
    drop(guard);
}

/// Marks the attempt's session closed however its task ends (return, abort, panic).
struct ClosedOnDrop(Arc<AttemptShared>);

impl Drop for ClosedOnDrop {
    fn drop(&mut self) {
        self.0.state.send_modify(|s| s.phase = Phase::Closed);
    }
}

/// One frame from the child after authentication.
#[derive(Debug, PartialEq)]
enum Frame {
    Eof,
    Ack,
    Negotiation { version: u8, capabilities: u8 },
    Receipt(serde_json::Value),
}

/// An authenticated connection: the only writer on its socket, driven by frames from the child
/// and commands from the [`Attempt`].
struct Session {
    attempt: Arc<AttemptShared>,
    writer: OwnedWriteHalf,
    commands: mpsc::UnboundedReceiver<Command>,
    receipts_negotiated: bool,
    pending_intent: Option<Intent>,
}

enum Next {
    Continue,
    Close,
}

impl Session {
    async fn run(mut self, reader: BufReader<OwnedReadHalf>) -> Result<(), SessionError> {
        // Reading a frame is not cancel-safe, so the read future lives across loop turns and
        // is replaced only once it has completed.
        let frame = read_frame(reader, self.receipts_negotiated);
        tokio::pin!(frame);
        loop {
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(Command::Deliver { intent, reply }) => {
                        let _ = reply.send(self.handle_deliver(intent).await);
                    }
                    // The attempt was dropped, or gave up waiting for the ack.
                    None | Some(Command::Close) => return Ok(()),
                },
                (reader, frame_result) = &mut frame => {
                    match self.handle_frame(frame_result?).await? {
                        Next::Continue => frame.set(read_frame(reader, self.receipts_negotiated)),
                        Next::Close => return Ok(()),
                    }
                }
            }
        }
    }

    /// `ControlChannel._deliver_intent`: one intent per session, never after a conclusion.
    async fn handle_deliver(&mut self, intent: Intent) -> bool {
        if self.pending_intent.is_some() || self.attempt.state.borrow().conclusion.is_some() {
            return false;
        }
        self.pending_intent = Some(intent);
        if let Err(error) = self.writer.write_all(&[intent.as_byte()]).await {
            tracing::debug!(%error, %intent, "could not deliver control intent");
            self.pending_intent = None;
            return false;
        }
        true
    }

    async fn handle_frame(&mut self, frame: Frame) -> Result<Next, SessionError> {
        match frame {
            Frame::Eof => Ok(Next::Close),
            Frame::Ack => {
                let intent = self.pending_intent.ok_or(SessionError::UnexpectedAck)?;
                if self.attempt.record(Conclusion::Acknowledged(intent)) {
                    tracing::debug!(%intent, "engine acknowledged control intent");
                } else {
                    tracing::debug!("ignoring acknowledged control after the attempt concluded");
                }
                Ok(Next::Close)
            }
            Frame::Negotiation {
                version,
                capabilities,
            } => {
                let receipts =
                    version >= CURRENT_PROTOCOL_VERSION && capabilities & RECEIPT_CAPABILITY != 0;
                let (version, capabilities) = if receipts {
                    (CURRENT_PROTOCOL_VERSION, RECEIPT_CAPABILITY)
                } else {
                    (LEGACY_PROTOCOL_VERSION, 0)
                };
                self.receipts_negotiated = receipts;
                let mut reply = [0; NEGOTIATION_FRAME_SIZE];
                reply[..3].copy_from_slice(&NEGOTIATION_PREFIX);
                reply[3] = version;
                reply[4] = capabilities;
                self.writer.write_all(&reply).await?;
                tracing::debug!(version, receipts, "attempt control protocol negotiated");
                Ok(Next::Continue)
            }
            Frame::Receipt(receipt) => {
                if self.attempt.record(Conclusion::Receipt(receipt)) {
                    tracing::debug!("engine reported its outcome on the control channel");
                    self.writer.write_all(&[RECEIPT_ACK]).await?;
                } else {
                    // The child waits 1 s for an ack it will not get, then carries on.
                    tracing::debug!("ignoring receipt after the attempt concluded");
                }
                Ok(Next::Close)
            }
        }
    }
}

/// Reads one frame and hands the reader back, so the caller can keep the future alive across
/// `select!` turns.
async fn read_frame<R: AsyncRead + Unpin>(
    mut reader: R,
    receipts_negotiated: bool,
) -> (R, Result<Frame, SessionError>) {
    let result = read_frame_from(&mut reader, receipts_negotiated).await;
    (reader, result)
}

async fn read_frame_from<R: AsyncRead + Unpin>(
    reader: &mut R,
    receipts_negotiated: bool,
) -> Result<Frame, SessionError> {
    let mut first = [0u8; 1];
    if reader.read(&mut first).await? == 0 {
        return Ok(Frame::Eof);
    }
    match first[0] {
        INTENT_ACK => Ok(Frame::Ack),
        b if b == NEGOTIATION_PREFIX[0] => {
            let mut rest = [0u8; NEGOTIATION_FRAME_SIZE - 1];
            reader
                .read_exact(&mut rest)
                .await
                .map_err(|_| SessionError::MalformedNegotiation)?;
            if rest[..2] != NEGOTIATION_PREFIX[1..] {
                return Err(SessionError::MalformedNegotiation);
            }
            Ok(Frame::Negotiation {
                version: rest[2],
                capabilities: rest[3],
            })
        }
        RECEIPT_PREFIX => {
            if !receipts_negotiated {
                return Err(SessionError::UnnegotiatedReceipt);
            }
            let size = reader.read_u32().await? as usize;
            if size > MAX_RECEIPT_SIZE {
                return Err(SessionError::ReceiptTooLarge(size));
            }
            let mut payload = vec![0u8; size];
            reader.read_exact(&mut payload).await?;
            decode_receipt(&payload).map(Frame::Receipt)
        }
        other => Err(SessionError::UnexpectedByte(other)),
    }
}

/// Validates a receipt payload as `attempt_control.py: decode_receipt` does; returns the JSON.
fn decode_receipt(payload: &[u8]) -> Result<serde_json::Value, SessionError> {
    use serde_json::Value;

    if payload.len() > MAX_RECEIPT_SIZE {
        return Err(SessionError::ReceiptTooLarge(payload.len()));
    }
    let value: Value = serde_json::from_slice(payload)
        .map_err(|_| SessionError::MalformedReceipt("payload is not JSON"))?;
    let object = value
        .as_object()
        .ok_or(SessionError::MalformedReceipt("payload is not an object"))?;
    let has_exactly =
        |keys: &[&str]| object.len() == keys.len() && keys.iter().all(|k| object.contains_key(*k));
    match object.get("disposition").and_then(Value::as_str) {
        Some("ORCHESTRATION_ABORTED") => {
            if !has_exactly(&["disposition"]) {
                return Err(SessionError::MalformedReceipt(
                    "aborted receipt contains unexpected fields",
                ));
            }
        }
        Some("STATE_REPORTED") => {
            if !has_exactly(&["disposition", "state_id", "state_type", "state_name"]) {
                return Err(SessionError::MalformedReceipt(
                    "state receipt fields are invalid",
                ));
            }
            let state_id = object["state_id"].as_str();
            let state_type = object["state_type"].as_str();
            let state_name = object["state_name"].as_str();
            let valid = state_id.is_some_and(is_python_uuid)
                && state_type.is_some_and(|t| !t.is_empty() && t.chars().count() <= 64)
                && state_name.is_some();
            if !valid {
                return Err(SessionError::MalformedReceipt(
                    "state receipt fields are invalid",
                ));
            }
        }
        _ => return Err(SessionError::MalformedReceipt("disposition is invalid")),
    }
    Ok(value)
}

/// Whether Python's `uuid.UUID(s)` would accept `s`: optional `urn:uuid:` and braces, dashes
/// anywhere, 32 hex digits.
fn is_python_uuid(s: &str) -> bool {
    let s = s.replace("urn:", "").replace("uuid:", "");
    let s = s.trim_matches(|c| c == '{' || c == '}').replace('-', "");
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `secrets.token_hex(16)`: 16 bytes from the OS, lowercase hex.
fn new_token() -> String {
    let mut bytes = [0u8; 16];
    // Linux's getrandom(2) (or /dev/urandom) does not fail once the system has booted.
    getrandom::fill(&mut bytes).expect("the OS random number generator is available");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Plays the engine's side (`prefect/_internal/control_listener.py`) over a real socket.
    struct FakeEngine {
        stream: TcpStream,
    }

    impl FakeEngine {
        async fn connect(attempt: &Attempt) -> FakeEngine {
            let token = attempt.token.clone();
            Self::connect_with(attempt.port, &token).await
        }

        async fn connect_with(port: u16, token: &str) -> FakeEngine {
            let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
                .await
                .unwrap();
            stream
                .write_all(format!("{token}\n").as_bytes())
                .await
                .unwrap();
            FakeEngine { stream }
        }

        async fn send(&mut self, bytes: &[u8]) {
            self.stream.write_all(bytes).await.unwrap();
        }

        async fn negotiate(&mut self, version: u8, capabilities: u8) -> [u8; 5] {
            self.send(&[0, b'P', b'F', version, capabilities]).await;
            let mut reply = [0u8; 5];
            self.stream.read_exact(&mut reply).await.unwrap();
            reply
        }

        async fn send_receipt(&mut self, json: &str) {
            let mut frame = vec![RECEIPT_PREFIX];
            frame.extend_from_slice(&(json.len() as u32).to_be_bytes());
            frame.extend_from_slice(json.as_bytes());
            self.send(&frame).await;
        }

        /// Next byte from the supervisor, or None once it closed the connection.
        async fn read_byte(&mut self) -> Option<u8> {
            let mut b = [0u8; 1];
            match tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut b))
                .await
                .expect("supervisor neither wrote nor closed")
            {
                Ok(0) | Err(_) => None,
                Ok(_) => Some(b[0]),
            }
        }

        async fn assert_closed(&mut self) {
            assert_eq!(
                self.read_byte().await,
                None,
                "expected the supervisor to close"
            );
        }
    }

    const REPORTED: &str = r#"{"disposition":"STATE_REPORTED","state_id":"0b4c6a3e-7f43-4c1f-9d0a-2f7a1a0e9b11","state_name":"Completed","state_type":"COMPLETED"}"#;

    async fn connected(attempt: &Attempt) -> FakeEngine {
        let engine = FakeEngine::connect(attempt).await;
        assert!(wait(attempt.wait_connected()).await);
        engine
    }

    async fn wait<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(5), f)
            .await
            .expect("timed out")
    }

    async fn wait_closed(attempt: &Attempt) {
        let mut state = attempt.shared.state.subscribe();
        wait(state.wait_for(|s| s.phase == Phase::Closed))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn env_carries_port_and_a_fresh_hex_token() {
        let listener = ControlListener::bind().await.unwrap();
        let a = listener.register();
        let b = listener.register();
        let env = a.env();
        assert_eq!(
            env[0],
            (CONTROL_PORT_ENV.into(), listener.port().to_string())
        );
        assert_eq!(env[1].0, CONTROL_TOKEN_ENV);
        let token = &env[1].1;
        assert_eq!(token.len(), 32);
        assert!(token
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));
        assert_ne!(b.env()[1].1, *token);
        assert!(!format!("{a:?}").contains(token.as_str()));
    }

    #[tokio::test]
    async fn negotiation_selects_receipts_for_version_two() {
        let listener = ControlListener::bind().await.unwrap();
        let attempt = listener.register();
        let mut engine = connected(&attempt).await;
        assert_eq!(engine.negotiate(2, 1).await, *b"\x00PF\x02\x01");
        // A newer child with receipts still gets version 2.
        assert_eq!(engine.negotiate(3, 1).await, *b"\x00PF\x02\x01");
    }

    #[tokio::test]
    async fn negotiation_without_receipt_capability_selects_legacy_and_refuses_receipts() {
        let listener = ControlListener::bind().await.unwrap();
        let attempt = listener.register();
        let mut engine = connected(&attempt).await;
        assert_eq!(engine.negotiate(2, 0).await, *b"\x00PF\x01\x00");
        engine.send_receipt(REPORTED).await;
        engine.assert_closed().await;
        assert_eq!(attempt.conclusion(), None);
    }

    #[tokio::test]
    async fn receipt_is_acknowledged_and_recorded() {
        let listener = ControlListener::bind().await.unwrap();
        let attempt = listener.register();
        let mut engine = connected(&attempt).await;
        engine.negotiate(2, 1).await;
        engine.send_receipt(REPORTED).await;
        assert_eq!(engine.read_byte().await, Some(RECEIPT_ACK));
        engine.assert_closed().await;
        let expected: serde_json::Value = serde_json::from_str(REPORTED).unwrap();
        assert_eq!(attempt.conclusion(), Some(Conclusion::Receipt(expected)));
        // The receipt won: a later cancel must not kill or re-state the run.
        assert_eq!(
            attempt.signal(Intent::Cancel, DEFAULT_ACK_TIMEOUT).await,
            SignalStatus::AlreadyConcluded
        );
    }

    #[tokio::test]
    async fn aborted_receipt_is_recorded() {
        let listener = ControlListener::bind().await.unwrap();
        let attempt = listener.register();
        let mut engine = connected(&attempt).await;
        engine.negotiate(2, 1).await;
        engine
            .send_receipt(r#"{"disposition":"ORCHESTRATION_ABORTED"}"#)
            .await;
        assert_eq!(engine.read_byte().await, Some(RECEIPT_ACK));
        assert_eq!(
            attempt.conclusion(),
            Some(Conclusion::Receipt(
                serde_json::json!({"disposition": "ORCHESTRATION_ABORTED"})
            ))
        );
    }

    #[tokio::test]
    async fn malformed_receipts_close_without_a_conclusion() {
        let too_long_type = format!(
            r#"{{"disposition":"STATE_REPORTED","state_id":"0b4c6a3e7f434c1f9d0a2f7a1a0e9b11","state_name":"x","state_type":"{}"}}"#,
            "T".repeat(65)
        );
        let cases = [
            "not json",
            "[]",
            r#"{"disposition":"DONE"}"#,
            r#"{"disposition":"ORCHESTRATION_ABORTED","state_id":"x"}"#,
            r#"{"disposition":"STATE_REPORTED","state_id":"nope","state_name":"C","state_type":"COMPLETED"}"#,
            r#"{"disposition":"STATE_REPORTED","state_id":"0b4c6a3e-7f43-4c1f-9d0a-2f7a1a0e9b11","state_name":"C","state_type":""}"#,
            r#"{"disposition":"STATE_REPORTED","state_id":"0b4c6a3e-7f43-4c1f-9d0a-2f7a1a0e9b11","state_type":"COMPLETED"}"#,
            r#"{"disposition":"STATE_REPORTED","state_id":"0b4c6a3e-7f43-4c1f-9d0a-2f7a1a0e9b11","state_name":1,"state_type":"COMPLETED"}"#,
            too_long_type.as_str(),
        ];
        let listener = ControlListener::bind().await.unwrap();
        for case in cases {
            let attempt = listener.register();
            let mut engine = connected(&attempt).await;
            engine.negotiate(2, 1).await;
            engine.send_receipt(case).await;
            engine.assert_closed().await;
            assert_eq!(attempt.conclusion(), None, "{case}");
        }
    }

    #[tokio::test]
    async fn oversized_receipt_is_refused_before_reading_it() {
        let listener = ControlListener::bind().await.unwrap();
        let attempt = listener.register();
        let mut engine = connected(&attempt).await;
        engine.negotiate(2, 1).await;
        let mut frame = vec![RECEIPT_PREFIX];
        frame.extend_from_slice(&(MAX_RECEIPT_SIZE as u32 + 1).to_be_bytes());
        engine.send(&frame).await;
        engine.assert_closed().await;
        assert_eq!(attempt.conclusion(), None);
    }

    #[test]
    fn uuids_are_accepted_in_the_forms_python_accepts() {
        assert!(is_python_uuid("0b4c6a3e-7f43-4c1f-9d0a-2f7a1a0e9b11"));
        assert!(is_python_uuid("0b4c6a3e7f434c1f9d0a2f7a1a0e9b11"));
        assert!(is_python_uuid("{0B4C6A3E-7F43-4C1F-9D0A-2F7A1A0E9B11}"));
        assert!(is_python_uuid(
            "urn:uuid:0b4c6a3e-7f43-4c1f-9d0a-2f7a1a0e9b11"
        ));
        assert!(!is_python_uuid("0b4c6a3e-7f43-4c1f-9d0a-2f7a1a0e9b1"));
        assert!(!is_python_uuid("0b4c6a3e-7f43-4c1f-9d0a-2f7a1a0e9b1g"));
    }

    #[tokio::test]
    async fn cancel_intent_is_acknowledged() {
        let listener = ControlListener::bind().await.unwrap();
        let attempt = listener.register();
        let mut engine = connected(&attempt).await;
        engine.negotiate(2, 1).await;
        let supervisor = attempt.send_intent(Intent::Cancel, DEFAULT_ACK_TIMEOUT);
        let child = async {
            assert_eq!(engine.read_byte().await, Some(b'c'));
            engine.send(b"a").await;
        };
        let (acked, ()) = tokio::join!(supervisor, child);
        assert!(acked);
        assert_eq!(
            attempt.conclusion(),
            Some(Conclusion::Acknowledged(Intent::Cancel))
        );
        engine.assert_closed().await;
        // First conclusion wins.
        assert_eq!(
            attempt.signal(Intent::Cancel, DEFAULT_ACK_TIMEOUT).await,
            SignalStatus::AlreadyConcluded
        );
    }

    #[tokio::test]
    async fn legacy_child_without_negotiation_can_ack() {
        let listener = ControlListener::bind().await.unwrap();
        let attempt = listener.register();
        let mut engine = connected(&attempt).await;
        let supervisor = attempt.signal(Intent::Relinquish, DEFAULT_ACK_TIMEOUT);
        let child = async {
            assert_eq!(engine.read_byte().await, Some(b'q'));
            engine.send(b"a").await;
        };
        let (status, ()) = tokio::join!(supervisor, child);
        assert_eq!(status, SignalStatus::Acknowledged);
        assert_eq!(
            attempt.conclusion(),
            Some(Conclusion::Acknowledged(Intent::Relinquish))
        );
    }

    #[test]
    fn intent_bytes_match_prefect() {
        assert_eq!(Intent::Cancel.as_byte(), b'c');
        assert_eq!(Intent::Reschedule.as_byte(), b'r');
        assert_eq!(Intent::Relinquish.as_byte(), b'q');
    }

    #[tokio::test]
    async fn intent_without_ack_times_out_and_resets_the_connection() {
        let listener = ControlListener::bind().await.unwrap();
        let attempt = listener.register();
        let mut engine = connected(&attempt).await;
        let status = attempt
            .signal(Intent::Cancel, Duration::from_millis(100))
            .await;
        assert_eq!(status, SignalStatus::NotAcknowledged);
        assert_eq!(engine.read_byte().await, Some(b'c'));
        engine.assert_closed().await;
        assert_eq!(attempt.conclusion(), None);
        assert!(
            !attempt
                .send_intent(Intent::Cancel, DEFAULT_ACK_TIMEOUT)
                .await
        );
    }

    #[tokio::test]
    async fn intent_before_the_child_connects_is_not_acknowledged_and_late_connect_works() {
        let listener = ControlListener::bind().await.unwrap();
        let attempt = listener.register();
        assert_eq!(
            attempt.signal(Intent::Cancel, DEFAULT_ACK_TIMEOUT).await,
            SignalStatus::NotAcknowledged
        );
        let mut engine = connected(&attempt).await;
        let supervisor = attempt.send_intent(Intent::Cancel, DEFAULT_ACK_TIMEOUT);
        let child = async {
            assert_eq!(engine.read_byte().await, Some(b'c'));
            engine.send(b"a").await;
        };
        let (acked, ()) = tokio::join!(supervisor, child);
        assert!(acked);
    }

    #[tokio::test]
    async fn wrong_token_is_rejected() {
        let listener = ControlListener::bind().await.unwrap();
        let attempt = listener.register();
        let mut engine = FakeEngine::connect_with(listener.port(), &"0".repeat(32)).await;
        engine.assert_closed().await;
        assert!(!attempt.is_connected());
        // The real token still works.
        let _engine = connected(&attempt).await;
    }

    #[tokio::test]
    async fn token_is_single_use() {
        let listener = ControlListener::bind().await.unwrap();
        let attempt = listener.register();
        let mut first = connected(&attempt).await;
        let mut replay = FakeEngine::connect(&attempt).await;
        replay.assert_closed().await;
        // The replay did not replace the first connection.
        assert_eq!(first.negotiate(2, 1).await, *b"\x00PF\x02\x01");

        // Nor can it reconnect after the first one has gone.
        drop(first);
        wait_closed(&attempt).await;
        let mut again = FakeEngine::connect(&attempt).await;
        again.assert_closed().await;
        assert!(!attempt.is_connected());
    }

    #[tokio::test]
    async fn dropping_the_attempt_unregisters_its_token() {
        let listener = ControlListener::bind().await.unwrap();
        let attempt = listener.register();
        let token = attempt.token.clone();
        drop(attempt);
        assert!(lock(&listener.registry).is_empty());
        let mut engine = FakeEngine::connect_with(listener.port(), &token).await;
        engine.assert_closed().await;
    }

    #[tokio::test]
    async fn dropping_the_attempt_closes_its_connection() {
        let listener = ControlListener::bind().await.unwrap();
        let attempt = listener.register();
        let mut engine = connected(&attempt).await;
        drop(attempt);
        engine.assert_closed().await;
    }

    #[tokio::test]
    async fn dropping_the_listener_closes_connections_and_waiting_attempts() {
        let listener = ControlListener::bind().await.unwrap();
        let live = listener.register();
        let waiting = listener.register();
        let mut engine = connected(&live).await;
        drop(listener);
        engine.assert_closed().await;
        wait_closed(&live).await;
        assert!(!wait(waiting.wait_connected()).await);
    }

    #[tokio::test]
    async fn garbage_closes_the_session() {
        let listener = ControlListener::bind().await.unwrap();
        for garbage in [&b"x"[..], b"\x00XY\x02\x01", b"\x00P", b"\x02"] {
            let attempt = listener.register();
            let mut engine = connected(&attempt).await;
            engine.send(garbage).await;
            if garbage == b"\x00P" {
                // A truncated frame ends when the child goes away.
                engine.stream.shutdown().await.unwrap();
            }
            engine.assert_closed().await;
            wait_closed(&attempt).await;
            assert_eq!(attempt.conclusion(), None);
            assert!(
                !attempt
                    .send_intent(Intent::Cancel, DEFAULT_ACK_TIMEOUT)
                    .await
            );
        }
    }

    #[tokio::test]
    async fn unexpected_ack_closes_the_session() {
        let listener = ControlListener::bind().await.unwrap();
        let attempt = listener.register();
        let mut engine = connected(&attempt).await;
        engine.send(b"a").await;
        engine.assert_closed().await;
        assert_eq!(attempt.conclusion(), None);
    }

    #[tokio::test]
    async fn child_disconnect_means_no_ack() {
        let listener = ControlListener::bind().await.unwrap();
        let attempt = listener.register();
        let engine = connected(&attempt).await;
        drop(engine);
        wait_closed(&attempt).await;
        assert!(!attempt.is_connected());
        assert_eq!(
            attempt.signal(Intent::Cancel, DEFAULT_ACK_TIMEOUT).await,
            SignalStatus::NotAcknowledged
        );
    }

    #[tokio::test]
    async fn child_that_disconnects_instead_of_acking_is_not_acknowledged_quickly() {
        let listener = ControlListener::bind().await.unwrap();
        let attempt = listener.register();
        let mut engine = connected(&attempt).await;
        let supervisor = attempt.signal(Intent::Cancel, Duration::from_secs(30));
        let child = async move {
            assert_eq!(engine.read_byte().await, Some(b'c'));
            drop(engine);
        };
        let (status, ()) = wait(async { tokio::join!(supervisor, child) }).await;
        assert_eq!(status, SignalStatus::NotAcknowledged);
    }

    #[tokio::test(start_paused = true)]
    async fn child_that_never_sends_its_token_is_dropped_after_five_seconds() {
        let listener = ControlListener::bind().await.unwrap();
        let attempt = listener.register();
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, listener.port()))
            .await
            .unwrap();
        let mut b = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(60), stream.read(&mut b)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
        // The token was never presented, so it is still good.
        assert_eq!(lock(&listener.registry).len(), 1);
        drop(attempt);
    }
}
