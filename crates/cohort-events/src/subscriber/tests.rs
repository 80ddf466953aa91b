//! Subscriber behaviour against the in-process fake `/api/events/out` server: handshake and
//! filter frame, delivery, de-duplication of the backfill after a reconnect, the connected
//! flag, reconnection after drops, clean closes, refusals and unanswered keepalives.
//!
//! These use real sockets, so they run on real (but short) time: tokio's paused clock
//! auto-advances whenever the runtime waits on I/O, which would fire timeouts spuriously.

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use serde_json::json;

use super::fake_events_out_server::{AfterFilter, AuthAnswer, FakeEventsOutServer, Script};
use super::*;
use crate::event::{Event, Resource};

fn tuning() -> SubscriberTuning {
    SubscriberTuning {
        connect_timeout: Duration::from_secs(5),
        keepalive_interval: Duration::from_secs(3600),
        pong_timeout: Duration::from_secs(20),
        backoff_base: Duration::from_millis(20),
        backoff_cap: Duration::from_millis(200),
        healthy_after: Duration::from_secs(10),
        ..SubscriberTuning::default()
    }
}

fn config(api_url: Url) -> SubscriberConfig {
    SubscriberConfig {
        api_url,
        auth: EventsAuth::Token(None),
        user_agent: "cohort-test/1.0".to_owned(),
        filter: json!({"event": {"name": ["prefect.flow-run.Cancelling"]}}),
    }
}

fn cancelling(n: usize) -> Event {
    Event::new(
        "prefect.flow-run.Cancelling",
        Resource::new(format!("prefect.flow-run.{n}")),
        vec![],
    )
}

