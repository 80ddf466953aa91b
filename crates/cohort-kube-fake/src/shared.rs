//! The state every part of one emulator shares: the store, the request log, the pending
//! faults, scripted logs, and the shutdown signal.

use std::sync::OnceLock;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::faults::Faults;
use crate::kubelet::engine::Engine;
use crate::kubelet::logs::ScriptedLogs;
use crate::kubelet::KubeletCommand;
use crate::requests::RequestLog;
use crate::store::Store;
use crate::EmulatorConfig;

pub(crate) struct Shared {
    pub config: EmulatorConfig,
    pub store: Store,
    pub requests: RequestLog,
    pub faults: Faults,
    pub logs: ScriptedLogs,
    /// Cancelled when the emulator shuts down: ends watches, the controller and the kubelet.
    pub shutdown: CancellationToken,
    /// A random id for this emulator, put on everything it creates outside itself (Docker
    /// containers) so it can find and remove them.
    pub id: String,
    /// The Docker Engine (used only by the Docker kubelet and its pod logs).
    pub engine: Engine,
    /// Commands to the Docker kubelet (eviction), once it runs.
    pub kubelet_commands: OnceLock<mpsc::UnboundedSender<KubeletCommand>>,
}
