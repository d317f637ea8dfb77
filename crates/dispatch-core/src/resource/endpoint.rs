//! Endpoints: HTTP routes on the gateway to a function.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ValidationError;

/// HTTP methods an endpoint may route.
pub const HTTP_METHODS: [&str; 7] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];

/// An HTTP route on the gateway to a function: the request becomes the payload (query
/// parameters, a JSON or form body) and the answer the response.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointSpec {
    /// The function (same namespace) it calls.
    pub function: String,
    /// HTTP methods it routes (GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS; default GET).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Paths it routes, at least one: `/hello`, `{name}` segments as parameters, a trailing
    /// `/*` for a prefix.
    #[serde(default)]
    pub paths: Vec<String>,
    /// Host names it routes (absent: any host).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Answer CORS preflights and allow any origin.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cors: bool,
    /// `public` (default) or `token`: callers need an API token with the developer role in
    /// the endpoint's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
    /// How a streaming handler's answer is sent: `chunked` (the default: chunks as they come,
    /// chunked transfer encoding) or `sse` (server-sent events, one per chunk; a client that
    /// sends `Accept: text/event-stream` gets them too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// `http` (the default) or `websocket`: the gateway holds each connection (a `GET` with
    /// `Upgrade: websocket`) and calls the function for each message it receives, sending
    /// back what it answers (or yields) as messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// WebSocket only: one worker is bound to each connection for its lifetime; the handler
    /// is called once and reads the connection's messages as a stream (`payload` iterates
    /// them), yielding what it sends back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub session: bool,
    /// WebSocket only: a connection with no message either way for this long is closed
    /// (a duration; default 5m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    /// WebSocket only: a connection is closed after this long, whatever it does (default 1h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_duration: Option<String>,
}

/// `spec.protocol` of an endpoint.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Requests and answers (streamed or whole).
    #[default]
    Http,
    /// WebSocket connections held by the gateway.
    Websocket,
}

/// WebSocket endpoints: a connection silent both ways this long is closed.
pub const DEFAULT_WS_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// WebSocket endpoints: no connection lasts longer.
pub const DEFAULT_WS_MAX_DURATION: Duration = Duration::from_secs(3600);

/// How a WebSocket endpoint holds its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WebSocketSettings {
    pub session: bool,
    pub idle_timeout: Duration,
    pub max_duration: Duration,
}

impl EndpointSpec {
    /// Whether callers need a token.
    pub fn needs_token(&self) -> bool {
        self.auth.as_deref() == Some("token")
    }

    /// How its WebSocket connections are held; `None` for an HTTP endpoint. The durations
    /// were checked by `normalize` (a bad one falls back to its default here).
    pub fn websocket(&self) -> Option<WebSocketSettings> {
        (self.protocol == Some(Protocol::Websocket)).then(|| WebSocketSettings {
            session: self.session,
            idle_timeout: ws_duration(&self.idle_timeout, "idleTimeout", DEFAULT_WS_IDLE_TIMEOUT)
                .unwrap_or(DEFAULT_WS_IDLE_TIMEOUT),
            max_duration: ws_duration(&self.max_duration, "maxDuration", DEFAULT_WS_MAX_DURATION)
                .unwrap_or(DEFAULT_WS_MAX_DURATION),
        })
    }

    pub(super) fn normalize(mut self) -> Result<Self, ValidationError> {
        crate::versions::validate_target(&self.function)?;
        if self.methods.is_empty() {
            self.methods.push("GET".to_string());
        }
        self.check_websocket()?;
        for m in &mut self.methods {
            *m = m.to_ascii_uppercase();
            if !HTTP_METHODS.contains(&m.as_str()) {
                return Err(ValidationError::new(format!(
                    "method {m:?} is not supported: use one of {}",
                    HTTP_METHODS.join(", ")
                )));
            }
        }
        self.methods.sort();
        self.methods.dedup();
        if self.paths.is_empty() {
            return Err(ValidationError::new(
                "endpoint needs at least one path (--path /hello)",
            ));
        }
        if let Some(m) = &self.stream
            && m != "chunked"
            && m != "sse"
        {
            return Err(ValidationError::new(format!(
                "stream {m:?} is not valid: use chunked or sse"
            )));
        }
        if let Some(a) = &self.auth
            && a != "public"
            && a != "token"
        {
            return Err(ValidationError::new(format!(
                "auth {a:?} is not valid: use public or token"
            )));
        }
        for p in &self.paths {
            validate_path(p)?;
        }
        for h in &mut self.hosts {
            *h = h.to_ascii_lowercase();
            if h.is_empty() || h.contains(['/', ' ']) {
                return Err(ValidationError::new(format!(
                    "host {h:?} is not a host name"
                )));
            }
        }
        Ok(self)
    }
}

