//! Serves an emulator on loopback until interrupted, for trying clients by hand
//! (kubectl, Prefect's worker):
//!
//! ```text
//! cargo run -p cohort-kube-fake --example serve -- <dir> [docker]
//! kubectl --kubeconfig <dir>/kubeconfig get pods
//! ```
//!
//! Pods are scheduled at once; with `docker` they run on the local Docker Engine.

use cohort_kube_fake::{Emulator, EmulatorConfig, Kubelet};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().ok_or("usage: serve <dir> [docker]")?;
    let kubelet = match args.next().as_deref() {
        Some("docker") => Kubelet::Docker { network_host: true },
        _ => Kubelet::Scripted {
            auto_schedule: true,
        },
    };
    let emulator = Emulator::new(EmulatorConfig::with_kubelet(kubelet));
    let served = emulator.serve().await?;
    let path = served.write_kubeconfig(std::path::Path::new(&dir))?;
    println!("{} {}", served.url(), path.display());
    tokio::signal::ctrl_c().await?;
    emulator.shutdown().await;
    Ok(())
}
