//! Dispatch's vocabulary: resource types with the Kubernetes shape
//! (`apiVersion/kind/metadata/spec/status`), name and spec validation, YAML/JSON manifests,
//! the invocation envelope and the run record. No I/O and no async: every other crate
//! depends on this one, and it depends on none of them.
//!
//! Start with [`resource`] (the [`Object`] every store row and API body is), then
//! [`envelope`] (what a function call answers) and [`run`] (what a call leaves behind).

pub mod auth;
pub mod digest;
pub mod duration;
pub mod envelope;
pub mod error;
pub mod events;
#[cfg(feature = "fuzz")]
pub mod fuzz;
pub mod jobs;
pub mod manifest;
pub mod names;
pub mod quantity;
pub mod references;
pub mod resource;
pub mod run;
mod run_json;
pub mod trace;
pub mod versions;
pub mod views;

pub use envelope::{Envelope, ErrorObject, ErrorType, Logs};
pub use error::ValidationError;
pub use jobs::{JobExecution, JobPhase, JobTemplateSpec};
pub use resource::{
    API_VERSION, BaseImageSpec, EndpointSpec, FunctionSpec, History, HistoryPolicy, ImageSpec,
    Kind, Language, Metadata, Object, Phase, Protocol, Retry, RetryPolicy, SealedSecret,
    SecretSpec, Status, WebSocketSettings,
};
pub use run::{
    AttemptError, Callback, CallbackState, ColdStart, Run, RunStatus, StartMethod, StreamStats,
    Timings, Trigger,
};

/// The namespace used when none is given (Dispatch's default organization).
pub const DEFAULT_NAMESPACE: &str = "default";

/// Largest payload accepted for a call, in bytes (DESIGN §5: default max 6 MiB → 413).
pub const MAX_PAYLOAD_BYTES: usize = 6 * 1024 * 1024;

/// Deepest nesting of arrays and objects accepted in a JSON payload or request body: deeper
/// documents are refused with 400 before any worker parses them (a runtime's own parser may
/// fail on them in ways that are not the caller's business).
pub const MAX_JSON_DEPTH: usize = 64;

/// What one pass over a JSON document found (see [`scan_json`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonScan {
    /// Arrays/objects nest deeper than the limit given (the scan stopped there).
    pub too_deep: bool,
    /// Something a quick validation lets through but a full parse may refuse: a number with
    /// an exponent or 309 digits in a row (beyond a 64-bit float's range, read as infinity by
    /// runtimes), or a `\u` escape (a lone surrogate). Such a document is parsed in full.
    pub needs_full_parse: bool,
}

/// One pass over `json` that skips strings: its nesting against `max`, and whether it needs
/// a full parse. It does not validate: the parser does that after.
pub fn scan_json(json: &[u8], max: usize) -> JsonScan {
    let mut scan = JsonScan {
        too_deep: false,
        needs_full_parse: false,
    };
    let (mut depth, mut in_string, mut escaped, mut digits) = (0usize, false, false, 0usize);
    for &b in json {
        if in_string {
            match (escaped, b) {
                (true, b'u') => {
                    scan.needs_full_parse = true;
                    escaped = false;
                }
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    scan.too_deep = true;
                    return scan;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'e' | b'E' if digits > 0 => scan.needs_full_parse = true,
            b'0'..=b'9' | b'.' => {
                digits += 1;
                if digits >= 309 {
                    scan.needs_full_parse = true;
                }
                continue;
            }
            _ => {}
        }
        digits = 0;
    }
    scan
}

/// Whether `json` nests arrays/objects deeper than `max` ([`scan_json`]).
pub fn json_too_deep(json: &[u8], max: usize) -> bool {
    scan_json(json, max).too_deep
}

/// Whether `json` needs a full parse ([`JsonScan::needs_full_parse`]).
pub fn json_needs_full_parse(json: &[u8]) -> bool {
    scan_json(json, usize::MAX).needs_full_parse
}

#[cfg(test)]
mod depth_tests {
    use super::*;

    #[test]
    fn nesting_is_counted_outside_strings_only() {
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(!json_too_deep(deep(64).as_bytes(), 64));
        assert!(json_too_deep(deep(65).as_bytes(), 64));
        assert!(json_too_deep(b"{\"a\":{\"b\":[[1]]}}", 3));
        assert!(!json_too_deep(b"{\"a\":{\"b\":[[1]]}}", 4));
        // Brackets in strings, escaped quotes included, do not count.
        let s = format!("{{\"s\": \"\\\"{}\"}}", "[".repeat(500));
        assert!(!json_too_deep(s.as_bytes(), 2), "{s}");
        // Siblings do not add up.
        assert!(!json_too_deep(b"[[1],[2],[3],[4]]", 2));
    }

    #[test]
    fn what_needs_a_full_parse_is_spotted() {
        assert!(json_needs_full_parse(b"[1e400]"));
        assert!(json_needs_full_parse(b"[1.5E3]"));
        assert!(json_needs_full_parse(
            format!("[{}]", "9".repeat(400)).as_bytes()
        ));
        assert!(json_needs_full_parse(b"[\"\\ud800\"]"));
        assert!(!json_needs_full_parse(
            b"{\"exp\": \"1e400\", \"n\": -12.5}"
        ));
        assert!(!json_needs_full_parse(b"[true, false, null, \"\\n\"]"));
    }
}
