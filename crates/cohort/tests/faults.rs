//! Faults a real Prefect server cannot be made to produce on demand — bursts of 503/429
//! answers, dropped websockets — injected by `util::fault_proxy` between the worker and the
//! real server. Runs must not be harmed, and every event must arrive exactly once.

// End-to-end tests wait on real processes: wall-clock time and sleeps are the point here.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod util;

use std::time::Duration;

use serde_json::{json, Value};
use util::fault_proxy::FaultProxy;
use util::{server, unique, DeploySpec, Worker, WorkerKind};

const RUN_TIMEOUT: Duration = Duration::from_secs(120);
const EVENTS_TIMEOUT: Duration = Duration::from_secs(60);

fn events_of_run(run_id: &str, name: &str) -> Value {
    json!({
        "event": {"name": [name]},
        "any_resource": {"id": [format!("prefect.flow-run.{run_id}")]},
    })
}

/// A busy SQLite server answers 503 ("database is locked") and proxies answer 429: every call
/// of the worker's pipeline meets such a burst, and the runs still complete with exactly one
/// `submitted-flow-run` and one `executed-flow-run` each, even across dropped event sockets.
#[test]
fn busy_server_and_dropped_sockets_do_not_harm_runs() {
    let s = server();
    let upstream = s.api_url().trim_end_matches("/api").to_owned();
    let proxy = FaultProxy::start(&upstream);
    let pool = unique("faults-busy");
    s.create_work_pool(&pool, "process");
    // The flow processes talk to the server directly: the faults here are the worker's.
    let dep = s.deploy(
        &DeploySpec::new(&pool, "hello")
            .tags(&["faults"])
            .job_variables(json!({"env": {"PREFECT_API_URL": s.api_url()}})),
    );
    let runs: Vec<_> = (0..3)
        .map(|_| s.create_flow_run(&dep.id, &[], json!({}), json!({})))
        .collect();

    // Bursts shorter than the client's retry budget (5 retries), on every step of a submission,
    // in pipeline order (the proxy serves its rules one after another).
    proxy.fail_next(2, 503, Some("/admin/version"));
    proxy.fail_next(2, 503, Some("/work_pools/"));
    proxy.fail_next(3, 503, Some("get_scheduled_flow_runs"));
    proxy.fail_next(2, 503, Some("/deployments/"));
    proxy.fail_next(3, 503, Some("/set_state"));
    proxy.fail_next(2, 503, Some("/flows/"));
    proxy.fail_next(2, 429, Some("/labels"));
    let name = unique("Busy Worker");
    let mut worker = Worker::builder(
        WorkerKind::Cohort,
        &["--pool", &pool, "--name", &name, "--type", "process"],
    )
    .api_url(&format!("{}/api", proxy.url()))
    .spawn();

    // Sockets drop while the runs are being submitted and supervised.
    std::thread::sleep(Duration::from_secs(4));
    proxy.drop_websockets();
    for run in &runs {
        let state = s.wait_for_final_state(&run.id, RUN_TIMEOUT);
        assert_eq!(
            state["type"],
            "COMPLETED",
            "run {} ended {state}\nworker output:\n{}",
            run.id,
            worker.output()
        );
    }
    proxy.drop_websockets();

    const EVENTS: [&str; 2] = [
        "prefect.worker.submitted-flow-run",
        "prefect.worker.executed-flow-run",
    ];
    for run in &runs {
        for event in EVENTS {
            s.wait_for_events(events_of_run(&run.id, event), 1, EVENTS_TIMEOUT);
        }
    }
    // Give any duplicate time to be persisted (the persister flushes every ~5 s) before counting.
    std::thread::sleep(Duration::from_secs(7));
    for run in &runs {
        for event in EVENTS {
            let events = s.read_events(events_of_run(&run.id, event));
            assert_eq!(
                events.len(),
                1,
                "{event} of {}: {}\nworker output:\n{}",
                run.id,
                util::summarize_events(&events),
                worker.output()
            );
        }
    }
    let stats = proxy.stats();
    assert!(
        stats.failed >= 16,
        "every burst must have been served: {stats:?}"
    );
    assert!(
        stats.websockets >= 2,
        "the event socket reconnects: {stats:?}"
    );
    worker.sigterm();
    let status = worker.wait_timeout(Duration::from_secs(30));
    assert!(
        status.success(),
        "worker exit {status}\n{}",
        worker.output()
    );
}
