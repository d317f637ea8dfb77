//! The SQL of run records on PostgreSQL: writes that keep `run_usage` (a running count and
//! size per function), the listing query, and retention's steps — the SQLite store's, in
//! PostgreSQL's dialect.

use dispatch_core::{CallbackState, Run};
use postgres::GenericClient;
use postgres::types::{ToSql, Type};

use super::Params;
use crate::{Result, Retention, RunFilter};

/// `run_usage` with the changes not folded into it yet (see [`fold_usage`]).
const USAGE: &str = "(SELECT namespace, function, runs, finished, bytes FROM run_usage
      UNION ALL SELECT namespace, function, runs, finished, bytes FROM run_usage_delta) u";

/// What run records take per namespace (from `run_usage`, no scan of the runs).
pub(super) fn usage_per_namespace() -> String {
    format!(
        "SELECT namespace, SUM(runs)::bigint AS runs, SUM(finished)::bigint, SUM(bytes)::bigint
         FROM {USAGE} GROUP BY namespace HAVING SUM(runs) > 0 ORDER BY namespace"
    )
}

/// What run records take per function.
pub(super) fn usage_per_function() -> String {
    format!(
        "SELECT namespace, function, SUM(finished)::bigint, SUM(bytes)::bigint FROM {USAGE}
         GROUP BY namespace, function HAVING SUM(runs) > 0 ORDER BY namespace, function"
    )
}

/// Folds the changes written since the last fold into `run_usage` (at the start of each prune
/// step; readers add up both tables, so nothing needs it to be folded). Writers add a row to `run_usage_delta` instead of updating their function's
/// row of `run_usage`: that row would be locked by every enqueue of the function until its
/// commit, and concurrent enqueues would wait for each other's commits.
pub(super) fn fold_usage(tx: &mut impl GenericClient) -> Result<()> {
    tx.execute(
        "WITH d AS (DELETE FROM run_usage_delta
                    RETURNING namespace, function, runs, finished, bytes)
         INSERT INTO run_usage (namespace, function, runs, finished, bytes)
         SELECT namespace, function, SUM(runs)::bigint, SUM(finished)::bigint, SUM(bytes)::bigint
         FROM d GROUP BY namespace, function
         ON CONFLICT (namespace, function) DO UPDATE SET
           runs = run_usage.runs + EXCLUDED.runs,
           finished = run_usage.finished + EXCLUDED.finished,
           bytes = run_usage.bytes + EXCLUDED.bytes",
        &[],
    )?;
    tx.execute("DELETE FROM run_usage WHERE runs <= 0", &[])?;
    Ok(())
}

/// One step of retention inside `tx` (the caller commits): see
/// [`crate::RecordStore::prune_runs`].
pub(super) fn prune(tx: &mut impl GenericClient, rules: &Retention, batch: usize) -> Result<u64> {
    let mut left = batch as i64;
    let mut usage = Usage::default();
    fold_usage(tx)?;
    // Age: ids are ULIDs, so "created before" is a range of the primary key.
    left -= usage.delete(
        tx,
        "DELETE FROM runs WHERE id IN (
               SELECT id FROM runs WHERE id < $1 AND finished_ms IS NOT NULL LIMIT $2)",
        &[&crate::shared::id_at(rules.created_before), &left],
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
                &format!(
                    "SELECT namespace, function, SUM(finished)::bigint FROM {USAGE}
                     GROUP BY namespace, function HAVING SUM(finished) > $1::bigint"
                ),
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
                &format!("SELECT namespace, SUM(bytes)::bigint FROM {USAGE} GROUP BY namespace"),
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

/// The two statements that write runs (prepared once on the [`Writer`]'s connection: parsing
/// and planning them took most of an enqueue's time in the database).
const INSERT_RUNS: &str =
    "WITH v AS (SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[],
        $5::text[], $6::int8[], $7::bool[], $8::int8[], $9::text[])
      AS v(id, namespace, function, status, body, finished_ms, callback_pending, bytes, owner)),
 ins AS (INSERT INTO runs (id, namespace, function, status, body, finished_ms,
        callback_pending, bytes, owner)
      SELECT * FROM v ON CONFLICT (id) DO NOTHING
      RETURNING id, namespace, function, bytes, finished_ms IS NOT NULL AS fin),
 d AS (INSERT INTO run_usage_delta (namespace, function, runs, finished, bytes)
      SELECT namespace, function, COUNT(*), SUM(fin::int)::bigint, SUM(bytes)::bigint
      FROM ins GROUP BY namespace, function)
 SELECT id FROM ins";

