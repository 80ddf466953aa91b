//! What a worker keeps under `$PREFECT_HOME/cohort/` is keyed by work pool AND name, against a
//! real Prefect server: two workers of one name on two pools share a `PREFECT_HOME`; a second
//! process of the same pool and name is refused; and a worker takes over what a worker of the
//! same name left in the layout of earlier releases (files keyed by the name alone).

// End-to-end tests wait on real processes: wall-clock time and sleeps are the point here.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod util;

use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::Duration;

use serde_json::{json, Value};
use util::fault_proxy::FaultProxy;
use util::trials::{
    collect_events, flow_run_label, flow_run_of, orphans, orphans_after, tally, worker_events,
    EXECUTED, STARTED, STATUS_CODE_LABEL, STOPPED, SUBMITTED,
};
use util::{poll, server, slugify, unique, DeploySpec, Worker, WorkerKind};

/// Python start-up of each flow-run process is several seconds on a loaded 2-core machine.
const RUN_TIMEOUT: Duration = Duration::from_secs(240);
const EVENTS_TIMEOUT: Duration = Duration::from_secs(90);
/// After every expected event is stored, read again this much later to count late duplicates.
const EVENTS_SETTLE: Duration = Duration::from_secs(4);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

fn args<'a>(pool: &'a str, name: &'a str) -> Vec<&'a str> {
    vec!["--pool", pool, "--name", name, "--type", "process"]
}

/// The work pool (name) an event relates to.
fn pool_of(event: &Value) -> Option<String> {
    event["related"].as_array()?.iter().find_map(|r| {
        (r["prefect.resource.role"] == "work-pool")
            .then(|| r["prefect.resource.name"].as_str().map(str::to_owned))
            .flatten()
    })
}

