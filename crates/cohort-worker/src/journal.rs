//! The claim journal: which flow runs this worker has claimed and not yet reported, kept in a
//! [redb](https://docs.rs/redb) file under `$PREFECT_HOME` so a restarted worker can finish
//! what a killed one started.
//!
//! A claim is recorded (durably) before Pending is proposed, and the `submitted-flow-run`
//! event before it is emitted; the entry goes once the run's `executed-flow-run` event is in
//! the outbox. Whether the flow process was started is not journaled: its shim's status file
//! ([`cohort_process::shim`]) says so, written by the process that knows.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use cohort_events::Event;
use redb::{Database, Durability, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// redb's page cache for the journal.
const CACHE_BYTES: usize = 256 * 1024;

/// Flow run id (as `u128`) → [`Claim`] as JSON.
const CLAIMS: TableDefinition<u128, &[u8]> = TableDefinition::new("claims");

/// One claimed flow run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claim {
    pub flow_run_id: Uuid,
    pub claimed_at: DateTime<Utc>,
    /// The `submitted-flow-run` event, once decided: a resumed submission sends this very
    /// event again (the server keeps one per id), and `executed-flow-run` follows it and
    /// carries its related resources.
    pub submitted: Option<Event>,
    /// The temporary working directory made for the run, removed when the run is told.
    #[serde(default)]
    pub temp_dir: Option<PathBuf>,
    /// Its shim's status file when that is not in this worker's own run status directory: a
    /// claim taken over from the layout of earlier releases, whose shim (still running, perhaps)
    /// records where it was told to (see [`crate::state`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_file: Option<PathBuf>,
}

impl Claim {
    /// A claim of `flow_run_id` made now.
    pub fn new(flow_run_id: Uuid) -> Self {
        Self {
            flow_run_id,
            claimed_at: Utc::now(),
            submitted: None,
            temp_dir: None,
            status_file: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot create the directory of the claim journal {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the claim journal {path} is in use by another process (a worker with the same pool, name and PREFECT_HOME?)")]
    AlreadyOpen { path: PathBuf },
    #[error("cannot open the claim journal {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<redb::DatabaseError>,
    },
    #[error("cannot write the claim journal {path} (disk full or read-only?)")]
    Store {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("a claim journal task failed: {0}")]
    Task(String),
}

/// The journal of one worker; cheap to clone.
#[derive(Clone)]
pub struct Journal {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    path: PathBuf,
    /// Whether the last write succeeded (readiness).
    healthy: AtomicBool,
    /// Claims not made because they could not be recorded (reported by the health probes).
    refused: AtomicU64,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.inner.path)
            .finish()
    }
}

impl Journal {
    /// Opens (or creates, with its directory) the journal at `path`, failing now rather than
    /// at the first claim when it cannot be written.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, JournalError> {
        let path = path.as_ref().to_path_buf();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| JournalError::CreateDir {
                path: path.clone(),
                source,
            })?;
        }
        let db = Self::builder()
            .create(&path)
            .map_err(|source| Self::open_error(&path, source))?;
        Self::with_db(db, path)
    }

    /// Opens the journal at `path` if there is one (never creating it): `Ok(None)` when the
    /// file does not exist.
    pub fn open_existing(path: impl AsRef<Path>) -> Result<Option<Self>, JournalError> {
        let path = path.as_ref().to_path_buf();
        match Self::builder().open(&path) {
            Ok(db) => Self::with_db(db, path).map(Some),
            Err(redb::DatabaseError::Storage(redb::StorageError::Io(e)))
                if e.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(None)
            }
            Err(source) => Err(Self::open_error(&path, source)),
        }
    }

    /// A small page cache: the journal holds a few claims at a time (redb's default cache
    /// would cost the idle worker half a MiB).
    fn builder() -> redb::Builder {
        let mut builder = redb::Builder::new();
        builder.set_cache_size(CACHE_BYTES);
        builder
    }

    fn open_error(path: &Path, source: redb::DatabaseError) -> JournalError {
        match source {
            redb::DatabaseError::DatabaseAlreadyOpen => JournalError::AlreadyOpen {
                path: path.to_path_buf(),
            },
            source => JournalError::Open {
                path: path.to_path_buf(),
                source: Box::new(source),
            },
        }
    }

    #[allow(clippy::result_large_err)] // redb's own error type in the closure; boxed after
    fn with_db(db: Database, path: PathBuf) -> Result<Self, JournalError> {
        let journal = Self {
            inner: Arc::new(Inner {
                db,
                path,
                healthy: AtomicBool::new(true),
                refused: AtomicU64::new(0),
            }),
        };
        journal.write(Durability::Immediate, |_| Ok(()))?;
        Ok(journal)
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Whether the last write succeeded: claims can be journaled.
    pub fn is_healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::Relaxed)
    }

    /// Counts a claim not made because [`Journal::record`] failed for it.
    pub fn refused_claim(&self) {
        self.inner.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Claims not made since start because they could not be recorded.
    pub fn claims_refused(&self) -> u64 {
        self.inner.refused.load(Ordering::Relaxed)
    }

    /// Every claim not yet reported, oldest first.
    pub fn claims(&self) -> Result<Vec<Claim>, JournalError> {
        #[allow(clippy::result_large_err)] // redb's own error type; boxed in `JournalError`
        let read = (|| -> Result<Vec<Claim>, redb::Error> {
            let txn = self.inner.db.begin_read()?;
            let table = txn.open_table(CLAIMS)?;
            let mut claims = Vec::new();
            for entry in table.iter()? {
                let (key, value) = entry?;
                match serde_json::from_slice::<Claim>(value.value()) {
                    Ok(claim) => claims.push(claim),
                    Err(e) => tracing::warn!(
                        flow_run = %Uuid::from_u128(key.value()),
                        error = %e,
                        "unreadable claim journal entry; ignoring it"
                    ),
                }
            }
            Ok(claims)
        })();
        let mut claims = read.map_err(|e| self.store_error(e))?;
        claims.sort_by_key(|c| c.claimed_at);
        Ok(claims)
    }

    /// Records `claim` (a claim about to be made, or what a claimed run has decided since);
    /// durable when this returns.
    #[allow(clippy::result_large_err)] // redb's own error type in the closure; boxed after
    pub async fn record(&self, claim: &Claim) -> Result<(), JournalError> {
        let journal = self.clone();
        let key = claim.flow_run_id.as_u128();
        let bytes = serde_json::to_vec(claim).expect("a claim serializes");
        blocking(move || {
            journal.write(Durability::Immediate, |table| {
                table.insert(key, bytes.as_slice())?;
                Ok(())
            })
        })
        .await
    }

    /// Forgets a run whose story is told (or that was never ours). Not fsynced: a removal lost
    /// to a crash costs a check of the run's state at the next start, nothing more.
    #[allow(clippy::result_large_err)] // redb's own error type in the closure; boxed after
    pub async fn remove(&self, flow_run_id: Uuid) -> Result<(), JournalError> {
        let journal = self.clone();
        blocking(move || {
            journal.write(Durability::Eventual, |table| {
                table.remove(flow_run_id.as_u128())?;
                Ok(())
            })
        })
        .await
    }

    fn write(
        &self,
        durability: Durability,
        change: impl FnOnce(&mut redb::Table<u128, &[u8]>) -> Result<(), redb::Error>,
    ) -> Result<(), JournalError> {
        #[allow(clippy::result_large_err)] // redb's own error type; boxed in `JournalError`
        let written = (|| -> Result<(), redb::Error> {
            let mut txn = self.inner.db.begin_write()?;
            txn.set_durability(durability);
            {
                let mut table = txn.open_table(CLAIMS)?;
                change(&mut table)?;
            }
            txn.commit()?;
            Ok(())
        })();
        self.inner.healthy.store(written.is_ok(), Ordering::Relaxed);
        written.map_err(|e| self.store_error(e))
    }

    fn store_error(&self, source: redb::Error) -> JournalError {
        JournalError::Store {
            path: self.inner.path.clone(),
            source: Box::new(source),
        }
    }
}