async fn eventually(what: &str, condition: impl Fn() -> bool) {
    for _ in 0..500 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn wait_connected(subscription: &mut Subscription, want: bool) {
    let wait = subscription.connected.wait_for(|c| *c == want);
    tokio::time::timeout(Duration::from_secs(5), wait)
        .await
        .unwrap_or_else(|_| panic!("connected never became {want}"))
        .expect("the task is alive");
}

async fn next_event(subscription: &mut Subscription) -> Event {
    tokio::time::timeout(Duration::from_secs(5), subscription.events.recv())
        .await
        .expect("an event within 5 s")
        .expect("the task is alive")
}

/// Asserts nothing more is delivered for a moment.
async fn assert_quiet(subscription: &mut Subscription) {
    let extra = tokio::time::timeout(Duration::from_millis(200), subscription.events.recv()).await;
    assert!(extra.is_err(), "unexpected delivery: {extra:?}");
}

#[tokio::test]
async fn subscribes_with_prefects_handshake_and_an_occurred_window() {
    let server = FakeEventsOutServer::start(|_| Script::serve()).await;
    let before = Utc::now();
    let (mut subscription, _task) = subscribe_with(config(server.api_url()), tuning());
    let after = Utc::now();
    wait_connected(&mut subscription, true).await;
    eventually("the filter frame", || {
        server
            .connections()
            .first()
            .is_some_and(|c| c.filter_frame.is_some())
    })
    .await;

    let connection = &server.connections()[0];
    assert_eq!(connection.path, "/api/events/out");
    assert_eq!(connection.subprotocol.as_deref(), Some("prefect"));
    assert_eq!(connection.user_agent.as_deref(), Some("cohort-test/1.0"));
    assert_eq!(connection.authorization, None);
    assert_eq!(
        connection.auth_frame.as_deref(),
        Some(r#"{"type":"auth","token":null}"#)
    );
    let frame = connection.filter_frame.as_ref().unwrap();
    assert_eq!(frame["type"], "filter");
    assert_eq!(
        frame["filter"]["event"],
        json!({"name": ["prefect.flow-run.Cancelling"]}),
        "the caller's filter is kept"
    );
    let keys: Vec<&String> = frame["filter"].as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 2, "only `event` and `occurred`: {frame}");
    // The cursor starts a minute before `subscribe`.
    let since = connection.since();
    assert!(
        since >= before - INITIAL_LOOKBACK - TimeDelta::microseconds(1),
        "{since} vs {before}"
    );
    assert!(since <= after - INITIAL_LOOKBACK, "{since} vs {after}");
    // `until` lies far in the future, or the server would filter out live events.
    let until = connection.until();
    assert!(until > Utc::now() + TimeDelta::days(364), "{until}");
    assert_eq!(
        frame["filter"]["occurred"]["since"].as_str().unwrap().len(),
        "2026-01-01T00:00:00.000000Z".len(),
        "pydantic's UTC form"
    );
}

#[tokio::test]
async fn delivers_backfill_then_live_events_without_the_received_field() {
    let server = FakeEventsOutServer::start(|_| Script::serve()).await;
    let stale = cancelling(0).with_occurred(Utc::now() - TimeDelta::minutes(10));
    let recent = cancelling(1).with_occurred(Utc::now() - TimeDelta::seconds(30));
    server.publish(&stale);
    server.publish(&recent);

    let (mut subscription, _task) = subscribe_with(config(server.api_url()), tuning());
    assert_eq!(
        next_event(&mut subscription).await,
        recent,
        "backfill from a minute ago, not earlier"
    );
    wait_connected(&mut subscription, true).await;
    let live: Vec<Event> = (2..6).map(cancelling).collect();
    for event in &live {
        server.publish(event);
    }
    for event in &live {
        assert_eq!(&next_event(&mut subscription).await, event);
    }
    assert_quiet(&mut subscription).await;
}

#[tokio::test]
async fn resubscribes_from_the_cursor_after_a_drop_and_delivers_the_backfill_once() {
    let server = FakeEventsOutServer::start(|_| Script::serve()).await;
    let (mut subscription, _task) = subscribe_with(config(server.api_url()), tuning());
    wait_connected(&mut subscription, true).await;
    let first: Vec<Event> = (0..3).map(cancelling).collect();
    for event in &first {
        server.publish(event);
    }
    for event in &first {
        assert_eq!(&next_event(&mut subscription).await, event);
    }

    server.wait_live(0).await;
    server.drop_connections();
    eventually("a second connection", || server.connections().len() == 2).await;
    wait_connected(&mut subscription, true).await;
    let later = cancelling(3);
    server.publish(&later);
    assert_eq!(
        next_event(&mut subscription).await,
        later,
        "the replayed backfill is not delivered again"
    );
    assert_quiet(&mut subscription).await;

    let connections = server.connections();
    assert_eq!(connections.len(), 2);
    let newest = first.iter().map(|e| e.occurred).max().unwrap();
    assert_eq!(
        connections[1].since(),
        newest - REPLAY_MARGIN,
        "the second subscription starts a minute before the newest event"
    );
    let replayed: Vec<String> = first.iter().map(|e| e.id.to_string()).collect();
    assert_eq!(
        connections[1].sent[..3],
        replayed[..],
        "the server did replay them"
    );
}

#[tokio::test]
async fn a_clean_close_reconnects_too() {
    let server = FakeEventsOutServer::start(|_| Script::serve()).await;
    let (mut subscription, _task) = subscribe_with(config(server.api_url()), tuning());
    wait_connected(&mut subscription, true).await;
    server.wait_live(0).await;
    server.close_connections_normally();
    eventually("a second connection", || server.connections().len() == 2).await;
    wait_connected(&mut subscription, true).await;
    let event = cancelling(1);
    server.publish(&event);
    assert_eq!(next_event(&mut subscription).await, event);
    assert_eq!(server.connections().len(), 2);
}

#[tokio::test]
async fn connected_is_false_until_subscribed_and_while_the_server_is_away() {
    // Connections 0, 1, 3 and 4 are refused at authentication (each refusal waits out the
    // backoff cap, long enough to observe `false`); 2 and 5 serve.
    let server = FakeEventsOutServer::start(|n| {
        if n == 2 || n == 5 {
            Script::serve()
        } else {
            Script {
                auth: AuthAnswer::ClosePolicy("Invalid token"),
                after_filter: AfterFilter::Serve,
            }
        }
    })
    .await;
    let (mut subscription, _task) = subscribe_with(config(server.api_url()), tuning());
    assert!(!*subscription.connected.borrow());
    eventually("two refused attempts", || server.connections().len() == 2).await;
    assert!(!*subscription.connected.borrow());
    wait_connected(&mut subscription, true).await;
    assert_eq!(server.connections().len(), 3);

    server.wait_live(2).await;
    server.drop_connections();
    wait_connected(&mut subscription, false).await;
    eventually("two more refused attempts", || {
        server.connections().len() == 5
    })
    .await;
    assert!(!*subscription.connected.borrow());
    wait_connected(&mut subscription, true).await;
    assert_eq!(server.connections().len(), 6);
}

#[tokio::test]
async fn an_auth_rejection_is_retried_at_the_backoff_cap() {
    let server = FakeEventsOutServer::start(|n| Script {
        auth: if n == 0 {
            AuthAnswer::ClosePolicy("Invalid token")
        } else {
            AuthAnswer::Success
        },
        after_filter: AfterFilter::Serve,
    })
    .await;
    let tuning = SubscriberTuning {
        backoff_base: Duration::from_millis(1),
        backoff_cap: Duration::from_millis(400),
        ..tuning()
    };
    let started = Instant::now();
    let (mut subscription, _task) = subscribe_with(config(server.api_url()), tuning);
    wait_connected(&mut subscription, true).await;
    // Equal jitter: at least half the cap, where a plain failure would wait about 1 ms.
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(server.connections().len(), 2);
}

#[tokio::test]
async fn a_refused_filter_is_retried_at_the_backoff_cap() {
    let server = FakeEventsOutServer::start(|n| Script {
        auth: AuthAnswer::Success,
        after_filter: if n == 0 {
            AfterFilter::Close(1002, "Invalid filter: nope")
        } else {
            AfterFilter::Serve
        },
    })
    .await;
    let tuning = SubscriberTuning {
        backoff_base: Duration::from_millis(1),
        backoff_cap: Duration::from_millis(400),
        ..tuning()
    };
    let (mut subscription, _task) = subscribe_with(config(server.api_url()), tuning);
    eventually("the refusal", || server.connections().len() == 1).await;
    let refused_at = Instant::now();
    eventually("a second connection", || server.connections().len() == 2).await;
    assert!(refused_at.elapsed() >= Duration::from_millis(150));
    wait_connected(&mut subscription, true).await;
}

#[tokio::test]
async fn an_unanswered_keepalive_ping_means_a_dead_connection() {
    let server = FakeEventsOutServer::start(|n| Script {
        auth: AuthAnswer::Success,
        after_filter: if n == 0 {
            AfterFilter::Stall
        } else {
            AfterFilter::Serve
        },
    })
    .await;
    let tuning = SubscriberTuning {
        keepalive_interval: Duration::from_millis(50),
        pong_timeout: Duration::from_millis(100),
        ..tuning()
    };
    let (mut subscription, _task) = subscribe_with(config(server.api_url()), tuning);
    wait_connected(&mut subscription, true).await;
    eventually("a second connection", || server.connections().len() == 2).await;
    wait_connected(&mut subscription, true).await;
    // The healthy connection answers its keepalives and stays.
    let event = cancelling(1);
    eventually("a keepalive ping answered", || {
        server.connections()[1].pings >= 3
    })
    .await;
    server.publish(&event);
    assert_eq!(next_event(&mut subscription).await, event);
    assert_eq!(server.connections().len(), 2);
}

#[tokio::test]
async fn cloud_sends_the_api_key_in_the_auth_frame_not_a_header() {
    let server = FakeEventsOutServer::start(|_| Script::serve()).await;
    let config = SubscriberConfig {
        auth: EventsAuth::Bearer("pnu_key".to_owned()),
        ..config(server.api_url())
    };
    let (mut subscription, _task) = subscribe_with(config, tuning());
    wait_connected(&mut subscription, true).await;
    let connection = &server.connections()[0];
    assert_eq!(connection.subprotocol.as_deref(), Some("prefect"));
    assert_eq!(connection.authorization, None);
    assert_eq!(
        connection.auth_frame.as_deref(),
        Some(r#"{"type":"auth","token":"pnu_key"}"#)
    );
}

#[tokio::test]
async fn the_task_ends_when_the_events_receiver_is_dropped() {
    let server = FakeEventsOutServer::start(|_| Script::serve()).await;
    let (mut subscription, task) = subscribe_with(config(server.api_url()), tuning());
    wait_connected(&mut subscription, true).await;
    let Subscription { events, connected } = subscription;
    drop(events);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the task ends")
        .expect("without panicking");
    assert!(!*connected.borrow());
}

#[tokio::test]
async fn malformed_frames_are_skipped_and_duplicates_dropped() {
    // Exercised on the task directly: the fake only sends well-formed events.
    let (events_tx, _events) = mpsc::channel(4);
    let (connected_tx, _connected) = watch::channel(false);
    let api_url = Url::parse("http://127.0.0.1:9/api").unwrap();
    let mut task = SubscriberTask::new(config(api_url), tuning(), events_tx, connected_tx);
    task.handle_text("not json");
    task.handle_text(r#"{"type":"pong"}"#);
    task.handle_text(r#"{"type":"event","event":{"id":"nope"}}"#);
    assert!(task.ready.is_empty());
    let event = cancelling(7);
    let mut received: serde_json::Value =
        serde_json::from_str(&event.to_wire_json().unwrap()).unwrap();
    received["received"] = json!("2026-01-01T00:00:00.000000Z");
    task.handle_text(&json!({"type": "event", "event": received}).to_string());
    task.handle_text(&json!({"type": "event", "event": received}).to_string());
    assert_eq!(task.ready.iter().collect::<Vec<_>>(), [&event]);
}

#[tokio::test]
async fn a_filter_that_is_not_an_object_never_connects() {
    let server = FakeEventsOutServer::start(|_| Script::serve()).await;
    let config = SubscriberConfig {
        filter: json!(["prefect.flow-run.Cancelling"]),
        ..config(server.api_url())
    };
    let (mut subscription, _task) = subscribe_with(config, tuning());
    assert_quiet(&mut subscription).await;
    assert!(server.connections().is_empty());
    assert!(!*subscription.connected.borrow());
}

#[test]
fn filter_frames_overwrite_occurred() {
    let since = "2026-03-04T05:06:07.000008Z".parse().unwrap();
    let now = "2026-03-04T05:07:07Z".parse().unwrap();
    let filter = filter_object(
        &json!({"occurred": {"since": "x"}, "any_resource": {"id": ["prefect.work-pool.p"]}}),
    )
    .unwrap();
    let frame: serde_json::Value =
        serde_json::from_str(&filter_frame(&filter, since, now)).unwrap();
    assert_eq!(
        frame,
        json!({"type": "filter", "filter": {
            "occurred": {"since": "2026-03-04T05:06:07.000008Z", "until": "2027-03-04T05:07:07.000000Z"},
            "any_resource": {"id": ["prefect.work-pool.p"]},
        }})
    );
    assert_eq!(filter_object(&serde_json::Value::Null).unwrap().len(), 0);
    let error = filter_object(&json!("x")).unwrap_err();
    assert!(error.is_rejection(), "{error}");
}

#[test]
fn the_cursor_moves_forward_only_and_never_into_the_future() {
    let now: DateTime<Utc> = "2026-03-04T12:00:00Z".parse().unwrap();
    let cursor = now - TimeDelta::minutes(10);
    let occurred = now - TimeDelta::minutes(5);
    assert_eq!(
        advance_cursor(cursor, occurred, now),
        occurred - REPLAY_MARGIN
    );
    assert_eq!(
        advance_cursor(cursor, now - TimeDelta::minutes(30), now),
        cursor,
        "an old event does not move it back"
    );
    assert_eq!(
        advance_cursor(cursor, now + TimeDelta::hours(2), now),
        now - REPLAY_MARGIN,
        "a skewed clock does not push it past now"
    );
}
