//! The HTTP edge's errors: the one error shape of the API
//! (`{"error":{"code":"NotFound","message":"…"}}`) and the one place that decides which status
//! and code each domain error gets (the domain modules' own `thiserror` errors know nothing of
//! HTTP: [`StateError`], [`AdmitError`], [`QueueError`], [`CallError`], [`JobError`],
//! [`EventError`]).
//!
//! Client errors keep their message; internal errors are answered with a generic 500 and
//! logged with their full cause chain when the answer is made (axum's
//! `examples/error-handling`), never when the error is.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dispatch_core::ValidationError;
use dispatch_store::StoreError;

use crate::admission::AdmitError;
use crate::events::EventError;
use crate::invoke::CallError;
use crate::jobs::JobError;
use crate::queue::QueueError;
use crate::resources::ResourceError;
use crate::state::StateError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// Stable machine-readable code (also what metrics would label).
    pub code: &'static str,
    pub message: String,
    /// Seconds, for 429/503.
    pub retry_after: Option<u32>,
    /// An internal failure's cause chain: logged when answered, never sent.
    detail: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
            detail: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NotFound", message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "Conflict", message)
    }

    /// A reference to something that does not exist (an image, a base image, a function).
    pub fn unknown_reference(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "UnknownReference",
            message,
        )
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge", message)
    }

    /// An internal failure: answered without details; its chain is logged when answered.
    pub fn internal(context: &str, err: &(dyn std::error::Error + 'static)) -> Self {
        let chain = crate::state::chain(err);
        let mut e = Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal",
            format!("internal error while {context}: see the server log"),
        );
        e.detail = Some(format!("{context}: {chain}"));
        e
    }

    /// A route that exists, asked with a method it does not take (axum adds the `Allow`
    /// header the message points to).
    pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!(
                "{method} is not allowed on {}: the Allow header lists the methods it takes",
                uri.path()
            ),
        )
    }

    pub fn with_retry_after(mut self, secs: u32) -> Self {
        self.retry_after = Some(secs);
        self
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        invalid(&e)
    }
}

fn invalid(e: &ValidationError) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "Invalid", e.message.clone())
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        store(&e)
    }
}

fn store(e: &StoreError) -> ApiError {
    match e {
        StoreError::NotFound { .. } => ApiError::not_found(e.to_string()),
        StoreError::AlreadyExists { .. } => {
            ApiError::new(StatusCode::CONFLICT, "AlreadyExists", e.to_string())
        }
        StoreError::Conflict { .. } | StoreError::Taken(_) => ApiError::conflict(e.to_string()),
        StoreError::Invalid { .. } => ApiError::bad_request(e.to_string()),
        StoreError::Remote { .. } => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Unavailable",
            e.to_string(),
        ),
        _ if e.is_disk_full() => ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "InsufficientStorage",
            "the server's disk is full: retry later; an operator frees space (dispatch runs \
             purge, dispatch gc)",
        ),
        _ => ApiError::internal("accessing the store", e),
    }
}

impl From<StateError> for ApiError {
    fn from(e: StateError) -> Self {
        state(&e)
    }
}

fn state(e: &StateError) -> ApiError {
    match e {
        StateError::Store(e) => store(e),
        StateError::Invalid(e) => invalid(e),
        StateError::NamespaceNotFound(_) => ApiError::not_found(e.to_string()),
        StateError::TokenExists(_) => {
            ApiError::new(StatusCode::CONFLICT, "AlreadyExists", e.to_string())
        }
        StateError::DiskFull(_) => ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "InsufficientStorage",
            e.to_string(),
        ),
        StateError::Internal { context, source } => ApiError::internal(context, source.as_ref()),
    }
}

impl From<AdmitError> for ApiError {
    fn from(e: AdmitError) -> Self {
        match e {
            AdmitError::Invalid(e) => invalid(&e),
            AdmitError::State(e) => state(&e),
            AdmitError::Misplaced(_) | AdmitError::Archive(_) => {
                ApiError::bad_request(e.to_string())
            }
            AdmitError::UnknownReference(_) => ApiError::unknown_reference(e.to_string()),
            AdmitError::RouteConflict(_) => {
                ApiError::new(StatusCode::CONFLICT, "RouteConflict", e.to_string())
            }
            AdmitError::BuiltIn(_) => ApiError::new(StatusCode::CONFLICT, "BuiltIn", e.to_string()),
        }
    }
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::Invalid(e) => invalid(&e),
            QueueError::Version(e) => e.into(),
            QueueError::State(e) => state(&e),
            QueueError::Full(_) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "QueueFull", e.to_string())
                    .with_retry_after(5)
            }
            QueueError::FunctionNotFound { .. } | QueueError::RunNotFound { .. } => {
                ApiError::not_found(e.to_string())
            }
            QueueError::PayloadTooLarge { .. } => ApiError::too_large(e.to_string()),
            QueueError::Finished { .. } | QueueError::NotDead { .. } => {
                ApiError::conflict(e.to_string())
            }
            QueueError::NotCancellable { .. } => {
                ApiError::new(StatusCode::CONFLICT, "NotCancellable", e.to_string())
            }
            QueueError::CancelUnconfirmed { .. } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "Unavailable",
                e.to_string(),
            )
            .with_retry_after(1),
            // Logged where the store refused it.
            QueueError::NotStored => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal", e.to_string())
            }
        }
    }
}

