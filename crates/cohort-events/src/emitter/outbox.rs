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
//! Cost: commits are made by the outbox's own writer thread, never on an async runtime
//! thread: an emit queues its event there and its future resolves once the commit (a redb
//! write transaction with immediate durability, so an `fsync`) is done; the event reaches the
//! emitter task only then, in emit order. Whatever is queued while a commit runs goes into the
//! next one, so a burst of emits costs one `fsync` per commit rather than one per event, and
//! a slow disk delays the emitting tasks but never the runtime
//! (`concurrent_durable_emits_never_block_the_runtime_threads` in the emitter tests). A worker
//! emits a handful of events per flow run, so this is a small price for "written before the
//! worker acts on what it reports". Each checkpoint's deletion is one more commit on the same
//! thread.
//!
//! Memory: the emitter task also keeps every outbox event (its wire JSON) in memory, as the
//! in-memory emitter does, so a full default outbox costs roughly 100,000 × the event size
//! (1–2 KB for worker events). Lower `max_events` where that matters.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Duration;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::oneshot;
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
        source: Arc<redb::Error>,
    },
    /// The writer thread could not be started.
    #[error("cannot start the writer thread of the event outbox {path}: {source}")]
    Writer {
        /// The outbox file.
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The writer thread is gone (it panicked: a bug); nothing more can be stored.
    #[error("the writer thread of the event outbox {path} has stopped")]
    WriterStopped {
        /// The outbox file.
        path: PathBuf,
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
/// database and its writer thread). See the [module docs](self).
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("path", &self.inner.store.path)
            .field("depth", &self.depth())
            .finish()
    }
}

/// The handle side: the store, for reads, and the writer thread's queue.
struct Inner {
    store: Arc<Store>,
    /// `None` only while dropping.
    writes: Option<std_mpsc::Sender<Write>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Inner {
    /// Closes the queue and waits for the writer to finish what it was given, so the file is
    /// released (and can be opened again) once the last handle is gone.
    fn drop(&mut self) {
        self.writes = None;
        if let Some(writer) = self.writer.take() {
            // Never the writer itself (a request must not own an `Outbox`, but be sure).
            if writer.thread().id() != std::thread::current().id() {
                let _ = writer.join();
            }
        }
    }
}

/// What both sides share.
struct Store {
    db: Database,
    path: PathBuf,
    options: OutboxOptions,
    /// Events stored, as of the latest commit.
    depth: AtomicUsize,
    /// Depth at which the next "outbox is growing" warning is logged.
    warn_at: AtomicUsize,
    /// Test hook: the writer takes this lock around each commit, so a test holding it
    /// stalls commits the way a slow disk does.
    #[cfg(test)]
    hold_commits: std::sync::Mutex<()>,
}

/// One request to the writer thread.
enum Write {
    Append {
        json: String,
        /// Called with the event's key once it is committed (or the commit failed), in key
        /// order: it hands the event to the emitter task.
        enqueue: Enqueue,
        done: oneshot::Sender<Result<(), OutboxError>>,
    },
    Delete {
        through: u64,
        done: oneshot::Sender<Result<usize, OutboxError>>,
    },
    /// Stores events taken over from another outbox file (`enqueued` millis, JSON), after
    /// everything queued earlier; they are not handed on (the emitter loads them).
    Import {
        events: Vec<(i64, String)>,
        done: oneshot::Sender<Result<usize, OutboxError>>,
    },
    /// Runs `before` once everything queued earlier is committed and handed on, then reads
    /// every stored event, before anything queued later is committed.
    Reload {
        before: Box<dyn FnOnce() + Send>,
        done: oneshot::Sender<Result<Vec<Stored>, OutboxError>>,
    },
}

/// Hands a committed event on (to the emitter task).
pub(super) type Enqueue = Box<dyn FnOnce(Appended) + Send>;

/// The writer thread's own state.
struct Writer {
    store: Arc<Store>,
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

/// Most requests one commit takes (a burst of emits shares one `fsync`).
const MAX_BATCH: usize = 512;

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