/// An active run is written only by its owner (or when it has none): a server that lost its
/// lease does not overwrite the state of a run another server took over. A finished run is
/// anyone's to write (a redrive makes its server the owner).
const UPDATE_RUNS: &str =
    "WITH v AS (SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[],
                $5::text[], $6::int8[], $7::bool[], $8::int8[], $9::text[])
              AS v(id, namespace, function, status, body, finished_ms, callback_pending, bytes,
                owner)),
         old AS (SELECT r.id, r.bytes, r.finished_ms IS NOT NULL AS fin FROM runs r
              JOIN v ON v.id = r.id),
         upd AS (UPDATE runs r SET status = v.status, body = v.body, finished_ms = v.finished_ms,
                callback_pending = v.callback_pending, bytes = v.bytes, owner = v.owner
              FROM v WHERE r.id = v.id AND (r.status NOT IN ('QUEUED', 'RUNNING')
                OR r.owner IS NULL OR r.owner = v.owner)
              RETURNING r.id, r.namespace, r.function, r.bytes, r.finished_ms IS NOT NULL AS fin)
         INSERT INTO run_usage_delta (namespace, function, runs, finished, bytes)
         SELECT u.namespace, u.function, 0, SUM(u.fin::int - o.fin::int)::bigint,
           SUM(u.bytes - o.bytes)::bigint
         FROM upd u JOIN old o ON o.id = u.id GROUP BY u.namespace, u.function";

/// A connection of its own with [`INSERT_RUNS`] and [`UPDATE_RUNS`] prepared, for
/// `put_runs`: an enqueue is then one round trip that plans nothing.
pub(crate) struct Writer {
    client: postgres::Client,
    insert: postgres::Statement,
    update: postgres::Statement,
}

impl Writer {
    pub(super) fn new(mut client: postgres::Client) -> Result<Writer> {
        let types = [
            Type::TEXT_ARRAY,
            Type::TEXT_ARRAY,
            Type::TEXT_ARRAY,
            Type::TEXT_ARRAY,
            Type::TEXT_ARRAY,
            Type::INT8_ARRAY,
            Type::BOOL_ARRAY,
            Type::INT8_ARRAY,
            Type::TEXT_ARRAY,
        ];
        let insert = client.prepare_typed(INSERT_RUNS, &types)?;
        let update = client.prepare_typed(UPDATE_RUNS, &types)?;
        Ok(Writer {
            client,
            insert,
            update,
        })
    }

    pub(super) fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// [`write_runs`] with the prepared statements, outside any transaction.
    pub(super) fn put(&mut self, runs: &[Run]) -> Result<()> {
        let Writer {
            client,
            insert,
            update,
        } = self;
        write(client, runs, |c, cols, new| {
            let st = if new { &*insert } else { &*update };
            Ok(c.query(st, &cols.untyped())?)
        })
    }
}

/// The columns of a batch of runs, as arrays for `UNNEST`.
#[derive(Default)]
struct Columns {
    id: Vec<String>,
    namespace: Vec<String>,
    function: Vec<String>,
    status: Vec<&'static str>,
    body: Vec<String>,
    finished_ms: Vec<Option<i64>>,
    callback: Vec<bool>,
    bytes: Vec<i64>,
    owner: Vec<Option<String>>,
}

impl Columns {
    fn of(runs: &[Run]) -> Result<Columns> {
        let mut c = Columns::default();
        for run in runs {
            let body = serde_json::to_string(run)?;
            c.bytes.push(body.len() as i64);
            c.body.push(body);
            c.id.push(run.id.clone());
            c.owner.push(run.replica.clone());
            c.namespace.push(run.namespace.clone());
            c.function.push(run.function.clone());
            c.status.push(run.status.as_str());
            c.finished_ms.push(
                run.finished_at
                    .filter(|_| run.status.is_final())
                    .map(|t| t.as_millisecond()),
            );
            c.callback.push(
                run.status.is_final()
                    && run
                        .callback
                        .as_ref()
                        .is_some_and(|cb| cb.state == CallbackState::Pending),
            );
        }
        Ok(c)
    }

