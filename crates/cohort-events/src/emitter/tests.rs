//! Emitter behaviour against the in-process fake events server: ordering, handshakes,
//! checkpointing, resend after a dropped connection, flush and close, auth rejection.
//!
//! These use real sockets, so they run on real (but short) time: tokio's paused clock
//! auto-advances whenever the runtime waits on I/O, which would fire timeouts spuriously.

use std::time::Duration;

use super::fake_events_server::{AfterAuth, AuthAnswer, FakeEventsServer, Script};
use super::*;
use crate::event::{Event, Resource};

fn tuning() -> Tuning {
    Tuning {
        checkpoint_every: 700,
        checkpoint_interval: Duration::from_secs(3600),
        pong_timeout: Duration::from_secs(20),
        connect_timeout: Duration::from_secs(5),
        write_timeout: Duration::from_secs(5),
        backoff_base: Duration::from_millis(20),
        backoff_cap: Duration::from_millis(200),
        healthy_after: Duration::from_secs(10),
        close_grace: Duration::from_secs(2),
        // Off, so each test sees exactly what it sends; on in its own test.
        resend_confirmed_within: Duration::ZERO,
    }
}

fn config(api_url: url::Url, auth: EventsAuth) -> EmitterConfig {
    EmitterConfig {
        api_url,
        auth,
        user_agent: "cohort-test/1.0".to_owned(),
    }
}

fn numbered(n: usize) -> Event {
    Event::new(
        "cohort.test.numbered",
        Resource::new(format!("cohort.test.{n}")),
        vec![],
    )
}

