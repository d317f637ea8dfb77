//! Sync calls' history in chunks (issue 26). A row and five index entries per recorded call
//! made SQLite most of what a warm call cost (callgrind: ~100k of ~200k instructions a call,
//! ~70k of them the row's inserts and its pages in the WAL). The records of one batch that
//! are succeeded sync calls of one function are written as one row of `run_chunks` instead:
//! their JSON bodies framed one after another, sorted by id, LZ4-compressed; the row keeps
//! the smallest and largest id, the count and the uncompressed bytes (what budgets count,
//! as for a row).
//!
//! Everything else stays a row of `runs`: async runs (their states are written again), failed
//! calls (rare, and "the newest failed runs" must come from an index), a pending callback.
//! Readers see one set: a run is looked up in both, listings merge by id, and retention takes
//! the oldest runs across both, a chunk losing some of its records rewritten without them.

use std::collections::HashMap;

use dispatch_core::{CallbackState, Run, RunStatus};
use rusqlite::{Connection, params};

use super::runs::Usage;
use crate::{Result, RunFilter, StoreError};

/// Whether a record is written into a chunk: a sync call's, succeeded, written once.
pub(super) fn chunked(run: &Run) -> bool {
    !run.is_async
        && run.status == RunStatus::Succeeded
        && run.finished_at.is_some()
        && !run
            .callback
            .as_ref()
            .is_some_and(|c| c.state == CallbackState::Pending)
}

/// Writes `runs` (all [`chunked`]) as one chunk per function, counting them in `usage`.
pub(super) fn write(tx: &Connection, runs: &[&Run], usage: &mut Usage) -> Result<()> {
    let mut groups: HashMap<(&str, &str), Vec<&Run>> = HashMap::new();
    for r in runs {
        groups
            .entry((r.namespace.as_str(), r.function.as_str()))
            .or_default()
            .push(r);
    }
    for ((ns, function), mut group) in groups {
        group.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        // Cut where the ids' times spread over more than MAX_SPAN (a long call recorded
        // beside quick ones): a look-up by id then reads only the chunks ending within
        // MAX_SPAN after the id.
        let mut rest = &group[..];
        while !rest.is_empty() {
            // Ids that are not ULIDs (no time to bound) go apart from those that are.
            let end = match id_ms(&rest[0].id) {
                Some(start) => rest
                    .iter()
                    .position(|r| id_ms(&r.id).is_none_or(|t| t > start + MAX_SPAN_MS)),
                None => rest.iter().position(|r| id_ms(&r.id).is_some()),
            }
            .unwrap_or(rest.len());
            let (chunk, more) = rest.split_at(end.max(1));
            write_chunk(tx, ns, function, chunk, usage)?;
            rest = more;
        }
    }
    Ok(())
}

/// The widest a chunk's records spread in creation time (their ids).
const MAX_SPAN_MS: u64 = 1000;

/// A run id's time (ids are ULIDs; `None` for an id that is not one).
fn id_ms(id: &str) -> Option<u64> {
    ulid::Ulid::from_string(id).ok().map(|u| u.timestamp_ms())
}

fn write_chunk(
    tx: &Connection,
    ns: &str,
    function: &str,
    runs: &[&Run],
    usage: &mut Usage,
) -> Result<()> {
    let mut frames = Vec::with_capacity(runs.len() * 768);
    let mut bytes = 0i64;
    for r in runs {
        bytes += frame(&mut frames, r.id.as_bytes(), |buf| {
            r.write_json(buf);
            Ok(())
        })? as i64;
    }
    let (first, last) = (&runs[0].id, &runs[runs.len() - 1].id);
    insert(tx, ns, function, first, last, runs.len(), bytes, &frames)?;
    usage.add(ns, function, runs.len() as i64, runs.len() as i64, bytes);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn insert(
    tx: &Connection,
    ns: &str,
    function: &str,
    first: &str,
    last: &str,
    runs: usize,
    bytes: i64,
    frames: &[u8],
) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO run_chunks (namespace, function, first_id, last_id, runs, bytes, body)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        ns,
        function,
        first,
        last,
        runs as i64,
        bytes,
        lz4_flex::compress_prepend_size(frames)
    ])?;
    Ok(())
}

