//! The fault trials (`docs/reliability.md`): Cohort against a real Prefect server while things
//! break, each trial printing its [`Figures`] — runs and their final states, worker events
//! expected and stored, duplicates, orphaned processes — and asserting on them.
//!
//! Real faults wherever they can be produced: the real server is stopped and started again
//! (trial 1, with flows in processes and, on a Docker pool, in containers), the worker is SIGKILLed and restarted (trial 2), a real flow process is
//! SIGKILLed (trial 5), the worker's disk is unwritable or full (trial 6, the latter by a
//! file-size limit set with `prlimit`). The in-process fault proxy (`util::fault_proxy`) is
//! used only for what a real server cannot be made to do on demand: bursts of 503/429 answers
//! and websockets dropped mid-stream (trial 4), and a call kept failing long enough to kill
//! the worker between its claim and the launch (trial 3).
//!
//! Trials stop the binary's own server and read every event of a worker, so they run one at a
//! time ([`serial`]); `scripts/fault-trials.sh` runs this binary alone. With
//! `COHORT_SOAK_SECONDS=N` the soak test repeats the trials with random fault timing for `N`
//! seconds; without it, it runs two of them, drawn at random (`COHORT_SOAK_SEED` replays a
//! draw).

// End-to-end tests wait on real processes: wall-clock time and sleeps are the point here.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod util;

use std::collections::BTreeMap;
use std::thread::sleep;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;
use util::fault_proxy::FaultProxy;
use util::trials::{
    collect_events, flow_run_label, orphans, orphans_after, serial, state_counts, tally,
    worker_events, Figures, Rng, EXECUTED, STARTED, STATUS_CODE_LABEL, STOPPED, SUBMITTED,
};
use util::{poll, server, unique, DeploySpec, PrefectServer, Worker, WorkerKind};

const EVENTS_TIMEOUT: Duration = Duration::from_secs(90);
/// A run from scheduled to final, with Python's start-up on a busy machine.
const RUN_TIMEOUT: Duration = Duration::from_secs(180);
/// After every expected event is stored, wait this long and read again, so a late duplicate is
/// counted too (the server persists events every second here).
const EVENTS_SETTLE: Duration = Duration::from_secs(4);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
const ORPHAN_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// The trials
// ---------------------------------------------------------------------------------------

/// Trial 1: the server is stopped for 30 s while flows run, then started again (same port,
/// same database). Every run completes, and every worker event is stored exactly once.
#[test]
fn trial_1_server_stopped_for_30_s_while_runs_execute() {
    server_outage(
        "trial 1",
        &Outage {
            runs: 3,
            before: Duration::from_secs(2),
            down: Duration::from_secs(30),
            infra: Infra::Process,
        },
    );
}

/// Trial 1 on a Docker pool: the flows run in containers on the real Engine (their engines
/// ride the outage inside them), the short runs are busybox containers whose exit falls in
/// the outage. Every run completes, every worker event is stored exactly once, and no
/// container is left behind.
#[test]
fn trial_1_docker_server_stopped_for_30_s_while_containers_run() {
    server_outage(
        "trial 1 (docker)",
        &Outage {
            runs: 2,
            before: Duration::from_secs(2),
            down: Duration::from_secs(30),
            infra: Infra::Docker,
        },
    );
}

/// Trial 4: 503 (and 429) bursts on every REST call of the worker's pipeline, random 503s, and
/// event websockets dropped, all during a 100-run burst. No run harmed, no event lost or
/// duplicated.
#[test]
fn trial_4_busy_server_and_dropped_websockets_during_a_100_run_burst() {
    burst_under_faults(
        "trial 4",
        &Burst {
            noop_runs: 100,
            hello_runs: 2,
            random_503: 0.05,
            bursts: vec![
                (Duration::from_secs(1), 6, 503),
                (Duration::from_secs(4), 4, 429),
                (Duration::from_secs(8), 6, 503),
            ],
            drops: vec![
                Duration::from_millis(1500),
                Duration::from_secs(5),
                Duration::from_secs(10),
            ],
        },
    );
}

/// Trial 5: the flow process is SIGKILLed, as by the OOM killer. The run is Crashed with the
/// status code `-9` and Prefect's SIGKILL explanation, and the worker serves the next run.
#[test]
fn trial_5_flow_process_sigkilled_is_crashed_with_status_minus_9() {
    flow_process_killed(
        "trial 5",
        &Kill {
            after_running: Duration::from_secs(2),
        },
    );
}

