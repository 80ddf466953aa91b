//! The worker's Prometheus metrics. One set per process (a process runs one worker or one
//! runner), reached through [`metrics`] as Prometheus' own client libraries reach their
//! default registry: the pipeline counts where things happen, and `GET /metrics` on the
//! health server encodes them ([`Metrics::encode`], Prometheus text format 0.0.4, which
//! `promtool check metrics` lints and every Prometheus scrapes).
//!
//! Names and labels follow Prometheus' conventions (base units, `_total` counters, no label
//! of unbounded cardinality: API paths are templated, flow run ids never appear). Every name
//! is in [`names`]; `docs/metrics.md` says what each means.

#![forbid(unsafe_code)]

use std::sync::OnceLock;
use std::time::Duration;

use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric's name.
pub mod names {
    /// Gauge, always 1: the worker's type and Cohort's version as labels.
    pub const WORKER_INFO: &str = "cohort_worker_info";
    /// Counter: flow runs submitted to their infrastructure, by infrastructure.
    pub const FLOW_RUNS_SUBMITTED: &str = "cohort_flow_runs_submitted_total";
    /// Counter: flow runs whose supervision ended, by infrastructure and final state.
    pub const FLOW_RUNS_FINISHED: &str = "cohort_flow_runs_finished_total";
    /// Histogram: seconds from a run's expected start to its submission.
    pub const PICKUP_LATENCY: &str = "cohort_flow_run_pickup_latency_seconds";
    /// Gauge: runs claimed and not yet told (launching, running, being reported).
    pub const FLOW_RUNS_IN_FLIGHT: &str = "cohort_flow_runs_in_flight";
    /// Gauge: `--limit` slots, used and free (absent without a limit).
    pub const WORKER_SLOTS: &str = "cohort_worker_slots";
    /// Gauge: events in the outbox not yet confirmed by the server.
    pub const EVENT_OUTBOX_DEPTH: &str = "cohort_event_outbox_depth";
    /// Gauge: seconds the oldest unconfirmed event has waited (0 when none waits).
    pub const EVENT_OUTBOX_OLDEST_AGE: &str = "cohort_event_outbox_oldest_age_seconds";
    /// Counter: Prefect API requests answered or failed, by method, templated endpoint and
    /// status (`error` when no answer came).
    pub const API_REQUESTS: &str = "cohort_api_requests_total";
    /// Counter: Prefect API requests sent again after a transient failure.
    pub const API_RETRIES: &str = "cohort_api_retries_total";
    /// Gauge: 1 while an events websocket (`feed`: `wake`, `cancel`) is connected.
    pub const EVENT_FEED_CONNECTED: &str = "cohort_event_feed_connected";
    /// Gauge: 1 while the worker channel (heartbeats, clean-ups) is connected.
    pub const WORKER_CHANNEL_CONNECTED: &str = "cohort_worker_channel_connected";
    /// Gauge: 1 while the claim journal's last write succeeded.
    pub const JOURNAL_WRITABLE: &str = "cohort_journal_writable";
}

