//! What every benchmark shares: an in-process server on its own 2-thread runtime (like the CI
//! machine) with a separate single-threaded load generator, and percentiles.

#![allow(dead_code)]

use std::sync::Arc;

use dispatch_client::{Client, Target};
use dispatch_runtime::LocalBackend;
use dispatch_server::{Options, Server};
use dispatch_store::BlobStore;
use tokio::runtime::Runtime;

pub struct Bench {
    pub server_rt: Runtime,
    pub client_rt: Runtime,
    pub dir: tempfile::TempDir,
    pub server: Server,
    pub client: Client,
    pub local: Arc<LocalBackend>,
}

/// `DISPATCH_BENCH_N`, else `default`.
pub fn iterations(default: usize) -> usize {
    std::env::var("DISPATCH_BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A server with `options` (auth off: benchmarks measure the platform, not token checks) on
/// loopback, SQLite in a temporary dir (or PostgreSQL: `DISPATCH_BENCH_DATABASE`), real
/// local workers.
pub fn start(options: Options) -> Bench {
    dispatch_client::install_crypto_provider();
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        auth: false,
        jobs_dir: dir.path().join("jobs"),
        // As `dispatch server`: admissions check the data dir's free space.
        data_dir: options.data_dir.clone().or(Some(dir.path().to_path_buf())),
        ..options
    };
    let (server, local) = server_rt.block_on(async {
        // DISPATCH_BENCH_DATABASE=postgres://…: records and resources in that database
        // (an empty one: its tables are made) instead of SQLite files.
        let stores = match std::env::var("DISPATCH_BENCH_DATABASE") {
            Ok(url) => {
                let pg = tokio::task::spawn_blocking(move || {
                    dispatch_store::PgStore::connect(&dispatch_store::PgOptions::new(url))
                })
                .await
                .unwrap()
                .unwrap();
                dispatch_server::Stores::single(std::sync::Arc::new(pg))
            }
            Err(_) => dispatch_server::Stores::open(dir.path()).unwrap(),
        };
        let blobs = BlobStore::open(dir.path().join("blobs")).unwrap();
        let local = LocalBackend::new(dir.path()).unwrap();
        let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gw = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        (
            Server::builder()
                .stores(stores)
                .blobs(blobs)
                .backend(local.clone())
                .api_listener(api)
                .gateway_listener(gw)
                .options(options)
                .start()
                .await
                .unwrap(),
            local,
        )
    });
    let client = Client::new(&Target {
        server: format!("http://{}", server.api_addr),
        token: None,
        namespace: "default".into(),
        insecure: false,
    })
    .unwrap();
    Bench {
        server_rt,
        client_rt,
        dir,
        server,
        client,
        local,
    }
}

pub use dispatch_cli::commands::bench::pct;

/// The `q` quantile of durations, in milliseconds.
pub fn pct_ms(v: &mut [std::time::Duration], q: f64) -> f64 {
    let mut ms: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    pct(&mut ms, q)
}
