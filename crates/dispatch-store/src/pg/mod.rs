//! [`crate::ResourceStore`] and [`crate::RecordStore`] on PostgreSQL (`dispatch server
//! --database postgres://…`): the same tables as the SQLite store (`schema`: its
//! migrations), the same statements where the two dialects agree, one pool of connections
//! (`r2d2`) shared by every call.
//!
//! The client is the synchronous `postgres` crate: the traits are blocking, and the server
//! calls them on the blocking pool (a client runs its own small runtime, so it must never be
//! used, nor dropped, on an async worker thread — [`PgStore`]'s drop hands the pool to a
//! thread of its own).

mod listen;
mod records;
mod replicas;
mod resources;
mod runs;
mod schema;

use std::time::Duration;

use postgres::types::ToSql;
use r2d2_postgres::PostgresConnectionManager;

use crate::{Result, StoreError};

use tokio_postgres_rustls::MakeRustlsConnect;

/// The pool, over plain TCP or TLS.
enum Pool {
    Plain(r2d2::Pool<PostgresConnectionManager<postgres::NoTls>>),
    Tls(r2d2::Pool<PostgresConnectionManager<MakeRustlsConnect>>),
}

/// A connection from the pool (a `postgres::Client` either way).
pub(crate) enum Conn {
    Plain(r2d2::PooledConnection<PostgresConnectionManager<postgres::NoTls>>),
    Tls(r2d2::PooledConnection<PostgresConnectionManager<MakeRustlsConnect>>),
}

impl std::ops::Deref for Conn {
    type Target = postgres::Client;
    fn deref(&self) -> &postgres::Client {
        match self {
            Conn::Plain(c) => c,
            Conn::Tls(c) => c,
        }
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut postgres::Client {
        match self {
            Conn::Plain(c) => c,
            Conn::Tls(c) => c,
        }
    }
}

/// Parameters of one statement.
pub(crate) type Params<'a> = [&'a (dyn ToSql + Sync)];

/// Rows deleted per transaction by purges and function deletes (retention has its own batch).
const DELETE_BATCH: i64 = 1000;

/// How a [`PgStore`] connects.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// `postgres://user@host:port/db?…` or `host=… user=…` (libpq's forms).
    pub url: String,
    /// The password when it is not in the URL (read from a file or the environment).
    pub password: Option<String>,
    /// Connections kept open at most.
    pub max_connections: u32,
    /// How long a call waits for a free connection (or for a new one to be made).
    pub connect_timeout: Duration,
    /// PEM file of the CA that signed the server's certificate: connections are TLS, the
    /// certificate and host name verified against it. Without it, TLS when the URL says
    /// `sslmode=require`, verified against the system's CAs; plain TCP otherwise.
    pub ca_file: Option<std::path::PathBuf>,
}

impl PgOptions {
    pub fn new(url: impl Into<String>) -> PgOptions {
        PgOptions {
            url: url.into(),
            password: None,
            max_connections: 16,
            connect_timeout: Duration::from_secs(10),
            ca_file: None,
        }
    }
}

/// See the module docs.
pub struct PgStore {
    /// Always `Some` until dropped (see `Drop`).
    pool: Option<Pool>,
    /// Other servers' changes (see `listen`).
    listener: std::sync::Arc<listen::Listener>,
    /// The connections `put_runs` writes on, their statements prepared (made on first use,
    /// again after one failed). Two: the recorder's batches of sync calls' history and the
    /// durable writes of async runs come from two writer tasks, and an enqueue must not wait
    /// behind a batch of history.
    writers: [parking_lot::Mutex<Option<runs::Writer>>; 2],
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.listener
            .stop
            .store(true, std::sync::atomic::Ordering::Release);
        // Each client owns a runtime, which may not be dropped on an async thread.
        let writers: Vec<_> = self.writers.iter().map(|w| w.lock().take()).collect();
        let listening = self.listener.take_prepared();
        if let Some(pool) = self.pool.take() {
            let _ = std::thread::Builder::new()
                .name("postgres-close".into())
                .spawn(move || drop((pool, writers, listening)));
        }
    }
}

impl PgStore {
    /// Connects (a first connection at once, so that a wrong URL or password is told now)
    /// and brings the schema up to date — safely when several servers start together (one
    /// migrates while the others wait on a lock, then find nothing to do). Blocking: call it
    /// off the async threads.
    pub fn connect(options: &PgOptions) -> Result<PgStore> {
        let mut config: postgres::Config = options.url.parse().map_err(|e| StoreError::Remote {
            action: "read the database URL".into(),
            detail: format!("{e}"),
        })?;
        if let Some(p) = &options.password {
            config.password(p);
        }
        config.connect_timeout(options.connect_timeout);
        config.application_name("dispatch");
        // A first connection outside the pool: its error (refused, bad password, no such
        // database, an untrusted certificate) is the one to show, where the pool would only
        // say it timed out.
        let (pool, connect) = match tls_config(options, &config)? {
            None => {
                let (pool, connect) = open(config, postgres::NoTls, options)?;
                (Pool::Plain(pool), connect)
            }
            Some(tls) => {
                config.ssl_mode(postgres::config::SslMode::Require);
                let (pool, connect) = open(config, MakeRustlsConnect::new(tls), options)?;
                (Pool::Tls(pool), connect)
            }
        };
        let listener = listen::Listener::new(connect);
        listener.prepare();
        Ok(PgStore {
            pool: Some(pool),
            listener,
            writers: Default::default(),
        })
    }

