//! Authentication and authorization (DESIGN §9): bearer tokens (kept as SHA-256 hashes, cached
//! in memory), three roles, one namespace or all per token. One middleware guards every API
//! route and the gateway's `/execute`; endpoints with `auth: token` are checked by the gateway.
//!
//! A token scoped to namespace A that asks for namespace B gets 404, not 403: it must not learn
//! which namespaces exist. Mutating calls are written to the audit log.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use dispatch_core::auth::{ALL_NAMESPACES, AuditEntry, Role, token_hash};

use crate::error::ApiError;
use crate::state::AppState;
pub use crate::tokens::{Tokens, generate_token};

/// Who is calling (put in the request's extensions by the middleware).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub role: Role,
    /// One namespace, or `*`.
    pub namespace: String,
}

impl Principal {
    /// Everyone, when auth is off (`--insecure-no-auth`).
    pub fn unauthenticated() -> Principal {
        Principal {
            name: "-".into(),
            role: Role::Admin,
            namespace: ALL_NAMESPACES.into(),
        }
    }

    pub fn covers(&self, ns: &str) -> bool {
        self.namespace == ALL_NAMESPACES || self.namespace == ns
    }
}

/// What a request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    Public,
    /// A role, in any namespace (or a cluster-wide route).
    Role(Role),
    /// A role in a namespace (404 when the token does not cover it).
    RoleIn(Role, String),
    /// An admin token for every namespace: tokens, gc, audit, new namespaces. A namespace's
    /// admin must not mint a token wider than itself.
    ClusterAdmin,
    /// A role for every namespace: `/metrics`, whose series name every namespace's
    /// functions (a token of one tenant must not see another's).
    Everywhere(Role),
}

fn is_read(m: &Method) -> bool {
    *m == Method::GET || *m == Method::HEAD
}

/// The need of an API request, from its method and path (DESIGN §4 routes).
pub fn api_need(method: &Method, path: &str) -> Need {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let read = is_read(method);
    match segs.as_slice() {
        ["healthz"] | ["readyz"] | ["v1", "version"] | ["v1", "openapi.json"] => Need::Public,
        // The console's page and script (they hold no data; it asks the API with a token).
        [""] | ["ui", ..] => Need::Public,
        ["metrics"] => Need::Everywhere(Role::Viewer),
        ["v1", "whoami"] => Need::Role(Role::Viewer),
        ["v1", "gc"] | ["v1", "pulled-images"] | ["v1", "tokens", ..] | ["v1", "audit"] => {
            Need::ClusterAdmin
        }
        ["v1", "namespaces"] if read => Need::Role(Role::Viewer),
        ["v1", "namespaces"] => Need::ClusterAdmin,
        ["v1", "namespaces", ns] if read => Need::RoleIn(Role::Viewer, ns.to_string()),
        // A namespace's settings are limits that protect the server from it: not its own.
        ["v1", "namespaces", _] if *method == Method::PATCH => Need::ClusterAdmin,
        ["v1", "namespaces", ns] => Need::RoleIn(Role::Admin, ns.to_string()),
        // Secret names and keys are readable; values and changes are for admins (the handler
        // checks `?reveal=true`).
        ["v1", "namespaces", ns, "secrets", ..] if read => {
            Need::RoleIn(Role::Viewer, ns.to_string())
        }
        ["v1", "namespaces", ns, "secrets", ..] => Need::RoleIn(Role::Admin, ns.to_string()),
        ["v1", "namespaces", ns, ..] if read => Need::RoleIn(Role::Viewer, ns.to_string()),
        ["v1", "namespaces", ns, ..] => Need::RoleIn(Role::Developer, ns.to_string()),
        ["execute", ns, _] => Need::RoleIn(Role::Developer, ns.to_string()),
        ["execute", _] => Need::RoleIn(
            Role::Developer,
            dispatch_core::DEFAULT_NAMESPACE.to_string(),
        ),
        _ => Need::Role(Role::Viewer),
    }
}

/// The gateway guards `/execute` here; endpoints check their own `auth` when routed.
pub fn gateway_need(method: &Method, path: &str) -> Need {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segs.as_slice() {
        ["execute", ..] => api_need(method, path),
        _ => Need::Public,
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    v.strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
        .map(str::trim)
}

fn unauthorized(msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "Unauthorized", msg)
}