    /// Opens (or creates) the outbox at `path`, and starts its writer thread.
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
            source: Arc::new(source),
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
        let store = Arc::new(Store {
            db,
            path,
            options,
            depth: AtomicUsize::new(depth),
            warn_at: AtomicUsize::new(warn_at),
            #[cfg(test)]
            hold_commits: std::sync::Mutex::new(()),
        });
        let (writes, queue) = std_mpsc::channel();
        let writer = Writer {
            store: store.clone(),
            next_seq,
            unreported_drops: 0,
            last_drop_report: None,
        };
        let writer = std::thread::Builder::new()
            .name("cohort-outbox".to_owned())
            .spawn(move || writer.run(queue))
            .map_err(|source| OutboxError::Writer {
                path: store.path.clone(),
                source,
            })?;
        Ok(Outbox {
            inner: Arc::new(Inner {
                store,
                writes: Some(writes),
                writer: Some(writer),
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
    pub async fn take_over(&self, other: &Path) -> Result<usize, OutboxError> {
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
            source: Arc::new(source),
        })?;
        let moved = events.len();
        if moved > 0 {
            // Committed by the writer, after this outbox's own events and before any later.
            let (done, imported) = oneshot::channel();
            self.send(Write::Import { events, done });
            imported.await.unwrap_or(Err(OutboxError::WriterStopped {
                path: self.inner.store.path.clone(),
            }))?;
        }
        // Deleted while still open (and locked), so no other process takes these events too.
        let _ = std::fs::remove_file(other);
        drop(db);
        Ok(moved)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.store.path
    }

    /// The bound and reporting options in force.
    pub fn options(&self) -> &OutboxOptions {
        &self.inner.store.options
    }

    /// Events stored, as of the latest commit (no I/O).
    pub fn depth(&self) -> usize {
        self.inner.store.depth.load(Ordering::Relaxed)
    }

    /// Depth and age of the oldest event, read from the store.
    pub fn stats(&self) -> Result<OutboxStats, OutboxError> {
        self.inner.store.stats()
    }

    /// Every stored event, oldest first.
    pub(super) fn load(&self) -> Result<Vec<Stored>, OutboxError> {
        self.inner.store.load()
    }

    /// Calls `before` on the writer thread once every append queued earlier is committed and
    /// handed on, then resolves to every stored event; appends queued later are committed
    /// after. So a new emitter task that takes over the hand-on channel in `before` gets each
    /// event exactly once: in the backlog, or handed on.
    pub(super) fn reload(
        &self,
        before: Box<dyn FnOnce() + Send>,
    ) -> impl Future<Output = Result<Vec<Stored>, OutboxError>> + Send + 'static {
        let (done, loaded) = oneshot::channel();
        self.send(Write::Reload { before, done });
        let path = self.inner.store.path.clone();
        async move {
            loaded
                .await
                .unwrap_or(Err(OutboxError::WriterStopped { path }))
        }
    }

    /// Queues `json` for the writer thread now, and returns a future that resolves once it is
    /// committed durably. The writer assigns the next sequence number, commits (dropping the
    /// oldest events past the bound in the same transaction), then calls `enqueue` with the
    /// result; the writer is alone, so `enqueue` calls come in key order, and the call to
    /// `append` fixes the order. The commit happens whether or not the future is awaited.
    ///
    /// When the commit fails, `enqueue` still gets the (reserved, unstored) sequence number,
    /// so the event can be delivered from memory, and the future returns the error.
    pub(super) fn append(
        &self,
        json: String,
        enqueue: Enqueue,
    ) -> impl Future<Output = Result<(), OutboxError>> + Send + 'static {
        let (done, committed) = oneshot::channel();
        self.send(Write::Append {
            json,
            enqueue,
            done,
        });
        let path = self.inner.store.path.clone();
        async move {
            committed
                .await
                .unwrap_or(Err(OutboxError::WriterStopped { path }))
        }
    }

    /// Deletes every event with a sequence number up to `through` (confirmed by the server)
    /// on the writer thread; resolves to how many were deleted. The writer logs a failure.
    pub(super) fn delete_through(
        &self,
        through: u64,
    ) -> impl Future<Output = Result<usize, OutboxError>> + Send + 'static {
        let (done, deleted) = oneshot::channel();
        self.send(Write::Delete { through, done });
        let path = self.inner.store.path.clone();
        async move {
            deleted
                .await
                .unwrap_or(Err(OutboxError::WriterStopped { path }))
        }
    }

