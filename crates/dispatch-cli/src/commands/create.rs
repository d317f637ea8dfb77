//! `dispatch create …`: base images, images, functions (packing a file or folder), endpoints,
//! or every document of a manifest (`-f`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use dispatch_core::events::{EventDriverSpec, SubscriptionSpec};
use dispatch_core::resource::{Concurrency, RuntimeDependencies};
use dispatch_core::{
    BaseImageSpec, EndpointSpec, FunctionSpec, ImageSpec, Kind, Object, SecretSpec,
};
use serde_json::json;

use super::{
    WaitArgs, ensure_ready, parse_env, prepare, read_manifest, said, upload, wait_settled,
};
use crate::Ctx;

/// Create resources (base-image, image, function, endpoint) or everything in a manifest
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Create {
    /// Create every resource of a YAML/JSON manifest (multi-document; `-` reads stdin)
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Print what was created as json or yaml (as the server stored it; a token with its
    /// secret), or name (kind/name lines); default: a line for people
    #[arg(short = 'o', long, value_enum, global = true)]
    pub output: Option<crate::output::Done>,
    #[command(subcommand)]
    pub what: Option<What>,
}

#[derive(Debug, clap::Subcommand)]
pub enum What {
    /// A language runtime: `dispatch create base-image python3-base python:3.11-slim`
    #[command(name = "base-image", visible_aliases = ["baseimage"])]
    BaseImage {
        name: String,
        /// OCI image reference (used by the Kubernetes backend; its name hints the language)
        image_ref: String,
        /// Language, when the reference does not name python3 or nodejs
        #[arg(long, value_parser = ["python3", "nodejs", "exec"])]
        language: Option<String>,
        /// Embedded mode: interpreter path or name on PATH (default python3 / node)
        #[arg(long)]
        interpreter: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// An image: a base image plus dependencies: `dispatch create image python3 python3-base`
    Image {
        name: String,
        base_image: String,
        /// requirements.txt (python3) or package.json (nodejs) to install into the image
        #[arg(long, value_name = "FILE")]
        runtime_deps: Option<PathBuf>,
        /// System packages: refused by both backends for now (install them in the base image)
        #[arg(long = "system-deps", value_name = "PACKAGE")]
        system_deps: Vec<String>,
        /// Package index for the dependencies: pip --index-url / npm --registry
        #[arg(long, value_name = "URL")]
        index_url: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// A function from a file or folder: `dispatch create function hello ./hello.py --image python3`
    Function {
        name: String,
        /// Source file or folder (packed as tar.gz and uploaded)
        path: PathBuf,
        /// Image to run on
        #[arg(long)]
        image: String,
        #[command(flatten)]
        handler: HandlerArgs,
        /// Secret whose keys the handler gets in context.secrets (repeatable)
        #[arg(long = "secret", value_name = "NAME")]
        secrets: Vec<String>,
        /// Most concurrent calls (workers) (default 4)
        #[arg(long)]
        max_workers: Option<u32>,
        /// Workers kept warm even when idle (default 0: scale to zero)
        #[arg(long)]
        min_workers: Option<u32>,
        /// Idle time before a worker is stopped, e.g. 5m
        #[arg(long)]
        idle_timeout: Option<String>,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// A secret from a JSON object file or literals: `dispatch create secret db --from-literal password=…`
    Secret {
        name: String,
        #[command(flatten)]
        data: SecretArgs,
    },
    /// A subscription: events of a type (or prefix `order.*`) run a function
    Subscription {
        name: String,
        #[arg(long)]
        event_type: String,
        /// The function: NAME, NAME@VERSION or NAME@ALIAS
        #[arg(long)]
        function: String,
        /// Only events from this source
        #[arg(long)]
        source: Option<String>,
    },
    /// An event driver: `--type cron --schedule "*/5 * * * *"`, `--type webhook --path /hooks/x`,
    /// or a broker: `--type nats|mqtt|kafka --config KEY=VALUE…`
    Eventdriver {
        name: String,
        #[arg(long = "type", value_parser = ["cron", "webhook", "nats", "mqtt", "kafka"])]
        kind: String,
        /// cron: 5 fields, 6 with seconds, @hourly…, or "@every 30s"
        #[arg(long)]
        schedule: Option<String>,
        /// cron: IANA time zone (default UTC)
        #[arg(long)]
        timezone: Option<String>,
        /// webhook: gateway path
        #[arg(long)]
        path: Option<String>,
        /// The event type it emits…
        #[arg(long, conflicts_with = "function")]
        event_type: Option<String>,
        /// …or the function it runs
        #[arg(long)]
        function: Option<String>,
        /// cron: fires missed while the server was down: skip, once, all
        #[arg(long, value_parser = ["skip", "once", "all"])]
        missed_runs: Option<String>,
        /// Broker settings (repeatable). nats: url=nats://127.0.0.1:4222 subject=orders.> and,
        /// for at-least-once, stream=ORDERS [durable=NAME]; mqtt (QoS 1, persistent session):
        /// url=mqtt://127.0.0.1:1883 topic=sensors/#; kafka: brokers=127.0.0.1:9092 topic=T
        /// [group=G] [offset=earliest|latest]
        #[arg(long = "config", value_name = "KEY=VALUE")]
        config: Vec<String>,
    },
    /// A namespace (Dispatch's organization): `dispatch create namespace team-a`
    Namespace {
        name: String,
        /// Its own budget for run records (e.g. 256Mi), instead of the server's
        /// --run-history-budget: past it the oldest finished records go (cluster admin)
        #[arg(long, value_name = "SIZE")]
        run_history_budget: Option<String>,
    },
    /// An API token (printed once): `dispatch create token ci --role developer --namespace team-a`
    Token {
        name: String,
        /// admin, developer or viewer
        #[arg(long, value_parser = ["admin", "developer", "viewer"])]
        role: String,
        /// The namespace it may use, or * for all
        #[arg(long = "token-namespace", visible_alias = "for-namespace")]
        token_namespace: Option<String>,
        /// Lifetime, e.g. 30d or 12h (default: never expires)
        #[arg(long)]
        expires: Option<String>,
    },
    /// A name for versions of a function, with weighted traffic:
    /// `dispatch create alias hello prod --version 3` or `--traffic 3=90,4=10`; call it as
    /// `hello@prod` (exec, endpoints, subscriptions, event drivers). Stored as hello.prod.
    #[command(disable_version_flag = true)]
    Alias {
        #[command(flatten)]
        target: AliasArgs,
    },
    /// An HTTP endpoint on the gateway: `dispatch create endpoint get-hello hello --method GET --path /hello`
    /// (`create api … -m POST -p /hello -a public`, Dispatch's spelling, works too)
    #[command(visible_alias = "api")]
    Endpoint {
        name: String,
        /// The function it calls: NAME, NAME@VERSION or NAME@ALIAS
        function: String,
        /// HTTP method (repeatable; default GET)
        #[arg(short = 'm', long = "method")]
        methods: Vec<String>,
        /// Path: /hello, /users/{id}, /api/* (repeatable; at least one)
        #[arg(short = 'p', long = "path", required = true)]
        paths: Vec<String>,
        /// Host to match (repeatable; default any)
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Answer CORS preflights and allow any origin
        #[arg(long)]
        cors: bool,
        /// Who may call it: public (default) or token (an API token with the developer role
        /// in the endpoint's namespace)
        #[arg(short = 'a', long, value_parser = ["public", "token"])]
        auth: Option<String>,
        /// How a streaming handler's chunks go out: chunked (default) or sse (server-sent
        /// events; a client sending Accept: text/event-stream gets them anyway)
        #[arg(long, value_parser = ["chunked", "sse"])]
        stream: Option<String>,
        /// websocket: the gateway holds each connection and calls the function for each
        /// message (its answer, or each chunk it yields, goes back as a message)
        #[arg(long, value_parser = ["http", "websocket"])]
        protocol: Option<String>,
        /// WebSocket: one worker per connection; the handler is called once and reads the
        /// messages as a stream (its payload), yielding what it sends back
        #[arg(long)]
        session: bool,
        /// WebSocket: close a connection silent both ways this long (default 5m)
        #[arg(long, value_name = "DURATION")]
        idle_timeout: Option<String>,
        /// WebSocket: close a connection open this long (default 1h)
        #[arg(long, value_name = "DURATION")]
        max_duration: Option<String>,
    },
}

/// How long `--wait` waits.
pub const WAIT: Duration = Duration::from_secs(600);

impl Create {
    pub async fn run(self, ctx: &Ctx) -> Result<ExitCode> {
        let c = &ctx.client;
        let ns = c.namespace().to_string();
        let mut report = crate::output::Report::new(self.output);
        let what = match self.what {
            None => {
                let Some(file) = self.file else {
                    bail!(
                        "say what to create (base-image, image, function, endpoint) or pass -f FILE; see `dispatch create --help`"
                    );
                };
                let (docs, base) = read_manifest(&file)?;
                for d in &docs {
                    let o = prepare(c, d, &base).await?;
                    let created = c.create(&o).await.with_context(|| d.label())?;
                    said(&mut report, &created, "created");
                }
                report.finish()?;
                return Ok(ExitCode::SUCCESS);
            }
            Some(w) => w,
        };
        let (object, wait) = match what {
            What::BaseImage {
                name,
                image_ref,
                language,
                interpreter,
                wait,
            } => {
                let spec = BaseImageSpec {
                    image: image_ref,
                    language: language.map(|l| parse_enum("--language", &l)).transpose()?,
                    interpreter,
                };
                (object(Kind::BaseImage, &ns, &name, &spec)?, wait.resolve())
            }
            What::Image {
                name,
                base_image,
                runtime_deps,
                system_deps,
                index_url,
                wait,
            } => {
                let mut spec = ImageSpec {
                    base_image,
                    system_dependencies: system_deps.iter().map(|n| json!({"name": n})).collect(),
                    ..Default::default()
                };
                if let Some(file) = runtime_deps {
                    let manifest = std::fs::read_to_string(&file).with_context(|| {
                        format!("failed to read --runtime-deps {}", file.display())
                    })?;
                    spec.runtime_dependencies = Some(RuntimeDependencies {
                        manifest,
                        index_url,
                    });
                } else if index_url.is_some() {
                    bail!("--index-url needs --runtime-deps FILE");
                }
                (object(Kind::Image, &ns, &name, &spec)?, wait.resolve())
            }
            What::Function {
                name,
                path,
                image,
                handler,
                secrets,
                max_workers,
                min_workers,
                idle_timeout,
                limits,
                wait,
            } => {
                dispatch_core::names::validate_name("function", &name)?;
                let source = upload(c, &ns, &name, &path).await?;
                let mut spec = FunctionSpec {
                    image,
                    source: Some(source),
                    secrets,
                    concurrency: Concurrency {
                        max_workers,
                        min_workers,
                        idle_timeout,
                    },
                    ..Default::default()
                };
                handler.apply(&mut spec)?;
                limits.apply(&mut spec)?;
                (object(Kind::Function, &ns, &name, &spec)?, wait.resolve())
            }
            What::Subscription {
                name,
                event_type,
                function,
                source,
            } => {
                let spec = SubscriptionSpec {
                    event_type,
                    source,
                    function,
                };
                (object(Kind::Subscription, &ns, &name, &spec)?, false)
            }
            What::Eventdriver {
                name,
                kind,
                schedule,
                timezone,
                path,
                event_type,
                function,
                missed_runs,
                config,
            } => {
                let spec = EventDriverSpec {
                    kind,
                    schedule,
                    timezone,
                    path,
                    event_type,
                    function,
                    missed_runs: missed_runs
                        .map(|m| parse_enum("--missed-runs", &m))
                        .transpose()?
                        .unwrap_or_default(),
                    config: parse_env(&config)
                        .map_err(|_| anyhow::anyhow!("--config takes KEY=VALUE"))?,
                };
                (object(Kind::EventDriver, &ns, &name, &spec)?, false)
            }
            What::Namespace {
                name,
                run_history_budget,
            } => {
                let spec = match run_history_budget {
                    Some(b) => serde_json::json!({"runHistoryBudget": b}),
                    None => serde_json::json!({}),
                };
                let created = c.create_namespace(&name, spec).await?;
                report.done("namespace", &name, "created", created);
                report.finish()?;
                return Ok(ExitCode::SUCCESS);
            }
            What::Secret { name, data } => {
                let data = data.data()?;
                (
                    object(Kind::Secret, &ns, &name, &SecretSpec { data })?,
                    false,
                )
            }
            What::Token {
                name,
                role,
                token_namespace,
                expires,
            } => {
                let ns = token_namespace.unwrap_or_else(|| ns.clone());
                let t = c
                    .create_token(&name, &role, &ns, expires.as_deref())
                    .await?;
                if !report.for_people() {
                    report.done("token", &name, "created", t);
                    report.finish()?;
                    return Ok(ExitCode::SUCCESS);
                }
                println!("{}", t["token"].as_str().unwrap_or_default());
                eprintln!(
                    "token/{name} created ({role}, namespace {ns}{}): it is shown only now; use it with --token or DISPATCH_TOKEN",
                    t["expiresAt"]
                        .as_str()
                        .map(|e| format!(", expires {e}"))
                        .unwrap_or_default()
                );
                return Ok(ExitCode::SUCCESS);
            }
            What::Alias { target } => (
                object(Kind::Alias, &ns, &target.name(), &target.spec()?)?,
                false,
            ),
            What::Endpoint {
                name,
                function,
                methods,
                paths,
                hosts,
                cors,
                auth,
                stream,
                protocol,
                session,
                idle_timeout,
                max_duration,
            } => {
                let protocol = match protocol.as_deref() {
                    Some("websocket") => Some(dispatch_core::Protocol::Websocket),
                    Some(_) => Some(dispatch_core::Protocol::Http),
                    None => None,
                };
                let spec = EndpointSpec {
                    function,
                    methods,
                    paths,
                    hosts,
                    cors,
                    auth,
                    stream,
                    protocol,
                    session,
                    idle_timeout,
                    max_duration,
                };
                (object(Kind::Endpoint, &ns, &name, &spec)?, false)
            }
        };
        let created = c.create(&object).await?;
        if created.kind == Kind::BaseImage
            && let Ok(v) = c.version().await
            && v["backend"] == "embedded"
        {
            // Said at once, not only in the status: the reference is not used here.
            eprintln!(
                "note: this server's embedded backend runs base images on the host's interpreter \
                 (--interpreter); {} is used by the Kubernetes backend",
                created.spec["image"].as_str().unwrap_or("the image")
            );
        }
        if wait {
            if report.for_people() {
                said(&mut report, &created, "created");
            }
            let o = wait_settled(c, created.kind, created.name(), WAIT).await?;
            ensure_ready(&o)?;
            // The structured forms show the object as it settled.
            if !report.for_people() {
                said(&mut report, &o, "created");
            }
        } else {
            said(&mut report, &created, "created");
        }
        report.finish()?;
        Ok(ExitCode::SUCCESS)
    }
}

/// An alias and where it points: `create alias` and `update alias`.
#[derive(Debug, clap::Args)]
pub struct AliasArgs {
    pub function: String,
    pub alias: String,
    /// All calls to this version
    #[arg(
        long = "version",
        id = "alias_version",
        value_name = "N",
        conflicts_with = "traffic",
        required_unless_present = "traffic"
    )]
    pub version: Option<u32>,
    /// Calls split by weight: VERSION=PERCENT,… adding up to 100 (a caller that sends
    /// X-Dispatch-Affinity or the dispatch-affinity cookie stays on one version)
    #[arg(long, value_name = "V=P,…")]
    pub traffic: Option<String>,
}

impl AliasArgs {
    /// The alias's stored name (`hello.prod`).
    pub fn name(&self) -> String {
        dispatch_core::versions::alias_object_name(&self.function, &self.alias)
    }

    /// Its spec from `--version` or `--traffic` (checked by the server too).
    pub fn spec(&self) -> Result<dispatch_core::versions::AliasSpec> {
        let traffic = match &self.traffic {
            Some(t) => dispatch_core::versions::parse_traffic(t)
                .map_err(|e| anyhow::anyhow!("--traffic: {e}"))?,
            None => Vec::new(),
        };
        Ok(dispatch_core::versions::AliasSpec {
            function: self.function.clone(),
            version: self.version,
            traffic,
            promotion: None,
        })
    }
}

/// An object whose spec is the core's typed spec (what the server parses it back into).
fn object<T: serde::Serialize>(kind: Kind, ns: &str, name: &str, spec: &T) -> Result<Object> {
    Ok(Object::new(kind, ns, name, serde_json::to_value(spec)?))
}

/// A flag's value as one of the core's enums (spelled as in a manifest).
fn parse_enum<T: serde::de::DeserializeOwned>(flag: &str, value: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(value.to_string()))
        .map_err(|e| anyhow::anyhow!("{flag} {value:?} is not valid: {e}"))
}

/// A secret's values, from a file and/or the command line.
#[derive(Debug, Clone, clap::Args)]
pub struct SecretArgs {
    /// A JSON file of string values: {"user": "app", "password": "…"}
    #[arg(required_unless_present = "from_literal")]
    pub file: Option<PathBuf>,
    /// KEY=VALUE (repeatable)
    #[arg(long = "from-literal", value_name = "KEY=VALUE")]
    pub from_literal: Vec<String>,
}

impl SecretArgs {
    /// Secret data from the JSON file of strings and/or the KEY=VALUE literals.
    pub fn data(&self) -> Result<std::collections::BTreeMap<String, String>> {
        secret_data(self.file.as_deref(), &self.from_literal)
    }
}

fn secret_data(
    file: Option<&std::path::Path>,
    literals: &[String],
) -> Result<std::collections::BTreeMap<String, String>> {
    let mut data = std::collections::BTreeMap::new();
    if let Some(f) = file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("failed to read {}", f.display()))?;
        let map: std::collections::BTreeMap<String, String> = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a JSON object of string values", f.display()))?;
        data.extend(map);
    }
    for l in literals {
        let (k, v) = l
            .split_once('=')
            .with_context(|| format!("--from-literal {l:?} is not KEY=VALUE"))?;
        data.insert(k.to_string(), v.to_string());
    }
    if data.is_empty() {
        bail!("a secret needs at least one value: a JSON file or --from-literal KEY=VALUE");
    }
    Ok(data)
}

