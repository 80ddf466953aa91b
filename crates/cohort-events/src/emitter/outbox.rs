//! The durable outbox: every event the emitter accepts is committed to a local
//! [redb](https://docs.rs/redb) database before [`Emitter::emit`](super::Emitter::emit)
//! returns, and deleted only once a websocket checkpoint (a pong) confirms that the server has
//! it. Events therefore survive a server outage of any length and a worker crash; after a
//! restart they are re-sent first, in order (the server de-duplicates by event id, so a
//! re-send is harmless).
//!
//! Layout: one table, `events`, keyed by a sequence number that only grows (so key order is
//! emit order), whose value is `(enqueued at, unix milliseconds; the event's wire JSON)`.
//!
//! Bound: at most [`OutboxOptions::max_events`] events (100,000 by default). Past it, the
//! OLDEST events are deleted to make room and an error is logged (the first drop at once,
//! then at most once per [`OutboxOptions::report_interval`] with a count): losing the oldest
//! events of a long outage is preferred to refusing what the worker is doing now. A warning is
//! logged when the depth reaches 10 % of the bound and again at every doubling (20 %, 40 %,
//! 80 %); while the outbox is non-empty the emitter logs its depth and the age of its oldest
//! event once per `report_interval`.
//!
//! Cost: each emit is one redb write transaction with immediate durability (`fsync`), so it
//! blocks the calling thread (an async runtime worker included) for as long as the disk takes
//! to sync: a median of 4 ms per emit on the development VM (1,000 emits, release build;
//! `durable_emit_cost` in the emitter tests measures it), far less on a local NVMe disk.
//! Emits from several handles are serialized. A worker emits a handful of events per flow
//! run, so this is a small price for "written before the worker acts on what it reports".
//! Each checkpoint's deletion is one more such commit, made by the emitter task.
//!
//! Memory: the emitter task also keeps every outbox event (its wire JSON) in memory, as the
//! in-memory emitter does, so a full default outbox costs roughly 100,000 × the event size
//! (1–2 KB for worker events). Lower `max_events` where that matters.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::time::Instant;

/// redb's page cache. Its default (1 GiB) keeps every page a commit writes until the cap, and
/// the outbox only appends at the end of one table and reads it back once at start-up: 256 KiB
/// holds the pages each commit touches and saves ~1 MiB of a worker's idle RSS.
const CACHE_BYTES: usize = 256 * 1024;

/// Sequence number → (enqueued at in unix milliseconds, wire JSON).
const EVENTS: TableDefinition<u64, (i64, &str)> = TableDefinition::new("events");

/// Why the outbox could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The directory that should hold the outbox could not be created.
    #[error("cannot create the directory for the event outbox {path}: {source}")]
    CreateDir {
        /// The outbox file.
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Another process (or another [`Outbox`] in this one) has the file open.
    #[error(
        "the event outbox {path} is already open (is another worker using the same \
         PREFECT_HOME?)"
    )]
    AlreadyOpen {
        /// The outbox file.
        path: PathBuf,
    },
    /// The file could not be created or opened (unwritable, not a database, …).
    #[error("cannot open the event outbox {path}: {source}")]
    Open {
        /// The outbox file.
        path: PathBuf,
        #[source]
        source: Box<redb::DatabaseError>,
    },
    /// Reading or writing the store failed (disk full, I/O error, …).
    #[error("event outbox {path}: {source}")]
    Store {
        /// The outbox file.
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
}

/// Bound and reporting of an [`Outbox`].
#[derive(Debug, Clone)]
pub struct OutboxOptions {
    /// Most events kept; past it the oldest are dropped (with an error log).
    pub max_events: usize,
    /// How often the depth and oldest age are logged while the outbox is non-empty, and the
    /// least interval between two "dropped events" errors.
    pub report_interval: Duration,
}

impl Default for OutboxOptions {
    fn default() -> Self {
        Self {
            max_events: 100_000,
            report_interval: Duration::from_secs(60),
        }
    }
}

/// Depth and age of the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxStats {
    /// Events stored (not yet confirmed by the server).
    pub depth: usize,
    /// How long ago the oldest stored event was enqueued; `None` when empty.
    pub oldest_age: Option<Duration>,
}

/// A durable, bounded event queue in one redb file; cheap to clone (clones share the
/// database). See the [module docs](self).
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("path", &self.inner.path)
            .field("depth", &self.depth())
            .finish()
    }
}

