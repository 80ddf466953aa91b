//! How a worker's state under `$PREFECT_HOME/cohort/` is named, and the take-over of what a
//! worker of the same name left in the layout of earlier releases.
//!
//! Prefect tells workers apart by work pool and name, and one host commonly runs a worker of
//! the same name (its hostname) on several pools. Every piece of a worker's state (event
//! outbox, claim journal, run status directory) is therefore keyed by [`worker_key`]: both
//! slugs, readable, plus a hash of the exact pair, since slugs are lossy (`My Pool` and
//! `my-pool` share one).
//!
//! Earlier releases keyed that state by the name alone ([`legacy_worker_key`]) and did not
//! record the pool. A worker of the new layout takes over such files, once the server is
//! reachable ([`take_over`]): each journaled claim whose flow run belongs to its pool (or no
//! longer exists) moves to its own journal, and claims of other pools stay where they are for
//! the worker of the same name on their pool to take. A shim that an earlier release started
//! keeps writing its status file in the old run status directory, so a claim taken over
//! records that file ([`crate::journal::Claim::status_file`]) rather than moving it. The old outbox's pending
//! events belong to no pool: the first worker to open it sends them (see `cohort worker
//! start`).

use std::collections::HashSet;
use std::path::PathBuf;

use cohort_events::slug::slugify;
use tokio::time::Duration;

use crate::journal::{Journal, JournalError};
use crate::submit::RunContext;

/// How long a worker waits for the old layout's journal while another process has it open (a
/// worker of the same name on another pool taking over its own claims takes a few requests).
const LEGACY_WAIT: Duration = Duration::from_secs(10);
const LEGACY_POLL: Duration = Duration::from_millis(250);

/// Longest slug kept in a file name (file names are limited to 255 bytes).
const SLUG_MAX: usize = 60;

/// The file stem of the state of worker `name` on work pool `pool`:
/// `worker-<pool slug>.<name slug>.<16 hex digits>`. Slugs hold no `.`, so the readable part
/// already parses one way; the hash (64-bit FNV-1a of both exact strings, length-prefixed) keeps
/// two pairs whose slugs agree apart.
pub fn worker_key(pool: &str, name: &str) -> String {
    let short = |s: &str| slugify(s).chars().take(SLUG_MAX).collect::<String>();
    format!(
        "worker-{}.{}.{:016x}",
        short(pool),
        short(name),
        pair_hash(pool, name)
    )
}

/// The file stem earlier releases used for worker `name`, whatever its pool.
pub fn legacy_worker_key(name: &str) -> String {
    format!("worker-{}", slugify(name))
}

/// FNV-1a (64-bit) over `len(pool) ‖ pool ‖ name`: stable across releases and platforms, which
/// `std`'s hasher does not promise.
fn pair_hash(pool: &str, name: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let len = (pool.len() as u64).to_le_bytes();
    len.iter()
        .chain(pool.as_bytes())
        .chain(name.as_bytes())
        .fold(OFFSET, |hash, byte| {
            (hash ^ u64::from(*byte)).wrapping_mul(PRIME)
        })
}

/// Where a worker of an earlier release, with the same name, kept its claims.
#[derive(Debug, Clone)]
pub struct LegacyState {
    /// `journal/worker-<name slug>.redb`.
    pub journal: PathBuf,
    /// `runs/worker-<name slug>/`: its shims' status files.
    pub runs: PathBuf,
}