/// How a function's handler is called: which, for how long, with what environment.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct HandlerArgs {
    /// module.function (Python), file.export (Node), program path (exec); default: from the source
    #[arg(long)]
    pub handler: Option<String>,
    /// Per-call timeout, e.g. 500ms, 30s, 2m (default 30s)
    #[arg(long)]
    pub timeout: Option<String>,
    /// Environment variable for the handler (repeatable): --env KEY=VALUE; on update, the
    /// ones given replace the whole environment
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// A streaming call fails with a timeout when its handler sends nothing for this long
    /// between two chunks, e.g. 10s (spec.idleTimeout; default: only --timeout bounds it)
    #[arg(long, value_name = "DURATION")]
    pub stream_idle_timeout: Option<String>,
    /// exec handlers: stream what the program writes to stdout as it comes, instead of
    /// answering it as JSON when it exits (spec.stream)
    #[arg(long)]
    pub stream: bool,
}

impl HandlerArgs {
    /// Writes the given flags into a function spec (others are kept).
    pub fn apply(&self, spec: &mut FunctionSpec) -> Result<()> {
        if let Some(h) = &self.handler {
            spec.handler = Some(h.clone());
        }
        if let Some(t) = &self.timeout {
            spec.timeout = Some(t.clone());
        }
        if !self.env.is_empty() {
            spec.env = parse_env(&self.env)?;
        }
        if let Some(t) = &self.stream_idle_timeout {
            spec.idle_timeout = Some(t.clone());
        }
        if self.stream {
            spec.stream = true;
        }
        Ok(())
    }
}