    /// Logs depth and oldest age (info) if the outbox is non-empty.
    pub(super) fn log_report(&self) {
        let store = &self.inner.store;
        match store.stats() {
            Ok(OutboxStats {
                depth,
                oldest_age: Some(age),
            }) => tracing::info!(
                path = %store.path.display(),
                depth,
                max = store.options.max_events,
                oldest_age = ?Duration::from_secs(age.as_secs()),
                "event outbox holds events not yet confirmed by the server"
            ),
            Ok(_) => {}
            Err(error) => tracing::error!(%error, "cannot read the event outbox's depth"),
        }
    }

    /// Stalls every commit until the guard is dropped (a slow disk, for tests).
    #[cfg(test)]
    pub(super) fn hold_commits(&self) -> std::sync::MutexGuard<'_, ()> {
        self.inner.store.hold_commits.lock().unwrap()
    }

    fn send(&self, write: Write) {
        let sent = match &self.inner.writes {
            Some(writes) => writes.send(write).map_err(|e| e.0),
            None => Err(write),
        };
        // Only a panicked writer thread (a bug) gets here; the request's reply channel is
        // dropped with it, so the caller sees `WriterStopped`.
        if sent.is_err() {
            tracing::error!(path = %self.inner.store.path.display(), "the event outbox's writer thread has stopped");
        }
    }
}