struct Inner {
    db: Database,
    path: PathBuf,
    options: OutboxOptions,
    /// Events stored, as of the latest commit.
    depth: AtomicUsize,
    /// Depth at which the next "outbox is growing" warning is logged.
    warn_at: AtomicUsize,
    /// Held across "assign a sequence number, commit, hand to the task" so the task sees
    /// events in key order even when several handles emit at once.
    append: Mutex<AppendState>,
}

struct AppendState {
    next_seq: u64,
    /// Drops not yet reported, and when the latest report was logged.
    unreported_drops: u64,
    last_drop_report: Option<Instant>,
}

/// One stored event, as loaded at start-up.
pub(super) struct Stored {
    pub seq: u64,
    pub json: String,
}

/// What [`Outbox::append`] did.
pub(super) struct Appended {
    pub seq: u64,
    /// The newest sequence number deleted to respect the bound, if any.
    pub dropped_through: Option<u64>,
}

impl Outbox {
    /// The conventional location under `PREFECT_HOME`: `<home>/cohort/events-outbox.redb`.
    pub fn default_path(prefect_home: &Path) -> PathBuf {
        prefect_home.join("cohort").join("events-outbox.redb")
    }

    /// Opens (or creates, parent directories included) the outbox at `path` with the default
    /// bound.
    pub fn open(path: impl AsRef<Path>) -> Result<Outbox, OutboxError> {
        Self::open_with(path, OutboxOptions::default())
    }

