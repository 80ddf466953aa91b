//! The seam between event producers (worker, runner) and the transport: [`EventSink`], and
//! [`RecordingSink`], a test double that keeps what it is given.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};

use crate::event::Event;

/// What [`EventSink::emit`] returns: resolves once the sink holds the event as safely as it
/// promises (a durable [`Emitter`](crate::Emitter): committed to its outbox, by another
/// thread, so awaiting it never blocks a runtime thread).
pub type Emitted = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Where events go. `emit` takes the event at once; its future never waits on the network,
/// only, for a durable sink, on the disk. Await it before acting on the event's being kept
/// (e.g. forgetting a claim once its `executed-flow-run` is in the outbox).
pub trait EventSink: Send + Sync + 'static {
    /// Hands over one event; delivery (and its failures) is the sink's business.
    fn emit(&self, event: Event) -> Emitted;
}

/// Test double: records every event, in order, and sends nothing.
#[derive(Debug, Default)]
pub struct RecordingSink {
    events: Mutex<Vec<Event>>,
}

impl RecordingSink {
    /// An empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of everything emitted so far.
    pub fn events(&self) -> Vec<Event> {
        self.lock().clone()
    }

    /// Everything emitted so far, leaving the recorder empty.
    pub fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.lock())
    }

    /// The names of the events emitted so far, in order.
    pub fn names(&self) -> Vec<String> {
        self.lock().iter().map(|e| e.event.clone()).collect()
    }

    /// Emitted events with this name, in order.
    pub fn named(&self, name: &str) -> Vec<Event> {
        self.lock()
            .iter()
            .filter(|e| e.event == name)
            .cloned()
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Event>> {
        // A panicking test thread must not hide the events from the assertion that follows.
        self.events
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl EventSink for RecordingSink {
    fn emit(&self, event: Event) -> Emitted {
        self.lock().push(event);
        Box::pin(std::future::ready(()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::event::Resource;

    #[tokio::test]
    async fn recording_sink_keeps_events_in_order_behind_the_trait() {
        let recorder = Arc::new(RecordingSink::new());
        let sink: Arc<dyn EventSink> = recorder.clone();
        sink.emit(Event::new("a", Resource::new("r"), vec![])).await;
        sink.emit(Event::new("b", Resource::new("r"), vec![])).await;
        sink.emit(Event::new("a", Resource::new("r2"), vec![]))
            .await;
        assert_eq!(recorder.names(), ["a", "b", "a"]);
        assert_eq!(recorder.named("a").len(), 2);
        assert_eq!(recorder.events().len(), 3);
        assert_eq!(recorder.take().len(), 3);
        assert!(recorder.events().is_empty());
    }
}