impl Store {
    fn load(&self) -> Result<Vec<Stored>, OutboxError> {
        #[allow(clippy::result_large_err)] // redb's own error type; boxed in `OutboxError`
        let result = (|| -> Result<Vec<Stored>, redb::Error> {
            let txn = self.db.begin_read()?;
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

    fn stats(&self) -> Result<OutboxStats, OutboxError> {
        #[allow(clippy::result_large_err)] // redb's own error type; boxed in `OutboxError`
        let result = (|| -> Result<OutboxStats, redb::Error> {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(EVENTS)?;
            let depth = usize::try_from(table.len()?).unwrap_or(usize::MAX);
            let oldest_age = table.first()?.map(|(_, value)| age_of(value.value().0));
            Ok(OutboxStats { depth, oldest_age })
        })();
        result.map_err(|source| self.store_error(source))
    }

    fn store_error(&self, source: redb::Error) -> OutboxError {
        OutboxError::Store {
            path: self.path.clone(),
            source: Arc::new(source),
        }
    }
}

/// What one request turned into inside a batch's transaction.
enum Done {
    Appended {
        appended: Appended,
        enqueue: Enqueue,
        done: oneshot::Sender<Result<(), OutboxError>>,
    },
    Deleted {
        deleted: usize,
        done: oneshot::Sender<Result<usize, OutboxError>>,
    },
}

impl Writer {
    /// Serves requests until every [`Outbox`] handle is gone: whatever is queued when a commit
    /// ends goes into the next one, so a burst of emits costs one `fsync`, not one each, and
    /// no async runtime thread ever waits for the disk.
    fn run(mut self, queue: std_mpsc::Receiver<Write>) {
        while let Ok(first) = queue.recv() {
            let mut batch = Vec::new();
            let mut next = Some(first);
            while let Some(write) = next.take() {
                match write {
                    Write::Reload { before, done } => {
                        self.commit(std::mem::take(&mut batch));
                        before();
                        let _ = done.send(self.store.load());
                    }
                    Write::Import { events, done } => {
                        self.commit(std::mem::take(&mut batch));
                        let _ = done.send(self.import(&events));
                    }
                    write => batch.push(write),
                }
                if batch.len() < MAX_BATCH {
                    next = queue.try_recv().ok();
                }
            }
            self.commit(batch);
        }
    }

    /// Stores `events` after the newest, keeping the bound (the oldest go first).
    fn import(&mut self, events: &[(i64, String)]) -> Result<usize, OutboxError> {
        let store = self.store.clone();
        let max = store.options.max_events as u64;
        let first_seq = self.next_seq;
        #[allow(clippy::result_large_err)] // redb's own error type; boxed in `OutboxError`
        let depth = (|| -> Result<usize, redb::Error> {
            let txn = store.db.begin_write()?;
            let depth = {
                let mut table = txn.open_table(EVENTS)?;
                for (i, (enqueued, json)) in events.iter().enumerate() {
                    table.insert(first_seq + i as u64, (*enqueued, json.as_str()))?;
                }
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
        .map_err(|source| OutboxError::Store {
            path: store.path.clone(),
            source: Arc::new(source),
        })?;
        self.next_seq = first_seq + events.len() as u64;
        store.depth.store(depth, Ordering::Relaxed);
        Ok(events.len())
    }

    fn commit(&mut self, batch: Vec<Write>) {
        if batch.is_empty() {
            return;
        }
        let store = self.store.clone();
        let max = store.options.max_events as u64;
        let mut done = Vec::with_capacity(batch.len());
        let mut dropped = 0u64;
        #[cfg(test)]
        let _held = store.hold_commits.lock().unwrap_or_else(|p| p.into_inner());
        #[allow(clippy::result_large_err)] // redb's own error type; boxed in `OutboxError`
        let written = (|| -> Result<usize, redb::Error> {
            let txn = store.db.begin_write()?;
            let depth = {
                let mut table = txn.open_table(EVENTS)?;
                for write in batch {
                    match write {
                        Write::Append {
                            json,
                            enqueue,
                            done: reply,
                        } => {
                            let seq = self.next_seq;
                            self.next_seq += 1;
                            // Reserved before the insert, so a failed batch still hands each
                            // event on with its own key.
                            done.push(Done::Appended {
                                appended: Appended {
                                    seq,
                                    dropped_through: None,
                                },
                                enqueue,
                                done: reply,
                            });
                            table.insert(seq, (now_millis(), json.as_str()))?;
                            let mut dropped_through = None;
                            while table.len()? > max {
                                match table.pop_first()? {
                                    Some((key, _)) => {
                                        dropped += 1;
                                        dropped_through = Some(key.value());
                                    }
                                    None => break,
                                }
                            }
                            if let Some(Done::Appended { appended, .. }) = done.last_mut() {
                                appended.dropped_through = dropped_through;
                            }
                        }
                        Write::Reload { .. } | Write::Import { .. } => {
                            unreachable!("run() takes reloads and imports out")
                        }
                        Write::Delete {
                            through,
                            done: reply,
                        } => {
                            let before = table.len()?;
                            table.retain_in(..=through, |_, _| false)?;
                            let deleted = before - table.len()?;
                            done.push(Done::Deleted {
                                deleted: usize::try_from(deleted).unwrap_or(usize::MAX),
                                done: reply,
                            });
                        }
                    }
                }
                usize::try_from(table.len()?).unwrap_or(usize::MAX)
            };
            txn.commit()?;
            Ok(depth)
        })();
        match written {
            Ok(depth) => {
                store.depth.store(depth, Ordering::Relaxed);
                let first = first_warning(store.options.max_events);
                if depth < first {
                    store.warn_at.store(first, Ordering::Relaxed);
                }
                self.maybe_warn(depth);
                for done in done {
                    match done {
                        Done::Appended {
                            appended,
                            enqueue,
                            done,
                        } => {
                            enqueue(appended);
                            let _ = done.send(Ok(()));
                        }
                        Done::Deleted { deleted, done } => {
                            let _ = done.send(Ok(deleted));
                        }
                    }
                }
                if dropped > 0 {
                    self.report_drops(dropped);
                }
            }
            Err(source) => {
                let source = Arc::new(source);
                let error = || OutboxError::Store {
                    path: store.path.clone(),
                    source: source.clone(),
                };
                for done in done {
                    match done {
                        Done::Appended {
                            mut appended,
                            enqueue,
                            done,
                        } => {
                            appended.dropped_through = None;
                            enqueue(appended);
                            let _ = done.send(Err(error()));
                        }
                        Done::Deleted { done, .. } => {
                            // These events are re-sent after the next start, which the
                            // server's de-duplication makes harmless.
                            let error = error();
                            tracing::error!(%error, "could not delete confirmed events from the outbox; they will be re-sent after a restart");
                            let _ = done.send(Err(error));
                        }
                    }
                }
            }
        }
    }

    fn maybe_warn(&self, depth: usize) {
        let store = &self.store;
        let warn_at = store.warn_at.load(Ordering::Relaxed);
        if depth < warn_at {
            return;
        }
        store
            .warn_at
            .store(next_warning(depth, warn_at), Ordering::Relaxed);
        let max = store.options.max_events;
        let oldest_age = store
            .stats()
            .ok()
            .and_then(|s| s.oldest_age)
            .map(|age| Duration::from_secs(age.as_secs()));
        tracing::warn!(
            path = %store.path.display(),
            depth,
            max,
            percent = depth.saturating_mul(100) / max,
            ?oldest_age,
            "event outbox is growing: events are not being confirmed by the server; \
             past the bound the oldest are dropped"
        );
    }

    fn report_drops(&mut self, dropped: u64) {
        self.unreported_drops += dropped;
        let now = Instant::now();
        let due = self
            .last_drop_report
            .is_none_or(|last| now.duration_since(last) >= self.store.options.report_interval);
        if due {
            tracing::error!(
                path = %self.store.path.display(),
                dropped = self.unreported_drops,
                max = self.store.options.max_events,
                "event outbox is full: dropped the oldest unconfirmed event(s); they will never \
                 reach the server"
            );
            self.unreported_drops = 0;
            self.last_drop_report = Some(now);
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

    async fn append(outbox: &Outbox, json: &str) -> u64 {
        let (seq, appended) = oneshot::channel();
        let enqueue: Enqueue = Box::new(move |a: Appended| {
            let _ = seq.send(a.seq);
        });
        outbox.append(json.to_owned(), enqueue).await.unwrap();
        appended.await.unwrap()
    }

    #[tokio::test]
    async fn take_over_moves_the_events_of_another_file_after_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let old_path = dir.path().join("old.redb");
        {
            let old = Outbox::open(&old_path).unwrap();
            append(&old, "{\"n\":1}").await;
            append(&old, "{\"n\":2}").await;
        }
        let outbox = Outbox::open(dir.path().join("new.redb")).unwrap();
        append(&outbox, "{\"n\":0}").await;
        assert_eq!(outbox.take_over(&old_path).await.unwrap(), 2);
        assert!(!old_path.exists());
        let json: Vec<_> = outbox.load().unwrap().into_iter().map(|s| s.json).collect();
        assert_eq!(json, ["{\"n\":0}", "{\"n\":1}", "{\"n\":2}"]);
        assert_eq!(outbox.depth(), 3);
        assert_eq!(
            append(&outbox, "{\"n\":3}").await,
            3,
            "appends continue after what was taken over"
        );
        // Nothing there: nothing moves, nothing is created.
        assert_eq!(outbox.take_over(&old_path).await.unwrap(), 0);
        assert!(!old_path.exists());
    }

    #[tokio::test]
    async fn take_over_leaves_a_file_another_opener_holds() {
        let dir = tempfile::tempdir().unwrap();
        let old_path = dir.path().join("old.redb");
        let old = Outbox::open(&old_path).unwrap();
        append(&old, "{}").await;
        let outbox = Outbox::open(dir.path().join("new.redb")).unwrap();
        let err = outbox.take_over(&old_path).await.unwrap_err();
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

    #[tokio::test]
    async fn warnings_rearm_once_the_outbox_drains() {
        let dir = tempfile::tempdir().unwrap();
        let options = OutboxOptions {
            max_events: 20,
            ..OutboxOptions::default()
        };
        let outbox = Outbox::open_with(dir.path().join("o.redb"), options).unwrap();
        let (seqs, mut appended) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..5 {
            let seqs = seqs.clone();
            let enqueue: Enqueue = Box::new(move |a: Appended| seqs.send(a.seq).unwrap());
            outbox.append("{}".to_owned(), enqueue).await.unwrap();
        }
        let mut last = 0;
        for expected in 0..5 {
            last = appended.recv().await.unwrap();
            assert_eq!(last, expected, "handed on in key order");
        }
        // 10 % of 20 is 2; warned at 2 and 4, next at 8.
        assert_eq!(outbox.inner.store.warn_at.load(Ordering::Relaxed), 8);
        assert_eq!(outbox.delete_through(last).await.unwrap(), 5);
        assert_eq!(outbox.depth(), 0);
        assert_eq!(outbox.inner.store.warn_at.load(Ordering::Relaxed), 2);
    }
}