impl From<CallError> for ApiError {
    fn from(e: CallError) -> Self {
        match e {
            CallError::State(e) => state(&e),
            CallError::Busy(_) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "Busy", e.to_string())
                    .with_retry_after(1)
            }
            CallError::PayloadTooLarge => ApiError::too_large(e.to_string()),
            CallError::NotFound { .. } => ApiError::not_found(e.to_string()),
            CallError::Version(e) => e.into(),
            CallError::Invalid(e) => invalid(&e),
            CallError::BuildFailed { .. } => {
                ApiError::new(StatusCode::CONFLICT, "FunctionNotReady", e.to_string())
            }
            CallError::NotReady { .. } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "FunctionNotReady",
                e.to_string(),
            )
            .with_retry_after(1),
        }
    }
}

impl From<crate::versions::VersionError> for ApiError {
    fn from(e: crate::versions::VersionError) -> Self {
        use crate::versions::VersionError;
        match e {
            VersionError::State(e) => state(&e),
            VersionError::NoVersion { .. } | VersionError::NoAlias { .. } => {
                ApiError::not_found(e.to_string())
            }
            VersionError::Unavailable { .. } => {
                ApiError::new(StatusCode::CONFLICT, "VersionUnavailable", e.to_string())
            }
        }
    }
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::Invalid(e) => invalid(&e),
            JobError::State(e) => state(&e),
            JobError::TemplateNotFound { .. } | JobError::NotFound { .. } => {
                ApiError::not_found(e.to_string())
            }
            JobError::Render { .. } => {
                ApiError::new(StatusCode::BAD_REQUEST, "RenderError", e.to_string())
            }
            JobError::Ended { .. } | JobError::Ending(_) => ApiError::conflict(e.to_string()),
            JobError::Exists(_) => {
                ApiError::new(StatusCode::CONFLICT, "AlreadyExists", e.to_string())
            }
        }
    }
}

impl From<ResourceError> for ApiError {
    fn from(e: ResourceError) -> Self {
        match e {
            ResourceError::Job(e) => e.into(),
            ResourceError::State(e) => state(&e),
            ResourceError::InUse { .. } => {
                ApiError::new(StatusCode::CONFLICT, "InUse", e.to_string())
            }
            ResourceError::NotEmpty { .. } => {
                ApiError::new(StatusCode::CONFLICT, "NotEmpty", e.to_string())
            }
        }
    }
}

impl From<EventError> for ApiError {
    fn from(e: EventError) -> Self {
        match e {
            EventError::Invalid(e) => invalid(&e),
            EventError::State(e) => state(&e),
            EventError::Batch(e) => state(&e),
            EventError::TooLarge { .. } => ApiError::too_large(e.to_string()),
            EventError::DeliveriesPending { .. } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "DeliveriesPending",
                e.to_string(),
            )
            .with_retry_after(5),
            EventError::Stopping => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "Unavailable",
                e.to_string(),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Some(detail) = &self.detail {
            tracing::error!("{detail}");
        }
        let body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// Parses a JSON request body into `T`, answering our error shape instead of axum's text.
pub fn parse_json<'a, T: serde::Deserialize<'a>>(
    body: &'a [u8],
    what: &str,
) -> Result<T, ApiError> {
    check_json(body, what)?;
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "InvalidJson",
            format!("{what} is not valid: {e}"),
        )
    })
}

/// Refuses JSON that a runtime could not take back whole (400 `InputError`): nested deeper
/// than [`dispatch_core::MAX_JSON_DEPTH`], numbers beyond a 64-bit float's range (runtimes
/// read them as infinity), lone surrogates. One cheap scan; a full parse only when one of the
/// last two may be there. Syntax errors are left to the caller's own parse.
pub fn check_json(json: &[u8], what: &str) -> Result<(), ApiError> {
    let max = dispatch_core::MAX_JSON_DEPTH;
    let refuse = |why: String| ApiError::new(StatusCode::BAD_REQUEST, "InputError", why);
    let scan = dispatch_core::scan_json(json, max);
    if scan.too_deep {
        return Err(refuse(format!(
            "{what} nests arrays or objects deeper than {max} levels, the limit: flatten it"
        )));
    }
    if scan.needs_full_parse
        && serde_json::from_slice::<&serde_json::value::RawValue>(json).is_ok()
        && let Err(e) = serde_json::from_slice::<serde_json::Value>(json)
    {
        return Err(refuse(format!(
            "{what} holds a value runtimes cannot take back whole ({e}): send numbers beyond \
             a 64-bit float and lone surrogates as strings"
        )));
    }
    Ok(())
}

/// Maps a body extraction failure (too large, unreadable) to our error shape.
pub fn body_rejection(r: axum::extract::rejection::BytesRejection, limit: usize) -> ApiError {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::too_large(format!(
            "request body is larger than the limit of {} MiB",
            limit / (1024 * 1024)
        ))
    } else if crate::serve::body_timed_out(&r) {
        crate::serve::body_timeout_error()
    } else {
        ApiError::new(r.status(), "BadRequest", r.body_text())
    }
}