/// Runs a journal write off the async threads (each is an fsync).
async fn blocking<F>(f: F) -> Result<(), JournalError>
where
    F: FnOnce() -> Result<(), JournalError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| JournalError::Task(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_events::Resource;

    #[tokio::test]
    async fn claims_survive_reopening_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j").join("worker-a.redb");
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let submitted = Event::new(
            "prefect.worker.submitted-flow-run",
            Resource::new("prefect.worker.process.a"),
            vec![],
        );
        {
            let journal = Journal::open(&path).unwrap();
            let mut claim = Claim::new(a);
            journal.record(&claim).await.unwrap();
            journal.record(&Claim::new(b)).await.unwrap();
            claim.submitted = Some(submitted.clone());
            claim.temp_dir = Some("/tmp/x".into());
            journal.record(&claim).await.unwrap();
            journal.remove(b).await.unwrap();
        }
        let journal = Journal::open(&path).unwrap();
        let claims = journal.claims().unwrap();
        assert_eq!(claims.len(), 1);
        assert_eq!(claims[0].flow_run_id, a);
        assert_eq!(claims[0].submitted.as_ref(), Some(&submitted));
        assert_eq!(claims[0].temp_dir, Some(PathBuf::from("/tmp/x")));
        journal.remove(a).await.unwrap();
        assert!(journal.claims().unwrap().is_empty());
    }

    #[test]
    fn a_second_opener_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker-a.redb");
        let _first = Journal::open(&path).unwrap();
        let err = Journal::open(&path).unwrap_err();
        assert!(matches!(err, JournalError::AlreadyOpen { .. }), "{err}");
        let err = Journal::open_existing(&path).unwrap_err();
        assert!(matches!(err, JournalError::AlreadyOpen { .. }), "{err}");
    }

    #[test]
    fn open_existing_never_creates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker-a.redb");
        assert!(Journal::open_existing(&path).unwrap().is_none());
        assert!(!path.exists());
        drop(Journal::open(&path).unwrap());
        assert!(Journal::open_existing(&path).unwrap().is_some());
    }

    #[test]
    fn claims_of_earlier_releases_read_without_a_status_file() {
        // An entry as releases before `status_file` wrote it.
        let json = r#"{"flow_run_id":"6f1c2b1e-8f4e-4c2a-9d57-0a8d1f3e2b10","claimed_at":"2026-01-01T00:00:00Z","submitted":null,"temp_dir":"/tmp/x"}"#;
        let claim: Claim = serde_json::from_str(json).unwrap();
        assert_eq!(claim.status_file, None);
        assert_eq!(claim.temp_dir, Some(PathBuf::from("/tmp/x")));
        let written = serde_json::to_string(&claim).unwrap();
        assert!(!written.contains("status_file"), "{written}");
    }
}