/// A function's sandbox limits, network and queue bound (`spec.resources`, `spec.network`,
/// `spec.maxQueued`; DESIGN §9).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LimitArgs {
    /// Memory of each worker, e.g. 256Mi (the default) or 1Gi; over it the worker is killed
    /// and the call answers a SystemError that says so
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// CPU of each worker: cores (1, 0.5) or millicores (500m); default: no cap
    #[arg(long, value_name = "CPU")]
    pub cpu: Option<String>,
    /// Processes and threads of each worker (default 128): a fork bomb stops there
    #[arg(long, value_name = "N")]
    pub pids: Option<u32>,
    /// Size of each worker's private /tmp, e.g. 64Mi (the default)
    #[arg(long, value_name = "SIZE")]
    pub tmp: Option<String>,
    /// Largest answer a call may return, e.g. 16Mi (the default)
    #[arg(long, value_name = "SIZE")]
    pub max_output: Option<String>,
    /// `none`: no network at all (an empty network namespace; on Kubernetes a NetworkPolicy
    /// denying all traffic); `default`: network allowed
    #[arg(long, value_name = "default|none", value_parser = ["default", "none"])]
    pub network: Option<String>,
    /// `container`: its workers run inside its base image (pulled from the image's registry)
    /// with runc, started by `dispatch runner` as on Kubernetes (the server needs an OCI
    /// runtime; see `dispatch server --help`); `sandbox`: the server's isolation
    #[arg(long, value_name = "sandbox|container", value_parser = ["sandbox", "container"])]
    pub isolation: Option<String>,
    /// Async runs of this function accepted and not final at most (spec.maxQueued); past it
    /// an async call gets 429 and nothing is stored (default: the server's
    /// --max-queued-per-function, 1000)
    #[arg(long, value_name = "N")]
    pub max_queued: Option<u32>,
    /// Which synchronous calls leave a run record (spec.history): all (the default), errors,
    /// sample (failures and --history-sample-rate of the rest) or none. A record counts
    /// about 0.5 KB plus its input, output and logs against the history budget (a
    /// succeeded call takes about a seventh of that on disk, compressed); /metrics counts
    /// every call whatever this says; async, event, cron and job runs are always recorded
    #[arg(long, value_name = "POLICY", value_parser = ["all", "errors", "sample", "none"])]
    pub history: Option<String>,
    /// With --history sample: the share of successful calls recorded, e.g. 0.01
    #[arg(long, value_name = "RATE")]
    pub history_sample_rate: Option<f64>,
}

impl LimitArgs {
    /// Writes the given flags into a function spec (others are kept).
    pub fn apply(&self, spec: &mut FunctionSpec) -> Result<()> {
        let r = &mut spec.resources;
        for (field, v) in [
            (&mut r.memory, &self.memory),
            (&mut r.cpu, &self.cpu),
            (&mut r.tmp, &self.tmp),
            (&mut r.max_output_bytes, &self.max_output),
        ] {
            if let Some(v) = v {
                *field = Some(v.clone());
            }
        }
        if let Some(p) = self.pids {
            r.pids = Some(p);
        }
        if let Some(n) = &self.network {
            spec.network = Some(parse_enum("--network", n)?);
        }
        if let Some(i) = &self.isolation {
            spec.isolation = Some(parse_enum("--isolation", i)?);
        }
        if let Some(n) = self.max_queued {
            spec.max_queued = Some(n);
        }
        if let Some(h) = &self.history {
            spec.history = Some(parse_enum("--history", h)?);
            if h != "sample" {
                spec.history_sample_rate = None;
            }
        }
        if let Some(r) = self.history_sample_rate {
            spec.history_sample_rate = Some(r);
        }
        Ok(())
    }
}