/// Pickup latency buckets: from an event-driven pickup (tens of ms) to a busy burst (minutes).
const PICKUP_BUCKETS: [f64; 13] = [
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// The process's metrics.
pub struct Metrics {
    registry: Registry,
    info: IntGaugeVec,
    submitted: IntCounterVec,
    finished: IntCounterVec,
    pickup: HistogramVec,
    in_flight: IntGauge,
    slots: IntGaugeVec,
    outbox_depth: IntGauge,
    outbox_oldest_age: Gauge,
    api_requests: IntCounterVec,
    api_retries: IntCounterVec,
    feed_connected: IntGaugeVec,
    channel_connected: IntGauge,
    journal_writable: IntGauge,
}

/// The metrics of this process.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// The help text of each metric, next to its name for `# HELP`.
fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let info = IntGaugeVec::new(
            opts(
                names::WORKER_INFO,
                "The worker's type and Cohort's version; always 1.",
            ),
            &["worker_type", "version"],
        )
        .expect("valid metric");
        let submitted = IntCounterVec::new(
            opts(
                names::FLOW_RUNS_SUBMITTED,
                "Flow runs submitted to their infrastructure.",
            ),
            &["infrastructure"],
        )
        .expect("valid metric");
        let finished = IntCounterVec::new(
            opts(
                names::FLOW_RUNS_FINISHED,
                "Flow runs whose supervision ended, by the run's state then.",
            ),
            &["infrastructure", "state"],
        )
        .expect("valid metric");
        let pickup = HistogramVec::new(
            HistogramOpts::new(
                names::PICKUP_LATENCY,
                "Seconds from a flow run's expected start time to its submission.",
            )
            .buckets(PICKUP_BUCKETS.to_vec()),
            &["infrastructure"],
        )
        .expect("valid metric");
        let in_flight = IntGauge::with_opts(opts(
            names::FLOW_RUNS_IN_FLIGHT,
            "Flow runs claimed by this worker and not yet told.",
        ))
        .expect("valid metric");
        let slots = IntGaugeVec::new(
            opts(names::WORKER_SLOTS, "The --limit slots, used and free."),
            &["state"],
        )
        .expect("valid metric");
        let outbox_depth = IntGauge::with_opts(opts(
            names::EVENT_OUTBOX_DEPTH,
            "Events in the outbox not yet confirmed by the server.",
        ))
        .expect("valid metric");
        let outbox_oldest_age = Gauge::with_opts(opts(
            names::EVENT_OUTBOX_OLDEST_AGE,
            "Seconds the oldest unconfirmed event in the outbox has waited.",
        ))
        .expect("valid metric");
        let api_requests = IntCounterVec::new(
            opts(
                names::API_REQUESTS,
                "Prefect API requests answered (by status) or failed without an answer (error).",
            ),
            &["method", "endpoint", "status"],
        )
        .expect("valid metric");
        let api_retries = IntCounterVec::new(
            opts(
                names::API_RETRIES,
                "Prefect API requests sent again after a transient failure.",
            ),
            &["method", "endpoint"],
        )
        .expect("valid metric");
        let feed_connected = IntGaugeVec::new(
            opts(
                names::EVENT_FEED_CONNECTED,
                "1 while the events websocket is connected.",
            ),
            &["feed"],
        )
        .expect("valid metric");
        let channel_connected = IntGauge::with_opts(opts(
            names::WORKER_CHANNEL_CONNECTED,
            "1 while the worker channel is connected.",
        ))
        .expect("valid metric");
        let journal_writable = IntGauge::with_opts(opts(
            names::JOURNAL_WRITABLE,
            "1 while the claim journal's last write succeeded.",
        ))
        .expect("valid metric");
        for collector in [
            Box::new(info.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(submitted.clone()),
            Box::new(finished.clone()),
            Box::new(pickup.clone()),
            Box::new(in_flight.clone()),
            Box::new(slots.clone()),
            Box::new(outbox_depth.clone()),
            Box::new(outbox_oldest_age.clone()),
            Box::new(api_requests.clone()),
            Box::new(api_retries.clone()),
            Box::new(feed_connected.clone()),
            Box::new(channel_connected.clone()),
            Box::new(journal_writable.clone()),
        ] {
            registry.register(collector).expect("names are unique");
        }
        Self {
            registry,
            info,
            submitted,
            finished,
            pickup,
            in_flight,
            slots,
            outbox_depth,
            outbox_oldest_age,
            api_requests,
            api_retries,
            feed_connected,
            channel_connected,
            journal_writable,
        }
    }

    /// The scrape: every metric in Prometheus text format 0.0.4.
    pub fn encode(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("writing to a Vec cannot fail");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }

    /// The `Content-Type` of [`Metrics::encode`]'s text.
    pub fn content_type(&self) -> &'static str {
        prometheus::TEXT_FORMAT
    }

    /// Who is serving: set once at start.
    pub fn worker_started(&self, worker_type: &str, version: &str) {
        self.info.with_label_values(&[worker_type, version]).set(1);
        // Known at start, so a scrape before the first run sees zeros, not nothing.
        self.submitted.with_label_values(&[worker_type]);
    }

    /// A run was submitted `latency` after its expected start (none when it has none).
    pub fn run_submitted(&self, infrastructure: &str, latency: Option<Duration>) {
        self.submitted.with_label_values(&[infrastructure]).inc();
        if let Some(latency) = latency {
            self.pickup
                .with_label_values(&[infrastructure])
                .observe(latency.as_secs_f64());
        }
    }

    /// A run's supervision ended with the run in `state` (Prefect's state type, lower case).
    pub fn run_finished(&self, infrastructure: &str, state: &str) {
        self.finished
            .with_label_values(&[infrastructure, state])
            .inc();
    }

    /// Runs in flight now, and the `--limit` if there is one.
    pub fn in_flight(&self, runs: usize, limit: Option<usize>) {
        self.in_flight.set(gauge(runs));
        if let Some(limit) = limit {
            self.slots
                .with_label_values(&["used"])
                .set(gauge(runs.min(limit)));
            self.slots
                .with_label_values(&["free"])
                .set(gauge(limit.saturating_sub(runs)));
        }
    }

    /// The outbox's unconfirmed events and how long the oldest has waited.
    pub fn outbox(&self, depth: usize, oldest_age: Duration) {
        self.outbox_depth.set(gauge(depth));
        self.outbox_oldest_age.set(oldest_age.as_secs_f64());
    }

    /// An API request ended: answered with `status`, or not answered (`None`).
    pub fn api_request(&self, method: &str, endpoint: &str, status: Option<u16>) {
        let status = status.map_or_else(|| "error".to_owned(), |s| s.to_string());
        self.api_requests
            .with_label_values(&[method, endpoint, &status])
            .inc();
    }

    /// An API request is sent again.
    pub fn api_retry(&self, method: &str, endpoint: &str) {
        self.api_retries
            .with_label_values(&[method, endpoint])
            .inc();
    }

    /// An events websocket connected or lost its connection.
    pub fn event_feed(&self, feed: &str, connected: bool) {
        self.feed_connected
            .with_label_values(&[feed])
            .set(i64::from(connected));
    }

    /// The worker channel connected or lost its connection.
    pub fn worker_channel(&self, connected: bool) {
        self.channel_connected.set(i64::from(connected));
    }

    /// The claim journal's state.
    pub fn journal(&self, writable: bool) {
        self.journal_writable.set(i64::from(writable));
    }
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The endpoint label of a Prefect API path given as its segments: ids and user-chosen
/// names are templated, so the label's values are few (`/flow_runs/{id}/set_state`,
/// `/work_pools/{name}/get_scheduled_flow_runs`).
pub fn endpoint(segments: &[&str]) -> String {
    let mut out = String::new();
    let mut previous = "";
    for (i, segment) in segments.iter().enumerate() {
        let templated = if is_uuid(segment) {
            "{id}"
        } else if (previous == "work_pools" && !segment.is_empty())
            || previous == "name"
            || (i >= 2 && segments.get(1) == Some(&"name"))
        {
            "{name}"
        } else if previous == "block_documents" && !segment.is_empty() {
            "{id}"
        } else {
            segment
        };
        out.push('/');
        out.push_str(templated);
        previous = segment;
    }
    out
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_template_ids_and_names() {
        let id = "0b1f6c1e-6a44-4a5c-9a43-3f5f2b0f9d11";
        assert_eq!(
            endpoint(&["flow_runs", id, "set_state"]),
            "/flow_runs/{id}/set_state"
        );
        assert_eq!(
            endpoint(&["work_pools", "my pool", "get_scheduled_flow_runs"]),
            "/work_pools/{name}/get_scheduled_flow_runs"
        );
        assert_eq!(endpoint(&["work_pools", ""]), "/work_pools/");
        assert_eq!(
            endpoint(&["deployments", "name", "flow", "dep"]),
            "/deployments/name/{name}/{name}"
        );
        assert_eq!(
            endpoint(&["variables", "name", "x"]),
            "/variables/name/{name}"
        );
        assert_eq!(
            endpoint(&["block_documents", "abc"]),
            "/block_documents/{id}"
        );
        assert_eq!(endpoint(&["logs", ""]), "/logs/");
    }

    #[test]
    fn the_scrape_names_every_metric_once_counted() {
        let m = metrics();
        m.worker_started("process", "0.1.0");
        m.run_submitted("process", Some(Duration::from_millis(300)));
        m.run_finished("process", "completed");
        m.in_flight(1, Some(4));
        m.outbox(2, Duration::from_secs(3));
        m.api_request("POST", "/flow_runs/{id}/set_state", Some(201));
        m.api_retry("POST", "/flow_runs/{id}/set_state");
        m.event_feed("wake", true);
        m.worker_channel(true);
        m.journal(true);
        let text = m.encode();
        for line in [
            "cohort_flow_runs_submitted_total{infrastructure=\"process\"} 1",
            "cohort_flow_runs_finished_total{infrastructure=\"process\",state=\"completed\"} 1",
            "cohort_flow_run_pickup_latency_seconds_bucket{infrastructure=\"process\",le=\"0.5\"} 1",
            "cohort_worker_slots{state=\"free\"} 3",
            "cohort_event_outbox_depth 2",
            "cohort_api_requests_total{endpoint=\"/flow_runs/{id}/set_state\",method=\"POST\",status=\"201\"} 1",
            "cohort_event_feed_connected{feed=\"wake\"} 1",
            "cohort_journal_writable 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
    }
}
