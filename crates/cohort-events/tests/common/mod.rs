//! Helpers shared by the tests against a real Prefect 3.8.8 server: finding the virtualenv
//! and running `prefect server start` on a free port in a scratch `PREFECT_HOME`.
// Waits on a real server process: wall-clock time and sleeps are the point here.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::fs::{self, File};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use uuid::Uuid;

const VENV_ENV: &str = "COHORT_PREFECT_VENV";

pub fn venv() -> PathBuf {
    let hint = "run scripts/prefect-venv.sh and export COHORT_PREFECT_VENV=<the path it prints>";
    let dir = match std::env::var_os(VENV_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => panic!("{VENV_ENV} is not set: this test needs Prefect 3.8.8; {hint}"),
    };
    assert!(
        dir.join("bin/prefect").is_file(),
        "{VENV_ENV}={} has no bin/prefect; {hint}",
        dir.display()
    );
    dir
}

/// `prefect server start` in its own process group and scratch `PREFECT_HOME`; dropping it
/// kills the whole group and removes the directory.
pub struct PrefectServer {
    child: Child,
    home: PathBuf,
    /// `http://127.0.0.1:<port>/api`.
    pub api_url: String,
}

impl PrefectServer {
    pub fn start(venv: &Path) -> Self {
        let home = std::env::temp_dir().join(format!("cohort-events-{}", Uuid::new_v4().simple()));
        fs::create_dir_all(&home).expect("create PREFECT_HOME");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = File::create(home.join("server.log")).expect("server log");
        let mut command = Command::new(venv.join("bin/prefect"));
        for (key, _) in std::env::vars_os() {
            // A developer's own profile or API URL must not leak in.
            if key.to_string_lossy().starts_with("PREFECT_") {
                command.env_remove(key);
            }
        }
        command
            .args(["server", "start", "--host", "127.0.0.1", "--port"])
            .arg(port.to_string())
            .current_dir(&home)
            .env("PREFECT_HOME", &home)
            .env("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
            .env("PREFECT_UI_ENABLED", "false")
            .env(
                "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL",
                "1",
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .process_group(0);
        let child = command.spawn().expect("spawn `prefect server start`");
        PrefectServer {
            child,
            home,
            api_url: format!("http://127.0.0.1:{port}/api"),
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.home.join("server.log")).unwrap_or_default()
    }

    pub async fn wait_healthy(&mut self, http: &reqwest::Client) {
        for _ in 0..720 {
            if let Ok(response) = http.get(format!("{}/health", self.api_url)).send().await {
                if response.status().is_success() {
                    return;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "`prefect server start` exited with {status}:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("Prefect server not healthy after 180 s:\n{}", self.log());
    }
}

impl Drop for PrefectServer {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let kill = |signal: &str| {
            let _ = Command::new("kill")
                .args([signal, "--", &group])
                .stderr(Stdio::null())
                .status();
        };
        kill("-TERM");
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Uvicorn's workers and services share the group; make sure none outlives the test.
        kill("-KILL");
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.home);
    }
}