/// Moves the claims of `legacy` that belong to this worker's pool into its own journal, before
/// recovery reads that journal. Claims of other pools, and claims whose run cannot be read now,
/// stay; the old files go once no claim is left in them.
pub(crate) async fn take_over(ctx: &RunContext, legacy: &LegacyState) {
    let Some(old) = open_legacy(legacy).await else {
        return;
    };
    let claims = match old.claims() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the claim journal of an earlier release; its runs are not taken over");
            return;
        }
    };
    // A claim already moved (a crash after copying it, before its removal here was durable)
    // keeps what this worker has recorded since.
    let own: HashSet<_> = ctx
        .journal
        .claims()
        .map(|c| c.into_iter().map(|c| c.flow_run_id).collect())
        .unwrap_or_default();
    let pool = ctx.pool.read().expect("pool lock poisoned").id;
    let (mut taken, mut left) = (0, 0);
    for mut claim in claims {
        let id = claim.flow_run_id;
        match ctx.api().read_flow_run(id).await {
            Ok(run) => match run.work_pool_id {
                Some(other) if other != pool => {
                    tracing::info!(flow_run = %id, work_pool = run.work_pool_name.as_deref().unwrap_or("?"), "leaving a claim of an earlier release to the worker of the same name on its own work pool");
                    left += 1;
                    continue;
                }
                _ => {}
            },
            // A run that no longer exists belongs to no pool; recovery forgets it (or waits
            // for its process, if one still runs).
            Err(e) if e.is_not_found() => {}
            Err(e) => {
                tracing::warn!(flow_run = %id, error = %e, "cannot tell which work pool a claim of an earlier release belongs to; it is kept for the next start");
                left += 1;
                continue;
            }
        }
        if !own.contains(&id) {
            let status = legacy.runs.join(format!("{id}.json"));
            if ctx.infra.adopt(id, Some(&status), None).await.is_some() {
                claim.status_file = Some(status);
            } else {
                // No started flow recorded there: recovery decides from the server alone.
                let _ = std::fs::remove_file(&status);
            }
            if let Err(e) = ctx.journal.record(&claim).await {
                tracing::error!(flow_run = %id, error = %e, "cannot take over a claim of an earlier release; it is kept for the next start");
                left += 1;
                continue;
            }
        }
        if let Err(e) = old.remove(id).await {
            tracing::warn!(flow_run = %id, error = %e, "cannot remove a claim taken over from the journal of an earlier release");
        }
        taken += 1;
    }
    if left == 0 {
        // Removed while it is still open (and locked): nobody opens it after this.
        if let Err(e) = std::fs::remove_file(old.path()) {
            tracing::warn!(path = %old.path().display(), error = %e, "cannot remove the claim journal of an earlier release");
        }
        // Only when empty: status files of runs taken over stay until their runs are told.
        let _ = std::fs::remove_dir(&legacy.runs);
    }
    tracing::info!(
        taken,
        left,
        path = %old.path().display(),
        "took over the claims of an earlier release's worker of the same name"
    );
}

/// The old journal, once no other process has it open; `None` when there is none (or it
/// stays busy: an earlier release's worker of the same name still running keeps its runs).
async fn open_legacy(legacy: &LegacyState) -> Option<Journal> {
    let deadline = tokio::time::Instant::now() + LEGACY_WAIT;
    loop {
        match Journal::open_existing(&legacy.journal) {
            Ok(None) => {
                // No claims left to take: an empty old status directory goes too.
                let _ = std::fs::remove_dir(&legacy.runs);
                return None;
            }
            Ok(Some(journal)) => return Some(journal),
            Err(JournalError::AlreadyOpen { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(LEGACY_POLL).await;
            }
            Err(e @ JournalError::AlreadyOpen { .. }) => {
                tracing::warn!(error = %e, "the claim journal of an earlier release stays in use (a worker of that release with the same name still running?); its runs are left to it, and taken over at a later start");
                return None;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot open the claim journal of an earlier release; its runs are not taken over");
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_tell_pool_and_name_apart() {
        let key = worker_key("My Pool", "host-1");
        assert!(key.starts_with("worker-my-pool.host-1."), "{key}");
        assert_eq!(key, worker_key("My Pool", "host-1"), "stable");
        // Same slugs, or the same characters split differently: other keys.
        assert_ne!(key, worker_key("my-pool", "host-1"));
        assert_ne!(worker_key("a-b", "c"), worker_key("a", "b-c"));
        assert_ne!(worker_key("ab", "c"), worker_key("a", "bc"));
        assert_ne!(worker_key("a", "w"), worker_key("b", "w"));
        // A fixed value: the key names files that must be found again after an upgrade.
        // Values computed apart from this code (FNV-1a 64 as published).
        assert_eq!(pair_hash("", ""), 0xa8c7_f832_281a_39c5);
        assert_eq!(pair_hash("pool", "w"), 0x3b3e_b44e_23f6_61b0);
        let long = "x".repeat(500);
        assert!(worker_key(&long, &long).len() < 200);
        assert_eq!(legacy_worker_key("Host 1"), "worker-host-1");
    }

    #[tokio::test]
    async fn a_missing_legacy_journal_is_not_created() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = LegacyState {
            journal: dir.path().join("journal").join("worker-w.redb"),
            runs: dir.path().join("runs").join("worker-w"),
        };
        std::fs::create_dir_all(&legacy.runs).unwrap();
        assert!(open_legacy(&legacy).await.is_none());
        assert!(!legacy.journal.exists());
        assert!(!legacy.runs.exists(), "an empty old status directory goes");
    }
}