/// The trials again with random fault timing: without `$COHORT_SOAK_SECONDS`, two of trials
/// 1–5 drawn at random (each is also run above with fixed timing; the draw keeps the test
/// command short, and over its runs every trial is drawn), or rounds of all five until
/// `$COHORT_SOAK_SECONDS` have passed. Prints the seed; `COHORT_SOAK_SEED` replays.
#[test]
fn soak_trials_with_random_fault_timing() {
    let budget =
        match std::env::var("COHORT_SOAK_SECONDS") {
            Ok(s) if !s.is_empty() => Some(Duration::from_secs(s.parse().unwrap_or_else(|e| {
                panic!("COHORT_SOAK_SECONDS={s}: not a number of seconds: {e}")
            }))),
            _ => None,
        };
    let (mut rng, seed) = Rng::from_env_or_random();
    eprintln!(
        "[soak] seed {seed} (COHORT_SOAK_SEED={seed} replays it), {}",
        budget.map_or("one round".to_owned(), |b| format!("for {b:?}"))
    );
    // The one round CI runs stays short (smaller bursts, shorter outages); a soak draws from
    // the full ranges.
    let full = budget.is_some();
    let started = Instant::now();
    let mut round = 0;
    loop {
        round += 1;
        let mut order = [1, 2, 3, 4, 5];
        // Fisher–Yates.
        for i in (1..order.len()).rev() {
            let j = usize::try_from(rng.range(0, i as u64)).expect("small");
            order.swap(i, j);
        }
        let drawn = if full { &order[..] } else { &order[..2] };
        for &trial in drawn {
            let label = format!("soak {round} trial {trial}");
            match trial {
                1 => {
                    let outage = Outage {
                        runs: usize::try_from(rng.range(1, if full { 4 } else { 2 }))
                            .expect("small"),
                        before: rng.duration(Duration::ZERO, Duration::from_secs(8)),
                        down: rng.duration(
                            Duration::from_secs(3),
                            Duration::from_secs(if full { 30 } else { 10 }),
                        ),
                        infra: Infra::Process,
                    };
                    server_outage(&label, &outage);
                }
                4 => {
                    let noop_runs = usize::try_from(if full {
                        rng.range(20, 100)
                    } else {
                        rng.range(10, 30)
                    })
                    .expect("small");
                    let bursts = (0..rng.range(1, 4))
                        .map(|_| {
                            let status = if rng.range(0, 3) == 0 { 429 } else { 503 };
                            let n = usize::try_from(rng.range(1, 5)).expect("small");
                            (
                                rng.duration(Duration::ZERO, Duration::from_secs(12)),
                                n,
                                status,
                            )
                        })
                        .collect();
                    let drops = (0..rng.range(1, 4))
                        .map(|_| rng.duration(Duration::ZERO, Duration::from_secs(15)))
                        .collect();
                    #[allow(clippy::cast_precision_loss)]
                    let random_503 = rng.range(0, 10) as f64 / 100.0;
                    burst_under_faults(
                        &label,
                        &Burst {
                            noop_runs,
                            hello_runs: usize::try_from(rng.range(1, 2)).expect("small"),
                            random_503,
                            bursts,
                            drops,
                        },
                    );
                }
                2 => {
                    worker_killed(&label, rng.duration(Duration::ZERO, Duration::from_secs(6)));
                }
                3 => {
                    killed_before_launch(
                        &label,
                        rng.duration(Duration::from_millis(100), Duration::from_secs(3)),
                    );
                }
                5 => {
                    let kill = Kill {
                        after_running: rng.duration(Duration::ZERO, Duration::from_secs(10)),
                    };
                    flow_process_killed(&label, &kill);
                }
                _ => unreachable!(),
            }
        }
        match budget {
            Some(b) if started.elapsed() < b => continue,
            _ => break,
        }
    }
    eprintln!(
        "[soak] {round} round(s) in {:.0} s, seed {seed}",
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------
// Trial 1: the server goes away
// ---------------------------------------------------------------------------------------

/// Where the trial's runs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Infra {
    Process,
    /// Containers on the machine's Docker Engine, from the locally built test images.
    Docker,
}

struct Outage {
    /// Runs of `sleepy` in flight during the outage.
    runs: usize,
    infra: Infra,
    /// How long after the short runs were submitted the server is stopped.
    before: Duration,
    /// How long the server stays down once its process has exited.
    down: Duration,
}

/// What a stopped server costs besides `down`: submitting the short runs, the graceful stop,
/// the start-up, and the engine's final API calls once it is back. Flows sleep this much
/// longer than the outage, so they end after the server is up again (checked, not assumed).
const RESTART_ALLOWANCE: Duration = Duration::from_secs(40);

/// Short runs per outage: `command` is `sleep` (no engine, so no API calls of their own),
/// timed to exit in the middle of the outage, so their `executed-flow-run` is emitted while
/// the server is down and must reach it once it is back.
const SHORT_RUNS: usize = 2;

fn server_outage(label: &str, o: &Outage) -> Figures {
    let _serial = serial();
    let s = up_server();
    let started = Instant::now();
    let mut fig = Figures::new(label);
    let pool = unique("trial-outage");
    let (pool_type, flow_vars, short_vars) = match o.infra {
        Infra::Process => ("process", json!({}), json!({})),
        Infra::Docker => {
            let (prefect_image, busybox) = util::docker::images();
            (
                "docker",
                json!({"image": prefect_image, "volumes": [util::docker::flow_mount()]}),
                json!({"image": busybox}),
            )
        }
    };
    s.create_work_pool(&pool, pool_type);
    let sleep_s = (o.before + o.down + RESTART_ALLOWANCE).as_secs();
    let dep = s.deploy(
        &DeploySpec::new(&pool, "sleepy")
            .parameters(json!({"seconds": sleep_s}))
            .job_variables(flow_vars),
    );
    let short = s.deploy(
        &DeploySpec::new(&pool, "hello")
            .tags(&["short"])
            .job_variables(short_vars),
    );
    let flow_ids: Vec<String> = (0..o.runs)
        .map(|_| s.create_flow_run(&dep.id, &[], json!({}), json!({})).id)
        .collect();
    let name = unique("Trial Outage");
    let mut worker = Worker::cohort(&["--pool", &pool, "--type", pool_type, "--name", &name]);

    // Every flow is running (its engine has talked to the server) before the server goes.
    let first_running = wait_all_running(s, &mut worker, &flow_ids, Duration::from_secs(180));
    // ~2 s for the graceful stop.
    let short_s = (o.before + Duration::from_secs(2) + o.down / 2).as_secs_f64();
    let short_ids: Vec<String> = (0..SHORT_RUNS)
        .map(|_| {
            let command = format!("sleep {short_s:.1}");
            s.create_flow_run(&short.id, &[], json!({"command": command}), json!({}))
                .id
        })
        .collect();
    let submitted: Vec<(&str, Option<&str>)> = short_ids
        .iter()
        .map(|id| (SUBMITTED, Some(id.as_str())))
        .collect();
    poll_worker(
        &mut worker,
        "the short runs to be submitted",
        Duration::from_secs(60),
        || {
            let t = tally(&worker_events(s, &name), &submitted);
            t.missing.is_empty().then_some(())
        },
    );
    sleep(o.before);
    let down_since = chrono::Utc::now();
    let outage_started = Instant::now();
    let stop_took = s.stop(Duration::from_secs(60));
    sleep(o.down);
    let start_took = s.start();
    let up_again = chrono::Utc::now();
    let outage = outage_started.elapsed();
    let flows_end = first_running + Duration::from_secs(sleep_s);
    assert!(
        Instant::now() < flows_end,
        "{label}: the server came back {:.1} s after the first flow's sleep ended (stop {stop_took:?}, \
         start {start_took:?}): raise RESTART_ALLOWANCE, the trial did not test what it means to",
        (Instant::now() - flows_end).as_secs_f64()
    );

    for id in &flow_ids {
        wait_final(s, &mut worker, id, Duration::from_secs(sleep_s + 180));
    }
    stop_worker(&mut worker);
    let ids: Vec<String> = flow_ids.iter().chain(&short_ids).cloned().collect();
    let expected = expected_events(&ids);
    fig.runs = ids.len();
    fig.events = collect_events(s, &name, &expected, EVENTS_TIMEOUT, EVENTS_SETTLE);
    fig.states = state_counts(s, &ids);
    // Processes in containers are the host's too: the same check finds a container's engine.
    fig.orphans = orphans_after(&ids, ORPHAN_TIMEOUT);
    if o.infra == Infra::Docker {
        let left: Vec<String> = ids
            .iter()
            .flat_map(|id| util::docker::containers_of(id))
            .collect();
        fig.note("containers left", left.len());
        for c in &left {
            let _ = util::docker::docker(&["rm", "-f", c]);
        }
        assert!(left.is_empty(), "{label}: containers left behind: {left:?}");
    }
    // Worker events that happened while the server was down: they waited in the outbox.
    let while_down = fig
        .events
        .by_pair
        .values()
        .flatten()
        .filter(|e| {
            e["occurred"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .is_some_and(|t| t >= down_since && t <= up_again)
        })
        .count();
    fig.note("outage", format!("{:.1} s", outage.as_secs_f64()));
    fig.note("server stop", format!("{:.1} s", stop_took.as_secs_f64()));
    fig.note("server start", format!("{:.1} s", start_took.as_secs_f64()));
    fig.note("events emitted while down", while_down);
    fig.wall = started.elapsed();
    fig.print();
    let context = context(s, &worker);
    fig.assert_clean(&context);
    let flow_states = state_counts(s, &flow_ids);
    assert_eq!(
        flow_states.get("COMPLETED").copied().unwrap_or(0),
        flow_ids.len(),
        "{fig}\nevery flow completes across the outage: {flow_states:?}\n{context}"
    );
    assert_exit_codes_zero(&fig, &short_ids, &context);
    if o.down >= Duration::from_secs(20) {
        assert!(
            while_down >= 1,
            "{fig}\nthe short runs' executed-flow-run should have happened during the outage\n{context}"
        );
    }
    fig
}

/// Every one of `run_ids` has an `executed-flow-run` with status code 0.
fn assert_exit_codes_zero(fig: &Figures, run_ids: &[String], context: &str) {
    let bad: Vec<String> = run_ids
        .iter()
        .filter_map(|id| {
            let code = fig
                .events
                .of(EXECUTED, Some(id))
                .first()
                .and_then(|e| flow_run_label(e, STATUS_CODE_LABEL));
            (code.as_deref() != Some("0")).then(|| format!("{id}: {code:?}"))
        })
        .collect();
    assert!(
        bad.is_empty(),
        "{fig}\nruns whose executed-flow-run status code is not 0: {bad:?}\n{context}"
    );
}

// ---------------------------------------------------------------------------------------
// Trial 4: a busy server and dropped websockets during a burst
// ---------------------------------------------------------------------------------------

struct Burst {
    /// Runs whose `command` is `true`: the worker's whole pipeline, no Python.
    noop_runs: usize,
    /// Real `hello` flows among them.
    hello_runs: usize,
    /// Probability that any REST call of the worker is answered 503 during the burst.
    random_503: f64,
    /// (offset from the burst's start, n, status): the next `n` calls answered `status`.
    bursts: Vec<(Duration, usize, u16)>,
    /// Offsets from the burst's start at which every event websocket is dropped.
    drops: Vec<Duration>,
}

fn burst_under_faults(label: &str, b: &Burst) -> Figures {
    let _serial = serial();
    let s = up_server();
    let started = Instant::now();
    let mut fig = Figures::new(label);
    let upstream = s.api_url().trim_end_matches("/api").to_owned();
    let proxy = FaultProxy::start(&upstream);
    let pool = unique("trial-burst");
    s.create_work_pool(&pool, "process");
    let noop = s.deploy(
        &DeploySpec::new(&pool, "hello")
            .tags(&["noop"])
            .job_variables(json!({"command": "true"})),
    );
    // The flow processes talk to the server directly: the faults here are the worker's.
    let hello = s.deploy(
        &DeploySpec::new(&pool, "hello")
            .job_variables(json!({"env": {"PREFECT_API_URL": s.api_url()}})),
    );

    // Bursts shorter than the client's retry budget (5 retries) on every step of start-up
    // and of a submission; the proxy serves each rule to the first request it matches.
    proxy.fail_next(2, 503, Some("/admin/version"));
    proxy.fail_next(2, 503, Some("/work_pools/"));
    proxy.fail_next(3, 503, Some("get_scheduled_flow_runs"));
    proxy.fail_next(2, 503, Some("/deployments/"));
    proxy.fail_next(3, 503, Some("/set_state"));
    proxy.fail_next(2, 503, Some("/flows/"));
    proxy.fail_next(2, 429, Some("/labels"));
    let startup_failures = 16;
    let name = unique("Trial Burst");
    let mut worker = Worker::builder(
        WorkerKind::Cohort,
        &["--pool", &pool, "--type", "process", "--name", &name],
    )
    .api_url(&format!("{}/api", proxy.url()))
    .spawn();
    // The burst starts once the worker is up (its `started` event is stored).
    poll_worker(
        &mut worker,
        "the worker's started event",
        Duration::from_secs(60),
        || {
            let events = worker_events(s, &name);
            events.iter().any(|e| e["event"] == STARTED).then_some(())
        },
    );

    proxy.fail_randomly(b.random_503, 503);
    let burst_started = Instant::now();
    let mut schedule: Vec<(Duration, Fault)> = b
        .bursts
        .iter()
        .map(|&(at, n, status)| (at, Fault::Burst(n, status)))
        .chain(b.drops.iter().map(|&at| (at, Fault::DropWebsockets)))
        .collect();
    schedule.sort_by_key(|(at, _)| *at);
    let mut schedule = schedule.into_iter().peekable();
    let mut fire_due = |proxy: &FaultProxy| {
        while let Some((_, fault)) = schedule.next_if(|(at, _)| burst_started.elapsed() >= *at) {
            match fault {
                Fault::Burst(n, status) => proxy.fail_next(n, status, None),
                Fault::DropWebsockets => proxy.drop_websockets(),
            }
        }
    };
    // Real flows spread through the burst.
    let every = (b.noop_runs / b.hello_runs.max(1)).max(1);
    let mut noop_ids = Vec::new();
    let mut hello_ids = Vec::new();
    for i in 0..b.noop_runs {
        if i % every == every / 2 && hello_ids.len() < b.hello_runs {
            hello_ids.push(s.create_flow_run(&hello.id, &[], json!({}), json!({})).id);
        }
        noop_ids.push(s.create_flow_run(&noop.id, &[], json!({}), json!({})).id);
        fire_due(&proxy);
    }
    while hello_ids.len() < b.hello_runs {
        hello_ids.push(s.create_flow_run(&hello.id, &[], json!({}), json!({})).id);
    }
    let ids: Vec<String> = noop_ids.iter().chain(&hello_ids).cloned().collect();
    let submitted_all = format!("{:.1} s", burst_started.elapsed().as_secs_f64());

    // Until every run was executed: remaining faults fire on time meanwhile.
    let executed: Vec<(&str, Option<&str>)> =
        ids.iter().map(|id| (EXECUTED, Some(id.as_str()))).collect();
    poll_worker(
        &mut worker,
        "an executed-flow-run event for every run",
        Duration::from_secs(300),
        || {
            fire_due(&proxy);
            let t = tally(&worker_events(s, &name), &executed);
            t.missing.is_empty().then_some(())
        },
    );
    // Whatever was not yet due fires now, then the faults stop.
    for (_, fault) in schedule.by_ref() {
        match fault {
            Fault::Burst(n, status) => proxy.fail_next(n, status, None),
            Fault::DropWebsockets => proxy.drop_websockets(),
        }
    }
    let burst_took = burst_started.elapsed();
    for id in &hello_ids {
        wait_final(s, &mut worker, id, Duration::from_secs(180));
    }
    proxy.fail_randomly(0.0, 503);
    // Bursts fired late are served by the worker's next polls and heartbeats.
    let min_failed = startup_failures
        + u64::try_from(b.bursts.iter().map(|(_, n, _)| n).sum::<usize>()).expect("small");
    let deadline = Instant::now() + Duration::from_secs(60);
    while proxy.stats().failed < min_failed && Instant::now() < deadline {
        sleep(Duration::from_millis(200));
    }
    stop_worker(&mut worker);

    let expected = expected_events(&ids);
    fig.runs = ids.len();
    fig.events = collect_events(s, &name, &expected, EVENTS_TIMEOUT, EVENTS_SETTLE);
    fig.states = state_counts(s, &ids);
    fig.orphans = orphans_after(&ids, ORPHAN_TIMEOUT);
    let stats = proxy.stats();
    fig.note("noop runs", b.noop_runs);
    fig.note("hello runs", b.hello_runs);
    fig.note("runs created in", submitted_all);
    fig.note(
        "all executed after",
        format!("{:.1} s", burst_took.as_secs_f64()),
    );
    fig.note("calls failed on purpose", stats.failed);
    fig.note("calls forwarded", stats.forwarded);
    fig.note("websocket drops", b.drops.len());
    fig.note("websockets opened", stats.websockets);
    fig.wall = started.elapsed();
    fig.print();
    let context = context(s, &worker);
    fig.assert_clean(&context);

    // No run harmed: every no-op run exited 0 (its process is all there is: no engine sets a
    // state, so it stays where the worker left it), every real flow completed.
    assert_exit_codes_zero(&fig, &noop_ids, &context);
    for harmed in ["CRASHED", "FAILED", "CANCELLED", "SCHEDULED", "LATE"] {
        assert_eq!(
            fig.in_state(harmed),
            0,
            "{fig}\nno run may end {harmed}\n{context}"
        );
    }
    let hello_states = state_counts(s, &hello_ids);
    assert_eq!(
        hello_states.get("COMPLETED").copied().unwrap_or(0),
        hello_ids.len(),
        "{fig}\nreal flows: {hello_states:?}\n{context}"
    );
    assert!(
        stats.failed >= min_failed,
        "{fig}\nevery burst must have been served ({min_failed} calls at least): {stats:?}"
    );
    assert!(
        stats.websockets > 1,
        "{fig}\nthe event socket reconnected after being dropped: {stats:?}"
    );
    fig
}

enum Fault {
    Burst(usize, u16),
    DropWebsockets,
}

// ---------------------------------------------------------------------------------------
// Trial 5: the flow process is SIGKILLed
// ---------------------------------------------------------------------------------------

struct Kill {
    /// How long after the run is Running its flow process is killed.
    after_running: Duration,
}

fn flow_process_killed(label: &str, k: &Kill) -> Figures {
    let _serial = serial();
    let s = up_server();
    let started = Instant::now();
    let mut fig = Figures::new(label);
    let pool = unique("trial-oom");
    s.create_work_pool(&pool, "process");
    let sleepy = s.deploy(&DeploySpec::new(&pool, "sleepy").parameters(json!({"seconds": 300})));
    let hello = s.deploy(&DeploySpec::new(&pool, "hello"));
    let victim = s.create_flow_run(&sleepy.id, &[], json!({}), json!({}));
    let name = unique("Trial OOM");
    let mut worker = Worker::cohort(&["--pool", &pool, "--type", "process", "--name", &name]);

    wait_all_running(
        s,
        &mut worker,
        std::slice::from_ref(&victim.id),
        Duration::from_secs(120),
    );
    sleep(k.after_running);
    // The flow's own process: the run's `infrastructure_pid`, which must be the process that
    // runs this flow run (not a supervisor between it and the worker).
    let pid = s.read_flow_run(&victim.id)["infrastructure_pid"]
        .as_str()
        .unwrap_or_else(|| panic!("{label}: no infrastructure_pid on the running flow run"))
        .to_owned();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    let marker = format!("PREFECT__FLOW_RUN_ID={}", victim.id);
    assert!(
        environ.split(|b| *b == 0).any(|v| v == marker.as_bytes()),
        "{label}: infrastructure_pid {pid} is not the flow process of {} (no {marker} in its \
         environment)\n{}",
        victim.id,
        worker.output()
    );
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .expect("run kill");
    assert!(killed.success(), "{label}: kill -KILL {pid} failed");

    let state = wait_final(s, &mut worker, &victim.id, Duration::from_secs(120));
    // The worker serves the next run.
    let next = s.create_flow_run(&hello.id, &[], json!({}), json!({}));
    let next_state = wait_final(s, &mut worker, &next.id, Duration::from_secs(120));
    stop_worker(&mut worker);

    let ids = vec![victim.id.clone(), next.id.clone()];
    let expected = expected_events(&ids);
    fig.runs = ids.len();
    fig.events = collect_events(s, &name, &expected, EVENTS_TIMEOUT, EVENTS_SETTLE);
    fig.states = state_counts(s, &ids);
    fig.orphans = orphans_after(&ids, ORPHAN_TIMEOUT);
    let code = fig
        .events
        .of(EXECUTED, Some(&victim.id))
        .first()
        .and_then(|e| flow_run_label(e, STATUS_CODE_LABEL));
    fig.note(
        "killed after running",
        format!("{:.1} s", k.after_running.as_secs_f64()),
    );
    fig.note("status code", code.as_deref().unwrap_or("none"));
    fig.wall = started.elapsed();
    fig.print();
    let context = context(s, &worker);
    fig.assert_clean(&context);

    assert_eq!(
        state["type"], "CRASHED",
        "{fig}\nkilled run: {state}\n{context}"
    );
    let message = state["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("status code: -9") && message.contains("SIGKILL"),
        "{fig}\nthe Crashed message names the status code -9 and SIGKILL: {message:?}\n{context}"
    );
    assert_eq!(
        code.as_deref(),
        Some("-9"),
        "{fig}\n{STATUS_CODE_LABEL} of the killed run's executed-flow-run\n{context}"
    );
    assert_eq!(
        next_state["type"], "COMPLETED",
        "{fig}\nthe next run: {next_state}\n{context}"
    );
    fig
}

// ---------------------------------------------------------------------------------------
// Trials 2, 3 and 6: a worker killed and restarted, and storage that cannot be written
// ---------------------------------------------------------------------------------------

/// How many times the run entered Running (`GET /flow_run_states/`): more than once means it
/// was executed twice.
fn times_running(run_id: &str) -> usize {
    let s = up_server();
    let states = s.request(
        reqwest::Method::GET,
        &format!("/flow_run_states/?flow_run_id={run_id}"),
        None,
    );
    states
        .as_array()
        .map_or(0, |a| a.iter().filter(|st| st["type"] == "RUNNING").count())
}

/// Trial 2: the worker is SIGKILLed while runs execute, and started again under the same name
/// and `PREFECT_HOME`. Runs still running are re-adopted and finish; runs that ended while no
/// worker was up are reported with the exit code their shim recorded (a flow that exits 3
/// without reporting is marked Crashed then). Each run has exactly one `submitted` and one
/// `executed` event, none ran twice, and no process is left behind.
#[test]
fn trial_2_worker_sigkilled_while_runs_execute_then_restarted() {
    worker_killed("trial 2", Duration::ZERO);
}

/// Trial 2's body: the worker is killed `kill_after` after every run has a flow process.
fn worker_killed(label: &str, kill_after: Duration) -> Figures {
    let _serial = serial();
    let started_at = Instant::now();
    let s = up_server();
    let pool = unique("trial2");
    s.create_work_pool(&pool, "process");
    let long = s.deploy(&DeploySpec::new(&pool, "sleepy").parameters(json!({"seconds": 25})));
    let short = s.deploy(&DeploySpec::new(&pool, "sleepy").parameters(json!({"seconds": 1})));
    let crash = s.deploy(&DeploySpec::new(&pool, "crash"));
    let mut runs = Vec::new();
    for (dep, n) in [(&long, 2), (&short, 1)] {
        for _ in 0..n {
            runs.push(s.create_flow_run(&dep.id, &[], json!({}), json!({})).id);
        }
    }
    let crash_run = s.create_flow_run(&crash.id, &[], json!({}), json!({})).id;
    runs.push(crash_run.clone());

    let home = tempfile::tempdir().unwrap();
    let name = unique("Trial2 Worker");
    let args = [
        "--pool",
        pool.as_str(),
        "--name",
        name.as_str(),
        "--type",
        "process",
    ];
    let mut first = Worker::builder(WorkerKind::Cohort, &args)
        .home(home.path())
        .spawn();
    // Kill it as soon as every run has a flow process: the short and crashing flows are
    // still starting Python then, and end while no worker is up.
    poll(
        "every run launched",
        RUN_TIMEOUT,
        Duration::from_millis(100),
        || {
            runs.iter()
                .all(|id| !s.read_flow_run(id)["infrastructure_pid"].is_null())
                .then_some(())
        },
    );
    sleep(kill_after);
    first.sigkill();
    let first_output = first.output();
    let alive_after_kill = orphans(&runs).len();
    // The short and crashing runs end while no worker is up.
    for id in [&runs[2], &crash_run] {
        poll(
            "the short runs to end while the worker is down",
            Duration::from_secs(60),
            Duration::from_millis(200),
            || orphans(std::slice::from_ref(id)).is_empty().then_some(()),
        );
    }

    let mut second = Worker::builder(WorkerKind::Cohort, &args)
        .home(home.path())
        .spawn();
    let finals: Vec<Value> = runs
        .iter()
        .map(|id| s.wait_for_final_state(id, RUN_TIMEOUT))
        .collect();
    second.sigterm();
    second.wait_timeout(Duration::from_secs(60));

    let mut figures = Figures::new(label);
    figures.runs = runs.len();
    let (events, starts) = events_across_a_restart(s, &name, &runs);
    figures.events = events;
    figures.states = state_counts(s, &runs);
    let twice: Vec<&String> = runs.iter().filter(|id| times_running(id) > 1).collect();
    figures.orphans = orphans_after(&runs, Duration::from_secs(10));
    figures.note("flow processes alive after the kill", alive_after_kill);
    figures.note("ran twice", twice.len());
    figures.note("worker starts", starts);
    figures.note(
        "killed after launch",
        format!("{:.1} s", kill_after.as_secs_f64()),
    );
    figures.wall = started_at.elapsed();
    figures.print();

    let context = format!(
        "first worker:\n{first_output}\nsecond worker:\n{}",
        second.output()
    );
    figures.assert_clean(&context);
    assert_eq!(starts, 2, "{context}");
    assert!(twice.is_empty(), "ran twice: {twice:?}\n{context}");
    assert!(
        alive_after_kill >= 2,
        "the flows died with their worker\n{context}"
    );
    for (id, state) in runs.iter().zip(&finals) {
        let executed = &figures.events.of(EXECUTED, Some(id))[0];
        let code = flow_run_label(executed, STATUS_CODE_LABEL);
        if *id == crash_run {
            assert_eq!(state["type"], "CRASHED", "{context}");
            assert_eq!(code.as_deref(), Some("3"), "{context}");
        } else {
            assert_eq!(state["type"], "COMPLETED", "run {id}: {state}\n{context}");
            assert_eq!(code.as_deref(), Some("0"), "{context}");
        }
        let submitted = &figures.events.of(SUBMITTED, Some(id))[0];
        assert_eq!(
            executed["follows"], submitted["id"],
            "executed must follow the original submitted event\n{context}"
        );
    }
    figures
}

/// Trial 3: the worker is killed after its claim (the run is Pending) and before the launch,
/// stuck retrying a busy server (the fault proxy answers 503 to the labels call, a real step
/// between the two). Restarted, it finds the claim in its journal and the run still Pending,
/// and finishes the submission: the run is launched once, with the one `submitted` event the
/// first worker journaled (re-sent under the same id, which the server keeps once).
#[test]
fn trial_3_worker_killed_between_pending_and_launch() {
    killed_before_launch("trial 3", Duration::from_secs(2));
}

/// Trial 3's body: the worker is killed `kill_after` after the run turned Pending (while it
/// retries the failing labels call, which lasts longer than that).
fn killed_before_launch(label: &str, kill_after: Duration) -> Figures {
    let _serial = serial();
    let started_at = Instant::now();
    let s = up_server();
    let upstream = s.api_url().trim_end_matches("/api").to_owned();
    let proxy = util::fault_proxy::FaultProxy::start(&upstream);
    let pool = unique("trial3");
    s.create_work_pool(&pool, "process");
    // Flows talk to the server directly: the fault is the worker's.
    let dep = s.deploy(
        &DeploySpec::new(&pool, "hello")
            .job_variables(json!({"env": {"PREFECT_API_URL": s.api_url()}})),
    );
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({})).id;
    proxy.fail_next(1000, 503, Some("/labels"));

    let home = tempfile::tempdir().unwrap();
    let name = unique("Trial3 Worker");
    let args = [
        "--pool",
        pool.as_str(),
        "--name",
        name.as_str(),
        "--type",
        "process",
    ];
    let mut first = Worker::builder(WorkerKind::Cohort, &args)
        .api_url(&format!("{}/api", proxy.url()))
        .home(home.path())
        .spawn();
    poll(
        "the run to be claimed (Pending)",
        RUN_TIMEOUT,
        Duration::from_millis(100),
        || (s.read_flow_run(&run)["state"]["type"] == "PENDING").then_some(()),
    );
    sleep(kill_after);
    first.sigkill();
    let first_output = first.output();
    let state_after_kill = s.read_flow_run(&run)["state"].clone();
    let launched_before_restart = !s.read_flow_run(&run)["infrastructure_pid"].is_null();
    drop(proxy);

    let mut second = Worker::builder(WorkerKind::Cohort, &args)
        .home(home.path())
        .spawn();
    let state = s.wait_for_final_state(&run, RUN_TIMEOUT);
    second.sigterm();
    second.wait_timeout(Duration::from_secs(60));

    let runs = vec![run.clone()];
    let (events, _) = events_across_a_restart(s, &name, &runs);
    let mut figures = Figures::new(label);
    figures.runs = 1;
    figures.events = events;
    figures.states = state_counts(s, &runs);
    figures.orphans = orphans_after(&runs, Duration::from_secs(10));
    let running = times_running(&run);
    figures.note(
        "state when killed",
        state_after_kill["type"].as_str().unwrap_or("?"),
    );
    figures.note("launched before the restart", launched_before_restart);
    figures.note("times Running", running);
    figures.wall = started_at.elapsed();
    figures.print();

    let context = format!(
        "first worker:\n{first_output}\nsecond worker:\n{}",
        second.output()
    );
    figures.assert_clean(&context);
    assert_eq!(state_after_kill["type"], "PENDING", "{context}");
    assert!(
        !launched_before_restart,
        "launched before the kill\n{context}"
    );
    assert_eq!(state["type"], "COMPLETED", "{state}\n{context}");
    assert_eq!(running, 1, "{context}");
    assert!(
        second.output().contains("resuming the submission"),
        "{context}"
    );
    figures
}

/// Trial 6: storage that cannot be written. (a) An unwritable `PREFECT_HOME` (here: a path
/// under a regular file) refuses to start with a clear error, and nothing is claimed. (b) The
/// disk "fills up" under a running worker — its file-size limit (RLIMIT_FSIZE, set with
/// `prlimit`) drops to one byte, so every write to its journal fails as on a full disk —: it
/// claims nothing it cannot journal (the run stays Scheduled, no event), says so on
/// `/readyz` and `/livez`, and keeps running; restarted once space is back, it runs the run.
#[test]
fn trial_6_unwritable_or_full_prefect_home_claims_nothing() {
    let _serial = serial();
    let started_at = Instant::now();
    let s = up_server();
    let pool = unique("trial6");
    s.create_work_pool(&pool, "process");
    let dep = s.deploy(&DeploySpec::new(&pool, "hello"));
    let early = s.create_flow_run(&dep.id, &[], json!({}), json!({})).id;
    let name = unique("Trial6 Worker");
    let args = [
        "--pool",
        pool.as_str(),
        "--name",
        name.as_str(),
        "--type",
        "process",
    ];

    // (a) Unwritable at start.
    let not_a_dir = tempfile::NamedTempFile::new().unwrap();
    let bad_home = not_a_dir.path().join("home");
    let mut refused = Worker::builder(WorkerKind::Cohort, &args)
        .home(&bad_home)
        .spawn();
    let status = refused.wait_timeout(Duration::from_secs(30));
    let refused_output = refused.stderr();
    assert!(!status.success(), "{refused_output}");
    assert!(
        refused_output.contains("is PREFECT_HOME writable?"),
        "{refused_output}"
    );
    assert_eq!(s.read_flow_run(&early)["state"]["type"], "SCHEDULED");

    // (b) Full while running. Its first poll (at start) takes `early`; the run created once
    // the disk is full must stay Scheduled.
    let home = tempfile::tempdir().unwrap();
    let port = util::unused_port().to_string();
    let mut health_args = args.to_vec();
    health_args.push("--with-healthcheck");
    let mut full = Worker::builder(WorkerKind::Cohort, &health_args)
        .home(home.path())
        .env("PREFECT_WORKER_WEBSERVER_HOST", "127.0.0.1")
        .env("PREFECT_WORKER_WEBSERVER_PORT", &port)
        .spawn();
    let probe = |path: &str| -> (u16, Value) {
        let r = reqwest::blocking::get(format!("http://127.0.0.1:{port}{path}"));
        match r {
            Ok(r) => (r.status().as_u16(), r.json().unwrap_or(Value::Null)),
            Err(_) => (0, Value::Null),
        }
    };
    poll(
        "the healthcheck to answer ready",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || (probe("/readyz").0 == 200).then_some(()),
    );
    s.wait_for_final_state(&early, RUN_TIMEOUT);
    let limited = std::process::Command::new("prlimit")
        .args(["--pid", &full.pid().to_string(), "--fsize=1:unlimited"])
        .status()
        .expect("prlimit (util-linux) is needed for the disk-full trial");
    assert!(limited.success(), "prlimit failed");
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({})).id;
    // Several polls pass: each finds the run, tries to journal its claim, and refuses it. The
    // count of refused claims proves the claim was attempted (a worker that never tried
    // would leave the run Scheduled too).
    let (ready, ready_body) = poll(
        "the worker to report a claim it refused because it cannot journal",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || {
            let (code, body) = probe("/readyz");
            (code == 503
                && body["journal_writable"] == false
                && body["claims_refused"].as_u64().is_some_and(|n| n >= 1))
            .then_some((code, body))
        },
    );
    std::thread::sleep(Duration::from_secs(7));
    let (live, live_body) = probe("/livez");
    let state_while_full = s.read_flow_run(&run)["state"]["type"].clone();
    let alive_while_full = full.try_wait().is_none();
    let unlimited = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &full.pid().to_string(),
            "--fsize=unlimited:unlimited",
        ])
        .status()
        .expect("prlimit");
    assert!(unlimited.success());
    let events_while_full = s.read_events(json!({
        "any_resource": {"id": [format!("prefect.flow-run.{run}")]},
        "event": {"prefix": ["prefect.worker."]},
    }));
    full.sigterm();
    full.wait_timeout(Duration::from_secs(60));
    let full_output = full.output();

    // Space is back: a restart runs the run.
    let mut after = Worker::builder(WorkerKind::Cohort, &args)
        .home(home.path())
        .spawn();
    let state = s.wait_for_final_state(&run, RUN_TIMEOUT);
    after.sigterm();
    after.wait_timeout(Duration::from_secs(60));

    let mut figures = Figures::new("trial 6");
    let runs = vec![early.clone(), run.clone()];
    figures.runs = runs.len();
    figures.states = state_counts(s, &runs);
    figures.orphans = orphans_after(&runs, Duration::from_secs(10));
    figures.note("refused to start (unwritable)", !status.success());
    figures.note("state while full", &state_while_full);
    figures.note("worker events while full", events_while_full.len());
    figures.note("readyz while full", ready);
    figures.note("claims refused while full", &ready_body["claims_refused"]);
    figures.note("livez while full", live);
    figures.note("worker alive while full", alive_while_full);
    figures.wall = started_at.elapsed();
    figures.print();

    let context = format!(
        "while full:\n{full_output}\nafter:\n{}\nreadyz {ready_body}\nlivez {live_body}",
        after.output()
    );
    assert_eq!(state_while_full, "SCHEDULED", "{context}");
    assert!(
        events_while_full.is_empty(),
        "{events_while_full:?}\n{context}"
    );
    assert_eq!(live, 503, "{context}");
    assert!(alive_while_full, "{context}");
    assert_eq!(state["type"], "COMPLETED", "{state}\n{context}");
    assert_eq!(figures.in_state("COMPLETED"), 2, "{context}");
    assert!(figures.orphans.is_empty(), "{context}");
}