fn ids(events: &[Event]) -> Vec<String> {
    events.iter().map(|e| e.id.to_string()).collect()
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

#[tokio::test]
async fn events_arrive_in_order_after_prefects_handshake() {
    let server = FakeEventsServer::start(|_| Script::serve()).await;
    let (emitter, _task) =
        Emitter::spawn_with(config(server.api_url(), EventsAuth::Token(None)), tuning());

    let events: Vec<Event> = (0..25).map(numbered).collect();
    for event in &events {
        emitter.emit(event.clone()).await;
    }
    emitter.flush(Duration::from_secs(5)).await.expect("flush");

    let connections = server.connections();
    assert_eq!(connections.len(), 1);
    let connection = &connections[0];
    assert_eq!(connection.path, "/api/events/in");
    assert_eq!(connection.subprotocol.as_deref(), Some("prefect"));
    assert_eq!(connection.user_agent.as_deref(), Some("cohort-test/1.0"));
    assert_eq!(connection.authorization, None);
    assert_eq!(
        connection.auth_frame.as_deref(),
        Some(r#"{"type":"auth","token":null}"#)
    );
    let expected: Vec<String> = events.iter().map(|e| e.to_wire_json().unwrap()).collect();
    assert_eq!(connection.events, expected, "exact frames, in emit order");
    assert_eq!(emitter.unconfirmed(), 0);
    assert!(emitter.is_connected());
}

#[tokio::test]
async fn token_auth_sends_the_token_frame_and_a_basic_header() {
    let server = FakeEventsServer::start(|_| Script::serve()).await;
    let auth = EventsAuth::Token(Some("user:pass".to_owned()));
    let (emitter, _task) = Emitter::spawn_with(config(server.api_url(), auth), tuning());
    emitter.emit(numbered(1)).await;
    emitter.flush(Duration::from_secs(5)).await.expect("flush");

    let connection = &server.connections()[0];
    assert_eq!(
        connection.auth_frame.as_deref(),
        Some(r#"{"type":"auth","token":"user:pass"}"#)
    );
    assert_eq!(
        connection.authorization.as_deref(),
        Some("Basic dXNlcjpwYXNz")
    );
    assert_eq!(connection.events.len(), 1);
}

#[tokio::test]
async fn cloud_bearer_auth_uses_the_header_and_no_auth_frame() {
    let server = FakeEventsServer::start(|_| Script::serve()).await;
    let auth = EventsAuth::Bearer("pnu_key".to_owned());
    let (emitter, _task) = Emitter::spawn_with(config(server.api_url(), auth), tuning());
    let event = numbered(1);
    emitter.emit(event.clone()).await;
    emitter.flush(Duration::from_secs(5)).await.expect("flush");

    let connection = &server.connections()[0];
    assert_eq!(connection.subprotocol, None);
    assert_eq!(connection.authorization.as_deref(), Some("bearer pnu_key"));
    assert_eq!(connection.auth_frame, None);
    assert_eq!(connection.events, vec![event.to_wire_json().unwrap()]);
}

#[tokio::test]
async fn fake_events_server_drops_connection_and_every_unconfirmed_event_is_resent() {
    let server = FakeEventsServer::start(|n| match n {
        0 => Script {
            auth: AuthAnswer::Success,
            after_auth: AfterAuth::DropAfter(3),
        },
        _ => Script::serve(),
    })
    .await;
    let (emitter, _task) =
        Emitter::spawn_with(config(server.api_url(), EventsAuth::Token(None)), tuning());
    emitter
        .flush(Duration::from_secs(5))
        .await
        .expect("nothing to flush yet");
    eventually("the first connection", || emitter.is_connected()).await;

    let events: Vec<Event> = (0..10).map(numbered).collect();
    for event in &events {
        emitter.emit(event.clone()).await;
    }
    emitter
        .flush(Duration::from_secs(5))
        .await
        .expect("flush after reconnect");

    let connections = server.connections();
    assert!(connections.len() >= 2, "reconnected: {connections:?}");
    assert_eq!(
        connections[0].event_ids(),
        ids(&events[..3]),
        "first socket dropped after 3"
    );
    // Nothing was confirmed before the drop (no pong came back), so the new socket carries
    // all ten, in emit order, before anything else.
    let last = connections.last().unwrap();
    assert_eq!(last.event_ids(), ids(&events));
    assert_eq!(
        last.auth_frame.as_deref(),
        Some(r#"{"type":"auth","token":null}"#)
    );
    assert_eq!(emitter.unconfirmed(), 0);
}

/// A confirmation says the server received an event, not that it stored it (Prefect's
/// server queues events in memory): after a reconnect, events confirmed lately go again,
/// before the unconfirmed ones, in emit order.
#[tokio::test]
async fn recently_confirmed_events_are_resent_after_a_reconnect() {
    let server = FakeEventsServer::start(|n| match n {
        0 => Script {
            auth: AuthAnswer::Success,
            after_auth: AfterAuth::DropAfter(3),
        },
        _ => Script::serve(),
    })
    .await;
    let tuning = Tuning {
        resend_confirmed_within: Duration::from_secs(30),
        ..tuning()
    };
    let (emitter, _task) =
        Emitter::spawn_with(config(server.api_url(), EventsAuth::Token(None)), tuning);
    let events: Vec<Event> = (0..3).map(numbered).collect();
    emitter.emit(events[0].clone()).await;
    emitter.emit(events[1].clone()).await;
    emitter
        .flush(Duration::from_secs(5))
        .await
        .expect("the first two are confirmed");
    emitter.emit(events[2].clone()).await;
    emitter
        .flush(Duration::from_secs(5))
        .await
        .expect("flush after reconnect");

    let connections = server.connections();
    assert!(connections.len() >= 2, "reconnected: {connections:?}");
    assert_eq!(connections[0].event_ids(), ids(&events));
    assert_eq!(connections.last().unwrap().event_ids(), ids(&events));
    assert_eq!(emitter.unconfirmed(), 0);
}

#[tokio::test]
async fn events_emitted_while_disconnected_are_sent_after_reconnect_in_order() {
    let server = FakeEventsServer::start(|n| match n {
        0 => Script {
            auth: AuthAnswer::Success,
            after_auth: AfterAuth::DropAfter(1),
        },
        _ => Script::serve(),
    })
    .await;
    let mut slow = tuning();
    slow.backoff_base = Duration::from_millis(300);
    slow.backoff_cap = Duration::from_millis(300);
    let (emitter, _task) =
        Emitter::spawn_with(config(server.api_url(), EventsAuth::Token(None)), slow);

    let first = numbered(0);
    emitter.emit(first.clone()).await;
    eventually("the drop", || {
        !emitter.is_connected() && server.connections().len() == 1
    })
    .await;
    let later: Vec<Event> = (1..5).map(numbered).collect();
    for event in &later {
        emitter.emit(event.clone()).await;
    }
    emitter.flush(Duration::from_secs(5)).await.expect("flush");

    let mut all = vec![first];
    all.extend(later);
    assert_eq!(server.connections().last().unwrap().event_ids(), ids(&all));
}

#[tokio::test]
async fn flush_resolves_once_the_pong_confirms_and_clears_the_buffer() {
    let server = FakeEventsServer::start(|_| Script::serve()).await;
    let (emitter, _task) =
        Emitter::spawn_with(config(server.api_url(), EventsAuth::Token(None)), tuning());
    for n in 0..3 {
        emitter.emit(numbered(n)).await;
    }
    emitter.flush(Duration::from_secs(5)).await.expect("flush");
    assert_eq!(emitter.unconfirmed(), 0);
    // One ping to connect, one forced by the flush.
    assert_eq!(server.connections()[0].pings, 2);

    // Nothing pending: no ping needed, still Ok.
    emitter
        .flush(Duration::from_secs(5))
        .await
        .expect("empty flush");
    assert_eq!(server.connections()[0].pings, 2);
}

#[tokio::test]
async fn count_based_checkpoint_pings_every_n_events() {
    let server = FakeEventsServer::start(|_| Script::serve()).await;
    let mut every_five = tuning();
    every_five.checkpoint_every = 5;
    let (emitter, _task) = Emitter::spawn_with(
        config(server.api_url(), EventsAuth::Token(None)),
        every_five,
    );

    for n in 0..5 {
        emitter.emit(numbered(n)).await;
    }
    eventually("the count checkpoint", || emitter.unconfirmed() == 0).await;
    for n in 5..8 {
        emitter.emit(numbered(n)).await;
    }
    eventually("three events on the wire", || {
        server.connections()[0].events.len() == 8
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        emitter.unconfirmed(),
        3,
        "below the count, no checkpoint yet"
    );
    assert_eq!(
        server.connections()[0].pings,
        2,
        "connect ping + one checkpoint"
    );
}

#[tokio::test]
async fn time_based_checkpoint_confirms_idle_events() {
    let server = FakeEventsServer::start(|_| Script::serve()).await;
    let mut often = tuning();
    often.checkpoint_interval = Duration::from_millis(100);
    let (emitter, _task) =
        Emitter::spawn_with(config(server.api_url(), EventsAuth::Token(None)), often);
    emitter.emit(numbered(1)).await;
    eventually("the time checkpoint", || emitter.unconfirmed() == 0).await;
}

#[tokio::test]
async fn flush_times_out_clearly_when_the_server_never_answers_pings() {
    let server = FakeEventsServer::start(|_| Script {
        auth: AuthAnswer::Success,
        after_auth: AfterAuth::Stall,
    })
    .await;
    let (emitter, _task) =
        Emitter::spawn_with(config(server.api_url(), EventsAuth::Token(None)), tuning());
    emitter.emit(numbered(1)).await;
    emitter.emit(numbered(2)).await;

    let error = emitter.flush(Duration::from_millis(300)).await.unwrap_err();
    match &error {
        FlushError::Timeout {
            unconfirmed,
            connection,
            last_error,
            ..
        } => {
            assert_eq!(*unconfirmed, 2);
            assert_eq!(*connection, "connected");
            assert!(last_error.is_none());
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(
        error.to_string(),
        "2 event(s) not confirmed by the events server after 300ms (connected)"
    );
}

#[tokio::test]
async fn an_unanswered_ping_counts_as_a_dead_connection_and_events_are_resent() {
    let server = FakeEventsServer::start(|n| match n {
        0 => Script {
            auth: AuthAnswer::Success,
            after_auth: AfterAuth::Stall,
        },
        _ => Script::serve(),
    })
    .await;
    let mut impatient = tuning();
    impatient.pong_timeout = Duration::from_millis(200);
    let (emitter, _task) =
        Emitter::spawn_with(config(server.api_url(), EventsAuth::Token(None)), impatient);
    let events: Vec<Event> = (0..3).map(numbered).collect();
    for event in &events {
        emitter.emit(event.clone()).await;
    }
    emitter
        .flush(Duration::from_secs(5))
        .await
        .expect("flush on the second connection");
    let connections = server.connections();
    assert_eq!(connections.len(), 2);
    assert_eq!(connections[1].event_ids(), ids(&events));
}

#[tokio::test]
async fn auth_rejection_is_a_clear_error_and_is_not_retried_in_a_hot_loop() {
    let server = FakeEventsServer::start(|_| Script {
        auth: AuthAnswer::ClosePolicy("Invalid token"),
        after_auth: AfterAuth::Serve,
    })
    .await;
    let mut paced = tuning();
    paced.backoff_cap = Duration::from_secs(2);
    let auth = EventsAuth::Token(Some("wrong".to_owned()));
    let (emitter, _task) = Emitter::spawn_with(config(server.api_url(), auth), paced);
    emitter.emit(numbered(1)).await;

    let error = emitter.flush(Duration::from_millis(500)).await.unwrap_err();
    let FlushError::Timeout {
        unconfirmed,
        connection,
        last_error: Some(cause),
        ..
    } = &error
    else {
        panic!("expected a timeout carrying the auth failure, got {error:?}");
    };
    assert_eq!((*unconfirmed, *connection), (1, "disconnected"));
    assert!(cause.is_auth_rejection(), "{cause:?}");
    let url = format!(
        "ws://127.0.0.1:{}/api/events/in",
        server.api_url().port().unwrap()
    );
    assert_eq!(
        cause.to_string(),
        format!("events websocket {url} rejected authentication: 1008 \"Invalid token\"")
    );
    assert!(
        error
            .to_string()
            .contains("rejected authentication: 1008 \"Invalid token\""),
        "{error}"
    );
    assert!(
        std::error::Error::source(&error).is_some(),
        "the cause is chained"
    );
    assert!(emitter.last_error().is_some_and(|e| e.is_auth_rejection()));

    // The next attempt waits at least half the cap (1 s), not the 20 ms base.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.connections().len(), 1);
}

#[tokio::test]
async fn invalid_events_are_dropped_and_never_sent() {
    let server = FakeEventsServer::start(|_| Script::serve()).await;
    let (emitter, _task) =
        Emitter::spawn_with(config(server.api_url(), EventsAuth::Token(None)), tuning());
    emitter
        .emit(Event::new("cohort.test.bad", Resource::default(), vec![]))
        .await;
    let good = numbered(1);
    emitter.emit(good.clone()).await;
    emitter.flush(Duration::from_secs(5)).await.expect("flush");
    assert_eq!(server.connections()[0].event_ids(), ids(&[good]));
}

#[tokio::test]
async fn close_confirms_pending_events_then_ends_the_task() {
    let server = FakeEventsServer::start(|_| Script::serve()).await;
    let (emitter, task) =
        Emitter::spawn_with(config(server.api_url(), EventsAuth::Token(None)), tuning());
    let events: Vec<Event> = (0..3).map(numbered).collect();
    for event in &events {
        emitter.emit(event.clone()).await;
    }
    emitter.close();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("task ends")
        .expect("no panic");
    assert_eq!(server.connections()[0].event_ids(), ids(&events));
    assert_eq!(emitter.unconfirmed(), 0);
    assert!(matches!(
        emitter.flush(Duration::from_secs(1)).await,
        Err(FlushError::Closed)
    ));
}

#[tokio::test]
async fn close_gives_up_after_the_grace_period_when_the_server_is_unreachable() {
    // A port nothing listens on.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let api_url = url::Url::parse(&format!("http://127.0.0.1:{port}/api")).unwrap();
    let mut short = tuning();
    short.close_grace = Duration::from_millis(200);
    let (emitter, task) = Emitter::spawn_with(config(api_url, EventsAuth::Token(None)), short);
    emitter.emit(numbered(1)).await;
    let error = emitter.flush(Duration::from_millis(100)).await.unwrap_err();
    assert!(
        error
            .to_string()
            .contains("(disconnected); last connection error: events websocket"),
        "{error}"
    );
    emitter.close();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("task ends")
        .expect("no panic");
}

#[tokio::test]
async fn dropping_every_handle_ends_the_task() {
    let server = FakeEventsServer::start(|_| Script::serve()).await;
    let (emitter, task) =
        Emitter::spawn_with(config(server.api_url(), EventsAuth::Token(None)), tuning());
    emitter.emit(numbered(1)).await;
    drop(emitter);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("task ends")
        .expect("no panic");
    assert_eq!(server.connections()[0].events.len(), 1);
}

#[tokio::test]
async fn wss_against_a_plain_tcp_server_fails_without_panicking() {
    // Exercises the rustls client set-up (a missing crypto provider would panic here).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            drop(socket);
        }
    });
    let api_url = url::Url::parse(&format!("https://127.0.0.1:{port}/api")).unwrap();
    let (emitter, task) = Emitter::spawn_with(config(api_url, EventsAuth::Token(None)), tuning());
    emitter.emit(numbered(1)).await;
    eventually("a connection error", || emitter.last_error().is_some()).await;
    let error = emitter.last_error().unwrap();
    assert!(
        matches!(*error, ConnectError::Websocket { .. }),
        "{error:?}"
    );
    assert!(error.to_string().starts_with(&format!(
        "events websocket wss://127.0.0.1:{port}/api/events/in"
    )));
    assert!(!task.is_finished());
}

// ---- Durable outbox ----

/// A port nothing listens on (yet).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn api_url_on(port: u16) -> url::Url {
    url::Url::parse(&format!("http://127.0.0.1:{port}/api")).unwrap()
}

fn outbox_in(dir: &tempfile::TempDir) -> Outbox {
    Outbox::open(dir.path().join("home/cohort/events-outbox.redb")).expect("open outbox")
}

/// Kills the emitter without flush or close, as a crash would, and waits until the outbox
/// file is released.
async fn crash(emitter: Emitter, task: JoinHandle<()>) {
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    drop(emitter);
}

#[tokio::test]
async fn durable_events_emitted_while_the_server_is_down_are_delivered_when_it_comes_up() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (emitter, _task) = Emitter::spawn_durable(
        config(api_url_on(port), EventsAuth::Token(None)),
        tuning(),
        outbox_in(&dir),
    )
    .unwrap();
    let events: Vec<Event> = (0..5).map(numbered).collect();
    for event in &events {
        emitter.emit(event.clone()).await;
    }
    assert_eq!(
        emitter.outbox_depth(),
        Some(5),
        "committed before emit returned"
    );
    eventually("a failed connection attempt", || {
        emitter.last_error().is_some()
    })
    .await;

    let server = FakeEventsServer::start_on(port, |_| Script::serve()).await;
    emitter.flush(Duration::from_secs(5)).await.expect("flush");
    let received: Vec<String> = server
        .connections()
        .iter()
        .flat_map(|c| c.event_ids())
        .collect();
    assert_eq!(received, ids(&events));
    assert_eq!(emitter.outbox_depth(), Some(0));
}

#[tokio::test]
async fn durable_events_survive_a_crash_and_are_delivered_by_the_next_emitter_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let down = api_url_on(free_port());
    let (emitter, task) = Emitter::spawn_durable(
        config(down, EventsAuth::Token(None)),
        tuning(),
        outbox_in(&dir),
    )
    .unwrap();
    let before: Vec<Event> = (0..4).map(numbered).collect();
    for event in &before {
        emitter.emit(event.clone()).await;
    }
    crash(emitter, task).await;

    let outbox = outbox_in(&dir);
    assert_eq!(outbox.depth(), 4, "the crash lost nothing");
    let server = FakeEventsServer::start(|_| Script::serve()).await;
    let (emitter, _task) = Emitter::spawn_durable(
        config(server.api_url(), EventsAuth::Token(None)),
        tuning(),
        outbox,
    )
    .unwrap();
    assert_eq!(
        emitter.unconfirmed(),
        4,
        "the backlog counts as unconfirmed"
    );
    let after: Vec<Event> = (4..6).map(numbered).collect();
    for event in &after {
        emitter.emit(event.clone()).await;
    }
    emitter.flush(Duration::from_secs(5)).await.expect("flush");

    let mut all = before.clone();
    all.extend(after);
    let connections = server.connections();
    assert_eq!(connections.len(), 1);
    assert_eq!(
        connections[0].event_ids(),
        ids(&all),
        "backlog first, in order, then new events, and nothing else"
    );
    assert_eq!(
        connections[0].events[..4],
        before
            .iter()
            .map(|e| e.to_wire_json().unwrap())
            .collect::<Vec<_>>()[..],
        "stored frames are byte-identical"
    );
    assert_eq!(emitter.outbox_depth(), Some(0));
}

#[tokio::test]
async fn confirmed_events_are_deleted_from_the_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeEventsServer::start(|_| Script::serve()).await;
    let (emitter, task) = Emitter::spawn_durable(
        config(server.api_url(), EventsAuth::Token(None)),
        tuning(),
        outbox_in(&dir),
    )
    .unwrap();
    for n in 0..10 {
        emitter.emit(numbered(n)).await;
    }
    emitter.flush(Duration::from_secs(5)).await.expect("flush");
    assert_eq!(emitter.outbox_depth(), Some(0));
    let stats = emitter.outbox().unwrap().stats().unwrap();
    assert_eq!(
        stats,
        OutboxStats {
            depth: 0,
            oldest_age: None
        }
    );
    crash(emitter, task).await;

    // A new emitter has nothing to re-send.
    let (emitter, _task) = Emitter::spawn_durable(
        config(server.api_url(), EventsAuth::Token(None)),
        tuning(),
        outbox_in(&dir),
    )
    .unwrap();
    assert_eq!(emitter.unconfirmed(), 0);
    emitter.flush(Duration::from_secs(5)).await.expect("flush");
    let received: usize = server.connections().iter().map(|c| c.events.len()).sum();
    assert_eq!(received, 10);
}