    /// Opens (or creates) the outbox at `path`.
    pub fn open_with(
        path: impl AsRef<Path>,
        options: OutboxOptions,
    ) -> Result<Outbox, OutboxError> {
        let path = path.as_ref().to_path_buf();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| OutboxError::CreateDir {
                path: path.clone(),
                source,
            })?;
        }
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|source| match source {
                redb::DatabaseError::DatabaseAlreadyOpen => {
                    OutboxError::AlreadyOpen { path: path.clone() }
                }
                source => OutboxError::Open {
                    path: path.clone(),
                    source: Box::new(source),
                },
            })?;
        let store = |source: redb::Error| OutboxError::Store {
            path: path.clone(),
            source: Box::new(source),
        };
        // Create the table now, so an unwritable file fails here rather than at the first emit.
        #[allow(clippy::result_large_err)] // redb's own error type; boxed in `OutboxError`
        let (depth, next_seq) = (|| -> Result<(usize, u64), redb::Error> {
            let txn = db.begin_write()?;
            let (depth, next_seq) = {
                let table = txn.open_table(EVENTS)?;
                let next_seq = table.last()?.map_or(0, |(key, _)| key.value() + 1);
                (
                    usize::try_from(table.len()?).unwrap_or(usize::MAX),
                    next_seq,
                )
            };
            txn.commit()?;
            Ok((depth, next_seq))
        })()
        .map_err(store)?;
        let options = OutboxOptions {
            max_events: options.max_events.max(1),
            ..options
        };
        let first_warning = first_warning(options.max_events);
        let warn_at = if depth >= first_warning {
            // Already large: say so once now, then at the next doubling.
            tracing::warn!(path = %path.display(), depth, max = options.max_events, "event outbox opened with a large backlog");
            next_warning(depth, first_warning)
        } else {
            first_warning
        };
        Ok(Outbox {
            inner: Arc::new(Inner {
                db,
                path,
                options,
                depth: AtomicUsize::new(depth),
                warn_at: AtomicUsize::new(warn_at),
                append: Mutex::new(AppendState {
                    next_seq,
                    unreported_drops: 0,
                    last_drop_report: None,
                }),
            }),
        })
    }

    /// Moves every event stored in the outbox file at `other` (one an earlier release named
    /// differently) into this one, oldest first and after this one's own, then deletes that
    /// file; returns how many moved. Call it before the emitter loads this outbox. `Ok(0)`
    /// when there is no such file; [`OutboxError::AlreadyOpen`] when another process has it
    /// open (and so sends its events itself). A crash between the commit here and the
    /// deletion there sends those events twice, which the server's de-duplication by event id
    /// absorbs.
    pub fn take_over(&self, other: &Path) -> Result<usize, OutboxError> {
        let opened = Database::builder().set_cache_size(CACHE_BYTES).open(other);
        let db = match opened {
            Ok(db) => db,
            Err(redb::DatabaseError::Storage(redb::StorageError::Io(e)))
                if e.kind() == std::io::ErrorKind::NotFound =>
            {
                return Ok(0)
            }
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(OutboxError::AlreadyOpen {
                    path: other.to_path_buf(),
                })
            }
            Err(source) => {
                return Err(OutboxError::Open {
                    path: other.to_path_buf(),
                    source: Box::new(source),
                })
            }
        };
        #[allow(clippy::result_large_err)] // redb's own error type; boxed in `OutboxError`
        let events = (|| -> Result<Vec<(i64, String)>, redb::Error> {
            let txn = db.begin_read()?;
            let table = match txn.open_table(EVENTS) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(e.into()),
            };
            let mut events = Vec::new();
            for row in table.iter()? {
                let (_, value) = row?;
                let (enqueued, json) = value.value();
                events.push((enqueued, json.to_owned()));
            }
            Ok(events)
        })()
        .map_err(|source| OutboxError::Store {
            path: other.to_path_buf(),
            source: Box::new(source),
        })?;
        if !events.is_empty() {
            let mut state = self.inner.append.lock().unwrap_or_else(|p| p.into_inner());
            let max = self.inner.options.max_events as u64;
            let first_seq = state.next_seq;
            #[allow(clippy::result_large_err)] // redb's own error type; boxed in `OutboxError`
            let depth = (|| -> Result<usize, redb::Error> {
                let txn = self.inner.db.begin_write()?;
                let depth = {
                    let mut table = txn.open_table(EVENTS)?;
                    for (i, (enqueued, json)) in events.iter().enumerate() {
                        table.insert(first_seq + i as u64, (*enqueued, json.as_str()))?;
                    }
                    // The bound holds here too: the oldest go first.
                    while table.len()? > max {
                        if table.pop_first()?.is_none() {
                            break;
                        }
                    }
                    usize::try_from(table.len()?).unwrap_or(usize::MAX)
                };
                txn.commit()?;
                Ok(depth)
            })()
            .map_err(|source| self.store_error(source))?;
            state.next_seq = first_seq + events.len() as u64;
            self.inner.depth.store(depth, Ordering::Relaxed);
        }
        // Deleted while still open (and locked), so no other process takes these events too.
        let _ = std::fs::remove_file(other);
        drop(db);
        Ok(events.len())
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The bound and reporting options in force.
    pub fn options(&self) -> &OutboxOptions {
        &self.inner.options
    }

    /// Events stored, as of the latest commit (no I/O).
    pub fn depth(&self) -> usize {
        self.inner.depth.load(Ordering::Relaxed)
    }

    /// Depth and age of the oldest event, read from the store.
    pub fn stats(&self) -> Result<OutboxStats, OutboxError> {
        #[allow(clippy::result_large_err)] // redb's own error type; boxed in `OutboxError`
        let result = (|| -> Result<OutboxStats, redb::Error> {
            let txn = self.inner.db.begin_read()?;
            let table = txn.open_table(EVENTS)?;
            let depth = usize::try_from(table.len()?).unwrap_or(usize::MAX);
            let oldest_age = table.first()?.map(|(_, value)| age_of(value.value().0));
            Ok(OutboxStats { depth, oldest_age })
        })();
        result.map_err(|source| self.store_error(source))
    }

    /// Every stored event, oldest first.
    pub(super) fn load(&self) -> Result<Vec<Stored>, OutboxError> {
        #[allow(clippy::result_large_err)] // redb's own error type; boxed in `OutboxError`
        let result = (|| -> Result<Vec<Stored>, redb::Error> {
            let txn = self.inner.db.begin_read()?;
            let table = txn.open_table(EVENTS)?;
            let mut stored = Vec::new();
            for row in table.iter()? {
                let (key, value) = row?;
                stored.push(Stored {
                    seq: key.value(),
                    json: value.value().1.to_owned(),
                });
            }
            Ok(stored)
        })();
        result.map_err(|source| self.store_error(source))
    }

    /// Assigns `json` the next sequence number, commits it durably (dropping the oldest
    /// events past the bound in the same transaction), then calls `enqueue` with the result
    /// while still holding the append lock, so callers hand events on in key order.
    ///
    /// When the commit fails, `enqueue` still gets the (reserved, unstored) sequence number,
    /// so the event can be delivered from memory, and the error is returned.
    pub(super) fn append(
        &self,
        json: &str,
        enqueue: impl FnOnce(Appended),
    ) -> Result<(), OutboxError> {
        let mut state = self.inner.append.lock().unwrap_or_else(|p| p.into_inner());
        let seq = state.next_seq;
        state.next_seq += 1;
        let max = self.inner.options.max_events;
        #[allow(clippy::result_large_err)] // redb's own error type; boxed in `OutboxError`
        let written = (|| -> Result<(usize, u64, Option<u64>), redb::Error> {
            let txn = self.inner.db.begin_write()?;
            let result = {
                let mut table = txn.open_table(EVENTS)?;
                table.insert(seq, (now_millis(), json))?;
                let mut dropped = 0;
                let mut dropped_through = None;
                while table.len()? > max as u64 {
                    match table.pop_first()? {
                        Some((key, _)) => {
                            dropped += 1;
                            dropped_through = Some(key.value());
                        }
                        None => break,
                    }
                }
                let depth = usize::try_from(table.len()?).unwrap_or(usize::MAX);
                (depth, dropped, dropped_through)
            };
            txn.commit()?;
            Ok(result)
        })();
        match written {
            Ok((depth, dropped, dropped_through)) => {
                self.inner.depth.store(depth, Ordering::Relaxed);
                enqueue(Appended {
                    seq,
                    dropped_through,
                });
                if dropped > 0 {
                    self.report_drops(&mut state, dropped);
                }
                drop(state);
                self.maybe_warn(depth);
                Ok(())
            }
            Err(source) => {
                enqueue(Appended {
                    seq,
                    dropped_through: None,
                });
                Err(self.store_error(source))
            }
        }
    }

    /// Deletes every event with a sequence number up to `through` (confirmed by the server);
    /// returns how many were deleted.
    pub(super) fn delete_through(&self, through: u64) -> Result<usize, OutboxError> {
        #[allow(clippy::result_large_err)] // redb's own error type; boxed in `OutboxError`
        let (deleted, depth) = (|| -> Result<(usize, usize), redb::Error> {
            let txn = self.inner.db.begin_write()?;
            let result = {
                let mut table = txn.open_table(EVENTS)?;
                let before = table.len()?;
                table.retain_in(..=through, |_, _| false)?;
                let after = table.len()?;
                (
                    usize::try_from(before - after).unwrap_or(usize::MAX),
                    usize::try_from(after).unwrap_or(usize::MAX),
                )
            };
            txn.commit()?;
            Ok(result)
        })()
        .map_err(|source| self.store_error(source))?;
        self.inner.depth.store(depth, Ordering::Relaxed);
        let first = first_warning(self.inner.options.max_events);
        if depth < first {
            self.inner.warn_at.store(first, Ordering::Relaxed);
        }
        Ok(deleted)
    }

    /// Logs depth and oldest age (info) if the outbox is non-empty.
    pub(super) fn log_report(&self) {
        match self.stats() {
            Ok(OutboxStats {
                depth,
                oldest_age: Some(age),
            }) => tracing::info!(
                path = %self.inner.path.display(),
                depth,
                max = self.inner.options.max_events,
                oldest_age = ?Duration::from_secs(age.as_secs()),
                "event outbox holds events not yet confirmed by the server"
            ),
            Ok(_) => {}
            Err(error) => tracing::error!(%error, "cannot read the event outbox's depth"),
        }
    }

    fn maybe_warn(&self, depth: usize) {
        let warn_at = self.inner.warn_at.load(Ordering::Relaxed);
        if depth < warn_at {
            return;
        }
        let next = next_warning(depth, warn_at);
        if self
            .inner
            .warn_at
            .compare_exchange(warn_at, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            let max = self.inner.options.max_events;
            let oldest_age = self
                .stats()
                .ok()
                .and_then(|s| s.oldest_age)
                .map(|age| Duration::from_secs(age.as_secs()));
            tracing::warn!(
                path = %self.inner.path.display(),
                depth,
                max,
                percent = depth.saturating_mul(100) / max,
                ?oldest_age,
                "event outbox is growing: events are not being confirmed by the server; \
                 past the bound the oldest are dropped"
            );
        }
    }

    fn report_drops(&self, state: &mut AppendState, dropped: u64) {
        state.unreported_drops += dropped;
        let now = Instant::now();
        let due = state
            .last_drop_report
            .is_none_or(|last| now.duration_since(last) >= self.inner.options.report_interval);
        if due {
            tracing::error!(
                path = %self.inner.path.display(),
                dropped = state.unreported_drops,
                max = self.inner.options.max_events,
                "event outbox is full: dropped the oldest unconfirmed event(s); they will never \
                 reach the server"
            );
            state.unreported_drops = 0;
            state.last_drop_report = Some(now);
        }
    }

    fn store_error(&self, source: redb::Error) -> OutboxError {
        OutboxError::Store {
            path: self.inner.path.clone(),
            source: Box::new(source),
        }
    }
}

