//! `POST /v1/namespaces/{ns}/events`: CloudEvents 1.0 in structured
//! (`application/cloudevents+json`), batch (`application/cloudevents-batch+json`) or binary
//! (`ce-*` headers) mode; `GET …/events[?type=&undelivered=true&limit=]`; redelivery of dead
//! deliveries per event or subscription, and a subscription's delivery counts.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dispatch_core::Kind;
use dispatch_core::events::{CloudEvent, DeliveryStats, StoredEvent};
use dispatch_store::Redeliver;

use super::{ListQuery, check_namespace};
use crate::error::{ApiError, body_rejection, parse_json};
use crate::state::AppState;

/// A CloudEvent from binary mode: attributes in `ce-*` headers, the body is the data: JSON
/// for a JSON content type, or none when it parses; text as a string; other bytes as
/// `data_base64`.
fn binary(headers: &HeaderMap, body: &[u8]) -> Result<CloudEvent, ApiError> {
    let mut attrs = serde_json::Map::new();
    for (k, v) in headers {
        if let Some(name) = k.as_str().strip_prefix("ce-") {
            let v = v
                .to_str()
                .map_err(|_| ApiError::bad_request(format!("header ce-{name} is not text")))?;
            attrs.insert(name.to_string(), v.into());
        }
    }
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    if !body.is_empty() {
        let media = ct.map(|c| {
            c.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
        let json = match media.as_deref() {
            Some(m) if m.ends_with("json") => Some(parse_json(body, "event data")?),
            // No content type: JSON, as CloudEvents' JSON format reads an absent
            // datacontenttype (the official SDKs send JSON data so), when the body parses.
            None => parse_json::<serde_json::Value>(body, "event data").ok(),
            Some(_) => None,
        };
        match (json, std::str::from_utf8(body)) {
            (Some(v), _) => {
                attrs.insert("data".into(), v);
            }
            (None, Ok(text)) => {
                attrs.insert("data".into(), text.into());
            }
            // Bytes that are not text are kept as they came, base64-encoded as the JSON
            // format carries binary data (and handed to the function so).
            (None, Err(_)) => {
                use base64::Engine as _;
                let encoded = base64::engine::general_purpose::STANDARD.encode(body);
                attrs.insert("data_base64".into(), encoded.into());
            }
        }
    }
    if let Some(c) = ct {
        attrs.insert("datacontenttype".into(), c.into());
    }
    serde_json::from_value(serde_json::Value::Object(attrs))
        .map_err(|e| ApiError::bad_request(format!("not a CloudEvent: {e}")))
}

pub async fn ingest(
    State(state): State<Arc<AppState>>,
    Path(ns): Path<String>,
    request: Option<axum::Extension<crate::otlp::RequestTrace>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    check_namespace(&ns)?;
    state.require_namespace(&ns)?;
    // An event without a `traceparent` extension joins the trace of the request that brought
    // it — the server's span of the request when spans are made, else the client's
    // `traceparent` — so that its deliveries' runs are in that trace.
    let tp = match &request {
        Some(axum::Extension(t)) => Some(t.0.traceparent()),
        None => crate::invoke::traceparent(&headers)
            .filter(|t| dispatch_core::trace::parse(t).is_some())
            .map(str::to_string),
    };
    let carry = |mut e: CloudEvent| {
        if let Some(tp) = &tp {
            e.extensions
                .entry("traceparent".to_string())
                .or_insert_with(|| tp.clone().into());
        }
        e
    };
    let body = body.map_err(|r| body_rejection(r, dispatch_core::MAX_PAYLOAD_BYTES))?;
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if ct == "application/cloudevents-batch+json" {
        let events: Vec<CloudEvent> = parse_json(&body, "CloudEvents batch")?;
        // Bad input refuses the whole batch before any event is stored.
        for (i, e) in events.iter().enumerate() {
            e.validate().map_err(|err| {
                ApiError::bad_request(format!(
                    "event {i} of the batch: {}: nothing was stored",
                    err.message
                ))
            })?;
        }
        let mut out = Vec::new();
        for (i, e) in events.into_iter().enumerate() {
            match crate::events::ingest(&state, &ns, carry(e)).await {
                Ok(r) => out.push(r),
                // Refused part-way (back-pressure, disk): say which were stored, so that the
                // producer resends from the first refused one.
                Err(err) if i > 0 => {
                    let mut err = ApiError::from(err);
                    err.message = format!(
                        "events 0..{i} of the batch were accepted (ids {}); event {i} and the rest \
                         were not: {}",
                        out.iter()
                            .map(|r| r.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                        err.message
                    );
                    return Err(err);
                }
                Err(err) => return Err(err.into()),
            }
        }
        return Ok((StatusCode::ACCEPTED, Json(out)).into_response());
    }
    let event = if ct == "application/cloudevents+json" {
        parse_json(&body, "CloudEvent")?
    } else if headers.contains_key("ce-specversion") || headers.contains_key("ce-id") {
        binary(&headers, &body)?
    } else {
        return Err(ApiError::bad_request(
            "send a CloudEvent: structured (Content-Type: application/cloudevents+json) or binary (ce-specversion, ce-id, ce-source and ce-type headers)",
        ));
    };
    let r = crate::events::ingest(&state, &ns, carry(event)).await?;
    Ok((StatusCode::ACCEPTED, Json(r)).into_response())
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    Path(ns): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<StoredEvent>>, ApiError> {
    check_namespace(&ns)?;
    let limit = q.limit()?.unwrap_or(100);
    let undelivered = ListQuery::flag("undelivered", q.undelivered.as_deref())?;
    let t = q.event_type;
    Ok(Json(
        state
            .db(move |s| s.list_events(&ns, t.as_deref(), undelivered, limit))
            .await?,
    ))
}

/// `POST …/events/{id}/redeliver[?source=S]`: the event's dead deliveries become pending
/// again (a new TTL); 404 when it has none.
pub async fn redeliver_event(
    State(state): State<Arc<AppState>>,
    Path((ns, id)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_namespace(&ns)?;
    let which = Redeliver::Event {
        id: id.clone(),
        source: q.get("source").cloned(),
    };
    let n = crate::deliveries::redeliver(&state, &ns, which).await?;
    if n == 0 {
        return Err(ApiError::not_found(format!(
            "event {id:?} has no dead deliveries in namespace {ns:?} (see dispatch get events \
             --undelivered)"
        )));
    }
    Ok(Json(serde_json::json!({ "redelivered": n })))
}

/// `POST …/subscriptions/{name}/redeliver`: every dead delivery of the subscription becomes
/// pending again.
pub async fn redeliver_subscription(
    State(state): State<Arc<AppState>>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_namespace(&ns)?;
    let n = crate::deliveries::redeliver(&state, &ns, Redeliver::Subscription(name)).await?;
    Ok(Json(serde_json::json!({ "redelivered": n })))
}

/// `GET …/subscriptions/{name}/deliveries`: pending and dead now, queued and retried since
/// the server started, the oldest pending one's age.
pub async fn subscription_deliveries(
    State(state): State<Arc<AppState>>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Json<DeliveryStats>, ApiError> {
    check_namespace(&ns)?;
    if state.get(&ns, Kind::Subscription, &name).await?.is_none() {
        return Err(ApiError::not_found(format!(
            "subscription {name:?} not found in namespace {ns:?}"
        )));
    }
    let now = state.queue.clock.now();
    Ok(Json(state.deliveries.stats(&ns, &name, now)))
}
