//! The API's contract: an OpenAPI 3.1 document at `GET /v1/openapi.json` (public, like
//! `/v1/version`), made once from [`OPERATIONS`] — one row per route and method, the same
//! table a test holds the router to both ways (a route missing here, or a method here the
//! router does not take, fails it) — and, for the resource specs, from the types the
//! handlers validate them with (`dispatch-core`'s specs, JSON Schema 2020-12 by schemars).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use dispatch_core::Kind;
use serde_json::{Value, json};

/// Who may call an operation (DESIGN §4's roles; `auth.rs` decides, this only says it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Public,
    Viewer,
    Developer,
    Admin,
    /// A token for every namespace.
    AllNamespaces(&'static str),
}

/// What a request carries or an answer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    None,
    /// `#/components/schemas/NAME`.
    Schema(&'static str),
    /// An array of `#/components/schemas/NAME`.
    List(&'static str),
    /// Any JSON (a function's payload or answer).
    Json,
    Text,
    /// Newline-delimited JSON, streamed.
    Ndjson,
    /// A gzipped tar archive.
    Archive,
}

/// One route and method.
#[derive(Debug, Clone, Copy)]
pub struct Operation {
    pub method: &'static str,
    pub path: &'static str,
    pub id: &'static str,
    pub tag: &'static str,
    pub summary: &'static str,
    pub access: Access,
    /// Query parameters this operation reads (see [`query_param`]).
    pub query: &'static [&'static str],
    pub request: Body,
    /// The success status and what it answers.
    pub ok: (u16, Body),
}

const fn op(
    method: &'static str,
    path: &'static str,
    id: &'static str,
    tag: &'static str,
    summary: &'static str,
    access: Access,
) -> Operation {
    Operation {
        method,
        path,
        id,
        tag,
        summary,
        access,
        query: &[],
        request: Body::None,
        ok: (200, Body::Json),
    }
}

impl Operation {
    const fn query(mut self, q: &'static [&'static str]) -> Self {
        self.query = q;
        self
    }
    const fn request(mut self, b: Body) -> Self {
        self.request = b;
        self
    }
    const fn ok(mut self, status: u16, b: Body) -> Self {
        self.ok = (status, b);
        self
    }
}

use Access::*;
use Body::{Archive, Json, List, Ndjson, Schema, Text};

macro_rules! ns {
    ($rest:literal) => {
        concat!("/v1/namespaces/{ns}", $rest)
    };
}

