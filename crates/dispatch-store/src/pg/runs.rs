//! The SQL of run records on PostgreSQL: writes that keep `run_usage` (a running count and
//! size per function), the listing query, and retention's steps — the SQLite store's, in
//! PostgreSQL's dialect.

use dispatch_core::{CallbackState, Run};
use jiff::Timestamp;
use postgres::GenericClient;
use postgres::types::ToSql;

use super::Params;
use crate::{Result, Retention, RunFilter};

/// What run records take per namespace (from `run_usage`, no scan of the runs).
pub(super) const USAGE_PER_NAMESPACE: &str =
    "SELECT namespace, SUM(runs)::bigint, SUM(finished)::bigint, SUM(bytes)::bigint
     FROM run_usage GROUP BY namespace ORDER BY namespace";

/// What run records take per function.
pub(super) const USAGE_PER_FUNCTION: &str =
    "SELECT namespace, function, finished, bytes FROM run_usage
     WHERE runs > 0 ORDER BY namespace, function";

/// One step of retention inside `tx` (the caller commits): see
/// [`crate::RecordStore::prune_runs`].
pub(super) fn prune(tx: &mut impl GenericClient, rules: &Retention, batch: usize) -> Result<u64> {
    let mut left = batch as i64;
    let mut usage = Usage::default();
    // Age: ids are ULIDs, so "created before" is a range of the primary key.
    left -= usage.delete(
        tx,
        "DELETE FROM runs WHERE id IN (
               SELECT id FROM runs WHERE id < $1 AND finished_ms IS NOT NULL LIMIT $2)",
        &[&id_at(rules.created_before), &left],
    )? as i64;
    usage.apply(tx)?;
    // Count per function: run_usage says which functions are over (no scan of the runs).
    let least = rules
        .kept
        .values()
        .copied()
        .fold(rules.keep_per_function, usize::min);
    while left > 0 {
        let over = tx
            .query(
                "SELECT namespace, function, finished FROM run_usage WHERE finished > $1",
                &[&(least as i64)],
            )?
            .iter()
            .find_map(|r| {
                let (ns, function, finished): (String, String, i64) =
                    (r.get(0), r.get(1), r.get(2));
                let excess = finished - rules.keep_of(&ns, &function) as i64;
                (excess > 0).then_some((ns, function, excess))
            });
        let Some((ns, function, excess)) = over else {
            break;
        };
        let n = usage.delete(
            tx,
            "DELETE FROM runs WHERE id IN (
                   SELECT id FROM runs WHERE namespace = $1 AND function = $2
                     AND finished_ms IS NOT NULL ORDER BY id LIMIT $3)",
            &[&ns, &function, &excess.min(left)],
        )? as i64;
        usage.apply(tx)?;
        if n == 0 {
            break;
        }
        left -= n;
    }
    // Bytes per namespace: the oldest finished records until the namespace is under its
    // budget (its own, else the server's: `Retention::budget_of`).
    while left > 0 {
        let over = tx
            .query(
                "SELECT namespace, SUM(bytes)::bigint FROM run_usage GROUP BY namespace",
                &[],
            )?
            .iter()
            .find_map(|r| {
                let (ns, bytes): (String, i64) = (r.get(0), r.get(1));
                let budget = rules.budget_of(&ns)?.min(i64::MAX as u64) as i64;
                (bytes > budget).then(|| (ns, bytes - budget))
            });
        let Some((ns, mut excess)) = over else {
            break;
        };
        let oldest: Vec<(String, i64)> = tx
            .query(
                "SELECT id, bytes FROM runs WHERE namespace = $1
                   AND finished_ms IS NOT NULL ORDER BY id LIMIT $2",
                &[&ns, &left],
            )?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        if oldest.is_empty() {
            break;
        }
        for (id, bytes) in oldest {
            if excess <= 0 {
                break;
            }
            usage.delete(tx, "DELETE FROM runs WHERE id = $1", &[&id])?;
            excess -= bytes;
            left -= 1;
        }
        usage.apply(tx)?;
    }
    Ok((batch as i64 - left) as u64)
}