/// The files (or directories) in `$home/cohort/<kind>/`, sorted.
fn state_entries(home: &Path, kind: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(home.join("cohort").join(kind))
        .map(|dir| {
            dir.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn stop(worker: &mut Worker) {
    worker.sigterm();
    let status = worker.wait_timeout(STOP_TIMEOUT);
    assert_eq!(status.code(), Some(0), "{}", worker.output());
}

/// Two workers with one name on two pools, one `PREFECT_HOME` (as when workers are named after
/// their host): both start, each runs its pool's flow to Completed, and each pool's worker
/// events are stored once, related to that pool.
#[test]
fn one_name_on_two_pools_shares_a_prefect_home() {
    let s = server();
    let name = unique("Host Worker");
    let home = tempfile::tempdir().unwrap();
    let pools = [unique("state-a"), unique("state-b")];
    let mut workers = Vec::new();
    let mut runs = Vec::new();
    for pool in &pools {
        s.create_work_pool(pool, "process");
        let dep = s.deploy(&DeploySpec::new(pool, "hello"));
        runs.push(s.create_flow_run(&dep.id, &[], json!({}), json!({})).id);
        workers.push(
            Worker::builder(WorkerKind::Cohort, &args(pool, &name))
                .home(home.path())
                .spawn(),
        );
    }
    let finals: Vec<Value> = runs
        .iter()
        .map(|id| s.wait_for_final_state(id, RUN_TIMEOUT))
        .collect();
    let alive: Vec<bool> = workers.iter_mut().map(|w| w.try_wait().is_none()).collect();
    let journals = state_entries(home.path(), "journal");
    let outboxes = state_entries(home.path(), "outbox");
    for w in &mut workers {
        stop(w);
    }
    let context = workers
        .iter()
        .map(Worker::output)
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(alive, [true, true], "{context}");
    for state in &finals {
        assert_eq!(state["type"], "COMPLETED", "{state}\n{context}");
    }
    assert_eq!(journals.len(), 2, "one journal per pool: {journals:?}");
    assert_eq!(outboxes.len(), 2, "one outbox per pool: {outboxes:?}");

    // Both workers share one worker resource (Prefect's is `prefect.worker.process.<slug>`):
    // each event tells its pool by its related work pool.
    for (pool, run) in pools.iter().zip(&runs) {
        let expected = [
            (STARTED, None),
            (STOPPED, None),
            (SUBMITTED, Some(run.as_str())),
            (EXECUTED, Some(run.as_str())),
        ];
        let t = pool_events(&name, pool, &expected);
        assert!(
            t.missing.is_empty()
                && t.duplicate_ids == 0
                && t.duplicate_pairs == 0
                && t.unexpected.is_empty(),
            "pool {pool}: {t:?}\n{context}"
        );
        let executed = &t.of(EXECUTED, Some(run))[0];
        assert_eq!(executed["follows"], t.of(SUBMITTED, Some(run))[0]["id"]);
        assert_eq!(
            flow_run_label(executed, STATUS_CODE_LABEL).as_deref(),
            Some("0")
        );
    }
    let all = worker_events(s, &name);
    assert!(
        all.iter().all(|e| pool_of(e).is_some()),
        "every event relates to its pool: {all:?}"
    );
}

/// The events of worker `name` related to work pool `pool`, tallied against `expected`: read
/// until none is missing (or the timeout), then again after a while.
fn pool_events(
    name: &str,
    pool: &str,
    expected: &[(&str, Option<&str>)],
) -> util::trials::EventTally {
    let read = || {
        let events: Vec<Value> = worker_events(server(), name)
            .into_iter()
            .filter(|e| pool_of(e).as_deref() == Some(pool))
            .collect();
        tally(&events, expected)
    };
    let deadline = std::time::Instant::now() + EVENTS_TIMEOUT;
    while !read().missing.is_empty() && std::time::Instant::now() < deadline {
        sleep(Duration::from_millis(500));
    }
    sleep(EVENTS_SETTLE);
    read()
}

/// A second process with the same pool, name and `PREFECT_HOME` is refused at once (exit 1)
/// with a message naming the pool and the worker and what to do; the first keeps serving.
#[test]
fn a_second_worker_of_the_same_pool_and_name_is_refused() {
    let s = server();
    let pool = unique("state-dup");
    let name = unique("Dup Worker");
    s.create_work_pool(&pool, "process");
    let dep = s.deploy(&DeploySpec::new(&pool, "hello"));
    let home = tempfile::tempdir().unwrap();
    let mut first = Worker::builder(WorkerKind::Cohort, &args(&pool, &name))
        .home(home.path())
        .spawn();
    poll(
        "the first worker to hold its state",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || (state_entries(home.path(), "journal").len() == 1).then_some(()),
    );
    let mut second = Worker::builder(WorkerKind::Cohort, &args(&pool, &name))
        .home(home.path())
        .spawn();
    let status = second.wait_timeout(Duration::from_secs(30));
    let refused = second.stderr();
    assert_eq!(status.code(), Some(1), "{refused}");
    assert!(
        refused.contains(&format!(
            "a worker named {name:?} for work pool {pool:?} is already running"
        )) && refused.contains("another --name"),
        "{refused}"
    );
    // Refused before it did anything a worker does: no second `started` event.
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({})).id;
    let state = s.wait_for_final_state(&run, RUN_TIMEOUT);
    assert!(first.try_wait().is_none(), "{}", first.output());
    stop(&mut first);
    assert_eq!(state["type"], "COMPLETED", "{state}\n{}", first.output());
    let t = collect_events(
        s,
        &name,
        &[
            (STARTED, None),
            (STOPPED, None),
            (SUBMITTED, Some(&run)),
            (EXECUTED, Some(&run)),
        ],
        EVENTS_TIMEOUT,
        EVENTS_SETTLE,
    );
    assert!(
        t.missing.is_empty() && t.duplicate_pairs == 0 && t.unexpected.is_empty(),
        "{t:?}\n{}",
        first.output()
    );
}

/// Upgrade: a worker finds the state an earlier release's worker of the same name left (files
/// keyed by the name alone): a claim of a run whose flow ended while no worker was up, and an
/// `executed-flow-run` event that never reached the server. It sends the event, reports the
/// run (final state, `executed-flow-run` with the recorded exit code, following the original
/// `submitted-flow-run`), and the old files are gone. A worker of the same name on another pool,
/// which looked first, sent the old events and left the claim alone.
///
/// The old state is made for real, by this release's worker, then renamed to the earlier
/// release's names: the file formats (redb journal and outbox, shim status JSON) did not
/// change, only their names. The first worker talks to the server through the fault proxy,
/// which goes down (as a server does) so the event stays in its outbox; the flows talk to the
/// server directly.
#[test]
fn a_worker_takes_over_the_state_of_an_earlier_release() {
    let s = server();
    let upstream = s.api_url().trim_end_matches("/api").to_owned();
    let proxy = FaultProxy::start(&upstream);
    let pool = unique("state-upgrade");
    let name = unique("Upgraded Worker");
    s.create_work_pool(&pool, "process");
    let direct = json!({"env": {"PREFECT_API_URL": s.api_url()}});
    // `quick` ends while the first worker still runs (its event stays in the outbox);
    // `slow` outlives the first worker and ends while no worker is up (its claim stays in the
    // journal, its exit code in its shim's status file).
    let quick = s.deploy(&DeploySpec::new(&pool, "hello").job_variables(direct.clone()));
    let slow = s.deploy(
        &DeploySpec::new(&pool, "sleepy")
            .job_variables(direct)
            .parameters(json!({"seconds": 20})),
    );
    let quick_run = s.create_flow_run(&quick.id, &[], json!({}), json!({})).id;
    let slow_run = s.create_flow_run(&slow.id, &[], json!({}), json!({})).id;
    let runs = vec![quick_run.clone(), slow_run.clone()];

    let home = tempfile::tempdir().unwrap();
    let mut first = Worker::builder(WorkerKind::Cohort, &args(&pool, &name))
        .api_url(&format!("{}/api", proxy.url()))
        .home(home.path())
        .spawn();
    // Both launched and their submitted events stored, before the server "goes away".
    poll(
        "both runs launched",
        RUN_TIMEOUT,
        Duration::from_millis(200),
        || {
            runs.iter()
                .all(|id| !s.read_flow_run(id)["infrastructure_pid"].is_null())
                .then_some(())
        },
    );
    poll(
        "both submitted events stored",
        EVENTS_TIMEOUT,
        Duration::from_millis(500),
        || {
            let events = worker_events(s, &name);
            runs.iter()
                .all(|id| {
                    events.iter().any(|e| {
                        e["event"] == SUBMITTED && flow_run_of(e).as_deref() == Some(id.as_str())
                    })
                })
                .then_some(())
        },
    );
    proxy.set_down(true);
    // The supervisor removes a run's shim status file once it has its exit code, and then,
    // with no request in between (the engine reported its outcome over the control channel),
    // commits `executed-flow-run` to the outbox: a moment later the event is there. (Were it
    // not, the run would be missing its executed event below: this cannot pass by accident.)
    let runs_dir = home.path().join("cohort").join("runs");
    poll(
        "the quick run's process to be reported",
        RUN_TIMEOUT,
        Duration::from_millis(100),
        || {
            let key = state_entries(home.path(), "runs").pop()?;
            (!runs_dir
                .join(key)
                .join(format!("{quick_run}.json"))
                .exists())
            .then_some(())
        },
    );
    sleep(Duration::from_secs(2));
    let slow_alive_at_kill = !orphans(std::slice::from_ref(&slow_run)).is_empty();
    first.sigkill();
    let first_output = first.output();
    drop(proxy);
    assert!(
        slow_alive_at_kill,
        "the slow run ended too soon\n{first_output}"
    );
    poll(
        "the slow run to end while no worker is up",
        Duration::from_secs(120),
        Duration::from_millis(200),
        || {
            orphans(std::slice::from_ref(&slow_run))
                .is_empty()
                .then_some(())
        },
    );

    // Rename this release's files to the earlier release's names.
    let legacy = format!("worker-{}", slugify(&name));
    let cohort = home.path().join("cohort");
    let mut legacy_paths: Vec<PathBuf> = Vec::new();
    for (kind, ext) in [("journal", ".redb"), ("outbox", ".redb"), ("runs", "")] {
        let entries = state_entries(home.path(), kind);
        assert_eq!(entries.len(), 1, "{kind}: {entries:?}");
        let to = cohort.join(kind).join(format!("{legacy}{ext}"));
        std::fs::rename(cohort.join(kind).join(&entries[0]), &to).unwrap();
        legacy_paths.push(to);
    }
    let status_file = cohort
        .join("runs")
        .join(&legacy)
        .join(format!("{slow_run}.json"));
    assert!(status_file.exists(), "the slow run's shim status file");

    // First a worker of the same name on another pool: it sends the old outbox's events
    // (they belong to no pool in particular) and leaves the claim, which is not its pool's.
    let other_pool = unique("state-other");
    s.create_work_pool(&other_pool, "process");
    let mut other = Worker::builder(WorkerKind::Cohort, &args(&other_pool, &name))
        .home(home.path())
        .spawn();
    let other_took = poll(
        "the other pool's worker to look at the old journal",
        EVENTS_TIMEOUT,
        Duration::from_millis(200),
        || {
            let log = other.stderr();
            log.lines()
                .find(|l| l.contains("took over the claims"))
                .map(str::to_owned)
        },
    );
    let old_journal_kept = legacy_paths[0].exists();
    let old_outbox_kept = legacy_paths[1].exists();

    // Then the worker of the run's pool, alongside it: it takes over the claim.
    let mut second = Worker::builder(WorkerKind::Cohort, &args(&pool, &name))
        .home(home.path())
        .spawn();
    let finals: Vec<Value> = runs
        .iter()
        .map(|id| s.wait_for_final_state(id, RUN_TIMEOUT))
        .collect();
    // Both runs ended before it started: wait for its report of the taken-over run and for
    // its `started` before stopping it.
    let expected = [
        (STARTED, None),
        (STOPPED, None),
        (SUBMITTED, Some(quick_run.as_str())),
        (EXECUTED, Some(quick_run.as_str())),
        (SUBMITTED, Some(slow_run.as_str())),
        (EXECUTED, Some(slow_run.as_str())),
    ];
    poll(
        "the second worker's start and report",
        EVENTS_TIMEOUT,
        Duration::from_millis(500),
        || {
            let events = worker_events(s, &name);
            let of_pool = |e: &&Value| pool_of(e).as_deref() == Some(pool.as_str());
            let starts = events
                .iter()
                .filter(of_pool)
                .filter(|e| e["event"] == STARTED)
                .count();
            let t = tally(&events, &expected[2..]);
            (starts == 2 && t.missing.is_empty()).then_some(())
        },
    );
    stop(&mut second);
    stop(&mut other);
    let mut events = pool_events(&name, &pool, &expected);
    // One `started` per worker process (the killed one sent no `stopped`).
    let starts = events.of(STARTED, None).len();
    if starts == 2 {
        events.duplicate_pairs -= 1;
    }
    let other_events = pool_events(&name, &other_pool, &expected[..2]);
    let left: Vec<&PathBuf> = legacy_paths.iter().filter(|p| p.exists()).collect();
    let context = format!(
        "first worker:\n{first_output}\nother pool's worker:\n{}\nsecond worker:\n{}",
        other.output(),
        second.output()
    );

    for state in &finals {
        assert_eq!(state["type"], "COMPLETED", "{state}\n{context}");
    }
    assert!(
        other_took.contains("taken=0") && other_took.contains("left=1"),
        "{context}"
    );
    assert!(
        old_journal_kept && !old_outbox_kept,
        "the other pool's worker keeps the old journal (journal kept: {old_journal_kept}) and \
         takes the old outbox (outbox kept: {old_outbox_kept})\n{context}"
    );
    assert_eq!(starts, 2, "{context}");
    assert!(
        events.missing.is_empty()
            && events.duplicate_ids == 0
            && events.duplicate_pairs == 0
            && events.unexpected.is_empty(),
        "{events:?}\n{context}"
    );
    assert!(
        other_events.missing.is_empty()
            && other_events.duplicate_pairs == 0
            && other_events.unexpected.is_empty(),
        "the other pool's worker reports no run: {other_events:?}\n{context}"
    );
    for run in &runs {
        let executed = &events.of(EXECUTED, Some(run))[0];
        assert_eq!(
            executed["follows"],
            events.of(SUBMITTED, Some(run))[0]["id"],
            "{context}"
        );
        assert_eq!(
            flow_run_label(executed, STATUS_CODE_LABEL).as_deref(),
            Some("0"),
            "{context}"
        );
    }
    let took = second
        .stderr()
        .lines()
        .find(|l| l.contains("took over the claims"))
        .map(str::to_owned)
        .unwrap_or_default();
    assert!(
        took.contains("taken=1") && took.contains("left=0"),
        "{context}"
    );
    assert!(left.is_empty(), "old files left: {left:?}\n{context}");
    assert_eq!(state_entries(home.path(), "journal").len(), 2);
    assert!(orphans_after(&runs, Duration::from_secs(10)).is_empty());
}
