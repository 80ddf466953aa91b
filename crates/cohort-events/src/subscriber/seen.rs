//! The ids of events already delivered, remembered for a while so a resubscription's backfill
//! (and an emitter's re-send after its own reconnect) is not delivered twice: a set bounded in
//! both time and size (`PrefectEventSubscriber._seen_events`, a `TTLCache`).

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use tokio::time::Instant;
use uuid::Uuid;

/// Ids in the order first seen; each is forgotten `ttl` after that, or earlier when more than
/// `capacity` are remembered (oldest first).
#[derive(Debug)]
pub(super) struct SeenEvents {
    ttl: Duration,
    capacity: usize,
    ids: HashSet<Uuid>,
    order: VecDeque<(Instant, Uuid)>,
}

impl SeenEvents {
    pub(super) fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            ttl,
            capacity: capacity.max(1),
            ids: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    /// Remembers `id` as seen at `now`; false when it was already remembered (a duplicate).
    /// A duplicate does not renew the id's lifetime, as in a `TTLCache` lookup.
    pub(super) fn insert(&mut self, id: Uuid, now: Instant) -> bool {
        self.expire(now);
        if !self.ids.insert(id) {
            return false;
        }
        self.order.push_back((now, id));
        while self.order.len() > self.capacity {
            self.forget_oldest();
        }
        true
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.ids.len()
    }

    fn expire(&mut self, now: Instant) {
        while self
            .order
            .front()
            .is_some_and(|(seen_at, _)| now.saturating_duration_since(*seen_at) >= self.ttl)
        {
            self.forget_oldest();
        }
    }

    fn forget_oldest(&mut self) {
        if let Some((_, id)) = self.order.pop_front() {
            self.ids.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_refused_until_the_ttl_passes() {
        let start = Instant::now();
        let mut seen = SeenEvents::new(Duration::from_secs(60), 10);
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        assert!(seen.insert(a, start));
        assert!(!seen.insert(a, start + Duration::from_secs(30)));
        assert!(seen.insert(b, start + Duration::from_secs(30)));
        // `a` expires 60 s after it was first seen, however often it reappeared.
        assert!(seen.insert(a, start + Duration::from_secs(60)));
        assert!(!seen.insert(b, start + Duration::from_secs(89)));
        assert_eq!(seen.len(), 2);
    }

    #[test]
    fn the_oldest_ids_are_forgotten_beyond_capacity() {
        let now = Instant::now();
        let mut seen = SeenEvents::new(Duration::from_secs(3600), 3);
        let ids: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
        for id in &ids {
            assert!(seen.insert(*id, now));
        }
        assert_eq!(seen.len(), 3);
        assert!(!seen.insert(ids[3], now));
        assert!(!seen.insert(ids[1], now));
        assert!(seen.insert(ids[0], now), "the oldest was forgotten");
    }
}
