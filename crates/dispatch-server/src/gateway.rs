//! The gateway (default 127.0.0.1:8081): user HTTP endpoints routed to functions by host,
//! method and path (DESIGN §4). The request becomes the payload (query for GET/DELETE, the
//! JSON or form body, else the body as a string); the function's payload is the response.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dispatch_core::{ErrorType, MAX_PAYLOAD_BYTES, Trigger};
use serde_json::value::RawValue;

use crate::error::ApiError;
use crate::invoke::{self, Invocation};
use crate::routes::Lookup;
use crate::state::AppState;

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .merge(crate::api::execute_routes().router)
        .fallback(handle)
        .method_not_allowed_fallback(ApiError::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::auth::gateway_guard,
        ))
        .with_state(state)
}

/// Headers never handed to functions.
const HIDDEN_HEADERS: [&str; 3] = ["authorization", "cookie", "proxy-authorization"];

fn cors_headers(h: &mut HeaderMap) {
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
}

async fn handle(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.host());
    let path = parts.uri.path();
    // Webhook drivers: any request to their path becomes an event.
    let hook = state.event_index().webhooks.get(path).cloned();
    if let Some((ns, name, spec)) = hook {
        let bytes = match read_body(body).await {
            Ok(b) => b,
            Err(e) => return e.into_response(),
        };
        let data = match payload_of(&parts.method, parts.uri.query(), &parts.headers, &bytes) {
            Ok(p) => serde_json::from_str::<serde_json::Value>(p.get()).unwrap_or_default(),
            Err(e) => return e.into_response(),
        };
        let ct = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let id = ulid::Ulid::new().to_string();
        let now = state.queue.clock.now();
        let fire = crate::events::Fire {
            ns: &ns,
            driver: &name,
            spec: &spec,
            id,
            time: now,
            data,
            content_type: ct,
        };
        return match crate::events::emit_from_driver(&state, fire).await {
            Ok(v) => (StatusCode::ACCEPTED, axum::Json(v)).into_response(),
            Err(e) => ApiError::from(e).into_response(),
        };
    }
    let lookup = state.routes().find(host, parts.method.as_str(), path);
    let m = match lookup {
        Lookup::Found(m) => m,
        Lookup::MethodNotAllowed(r) => {
            let allow = r.methods.join(", ");
            if r.cors && parts.method == Method::OPTIONS {
                let mut resp = StatusCode::NO_CONTENT.into_response();
                let h = resp.headers_mut();
                cors_headers(h);
                if let Ok(v) = HeaderValue::from_str(&allow) {
                    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, v);
                }
                h.insert(
                    header::ACCESS_CONTROL_ALLOW_HEADERS,
                    HeaderValue::from_static("*"),
                );
                return resp;
            }
            let mut resp = ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!(
                    "{} {path} is not routed: this path takes {allow}",
                    parts.method
                ),
            )
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&allow) {
                resp.headers_mut().insert(header::ALLOW, v);
            }
            return resp;
        }
        Lookup::NotFound => {
            return ApiError::not_found(format!("no endpoint routes {} {path}", parts.method))
                .into_response();
        }
    };
    if m.route.token {
        let need = crate::auth::Need::RoleIn(
            dispatch_core::auth::Role::Developer,
            m.route.namespace.clone(),
        );
        if let Err(e) = crate::auth::authorize(&state, &parts.headers, &need) {
            return e.into_response();
        }
    }
    if let Some(ws) = m.route.websocket {
        let http = http_context(&parts, &m);
        let (ns, function) = (m.route.namespace.clone(), m.route.function.clone());
        return crate::websocket::upgrade(state.clone(), parts, &ns, &function, ws, http).await;
    }
    let bytes = match read_body(body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let payload = match payload_of(&parts.method, parts.uri.query(), &parts.headers, &bytes) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let blocking = parts
        .headers
        .get("x-dispatch-blocking")
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| !v.eq_ignore_ascii_case("false"));
    let http = http_context(&parts, &m);
    let call = Invocation::new(
        &m.route.namespace,
        &m.route.function,
        payload,
        Trigger::Endpoint,
    )
    .http(http)
    .traced(&parts.headers);
    // Only an endpoint to an alias reads the affinity key (a plain endpoint pays nothing).
    let call = if m.route.function.contains('@') {
        call.affinity(crate::versions::affinity_of(&parts.headers))
    } else {
        call
    };
    if !blocking {
        // An async run (DESIGN §4): 202 with its id once it is durably queued; the handler
        // gets the same httpContext when it runs.
        let mut resp = match crate::queue::enqueue(&state, call).await {
            Ok(run) => crate::api::accepted(&run),
            Err(e) => ApiError::from(e).into_response(),
        };
        if m.route.cors {
            cors_headers(resp.headers_mut());
        }
        return resp;
    }
    let cors = m.route.cors;
    let format = if m.route.sse || crate::stream::wants_sse(&parts.headers) {
        crate::stream::Format::Sse
    } else {
        crate::stream::Format::Chunked
    };
    // The caller sees the handler's own message, never the platform's internals.
    let ending = crate::stream::ending(public_error);
    let mut resp = crate::stream::answer(state.clone(), call, format, whole, ending).await;
    if cors {
        cors_headers(resp.headers_mut());
    }
    resp
}