/// Every route of the API port and its methods (HEAD is answered for every GET).
pub const OPERATIONS: &[Operation] = &[
    op("GET", "/healthz", "healthz", "server", "Liveness: the process answers", Public).ok(200, Text),
    op("GET", "/readyz", "readyz", "server", "Readiness: 503 while starting or draining", Public).ok(200, Text),
    op("GET", "/metrics", "metrics", "server", "Prometheus metrics (README: Metrics)", AllNamespaces("viewer")).ok(200, Text),
    op("GET", "/v1/version", "version", "server", "The server's version, API version and backend", Public),
    op("GET", "/v1/openapi.json", "openapi", "server", "This document", Public),
    op("POST", "/v1/gc", "gc", "server", "Removes builds and blobs nothing uses (older than ?grace=)", AllNamespaces("admin")).query(&["grace"]),
    op("GET", "/v1/pulled-images", "pulledImages", "server", "Container images pulled by this server", AllNamespaces("admin")),
    op("GET", "/v1/namespaces", "listNamespaces", "namespaces", "Namespaces the token covers", Viewer).ok(200, List("Namespace")),
    op("POST", "/v1/namespaces", "createNamespace", "namespaces", "Creates a namespace", AllNamespaces("admin")).request(Schema("NamespaceRequest")).ok(201, Schema("Namespace")),
    op("GET", "/v1/namespaces/{ns}", "getNamespace", "namespaces", "One namespace and its settings", Viewer).ok(200, Schema("Namespace")),
    op("PATCH", "/v1/namespaces/{ns}", "patchNamespace", "namespaces", "Changes a namespace's limits (runHistoryBudget)", AllNamespaces("admin")).request(Json).ok(200, Schema("Namespace")),
    op("DELETE", "/v1/namespaces/{ns}", "deleteNamespace", "namespaces", "Deletes an empty namespace (?cascade=true: with everything in it)", Admin).query(&["cascade"]),
    op("GET", "/v1/tokens", "listTokens", "tokens", "API tokens (without their secrets)", AllNamespaces("admin")).ok(200, List("Token")),
    op("POST", "/v1/tokens", "createToken", "tokens", "Creates a token; its secret is answered once", AllNamespaces("admin")).request(Schema("TokenRequest")).ok(201, Schema("Token")),
    op("DELETE", "/v1/tokens/{name}", "deleteToken", "tokens", "Revokes a token", AllNamespaces("admin")),
    op("GET", "/v1/whoami", "whoami", "tokens", "The calling token's name, role and namespace", Viewer),
    op("GET", "/v1/audit", "audit", "tokens", "Changes made through the API, newest first", AllNamespaces("admin")).query(&["limit"]),
    op("PUT", "/execute/{ns}/{name}", "executeJob", "jobs", "Runs a job template with the body as its payload (dispatcher's API)", Developer).request(Json).ok(201, Schema("JobAccepted")),
    op("POST", "/execute/{ns}/{name}", "executeJobPost", "jobs", "As PUT", Developer).request(Json).ok(201, Schema("JobAccepted")),
    op("PUT", "/execute/{name}", "executeJobDefault", "jobs", "As PUT /execute/{ns}/{name} in the default namespace", Developer).request(Json).ok(201, Schema("JobAccepted")),
    op("POST", "/execute/{name}", "executeJobDefaultPost", "jobs", "As PUT", Developer).request(Json).ok(201, Schema("JobAccepted")),
    op("GET", ns!("/jobexecutions"), "listJobExecutions", "jobs", "Job executions, newest first", Viewer).query(&["template", "limit"]).ok(200, List("JobExecution")),
    op("POST", ns!("/jobexecutions"), "createJobExecution", "jobs", "Runs a job template from a JobExecution resource (metadata.name, spec.jobTemplateName, spec.payload); answers it as a resource", Developer).request(Json).ok(201, Json),
    op("GET", ns!("/jobexecutions/{uuid}"), "getJobExecution", "jobs", "One job execution", Viewer).ok(200, Schema("JobExecution")),
    op("DELETE", ns!("/jobexecutions/{uuid}"), "cancelJobExecution", "jobs", "Cancels a waiting or running execution", Developer).ok(200, Schema("JobExecution")),
    op("GET", ns!("/jobexecutions/{uuid}/logs"), "jobExecutionLogs", "jobs", "Its logs: so far while it runs, else all of them", Viewer).ok(200, Schema("Logs")),
    op("GET", ns!("/images/{name}/logs"), "imageLogs", "resources", "An image's build log", Viewer).ok(200, Text),
    op("GET", ns!("/events"), "listEvents", "events", "Accepted CloudEvents and their deliveries", Viewer).query(&["type", "undelivered", "limit"]),
    op("POST", ns!("/events"), "emitEvent", "events", "Accepts a CloudEvent (structured or binary mode)", Developer).request(Json).ok(202, Json),
    op("POST", ns!("/events/{id}/redeliver"), "redeliverEvent", "events", "Delivers an event again to its subscriptions", Developer),
    op("POST", ns!("/subscriptions/{name}/redeliver"), "redeliverSubscription", "events", "Delivers a subscription's dead deliveries again", Developer),
    op("GET", ns!("/subscriptions/{name}/deliveries"), "subscriptionDeliveries", "events", "A subscription's pending and dead deliveries", Viewer),
    op("GET", ns!("/stats"), "namespaceStats", "functions", "The last hour of the namespace's functions, minute by minute: calls, errors, cold starts, p50/p99 (this server's counts; the console's charts)", Viewer).query(&["function"]).ok(200, Schema("Stats")),
    op("GET", ns!("/runs"), "listRuns", "runs", "Run records, newest first (pages: ?after=)", Viewer).query(&["function", "status", "after", "since", "until", "limit", "l"]).ok(200, List("Run")),
    op("DELETE", ns!("/runs"), "purgeRuns", "runs", "Deletes finished runs (of ?function=, in ?status=)", Developer).query(&["function", "status"]),
    op("POST", ns!("/runs/redrive"), "redriveRuns", "runs", "Queues dead async runs again", Developer).query(&["function"]),
    op("GET", ns!("/runs/{id}"), "getRun", "runs", "One run record", Viewer).ok(200, Schema("Run")),
    op("DELETE", ns!("/runs/{id}"), "cancelRun", "runs", "Cancels a queued or running async run", Developer).ok(200, Schema("Run")),
    op("POST", ns!("/runs/{id}/redrive"), "redriveRun", "runs", "Queues a dead async run again", Developer).ok(202, Schema("Run")),
    op("GET", ns!("/runs/{id}/logs"), "runLogs", "runs", "A run's logs (?follow=true: as printed, NDJSON)", Viewer).query(&["follow"]).ok(200, Ndjson),
    op("GET", ns!("/functions/{name}/source"), "sourceFiles", "functions", "The files of the source archive spec.source names (path, size, executable)", Viewer).ok(200, Schema("SourceFiles")),
    op("POST", ns!("/functions/{name}/source"), "uploadSource", "functions", "Stores a source archive; answers its digest for spec.source", Developer).request(Archive).ok(201, Json),
    op("GET", ns!("/functions/{name}/logs"), "functionLogs", "functions", "Lines of every call of a function as printed (?follow=true, NDJSON)", Viewer).query(&["follow"]).ok(200, Ndjson),
    op("GET", ns!("/functions/{name}/queue"), "functionQueue", "functions", "A function's async queue: queued, its bound, refusals", Viewer),
    op("GET", ns!("/functions/{name}/versions"), "functionVersions", "functions", "A function's versions, newest first", Viewer),
    op("POST", ns!("/functions/{name}/rollback"), "rollbackFunction", "functions", "Serves an earlier version again: {to: N}", Developer).request(Json).ok(200, Schema("Object")),
    op("POST", ns!("/functions/{name}/runs"), "execFunction", "functions", "Calls a function with the body as its payload (?wait=false: async, 202; ?stream=true: chunks as they come)", Developer).query(&["wait", "stream"]).request(Json).ok(200, Schema("Envelope")),
    op("GET", ns!("/{kind}"), "listObjects", "resources", "Objects of a kind (?l= label selector)", Viewer).query(&["l", "limit"]).ok(200, List("Object")),
    op("POST", ns!("/{kind}"), "createObject", "resources", "Creates an object (409 if it exists)", Developer).request(Schema("Object")).ok(201, Schema("Object")),
    op("GET", ns!("/{kind}/{name}"), "getObject", "resources", "One object", Viewer).ok(200, Schema("Object")),
    op("PUT", ns!("/{kind}/{name}"), "replaceObject", "resources", "Replaces an object's spec (metadata.generation guards against lost updates)", Developer).request(Schema("Object")).ok(200, Schema("Object")),
    op("PATCH", ns!("/{kind}/{name}"), "patchObject", "resources", "Merges a JSON merge patch into an object", Developer).request(Json).ok(200, Schema("Object")),
    op("DELETE", ns!("/{kind}/{name}"), "deleteObject", "resources", "Deletes an object (409 while something uses it)", Developer).ok(200, Schema("Object")),
];

