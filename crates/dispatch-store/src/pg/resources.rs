//! [`ResourceStore`] on PostgreSQL: resources as JSON bodies with a resource version (a
//! read-modify-write holds the row with `FOR UPDATE`, so two servers' writes to one resource
//! take turns), and the namespaces table.

use dispatch_core::{Kind, Object, Status};
use jiff::Timestamp;
use postgres::GenericClient;

use super::listen::{self, notify};
use super::{PgStore, ms_to_ts, unsigned};
use crate::shared::{created, not_found, rv_of, updated};
use crate::{NamespaceRecord, OnChange, ResourceStore, Result, Shared, StoreError};

fn read_row(
    c: &mut impl GenericClient,
    ns: &str,
    kind: Kind,
    name: &str,
    lock: bool,
) -> Result<Option<Object>> {
    let sql = if lock {
        "SELECT body FROM resources WHERE namespace = $1 AND kind = $2 AND name = $3 FOR UPDATE"
    } else {
        "SELECT body FROM resources WHERE namespace = $1 AND kind = $2 AND name = $3"
    };
    match c.query_opt(sql, &[&ns, &kind.as_str(), &name])? {
        Some(row) => Ok(Some(serde_json::from_str(row.get::<_, &str>(0))?)),
        None => Ok(None),
    }
}

fn write_row(c: &mut impl GenericClient, obj: &Object, rv: i64) -> Result<()> {
    c.execute(
        "INSERT INTO resources (namespace, kind, name, resource_version, body)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (namespace, kind, name)
         DO UPDATE SET resource_version = EXCLUDED.resource_version, body = EXCLUDED.body",
        &[
            &obj.namespace(),
            &obj.kind.as_str(),
            &obj.name(),
            &rv,
            &serde_json::to_string(obj)?,
        ],
    )?;
    Ok(())
}

impl ResourceStore for PgStore {
    fn on_external_change(&self, f: OnChange) {
        self.listener.on_change(f);
    }

    fn get(&self, namespace: &str, kind: Kind, name: &str) -> Result<Option<Object>> {
        let cache = &self.listener.cache;
        let key = (namespace.to_string(), kind, name.to_string());
        if let Some(hit) = cache.get(&key) {
            return Ok(hit);
        }
        let generation = cache.generation();
        let read = read_row(&mut *self.conn()?, namespace, kind, name, false)?;
        cache.fill(key, read.clone(), generation);
        Ok(read)
    }

    fn list(&self, namespace: Option<&str>, kind: Kind) -> Result<Vec<Object>> {
        self.bodies(
            "SELECT body FROM resources WHERE kind = $1 AND ($2::text IS NULL OR namespace = $2)
             ORDER BY namespace, name",
            &[&kind.as_str(), &namespace],
        )
    }

