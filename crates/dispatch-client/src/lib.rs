//! Typed HTTP client of the `/v1` API (DESIGN §4), used by the CLI and by tests; plus
//! [`pack`], which turns a file or folder into the tar.gz a function's source is.
//!
//! Every failure is a [`ClientError`] whose message is the server's own (`{"error":{"code",
//! "message"}}`), or says plainly that the server could not be reached and how to point at it.

pub mod pack;
mod runs;
pub use runs::FunctionLog;

use std::time::Duration;

use dispatch_core::{Envelope, Kind, Object};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the dispatch server at {server}: is it running? (start one with `dispatch server`, or point at one with --server / DISPATCH_SERVER)"
    )]
    Unreachable {
        server: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{message}")]
    Api {
        status: StatusCode,
        code: String,
        message: String,
    },
    #[error(
        "the server answered {status} with a body that is not what this client expects: {detail}"
    )]
    Decode { status: StatusCode, detail: String },
    #[error("request to {url} failed")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{0:?} is not a server URL (expected http://host:port or https://host:port)")]
    BadUrl(String),
}

impl ClientError {
    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } | ClientError::Decode { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The API's error code (`NotFound`, `AlreadyExists`, …), when the server answered one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Installs the one rustls crypto provider we ship (`ring`, DESIGN §11) unless one is
/// already installed. reqwest needs it before building a client.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Where to connect and as whom.
#[derive(Debug, Clone)]
pub struct Target {
    /// `http://127.0.0.1:8080`
    pub server: String,
    pub token: Option<String>,
    pub namespace: String,
    /// Accept any TLS certificate (a context's `insecure: true`).
    pub insecure: bool,
}

/// The result of a sync exec.
#[derive(Debug)]
pub struct ExecResult {
    pub run_id: Option<String>,
    pub envelope: Envelope,
}

/// The run id a sync run's answer names (`X-Dispatch-Run-Id`).
fn run_id_of(resp: &reqwest::Response) -> Option<String> {
    resp.headers()
        .get("x-dispatch-run-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// A sync run's answer read whole: its envelope and run id.
async fn envelope_of(resp: reqwest::Response, url: &str) -> Result<ExecResult> {
    let run_id = run_id_of(&resp);
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(|source| ClientError::Http {
        url: url.to_string(),
        source,
    })?;
    let envelope = serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
        status,
        detail: e.to_string(),
    })?;
    Ok(ExecResult { run_id, envelope })
}

/// How a streamed exec ended.
#[derive(Debug)]
pub enum Streamed {
    /// The handler did not stream: its envelope.
    Whole(ExecResult),
    /// Every chunk came, then the end.
    Ended { run_id: Option<String> },
    /// An error after the first chunk (or a stream cut short).
    Failed {
        run_id: Option<String>,
        error: serde_json::Value,
    },
}

/// Filters of `GET …/runs`.
#[derive(Debug, Clone, Default)]
pub struct RunQuery {
    pub function: Option<String>,
    pub status: Option<String>,
    pub limit: Option<usize>,
    /// The next page: runs older than this run id (the last of the previous page).
    pub after: Option<String>,
    /// A time window: RFC 3339 times or durations ago (`15m`, `2h`).
    pub since: Option<String>,
    pub until: Option<String>,
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    namespace: String,
}

impl Client {
    pub fn new(target: &Target) -> Result<Client> {
        install_crypto_provider();
        let base = target.server.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClientError::BadUrl(target.server.clone()));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .tls_danger_accept_invalid_certs(target.insecure)
            .build()
            .map_err(|source| ClientError::Http {
                url: base.clone(),
                source,
            })?;
        Ok(Client {
            http,
            base,
            token: target.token.clone(),
            namespace: target.namespace.clone(),
        })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn server(&self) -> &str {
        &self.base
    }

    fn ns_url(&self, ns: &str, rest: &str) -> String {
        format!("{}/v1/namespaces/{ns}/{rest}", self.base)
    }

    fn request(&self, method: Method, url: &str) -> reqwest::RequestBuilder {
        let mut rb = self.http.request(method, url);
        if let Some(t) = &self.token {
            rb = rb.bearer_auth(t);
        }
        rb
    }

    /// Sends a request and returns the response if it succeeded, the server's error if not.
    async fn send(&self, rb: reqwest::RequestBuilder, url: &str) -> Result<reqwest::Response> {
        let resp = rb.send().await.map_err(|source| {
            if source.is_connect() || source.is_timeout() {
                ClientError::Unreachable {
                    server: self.base.clone(),
                    source,
                }
            } else {
                ClientError::Http {
                    url: url.to_string(),
                    source,
                }
            }
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        #[derive(serde::Deserialize)]
        struct Body {
            error: ErrBody,
        }
        #[derive(serde::Deserialize)]
        struct ErrBody {
            code: String,
            message: String,
        }
        Err(match serde_json::from_str::<Body>(&text) {
            Ok(b) => ClientError::Api {
                status,
                code: b.error.code,
                message: b.error.message,
            },
            Err(_) => ClientError::Api {
                status,
                code: status
                    .canonical_reason()
                    .unwrap_or("Error")
                    .replace(' ', ""),
                message: format!("{url}: {status}: {}", text.trim()),
            },
        })
    }

    async fn json<T: DeserializeOwned>(&self, rb: reqwest::RequestBuilder, url: &str) -> Result<T> {
        let resp = self.send(rb, url).await?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|source| ClientError::Http {
            url: url.to_string(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
            status,
            detail: e.to_string(),
        })
    }

    /// `GET /readyz` answered 200.
    pub async fn ready(&self) -> bool {
        let url = format!("{}/readyz", self.base);
        matches!(self.http.get(&url).send().await, Ok(r) if r.status().is_success())
    }

    pub async fn version(&self) -> Result<serde_json::Value> {
        let url = format!("{}/v1/version", self.base);
        self.json(self.request(Method::GET, &url), &url).await
    }

    /// Sends a CloudEvent (structured mode).
    pub async fn emit(&self, event: &serde_json::Value) -> Result<serde_json::Value> {
        let url = self.ns_url(&self.namespace, "events");
        let rb = self
            .request(Method::POST, &url)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/cloudevents+json",
            )
            .body(event.to_string());
        self.json(rb, &url).await
    }

    /// Stored events, newest first; `undelivered`: only those with a pending or dead
    /// delivery.
    pub async fn list_events(
        &self,
        event_type: Option<&str>,
        undelivered: bool,
        limit: usize,
    ) -> Result<Vec<serde_json::Value>> {
        let url = self.ns_url(&self.namespace, "events");
        let mut rb = self
            .request(Method::GET, &url)
            .query(&[("limit", limit.to_string())]);
        if let Some(t) = event_type {
            rb = rb.query(&[("type", t)]);
        }
        if undelivered {
            rb = rb.query(&[("undelivered", "true")]);
        }
        self.json(rb, &url).await
    }

    /// Dead deliveries of one event (by id; `source` when two sources used the id) become
    /// pending again: `{"redelivered": N}`.
    pub async fn redeliver_event(
        &self,
        id: &str,
        source: Option<&str>,
    ) -> Result<serde_json::Value> {
        // Event ids may hold any character (a cron fire's has slashes): one path segment.
        let events = self.ns_url(&self.namespace, "events");
        let mut u =
            reqwest::Url::parse(&events).map_err(|_| ClientError::BadUrl(self.base.clone()))?;
        u.path_segments_mut()
            .map_err(|_| ClientError::BadUrl(self.base.clone()))?
            .push(id)
            .push("redeliver");
        let url = u.to_string();
        let mut rb = self.request(Method::POST, &url);
        if let Some(s) = source {
            rb = rb.query(&[("source", s)]);
        }
        self.json(rb, &url).await
    }

    /// Every dead delivery of a subscription becomes pending again.
    pub async fn redeliver_subscription(&self, name: &str) -> Result<serde_json::Value> {
        let url = self.ns_url(&self.namespace, &format!("subscriptions/{name}/redeliver"));
        self.json(self.request(Method::POST, &url), &url).await
    }

    /// A subscription's deliveries: pending, dead, queued and retried since start.
    pub async fn subscription_deliveries(
        &self,
        name: &str,
    ) -> Result<dispatch_core::events::DeliveryStats> {
        let url = self.ns_url(&self.namespace, &format!("subscriptions/{name}/deliveries"));
        self.json(self.request(Method::GET, &url), &url).await
    }

    /// Creates a namespace; `spec` may hold `runHistoryBudget` (a size).
    pub async fn create_namespace(
        &self,
        name: &str,
        spec: serde_json::Value,
    ) -> Result<serde_json::Value> {
        let url = format!("{}/v1/namespaces", self.base);
        self.json(
            self.request(Method::POST, &url)
                .json(&serde_json::json!({"name": name, "spec": spec})),
            &url,
        )
        .await
    }

    /// Changes a namespace's settings (`{"runHistoryBudget": "2Gi" | null}`; cluster admin).
    pub async fn patch_namespace(
        &self,
        name: &str,
        spec: serde_json::Value,
    ) -> Result<serde_json::Value> {
        let url = format!("{}/v1/namespaces/{name}", self.base);
        self.json(
            self.request(Method::PATCH, &url)
                .json(&serde_json::json!({"spec": spec})),
            &url,
        )
        .await
    }

    pub async fn list_namespaces(&self) -> Result<Vec<serde_json::Value>> {
        let url = format!("{}/v1/namespaces", self.base);
        self.json(self.request(Method::GET, &url), &url).await
    }

    pub async fn get_namespace(&self, name: &str) -> Result<serde_json::Value> {
        let url = format!("{}/v1/namespaces/{name}", self.base);
        self.json(self.request(Method::GET, &url), &url).await
    }

    /// Deletes a namespace; with `cascade`, everything in it.
    pub async fn delete_namespace(&self, name: &str, cascade: bool) -> Result<serde_json::Value> {
        let url = format!("{}/v1/namespaces/{name}", self.base);
        let rb = self
            .request(Method::DELETE, &url)
            .query(&[("cascade", cascade.to_string())]);
        self.json(rb, &url).await
    }

    /// Who the token is: `{name, role, namespace}`.
    pub async fn whoami(&self) -> Result<serde_json::Value> {
        let url = format!("{}/v1/whoami", self.base);
        self.json(self.request(Method::GET, &url), &url).await
    }

    /// Creates an API token; the answer holds the token itself (shown once).
    pub async fn create_token(
        &self,
        name: &str,
        role: &str,
        namespace: &str,
        expires: Option<&str>,
    ) -> Result<serde_json::Value> {
        let url = format!("{}/v1/tokens", self.base);
        let mut body = serde_json::json!({"name": name, "role": role, "namespace": namespace});
        if let Some(e) = expires {
            body["expires"] = e.into();
        }
        self.json(self.request(Method::POST, &url).json(&body), &url)
            .await
    }

    pub async fn list_tokens(&self) -> Result<Vec<serde_json::Value>> {
        let url = format!("{}/v1/tokens", self.base);
        self.json(self.request(Method::GET, &url), &url).await
    }

    pub async fn delete_token(&self, name: &str) -> Result<serde_json::Value> {
        let url = format!("{}/v1/tokens/{name}", self.base);
        self.json(self.request(Method::DELETE, &url), &url).await
    }

    /// A function's versions, newest first.
    pub async fn versions(&self, function: &str) -> Result<Vec<serde_json::Value>> {
        let url = self.ns_url(&self.namespace, &format!("functions/{function}/versions"));
        self.json(self.request(Method::GET, &url), &url).await
    }

    /// Writes version `to` (default: the one before the version serving) back as the
    /// function's spec: `{"version", "digest", "function"}`.
    /// With `alias`, that alias's traffic goes all to the version in the same call.
    pub async fn rollback(
        &self,
        function: &str,
        to: Option<u32>,
        alias: Option<&str>,
    ) -> Result<serde_json::Value> {
        let url = self.ns_url(&self.namespace, &format!("functions/{function}/rollback"));
        let mut body = serde_json::json!({});
        if let Some(n) = to {
            body["to"] = n.into();
        }
        if let Some(a) = alias {
            body["alias"] = a.into();
        }
        self.json(self.request(Method::POST, &url).json(&body), &url)
            .await
    }

    /// The container tier's pulled images (cluster admins).
    pub async fn pulled_images(&self) -> Result<Vec<serde_json::Value>> {
        let url = format!("{}/v1/pulled-images", self.base);
        self.json(self.request(Method::GET, &url), &url).await
    }

    pub async fn audit(&self, limit: usize) -> Result<Vec<serde_json::Value>> {
        let url = format!("{}/v1/audit", self.base);
        self.json(
            self.request(Method::GET, &url).query(&[("limit", limit)]),
            &url,
        )
        .await
    }

    pub async fn list(&self, kind: Kind) -> Result<Vec<Object>> {
        self.list_selected(kind, None).await
    }

    /// The resources of a kind with these labels (`team=web,tier=api`: all must match).
    pub async fn list_selected(&self, kind: Kind, selector: Option<&str>) -> Result<Vec<Object>> {
        let url = self.ns_url(&self.namespace, kind.plural());
        let mut rb = self.request(Method::GET, &url);
        if let Some(sel) = selector {
            rb = rb.query(&[("l", sel)]);
        }
        self.json(rb, &url).await
    }

    pub async fn get(&self, kind: Kind, name: &str) -> Result<Object> {
        self.get_in(&self.namespace.clone(), kind, name).await
    }

    /// A secret with its values (admin tokens only).
    pub async fn get_revealed(&self, kind: Kind, name: &str) -> Result<Object> {
        let url = self.ns_url(&self.namespace, &format!("{}/{name}", kind.plural()));
        self.json(
            self.request(Method::GET, &url).query(&[("reveal", "true")]),
            &url,
        )
        .await
    }

    pub async fn get_in(&self, ns: &str, kind: Kind, name: &str) -> Result<Object> {
        let url = self.ns_url(ns, &format!("{}/{name}", kind.plural()));
        self.json(self.request(Method::GET, &url), &url).await
    }

    /// The stored object, or `None` when there is none (404 NotFound).
    pub async fn get_optional(&self, ns: &str, kind: Kind, name: &str) -> Result<Option<Object>> {
        match self.get_in(ns, kind, name).await {
            Ok(o) => Ok(Some(o)),
            Err(e) if e.code() == Some("NotFound") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The object's namespace, or the client's when it has none.
    fn ns_of<'a>(&'a self, o: &'a Object) -> &'a str {
        o.metadata.namespace.as_deref().unwrap_or(&self.namespace)
    }

    pub async fn create(&self, o: &Object) -> Result<Object> {
        let url = self.ns_url(self.ns_of(o), o.kind.plural());
        self.json(self.request(Method::POST, &url).json(o), &url)
            .await
    }

    pub async fn update(&self, o: &Object) -> Result<Object> {
        let url = self.ns_url(self.ns_of(o), &format!("{}/{}", o.kind.plural(), o.name()));
        self.json(self.request(Method::PUT, &url).json(o), &url)
            .await
    }

    /// What `create` would store (validated, normalized), without storing it.
    pub async fn create_dry_run(&self, o: &Object) -> Result<Object> {
        let url = self.ns_url(self.ns_of(o), o.kind.plural());
        let rb = self
            .request(Method::POST, &url)
            .query(&[("dryRun", "true")])
            .json(o);
        self.json(rb, &url).await
    }

    /// What `update` would store (validated, normalized), without storing it.
    pub async fn update_dry_run(&self, o: &Object) -> Result<Object> {
        let url = self.ns_url(self.ns_of(o), &format!("{}/{}", o.kind.plural(), o.name()));
        let rb = self
            .request(Method::PUT, &url)
            .query(&[("dryRun", "true")])
            .json(o);
        self.json(rb, &url).await
    }

    pub async fn delete(&self, kind: Kind, name: &str) -> Result<Object> {
        self.delete_in(&self.namespace.clone(), kind, name).await
    }

    pub async fn delete_in(&self, ns: &str, kind: Kind, name: &str) -> Result<Object> {
        let url = self.ns_url(ns, &format!("{}/{name}", kind.plural()));
        self.json(self.request(Method::DELETE, &url), &url).await
    }

    /// Uploads a tar.gz source archive for `function` in `ns`; returns its digest.
    pub async fn upload_source(
        &self,
        ns: &str,
        function: &str,
        archive: Vec<u8>,
    ) -> Result<String> {
        let url = self.ns_url(ns, &format!("functions/{function}/source"));
        #[derive(serde::Deserialize)]
        struct Uploaded {
            digest: String,
        }
        let rb = self
            .request(Method::POST, &url)
            .header(reqwest::header::CONTENT_TYPE, "application/gzip")
            .body(archive);
        let u: Uploaded = self.json(rb, &url).await?;
        Ok(u.digest)
    }

    /// Runs a function synchronously with `input` as its payload.
    pub async fn exec(&self, function: &str, input: &RawValue) -> Result<ExecResult> {
        let (url, rb) = self.exec_request(function, input);
        let resp = self.send(rb, &url).await?;
        envelope_of(resp, &url).await
    }

    /// A sync run's request: its URL, and the POST of `{"input": …}`.
    fn exec_request(&self, function: &str, input: &RawValue) -> (String, reqwest::RequestBuilder) {
        let url = self.ns_url(&self.namespace, &format!("functions/{function}/runs"));
        let rb = self
            .request(Method::POST, &url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(format!("{{\"input\":{}}}", input.get()));
        (url, rb)
    }

    /// Runs a function synchronously, its chunks handed to `on_chunk` as a streaming handler
    /// yields them (server-sent events); a handler that does not stream answers whole.
    pub async fn exec_stream(
        &self,
        function: &str,
        input: &RawValue,
        mut on_chunk: impl FnMut(&str),
    ) -> Result<Streamed> {
        let (url, rb) = self.exec_request(function, input);
        let rb = rb
            .query(&[("stream", "true")])
            .header(reqwest::header::ACCEPT, "text/event-stream");
        let mut resp = self.send(rb, &url).await?;
        let sse = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if !sse {
            return Ok(Streamed::Whole(envelope_of(resp, &url).await?));
        }
        let run_id = run_id_of(&resp);
        let http = |source| ClientError::Http {
            url: url.clone(),
            source,
        };
        let mut buf = String::new();
        while let Some(bytes) = resp.chunk().await.map_err(http)? {
            buf.push_str(&String::from_utf8_lossy(&bytes));
            while let Some(at) = buf.find("\n\n") {
                let event: String = buf.drain(..at + 2).collect();
                let (mut kind, mut data) = ("message", Vec::new());
                for line in event.lines() {
                    if let Some(k) = line.strip_prefix("event: ") {
                        kind = if k == "end" {
                            "end"
                        } else if k == "error" {
                            "error"
                        } else {
                            "message"
                        };
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data.push(d);
                    }
                }
                let data = data.join("\n");
                match kind {
                    "end" => return Ok(Streamed::Ended { run_id }),
                    "error" => {
                        let error =
                            serde_json::from_str(&data).unwrap_or(serde_json::Value::String(data));
                        return Ok(Streamed::Failed { run_id, error });
                    }
                    _ => on_chunk(&data),
                }
            }
        }
        Ok(Streamed::Failed {
            run_id,
            error: serde_json::json!({"message": "the stream ended without its end event"}),
        })
    }

    /// The log of an image's dependency build.
    pub async fn image_log(&self, name: &str) -> Result<String> {
        let url = self.ns_url(&self.namespace, &format!("images/{name}/logs"));
        let resp = self.send(self.request(Method::GET, &url), &url).await?;
        resp.text()
            .await
            .map_err(|source| ClientError::Http { url, source })
    }

    /// Garbage collection: removes unreferenced builds and blobs untouched for `grace`
    /// (e.g. "1h"; the server's default when `None`).
    pub async fn gc(&self, grace: Option<&str>) -> Result<serde_json::Value> {
        let url = format!("{}/v1/gc", self.base);
        let mut rb = self.request(Method::POST, &url);
        if let Some(g) = grace {
            rb = rb.query(&[("grace", g)]);
        }
        self.json(rb, &url).await
    }
}