    fn untyped(&self) -> [&(dyn ToSql + Sync); 9] {
        [
            &self.id,
            &self.namespace,
            &self.function,
            &self.status,
            &self.body,
            &self.finished_ms,
            &self.callback,
            &self.bytes,
            &self.owner,
        ]
    }

    fn params(&self) -> [(&(dyn ToSql + Sync), Type); 9] {
        [
            (&self.id, Type::TEXT_ARRAY),
            (&self.namespace, Type::TEXT_ARRAY),
            (&self.function, Type::TEXT_ARRAY),
            (&self.status, Type::TEXT_ARRAY),
            (&self.body, Type::TEXT_ARRAY),
            (&self.finished_ms, Type::INT8_ARRAY),
            (&self.callback, Type::BOOL_ARRAY),
            (&self.bytes, Type::INT8_ARRAY),
            (&self.owner, Type::TEXT_ARRAY),
        ]
    }
}

/// Inserts or replaces run records with what they add to the usage, in as few round trips as
/// it can (the caller makes it atomic when it is more than one statement): one statement
/// inserts the new runs (an enqueue, a batch of sync calls' history) and their usage change;
/// runs that exist (an async run's next state) are updated by a second one, which reads their
/// old size in the same statement (from its snapshot: not `FOR UPDATE`, which skips rows the
/// statement itself updates; one run is written by one writer at a time, its owner).
pub(super) fn write_runs(tx: &mut impl GenericClient, runs: &[Run]) -> Result<()> {
    write(tx, runs, |c, cols, new| {
        let sql = if new { INSERT_RUNS } else { UPDATE_RUNS };
        Ok(c.query_typed(sql, &cols.params())?)
    })
}

/// [`write_runs`]' steps, each statement run by `run` (`true`: the insert of new runs).
fn write<C: GenericClient>(
    tx: &mut C,
    runs: &[Run],
    run: impl Fn(&mut C, &Columns, bool) -> Result<Vec<postgres::Row>>,
) -> Result<()> {
    if runs.is_empty() {
        return Ok(());
    }
    // One run written twice in a batch (two states of an async run): its last state, as
    // writing them in turn would leave.
    let last: std::collections::HashMap<&str, usize> = runs
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id.as_str(), i))
        .collect();
    let deduped: Vec<Run>;
    let runs = if last.len() == runs.len() {
        runs
    } else {
        deduped = runs
            .iter()
            .enumerate()
            .filter(|(i, r)| last[r.id.as_str()] == *i)
            .map(|(_, r)| r.clone())
            .collect();
        &deduped
    };
    let cols = Columns::of(runs)?;
    let inserted: std::collections::HashSet<String> = run(tx, &cols, true)?
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect();
    if inserted.len() == runs.len() {
        return Ok(());
    }
    let rest: Vec<Run> = runs
        .iter()
        .filter(|r| !inserted.contains(&r.id))
        .cloned()
        .collect();
    let cols = Columns::of(&rest)?;
    run(tx, &cols, false)?;
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

    /// Adds what the deletes took away to `run_usage_delta` (folded by the next prune).
    pub(super) fn apply(&mut self, tx: &mut impl GenericClient) -> Result<()> {
        for ((ns, f), (runs, finished, bytes)) in self.0.drain() {
            tx.execute(
                "INSERT INTO run_usage_delta (namespace, function, runs, finished, bytes)
                 VALUES ($1, $2, $3, $4, $5)",
                &[&ns, &f, &runs, &finished, &bytes],
            )?;
        }
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
    let (upper, lower) = crate::shared::id_bounds(filter);
    if let Some(u) = upper {
        and("id <", Box::new(u));
    }
    if let Some(l) = lower {
        and("id >=", Box::new(l));
    }
    args.push(Box::new(filter.limit.unwrap_or(100) as i64));
    sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", args.len()));
    (sql, args)
}