/// Appends one record: the id's length (4 bytes), the id, the body's length (4 bytes), the
/// body that `body` writes. Returns the body's length.
fn frame(
    buf: &mut Vec<u8>,
    id: &[u8],
    body: impl FnOnce(&mut Vec<u8>) -> Result<()>,
) -> Result<usize> {
    buf.extend_from_slice(&(id.len() as u32).to_le_bytes());
    buf.extend_from_slice(id);
    let at = buf.len();
    buf.extend_from_slice(&[0; 4]);
    body(buf)?;
    let len = buf.len() - at - 4;
    buf[at..at + 4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(len)
}

/// A chunk's records, decompressed: ids and JSON bodies, by id.
pub(super) struct Records {
    buf: Vec<u8>,
    /// (id, body) ranges in `buf`.
    at: Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>,
}

impl Records {
    pub(super) fn decode(blob: &[u8]) -> Result<Records> {
        let corrupt = |what: &str| StoreError::CorruptChunk(what.to_string());
        let buf = lz4_flex::decompress_size_prepended(blob).map_err(|e| corrupt(&e.to_string()))?;
        let mut at = Vec::new();
        let mut i = 0;
        let take = |i: &mut usize, n: usize| -> Result<std::ops::Range<usize>> {
            let r = *i..*i + n;
            if r.end > buf.len() {
                return Err(corrupt("truncated"));
            }
            *i = r.end;
            Ok(r)
        };
        let length = |i: &mut usize| -> Result<usize> {
            let n = take(i, 4)?;
            Ok(u32::from_le_bytes(buf[n].try_into().expect("4 bytes")) as usize)
        };
        while i < buf.len() {
            let n = length(&mut i)?;
            let id = take(&mut i, n)?;
            let n = length(&mut i)?;
            let body = take(&mut i, n)?;
            at.push((id, body));
        }
        Ok(Records { buf, at })
    }

    /// The records of column `i` of a row.
    fn read(r: &rusqlite::Row<'_>, i: usize) -> Result<Records> {
        let blob = r.get_ref(i)?.as_blob();
        Records::decode(blob.map_err(|e| StoreError::CorruptChunk(e.to_string()))?)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.at.iter().map(|(id, body)| {
            (
                std::str::from_utf8(&self.buf[id.clone()]).unwrap_or(""),
                &self.buf[body.clone()],
            )
        })
    }
}

/// Decodes a run's JSON body.
pub(super) fn parse(body: &[u8]) -> Result<Run> {
    Ok(serde_json::from_slice(body)?)
}

/// One run by id, when a chunk holds it: only chunks that end at most MAX_SPAN after the
/// id can (an id that is not a ULID: every chunk that ends after it).
pub(super) fn get(conn: &Connection, namespace: &str, id: &str) -> Result<Option<Run>> {
    let until = match id_ms(id) {
        Some(ms) => ulid::Ulid::from_parts(ms + MAX_SPAN_MS + 1, 0).to_string(),
        None => "\u{10ffff}".to_string(),
    };
    // `+first_id`: the range of largest ids is the one to read.
    let mut stmt = conn.prepare_cached(
        "SELECT body FROM run_chunks WHERE namespace = ?1 AND last_id >= ?2 AND last_id < ?3
           AND +first_id <= ?2",
    )?;
    let mut rows = stmt.query(params![namespace, id, until])?;
    while let Some(r) = rows.next()? {
        let records = Records::read(r, 0)?;
        if let Some((_, body)) = records.iter().find(|(i, _)| *i == id) {
            return Ok(Some(parse(body)?));
        }
    }
    Ok(None)
}

/// The newest chunked records of a listing (as `list_runs_sql` filters rows), at most the
/// filter's limit: (id, body). Chunks are read newest first (by their largest id) and the
/// reading stops at the first chunk whose largest id is below the limit-th found.
pub(super) fn newest(
    conn: &Connection,
    namespace: &str,
    filter: &RunFilter,
) -> Result<Vec<(String, Vec<u8>)>> {
    let limit = filter.limit.unwrap_or(100);
    if limit == 0 || filter.status.is_some_and(|s| s != RunStatus::Succeeded) {
        return Ok(Vec::new());
    }
    let (upper, lower) = crate::shared::id_bounds(filter);
    let (sql, args) = newest_sql(namespace, filter);
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut rows = stmt.query(rusqlite::params_from_iter(args))?;
    let mut found: Vec<(String, Vec<u8>)> = Vec::new();
    // The limit-th newest id found as of the last cut (it only grows as more is found): a
    // chunk whose newest run is older holds nothing for the page, nor does any after it.
    let mut floor: Option<String> = None;
    let newest_first = |a: &(String, Vec<u8>), b: &(String, Vec<u8>)| b.0.cmp(&a.0);
    while let Some(r) = rows.next()? {
        let last: String = r.get(0)?;
        if floor.as_ref().is_some_and(|f| last < *f) {
            break;
        }
        let records = Records::read(r, 1)?;
        for (id, body) in records.iter() {
            if upper.as_deref().is_none_or(|u| id < u) && lower.as_deref().is_none_or(|l| id >= l) {
                found.push((id.to_string(), body.to_vec()));
            }
        }
        // Cut to the limit when first reached and then each time it doubles (linear each
        // time, so a page of 100,000 does not sort at every chunk).
        if found.len() >= limit && (floor.is_none() || found.len() >= 2 * limit) {
            found.select_nth_unstable_by(limit - 1, newest_first);
            found.truncate(limit);
            floor = Some(found[limit - 1].0.clone());
        }
    }
    found.sort_unstable_by(newest_first);
    found.truncate(limit);
    Ok(found)
}

/// The chunks' query of a listing: by function when it names one, newest first.
pub(super) fn newest_sql(
    namespace: &str,
    filter: &RunFilter,
) -> (String, Vec<rusqlite::types::Value>) {
    // `+`: not a term for an index (the one by smallest id would be chosen, then sorted).
    let (mut sql, args) = super::runs::filtered_sql(
        "SELECT last_id, body FROM run_chunks",
        namespace,
        filter,
        false,
        ["+first_id <", "last_id >="],
    );
    sql.push_str(" ORDER BY last_id DESC");
    (sql, args)
}

/// Which finished runs retention looks at, oldest first.
pub(super) enum Scope<'a> {
    /// Every namespace's, created before this id.
    Before(&'a str),
    Function(&'a str, &'a str),
    Namespace(&'a str),
}

/// The rows' query of a scope: (id, bytes), oldest first, at most ?N.
pub(super) const ROWS_BEFORE: &str =
    "SELECT id, bytes FROM runs WHERE id < ?1 AND finished_ms IS NOT NULL ORDER BY id LIMIT ?2";
pub(super) const ROWS_OF_FUNCTION: &str = "SELECT id, bytes FROM runs WHERE namespace = ?1
    AND function = ?2 AND finished_ms IS NOT NULL ORDER BY id LIMIT ?3";
pub(super) const ROWS_OF_NAMESPACE: &str = "SELECT id, bytes FROM runs WHERE namespace = ?1
    AND finished_ms IS NOT NULL ORDER BY id LIMIT ?2";
/// The chunks' query of a scope, oldest first (by their smallest id).
pub(super) const CHUNKS_BEFORE: &str =
    "SELECT seq, first_id, namespace, function, body FROM run_chunks WHERE first_id < ?1
     ORDER BY first_id";
pub(super) const CHUNKS_OF_FUNCTION: &str =
    "SELECT seq, first_id, namespace, function, body FROM run_chunks
     WHERE namespace = ?1 AND function = ?2 ORDER BY first_id";
pub(super) const CHUNKS_OF_NAMESPACE: &str =
    "SELECT seq, first_id, namespace, function, body FROM run_chunks WHERE namespace = ?1
     ORDER BY first_id";

/// A finished run that retention may delete: its id, size and the chunk that holds it
/// (`None`: a row).
pub(super) struct Victim {
    pub id: String,
    pub bytes: i64,
    chunk: Option<i64>,
}

/// The oldest finished runs of a scope across rows and chunks, and the chunks read.
pub(super) struct Oldest {
    pub runs: Vec<Victim>,
    chunks: HashMap<i64, (String, String, Records)>,
}

/// The oldest `max` finished runs of `scope`, oldest first.
pub(super) fn oldest(tx: &Connection, scope: &Scope<'_>, max: usize) -> Result<Oldest> {
    let mut chunks = HashMap::new();
    if max == 0 {
        return Ok(Oldest {
            runs: Vec::new(),
            chunks,
        });
    }
    let n = max as i64;
    let mut runs: Vec<Victim> = {
        let (sql, args): (&str, Vec<rusqlite::types::Value>) = match scope {
            Scope::Before(id) => (ROWS_BEFORE, vec![id.to_string().into(), n.into()]),
            Scope::Function(ns, f) => (
                ROWS_OF_FUNCTION,
                vec![ns.to_string().into(), f.to_string().into(), n.into()],
            ),
            Scope::Namespace(ns) => (ROWS_OF_NAMESPACE, vec![ns.to_string().into(), n.into()]),
        };
        let mut stmt = tx.prepare_cached(sql)?;
        stmt.query_map(rusqlite::params_from_iter(args), |r| {
            Ok(Victim {
                id: r.get(0)?,
                bytes: r.get(1)?,
                chunk: None,
            })
        })?
        .collect::<rusqlite::Result<_>>()?
    };
    let (sql, args): (&str, Vec<String>) = match scope {
        Scope::Before(id) => (CHUNKS_BEFORE, vec![id.to_string()]),
        Scope::Function(ns, f) => (CHUNKS_OF_FUNCTION, vec![ns.to_string(), f.to_string()]),
        Scope::Namespace(ns) => (CHUNKS_OF_NAMESPACE, vec![ns.to_string()]),
    };
    let before = match scope {
        Scope::Before(id) => Some(*id),
        _ => None,
    };
    let mut stmt = tx.prepare_cached(sql)?;
    let mut rows = stmt.query(rusqlite::params_from_iter(args))?;
    while let Some(r) = rows.next()? {
        let first: String = r.get(1)?;
        // Every later chunk starts after this one: none of it is older than what is found.
        if runs.len() >= max && first > runs[max - 1].id {
            break;
        }
        let seq: i64 = r.get(0)?;
        let records = Records::read(r, 4)?;
        for (id, body) in records.iter() {
            if before.is_none_or(|b| id < b) {
                runs.push(Victim {
                    id: id.to_string(),
                    bytes: body.len() as i64,
                    chunk: Some(seq),
                });
            }
        }
        runs.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        runs.truncate(max);
        chunks.insert(seq, (r.get(2)?, r.get(3)?, records));
    }
    Ok(Oldest { runs, chunks })
}

impl Oldest {
    /// Deletes the first `n` of the runs found: rows deleted, chunks rewritten without them
    /// (deleted when nothing is left). Returns how many.
    pub(super) fn delete(mut self, tx: &Connection, n: usize, usage: &mut Usage) -> Result<u64> {
        self.runs.truncate(n);
        let mut from_chunks: HashMap<i64, std::collections::HashSet<&str>> = HashMap::new();
        for v in &self.runs {
            match v.chunk {
                None => {
                    usage.delete(tx, "DELETE FROM runs WHERE id = ?1", params![v.id])?;
                }
                Some(seq) => {
                    from_chunks.entry(seq).or_default().insert(&v.id);
                }
            }
        }
        for (seq, gone) in from_chunks {
            let (ns, function, records) = &self.chunks[&seq];
            let mut frames = Vec::new();
            let (mut kept, mut bytes, mut first, mut last) = (0usize, 0i64, "", "");
            let (mut removed, mut removed_bytes) = (0i64, 0i64);
            for (id, body) in records.iter() {
                if gone.contains(id) {
                    removed += 1;
                    removed_bytes += body.len() as i64;
                    continue;
                }
                frame(&mut frames, id.as_bytes(), |buf| {
                    buf.extend_from_slice(body);
                    Ok(())
                })?;
                if kept == 0 {
                    first = id;
                }
                last = id;
                kept += 1;
                bytes += body.len() as i64;
            }
            if kept == 0 {
                tx.prepare_cached("DELETE FROM run_chunks WHERE seq = ?1")?
                    .execute(params![seq])?;
            } else {
                tx.prepare_cached(
                    "UPDATE run_chunks SET first_id = ?2, last_id = ?3, runs = ?4, bytes = ?5,
                       body = ?6 WHERE seq = ?1",
                )?
                .execute(params![
                    seq,
                    first,
                    last,
                    kept as i64,
                    bytes,
                    lz4_flex::compress_prepend_size(&frames)
                ])?;
            }
            usage.add(ns, function, -removed, -removed, -removed_bytes);
        }
        Ok(self.runs.len() as u64)
    }
}

/// Chunks deleted per transaction by purges and function deletes (each up to a batch of
/// records).
pub(super) const DELETE_CHUNKS: i64 = 16;

/// Deletes up to [`DELETE_CHUNKS`] chunks of a namespace (of a function); the records deleted.
pub(super) fn delete_some(
    tx: &Connection,
    namespace: &str,
    function: Option<&str>,
    usage: &mut Usage,
) -> Result<(u64, usize)> {
    let mut stmt = tx.prepare_cached(
        "DELETE FROM run_chunks WHERE seq IN (SELECT seq FROM run_chunks WHERE namespace = ?1
           AND (?2 IS NULL OR function = ?2) LIMIT ?3)
         RETURNING namespace, function, runs, bytes",
    )?;
    let mut rows = stmt.query(params![namespace, function, DELETE_CHUNKS])?;
    let (mut runs, mut chunks) = (0u64, 0usize);
    while let Some(r) = rows.next()? {
        let (ns, f, n, bytes): (String, String, i64, i64) =
            (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
        usage.add(&ns, &f, -n, -n, -bytes);
        runs += n as u64;
        chunks += 1;
    }
    Ok((runs, chunks))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(records: &[(&str, &str)]) -> Vec<u8> {
        let mut frames = Vec::new();
        for (id, body) in records {
            frame(&mut frames, id.as_bytes(), |b| {
                b.extend_from_slice(body.as_bytes());
                Ok(())
            })
            .unwrap();
        }
        frames
    }

    #[test]
    fn records_come_back_as_framed() {
        let frames = encoded(&[("01A", "{\"a\":1}"), ("", ""), ("01B", "[]")]);
        let r = Records::decode(&lz4_flex::compress_prepend_size(&frames)).unwrap();
        let got: Vec<(&str, &[u8])> = r.iter().collect();
        assert_eq!(
            got,
            [
                ("01A", &b"{\"a\":1}"[..]),
                ("", &b""[..]),
                ("01B", &b"[]"[..])
            ]
        );
    }

    /// A damaged chunk is an error that says so, never a panic or a wrong record.
    #[test]
    fn a_damaged_chunk_is_an_error() {
        let frames = encoded(&[("01A", "{\"a\":1}")]);
        for cut in 1..frames.len() {
            let e = Records::decode(&lz4_flex::compress_prepend_size(&frames[..cut]));
            assert!(
                matches!(e, Err(StoreError::CorruptChunk(_))),
                "cut at {cut}"
            );
        }
        let mut blob = lz4_flex::compress_prepend_size(&frames);
        blob.truncate(blob.len() - 2);
        assert!(matches!(
            Records::decode(&blob),
            Err(StoreError::CorruptChunk(_))
        ));
    }
}