#[tokio::test]
async fn a_pong_deletes_only_what_it_confirms() {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeEventsServer::start(|_| Script {
        auth: AuthAnswer::Success,
        after_auth: AfterAuth::Stall,
    })
    .await;
    let (emitter, _task) = Emitter::spawn_durable(
        config(server.api_url(), EventsAuth::Token(None)),
        tuning(),
        outbox_in(&dir),
    )
    .unwrap();
    emitter.emit(numbered(1)).await;
    emitter.emit(numbered(2)).await;
    assert!(emitter.flush(Duration::from_millis(300)).await.is_err());
    let stats = emitter.outbox().unwrap().stats().unwrap();
    assert_eq!(stats.depth, 2, "sent but unconfirmed events stay stored");
    assert!(stats.oldest_age.is_some());
}

#[tokio::test]
async fn the_outbox_bound_drops_the_oldest_events() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.redb");
    let options = OutboxOptions {
        max_events: 5,
        ..OutboxOptions::default()
    };
    let down = api_url_on(free_port());
    let (emitter, task) = Emitter::spawn_durable(
        config(down, EventsAuth::Token(None)),
        tuning(),
        Outbox::open_with(&path, options.clone()).unwrap(),
    )
    .unwrap();
    let events: Vec<Event> = (0..8).map(numbered).collect();
    for event in &events {
        emitter.emit(event.clone()).await;
    }
    assert_eq!(emitter.outbox_depth(), Some(5));
    eventually("the task forgets the dropped events", || {
        emitter.unconfirmed() == 5
    })
    .await;
    crash(emitter, task).await;

    let server = FakeEventsServer::start(|_| Script::serve()).await;
    let (emitter, _task) = Emitter::spawn_durable(
        config(server.api_url(), EventsAuth::Token(None)),
        tuning(),
        Outbox::open_with(&path, options).unwrap(),
    )
    .unwrap();
    emitter.flush(Duration::from_secs(5)).await.expect("flush");
    assert_eq!(server.connections()[0].event_ids(), ids(&events[3..]));
}

