//! `dispatch server`: the embedded server (API + gateway + controller) until Ctrl-C/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result};

/// Run the embedded server: SQLite and builds in the data dir, functions as local workers
#[derive(Debug, clap::Args)]
pub struct Server {
    /// Where state lives (SQLite database, source blobs, builds); default ~/.dispatch
    #[arg(long, env = "DISPATCH_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address of the control-plane API
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    pub api_addr: SocketAddr,
    /// Address of the gateway serving endpoints
    #[arg(long, default_value = "127.0.0.1:8081", value_name = "ADDR")]
    pub gateway_addr: SocketAddr,
    /// Finished runs are deleted this long after they were created (e.g. 7d, 12h)
    #[arg(long, default_value = "7d", value_parser = duration)]
    pub run_retention: Duration,
    /// Finished runs kept per function at most (newest first)
    #[arg(long, default_value_t = 10_000)]
    pub runs_per_function: usize,
    /// Run records (inputs, outputs, logs as stored) kept per namespace at most; past it the
    /// oldest finished runs are pruned, a batch at a time, e.g. 4Gi (0: no byte bound)
    #[arg(long, default_value = "1Gi", value_parser = bytes, value_name = "SIZE")]
    pub run_history_budget: u64,
    /// Logs kept per run record, in bytes (the rest is cut with a "truncated" marker)
    #[arg(long, default_value_t = 1024 * 1024)]
    pub max_run_log_bytes: usize,
    /// Async runs waiting per namespace before new ones get 429
    #[arg(long, default_value_t = 10_000)]
    pub max_queue_depth: usize,
    /// Async runs waiting or running per function before new ones get 429 (a function's
    /// spec.maxQueued overrides it), so one hot endpoint cannot take its namespace's queue
    #[arg(long, default_value_t = 1_000, value_name = "N")]
    pub max_queued_per_function: usize,
    /// Payload bytes of the async runs waiting or running per namespace before new ones get
    /// 429 (e.g. 256Mi)
    #[arg(long, default_value = "256Mi", value_parser = bytes, value_name = "SIZE")]
    pub max_queued_bytes: u64,
    /// Largest payload of an async call or event (it is stored until it runs; sync calls
    /// take up to 6Mi); past it 413
    #[arg(long, default_value = "1Mi", value_parser = bytes, value_name = "SIZE")]
    pub max_async_payload: u64,
    /// Function workers alive at once, all functions together; past it the least recently
    /// used idle worker of another function is stopped, and when none is idle a cold start
    /// waits within its call's timeout, then gets 429
    #[arg(long, default_value_t = dispatch_runtime::budget::DEFAULT_MAX_WORKERS_TOTAL, value_name = "N")]
    pub max_workers_total: usize,
    /// Memory all function workers may hold together, each counted at its memory limit
    /// (spec.resources.memory, 256Mi by default), e.g. 8Gi (default: 3/4 of this machine's RAM)
    #[arg(long, value_parser = bytes, value_name = "SIZE")]
    pub worker_memory_budget: Option<u64>,
    /// Free space of the data dir's disk kept for work already accepted: below it new async
    /// runs, events, job executions and uploads get 507 InsufficientStorage, e.g. 2Gi
    /// (default: 5 % of the file system, at most 1Gi; 0 turns it off)
    #[arg(long, value_parser = bytes, value_name = "SIZE")]
    pub min_free_disk: Option<u64>,
    /// How long an event is kept; an event delivery waiting for room in its function's
    /// queue is retried this long, then it is dead (listed by `dispatch get events
    /// --undelivered`, redelivered by `dispatch redeliver`), e.g. 24h
    #[arg(long, default_value = "24h", value_parser = duration, value_name = "DURATION")]
    pub event_ttl: Duration,
    /// Event deliveries waiting for room in their functions' queues per namespace; past it
    /// new events get 429 with Retry-After and nothing is stored
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    pub max_pending_deliveries: usize,
    /// Open WebSocket connections per namespace (endpoints with protocol: websocket); past it
    /// a new connection gets 429 with Retry-After. Each also counts against
    /// --max-gateway-connections while it is open
    #[arg(long, default_value_t = dispatch_server::websocket::DEFAULT_MAX_PER_NAMESPACE, value_name = "N")]
    pub max_websockets_per_namespace: usize,
    /// How long a dead event delivery (and its event) is kept for a redelivery, e.g. 7d
    #[arg(long, default_value = "7d", value_parser = duration, value_name = "DURATION")]
    pub dead_delivery_retention: Duration,
    /// Async runs running at once (all functions)
    #[arg(long, default_value_t = 64)]
    pub max_running: usize,
    /// Log one line per request on both ports (target dispatch::access): edge, method, route,
    /// status, duration_ms to the response's head, run_id, trace_id (from the client's
    /// traceparent). With --log-format json, one JSON object a line
    #[arg(long, env = "DISPATCH_ACCESS_LOG")]
    pub access_log: bool,
    /// Export the server's spans (requests, queueing, cold starts, worker calls, builds, job
    /// executions, event deliveries) over OTLP/HTTP protobuf to this collector, e.g.
    /// http://otel-collector:4318 (/v1/traces is added; OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
    /// names the full URL instead). Service name: OTEL_SERVICE_NAME, else dispatch
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// The gateway's address as its clients reach it, e.g. https://fn.example.com behind an
    /// ingress: the web console's endpoint links (default: the console's host name with the
    /// gateway's port)
    #[arg(long, env = "DISPATCH_GATEWAY_URL", value_name = "URL")]
    pub gateway_url: Option<String>,
    /// A trace viewer's link with {traceId} in it, e.g. http://jaeger:16686/trace/{traceId}:
    /// the web console links each run to its trace there
    #[arg(long, env = "DISPATCH_TRACE_URL", value_name = "URL")]
    pub trace_url: Option<String>,
    /// Synchronous calls of one function that may wait when all its maxWorkers are busy;
    /// past it a call gets 429 with Retry-After
    #[arg(long, default_value_t = dispatch_runtime::DEFAULT_MAX_WAITING_CALLS)]
    pub max_waiting_calls: usize,
    /// Open gateway connections at most; past it a new one is answered 503 and closed
    /// (default: 40 % of the open-files limit, at most 16384; the limit is raised to its hard
    /// value at start)
    #[arg(long, value_name = "N")]
    pub max_gateway_connections: Option<usize>,
    /// Open API connections at most, a share of its own that a gateway flood cannot take
    /// (default: 10 % of the open-files limit, at most 1024)
    #[arg(long, value_name = "N")]
    pub max_api_connections: Option<usize>,
    /// A request's headers must arrive within this, and a keep-alive connection idle this
    /// long after its last answer is closed (both listeners)
    #[arg(long, default_value = "10s", value_parser = duration, value_name = "DURATION")]
    pub header_timeout: Duration,
    /// A request body that sends nothing for this long is cut with 408 (both listeners)
    #[arg(long, default_value = "10s", value_parser = duration, value_name = "DURATION")]
    pub body_timeout: Duration,
    /// Serve without tokens: every caller is admin (loopback only)
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// How user code runs (embedded backend): `sandbox` (the default) gives every function
    /// worker, zygote, exec handler, job command and image build its own mount, PID, IPC and
    /// UTS namespaces with a minimal read-only root, an unprivileged identity (a uid per
    /// namespace), no capabilities, no_new_privs, Landlock, a seccomp deny list and cgroup
    /// limits from spec.resources. `none` runs user code as the server itself, with its files
    /// and identity: development only, refused on a non-loopback address
    #[arg(long, default_value = "sandbox", value_name = "sandbox|none", value_parser = isolation)]
    pub isolation: dispatch_runtime::sandbox::Isolation,
    /// Sandbox layers to run without when this kernel or host lacks them (comma-separated:
    /// landlock, seccomp, cgroups). The server refuses to start when a layer is missing and
    /// not named here: it never lowers isolation on its own
    #[arg(long, value_name = "LAYERS", value_parser = lowered, default_value = "")]
    pub sandbox_without: dispatch_runtime::sandbox::Lowered,
    /// TLS certificate chain (PEM) for both listeners; with --tls-key
    #[arg(long, requires = "tls_key", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM)
    #[arg(long, requires = "tls_cert", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// On SIGTERM or Ctrl-C, first answer /readyz with 503 for this long while still serving
    /// everything, then stop: a load balancer or Kubernetes Service sees the server go unready
    /// and stops sending it requests before its listeners close (a second signal stops at
    /// once), e.g. 5s; 0 stops at once
    #[arg(long, default_value = "0s", value_parser = duration, value_name = "DURATION")]
    pub shutdown_delay: Duration,
    /// Keep records (runs, the async queue, job executions, events, tokens, the audit log)
    /// and resources in this PostgreSQL database instead of SQLite files in the data dir,
    /// e.g. postgres://dispatch@db:5432/dispatch (libpq's key=value form works too); the
    /// schema is created or upgraded at start. On --backend kubernetes resources stay
    /// custom resources. Several servers may share one database, all active (see
    /// --replica-lease and --secret-key-file); source archives are kept in it too. The data
    /// dir keeps builds, a copy of the archives and, by default, the secrets key
    #[arg(long, env = "DISPATCH_DATABASE_URL", value_name = "URL")]
    pub database: Option<String>,
    /// A file holding the database password (instead of one in the URL); the environment
    /// variable DISPATCH_DATABASE_PASSWORD works too
    #[arg(long, value_name = "FILE", requires = "database")]
    pub database_password_file: Option<PathBuf>,
    /// Connections to the database kept open at most
    #[arg(long, default_value_t = 16, value_name = "N", requires = "database")]
    pub database_connections: u32,
    /// PEM file of the CA that signed the database server's certificate: the connection is
    /// TLS, the certificate and host name verified (without it, `?sslmode=require` in the
    /// URL verifies against the system's CAs; otherwise plain TCP)
    #[arg(long, value_name = "FILE", requires = "database")]
    pub database_ca_file: Option<PathBuf>,
    /// With --database, several servers may share it, all active: each holds a lease this
    /// long, renewed every quarter of it; when a server stops renewing (it died), another
    /// takes its async runs (QUEUED ones run there, RUNNING ones count a failed attempt and
    /// are retried per policy), pending callbacks and job executions after at most this long
    #[arg(long, default_value = "10s", value_parser = duration, value_name = "DURATION", requires = "database")]
    pub replica_lease: Duration,
    /// The key that seals secrets (32 bytes; created when missing); default
    /// DATA_DIR/secret.key. Servers sharing a database must use the same key (one refuses
    /// to start with another): mount one file into each, e.g. from a Kubernetes Secret
    #[arg(long, env = "DISPATCH_SECRET_KEY_FILE", value_name = "FILE")]
    pub secret_key_file: Option<PathBuf>,
    /// Where functions run: embedded (local worker processes) or kubernetes (a Deployment
    /// and Service per function in the cluster of the in-cluster config or kubeconfig, images
    /// built without a daemon and pushed to --registry)
    #[arg(long, default_value = "embedded", value_parser = ["embedded", "kubernetes"])]
    pub backend: String,
    /// Kubernetes: where function images are pushed (registry host and path)
    #[arg(
        long,
        value_name = "REPOSITORY",
        required_if_eq("backend", "kubernetes")
    )]
    pub registry: Option<String>,
    /// A registry (host:port) reached over plain HTTP, for image pushes (Kubernetes) and the
    /// container tier's pulls; repeatable
    #[arg(long, value_name = "HOST")]
    pub insecure_registry: Vec<String>,
    /// Docker config with registry credentials for pushes and pulls (default
    /// $DOCKER_CONFIG/config.json or ~/.docker/config.json)
    #[arg(long, value_name = "FILE")]
    pub docker_config: Option<PathBuf>,
    /// Container tier: a registry serving Docker Hub's repositories (`alpine:latest` is pulled
    /// as MIRROR/library/alpine:latest); `http://HOST:PORT` for plain HTTP
    #[arg(long, env = "DISPATCH_REGISTRY_MIRROR", value_name = "MIRROR")]
    pub registry_mirror: Option<String>,
    /// Container tier: the OCI runtime job containers run with (default: crun where it works,
    /// else runc, found on PATH; without one, job templates whose containers name an image
    /// fail unless their spec.runtime is host)
    #[arg(long, value_name = "PATH")]
    pub oci_runtime: Option<PathBuf>,
    /// Container tier: the largest image pulled (its compressed layers); a bigger one fails
    /// the job or function that names it before anything is downloaded
    #[arg(long, default_value = "4Gi", value_parser = bytes, value_name = "SIZE")]
    pub max_image_size: u64,
    /// Kubernetes: run functions as Knative Services (scale to zero) instead of Deployments
    #[arg(long)]
    pub knative: bool,
    /// Kubernetes: the dockerconfigjson Secret function pods pull with (in each function's
    /// namespace)
    #[arg(long, value_name = "SECRET")]
    pub pull_secret: Option<String>,
    /// Kubernetes: the namespace of the Lease electing the server that runs the cron
    /// scheduler (this server's; holder: $POD_NAME, else the host name)
    #[arg(long, env = "POD_NAMESPACE", default_value = "dispatch")]
    pub lease_namespace: String,
}