/// 10 % of the bound (at least 1).
fn first_warning(max: usize) -> usize {
    (max / 10).max(1)
}

/// The first doubling of `from` above `depth`.
fn next_warning(depth: usize, from: usize) -> usize {
    let mut next = from.max(1);
    while next <= depth {
        next = next.saturating_mul(2);
        if next == usize::MAX {
            break;
        }
    }
    next
}

fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn age_of(enqueued_millis: i64) -> Duration {
    let millis = now_millis().saturating_sub(enqueued_millis);
    Duration::from_millis(u64::try_from(millis).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_over_moves_the_events_of_another_file_after_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let old_path = dir.path().join("old.redb");
        {
            let old = Outbox::open(&old_path).unwrap();
            old.append("{\"n\":1}", |_| ()).unwrap();
            old.append("{\"n\":2}", |_| ()).unwrap();
        }
        let outbox = Outbox::open(dir.path().join("new.redb")).unwrap();
        outbox.append("{\"n\":0}", |_| ()).unwrap();
        assert_eq!(outbox.take_over(&old_path).unwrap(), 2);
        assert!(!old_path.exists());
        let json: Vec<_> = outbox.load().unwrap().into_iter().map(|s| s.json).collect();
        assert_eq!(json, ["{\"n\":0}", "{\"n\":1}", "{\"n\":2}"]);
        assert_eq!(outbox.depth(), 3);
        let mut seq = 0;
        outbox.append("{\"n\":3}", |a| seq = a.seq).unwrap();
        assert_eq!(seq, 3, "appends continue after what was taken over");
        // Nothing there: nothing moves, nothing is created.
        assert_eq!(outbox.take_over(&old_path).unwrap(), 0);
        assert!(!old_path.exists());
    }

    #[test]
    fn take_over_leaves_a_file_another_opener_holds() {
        let dir = tempfile::tempdir().unwrap();
        let old_path = dir.path().join("old.redb");
        let old = Outbox::open(&old_path).unwrap();
        old.append("{}", |_| ()).unwrap();
        let outbox = Outbox::open(dir.path().join("new.redb")).unwrap();
        let err = outbox.take_over(&old_path).unwrap_err();
        assert!(matches!(err, OutboxError::AlreadyOpen { .. }), "{err}");
        assert!(old_path.exists());
        assert_eq!(outbox.depth(), 0);
    }

    #[test]
    fn warnings_start_at_ten_percent_and_double() {
        assert_eq!(first_warning(100_000), 10_000);
        assert_eq!(first_warning(5), 1);
        assert_eq!(next_warning(10_000, 10_000), 20_000);
        assert_eq!(next_warning(20_000, 20_000), 40_000);
        assert_eq!(next_warning(45_000, 10_000), 80_000);
    }

    #[test]
    fn warnings_rearm_once_the_outbox_drains() {
        let dir = tempfile::tempdir().unwrap();
        let options = OutboxOptions {
            max_events: 20,
            ..OutboxOptions::default()
        };
        let outbox = Outbox::open_with(dir.path().join("o.redb"), options).unwrap();
        let mut last = 0;
        for _ in 0..5 {
            outbox.append("{}", |appended| last = appended.seq).unwrap();
        }
        // 10 % of 20 is 2; warned at 2 and 4, next at 8.
        assert_eq!(outbox.inner.warn_at.load(Ordering::Relaxed), 8);
        assert_eq!(outbox.delete_through(last).unwrap(), 5);
        assert_eq!(outbox.depth(), 0);
        assert_eq!(outbox.inner.warn_at.load(Ordering::Relaxed), 2);
    }
}