#[tokio::test]
async fn the_bound_also_applies_to_events_already_on_the_wire() {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeEventsServer::start(|n| match n {
        0 => Script {
            auth: AuthAnswer::Success,
            after_auth: AfterAuth::Stall,
        },
        _ => Script::serve(),
    })
    .await;
    let mut impatient = tuning();
    impatient.pong_timeout = Duration::from_millis(300);
    let options = OutboxOptions {
        max_events: 3,
        ..OutboxOptions::default()
    };
    let (emitter, _task) = Emitter::spawn_durable(
        config(server.api_url(), EventsAuth::Token(None)),
        impatient,
        Outbox::open_with(dir.path().join("o.redb"), options).unwrap(),
    )
    .unwrap();
    eventually("connected", || emitter.is_connected()).await;
    let events: Vec<Event> = (0..6).map(numbered).collect();
    for event in &events {
        emitter.emit(event.clone()).await;
    }
    emitter.flush(Duration::from_secs(5)).await.expect("flush");
    let connections = server.connections();
    assert_eq!(connections.last().unwrap().event_ids(), ids(&events[3..]));
    assert_eq!(
        (emitter.unconfirmed(), emitter.outbox_depth()),
        (0, Some(0))
    );
}

#[test]
fn an_unwritable_outbox_path_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();

    let error = Outbox::open(file.join("cohort/events-outbox.redb")).unwrap_err();
    assert!(matches!(error, OutboxError::CreateDir { .. }), "{error:?}");
    assert!(
        error.to_string().starts_with(&format!(
            "cannot create the directory for the event outbox {}/cohort/events-outbox.redb: ",
            file.display()
        )),
        "{error}"
    );

    // The path is a directory: redb cannot open it.
    let error = Outbox::open(dir.path()).unwrap_err();
    assert!(matches!(error, OutboxError::Open { .. }), "{error:?}");
    assert!(
        error.to_string().starts_with(&format!(
            "cannot open the event outbox {}: ",
            dir.path().display()
        )),
        "{error}"
    );

    // A file that is not a redb database.
    let error = Outbox::open(&file).unwrap_err();
    assert!(matches!(error, OutboxError::Open { .. }), "{error:?}");
}