fn bytes(s: &str) -> Result<u64, String> {
    dispatch_core::quantity::parse_bytes(s)
}

fn duration(s: &str) -> Result<Duration, String> {
    dispatch_core::duration::parse_duration(s).map_err(|e| e.message)
}

impl Server {
    pub fn options(&self) -> dispatch_server::Options {
        dispatch_server::Options {
            max_log_bytes: self.max_run_log_bytes,
            run_retention: self.run_retention,
            runs_per_function: self.runs_per_function.max(1),
            run_history_budget: (self.run_history_budget > 0).then_some(self.run_history_budget),
            max_queue_depth: self.max_queue_depth.max(1),
            max_queued_per_function: self.max_queued_per_function.max(1),
            max_queued_bytes: self.max_queued_bytes.max(1),
            max_async_payload: usize::try_from(self.max_async_payload)
                .unwrap_or(usize::MAX)
                .clamp(1, dispatch_core::MAX_PAYLOAD_BYTES),
            max_running: self.max_running.max(1),
            replica_lease: self.replica_lease.max(Duration::from_millis(400)),
            secret_key_file: self.secret_key_file.clone(),
            max_waiting_calls: self.max_waiting_calls,
            auth: !self.insecure_no_auth,
            access_log: self.access_log,
            otlp_traces_url: dispatch_server::otlp::traces_url(
                self.otlp_endpoint.as_deref(),
                std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                    .ok()
                    .as_deref(),
            ),
            gateway_url: self.gateway_url.clone(),
            trace_url: self.trace_url.clone(),
            max_workers_total: self.max_workers_total.max(1),
            worker_memory_budget: self.worker_memory_budget,
            min_free_disk: self.min_free_disk,
            event_ttl: self.event_ttl,
            max_pending_deliveries: self.max_pending_deliveries.max(1),
            max_websockets_per_namespace: self.max_websockets_per_namespace,
            dead_delivery_retention: self.dead_delivery_retention,
            edge: dispatch_server::serve::EdgeLimits {
                gateway_connections: self.max_gateway_connections.map(|n| n.max(1)),
                api_connections: self.max_api_connections.map(|n| n.max(1)),
                header_timeout: self.header_timeout,
                body_timeout: self.body_timeout,
            },
            ..Default::default()
        }
    }
}

