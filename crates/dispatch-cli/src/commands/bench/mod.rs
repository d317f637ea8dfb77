//! `dispatch bench`: how fast Dispatch is on this machine, measured end to end.
//!
//! Starts an embedded server in this process (SQLite in a temporary dir, real Python and
//! Node workers, auth off) on free loopback ports, deploys the hello examples and measures:
//! the bare worker round trip (the floor); warm calls through the gateway and the API at each
//! concurrency (req/s, p50, p99); cold starts after scale to zero, per start method (fork from
//! the zygote, spawn, a Node spare), end to end and split into steps; the idle warm worker's
//! USS; and, with many registered functions, listing them, routing among them and the
//! server's RSS per function.
//!
//! The load generator is this process too: keep-alive HTTP/1.1 connections (hyper), one per
//! concurrent caller, on one thread of its own. The server runs on the command's runtime.
//! Numbers come out as a table or as JSON (`-o json`).

mod accepted;
mod burst;
mod cold;
mod events;
mod faults;
mod history;
mod load;
mod process;
mod scale;
mod soak;
mod stream;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use dispatch_client::{Client, Target};
use dispatch_core::{Kind, Object, Phase};
use dispatch_runtime::LocalBackend;
use dispatch_runtime::pool::Pool;
use dispatch_runtime::worker::Worker;
use serde::Serialize;
use serde_json::json;
use serde_json::value::RawValue;

use cold::{cold_starts, idle_uss};
use load::{Request, load};
use scale::scale;

const HELLO_PY: &str = include_str!("../../../../../examples/python3/hello.py");
const HELLO_JS: &str = include_str!("../../../../../examples/nodejs/hello.js");

/// Measure warm throughput and latency, cold starts, worker memory and scale on this machine
#[derive(Debug, clap::Args)]
#[command(
    long_about = "Starts an embedded server on free loopback ports (temporary data dir, auth \
off), deploys the hello examples and measures: the bare worker round trip; warm calls via the \
gateway and the API at each concurrency (req/s, p50, p99); cold starts after scale to zero per \
start method (fork from the Python zygote, a plain spawn, a Node spare), end to end and split \
into steps; idle warm worker USS; and with --functions N registered functions: list time, \
route lookup and the RSS growth per function of a dispatch server process of its own. The load generator runs in this process on one \
thread, with one keep-alive connection per concurrent caller."
)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Bench {
    #[command(subcommand)]
    pub mode: Option<Mode>,
    /// How long each warm load runs (after a warm-up of a fifth of it)
    #[arg(long, default_value = "5s")]
    pub duration: String,
    /// Concurrent callers of the warm loads (comma-separated)
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    pub concurrency: Vec<usize>,
    /// Cold starts measured per start method
    #[arg(long, default_value_t = 100)]
    pub cold_samples: usize,
    /// Functions (and endpoints) registered for the scale test; 0 skips it
    #[arg(long, default_value_t = 10_000)]
    pub functions: usize,
    /// Small and fast (a smoke test): 1s loads, 10 cold samples, 200 functions
    #[arg(long)]
    pub quick: bool,
    /// Which isolation to measure: sandbox (the server's default), none, or both side by
    /// side (the scale test runs once, sandboxed)
    #[arg(long, default_value = "both", value_parser = ["sandbox", "none", "both"])]
    pub isolation: String,
    /// Output format: table or json
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
    pub output: String,
}

/// Long runs against a `dispatch server` process of its own
#[derive(Debug, clap::Subcommand)]
pub enum Mode {
    Soak(soak::Soak),
    Burst(burst::Burst),
    Faults(faults::Faults),
    History(history::History),
    Events(events::Events),
}

#[derive(Debug, Serialize)]
pub struct Report {
    /// `sandbox` or `none` (DESIGN §9).
    pub isolation: &'static str,
    pub machine: Machine,
    pub bare_worker: Latency,
    pub warm: Vec<Load>,
    /// p50 of the sequential (c=1) loads minus the bare worker's p50, in µs.
    pub overhead_p50_us: Overhead,
    pub cold_start: Vec<Cold>,
    pub idle_worker_uss_kib: Vec<Uss>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale: Option<Scale>,
    /// Streamed answers: time to the first chunk and throughput.
    pub stream: stream::Streaming,
    pub websockets: stream::IdleWebSockets,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub python: String,
    pub node: String,
}

