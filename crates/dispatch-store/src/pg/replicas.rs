//! Several active servers on one database: each holds a lease (a row of `replicas` whose
//! `lease_until` it pushes forward, by the database's clock) and owns the async runs and job
//! executions it accepted (their `owner`). A server whose lease ended has its work taken over
//! by one other server (its row locked `FOR UPDATE SKIP LOCKED`, deleted, and its active
//! records given the taker as owner, in one transaction). One server at a time is elected,
//! for work only one may do, by holding an advisory lock on a connection of its own: the lock
//! goes with the connection when that server dies. Source archives and the settings every
//! server must agree on are kept here too.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dispatch_core::{JobExecution, Run};

use super::listen::{self, Listener};
use super::{PgStore, bodies};
use crate::{Result, Shared, TakeOver, Taken};

/// The advisory lock the elected server holds ("dispatch" in ASCII, plus one: not the
/// migration's).
const ELECTION_LOCK: i64 = 0x6469_7370_6174_6369;

/// Whose active records a server takes (`$1`: the taker, `$2`: the servers whose lease it
/// took): see [`TakeOver`].
fn whose(how: TakeOver) -> &'static str {
    match how {
        TakeOver::Expired => "owner = ANY($2)",
        TakeOver::Orphans => {
            "(owner = ANY($2) OR owner IS NULL
              OR NOT EXISTS (SELECT 1 FROM replicas p WHERE p.id = owner))"
        }
        TakeOver::Start => {
            "(owner = ANY($2) OR owner IS NULL OR owner = $1
              OR NOT EXISTS (SELECT 1 FROM replicas p WHERE p.id = owner))"
        }
    }
}

impl PgStore {
    pub(super) fn lease_for(&self, replica: &str, ttl: Duration, join: bool) -> Result<bool> {
        let ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let sql = if join {
            "INSERT INTO replicas (id, lease_until)
             VALUES ($1, now() + $2 * interval '1 millisecond')
             ON CONFLICT (id) DO UPDATE SET lease_until = EXCLUDED.lease_until"
        } else {
            // No row: another server took this one's work over (its lease had ended).
            "UPDATE replicas SET lease_until = now() + $2 * interval '1 millisecond'
             WHERE id = $1"
        };
        Ok(self.conn()?.execute(sql, &[&replica, &(ms as f64)])? == 1)
    }

    pub(super) fn leave_now(&self, replica: &str) -> Result<()> {
        self.conn()?.execute(
            "UPDATE replicas SET lease_until = '-infinity' WHERE id = $1",
            &[&replica],
        )?;
        Ok(())
    }

    pub(super) fn take(&self, replica: &str, how: TakeOver) -> Result<Taken> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        let dead: Vec<String> = tx
            .query(
                "SELECT id FROM replicas WHERE lease_until < now() AND id <> $1
                 FOR UPDATE SKIP LOCKED",
                &[&replica],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if dead.is_empty() && how == TakeOver::Expired {
            return Ok(Taken::default());
        }
        tx.execute("DELETE FROM replicas WHERE id = ANY($1)", &[&dead])?;
        let whose = whose(how);
        let mut runs: Vec<Run> = bodies(
            &mut tx,
            &format!(
                "UPDATE runs SET owner = $1,
                   body = jsonb_set(body::jsonb, '{{replica}}', to_jsonb($1::text))::text
                 WHERE (status IN ('QUEUED', 'RUNNING') OR callback_pending) AND {whose}
                 RETURNING body"
            ),
            &[&replica, &dead],
        )?;
        let mut jobs: Vec<JobExecution> = bodies(
            &mut tx,
            &format!(
                "UPDATE job_executions SET owner = $1,
                   body = jsonb_set(body::jsonb, '{{replica}}', to_jsonb($1::text))::text
                 WHERE phase IN ('Waiting', 'Active') AND {whose}
                 RETURNING body"
            ),
            &[&replica, &dead],
        )?;
        tx.commit()?;
        if !dead.is_empty() {
            tracing::info!(
                servers = ?dead,
                runs = runs.len(),
                jobs = jobs.len(),
                "took over the work of servers whose lease ended"
            );
        }
        runs.sort_by(|a, b| a.id.cmp(&b.id));
        jobs.sort_by(|a, b| a.uuid.cmp(&b.uuid));
        let (callbacks, runs) = runs.into_iter().partition(|r| r.status.is_final());
        Ok(Taken {
            runs,
            callbacks,
            jobs,
        })
    }

