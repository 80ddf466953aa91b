//! The worker's web server: `GET /metrics` (Prometheus text, `cohort-metrics`) with
//! `--with-metrics` or `--with-healthcheck`, and with the latter the probes. `GET /health` answers like Prefect's worker
//! (`prefect/workers/server.py`): OK while the last successful poll is recent, 503 otherwise.
//! Cohort adds liveness and readiness apart, for orchestrators that restart on one and route
//! on the other: `GET /livez` is OK while the poll loop turns, server reachable or not (a
//! restart would not bring the server back), and the claim journal is writable (after a
//! write error it must be reopened: a restart does that); `GET /readyz` is OK while the last
//! poll succeeded within three poll intervals and claims can be journaled. Both also read the
//! [supervised background tasks](cohort_supervise): `/livez` fails while a vital task (the
//! event emitter) is down or any task keeps failing, `/readyz` also while the worker channel
//! (heartbeats) or the cancel watcher is down; the body names each failing task and why.

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::journal::Journal;
use cohort_supervise as supervise;
pub use cohort_supervise::LastPolled;

/// What the health endpoints look at.
#[derive(Clone)]
pub struct Probes {
    /// The last successful poll.
    pub last_polled: LastPolled,
    /// The last poll attempt, successful or not.
    pub loop_turned: LastPolled,
    /// Prefect's `/health` window (30 poll intervals).
    pub window: Duration,
    /// The poll interval.
    pub interval: Duration,
    /// The claim journal, whose last write must have succeeded.
    pub journal: Journal,
    /// The supervised background tasks.
    pub tasks: supervise::Health,
    /// The event outbox, read at each scrape.
    pub outbox: Option<cohort_events::emitter::Outbox>,
    /// Serve the probes (`--with-healthcheck`), not only `/metrics`.
    pub health: bool,
}

/// `GET /metrics`: the gauges that are read rather than counted are read now.
fn scrape(probes: &Probes) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    let metrics = cohort_metrics::metrics();
    metrics.journal(probes.journal.is_healthy());
    if let Some(outbox) = &probes.outbox {
        match outbox.stats() {
            Ok(stats) => metrics.outbox(stats.depth, stats.oldest_age.unwrap_or_default()),
            Err(e) => tracing::warn!(error = %e, "cannot read the event outbox's depth"),
        }
    }
    (
        [(axum::http::header::CONTENT_TYPE, metrics.content_type())],
        metrics.encode(),
    )
}

fn answer(ok: bool, failing: serde_json::Value) -> (StatusCode, Json<serde_json::Value>) {
    if ok {
        (StatusCode::OK, Json(json!({"message": "OK"})))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(failing))
    }
}

/// Binds the healthcheck's address: done at start-up, so a taken port fails it clearly.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Serves the probes on `listener` until `shutdown`.
pub async fn serve(listener: tokio::net::TcpListener, probes: Probes, shutdown: CancellationToken) {
    let scraped = probes.clone();
    let metrics = Router::new().route(
        "/metrics",
        get(move || {
            let answer = scrape(&scraped);
            async move { answer }
        }),
    );
    let app = if probes.health {
        metrics.merge(probe_routes(probes))
    } else {
        metrics
    };
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned());
    if let Err(e) = server.await {
        tracing::error!(error = %e, "the worker's web server failed");
    }
}

