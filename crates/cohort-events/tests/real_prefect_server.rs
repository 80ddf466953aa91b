//! The emitter against a real Prefect 3.8.8 server: an event sent over `/api/events/in` is
//! stored exactly as sent, and reads back through `POST /api/events/filter`.
//!
//! Needs the Prefect virtualenv named by `COHORT_PREFECT_VENV` (made by
//! `scripts/prefect-venv.sh`); fails loudly without it rather than skipping.
// Waits on a real server process: wall-clock time and sleeps are the point here.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::fs::{self, File};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cohort_events::emitter::{Emitter, EmitterConfig, EventsAuth};
use cohort_events::related::{self, Named};
use cohort_events::{names, Event};
use serde_json::{json, Value};
use uuid::Uuid;

const VENV_ENV: &str = "COHORT_PREFECT_VENV";

fn venv() -> PathBuf {
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
struct PrefectServer {
    child: Child,
    home: PathBuf,
    api_url: String,
}

impl PrefectServer {
    fn start(venv: &Path) -> Self {
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

    fn log(&self) -> String {
        fs::read_to_string(self.home.join("server.log")).unwrap_or_default()
    }

    async fn wait_healthy(&mut self, http: &reqwest::Client) {
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

/// `POST /api/events/filter` for one resource id, polled until the event is persisted
/// (the persister writes in batches).
async fn read_back(
    http: &reqwest::Client,
    api_url: &str,
    resource_id: &str,
    want: usize,
) -> Vec<Value> {
    let since = (chrono::Utc::now() - chrono::TimeDelta::hours(1)).to_rfc3339();
    let until = (chrono::Utc::now() + chrono::TimeDelta::hours(1)).to_rfc3339();
    let body = json!({
        "filter": {"occurred": {"since": since, "until": until}, "resource": {"id": [resource_id]}, "order": "ASC"},
        "limit": 50
    });
    for _ in 0..120 {
        let response = http
            .post(format!("{api_url}/events/filter"))
            .json(&body)
            .send()
            .await;
        if let Ok(response) = response {
            let page: Value = response.json().await.expect("EventPage JSON");
            let events = page["events"].as_array().cloned().unwrap_or_default();
            if events.len() >= want {
                return events;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("events for {resource_id} not readable after 30 s");
}

#[tokio::test(flavor = "multi_thread")]
async fn events_sent_over_the_websocket_are_stored_as_sent() {
    let venv = venv();
    let mut server = PrefectServer::start(&venv);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    server.wait_healthy(&http).await;

    let (emitter, task) = Emitter::spawn(EmitterConfig {
        api_url: url::Url::parse(&server.api_url).unwrap(),
        auth: EventsAuth::Token(None),
        user_agent: format!("cohort-events-test/{}", env!("CARGO_PKG_VERSION")),
    });
    let worker_name = format!(
        "Cohort Events Test {}",
        &Uuid::new_v4().simple().to_string()[..8]
    );
    let resource = related::worker_resource("process", &worker_name, "3.8.8");
    let pool = Named {
        id: Uuid::new_v4(),
        name: "events-test-pool".to_owned(),
    };
    let started = Event::new(
        names::WORKER_STARTED,
        resource.clone(),
        vec![related::work_pool(&pool)],
    );
    let stopped = Event::new(
        names::WORKER_STOPPED,
        resource.clone(),
        vec![related::work_pool(&pool)],
    )
    .follow(&started);
    emitter.emit(started.clone());
    emitter.emit(stopped.clone());
    emitter
        .flush(Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}\nserver log:\n{}", server.log()));

    let stored = read_back(&http, &server.api_url, resource.id(), 2).await;
    assert_eq!(stored.len(), 2, "{stored:#?}");
    for (stored, sent) in stored.iter().zip([&started, &stopped]) {
        let mut stored = stored.clone();
        assert!(stored.as_object_mut().unwrap().remove("received").is_some());
        let sent: Value = serde_json::from_str(&sent.to_wire_json().unwrap()).unwrap();
        assert_eq!(stored, sent, "the server keeps the event exactly as sent");
    }
    assert_eq!(stored[1]["follows"], json!(started.id.to_string()));
    assert_eq!(
        stored[0]["resource"]["prefect.resource.id"],
        json!(format!(
            "prefect.worker.process.cohort-events-test-{}",
            &worker_name[19..]
        ))
    );

    emitter.close();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("emitter task ends")
        .unwrap();
}
