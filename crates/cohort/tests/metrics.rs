//! `GET /metrics` scraped by a real Prometheus (Debian's `prometheus` package, started here on
//! a loopback port with a temporary data directory) while a Cohort worker runs real flows
//! against a real Prefect 3.8.8 server. The assertions query Prometheus' HTTP API, so they
//! check what Prometheus made of the scrape, not only the text; `promtool check metrics` lints
//! the text itself.

// End-to-end tests wait on real processes: wall-clock time and sleeps are the point here.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod util;

use std::io::Write as _;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use util::{unique, unused_port, DeploySpec, Worker, WorkerKind};

const FINAL_TIMEOUT: Duration = Duration::from_secs(240);

/// A worker on a fresh process pool serving its web server on `port`, with `flags`.
fn worker(pool: &str, port: u16, flags: &[&str]) -> Worker {
    let mut args = vec!["--pool", pool, "--type", "process"];
    args.extend_from_slice(flags);
    Worker::builder(WorkerKind::Cohort, &args)
        .env("PREFECT_WORKER_WEBSERVER_HOST", "127.0.0.1")
        .env("PREFECT_WORKER_WEBSERVER_PORT", &port.to_string())
        .spawn()
}

/// `GET http://127.0.0.1:{port}{path}`: the status and body, once the server answers.
fn get(port: u16, path: &str) -> (u16, String) {
    let url = format!("http://127.0.0.1:{port}{path}");
    util::poll(
        &format!("{url} to answer"),
        Duration::from_secs(60),
        Duration::from_millis(200),
        || {
            let response = reqwest::blocking::get(&url).ok()?;
            let status = response.status().as_u16();
            Some((status, response.text().ok()?))
        },
    )
}

