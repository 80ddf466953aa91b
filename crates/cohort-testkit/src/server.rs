//! [`ServerProcess`]: a real Prefect server for the tests and the benchmarks.

use std::fs::{self, File};
use std::io::{Read as _, Seek as _, SeekFrom};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::thread::sleep;
use std::time::{Duration, Instant};

use reqwest::blocking::Client;

use crate::env::{free_port, path_with_venv_first, scrub_prefect_env};

/// The watchdog: runs the server, waits for EOF on stdin (the calling process exited,
/// however it exited), then SIGTERMs the worker process groups it was told of and its own
/// group (server included; it ignores TERM itself), waits up to 15 s for the server, removes
/// the temporary directory and SIGKILLs whatever is left. Plain POSIX sh: dash's `kill` takes
/// no `--`, so process groups are written `-PGID` (procps' `/usr/bin/kill` would read that as
/// options: callers signal groups with `killpg(2)`).
///
/// The server runs in a loop so [`ServerProcess::stop`] / [`ServerProcess::restart`] can
/// start it again on the same port and database: while `server.held` exists an exited
/// server waits to be started again; without it, an exit is final (and `server.exit` says so).
const WATCHDOG_SH: &str = r#"
dir=$1; shift
( while :; do
    "$@" </dev/null >>"$dir/server.log" 2>&1 &
    echo $! >"$dir/server.pid"
    wait $!
    echo $? >"$dir/server.exit"
    [ -e "$dir/server.held" ] || break
    while [ -e "$dir/server.held" ]; do sleep 0.1; done
  done ) &
trap '' TERM INT HUP
read _ldummy || :
for g in $(cat "$dir/workers.pgids" 2>/dev/null); do kill -TERM "-$g" 2>/dev/null; done
pid=$(cat "$dir/server.pid" 2>/dev/null)
kill -TERM "-$$" 2>/dev/null
i=0
while [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ $i -lt 150 ]; do sleep 0.1; i=$((i+1)); done
for g in $(cat "$dir/workers.pgids" 2>/dev/null); do kill -KILL "-$g" 2>/dev/null; done
rm -rf "$dir"
kill -KILL "-$$" 2>/dev/null
"#;

/// How to start the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The Prefect venv (`prefect` is its `bin/prefect`).
    pub venv: PathBuf,
    /// Prefix of the server's temporary directory (`PREFECT_HOME`, log, watchdog files).
    pub dir_prefix: String,
    /// More environment for `prefect server start`, applied last (a database URL, an auth
    /// string, service timings).
    pub env: Vec<(String, String)>,
    /// How long it may take to answer `GET /health`.
    pub start_timeout: Duration,
}

/// The server could not be started (or started again); the message holds its log.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ServerError(String);

/// A running `prefect server start` (127.0.0.1, a free port, a temporary `PREFECT_HOME`;
/// SQLite there unless the environment names another database), under the watchdog.
pub struct ServerProcess {
    api_url: String,
    dir: PathBuf,
    health: Client,
    start_timeout: Duration,
    /// Set while the server is stopped on purpose ([`Self::stop`]).
    stopped: Mutex<bool>,
    /// Write end of the watchdog's stdin: never written, closed when this process exits.
    _watchdog_stdin: Mutex<ChildStdin>,
    _watchdog: Mutex<Child>,
}

impl ServerProcess {
    /// Starts the server and waits until it is healthy. A port taken between probing and
    /// binding is retried on another.
    pub fn start(config: &ServerConfig) -> Result<ServerProcess, ServerError> {
        let mut last = ServerError("not started".into());
        for _ in 0..3 {
            match Self::start_once(config) {
                Ok(s) => return Ok(s),
                Err((true, e)) => last = e,
                Err((false, e)) => return Err(e),
            }
        }
        Err(last)
    }