    fn create(&self, mut object: Object) -> Result<Object> {
        let ns = object.namespace().to_string();
        created(&mut object, &ns);
        // One statement: of two servers creating one name, one wins (and tells the others).
        let told = listen::resource(
            &self.listener.origin,
            object.kind,
            &ns,
            object.name(),
            false,
        );
        let n = self.conn()?.query(
            "WITH ins AS (INSERT INTO resources (namespace, kind, name, resource_version, body)
               VALUES ($1, $2, $3, 1, $4) ON CONFLICT DO NOTHING RETURNING 1)
             SELECT pg_notify($5, $6) FROM ins",
            &[
                &ns,
                &object.kind.as_str(),
                &object.name(),
                &serde_json::to_string(&object)?,
                &listen::CHANNEL,
                &told,
            ],
        )?;
        self.listener
            .cache
            .drop_key(&ns, object.kind, object.name());
        if n.is_empty() {
            return Err(StoreError::AlreadyExists {
                kind: object.kind,
                namespace: ns,
                name: object.metadata.name.clone(),
            });
        }
        Ok(object)
    }

    fn update(&self, object: Object) -> Result<Object> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        let ns = object.namespace().to_string();
        let Some(stored) = read_row(&mut tx, &ns, object.kind, object.name(), true)? else {
            return Err(not_found(object.kind, &ns, object.name()));
        };
        let (stored, version) = updated(stored, object)?;
        write_row(&mut tx, &stored, version)?;
        let told = listen::resource(
            &self.listener.origin,
            stored.kind,
            &ns,
            stored.name(),
            false,
        );
        notify(&mut tx, &told)?;
        tx.commit()?;
        self.listener
            .cache
            .drop_key(&ns, stored.kind, stored.name());
        Ok(stored)
    }

    fn update_status(
        &self,
        namespace: &str,
        kind: Kind,
        name: &str,
        status: Status,
    ) -> Result<Object> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        let Some(mut stored) = read_row(&mut tx, namespace, kind, name, true)? else {
            return Err(not_found(kind, namespace, name));
        };
        let next = rv_of(&stored) + 1;
        stored.status = status;
        stored.metadata.resource_version = Some(next.to_string());
        write_row(&mut tx, &stored, next)?;
        notify(
            &mut tx,
            &listen::status(&self.listener.origin, kind, namespace, name),
        )?;
        tx.commit()?;
        self.listener.cache.drop_key(namespace, kind, name);
        Ok(stored)
    }

    fn delete(&self, namespace: &str, kind: Kind, name: &str) -> Result<Object> {
        let told = listen::resource(&self.listener.origin, kind, namespace, name, true);
        let row = self.conn()?.query_opt(
            "WITH del AS (DELETE FROM resources WHERE namespace = $1 AND kind = $2 AND name = $3
               RETURNING body)
             SELECT body, pg_notify($4, $5) FROM del",
            &[&namespace, &kind.as_str(), &name, &listen::CHANNEL, &told],
        )?;
        self.listener.cache.drop_key(namespace, kind, name);
        match row {
            Some(r) => Ok(serde_json::from_str(r.get::<_, &str>(0))?),
            None => Err(not_found(kind, namespace, name)),
        }
    }

    fn put_namespace(&self, name: &str, created: Timestamp) -> Result<bool> {
        let told = listen::shared(&self.listener.origin, Shared::Namespaces);
        let n = self.conn()?.query(
            "WITH ins AS (INSERT INTO namespaces (name, created_ms) VALUES ($1, $2)
               ON CONFLICT DO NOTHING RETURNING 1)
             SELECT pg_notify($3, $4) FROM ins",
            &[&name, &created.as_millisecond(), &listen::CHANNEL, &told],
        )?;
        Ok(n.len() == 1)
    }

    fn list_namespaces(&self) -> Result<Vec<NamespaceRecord>> {
        Ok(self
            .conn()?
            .query(
                "SELECT name, created_ms, run_history_budget FROM namespaces ORDER BY name",
                &[],
            )?
            .iter()
            .map(|r| NamespaceRecord {
                name: r.get(0),
                created: ms_to_ts(r.get(1)),
                run_history_budget: r.get::<_, Option<i64>>(2).map(unsigned),
            })
            .collect())
    }

    fn set_run_history_budget(
        &self,
        name: &str,
        budget: Option<u64>,
        created: Timestamp,
    ) -> Result<()> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO namespaces (name, created_ms, run_history_budget) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET run_history_budget = EXCLUDED.run_history_budget",
            &[
                &name,
                &created.as_millisecond(),
                &budget.map(|b| b.min(i64::MAX as u64) as i64),
            ],
        )?;
        notify(
            &mut tx,
            &listen::shared(&self.listener.origin, Shared::Namespaces),
        )?;
        tx.commit()?;
        Ok(())
    }

    fn delete_namespace(&self, name: &str) -> Result<bool> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        // Every resource in it goes too (the server refuses unless --cascade or empty).
        let gone = tx.query(
            "DELETE FROM resources WHERE namespace = $1 RETURNING kind, name",
            &[&name],
        )?;
        for r in &gone {
            if let Some(kind) = Kind::parse(r.get(0)) {
                let told = listen::resource(&self.listener.origin, kind, name, r.get(1), true);
                notify(&mut tx, &told)?;
            }
        }
        let n = tx.execute("DELETE FROM namespaces WHERE name = $1", &[&name])?;
        notify(
            &mut tx,
            &listen::shared(&self.listener.origin, Shared::Namespaces),
        )?;
        tx.commit()?;
        self.listener.cache.drop_namespace(name);
        Ok(n == 1)
    }
}