/// A Prometheus server scraping `target` every second, stopped and its data removed when
/// dropped.
struct Prometheus {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: u16) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("prometheus.yml");
        let mut file = std::fs::File::create(&config).expect("prometheus.yml");
        write!(
            file,
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n- job_name: cohort\n  static_configs:\n  - targets: ['127.0.0.1:{target}']\n"
        )
        .expect("write prometheus.yml");
        let port = unused_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "`prometheus` must be installed (Debian's package: scripts/test.sh installs it)",
            );
        let prometheus = Self {
            port,
            child,
            _dir: dir,
        };
        util::poll(
            "Prometheus to be ready",
            Duration::from_secs(60),
            Duration::from_millis(200),
            || {
                reqwest::blocking::get(format!("http://127.0.0.1:{port}/-/ready"))
                    .ok()
                    .filter(|r| r.status().is_success())
                    .map(|_| ())
            },
        );
        prometheus
    }

    /// The instant vector of `query`, as `(labels, value)`.
    fn query(&self, query: &str) -> Vec<(Value, f64)> {
        let url = format!("http://127.0.0.1:{}/api/v1/query", self.port);
        let answer: Value = reqwest::blocking::Client::new()
            .get(&url)
            .query(&[("query", query)])
            .send()
            .and_then(|r| r.json())
            .unwrap_or_else(|e| panic!("query {query}: {e}"));
        assert_eq!(answer["status"], "success", "{answer}");
        answer["data"]["result"]
            .as_array()
            .expect("a vector")
            .iter()
            .map(|r| {
                let value = r["value"][1]
                    .as_str()
                    .unwrap_or("NaN")
                    .parse()
                    .unwrap_or(f64::NAN);
                (r["metric"].clone(), value)
            })
            .collect()
    }

    /// Waits until `query` gives one series equal to `want`.
    fn wait_for(&self, query: &str, want: f64) {
        util::poll(
            &format!("Prometheus to have {query} = {want}"),
            Duration::from_secs(60),
            Duration::from_millis(500),
            || match self.query(query).as_slice() {
                [(_, v)] if *v == want => Some(()),
                _ => None,
            },
        );
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Four real runs (three complete, one fails) through a worker (`--limit 4`) scraped by
/// Prometheus: the counters equal what happened, by infrastructure and final state; the
/// pickup histogram counted each run; the connections and the journal are up; nothing is
/// left in flight, every slot is free and the outbox is empty.
#[test]
fn prometheus_scrapes_what_the_worker_did() {
    let s = util::server();
    let pool = unique("metrics");
    s.create_work_pool(&pool, "process");
    let port = unused_port();
    let _worker = worker(&pool, port, &["--with-metrics", "--limit", "4"]);
    let prometheus = Prometheus::start(port);

    let hello = s.deploy(&DeploySpec::new(&pool, "hello"));
    let fail = s.deploy(&DeploySpec::new(&pool, "fail"));
    let mut runs = Vec::new();
    for _ in 0..3 {
        runs.push(s.create_flow_run(&hello.id, &[], json!({}), json!({})));
    }
    runs.push(s.create_flow_run(&fail.id, &[], json!({}), json!({})));
    for run in &runs {
        s.wait_for_final_state(&run.id, FINAL_TIMEOUT);
    }

    prometheus.wait_for(
        "cohort_flow_runs_submitted_total{infrastructure=\"process\"}",
        4.0,
    );
    prometheus.wait_for(
        "cohort_flow_runs_finished_total{infrastructure=\"process\",state=\"completed\"}",
        3.0,
    );
    prometheus.wait_for(
        "cohort_flow_runs_finished_total{infrastructure=\"process\",state=\"failed\"}",
        1.0,
    );
    prometheus.wait_for(
        "cohort_flow_run_pickup_latency_seconds_count{infrastructure=\"process\"}",
        4.0,
    );
    prometheus.wait_for("cohort_flow_runs_in_flight", 0.0);
    prometheus.wait_for("cohort_worker_slots{state=\"free\"}", 4.0);
    prometheus.wait_for("cohort_worker_slots{state=\"used\"}", 0.0);
    // Every event the worker sent was confirmed by the server.
    prometheus.wait_for("cohort_event_outbox_depth", 0.0);
    prometheus.wait_for("cohort_event_outbox_oldest_age_seconds", 0.0);
    prometheus.wait_for("cohort_journal_writable", 1.0);
    prometheus.wait_for("cohort_worker_channel_connected", 1.0);
    prometheus.wait_for("cohort_event_feed_connected{feed=\"wake\"}", 1.0);
    prometheus.wait_for("cohort_event_feed_connected{feed=\"cancel\"}", 1.0);
    prometheus.wait_for("cohort_worker_info{worker_type=\"process\"}", 1.0);
    // Every run's state was proposed through the API: Pending at least, four times.
    let claims = prometheus.query(
        "sum(cohort_api_requests_total{endpoint=\"/flow_runs/{id}/set_state\",status=~\"2..\"})",
    );
    assert!(claims.first().is_some_and(|(_, v)| *v >= 4.0), "{claims:?}");
    // The pickup histogram's buckets are cumulative up to +Inf.
    let inf = prometheus.query(
        "cohort_flow_run_pickup_latency_seconds_bucket{infrastructure=\"process\",le=\"+Inf\"}",
    );
    assert_eq!(inf.first().map(|(_, v)| *v), Some(4.0), "{inf:?}");
    // Prometheus scraped it successfully all along.
    prometheus.wait_for("up{job=\"cohort\"}", 1.0);
}

/// The scrape's text passes `promtool check metrics` (Prometheus' linter) with no problem;
/// `--with-metrics` alone serves no probes, `--with-healthcheck` serves both.
#[test]
fn the_metrics_text_passes_promtool_and_the_flags_choose_the_routes() {
    let s = util::server();
    let pool = unique("metrics-lint");
    s.create_work_pool(&pool, "process");
    let port = unused_port();
    let metrics_only = worker(&pool, port, &["--with-metrics"]);
    let hello = s.deploy(&DeploySpec::new(&pool, "hello"));
    let run = s.create_flow_run(&hello.id, &[], json!({}), json!({}));
    s.wait_for_final_state(&run.id, FINAL_TIMEOUT);
    let (status, text) = get(port, "/metrics");
    assert_eq!(status, 200);
    assert!(text.contains("cohort_api_requests_total{"), "{text}");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("`promtool` must be installed (Debian's prometheus package)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let linted = promtool.wait_with_output().unwrap();
    assert!(
        linted.status.success() && linted.stdout.is_empty() && linted.stderr.is_empty(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&linted.stdout),
        String::from_utf8_lossy(&linted.stderr)
    );
    assert_eq!(
        get(port, "/health").0,
        404,
        "no probes with --with-metrics alone"
    );
    drop(metrics_only);

    let port = unused_port();
    let _worker = worker(&pool, port, &["--with-healthcheck"]);
    assert_eq!(get(port, "/metrics").0, 200);
    util::poll(
        "the health probe to pass",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || (get(port, "/health").0 == 200).then_some(()),
    );
}