// ---------------------------------------------------------------------------------------
// Shared steps
// ---------------------------------------------------------------------------------------

/// The server, started again if an earlier trial panicked while it was down.
fn up_server() -> &'static PrefectServer {
    let s = server();
    if s.is_stopped() {
        eprintln!("[trials] the server was left stopped by an earlier trial: starting it");
        s.start();
    }
    s
}

/// The events of a worker name that was killed and started again: two `started` (one per
/// worker process) and one `stopped` (the killed one sent none) are expected, so the second
/// start is not counted as a duplicate. Returns the tally and the number of starts.
fn events_across_a_restart(
    s: &PrefectServer,
    name: &str,
    runs: &[String],
) -> (util::trials::EventTally, usize) {
    let expected = expected_events(runs);
    let mut events = collect_events(s, name, &expected, EVENTS_TIMEOUT, EVENTS_SETTLE);
    let starts = events.of(STARTED, None).len();
    if starts == 2 {
        events.duplicate_pairs -= 1;
        events.duplicated.retain(|d| !d.starts_with(STARTED));
    }
    (events, starts)
}

/// The worker's own events and one `submitted` and one `executed` per run.
fn expected_events(run_ids: &[String]) -> Vec<(&'static str, Option<&str>)> {
    let mut expected = vec![(STARTED, None), (STOPPED, None)];
    for id in run_ids {
        expected.push((SUBMITTED, Some(id.as_str())));
        expected.push((EXECUTED, Some(id.as_str())));
    }
    expected
}