    /// Writes runs on a writer connection (see [`runs::Writer`]).
    pub(crate) fn with_writer<T>(
        &self,
        f: impl FnOnce(&mut runs::Writer) -> Result<T>,
    ) -> Result<T> {
        // A free one, else wait for the first.
        let mut w = self
            .writers
            .iter()
            .find_map(|w| w.try_lock())
            .unwrap_or_else(|| self.writers[0].lock());
        if w.is_none() {
            *w = Some(runs::Writer::new(self.listener.connect()?)?);
        }
        let res = f(w.as_mut().expect("made above"));
        if res.is_err() && w.as_ref().is_some_and(|w| w.is_closed()) {
            *w = None;
        }
        res
    }

    /// A connection from the pool.
    pub(crate) fn conn(&self) -> Result<Conn> {
        Ok(
            match self
                .pool
                .as_ref()
                .expect("the pool lives as long as the store")
            {
                Pool::Plain(p) => Conn::Plain(p.get()?),
                Pool::Tls(p) => Conn::Tls(p.get()?),
            },
        )
    }

    /// Runs a `SELECT body …` of at most one row and decodes its JSON body.
    pub(crate) fn body<T: serde::de::DeserializeOwned>(
        &self,
        sql: &str,
        params: &Params<'_>,
    ) -> Result<Option<T>> {
        match self.conn()?.query_opt(sql, params)? {
            Some(row) => Ok(Some(serde_json::from_str(row.get::<_, &str>(0))?)),
            None => Ok(None),
        }
    }

    /// Runs a `SELECT body …` and decodes every row's JSON body.
    pub(crate) fn bodies<T: serde::de::DeserializeOwned>(
        &self,
        sql: &str,
        params: &Params<'_>,
    ) -> Result<Vec<T>> {
        bodies(&mut *self.conn()?, sql, params)
    }
}

/// [`PgStore::bodies`] on a given connection or transaction.
pub(crate) fn bodies<T: serde::de::DeserializeOwned>(
    c: &mut impl postgres::GenericClient,
    sql: &str,
    params: &Params<'_>,
) -> Result<Vec<T>> {
    c.query(sql, params)?
        .iter()
        .map(|row| Ok(serde_json::from_str(row.get::<_, &str>(0))?))
        .collect()
}

pub(crate) fn ms_to_ts(ms: i64) -> jiff::Timestamp {
    jiff::Timestamp::from_millisecond(ms).unwrap_or(jiff::Timestamp::UNIX_EPOCH)
}

/// A count or size column (never below zero).
pub(crate) fn unsigned(v: i64) -> u64 {
    v.max(0) as u64
}

/// Over one kind of connection (plain or TLS): migrates on a first connection, then the
/// pool, and how the listener connects.
fn open<T>(
    config: postgres::Config,
    tls: T,
    options: &PgOptions,
) -> Result<(r2d2::Pool<PostgresConnectionManager<T>>, listen::Connect)>
where
    T: postgres::tls::MakeTlsConnect<postgres::Socket> + Clone + Send + Sync + 'static,
    T::TlsConnect: Send,
    T::Stream: Send,
    <T::TlsConnect as postgres::tls::TlsConnect<postgres::Socket>>::Future: Send,
{
    let mut first = config.connect(tls.clone())?;
    schema::migrate(&mut first)?;
    drop(first);
    let (c, t) = (config.clone(), tls.clone());
    let pool = pool_builder(options).build(PostgresConnectionManager::new(config, tls))?;
    Ok((pool, Box::new(move || Ok(c.connect(t.clone())?))))
}

/// The pool's bounds.
fn pool_builder<M: r2d2::ManageConnection>(options: &PgOptions) -> r2d2::Builder<M> {
    r2d2::Pool::builder()
        .max_size(options.max_connections.max(1))
        .min_idle(Some(1))
        .connection_timeout(options.connect_timeout)
}

/// The TLS settings of a connection, if it is to be TLS (see [`PgOptions::ca_file`]): rustls
/// with ring, certificates verified against the CA file or the system's CAs.
fn tls_config(
    options: &PgOptions,
    config: &postgres::Config,
) -> Result<Option<rustls::ClientConfig>> {
    use postgres::config::SslMode;
    let tls_error = |detail: String| StoreError::Remote {
        action: "set up TLS to the database".into(),
        detail,
    };
    let mut roots = rustls::RootCertStore::empty();
    match &options.ca_file {
        Some(file) => {
            use rustls_pki_types::pem::PemObject;
            let certs: Vec<rustls_pki_types::CertificateDer<'static>> =
                rustls_pki_types::CertificateDer::pem_file_iter(file)
                    .and_then(|it| it.collect::<std::result::Result<_, _>>())
                    .map_err(|e| tls_error(format!("reading {}: {e}", file.display())))?;
            if certs.is_empty() {
                return Err(tls_error(format!(
                    "{} holds no PEM certificate",
                    file.display()
                )));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| tls_error(format!("{}: {e}", file.display())))?;
            }
        }
        None if config.get_ssl_mode() == SslMode::Require => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(tls_error(
                    "sslmode=require, and this system has no CA certificates: give the \
                     CA file (--database-ca-file)"
                        .into(),
                ));
            }
        }
        None => return Ok(None),
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(tls))
}