impl EndpointSpec {
    /// WebSocket settings only on a WebSocket endpoint, which routes `GET` alone (the
    /// upgrade request) and streams by its messages.
    fn check_websocket(&self) -> Result<(), ValidationError> {
        if self.protocol != Some(Protocol::Websocket) {
            for (set, field) in [
                (self.session, "session"),
                (self.idle_timeout.is_some(), "idleTimeout"),
                (self.max_duration.is_some(), "maxDuration"),
            ] {
                if set {
                    return Err(ValidationError::new(format!(
                        "{field} is a WebSocket setting: add protocol: websocket (--protocol websocket)"
                    )));
                }
            }
            return Ok(());
        }
        if self.methods.iter().any(|m| !m.eq_ignore_ascii_case("GET")) {
            return Err(ValidationError::new(
                "a WebSocket endpoint routes GET only (the upgrade request): leave methods out",
            ));
        }
        if self.stream.is_some() {
            return Err(ValidationError::new(
                "stream is for HTTP endpoints: a WebSocket endpoint sends each chunk as a message",
            ));
        }
        let idle = ws_duration(&self.idle_timeout, "idleTimeout", DEFAULT_WS_IDLE_TIMEOUT)?;
        let max = ws_duration(&self.max_duration, "maxDuration", DEFAULT_WS_MAX_DURATION)?;
        if idle > max {
            return Err(ValidationError::new(format!(
                "idleTimeout ({}) is longer than maxDuration ({})",
                crate::duration::format_duration(idle),
                crate::duration::format_duration(max)
            )));
        }
        Ok(())
    }
}

fn ws_duration(
    value: &Option<String>,
    field: &str,
    default: Duration,
) -> Result<Duration, ValidationError> {
    let Some(s) = value else {
        return Ok(default);
    };
    let d = crate::duration::parse_duration(s)
        .map_err(|e| ValidationError::new(format!("{field}: {}", e.message)))?;
    if d.is_zero() {
        return Err(ValidationError::new(format!(
            "{field} must be longer than 0s"
        )));
    }
    Ok(d)
}

/// A route path: starts with `/`; segments are literals or `{param}`; a final `*` segment
/// matches any rest (`/api/*`).
fn validate_path(p: &str) -> Result<(), ValidationError> {
    let bad = |why: &str| {
        ValidationError::new(format!(
            "path {p:?} is not valid: {why} (examples: /hello, /users/{{id}}, /api/*)"
        ))
    };
    if !p.starts_with('/') {
        return Err(bad("it must start with '/'"));
    }
    let segs: Vec<&str> = p[1..].split('/').collect();
    for (i, s) in segs.iter().enumerate() {
        if *s == "*" {
            if i + 1 != segs.len() {
                return Err(bad("'*' may only be the last segment"));
            }
        } else if s.starts_with('{') || s.ends_with('}') {
            let name = s.trim_start_matches('{').trim_end_matches('}');
            if !(s.starts_with('{') && s.ends_with('}'))
                || name.is_empty()
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(bad("a parameter segment looks like {name}"));
            }
        } else if s.contains(['{', '}', '*', '?', '#', ' ']) {
            return Err(bad(
                "segments may not contain '{', '}', '*', '?', '#' or spaces",
            ));
        }
    }
    Ok(())
}