/// Inserts or replaces run records, keeping `run_usage` (the caller commits).
pub(super) fn write_runs(tx: &mut impl GenericClient, runs: &[Run]) -> Result<()> {
    if runs.is_empty() {
        return Ok(());
    }
    let mut usage = Usage::default();
    let old =
        tx.prepare("SELECT bytes, finished_ms IS NOT NULL FROM runs WHERE id = $1 FOR UPDATE")?;
    let insert = tx.prepare(
        "INSERT INTO runs
           (id, namespace, function, status, body, finished_ms, callback_pending, bytes)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, body = EXCLUDED.body,
           finished_ms = EXCLUDED.finished_ms,
           callback_pending = EXCLUDED.callback_pending, bytes = EXCLUDED.bytes",
    )?;
    for run in runs {
        let body = serde_json::to_string(run)?;
        let bytes = body.len() as i64;
        let finished = run.status.is_final() && run.finished_at.is_some();
        // Only an async run is written again (its next state); a sync run's record is
        // written once, so the look-up is skipped on the hot path.
        let before: Option<(i64, bool)> = if run.is_async {
            tx.query_opt(&old, &[&run.id])?
                .map(|r| (r.get(0), r.get(1)))
        } else {
            None
        };
        let (runs_d, fin_d, bytes_d) = match before {
            None => (1, finished as i64, bytes),
            Some((b, f)) => (0, finished as i64 - f as i64, bytes - b),
        };
        usage.add(&run.namespace, &run.function, runs_d, fin_d, bytes_d);
        let finished_ms = run
            .finished_at
            .filter(|_| run.status.is_final())
            .map(|t| t.as_millisecond());
        let callback = run.status.is_final()
            && run
                .callback
                .as_ref()
                .is_some_and(|c| c.state == CallbackState::Pending);
        tx.execute(
            &insert,
            &[
                &run.id,
                &run.namespace,
                &run.function,
                &run.status.as_str(),
                &body,
                &finished_ms,
                &callback,
                &bytes,
            ],
        )?;
    }
    usage.apply(tx)?;
    Ok(())
}

/// Changes to `run_usage` gathered over a transaction's writes and deletes, applied once per
/// function at its end (an upsert that adds: two servers' changes both count).
#[derive(Default)]
pub(super) struct Usage(std::collections::HashMap<(String, String), (i64, i64, i64)>);

impl Usage {
    fn add(&mut self, namespace: &str, function: &str, runs: i64, finished: i64, bytes: i64) {
        let e = self
            .0
            .entry((namespace.to_string(), function.to_string()))
            .or_default();
        e.0 += runs;
        e.1 += finished;
        e.2 += bytes;
    }

    /// Runs `sql` (a DELETE on runs) with a RETURNING clause that tells what went; returns
    /// how many rows.
    pub(super) fn delete(
        &mut self,
        tx: &mut impl GenericClient,
        sql: &str,
        params: &Params<'_>,
    ) -> Result<u64> {
        let rows = tx.query(
            &format!("{sql} RETURNING namespace, function, bytes, finished_ms IS NOT NULL"),
            params,
        )?;
        for r in &rows {
            let (ns, f): (&str, &str) = (r.get(0), r.get(1));
            let (bytes, finished): (i64, bool) = (r.get(2), r.get(3));
            self.add(ns, f, -1, -(finished as i64), -bytes);
        }
        Ok(rows.len() as u64)
    }

    pub(super) fn apply(&mut self, tx: &mut impl GenericClient) -> Result<()> {
        if self.0.is_empty() {
            return Ok(());
        }
        let up = tx.prepare(
            "INSERT INTO run_usage (namespace, function, runs, finished, bytes)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (namespace, function) DO UPDATE SET
               runs = run_usage.runs + EXCLUDED.runs,
               finished = run_usage.finished + EXCLUDED.finished,
               bytes = run_usage.bytes + EXCLUDED.bytes",
        )?;
        for ((ns, f), (runs, finished, bytes)) in self.0.drain() {
            tx.execute(&up, &[&ns, &f, &runs, &finished, &bytes])?;
        }
        tx.execute("DELETE FROM run_usage WHERE runs <= 0", &[])?;
        Ok(())
    }
}

/// The query of `list_runs`: newest first, with only the filters given. `after` and a time
/// window bound the ids: run ids are ULIDs, ordered by creation time.
pub(super) fn list_runs_sql(
    namespace: &str,
    filter: &RunFilter,
) -> (String, Vec<Box<dyn ToSql + Sync>>) {
    let mut sql = String::from("SELECT body FROM runs WHERE namespace = $1");
    let mut args: Vec<Box<dyn ToSql + Sync>> = vec![Box::new(namespace.to_string())];
    let mut and = |cond: &str, v: Box<dyn ToSql + Sync>| {
        args.push(v);
        sql.push_str(&format!(" AND {cond} ${}", args.len()));
    };
    if let Some(f) = &filter.function {
        and("function =", Box::new(f.clone()));
    }
    if let Some(st) = filter.status {
        and("status =", Box::new(st.as_str().to_string()));
    }
    let upper = match (&filter.after, filter.until.map(id_at)) {
        (Some(a), Some(u)) => Some(a.clone().min(u)),
        (a, u) => a.clone().or(u),
    };
    if let Some(u) = upper {
        and("id <", Box::new(u));
    }
    if let Some(l) = filter.since.map(id_at) {
        and("id >=", Box::new(l));
    }
    args.push(Box::new(filter.limit.unwrap_or(100) as i64));
    sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", args.len()));
    (sql, args)
}

/// The smallest run id (a ULID) created at `t`.
fn id_at(t: Timestamp) -> String {
    let ms = t.as_millisecond().max(0) as u64;
    ulid::Ulid::from_parts(ms, 0).to_string()
}
