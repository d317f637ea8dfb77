//! The SQL of run records: writes that keep `run_usage` (a running count and size per
//! function), the listing query, and retention's steps.

use dispatch_core::{CallbackState, Run};
use rusqlite::{Connection, OptionalExtension, params};

use super::SqliteStore;
use super::chunks::{self, Scope};
use crate::{Result, Retention, RunFilter};

/// What run records take per namespace (from `run_usage`, no scan of the runs).
pub(super) const USAGE_PER_NAMESPACE: &str =
    "SELECT namespace, SUM(runs), SUM(finished), SUM(bytes) FROM run_usage
     GROUP BY namespace ORDER BY namespace";

/// What run records take per function.
pub(super) const USAGE_PER_FUNCTION: &str =
    "SELECT namespace, function, finished, bytes FROM run_usage
     WHERE runs > 0 ORDER BY namespace, function";

/// The rows of a usage query, each made by `row`.
pub(super) fn usage_rows<T>(
    conn: &Connection,
    sql: &str,
    row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Result<Vec<T>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map([], row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// A count column (never below zero).
pub(super) fn count(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<u64> {
    Ok(r.get::<_, i64>(i)?.max(0) as u64)
}

/// One step of retention inside `tx` (the caller commits): see [`crate::RecordStore::prune_runs`].
/// Each rule takes the oldest finished runs it applies to across rows and chunks
/// ([`chunks::oldest`]; ids are ULIDs, ordered by creation time), at most what is left of
/// the batch.
pub(super) fn prune(
    tx: &rusqlite::Transaction<'_>,
    rules: &Retention,
    batch: usize,
) -> Result<u64> {
    let mut left = batch;
    let mut usage = Usage::default();
    // Age: created before the bound.
    let bound = crate::shared::id_at(rules.created_before);
    let old = chunks::oldest(tx, &Scope::Before(&bound), left)?;
    let n = old.runs.len();
    left -= old.delete(tx, n, &mut usage)? as usize;
    usage.apply(tx)?;
    // Count per function: run_usage says which functions are over (no scan of the runs);
    // only functions past the smallest count in force are read.
    let least = rules
        .kept
        .values()
        .copied()
        .fold(rules.keep_per_function, usize::min);
    while left > 0 {
        let over = {
            let mut stmt = tx.prepare_cached(
                "SELECT namespace, function, finished FROM run_usage WHERE finished > ?1",
            )?;
            let mut rows = stmt.query(params![least as i64])?;
            let mut over = None;
            while let Some(r) = rows.next()? {
                let (ns, function, finished): (String, String, i64) =
                    (r.get(0)?, r.get(1)?, r.get(2)?);
                let excess = finished - rules.keep_of(&ns, &function) as i64;
                if excess > 0 {
                    over = Some((ns, function, excess as usize));
                    break;
                }
            }
            over
        };
        let Some((ns, function, excess)) = over else {
            break;
        };
        let old = chunks::oldest(tx, &Scope::Function(&ns, &function), excess.min(left))?;
        let n = old.runs.len();
        let n = old.delete(tx, n, &mut usage)? as usize;
        usage.apply(tx)?;
        if n == 0 {
            break;
        }
        left -= n;
    }
    // Bytes per namespace: the oldest finished records until the namespace is under its
    // budget (its own, else the server's: `Retention::budget_of`).
    while left > 0 {
        let over = {
            let mut stmt = tx
                .prepare_cached("SELECT namespace, SUM(bytes) FROM run_usage GROUP BY namespace")?;
            let usage = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            usage.into_iter().find_map(|(ns, bytes)| {
                let budget = rules.budget_of(&ns)?.min(i64::MAX as u64) as i64;
                (bytes > budget).then(|| (ns, bytes - budget))
            })
        };
        let Some((ns, mut excess)) = over else {
            break;
        };
        let old = chunks::oldest(tx, &Scope::Namespace(&ns), left)?;
        let mut n = 0;
        for v in &old.runs {
            if excess <= 0 {
                break;
            }
            excess -= v.bytes;
            n += 1;
        }
        if n == 0 {
            break;
        }
        left -= old.delete(tx, n, &mut usage)? as usize;
        usage.apply(tx)?;
    }
    Ok((batch - left) as u64)
}

/// Inserts or replaces run records, keeping `run_usage` (the caller commits).
pub(super) fn write_runs(tx: &rusqlite::Transaction<'_>, runs: &[Run]) -> Result<()> {
    let mut usage = Usage::default();
    let (chunked, rows): (Vec<&Run>, Vec<&Run>) = runs.iter().partition(|r| chunks::chunked(r));
    if !chunked.is_empty() {
        chunks::write(tx, &chunked, &mut usage)?;
    }
    if !rows.is_empty() {
        // The row a write replaces (an async run's next state), for the usage counts.
        let mut old =
            tx.prepare_cached("SELECT bytes, finished_ms IS NOT NULL FROM runs WHERE id = ?1")?;
        let mut stmt = tx.prepare_cached(
            "INSERT INTO runs
               (id, namespace, function, status, body, finished_ms, callback_pending, bytes)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (id) DO UPDATE SET status = excluded.status, body = excluded.body,
               finished_ms = excluded.finished_ms,
               callback_pending = excluded.callback_pending, bytes = excluded.bytes",
        )?;
        let mut json = Vec::new();
        for run in rows {
            json.clear();
            run.write_json(&mut json);
            let body = std::str::from_utf8(&json).expect("JSON is UTF-8");
            let bytes = body.len() as i64;
            let finished = run.status.is_final() && run.finished_at.is_some();
            // Only an async run is written again (its next state); a sync run's record
            // is written once, so the look-up is skipped on the hot path.
            let before: Option<(i64, bool)> = if run.is_async {
                old.query_row(params![run.id], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?
            } else {
                None
            };
            let (runs_d, fin_d, bytes_d) = match before {
                None => (1, finished as i64, bytes),
                Some((b, f)) => (0, finished as i64 - f as i64, bytes - b),
            };
            usage.add(&run.namespace, &run.function, runs_d, fin_d, bytes_d);
            stmt.execute(params![
                run.id,
                run.namespace,
                run.function,
                run.status.as_str(),
                body,
                run.finished_at
                    .filter(|_| run.status.is_final())
                    .map(|t| t.as_millisecond()),
                run.status.is_final()
                    && run
                        .callback
                        .as_ref()
                        .is_some_and(|c| c.state == CallbackState::Pending),
                bytes
            ])?;
        }
    }
    usage.apply(tx)?;
    Ok(())
}
/// Changes to `run_usage` gathered over a transaction's writes and deletes, applied once per
/// function at its end.
#[derive(Default)]
pub(super) struct Usage(std::collections::HashMap<(String, String), (i64, i64, i64)>);
impl Usage {
    pub(super) fn add(
        &mut self,
        namespace: &str,
        function: &str,
        runs: i64,
        finished: i64,
        bytes: i64,
    ) {
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
        tx: &Connection,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<u64> {
        let mut stmt = tx.prepare_cached(&format!(
            "{sql} RETURNING namespace, function, bytes, finished_ms IS NOT NULL"
        ))?;
        let mut rows = stmt.query(params)?;
        let mut n = 0;
        while let Some(r) = rows.next()? {
            let (ns, f): (String, String) = (r.get(0)?, r.get(1)?);
            let (bytes, finished): (i64, bool) = (r.get(2)?, r.get(3)?);
            self.add(&ns, &f, -1, -(finished as i64), -bytes);
            n += 1;
        }
        Ok(n)
    }

    pub(super) fn apply(&mut self, tx: &Connection) -> Result<()> {
        let mut up = tx.prepare_cached(
            "INSERT INTO run_usage VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (namespace, function) DO UPDATE SET runs = runs + excluded.runs,
               finished = finished + excluded.finished, bytes = bytes + excluded.bytes",
        )?;
        for ((ns, f), (runs, finished, bytes)) in self.0.drain() {
            up.execute(params![ns, f, runs, finished, bytes])?;
        }
        // Cached: this runs with every batch of records (a plain `execute` parsed it each time,
        // ~1 % of a server's CPU under a sustained load of recorded calls).
        tx.prepare_cached("DELETE FROM run_usage WHERE runs <= 0")?
            .execute([])?;
        Ok(())
    }
}
/// The query of `list_runs`: newest first, with only the filters given (an `?x IS NULL OR`
/// pattern would keep SQLite from using the indexes). `after` and a time window bound the
/// ids: run ids are ULIDs, ordered by creation time.
pub(super) fn list_runs_sql(
    namespace: &str,
    filter: &RunFilter,
) -> (String, Vec<rusqlite::types::Value>) {
    let (mut sql, mut args) = filtered_sql(
        "SELECT id, body FROM runs",
        namespace,
        filter,
        true,
        ["id <", "id >="],
    );
    args.push(rusqlite::types::Value::Integer(
        filter.limit.unwrap_or(100) as i64
    ));
    sql.push_str(&format!(" ORDER BY id DESC LIMIT ?{}", args.len()));
    (sql, args)
}

/// `select` of a namespace's runs `WHERE` the filter's function, status (`with_status`:
/// chunks hold one status) and id bounds hold: `bounds` are the conditions that take the
/// upper and the lower bound.
pub(super) fn filtered_sql(
    select: &str,
    namespace: &str,
    filter: &RunFilter,
    with_status: bool,
    bounds: [&str; 2],
) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value;
    let mut sql = format!("{select} WHERE namespace = ?1");
    let mut args = vec![Value::Text(namespace.to_string())];
    let mut and = |cond: &str, v: Value| {
        args.push(v);
        sql.push_str(&format!(" AND {cond} ?{}", args.len()));
    };
    if let Some(f) = &filter.function {
        and("function =", Value::Text(f.clone()));
    }
    if let Some(st) = filter.status.filter(|_| with_status) {
        and("status =", Value::Text(st.as_str().to_string()));
    }
    let (upper, lower) = crate::shared::id_bounds(filter);
    if let Some(u) = upper {
        and(bounds[0], Value::Text(u));
    }
    if let Some(l) = lower {
        and(bounds[1], Value::Text(l));
    }
    (sql, args)
}
impl SqliteStore {
    /// SQLite's plans for the prune's reads (by age, count, bytes: the rows', then the
    /// chunks'), one line per step each: the tests check that pruning never scans or sorts.
    pub fn prune_plans(&self) -> Result<Vec<String>> {
        [
            (chunks::ROWS_BEFORE, vec!["01K", "1"]),
            (chunks::ROWS_OF_FUNCTION, vec!["default", "f", "1"]),
            (chunks::ROWS_OF_NAMESPACE, vec!["default", "1"]),
            (chunks::CHUNKS_BEFORE, vec!["01K"]),
            (chunks::CHUNKS_OF_FUNCTION, vec!["default", "f"]),
            (chunks::CHUNKS_OF_NAMESPACE, vec!["default"]),
        ]
        .into_iter()
        .map(|(sql, args)| Ok(self.plan(sql, rusqlite::params_from_iter(args))?.join("; ")))
        .collect()
    }
    /// SQLite's plans for `list_runs` with `filter` (`EXPLAIN QUERY PLAN`, one line per
    /// step): the rows' query, then the chunks'. The tests check that listing never scans.
    pub fn list_runs_plan(&self, namespace: &str, filter: &RunFilter) -> Result<Vec<String>> {
        let (sql, args) = list_runs_sql(namespace, filter);
        let mut plan = self.plan(&sql, rusqlite::params_from_iter(args))?;
        if filter
            .status
            .is_none_or(|s| s == dispatch_core::RunStatus::Succeeded)
        {
            let (sql, args) = chunks::newest_sql(namespace, filter);
            plan.extend(self.plan(&sql, rusqlite::params_from_iter(args))?);
        }
        Ok(plan)
    }

    /// The chunks of sync calls' history, oldest first: (namespace, function, records);
    /// the tests check how the recorder batches.
    pub fn history_chunks(&self) -> Result<Vec<(String, String, u64)>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT namespace, function, runs FROM run_chunks ORDER BY seq")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, count(r, 2)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// `EXPLAIN QUERY PLAN` of `sql`, one line per step.
    fn plan(&self, sql: &str, params: impl rusqlite::Params) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
        let rows = stmt.query_map(params, |r| r.get::<_, String>(3))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}