    /// `Err((retry on another port, why))`.
    fn start_once(config: &ServerConfig) -> Result<ServerProcess, (bool, ServerError)> {
        let fatal = |e: String| (false, ServerError(e));
        let port = free_port();
        let dir = tempfile::Builder::new()
            .prefix(&config.dir_prefix)
            .tempdir()
            .map_err(|e| fatal(format!("temporary directory: {e}")))?
            .keep();
        let home = dir.join("home");
        fs::create_dir_all(&home).map_err(|e| fatal(format!("{}: {e}", home.display())))?;

        let bin = config.venv.join("bin");
        let mut cmd = Command::new("sh");
        scrub_prefect_env(&mut cmd);
        cmd.arg("-c")
            .arg(WATCHDOG_SH)
            .arg("cohort-prefect-watchdog")
            .arg(&dir)
            .arg(bin.join("prefect"))
            .args(["server", "start", "--host", "127.0.0.1", "--port"])
            .arg(port.to_string())
            .env("PREFECT_HOME", &home)
            .env("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
            .env("PREFECT_UI_ENABLED", "false")
            .env("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
            .env("PREFECT_LOGGING_LEVEL", "WARNING")
            // Events reach the database in batches; flush every second instead of every 5 s
            // so reading them back is quicker (it changes nothing a worker sees, and times
            // come from the events' `occurred`).
            .env(
                "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL",
                "1",
            )
            .env("PATH", path_with_venv_first(&bin));
        for (k, v) in &config.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        let mut watchdog = cmd
            .spawn()
            .map_err(|e| fatal(format!("cannot run sh for the Prefect server: {e}")))?;
        let stdin = watchdog.stdin.take().expect("piped stdin");
        let server = ServerProcess {
            api_url: format!("http://127.0.0.1:{port}/api"),
            dir,
            health: Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("a reqwest client"),
            start_timeout: config.start_timeout,
            stopped: Mutex::new(false),
            _watchdog_stdin: Mutex::new(stdin),
            _watchdog: Mutex::new(watchdog),
        };
        match server.wait_healthy() {
            Ok(()) => Ok(server),
            // Dropping `server` closes the watchdog's stdin: it cleans up.
            Err(e) => {
                let log = server.log();
                let retry = log.contains("already in use") || log.contains("Errno 98");
                Err((retry, e))
            }
        }
    }

    fn wait_healthy(&self) -> Result<(), ServerError> {
        let started = Instant::now();
        loop {
            if let Ok(resp) = self.health.get(format!("{}/health", self.api_url)).send() {
                if resp.status().is_success() {
                    return Ok(());
                }
            }
            if self.dir.join("server.exit").exists() {
                return Err(ServerError(format!(
                    "`prefect server start` ({}) exited:\n{}",
                    self.api_url,
                    self.log()
                )));
            }
            if started.elapsed() > self.start_timeout {
                return Err(ServerError(format!(
                    "`prefect server start` ({}) not healthy after {:?}:\n{}",
                    self.api_url,
                    self.start_timeout,
                    self.log()
                )));
            }
            sleep(Duration::from_millis(100));
        }
    }

    /// `http://127.0.0.1:<port>/api`
    pub fn api_url(&self) -> &str {
        &self.api_url
    }

    /// The server's temporary directory, removed by the watchdog: scratch space for what
    /// must not outlive the run.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// PID of `prefect server start` (the root of the server's process tree).
    pub fn pid(&self) -> Option<i32> {
        fs::read_to_string(self.dir.join("server.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The server's log so far (`prefect server start` stdout and stderr).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// Length of the log so far, to read what a phase added with [`Self::log_since`].
    pub fn log_len(&self) -> u64 {
        fs::metadata(self.dir.join("server.log"))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    pub fn log_since(&self, offset: u64) -> String {
        let mut buf = Vec::new();
        if let Ok(mut f) = File::open(self.dir.join("server.log")) {
            if f.seek(SeekFrom::Start(offset)).is_ok() {
                let _ = f.read_to_end(&mut buf);
            }
        }
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Tells the watchdog which worker process groups to kill if the caller dies first.
    pub fn watch_workers(&self, pgids: impl IntoIterator<Item = u32>) {
        let body: String = pgids.into_iter().map(|p| format!("{p}\n")).collect();
        let _ = fs::write(self.dir.join("workers.pgids"), body);
    }

    /// Stops the server gracefully, as an operator would: SIGTERM to `prefect server start`
    /// (uvicorn closes its sockets and runs the app's shutdown, which stops the services: the
    /// event persister flushes what it holds), SIGKILL after `grace`. The port stays unbound
    /// until [`Self::restart`]. Returns how long the stop took.
    pub fn stop(&self, grace: Duration) -> Result<Duration, ServerError> {
        let mut stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        if *stopped {
            return Err(ServerError("the server is already stopped".into()));
        }
        let started = Instant::now();
        let io = |e: std::io::Error| ServerError(format!("{}: {e}", self.dir.display()));
        fs::write(self.dir.join("server.held"), b"").map_err(io)?;
        let pid = fs::read_to_string(self.dir.join("server.pid"))
            .map_err(io)?
            .trim()
            .to_owned();
        let exited = || self.dir.join("server.exit").exists();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + grace;
        while !exited() && Instant::now() < deadline {
            sleep(Duration::from_millis(50));
        }
        if !exited() {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while !exited() {
                if Instant::now() > deadline {
                    return Err(ServerError(format!(
                        "the Prefect server (pid {pid}) did not exit after SIGKILL"
                    )));
                }
                sleep(Duration::from_millis(50));
            }
        }
        *stopped = true;
        Ok(started.elapsed())
    }

    /// Starts the server again after [`Self::stop`] (same port, `PREFECT_HOME` and database)
    /// and waits until it is healthy; returns how long that took.
    pub fn restart(&self) -> Result<Duration, ServerError> {
        let mut stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        if !*stopped {
            return Err(ServerError("the server is not stopped".into()));
        }
        let started = Instant::now();
        // The watchdog's loop starts the server as soon as `server.held` is gone; the old
        // exit status must go first so it is not mistaken for the new process's.
        let _ = fs::remove_file(self.dir.join("server.exit"));
        fs::remove_file(self.dir.join("server.held"))
            .map_err(|e| ServerError(format!("remove server.held: {e}")))?;
        self.wait_healthy()?;
        *stopped = false;
        Ok(started.elapsed())
    }

    /// True between [`Self::stop`] and [`Self::restart`].
    pub fn is_stopped(&self) -> bool {
        *self.stopped.lock().unwrap_or_else(|e| e.into_inner())
    }
}