#[derive(Debug, Serialize)]
pub struct Latency {
    pub calls: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub rps: f64,
}

#[derive(Debug, Serialize)]
pub struct Load {
    pub via: &'static str,
    pub concurrency: usize,
    pub requests: usize,
    pub errors: usize,
    /// The statuses of the failed requests, with their counts.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub error_statuses: std::collections::BTreeMap<u16, usize>,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Requests answered during the warm-up before the measured window.
    #[serde(skip)]
    pub warmup_requests: usize,
}

#[derive(Debug, Serialize)]
pub struct Overhead {
    pub gateway: Option<f64>,
    pub api: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Cold {
    pub method: &'static str,
    pub language: &'static str,
    pub samples: usize,
    /// What the caller saw: the whole call after scale to zero.
    pub e2e_p50_ms: f64,
    pub e2e_p99_ms: f64,
    /// The server's record of the cold start (coldStart.totalMs) and its steps, p50.
    pub total_p50_ms: f64,
    pub total_p99_ms: f64,
    pub spawn_p50_ms: f64,
    pub import_p50_ms: f64,
    pub first_call_p50_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct Uss {
    pub worker: &'static str,
    pub uss_kib: u64,
    pub rss_kib: u64,
}

#[derive(Debug, Serialize)]
pub struct Scale {
    pub functions: usize,
    pub register_seconds: f64,
    pub list_ms: f64,
    /// One route lookup in the gateway's table, with one endpoint and with all of them.
    pub route_lookup_ns_one: f64,
    pub route_lookup_ns_all: f64,
    /// A warm gateway call to the last function registered, p50.
    pub gateway_p50_us_last: f64,
    /// RSS of a `dispatch server` process of its own before and after the same functions
    /// are registered there (READY), and the growth per function.
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub rss_per_function_bytes: f64,
}

/// Idle WebSocket connections the full benchmark holds (the issue's 10,000).
const IDLE_WEBSOCKETS: usize = 10_000;

struct Setup {
    client: Client,
    local: Arc<LocalBackend>,
    server: dispatch_server::Server,
    api: SocketAddr,
    gateway: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Bench {
    pub async fn run(mut self) -> Result<ExitCode> {
        match self.mode.take() {
            Some(Mode::Soak(s)) => return s.run().await,
            Some(Mode::Burst(b)) => return b.run().await,
            Some(Mode::Faults(f)) => return f.run().await,
            Some(Mode::History(h)) => return h.run().await,
            Some(Mode::Events(e)) => return e.run().await,
            None => {}
        }
        if self.quick {
            self.duration = "1s".into();
            self.cold_samples = self.cold_samples.min(10);
            self.functions = self.functions.min(200);
        }
        let duration = dispatch_core::duration::parse_duration(&self.duration)
            .map_err(|e| anyhow::anyhow!("--duration: {}", e.message))?;
        if self.concurrency.iter().any(|c| *c == 0 || *c > 1024) {
            bail!("--concurrency: each level must be between 1 and 1024");
        }
        let json = self.output == "json";
        let say = |s: &str| {
            if !json {
                eprintln!("{s}");
            }
        };
        let modes: &[&'static str] = match self.isolation.as_str() {
            "both" => &["none", "sandbox"],
            "none" => &["none"],
            _ => &["sandbox"],
        };
        let mut reports = Vec::new();
        for (i, &isolation) in modes.iter().enumerate() {
            say(&format!(
                "starting an embedded server (isolation {isolation}) and deploying hello (python3, nodejs)…"
            ));
            let s = setup(isolation == "sandbox").await?;
            let last = i + 1 == modes.len();
            let report = self.measure(&s, duration, &say, last, isolation).await;
            s.server.stop().await?;
            reports.push(report?);
        }
        if json {
            match reports.as_slice() {
                [one] => println!("{}", serde_json::to_string_pretty(one)?),
                all => println!("{}", serde_json::to_string_pretty(all)?),
            }
        } else {
            for r in &reports {
                print_table(r);
                println!();
            }
        }
        Ok(ExitCode::SUCCESS)
    }

    async fn measure(
        &self,
        s: &Setup,
        duration: Duration,
        say: &dyn Fn(&str),
        with_scale: bool,
        isolation: &'static str,
    ) -> Result<Report> {
        say("bare worker round trip…");
        let calls = if self.quick { 500 } else { 5000 };
        let bare = bare_worker(&*pool(&s.local, "hello")?, calls).await?;

        let mut warm = Vec::new();
        let gw_req = Request::get(s.gateway, "/hello?name=bench");
        let api_req = Request::post(
            s.api,
            "/v1/namespaces/default/functions/hello/runs",
            r#"{"input":{"name":"bench"}}"#,
        );
        for (via, req) in [("gateway", &gw_req), ("api", &api_req)] {
            for &c in &self.concurrency {
                say(&format!("warm load via {via}, {c} concurrent callers…"));
                warm.push(load(via, req.clone(), c, duration).await?);
            }
        }
        let seq = |via: &str| {
            warm.iter()
                .find(|l| l.via == via && l.concurrency == 1)
                .map(|l| l.p50_us - bare.p50_us)
        };
        let overhead = Overhead {
            gateway: seq("gateway"),
            api: seq("api"),
        };

        let mut cold = Vec::new();
        for (function, method, language) in [
            ("hello", "fork", "python3"),
            ("hello-spawn", "spawn", "python3"),
            ("hello-js", "specialize", "nodejs"),
        ] {
            say(&format!(
                "{} cold starts of {function} ({method})…",
                self.cold_samples
            ));
            cold.push(cold_starts(s, function, method, language, self.cold_samples).await?);
        }

        say("idle worker memory…");
        let mut uss = Vec::new();
        for (function, worker) in [
            ("hello", "python3 (forked from the zygote)"),
            ("hello-spawn", "python3 (spawned)"),
            ("hello-js", "nodejs (specialized spare)"),
        ] {
            uss.push(idle_uss(s, function, worker).await?);
        }

        say("streamed answers: time to the first chunk, throughput of 64 KiB chunks…");
        let streaming = stream::streaming(
            s,
            if self.quick { 100 } else { 500 },
            if self.quick { 64 } else { 512 },
        )
        .await?;

        let sockets = if self.quick { 1_000 } else { IDLE_WEBSOCKETS };
        say(&format!("{sockets} idle WebSocket connections…"));
        let websockets = stream::idle_websockets(s, sockets).await?;

        let scale = if self.functions > 0 && with_scale {
            say(&format!(
                "registering {} functions and endpoints…",
                self.functions
            ));
            Some(scale(s, self.functions).await?)
        } else {
            None
        };
        Ok(Report {
            isolation,
            machine: Machine {
                cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
                python: version_of("python3").await,
                node: version_of("node").await,
            },
            bare_worker: bare,
            warm,
            overhead_p50_us: overhead,
            cold_start: cold,
            idle_worker_uss_kib: uss,
            scale,
            stream: streaming,
            websockets,
        })
    }
}

async fn version_of(program: &str) -> String {
    match tokio::process::Command::new(program)
        .arg("--version")
        .output()
        .await
    {
        Ok(o) => String::from_utf8_lossy(if o.stdout.is_empty() {
            &o.stderr
        } else {
            &o.stdout
        })
        .trim()
        .to_string(),
        Err(e) => format!("not found ({e})"),
    }
}

async fn setup(sandboxed: bool) -> Result<Setup> {
    let dir = tempfile::Builder::new()
        .prefix("dispatch-bench-")
        .tempdir()?;
    let stores = dispatch_server::Stores::open(dir.path())?;
    let blobs = dispatch_store::BlobStore::open(dir.path().join("blobs"))?;
    let local = LocalBackend::new(dir.path())?;
    let sandboxes = if sandboxed {
        let s = dispatch_runtime::sandbox::Sandboxes::new(
            std::env::current_exe()?,
            dir.path(),
            Default::default(),
        )
        .map_err(|e| anyhow::anyhow!("the sandbox cannot run here: {e}"))?;
        let s = Arc::new(s);
        s.check()
            .await
            .map_err(|e| anyhow::anyhow!("the sandbox cannot run here: {e}"))?;
        Some(s)
    } else {
        None
    };
    local.set_sandboxes(sandboxes.clone());
    let api_l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let gw_l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let options = dispatch_server::Options {
        auth: false,
        jobs_dir: dir.path().join("jobs"),
        sandboxes,
        // Room for the idle WebSocket connections measured (they are the point there).
        max_websockets_per_namespace: IDLE_WEBSOCKETS,
        edge: dispatch_server::serve::EdgeLimits {
            gateway_connections: Some(IDLE_WEBSOCKETS + 1024),
            ..Default::default()
        },
        ..Default::default()
    };
    let server = dispatch_server::Server::builder()
        .stores(stores)
        .blobs(blobs)
        .backend(local.clone())
        .api_listener(api_l)
        .gateway_listener(gw_l)
        .options(options)
        .start()
        .await?;
    let client = Client::new(&Target {
        server: format!("http://{}", server.api_addr),
        token: None,
        namespace: "default".into(),
        insecure: false,
    })?;
    let ns = "default";
    for (image, base) in [("py", "python3"), ("js", "nodejs")] {
        client
            .create(&Object::new(
                Kind::Image,
                ns,
                image,
                json!({"baseImage": base}),
            ))
            .await?;
    }
    let py = dir.path().join("hello.py");
    std::fs::write(&py, HELLO_PY)?;
    let js = dir.path().join("hello.js");
    std::fs::write(&js, HELLO_JS)?;
    let py_src = super::upload(&client, ns, "hello", &py).await?;
    let js_src = super::upload(&client, ns, "hello-js", &js).await?;
    let function = |name: &str, image: &str, src: &str, env: serde_json::Value| {
        Object::new(
            Kind::Function,
            ns,
            name,
            json!({"image": image, "source": src, "env": env}),
        )
    };
    client
        .create(&function("hello", "py", &py_src, json!({})))
        .await?;
    wait_ready(&client, "hello").await?;
    // The same function with zygotes off: its pool spawns every worker.
    local.set_fast_start(false);
    client
        .create(&function(
            "hello-spawn",
            "py",
            &py_src,
            json!({"BENCH": "spawn"}),
        ))
        .await?;
    wait_ready(&client, "hello-spawn").await?;
    local.set_fast_start(true);
    client
        .create(&function("hello-js", "js", &js_src, json!({})))
        .await?;
    wait_ready(&client, "hello-js").await?;
    client
        .create(&Object::new(
            Kind::Endpoint,
            ns,
            "hello",
            json!({"function": "hello", "methods": ["GET"], "paths": ["/hello"]}),
        ))
        .await?;
    Ok(Setup {
        api: server.api_addr,
        gateway: server.gateway_addr,
        client,
        local,
        server,
        _dir: dir,
    })
}

/// Waits (up to 2 min) for function `name` to settle; an error unless it is READY.
pub async fn wait_ready(client: &Client, name: &str) -> Result<()> {
    let o = super::wait_settled(client, Kind::Function, name, Duration::from_secs(120)).await?;
    if o.phase() != Some(Phase::Ready) {
        bail!("function {name} did not become READY: {}", o.status.reason);
    }
    Ok(())
}

fn pool(local: &LocalBackend, name: &str) -> Result<Arc<Pool>> {
    local
        .pool("default", name)
        .with_context(|| format!("function {name} is not deployed"))
}

/// The floor: one worker of hello's build, called directly over its socket, sequentially
/// (also the floor of `cargo bench --bench exec`).
pub async fn bare_worker(pool: &Pool, calls: usize) -> Result<Latency> {
    let spec = pool.config().worker.clone();
    let mut w = Worker::start(&spec, Duration::from_secs(10)).await?;
    let ctx = RawValue::from_string(r#"{"function":"hello","namespace":"default"}"#.into())?;
    let payload = RawValue::from_string(r#"{"name":"bench"}"#.into())?;
    let mut v = Vec::with_capacity(calls);
    let t = Instant::now();
    for i in 0..calls + calls / 10 {
        let t0 = Instant::now();
        w.call(
            &ctx,
            &payload,
            Duration::from_secs(5),
            Duration::from_secs(5),
            None,
        )
        .await
        .map_err(|e| anyhow::anyhow!("bare call failed: {}", e.error.message))?;
        if i >= calls / 10 {
            v.push(t0.elapsed().as_secs_f64() * 1e6);
        }
    }
    let el = t.elapsed().as_secs_f64();
    Ok(Latency {
        calls,
        p50_us: pct(&mut v, 0.50),
        p99_us: pct(&mut v, 0.99),
        rps: (calls + calls / 10) as f64 / el,
    })
}

/// The `q` quantile (0..1) of `v`, which it sorts (0 when empty). The cargo benches use it too.
pub fn pct(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
}

fn print_table(r: &Report) {
    println!(
        "dispatch bench — isolation {} — {} cpus, {}, node {}\n",
        r.isolation, r.machine.cpus, r.machine.python, r.machine.node
    );
    println!(
        "bare worker round trip       p50 {:>8.1} µs  p99 {:>8.1} µs  {:>8.0} req/s  ({} sequential calls)",
        r.bare_worker.p50_us, r.bare_worker.p99_us, r.bare_worker.rps, r.bare_worker.calls
    );
    println!("\nwarm hello                   req/s        p50 µs     p99 µs   requests  errors");
    for l in &r.warm {
        println!(
            "  {:<8} c={:<4}          {:>9.0}  {:>10.1} {:>10.1} {:>10} {:>7}",
            l.via, l.concurrency, l.rps, l.p50_us, l.p99_us, l.requests, l.errors
        );
    }
    let fmt = |o: Option<f64>| o.map_or("-".to_string(), |v| format!("{v:+.1} µs"));
    println!(
        "  overhead over the bare worker at p50 (c=1): gateway {}, api {}",
        fmt(r.overhead_p50_us.gateway),
        fmt(r.overhead_p50_us.api)
    );
    println!(
        "\ncold start after scale to zero   caller p50/p99 ms   server total p50/p99 ms   spawn|fork / import / first call p50 ms"
    );
    for c in &r.cold_start {
        println!(
            "  {:<8} {:<11} n={:<4} {:>7.2} / {:<7.2}      {:>7.2} / {:<7.2}          {:.2} / {:.2} / {:.2}",
            c.language,
            c.method,
            c.samples,
            c.e2e_p50_ms,
            c.e2e_p99_ms,
            c.total_p50_ms,
            c.total_p99_ms,
            c.spawn_p50_ms,
            c.import_p50_ms,
            c.first_call_p50_ms
        );
    }
    let st = &r.stream;
    println!(
        "\nstreamed answer, first chunk  bare p50/p99 {:.1} / {:.1} µs   gateway p50/p99 {:.1} / {:.1} µs   added p50 {:+.1} µs  (n={}; a bare loopback round trip here: {:.1} µs)",
        st.ttfb_bare_p50_us,
        st.ttfb_bare_p99_us,
        st.ttfb_gateway_p50_us,
        st.ttfb_gateway_p99_us,
        st.ttfb_added_p50_us,
        st.samples,
        st.loopback_rtt_p50_us
    );
    println!(
        "  64 KiB chunks through the gateway: {:.0} MiB/s ({} MiB, one client)",
        st.throughput_mib_s, st.throughput_mib
    );
    let ws = &r.websockets;
    println!(
        "  {} idle WebSocket connections: server RSS {} KiB → {} KiB, {:.0} bytes each (opened in {:.1} s)",
        ws.connections,
        ws.rss_before_kib,
        ws.rss_open_kib,
        ws.bytes_per_connection,
        ws.open_seconds
    );
    println!("\nidle warm worker                         USS KiB    RSS KiB");
    for u in &r.idle_worker_uss_kib {
        println!("  {:<36} {:>9} {:>10}", u.worker, u.uss_kib, u.rss_kib);
    }
    if let Some(s) = &r.scale {
        println!(
            "\n{} functions + endpoints: registered in {:.1} s; list {:.1} ms; route lookup {:.0} ns (1 route) → {:.0} ns (all); gateway p50 to the last {:.1} µs",
            s.functions,
            s.register_seconds,
            s.list_ms,
            s.route_lookup_ns_one,
            s.route_lookup_ns_all,
            s.gateway_p50_us_last
        );
        println!(
            "  server RSS {} KiB → {} KiB: {:.0} bytes per function",
            s.rss_before_kib, s.rss_after_kib, s.rss_per_function_bytes
        );
    }
}