    pub(super) fn cancel_elsewhere(&self, namespace: &str, id: &str) -> Result<()> {
        let mut c = self.conn()?;
        c.execute(
            "UPDATE runs SET cancel_requested = TRUE WHERE namespace = $1 AND id = $2",
            &[&namespace, &id],
        )?;
        let told = listen::shared(
            &self.listener.origin,
            Shared::Cancel {
                namespace: namespace.to_string(),
                id: id.to_string(),
            },
        );
        listen::notify(&mut *c, &told)
    }

    pub(super) fn cancels_for(&self, replica: &str) -> Result<Vec<(String, String)>> {
        Ok(self
            .conn()?
            .query(
                "SELECT namespace, id FROM runs WHERE owner = $1 AND cancel_requested
                   AND status IN ('QUEUED', 'RUNNING')",
                &[&replica],
            )?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }

    pub(super) fn put_blob_row(&self, digest: &str, data: &[u8]) -> Result<()> {
        self.conn()?.execute(
            "INSERT INTO blobs (digest, data) VALUES ($1, $2)
             ON CONFLICT (digest) DO UPDATE SET stored = now()",
            &[&digest, &data],
        )?;
        Ok(())
    }

    pub(super) fn get_blob_row(&self, digest: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .conn()?
            .query_opt("SELECT data FROM blobs WHERE digest = $1", &[&digest])?
            .map(|r| r.get(0)))
    }

    pub(super) fn list_blob_rows(&self, before: jiff::Timestamp) -> Result<Vec<String>> {
        let before = before.as_millisecond() as f64 / 1000.0;
        Ok(self
            .conn()?
            .query(
                "SELECT digest FROM blobs WHERE stored < to_timestamp($1) ORDER BY digest",
                &[&before],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    pub(super) fn delete_blob_row(&self, digest: &str) -> Result<()> {
        self.conn()?
            .execute("DELETE FROM blobs WHERE digest = $1", &[&digest])?;
        Ok(())
    }

    pub(super) fn agree_on(&self, name: &str, value: &str) -> Result<String> {
        let mut c = self.conn()?;
        c.execute(
            "INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
            &[&name, &value],
        )?;
        Ok(
            c.query_one("SELECT value FROM settings WHERE name = $1", &[&name])?
                .get(0),
        )
    }

    /// Starts the election (a thread with a connection of its own); `f` hears its outcome.
    pub(super) fn start_election(&self, f: Box<dyn Fn(bool) + Send + Sync>) {
        let me = self.listener.clone();
        let _ = std::thread::Builder::new()
            .name("postgres-elect".into())
            .spawn(move || elect(&me, f));
    }
}

/// Tries for the lock every second; once held, checks the connection every second (the lock
/// is held as long as it lives). A lost connection loses the lead, and the lock with it.
fn elect(listener: &Arc<Listener>, f: Box<dyn Fn(bool) + Send + Sync>) {
    let mut leading = false;
    let tick = Duration::from_secs(1);
    while !listener.stop.load(Ordering::Acquire) {
        let mut client = match listener.connect() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("the election's connection to the database (retrying): {e}");
                std::thread::sleep(tick);
                continue;
            }
        };
        loop {
            if listener.stop.load(Ordering::Acquire) {
                if leading {
                    f(false);
                }
                return;
            }
            let res = if leading {
                client.execute("SELECT 1", &[]).map(|_| true)
            } else {
                client
                    .query_one("SELECT pg_try_advisory_lock($1)", &[&ELECTION_LOCK])
                    .map(|r| r.get::<_, bool>(0))
            };
            match res {
                Ok(now) => {
                    if now != leading {
                        leading = now;
                        f(now);
                    }
                }
                Err(e) => {
                    tracing::warn!("the election's connection to the database ended: {e}");
                    if leading {
                        leading = false;
                        f(false);
                    }
                    break;
                }
            }
            std::thread::sleep(tick);
        }
    }
}