/// What the Kubernetes mode puts in place of the embedded parts.
#[derive(Default)]
struct Parts {
    backend: Option<std::sync::Arc<dyn dispatch_runtime::Backend>>,
    resources: Option<dispatch_server::ResourcesFactory>,
}

impl Server {
    /// `--database` and its password (a file, else DISPATCH_DATABASE_PASSWORD).
    fn database_options(&self) -> Result<Option<dispatch_store::PgOptions>> {
        let Some(url) = &self.database else {
            return Ok(None);
        };
        if !(url.starts_with("postgres://")
            || url.starts_with("postgresql://")
            || url.contains('='))
        {
            anyhow::bail!(
                "--database takes a PostgreSQL URL (postgres://user@host:5432/db) or libpq's \
                 key=value form; without it the server keeps SQLite files in the data dir"
            );
        }
        let mut o = dispatch_store::PgOptions::new(url.clone());
        o.max_connections = self.database_connections.max(1);
        o.ca_file = self.database_ca_file.clone();
        o.password = match &self.database_password_file {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .with_context(|| format!("reading the database password from {}", f.display()))?
                    .trim_end_matches(['\n', '\r'])
                    .to_string(),
            ),
            None => std::env::var("DISPATCH_DATABASE_PASSWORD").ok(),
        };
        Ok(Some(o))
    }

    /// The Kubernetes backend and custom-resource store when asked for (none: the embedded
    /// parts).
    async fn parts(&self) -> Result<Parts> {
        if self.backend != "kubernetes" {
            if self.registry.is_some() || self.knative || self.pull_secret.is_some() {
                anyhow::bail!("--registry, --knative and --pull-secret need --backend kubernetes");
            }
            return Ok(Parts::default());
        }
        let client = kube::Client::try_default().await.context(
            "connecting to Kubernetes (in-cluster service account, else KUBECONFIG or ~/.kube/config)",
        )?;
        let mut options = dispatch_k8s::backend::KubernetesOptions::new(
            self.registry.clone().unwrap_or_default(),
            std::env::current_exe().context("finding this dispatch binary")?,
        );
        options.registry =
            super::k8s::registry_options(&self.insecure_registry, self.docker_config.as_deref())?;
        options.knative = self.knative;
        options.pull_secret = self.pull_secret.clone();
        let holder = std::env::var("POD_NAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| format!("dispatch-{}", std::process::id()));
        options.lease = Some(dispatch_k8s::lease::LeaseConfig::new(
            &self.lease_namespace,
            &holder,
        ));
        options.job_owners = true;
        options.executions = true;
        let backend = dispatch_k8s::backend::KubernetesBackend::new(client.clone(), options);
        let resources: dispatch_server::ResourcesFactory = Box::new(move |sql| {
            Box::pin(async move {
                let store = dispatch_k8s::store::CrStore::start(client, sql).await?;
                Ok(std::sync::Arc::new(store) as std::sync::Arc<dyn dispatch_store::ResourceStore>)
            })
        });
        Ok(Parts {
            backend: Some(backend),
            resources: Some(resources),
        })
    }

    pub async fn run(self) -> Result<ExitCode> {
        let loopback = self.api_addr.ip().is_loopback() && self.gateway_addr.ip().is_loopback();
        if self.insecure_no_auth && !loopback {
            anyhow::bail!(
                "refusing --insecure-no-auth on a non-loopback address (DESIGN §9): anyone who can \
                 reach it could run anything; drop the flag (tokens) or bind 127.0.0.1"
            );
        }
        if self.header_timeout.is_zero() || self.body_timeout.is_zero() {
            anyhow::bail!(
                "--header-timeout and --body-timeout must be longer than 0 (e.g. 10s): a zero \
                 timeout would cut every request"
            );
        }
        let no_isolation = self.isolation == dispatch_runtime::sandbox::Isolation::None;
        if no_isolation && !loopback {
            anyhow::bail!(
                "refusing --isolation none on a non-loopback address (DESIGN §9): every caller's \
                 code would run as this server, with its files and tokens; drop the flag or bind \
                 127.0.0.1"
            );
        }
        if !loopback && self.tls_cert.is_none() {
            tracing::warn!(
                "listening beyond loopback without TLS: tokens cross the network in clear; put a TLS proxy in front"
            );
        }
        let mut options = self.options();
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            options.tls = Some(dispatch_server::tls::load(cert, key)?);
        }
        let parts = self.parts().await?;
        let database = self.database_options()?;
        let data_dir = match self.data_dir.clone() {
            Some(d) => d,
            None => crate::config::home()
                .context("HOME is not set: pass --data-dir")?
                .join(".dispatch"),
        };
        // Before anything is made inside it (the sandbox root is).
        dispatch_server::private_data_dir(&data_dir)?;
        if parts.backend.is_none() {
            options.sandboxes = sandboxes(self.isolation, self.sandbox_without, &data_dir).await?;
            options.containers = self.containers(&data_dir)?;
        } else if self.registry_mirror.is_some() || self.oci_runtime.is_some() {
            anyhow::bail!(
                "--registry-mirror and --oci-runtime are for the embedded backend's container tier \
                 (on Kubernetes the cluster pulls and runs images)"
            );
        }
        let config = dispatch_server::Config {
            data_dir,
            api_addr: self.api_addr,
            gateway_addr: self.gateway_addr,
            options,
        };
        if let Some(url) = &config.options.otlp_traces_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            anyhow::bail!(
                "--otlp-endpoint {url:?} is not an http:// or https:// URL (an OTLP/HTTP collector, e.g. http://otel-collector:4318)"
            );
        }
        for (flag, url) in [
            ("--gateway-url", &config.options.gateway_url),
            ("--trace-url", &config.options.trace_url),
        ] {
            if let Some(url) = url
                && !(url.starts_with("http://") || url.starts_with("https://"))
            {
                anyhow::bail!("{flag} {url:?} is not an http:// or https:// URL");
            }
        }
        if let Some(url) = &config.options.trace_url
            && !url.contains("{traceId}")
        {
            anyhow::bail!(
                "--trace-url {url:?} has no {{traceId}} for the run's trace id, e.g. http://jaeger:16686/trace/{{traceId}}"
            );
        }
        let scheme = if config.options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        crate::say(&format!(
            "dispatch server: api {scheme}://{} gateway {scheme}://{} data {} console {scheme}://{}/ui/",
            config.api_addr,
            config.gateway_addr,
            config.data_dir.display(),
            config.api_addr
        ));
        let mut builder = dispatch_server::Server::builder()
            .data_dir(&config.data_dir)
            .api_addr(config.api_addr)
            .gateway_addr(config.gateway_addr)
            .options(config.options.clone());
        if let Some(db) = database {
            crate::say(&format!(
                "dispatch server: records in {}",
                dispatch_server::redacted(&db.url)
            ));
            builder = builder.database(db);
        }
        if let Some(b) = parts.backend {
            builder = builder.backend(b);
        }
        if let Some(r) = parts.resources {
            builder = builder.resources(r);
        }
        let mut signals = ShutdownSignals::new();
        let server = builder.start().await?;
        if let Some(file) = &server.admin_token_file {
            crate::say(&format!(
                "first start: an admin token was written to {} (mode 0600); use it with\n  export DISPATCH_TOKEN=$(cat {})\n  or: dispatch login --server http://{} --token $(cat {})",
                file.display(),
                file.display(),
                config.api_addr,
                file.display()
            ));
        } else if !config.options.auth {
            crate::say("authentication is OFF (--insecure-no-auth): every caller is admin");
        }
        signals.recv().await;
        if !self.shutdown_delay.is_zero() {
            server.stop_taking_traffic();
            tracing::info!(
                "shutting down: /readyz answers 503; serving {:?} more before stopping",
                self.shutdown_delay
            );
            tokio::select! {
                _ = tokio::time::sleep(self.shutdown_delay) => {}
                _ = signals.recv() => {}
            }
        }
        tracing::info!("shutting down: draining in-flight calls");
        server.stop().await?;
        Ok(ExitCode::SUCCESS)
    }
}