/// Resolves the caller and checks `need`.
pub fn authorize(
    state: &AppState,
    headers: &HeaderMap,
    need: &Need,
) -> Result<Principal, ApiError> {
    if !state.config.auth {
        return Ok(Principal::unauthenticated());
    }
    if *need == Need::Public {
        // Public routes ignore Authorization entirely: a public endpoint's callers may send
        // their own application's bearer tokens, which are not Dispatch's to judge.
        return Ok(Principal {
            name: "anonymous".into(),
            role: Role::Viewer,
            namespace: String::new(),
        });
    }
    let principal = match bearer(headers) {
        None => {
            return Err(unauthorized(
                "this server needs a token: pass --token or set DISPATCH_TOKEN (the first admin token is in the server's DATA_DIR/admin-token), or `dispatch login`",
            ));
        }
        Some(t) => {
            let Some(tok) = state.tokens.find(&token_hash(t)) else {
                return Err(unauthorized(
                    "the token is not valid (unknown or deleted): ask an admin for a new one",
                ));
            };
            if tok.expired(state.queue.clock.now()) {
                return Err(unauthorized(format!(
                    "token {:?} expired at {}: ask an admin for a new one",
                    tok.name,
                    tok.expires_at.map(|e| e.to_string()).unwrap_or_default()
                )));
            }
            Principal {
                name: tok.name,
                role: tok.role,
                namespace: tok.namespace,
            }
        }
    };
    match need {
        Need::Public => {}
        Need::ClusterAdmin
            if principal.role < Role::Admin || principal.namespace != ALL_NAMESPACES =>
        {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "Forbidden",
                format!(
                    "token {:?} is not an admin of every namespace; this needs one",
                    principal.name
                ),
            ));
        }
        Need::ClusterAdmin => {}
        Need::Everywhere(_) if principal.namespace != ALL_NAMESPACES => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "Forbidden",
                format!(
                    "token {:?} is for namespace {:?}; this shows every namespace's functions \
                     and needs a token for all of them (--token-namespace '*')",
                    principal.name, principal.namespace
                ),
            ));
        }
        Need::Everywhere(r) if principal.role < *r => {
            return Err(forbidden(&principal, *r));
        }
        Need::Everywhere(_) => {}
        Need::Role(r) if principal.role < *r => {
            return Err(forbidden(&principal, *r));
        }
        Need::Role(_) => {}
        Need::RoleIn(r, ns) => {
            if !principal.covers(ns) {
                return Err(ApiError::not_found(format!("namespace {ns:?} not found")));
            }
            if principal.role < *r {
                return Err(forbidden(&principal, *r));
            }
        }
    }
    Ok(principal)
}

fn forbidden(p: &Principal, needed: Role) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "Forbidden",
        format!(
            "token {:?} has role {}; this needs {needed}",
            p.name, p.role
        ),
    )
}

/// Calls that are not audited: their own records say what happened (runs, job executions).
fn audited(method: &Method, path: &str) -> bool {
    if is_read(method) {
        return false;
    }
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    !matches!(
        segs.as_slice(),
        ["v1", "namespaces", _, "functions", _, "runs"] | ["execute", ..]
    )
}

fn audit(state: &Arc<AppState>, who: String, method: &Method, path: String, status: StatusCode) {
    let entry = AuditEntry {
        at: state.queue.clock.now(),
        who,
        method: method.to_string(),
        path,
        status: status.as_u16(),
    };
    let st = state.clone();
    // Off the request path; an audit write failure is logged, never fails the call.
    tokio::spawn(async move {
        if let Err(e) = st.db(move |s| s.append_audit(&[entry])).await {
            tracing::warn!("audit log write failed: {e}");
        }
    });
}

async fn guard(state: Arc<AppState>, need: Need, mut req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let audited = audited(&method, &path) && need != Need::Public;
    let principal = match authorize(&state, req.headers(), &need) {
        Ok(p) => p,
        Err(e) => {
            if audited {
                // Refused attempts are audited too, under the token's name when it has one.
                let who = bearer(req.headers())
                    .and_then(|t| state.tokens.find(&token_hash(t)))
                    .map_or_else(|| "anonymous".to_string(), |t| t.name);
                audit(&state, who, &method, path, e.status);
            }
            return e.into_response();
        }
    };
    let who = principal.name.clone();
    req.extensions_mut().insert(principal);
    let resp = next.run(req).await;
    if audited {
        audit(&state, who, &method, path, resp.status());
    }
    resp
}

pub async fn api_guard(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let need = api_need(req.method(), req.uri().path());
    guard(state, need, req, next).await
}

pub async fn gateway_guard(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let need = gateway_need(req.method(), req.uri().path());
    guard(state, need, req, next).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_follow_the_routes() {
        let get = Method::GET;
        let post = Method::POST;
        assert_eq!(api_need(&get, "/healthz"), Need::Public);
        assert_eq!(
            api_need(&get, "/v1/namespaces/a/functions"),
            Need::RoleIn(Role::Viewer, "a".into())
        );
        assert_eq!(
            api_need(&post, "/v1/namespaces/a/functions"),
            Need::RoleIn(Role::Developer, "a".into())
        );
        assert_eq!(
            api_need(&post, "/v1/namespaces/a/secrets"),
            Need::RoleIn(Role::Admin, "a".into())
        );
        assert_eq!(
            api_need(&Method::DELETE, "/v1/namespaces/a"),
            Need::RoleIn(Role::Admin, "a".into())
        );
        assert_eq!(api_need(&post, "/v1/tokens"), Need::ClusterAdmin);
        assert_eq!(
            api_need(&Method::PUT, "/execute/x"),
            Need::RoleIn(Role::Developer, "default".into())
        );
        assert_eq!(gateway_need(&get, "/hello"), Need::Public);
        assert!(!audited(&post, "/v1/namespaces/a/functions/f/runs"));
        assert!(audited(&Method::DELETE, "/v1/namespaces/a/functions/f"));
    }

    #[test]
    fn tokens_are_long_and_distinct() {
        let a = generate_token().unwrap();
        let b = generate_token().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("dsp_") && a.len() == 4 + 43, "{a}");
    }
}
