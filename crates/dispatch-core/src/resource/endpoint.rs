//! Endpoints: HTTP routes on the gateway to a function.

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
}

impl EndpointSpec {
    /// Whether callers need a token.
    pub fn needs_token(&self) -> bool {
        self.auth.as_deref() == Some("token")
    }

    pub(super) fn normalize(mut self) -> Result<Self, ValidationError> {
        crate::versions::validate_target(&self.function)?;
        if self.methods.is_empty() {
            self.methods.push("GET".to_string());
        }
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