impl Server {
    /// The container tier of an embedded server: its image store and OCI runtime. Without a
    /// runtime the server still starts (and says so): only job containers that name an image
    /// need one.
    fn containers(
        &self,
        data_dir: &std::path::Path,
    ) -> Result<Option<std::sync::Arc<dispatch_runtime::container::Containers>>> {
        use dispatch_runtime::container::{Containers, Engine, Images};
        let engine = match Engine::detect(self.oci_runtime.as_deref(), data_dir) {
            Ok(e) => e,
            Err(e) if self.oci_runtime.is_none() => {
                crate::say(&format!(
                    "containers: off ({e}); job containers that name an image fail unless the template says spec.runtime: host"
                ));
                return Ok(None);
            }
            Err(e) => anyhow::bail!("--oci-runtime: {e}"),
        };
        // Containers of a previous run that died with it.
        engine.reap_all();
        let registry =
            super::k8s::registry_options(&self.insecure_registry, self.docker_config.as_deref())?;
        let images = Images::open(data_dir, registry, self.registry_mirror.as_deref())
            .context("opening the image store")?
            .with_max_bytes(self.max_image_size);
        crate::say(&format!(
            "containers: {} ({}), images in {}",
            engine.name,
            engine.version,
            data_dir.join("images").display()
        ));
        Ok(Some(std::sync::Arc::new(Containers {
            images,
            engine: std::sync::Arc::new(engine),
        })))
    }
}