/// `context.httpContext`: the request as the handler sees it (no credentials).
fn http_context(parts: &axum::http::request::Parts, m: &crate::routes::Match) -> serde_json::Value {
    let headers: BTreeMap<&str, &str> = parts
        .headers
        .iter()
        .filter(|(k, _)| !HIDDEN_HEADERS.contains(&k.as_str()))
        .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?)))
        .collect();
    let params: BTreeMap<&str, &str> = m
        .params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query().unwrap_or(""),
        "headers": headers,
        "params": params,
        "endpoint": m.route.endpoint,
    })
}

/// The gateway's answer of a call that did not stream: the payload, or the error object.
fn whole(outcome: Result<invoke::Answer, invoke::CallError>) -> Response {
    match outcome {
        Ok(answer) => {
            let (status, body) = match &answer.envelope.context.error {
                None => (StatusCode::OK, answer.envelope.payload.get().to_string()),
                Some(e) => {
                    let status = if e.kind == ErrorType::InputError {
                        StatusCode::BAD_REQUEST
                    } else {
                        StatusCode::INTERNAL_SERVER_ERROR
                    };
                    let timed_out = answer.status == dispatch_core::RunStatus::Timeout;
                    let public = public_error(e, &answer.run_id, timed_out);
                    (status, serde_json::json!({ "error": public }).to_string())
                }
            };
            crate::api::json_answer(status, body, &answer.run_id)
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// The error object a gateway caller sees (DESIGN §9: no platform internals): the handler's
/// own message for InputError/FunctionError, a plain sentence for SystemError, never a
/// stack trace (it names files of the platform); the run record keeps all of it for token
/// holders, and `runId` says which.
pub(crate) fn public_error(
    e: &dispatch_core::ErrorObject,
    run_id: &str,
    timed_out: bool,
) -> serde_json::Value {
    let message = match e.kind {
        ErrorType::SystemError if timed_out => "the function timed out".to_string(),
        ErrorType::SystemError => "the function could not run (a platform error, not the \
             function's): its run record has the details"
            .to_string(),
        _ => e.message.clone(),
    };
    serde_json::json!({
        "type": e.kind,
        "message": message,
        "stacktrace": [],
        "runId": run_id,
    })
}

/// The whole request body: 413 past the payload limit, 408 when it stops arriving.
async fn read_body(body: axum::body::Body) -> Result<bytes::Bytes, ApiError> {
    axum::body::to_bytes(body, MAX_PAYLOAD_BYTES)
        .await
        .map_err(|e| {
            if crate::serve::body_timed_out(&e) {
                crate::serve::body_timeout_error()
            } else {
                invoke::CallError::PayloadTooLarge.into()
            }
        })
}

fn is_json(content_type: &str) -> bool {
    let ct = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    ct == "application/json" || ct.ends_with("+json")
}

/// The payload of a gateway request (DESIGN §4).
pub fn payload_of(
    method: &Method,
    query: Option<&str>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Box<RawValue>, ApiError> {
    if *method == Method::GET || *method == Method::DELETE || *method == Method::HEAD {
        let q: BTreeMap<String, String> = serde_urlencoded::from_str(query.unwrap_or(""))
            .map_err(|e| ApiError::bad_request(format!("query string is not valid: {e}")))?;
        return to_raw(&q);
    }
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return to_raw(&serde_json::Map::new());
    }
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if is_json(ct) {
        let text = std::str::from_utf8(body)
            .map_err(|_| ApiError::bad_request("request body is not json"))?
            .trim();
        crate::error::check_json(text.as_bytes(), "the JSON body")?;
        return RawValue::from_string(text.to_string())
            .map_err(|_| ApiError::bad_request("request body is not json"));
    }
    if ct.starts_with("application/x-www-form-urlencoded") {
        let form: BTreeMap<String, String> = serde_urlencoded::from_bytes(body)
            .map_err(|e| ApiError::bad_request(format!("form body is not valid: {e}")))?;
        return to_raw(&form);
    }
    to_raw(&String::from_utf8_lossy(body).into_owned())
}

fn to_raw<T: serde::Serialize>(v: &T) -> Result<Box<RawValue>, ApiError> {
    serde_json::value::to_raw_value(v).map_err(|e| ApiError::internal("encoding a payload", &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(method: Method, query: Option<&str>, ct: &str, body: &str) -> Result<String, ApiError> {
        let mut h = HeaderMap::new();
        if !ct.is_empty() {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
        }
        payload_of(&method, query, &h, body.as_bytes()).map(|r| r.get().to_string())
    }

    /// Found by `fuzz_gateway_payload_mapping`: JSON that passes a quick validation but that
    /// runtimes cannot take back whole (and the server's own parse turned into null).
    #[test]
    fn json_runtimes_cannot_take_back_is_a_400() {
        for body in ["[1e400]", "{\"n\": -2E+999}", "\"\\ud800\" \u{c}"] {
            let e = p(Method::POST, None, "application/json", body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert!(
                e.message.contains("cannot take back whole"),
                "{body}: {}",
                e.message
            );
        }
        // In range, and escapes that pair up, pass through untouched.
        let ok = p(
            Method::POST,
            None,
            "application/json",
            "[1.5e300, \"\\ud83d\\ude00\"]",
        );
        assert_eq!(ok.unwrap(), "[1.5e300, \"\\ud83d\\ude00\"]");
    }

    #[test]
    fn payload_mapping() {
        assert_eq!(
            p(Method::GET, Some("name=Jon&x=a%20b"), "", "").unwrap(),
            r#"{"name":"Jon","x":"a b"}"#
        );
        assert_eq!(p(Method::GET, None, "", "").unwrap(), "{}");
        assert_eq!(
            p(Method::POST, None, "application/json", r#" {"a": 1} "#).unwrap(),
            r#"{"a": 1}"#
        );
        assert_eq!(
            p(
                Method::POST,
                None,
                "application/cloudevents+json; charset=utf-8",
                "[1]"
            )
            .unwrap(),
            "[1]"
        );
        assert_eq!(
            p(
                Method::POST,
                None,
                "application/x-www-form-urlencoded",
                "a=1&b=two"
            )
            .unwrap(),
            r#"{"a":"1","b":"two"}"#
        );
        assert_eq!(
            p(Method::POST, None, "text/plain", "hi \"there\"").unwrap(),
            r#""hi \"there\"""#
        );
        assert_eq!(p(Method::PUT, None, "application/json", "").unwrap(), "{}");
        let e = p(Method::POST, None, "application/json", "{nope").unwrap_err();
        assert_eq!(
            (e.status, e.message.as_str()),
            (StatusCode::BAD_REQUEST, "request body is not json")
        );
    }
}
