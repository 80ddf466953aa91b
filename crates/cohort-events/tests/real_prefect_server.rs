//! The emitter against a real Prefect 3.8.8 server: an event sent over `/api/events/in` is
//! stored exactly as sent, and reads back through `POST /api/events/filter`.
//!
//! Needs the Prefect virtualenv named by `COHORT_PREFECT_VENV` (made by
//! `scripts/prefect-venv.sh`); fails loudly without it rather than skipping.
// Waits on a real server process: wall-clock time and sleeps are the point here.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod common;

use std::time::Duration;

use cohort_events::emitter::{Emitter, EmitterConfig, EventsAuth};
use cohort_events::related::{self, Named};
use cohort_events::{names, Event};
use serde_json::{json, Value};
use uuid::Uuid;

use common::{venv, PrefectServer};

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
    emitter.emit(started.clone()).await;
    emitter.emit(stopped.clone()).await;
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