/// The sandboxes of an embedded server, proven to start (DESIGN §9); says at start which
/// isolation the server uses, and fails closed when a layer is missing.
async fn sandboxes(
    isolation: dispatch_runtime::sandbox::Isolation,
    lowered: dispatch_runtime::sandbox::Lowered,
    data_dir: &std::path::Path,
) -> Result<Option<std::sync::Arc<dispatch_runtime::sandbox::Sandboxes>>> {
    use dispatch_runtime::sandbox::{Isolation, Sandboxes};
    if isolation == Isolation::None {
        tracing::warn!(
            "isolation none: functions, job commands and builds run as this server, with its identity, its data dir and every tenant's tokens and secrets within reach; use it for development on a trusted machine only"
        );
        crate::say("isolation: none (user code runs unsandboxed, as the server)");
        return Ok(None);
    }
    let launcher =
        std::env::current_exe().context("cannot find this binary to launch sandboxes")?;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    let s = Sandboxes::new(launcher, data_dir, lowered).map_err(|e| {
        anyhow::anyhow!("the sandbox cannot run here: {e}; see --isolation and --sandbox-without")
    })?;
    let s = std::sync::Arc::new(s);
    s.check().await.map_err(|e| {
        anyhow::anyhow!("the sandbox cannot run here: {e}; see --isolation and --sandbox-without")
    })?;
    crate::say(&s.describe());
    Ok(Some(s))
}

fn isolation(s: &str) -> Result<dispatch_runtime::sandbox::Isolation, String> {
    s.parse()
}

fn lowered(s: &str) -> Result<dispatch_runtime::sandbox::Lowered, String> {
    s.parse()
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    ShutdownSignals::new().recv().await
}

/// SIGTERM and SIGINT, caught from creation on: made before the server starts serving, so
/// that a signal right after it is ready stops it gracefully rather than killing it.
pub struct ShutdownSignals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl ShutdownSignals {
    pub fn new() -> ShutdownSignals {
        use tokio::signal::unix::{SignalKind, signal};
        ShutdownSignals {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
        }
    }

    /// The next SIGTERM or SIGINT.
    pub async fn recv(&mut self) {
        async fn one(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
        tokio::select! {
            _ = one(&mut self.term) => {}
            _ = one(&mut self.int) => {}
        }
    }
}

impl Default for ShutdownSignals {
    fn default() -> Self {
        Self::new()
    }
}