/// `/health`, `/livez`, `/readyz`.
fn probe_routes(probes: Probes) -> Router {
    let (health, live, ready) = (probes.clone(), probes.clone(), probes);
    Router::new()
        .route(
            "/health",
            get(move || {
                let ok = health.last_polled.age() <= health.window;
                async move {
                    answer(
                        ok,
                        json!({"message": "Worker may be unresponsive at this time"}),
                    )
                }
            }),
        )
        .route(
            "/livez",
            get(move || {
                // A poll that hangs longer than the client's timeouts and retries would be a
                // stuck loop; an unreachable server is not. A journal that failed a write is
                // not usable again until it is reopened (redb's rule after an I/O error), so
                // a restart is what helps.
                let turning =
                    live.loop_turned.age() <= live.interval * 3 + Duration::from_secs(300);
                let journal = live.journal.is_healthy();
                let refused = live.journal.claims_refused();
                let tasks = live.tasks.not_live();
                async move {
                    answer(
                        turning && journal && tasks.is_empty(),
                        json!({
                            "message": "not live",
                            "poll_loop_turning": turning,
                            "journal_writable": journal,
                            "claims_refused": refused,
                            "failing_tasks": tasks,
                        }),
                    )
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let polled = ready.last_polled.age() <= ready.interval * 3;
                let journal = ready.journal.is_healthy();
                let refused = ready.journal.claims_refused();
                let tasks = ready.tasks.not_ready();
                async move {
                    answer(
                        polled && journal && tasks.is_empty(),
                        json!({
                            "message": "not ready",
                            "server_reachable": polled,
                            "journal_writable": journal,
                            "claims_refused": refused,
                            "failing_tasks": tasks,
                        }),
                    )
                }
            }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_supervise::{Policy, Role, Supervisor};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// `GET path` over a fresh connection: the status code and the JSON body.
    async fn get(addr: SocketAddr, path: &str) -> (u16, serde_json::Value) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let status = response[9..12].parse().unwrap();
        let body = response.split_once("\r\n\r\n").unwrap().1;
        (status, serde_json::from_str(body).unwrap())
    }

    struct Served {
        addr: SocketAddr,
        supervisor: Supervisor,
        stop: CancellationToken,
        _dir: tempfile::TempDir,
    }

    /// The real health server on a loopback port, with `last_polled`/`loop_turned` as given
    /// and a supervisor whose restarts take an hour (a task that ends stays down).
    async fn serve_probes(last_polled: LastPolled, loop_turned: LastPolled) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path().join("journal.redb")).unwrap();
        let supervisor = Supervisor::new(Policy {
            backoff_base: Duration::from_secs(3600),
            backoff_cap: Duration::from_secs(3600),
            ..Policy::default()
        });
        let probes = Probes {
            last_polled,
            loop_turned,
            window: Duration::from_secs(300),
            interval: Duration::from_secs(10),
            journal,
            tasks: supervisor.health(),
            outbox: None,
            health: true,
        };
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, probes, stop.clone()));
        Served {
            addr,
            supervisor,
            stop,
            _dir: dir,
        }
    }

    /// A supervised task that ends at once and stays down.
    async fn task_down(served: &Served, name: &'static str, role: Role) {
        served
            .supervisor
            .spawn(name, role, served.stop.clone(), || async {});
        while served
            .supervisor
            .health()
            .task(name)
            .unwrap()
            .down_since
            .is_none()
        {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn livez_and_readyz_answer_ok_while_everything_works() {
        let served = serve_probes(LastPolled::new(), LastPolled::new()).await;
        for path in ["/health", "/livez", "/readyz"] {
            assert_eq!(
                get(served.addr, path).await,
                (200, json!({"message": "OK"})),
                "{path}"
            );
        }
        served.stop.cancel();
    }

    #[tokio::test]
    async fn readyz_is_503_naming_the_heartbeat_task_while_it_restarts() {
        let served = serve_probes(LastPolled::new(), LastPolled::new()).await;
        task_down(&served, "worker-channel", Role::Ready).await;
        task_down(&served, "wake-watcher", Role::Helper).await;
        let (status, body) = get(served.addr, "/readyz").await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["message"], "not ready");
        let failing = body["failing_tasks"].as_object().unwrap();
        assert_eq!(
            failing.keys().collect::<Vec<_>>(),
            ["worker-channel"],
            "{body}"
        );
        assert!(
            failing["worker-channel"]
                .as_str()
                .unwrap()
                .starts_with("restarting: ended"),
            "{body}"
        );
        assert_eq!(
            (
                body["server_reachable"].clone(),
                body["journal_writable"].clone()
            ),
            (json!(true), json!(true))
        );
        let (status, body) = get(served.addr, "/livez").await;
        assert_eq!(
            status, 200,
            "a restarting heartbeat is not a broken process: {body}"
        );
        served.stop.cancel();
    }

    #[tokio::test]
    async fn livez_is_503_naming_the_emitter_while_it_is_down() {
        let served = serve_probes(LastPolled::new(), LastPolled::new()).await;
        task_down(&served, "event-emitter", Role::Vital).await;
        for (path, message) in [("/livez", "not live"), ("/readyz", "not ready")] {
            let (status, body) = get(served.addr, path).await;
            assert_eq!(status, 503, "{path}: {body}");
            assert_eq!(body["message"], message);
            assert!(
                body["failing_tasks"]["event-emitter"].is_string(),
                "{path}: {body}"
            );
        }
        served.stop.cancel();
    }

    #[tokio::test]
    async fn livez_and_readyz_are_503_when_the_poll_loop_stalls() {
        // Polled long ago, and the loop has not turned for longer than its timeouts allow.
        let stale = Duration::from_secs(3600);
        let served =
            serve_probes(LastPolled::polled_ago(stale), LastPolled::polled_ago(stale)).await;
        let (status, body) = get(served.addr, "/readyz").await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["server_reachable"], false);
        let (status, body) = get(served.addr, "/livez").await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["poll_loop_turning"], false);
        assert_eq!(body["failing_tasks"], json!({}));
        let (status, body) = get(served.addr, "/health").await;
        assert_eq!(
            (status, body),
            (
                503,
                json!({"message": "Worker may be unresponsive at this time"})
            )
        );
        served.stop.cancel();
    }

    #[tokio::test]
    async fn readyz_is_503_while_only_the_server_is_unreachable_and_livez_stays_200() {
        // The loop turns (every attempt touches it) but no poll has succeeded for a while.
        let served = serve_probes(
            LastPolled::polled_ago(Duration::from_secs(60)),
            LastPolled::new(),
        )
        .await;
        let (status, body) = get(served.addr, "/readyz").await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["server_reachable"], false);
        let (status, body) = get(served.addr, "/livez").await;
        assert_eq!(
            status, 200,
            "an unreachable server is not a reason to restart: {body}"
        );
        served.stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn age_tracks_touches() {
        let lp = LastPolled::new();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(lp.age(), Duration::from_secs(5));
        lp.touch();
        assert_eq!(lp.age(), Duration::ZERO);
    }
}