/// The document, made on first use.
pub fn document() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(build)
}

fn path_param(name: &str) -> Value {
    let (description, schema) = match name {
        "ns" => (
            "The namespace",
            json!({"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}),
        ),
        "kind" => (
            "A kind's plural name",
            json!({"type": "string", "enum": Kind::ALL.iter().map(|k| k.plural()).collect::<Vec<_>>()}),
        ),
        "id" => (
            "A run id (or an event id under events)",
            json!({"type": "string"}),
        ),
        "uuid" => ("A job execution's id", json!({"type": "string"})),
        _ => ("The object's name", json!({"type": "string"})),
    };
    json!({"name": name, "in": "path", "required": true, "description": description, "schema": schema})
}

/// The query parameters operations name.
fn query_param(name: &str) -> Value {
    let (description, schema) = match name {
        "limit" => (
            "At most this many items (1 to 10000)",
            json!({"type": "integer", "minimum": 1, "maximum": 10000}),
        ),
        "l" => (
            "Label selector: key=value pairs, comma-separated, all must match",
            json!({"type": "string"}),
        ),
        "function" => ("Of this function", json!({"type": "string"})),
        "status" => (
            "In this status (QUEUED, RUNNING, SUCCEEDED, FAILED, TIMEOUT, CANCELLED, DEAD)",
            json!({"type": "string"}),
        ),
        "after" => (
            "After this run id (the last of the previous page)",
            json!({"type": "string"}),
        ),
        "since" | "until" => (
            "A time (RFC 3339) or an age (30m, 2h)",
            json!({"type": "string"}),
        ),
        "type" => ("Events of this type", json!({"type": "string"})),
        "undelivered" => (
            "Only events with deliveries not done",
            json!({"type": "boolean"}),
        ),
        "template" => ("Of this job template", json!({"type": "string"})),
        "follow" => (
            "Stream lines as they are printed (NDJSON) until the end",
            json!({"type": "boolean"}),
        ),
        "wait" => (
            "false: accept the call as an async run (202) instead of waiting",
            json!({"type": "boolean"}),
        ),
        "stream" => (
            "Answer a streaming handler's chunks as they come (chunked, or SSE with Accept: text/event-stream)",
            json!({"type": "boolean"}),
        ),
        "cascade" => (
            "Delete what the namespace holds too",
            json!({"type": "boolean"}),
        ),
        "grace" => (
            "Keep what was used within this long (e.g. 1h)",
            json!({"type": "string"}),
        ),
        other => ("", json!({"type": "string", "description": other})),
    };
    json!({"name": name, "in": "query", "required": false, "description": description, "schema": schema})
}

fn content(body: Body) -> Option<Value> {
    let (mime, schema) = match body {
        Body::None => return None,
        Schema(n) => (
            "application/json",
            json!({"$ref": format!("#/components/schemas/{n}")}),
        ),
        List(n) => (
            "application/json",
            json!({"type": "array", "items": {"$ref": format!("#/components/schemas/{n}")}}),
        ),
        Json => ("application/json", json!({})),
        Text => ("text/plain", json!({"type": "string"})),
        Ndjson => ("application/x-ndjson", json!({"type": "string"})),
        Archive => (
            "application/octet-stream",
            json!({"type": "string", "contentMediaType": "application/gzip", "description": "A tar.gz of the source"}),
        ),
    };
    Some(json!({ mime: {"schema": schema} }))
}

fn access_note(a: Access) -> String {
    match a {
        Public => "No token needed.".into(),
        Viewer => "A token with any role for the namespace.".into(),
        Developer => "A developer or admin token for the namespace.".into(),
        Admin => "An admin token for the namespace.".into(),
        AllNamespaces(role) => {
            format!("A {role} token for every namespace (--token-namespace '*').")
        }
    }
}

fn operation(o: &Operation) -> Value {
    let mut params: Vec<Value> = o
        .path
        .split('/')
        .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
        .map(path_param)
        .collect();
    params.extend(o.query.iter().map(|q| query_param(q)));
    let mut ok = json!({"description": "Done"});
    if let Some(c) = content(o.ok.1) {
        ok["content"] = c;
    }
    let error = json!({"$ref": "#/components/responses/Error"});
    let mut responses = serde_json::Map::new();
    responses.insert(o.ok.0.to_string(), ok);
    // Every operation may answer the error shape; these are the statuses it uses.
    let mut codes = vec!["400", "404", "429", "500", "503"];
    if o.access != Public {
        codes.extend(["401", "403"]);
    }
    if matches!(o.method, "POST" | "PUT" | "PATCH" | "DELETE") {
        codes.extend(["409", "413", "422", "507"]);
    }
    for c in codes {
        responses.insert(c.into(), error.clone());
    }
    let mut v = json!({
        "operationId": o.id,
        "tags": [o.tag],
        "summary": o.summary,
        "description": access_note(o.access),
        "parameters": params,
        "responses": responses,
    });
    if o.access != Public {
        v["security"] = json!([{"token": []}]);
    } else {
        v["security"] = json!([]);
    }
    if let Some(c) = content(o.request) {
        v["requestBody"] = json!({"required": true, "content": c});
    }
    v
}

/// The resource specs (`#/components/schemas/<Kind>Spec`), from the types that validate
/// them; their own definitions join the components.
fn spec_schemas(out: &mut serde_json::Map<String, Value>) {
    use dispatch_core::events::{EventDriverSpec, SubscriptionSpec};
    use dispatch_core::*;
    let mut g = schemars::generate::SchemaSettings::draft2020_12()
        .with(|s| {
            s.definitions_path = "/components/schemas".into();
            s.meta_schema = None;
        })
        .into_generator();
    let specs: [(&str, schemars::Schema); 8] = [
        ("BaseImageSpec", g.subschema_for::<BaseImageSpec>()),
        ("ImageSpec", g.subschema_for::<ImageSpec>()),
        ("FunctionSpec", g.subschema_for::<FunctionSpec>()),
        ("EndpointSpec", g.subschema_for::<EndpointSpec>()),
        ("JobTemplateSpec", g.subschema_for::<JobTemplateSpec>()),
        ("SubscriptionSpec", g.subschema_for::<SubscriptionSpec>()),
        ("EventDriverSpec", g.subschema_for::<EventDriverSpec>()),
        ("AliasSpec", g.subschema_for::<versions::AliasSpec>()),
    ];
    for (name, schema) in specs {
        let v = schema.to_value();
        // A referenceable type comes back as a $ref to its definition, named as its type.
        if v.get("$ref").and_then(Value::as_str) != Some(&format!("#/components/schemas/{name}")) {
            out.insert(name.into(), v);
        }
    }
    out.insert(
        "SecretSpec".into(),
        json!({"type": "object", "description": "Written with its values; read back without them (?reveal=true for admins).",
               "properties": {"data": {"type": "object", "additionalProperties": {"type": "string"}}}}),
    );
    for (name, schema) in g.take_definitions(true) {
        out.insert(name, schema);
    }
}

fn build() -> Value {
    let mut paths: BTreeMap<&str, serde_json::Map<String, Value>> = BTreeMap::new();
    for o in OPERATIONS {
        paths
            .entry(o.path)
            .or_default()
            .insert(o.method.to_ascii_lowercase(), operation(o));
    }
    let mut schemas = serde_json::Map::new();
    spec_schemas(&mut schemas);
    let kinds: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
    let extra = json!({
        "Error": {
            "type": "object", "required": ["error"],
            "properties": {"error": {"type": "object", "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "description": "BadRequest, NotFound, Conflict, MethodNotAllowed, TooManyRequests, …"},
                    "message": {"type": "string", "description": "What was wrong and how to fix it"}}}}
        },
        "Object": {
            "type": "object", "required": ["kind", "metadata"],
            "description": "One resource; its spec is the kind's <Kind>Spec schema.",
            "properties": {
                "apiVersion": {"type": "string", "const": dispatch_core::API_VERSION},
                "kind": {"type": "string", "enum": kinds},
                "metadata": {"type": "object", "required": ["name"], "properties": {
                    "name": {"type": "string"}, "namespace": {"type": "string"},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "uid": {"type": "string"}, "generation": {"type": "integer"},
                    "createdAt": {"type": "string", "format": "date-time"},
                    "updatedAt": {"type": "string", "format": "date-time"}}},
                "spec": {"type": "object"},
                "status": {"type": "object", "properties": {
                    "phase": {"type": "string", "enum": ["INITIALIZED", "CREATING", "READY", "ERROR", "DELETING"]},
                    "reason": {"type": "string"}, "digest": {"type": "string"}}}
            }
        },
        "Envelope": {
            "type": "object", "required": ["context", "payload"],
            "properties": {
                "context": {"type": "object", "properties": {
                    "logs": {"type": "object", "properties": {
                        "stdout": {"type": "array", "items": {"type": "string"}},
                        "stderr": {"type": "array", "items": {"type": "string"}}}},
                    "error": {"oneOf": [{"type": "null"}, {"type": "object", "properties": {
                        "type": {"type": "string", "enum": ["InputError", "FunctionError", "SystemError"]},
                        "message": {"type": "string"},
                        "stacktrace": {"type": "array", "items": {"type": "string"}}}}]}}},
                "payload": {"description": "What the handler returned"}
            }
        },
        "Run": {
            "type": "object", "required": ["id", "function", "status"],
            "properties": {
                "id": {"type": "string"}, "namespace": {"type": "string"}, "function": {"type": "string"},
                "status": {"type": "string", "enum": ["QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "TIMEOUT", "CANCELLED", "DEAD"]},
                "trigger": {"type": "string"}, "async": {"type": "boolean"}, "attempts": {"type": "integer"},
                "input": {}, "output": {},
                "logs": {"type": "object", "properties": {
                    "stdout": {"type": "array", "items": {"type": "string"}},
                    "stderr": {"type": "array", "items": {"type": "string"}}}},
                "error": {"type": ["object", "null"]},
                "createdAt": {"type": "string", "format": "date-time"},
                "startedAt": {"type": ["string", "null"], "format": "date-time"},
                "finishedAt": {"type": ["string", "null"], "format": "date-time"},
                "trace": {"$ref": "#/components/schemas/Trace"}
            }
        },
        "JobAccepted": {
            "type": "object", "required": ["uuid", "name", "status"],
            "description": "dispatcher's answer to PUT /execute",
            "properties": {
                "uuid": {"type": "string"}, "name": {"type": "string", "description": "Its template"},
                "namespace": {"type": "string"},
                "status": {"type": "string", "enum": ["Waiting", "Running", "Succeeded", "Failed", "Cancelled"]}}
        },
        "JobExecution": {
            "type": "object", "required": ["uuid", "name", "phase"],
            "properties": {
                "uuid": {"type": "string"}, "name": {"type": "string", "description": "Its template"},
                "namespace": {"type": "string"},
                "phase": {"type": "string", "enum": ["Waiting", "Active", "Completed", "Failed", "Cancelled", "Invalid"]},
                "reason": {"type": "string"}, "attempts": {"type": "integer"},
                "exitCode": {"type": ["integer", "null"]}, "payload": {},
                "trace": {"$ref": "#/components/schemas/Trace"}
            }
        },
        "Trace": {
            "type": "object", "required": ["traceId", "spanId"],
            "description": "The W3C trace a call runs in and the server's span for it",
            "properties": {
                "traceId": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
                "spanId": {"type": "string", "pattern": "^[0-9a-f]{16}$"},
                "parentId": {"type": "string", "pattern": "^[0-9a-f]{16}$", "description": "The client's span"},
                "sampled": {"type": "boolean"}}
        },
        "Namespace": {
            "type": "object", "required": ["kind", "metadata"],
            "description": "A namespace: its limits in spec, the run history it holds in status",
            "properties": {
                "apiVersion": {"type": "string"},
                "kind": {"const": "Namespace"},
                "metadata": {"type": "object", "required": ["name"], "properties": {
                    "name": {"type": "string"},
                    "createdAt": {"type": ["string", "null"], "format": "date-time"}}},
                "spec": {"type": "object", "properties": {
                    "runHistoryBudget": {"type": "string", "description": "Bytes of run records kept at most, e.g. 256Mi"}}},
                "status": {"type": "object", "properties": {"runHistory": {"type": "object", "properties": {
                    "runs": {"type": "integer"}, "bytes": {"type": "integer"},
                    "budget": {"type": ["integer", "null"]},
                    "budgetFrom": {"enum": ["namespace", "server"]}}}}}
            }
        },
        "NamespaceRequest": {
            "type": "object", "required": ["name"],
            "properties": {"name": {"type": "string"}, "spec": {"type": "object", "properties": {
                "runHistoryBudget": {"type": "string"}}}}
        },
        "TokenRequest": {
            "type": "object", "required": ["name", "role"],
            "properties": {
                "name": {"type": "string"},
                "role": {"type": "string", "enum": ["admin", "developer", "viewer"]},
                "namespace": {"type": "string", "description": "A namespace, or * for all"},
                "expires": {"type": "string", "description": "A lifetime, e.g. 30d"}}
        },
        "Logs": {
            "type": "object", "required": ["stdout", "stderr"],
            "properties": {
                "stdout": {"type": "array", "items": {"type": "string"}},
                "stderr": {"type": "array", "items": {"type": "string"}}}
        },
        "SourceFiles": {
            "type": "object", "required": ["digest", "files"],
            "properties": {
                "digest": {"type": "string"},
                "files": {"type": "array", "items": {"type": "object", "required": ["path", "size", "executable"],
                    "properties": {"path": {"type": "string"}, "size": {"type": "integer"}, "executable": {"type": "boolean"}}}}}
        },
        "Stats": {
            "type": "object", "required": ["start", "step", "functions"],
            "description": "60 values per column, oldest minute first; functions not called in the hour are left out",
            "properties": {
                "start": {"type": "integer", "description": "Unix time of the first minute"},
                "step": {"type": "integer", "description": "Seconds per value (60)"},
                "functions": {"type": "array", "items": {"type": "object",
                    "required": ["name", "calls", "errors", "coldStarts", "p50Ms", "p99Ms"],
                    "properties": {
                        "name": {"type": "string"},
                        "calls": {"type": "array", "items": {"type": "integer"}},
                        "errors": {"type": "array", "items": {"type": "integer"}},
                        "coldStarts": {"type": "array", "items": {"type": "integer"}},
                        "p50Ms": {"type": "array", "items": {"type": ["number", "null"]}},
                        "p99Ms": {"type": "array", "items": {"type": ["number", "null"]}}}}}}
        },
        "Token": {
            "type": "object", "required": ["name", "role", "namespace"],
            "properties": {
                "name": {"type": "string"}, "role": {"type": "string"}, "namespace": {"type": "string"},
                "token": {"type": "string", "description": "The secret: answered once, when created"},
                "createdAt": {"type": "string", "format": "date-time"},
                "expiresAt": {"type": ["string", "null"], "format": "date-time"}}
        }
    });
    if let Value::Object(m) = extra {
        schemas.extend(m);
    }
    let tags: Vec<Value> = [
        "server",
        "namespaces",
        "tokens",
        "resources",
        "functions",
        "runs",
        "events",
        "jobs",
    ]
    .iter()
    .map(|t| json!({ "name": t }))
    .collect();
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Dispatch API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The control plane of a Dispatch server (DESIGN §4). Errors answer {\"error\": {\"code\", \"message\"}}. The gateway's paths are the endpoints users create and are not listed here.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"}
        },
        "servers": [{"url": "/"}],
        "tags": tags,
        "paths": paths,
        "components": {
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer", "description": "An API token (dispatch create token)"}},
            "responses": {"Error": {"description": "The error shape", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
            "schemas": schemas
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_ids_are_unique_and_paths_name_their_parameters() {
        let mut ids = std::collections::HashSet::new();
        for o in OPERATIONS {
            assert!(ids.insert(o.id), "{} twice", o.id);
        }
        let doc = document();
        assert_eq!(doc["openapi"], "3.1.0");
        let params = &doc["paths"][ns!("/{kind}/{name}")]["put"]["parameters"];
        let names: Vec<&str> = params
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["ns", "kind", "name"]);
        // The specs come from the types.
        let f = &doc["components"]["schemas"]["FunctionSpec"];
        assert!(f["properties"]["handler"].is_object(), "{f}");
    }
}