#[test]
fn a_second_open_of_the_same_outbox_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.redb");
    let _first = Outbox::open(&path).unwrap();
    let error = Outbox::open(&path).unwrap_err();
    assert!(
        matches!(error, OutboxError::AlreadyOpen { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("already open"), "{error}");
}

#[test]
fn open_creates_parent_directories_and_the_default_path_is_under_prefect_home() {
    let dir = tempfile::tempdir().unwrap();
    let path = Outbox::default_path(&dir.path().join("prefect-home"));
    assert_eq!(
        path,
        dir.path().join("prefect-home/cohort/events-outbox.redb")
    );
    let outbox = Outbox::open(&path).unwrap();
    assert!(path.is_file());
    assert_eq!(outbox.depth(), 0);
}

/// Regression: every durable emit used to commit (with an `fsync`) on the calling runtime
/// thread while holding a std mutex, so two concurrent emits on the worker's 2-thread runtime
/// stalled it whole. With commits stalled (the test hook stands in for a slow disk), the
/// runtime must keep running other tasks, no emit may resolve before its event is on disk,
/// and the events must be stored and handed on in the order `emit` was called.
#[test]
fn concurrent_durable_emits_never_block_the_runtime_threads() {
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc as std_mpsc;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let down = api_url_on(free_port());
    let (emitter, _task) = {
        let _entered = runtime.enter();
        Emitter::spawn_durable(
            config(down, EventsAuth::Token(None)),
            tuning(),
            outbox_in(&dir),
        )
        .unwrap()
    };
    let outbox = emitter.outbox().unwrap().clone();
    let hold = outbox.hold_commits();

    let events: Vec<Event> = (0..16).map(numbered).collect();
    let (done_tx, done) = std_mpsc::channel();
    for (n, event) in events.iter().enumerate() {
        // Queued here, in this order; awaited concurrently on the runtime.
        let emitted = emitter.emit(event.clone());
        let done_tx = done_tx.clone();
        runtime.spawn(async move {
            emitted.await;
            let _ = done_tx.send(n);
        });
    }
    let ticks = Arc::new(AtomicUsize::new(0));
    let (ticked_tx, ticked) = std_mpsc::channel();
    runtime.spawn({
        let ticks = ticks.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(1)).await;
                if ticks.fetch_add(1, Ordering::Relaxed) == 50 {
                    let _ = ticked_tx.send(());
                }
            }
        }
    });
    // This thread is not one of the runtime's: it can wait even if both of those are stuck.
    ticked
        .recv_timeout(Duration::from_secs(60))
        .expect("another task kept running while commits were stalled");
    assert!(
        done.try_recv().is_err(),
        "no emit resolves before its event is committed"
    );
    assert_eq!(
        emitter.unconfirmed(),
        0,
        "nothing is sent before it is committed"
    );
    assert_eq!(outbox.depth(), 0);

    drop(hold);
    let mut resolved: Vec<usize> = (0..events.len())
        .map(|_| {
            done.recv_timeout(Duration::from_secs(60))
                .expect("every emit resolves")
        })
        .collect();
    resolved.sort_unstable();
    assert_eq!(resolved, (0..events.len()).collect::<Vec<_>>());
    assert_eq!(outbox.depth(), events.len());
    assert_eq!(emitter.unconfirmed(), events.len());
    let stored: Vec<String> = outbox
        .load()
        .unwrap()
        .iter()
        .map(|s| Outgoing::from_stored(&s.json).unwrap().id.to_string())
        .collect();
    assert_eq!(stored, ids(&events), "stored in the order emit was called");
    drop(emitter);
    drop(outbox);
    runtime.shutdown_background();
}

