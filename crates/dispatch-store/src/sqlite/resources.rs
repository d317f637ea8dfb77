//! [`ResourceStore`] on SQLite: resources as JSON bodies with a resource version, and the
//! namespaces table.

use dispatch_core::{Kind, Object, Status};
use jiff::Timestamp;
use rusqlite::{Connection, OptionalExtension, params};

use super::{SqliteStore, ms_to_ts};
use crate::shared::{created, not_found, rv_of, updated};
use crate::{NamespaceRecord, ResourceStore, Result, StoreError};

fn read_row(conn: &Connection, ns: &str, kind: Kind, name: &str) -> Result<Option<Object>> {
    let body: Option<String> = conn
        .query_row(
            "SELECT body FROM resources WHERE namespace = ?1 AND kind = ?2 AND name = ?3",
            params![ns, kind.as_str(), name],
            |r| r.get(0),
        )
        .optional()?;
    Ok(match body {
        Some(b) => Some(serde_json::from_str(&b)?),
        None => None,
    })
}
fn write_row(conn: &Connection, obj: &Object, rv: i64) -> Result<()> {
    conn.execute(
        "INSERT INTO resources (namespace, kind, name, resource_version, body)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (namespace, kind, name)
         DO UPDATE SET resource_version = excluded.resource_version, body = excluded.body",
        params![
            obj.namespace(),
            obj.kind.as_str(),
            obj.name(),
            rv,
            serde_json::to_string(obj)?
        ],
    )?;
    Ok(())
}
impl ResourceStore for SqliteStore {
    fn get(&self, namespace: &str, kind: Kind, name: &str) -> Result<Option<Object>> {
        read_row(&self.conn(), namespace, kind, name)
    }

    fn list(&self, namespace: Option<&str>, kind: Kind) -> Result<Vec<Object>> {
        self.bodies(
            "SELECT body FROM resources WHERE kind = ?1 AND (?2 IS NULL OR namespace = ?2)
             ORDER BY namespace, name",
            params![kind.as_str(), namespace],
        )
    }

    fn create(&self, mut object: Object) -> Result<Object> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let ns = object.namespace().to_string();
        if read_row(&tx, &ns, object.kind, object.name())?.is_some() {
            return Err(StoreError::AlreadyExists {
                kind: object.kind,
                namespace: ns,
                name: object.metadata.name.clone(),
            });
        }
        created(&mut object, &ns);
        write_row(&tx, &object, 1)?;
        tx.commit()?;
        Ok(object)
    }

    fn update(&self, object: Object) -> Result<Object> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let ns = object.namespace().to_string();
        let Some(stored) = read_row(&tx, &ns, object.kind, object.name())? else {
            return Err(not_found(object.kind, &ns, object.name()));
        };
        let (stored, version) = updated(stored, object)?;
        write_row(&tx, &stored, version)?;
        tx.commit()?;
        Ok(stored)
    }

    fn update_status(
        &self,
        namespace: &str,
        kind: Kind,
        name: &str,
        status: Status,
    ) -> Result<Object> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let Some(mut stored) = read_row(&tx, namespace, kind, name)? else {
            return Err(not_found(kind, namespace, name));
        };
        let next = rv_of(&stored) + 1;
        stored.status = status;
        stored.metadata.resource_version = Some(next.to_string());
        write_row(&tx, &stored, next)?;
        tx.commit()?;
        Ok(stored)
    }

    fn delete(&self, namespace: &str, kind: Kind, name: &str) -> Result<Object> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let Some(stored) = read_row(&tx, namespace, kind, name)? else {
            return Err(not_found(kind, namespace, name));
        };
        tx.execute(
            "DELETE FROM resources WHERE namespace = ?1 AND kind = ?2 AND name = ?3",
            params![namespace, kind.as_str(), name],
        )?;
        tx.commit()?;
        Ok(stored)
    }

    fn put_namespace(&self, name: &str, created: Timestamp) -> Result<bool> {
        let n = self.conn().execute(
            "INSERT OR IGNORE INTO namespaces (name, created_ms) VALUES (?1, ?2)",
            params![name, created.as_millisecond()],
        )?;
        Ok(n == 1)
    }

    fn list_namespaces(&self) -> Result<Vec<NamespaceRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT name, created_ms, run_history_budget FROM namespaces ORDER BY name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(NamespaceRecord {
                name: r.get(0)?,
                created: ms_to_ts(r.get(1)?),
                run_history_budget: r.get::<_, Option<i64>>(2)?.map(|b| b.max(0) as u64),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn set_run_history_budget(
        &self,
        name: &str,
        budget: Option<u64>,
        created: Timestamp,
    ) -> Result<()> {
        self.conn().execute(
            "INSERT INTO namespaces (name, created_ms, run_history_budget) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO UPDATE SET run_history_budget = excluded.run_history_budget",
            params![
                name,
                created.as_millisecond(),
                budget.map(|b| b.min(i64::MAX as u64) as i64)
            ],
        )?;
        Ok(())
    }

    fn delete_namespace(&self, name: &str) -> Result<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        // Every resource in it goes too (the server refuses unless --cascade or empty).
        tx.execute("DELETE FROM resources WHERE namespace = ?1", params![name])?;
        let n = tx.execute("DELETE FROM namespaces WHERE name = ?1", params![name])?;
        tx.commit()?;
        Ok(n == 1)
    }
}
