//! The state every part of one emulator shares: the store, the request log, the pending
//! faults, scripted logs, and the shutdown signal.

use tokio_util::sync::CancellationToken;

use crate::faults::Faults;
use crate::kubelet::logs::ScriptedLogs;
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
}