#[tokio::test]
async fn a_restarted_emitter_task_sends_everything_the_outbox_holds_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeEventsServer::start(|_| Script::serve()).await;
    let (emitter, task) = Emitter::spawn_durable(
        config(server.api_url(), EventsAuth::Token(None)),
        tuning(),
        outbox_in(&dir),
    )
    .unwrap();
    let events: Vec<Event> = (0..6).map(numbered).collect();
    for event in &events[..3] {
        emitter.emit(event.clone()).await;
    }
    // The task dies (as by a panic) with events unconfirmed; more are emitted meanwhile.
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    for event in &events[3..5] {
        emitter.emit(event.clone()).await;
    }
    assert_eq!(emitter.outbox_depth(), Some(5), "kept while no task runs");

    let run = emitter.restart().await.expect("restart from the outbox");
    let _task = tokio::spawn(run);
    assert_eq!(
        emitter.unconfirmed(),
        5,
        "the backlog counts as unconfirmed"
    );
    emitter.emit(events[5].clone()).await;
    emitter.flush(Duration::from_secs(5)).await.expect("flush");

    let connections = server.connections();
    let last = connections.last().expect("a connection");
    assert_eq!(
        last.event_ids(),
        ids(&events),
        "the new task sends the whole backlog, in order, once, then new events"
    );
    assert_eq!(emitter.outbox_depth(), Some(0));
    assert_eq!(emitter.unconfirmed(), 0);
}
