//! Dispatch's invocation envelope, what every call answers:
//! `{"context":{"logs":{"stdout":[…],"stderr":[…]},"error":null|{type,message,stacktrace}},"payload":…}`.
//!
//! `payload` stays raw JSON ([`RawValue`]) so that it passes from worker to client without
//! being parsed and re-encoded (DESIGN §10).

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The three error types of Dispatch's function servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorType {
    /// The caller sent bad input (Python ValueError/TypeError, schema failure): HTTP 400.
    InputError,
    /// The handler failed: HTTP 500.
    FunctionError,
    /// The platform failed (worker crash, timeout, bad frame): HTTP 500.
    SystemError,
}

impl fmt::Display for ErrorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorType::InputError => "InputError",
            ErrorType::FunctionError => "FunctionError",
            ErrorType::SystemError => "SystemError",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorObject {
    #[serde(rename = "type")]
    pub kind: ErrorType,
    pub message: String,
    #[serde(default)]
    pub stacktrace: Vec<String>,
}

impl ErrorObject {
    pub fn system(message: impl Into<String>) -> Self {
        ErrorObject {
            kind: ErrorType::SystemError,
            message: message.into(),
            stacktrace: Vec::new(),
        }
    }

    pub fn input(message: impl Into<String>) -> Self {
        ErrorObject {
            kind: ErrorType::InputError,
            message: message.into(),
            stacktrace: Vec::new(),
        }
    }

    pub fn function(message: impl Into<String>) -> Self {
        ErrorObject {
            kind: ErrorType::FunctionError,
            message: message.into(),
            stacktrace: Vec::new(),
        }
    }
}

/// Lines a call wrote to stdout and stderr.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logs {
    #[serde(default, deserialize_with = "null_as_empty")]
    pub stdout: Vec<String>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub stderr: Vec<String>,
}

/// Marker line that ends logs cut at their cap.
pub const TRUNCATED_MARKER: &str = "[dispatch: logs truncated]";

impl Logs {
    /// Keeps at most `max_bytes` of lines (stdout first, then stderr); when lines are cut,
    /// the stream that was cut ends with [`TRUNCATED_MARKER`].
    pub fn cap(&mut self, max_bytes: usize) {
        let mut budget = max_bytes;
        for stream in [&mut self.stdout, &mut self.stderr] {
            let mut keep = 0;
            for line in stream.iter() {
                if line.len() > budget {
                    break;
                }
                budget -= line.len();
                keep += 1;
            }
            if keep < stream.len() {
                stream.truncate(keep);
                stream.push(TRUNCATED_MARKER.to_string());
                budget = 0;
            }
        }
    }
}

/// Dispatch's own function servers answer `"stderr": null` when nothing was written.
fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeContext {
    #[serde(default)]
    pub logs: Logs,
    #[serde(default)]
    pub error: Option<ErrorObject>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope {
    pub context: EnvelopeContext,
    pub payload: Box<RawValue>,
}

impl Envelope {
    /// An envelope that carries only an error (payload `null`).
    pub fn error(error: ErrorObject, logs: Logs) -> Self {
        Envelope {
            context: EnvelopeContext {
                logs,
                error: Some(error),
            },
            payload: null_raw(),
        }
    }

    pub fn error_ref(&self) -> Option<&ErrorObject> {
        self.context.error.as_ref()
    }
}

impl Clone for Envelope {
    fn clone(&self) -> Self {
        Envelope {
            context: self.context.clone(),
            payload: self.payload.clone(),
        }
    }
}

/// The raw JSON `null`.
pub fn null_raw() -> Box<RawValue> {
    RawValue::from_string("null".to_string()).unwrap_or_else(|_| unreachable_null())
}

// `null` is always valid JSON; this exists only so that `null_raw` has no panic path.
fn unreachable_null() -> Box<RawValue> {
    serde_json::value::to_raw_value(&serde_json::Value::Null).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_are_capped_with_a_marker() {
        let mut l = Logs {
            stdout: vec!["aaaa".into(), "bbbb".into()],
            stderr: vec!["cc".into()],
        };
        l.cap(100);
        assert_eq!(l.stdout.len(), 2);
        l.cap(6);
        assert_eq!(l.stdout, ["aaaa", TRUNCATED_MARKER]);
        assert_eq!(l.stderr, [TRUNCATED_MARKER], "stderr lost its line too");
        let mut l = Logs {
            stdout: vec!["a".into()],
            stderr: vec!["bbbbbbbbbb".into()],
        };
        l.cap(4);
        assert_eq!(
            (l.stdout.len(), l.stderr.as_slice()),
            (1, [TRUNCATED_MARKER.to_string()].as_slice())
        );
    }

    #[test]
    fn envelope_has_dispatch_shape() {
        let e = Envelope::error(ErrorObject::input("bad"), Logs::default());
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"context":{"logs":{"stdout":[],"stderr":[]},
                "error":{"type":"InputError","message":"bad","stacktrace":[]}},"payload":null})
        );
    }

    #[test]
    fn null_logs_read_as_empty() {
        let e: Envelope = serde_json::from_str(
            r#"{"context":{"logs":{"stdout":["x"],"stderr":null}},"payload":{"a":1}}"#,
        )
        .unwrap();
        assert_eq!(e.context.logs.stdout, vec!["x"]);
        assert!(e.context.logs.stderr.is_empty());
        assert_eq!(e.payload.get(), r#"{"a":1}"#);
    }
}
