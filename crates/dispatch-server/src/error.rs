//! The one error shape of the API: `{"error":{"code":"NotFound","message":"…"}}`.
//!
//! Client errors keep their message; internal errors are logged with their full cause chain
//! and answered with a generic 500 (axum's `examples/error-handling`).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dispatch_core::ValidationError;
use dispatch_store::StoreError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// Stable machine-readable code (also what metrics would label).
    pub code: &'static str,
    pub message: String,
    /// Seconds, for 429/503.
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
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

    /// An internal failure: logged with its chain, answered without details.
    pub fn internal(context: &str, err: &(dyn std::error::Error + 'static)) -> Self {
        let mut chain = err.to_string();
        let mut source = err.source();
        while let Some(s) = source {
            chain.push_str(": ");
            chain.push_str(&s.to_string());
            source = s.source();
        }
        tracing::error!("{context}: {chain}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal",
            format!("internal error while {context}: see the server log"),
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
        Self::new(StatusCode::BAD_REQUEST, "Invalid", e.message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::NotFound { .. } => Self::not_found(e.to_string()),
            StoreError::AlreadyExists { .. } => {
                Self::new(StatusCode::CONFLICT, "AlreadyExists", e.to_string())
            }
            StoreError::Conflict { .. } => Self::conflict(e.to_string()),
            StoreError::Invalid { .. } => Self::bad_request(e.to_string()),
            StoreError::Remote { .. } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "Unavailable",
                e.to_string(),
            ),
            _ if e.is_disk_full() => Self::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "InsufficientStorage",
                "the server's disk is full: retry later; an operator frees space (dispatch runs \
                 purge, dispatch gc)",
            ),
            _ => Self::internal("accessing the store", &e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
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
