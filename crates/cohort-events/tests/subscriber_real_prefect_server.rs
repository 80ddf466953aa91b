//! The subscriber against a real Prefect 3.8.8 server: forcing a flow run to Cancelling
//! produces the server's `prefect.flow-run.Cancelling` event on `/api/events/out`, and the
//! subscriber delivers it within seconds (how a worker learns of a cancellation).
//!
//! Needs the Prefect virtualenv named by `COHORT_PREFECT_VENV` (made by
//! `scripts/prefect-venv.sh`); fails loudly without it rather than skipping.
// Waits on a real server process: wall-clock time is the point here.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod common;

use std::time::Duration;

use cohort_events::{names, subscribe, EventsAuth, SubscriberConfig};
use serde_json::{json, Value};
use uuid::Uuid;

use common::{venv, PrefectServer};

/// POST with the retries a busy SQLite server needs: it answers 503 ("database is locked")
/// now and then under load, and that is real, not a failure of the code under test.
async fn post(http: &reqwest::Client, server: &PrefectServer, path: &str, body: Value) -> Value {
    let url = format!("{}{path}", server.api_url);
    let mut last = String::new();
    for attempt in 0..10u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt))).await;
        }
        let response = match http.post(&url).json(&body).send().await {
            Ok(r) => r,
            Err(e) => {
                last = e.to_string();
                continue;
            }
        };
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if matches!(status.as_u16(), 429 | 502 | 503) {
            last = format!("{status}: {text}");
            continue;
        }
        assert!(status.is_success(), "POST {url}: {status}: {text}");
        return serde_json::from_str(&text).unwrap_or_else(|e| panic!("POST {url}: {e}: {text}"));
    }
    panic!("POST {url}: still failing after 10 attempts: {last}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forced_cancelling_state_reaches_the_subscriber() {
    let venv = venv();
    let mut server = PrefectServer::start(&venv);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    server.wait_healthy(&http).await;

    let (mut subscription, _task) = subscribe(SubscriberConfig {
        api_url: url::Url::parse(&server.api_url).unwrap(),
        auth: EventsAuth::Token(None),
        user_agent: format!("cohort-events-test/{}", env!("CARGO_PKG_VERSION")),
        filter: json!({"event": {"name": [names::FLOW_RUN_CANCELLING]}}),
    });
    let connected = subscription.connected.wait_for(|c| *c);
    tokio::time::timeout(Duration::from_secs(30), connected)
        .await
        .unwrap_or_else(|_| panic!("no subscription after 30 s\n{}", server.log()))
        .expect("the subscriber task is alive");

    let flow = post(
        &http,
        &server,
        "/flows/",
        json!({"name": format!("cohort-subscriber-{}", Uuid::new_v4().simple())}),
    )
    .await;
    let run = post(
        &http,
        &server,
        "/flow_runs/",
        json!({"flow_id": flow["id"], "state": {"type": "RUNNING", "name": "Running"}}),
    )
    .await;
    let run_id = run["id"].as_str().expect("flow run id").to_owned();
    let result = post(
        &http,
        &server,
        &format!("/flow_runs/{run_id}/set_state"),
        json!({"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": true}),
    )
    .await;
    assert_eq!(result["status"], "ACCEPT", "{result}");

    let want = format!("prefect.flow-run.{run_id}");
    let event = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let event = subscription
                .events
                .recv()
                .await
                .expect("the subscriber task is alive");
            if event.resource.id() == want {
                return event;
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no Cancelling event for {want} within 10 s\n{}",
            server.log()
        )
    });
    assert_eq!(event.event, names::FLOW_RUN_CANCELLING);
    assert_eq!(event.resource.get("prefect.state-type"), Some("CANCELLING"));
    assert!(*subscription.connected.borrow());
}