/// Poll `f` every 500 ms; panics (with the worker's output) if the worker exits first or
/// `timeout` passes.
fn poll_worker<T>(
    worker: &mut Worker,
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if let Some(status) = worker.try_wait() {
            panic!("the worker exited ({status}) while waiting for {what}");
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; worker output:\n{}",
            worker.output()
        );
        sleep(Duration::from_millis(500));
    }
}

/// Wait until every run is Running; returns when the first one was seen Running.
fn wait_all_running(
    s: &PrefectServer,
    worker: &mut Worker,
    ids: &[String],
    timeout: Duration,
) -> Instant {
    let mut first = None;
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    poll_worker(worker, "every flow run to be Running", timeout, || {
        for id in ids {
            let state = s.read_flow_run(id)["state"]["type"]
                .as_str()
                .unwrap_or("NONE")
                .to_owned();
            assert!(
                matches!(state.as_str(), "SCHEDULED" | "PENDING" | "RUNNING"),
                "flow run {id} is {state} before the fault"
            );
            if state == "RUNNING" && first.is_none() {
                first = Some(Instant::now());
            }
            seen.insert(id.clone(), state);
        }
        seen.values().all(|s| s == "RUNNING").then_some(())
    });
    first.expect("set when every run is Running")
}

fn wait_final(s: &PrefectServer, worker: &mut Worker, id: &str, timeout: Duration) -> Value {
    poll_worker(
        worker,
        &format!("flow run {id} to be final"),
        timeout,
        || {
            let state = s.read_flow_run(id)["state"].clone();
            matches!(
                state["type"].as_str(),
                Some("COMPLETED" | "FAILED" | "CRASHED" | "CANCELLED")
            )
            .then_some(state)
        },
    )
}

/// SIGTERM; the worker must exit 0.
fn stop_worker(worker: &mut Worker) {
    worker.sigterm();
    let status = worker.wait_timeout(STOP_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(0),
        "worker exit after SIGTERM: {status}\n{}",
        worker.output()
    );
}

/// What a failed assertion shows besides the figures: the worker's output and the end of the
/// server's log.
fn context(s: &PrefectServer, worker: &Worker) -> String {
    let log = s.log();
    let tail: Vec<&str> = log.lines().rev().take(40).collect();
    format!(
        "worker output:\n{}\n----- server log (last 40 lines) -----\n{}",
        worker.output(),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    )
}
