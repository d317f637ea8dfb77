//! A run record's JSON written by hand: the same bytes as `serde_json::to_writer(run)` (the
//! tests hold the two together), several times cheaper for the run history, which writes one
//! record per sync call (issue 26: serde's derive cost ~16k instructions a record, most of
//! what recording a call still cost once SQLite wrote records in chunks). Keys are constants,
//! ids and names go out without the escaping scan when they need none, timestamps without
//! jiff's printer; the rare parts (an error, a callback, an event…) go through serde.
//!
//! Every field of [`Run`] is named below (no `..`): a field added to the struct does not
//! compile here until it is written.

use jiff::Timestamp;
use serde::Serialize;

use crate::run::Run;

impl Run {
    /// Appends this run's JSON to `out`, byte for byte what `serde_json` writes.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let Run {
            id,
            namespace,
            function,
            status,
            trigger,
            input,
            output,
            logs,
            error,
            attempts,
            cold,
            cold_start,
            timings,
            created_at,
            started_at,
            finished_at,
            digest,
            version,
            stream,
            pinned_version,
            is_async,
            trace,
            attempt_errors,
            next_attempt_at,
            redriven_at,
            event,
            http_context,
            callback,
            replica,
        } = self;
        out.extend_from_slice(b"{\"id\":");
        string(out, id);
        out.extend_from_slice(b",\"namespace\":");
        string(out, namespace);
        out.extend_from_slice(b",\"function\":");
        string(out, function);
        out.extend_from_slice(b",\"status\":\"");
        out.extend_from_slice(status.as_str().as_bytes());
        out.extend_from_slice(b"\",\"trigger\":\"");
        out.extend_from_slice(trigger.as_str().as_bytes());
        out.extend_from_slice(b"\",\"input\":");
        out.extend_from_slice(input.get().as_bytes());
        if let Some(o) = output {
            out.extend_from_slice(b",\"output\":");
            out.extend_from_slice(o.get().as_bytes());
        }
        out.extend_from_slice(b",\"logs\":{\"stdout\":");
        lines(out, &logs.stdout);
        out.extend_from_slice(b",\"stderr\":");
        lines(out, &logs.stderr);
        out.push(b'}');
        optional(out, "error", error.as_ref(), serde);
        out.extend_from_slice(b",\"attempts\":");
        number(out, *attempts);
        out.extend_from_slice(if *cold {
            b",\"cold\":true"
        } else {
            b",\"cold\":false"
        });
        optional(out, "coldStart", cold_start.as_ref(), serde);
        out.extend_from_slice(b",\"timings\":{\"queuedMs\":");
        number(out, timings.queued_ms);
        out.extend_from_slice(b",\"coldStartMs\":");
        number(out, timings.cold_start_ms);
        out.extend_from_slice(b",\"execMs\":");
        number(out, timings.exec_ms);
        out.push(b'}');
        out.extend_from_slice(b",\"createdAt\":");
        timestamp(out, created_at);
        optional(out, "startedAt", started_at.as_ref(), timestamp);
        optional(out, "finishedAt", finished_at.as_ref(), timestamp);
        optional(out, "digest", digest.as_deref(), string);
        optional(out, "version", version.as_ref(), |o, v: &u32| number(o, *v));
        optional(out, "stream", stream.as_ref(), serde);
        optional(
            out,
            "pinnedVersion",
            pinned_version.as_ref(),
            |o, v: &u32| number(o, *v),
        );
        if *is_async {
            out.extend_from_slice(b",\"async\":true");
        }
        if let Some(t) = trace {
            let crate::trace::Trace {
                trace_id,
                span_id,
                parent_id,
                sampled,
            } = t;
            out.extend_from_slice(b",\"trace\":{\"traceId\":");
            string(out, trace_id);
            out.extend_from_slice(b",\"spanId\":");
            string(out, span_id);
            if let Some(p) = parent_id {
                out.extend_from_slice(b",\"parentId\":");
                string(out, p);
            }
            out.extend_from_slice(if *sampled {
                b",\"sampled\":true}"
            } else {
                b",\"sampled\":false}"
            });
        }
        let attempts_failed = (!attempt_errors.is_empty()).then_some(attempt_errors);
        optional(out, "attemptErrors", attempts_failed, serde);
        optional(out, "nextAttemptAt", next_attempt_at.as_ref(), timestamp);
        optional(out, "redrivenAt", redriven_at.as_ref(), timestamp);
        optional(out, "event", event.as_ref(), serde);
        optional(out, "httpContext", http_context.as_ref(), serde);
        optional(out, "callback", callback.as_ref(), serde);
        optional(out, "replica", replica.as_deref(), string);
        out.push(b'}');
    }
}

/// `,"key":` and `value` as `write` writes it, when there is a value (serde's
/// `skip_serializing_if = "Option::is_none"`).
fn optional<T: ?Sized>(
    out: &mut Vec<u8>,
    key: &str,
    value: Option<&T>,
    write: impl FnOnce(&mut Vec<u8>, &T),
) {
    if let Some(v) = value {
        out.extend_from_slice(b",\"");
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(b"\":");
        write(out, v);
    }
}

/// A value as serde writes it (the rare parts of a record).
fn serde<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    serde_json::to_writer(&mut *out, value).expect("a run's parts serialize to JSON");
}

/// A JSON string: as is when nothing in it needs escaping (ids, names, digests, most log
/// lines), else escaped by serde_json.
fn string(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(&mut *out, s).expect("a string serializes to JSON");
    }
}

fn lines(out: &mut Vec<u8>, lines: &[String]) {
    out.push(b'[');
    for (i, l) in lines.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        string(out, l);
    }
    out.push(b']');
}

fn number(out: &mut Vec<u8>, n: impl Into<u64>) {
    let mut n: u64 = n.into();
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// A timestamp as jiff writes it (RFC 3339 in UTC, the fraction of a second with as many
/// digits as it needs, none when whole): years 0–9999 here, others through jiff.
fn timestamp(out: &mut Vec<u8>, t: &Timestamp) {
    let dt = jiff::tz::Offset::UTC.to_datetime(*t);
    let year = dt.year();
    if !(0..=9999).contains(&year) {
        serde_json::to_writer(&mut *out, t).expect("a timestamp serializes to JSON");
        return;
    }
    let two = |out: &mut Vec<u8>, n: i8| {
        out.push(b'0' + (n / 10) as u8);
        out.push(b'0' + (n % 10) as u8);
    };
    out.push(b'"');
    let y = year as u16;
    out.extend_from_slice(&[
        b'0' + (y / 1000) as u8,
        b'0' + (y / 100 % 10) as u8,
        b'0' + (y / 10 % 10) as u8,
        b'0' + (y % 10) as u8,
        b'-',
    ]);
    two(out, dt.month());
    out.push(b'-');
    two(out, dt.day());
    out.push(b'T');
    two(out, dt.hour());
    out.push(b':');
    two(out, dt.minute());
    out.push(b':');
    two(out, dt.second());
    let mut nanos = dt.subsec_nanosecond();
    if nanos > 0 {
        let mut digits = [b'0'; 9];
        for d in digits.iter_mut().rev() {
            *d = b'0' + (nanos % 10) as u8;
            nanos /= 10;
        }
        let len = digits.iter().rposition(|&d| d != b'0').map_or(0, |p| p + 1);
        out.push(b'.');
        out.extend_from_slice(&digits[..len]);
    }
    out.extend_from_slice(b"Z\"");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RunStatus;
    use crate::envelope::{ErrorObject, ErrorType};
    use crate::run::{AttemptError, Callback, CallbackState, ColdStart, StreamStats, Trigger};
    use serde_json::value::RawValue;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_string()).unwrap()
    }

    fn same(run: &Run) {
        let mut fast = Vec::new();
        run.write_json(&mut fast);
        let serde = serde_json::to_vec(run).unwrap();
        assert_eq!(
            String::from_utf8(fast).unwrap(),
            String::from_utf8(serde).unwrap()
        );
    }

    fn at(s: i64, ns: i32) -> Timestamp {
        Timestamp::new(s, ns).unwrap()
    }

    #[test]
    fn a_sync_calls_record_is_what_serde_writes() {
        let mut r = Run::new(
            "01M99PVMNHQ4C0T99VNTNAF8TC".into(),
            "default",
            "hello",
            Trigger::Endpoint,
            raw(r#"{"name":"x"}"#),
            at(1_796_696_036, 17_308_245),
        );
        r.status = RunStatus::Succeeded;
        r.output = Some(raw(r#"{"myField":"Hello"}"#));
        r.logs.stdout = vec!["messages to stdout show up in logs".into()];
        r.attempts = 1;
        r.started_at = Some(r.created_at);
        r.finished_at = Some(at(1_796_696_036, 17_773_239));
        r.digest = Some("sha256:65120ed92cc326038da4ec4bd55b6553e948df9d348f73d3".into());
        r.version = Some(1);
        r.trace = Some(crate::trace::Trace {
            trace_id: "01a2536dd2b11d31b19257fee9069161".into(),
            span_id: "03e1f9b52bb28882".into(),
            parent_id: None,
            sampled: true,
        });
        same(&r);
        // Nothing optional.
        let bare = Run::new(
            "a".into(),
            "n",
            "f",
            Trigger::Exec,
            raw("null"),
            Timestamp::UNIX_EPOCH,
        );
        same(&bare);
    }

    #[test]
    fn every_field_and_awkward_values_are_what_serde_writes() {
        let mut r = Run::new(
            "id \"quoted\" \\ back".into(),
            "ns\u{1}",
            "fünction",
            Trigger::Retry,
            raw(r#"[1, "two" , {"x":null}]"#),
            at(253_402_207_200, 999_999_999),
        );
        r.status = RunStatus::Dead;
        r.output = Some(raw("\"out\""));
        r.logs.stdout = vec![
            "tab\there".into(),
            "new\nline".into(),
            "".into(),
            "é✓".into(),
        ];
        r.logs.stderr = vec!["\u{7f} del is not escaped".into()];
        r.error = Some(ErrorObject {
            kind: ErrorType::FunctionError,
            message: "boom \"x\"".into(),
            stacktrace: vec!["line 1".into()],
        });
        r.attempts = 4_000_000_000;
        r.cold = true;
        r.cold_start = Some(ColdStart {
            spawn_ms: 1.5,
            total_ms: 3.25,
            ..Default::default()
        });
        r.timings.queued_ms = u64::MAX;
        r.timings.exec_ms = 10;
        r.started_at = Some(at(0, 1));
        r.finished_at = Some(at(-1, 0));
        r.digest = Some(String::new());
        r.version = Some(u32::MAX);
        r.stream = Some(StreamStats {
            chunks: 3,
            bytes: 10,
            first_byte_ms: 0.5,
            ..Default::default()
        });
        r.pinned_version = Some(0);
        r.is_async = true;
        r.trace = Some(crate::trace::Trace {
            trace_id: "t".into(),
            span_id: "s".into(),
            parent_id: Some("p".into()),
            sampled: false,
        });
        r.attempt_errors = vec![AttemptError {
            attempt: 1,
            error: ErrorObject::system("m"),
            at: at(5, 500_000_000),
        }];
        r.next_attempt_at = Some(at(-62_167_219_200, 0));
        r.redriven_at = Some(at(-62_167_219_201, 5));
        r.event = Some(serde_json::json!({"type": "t", "n": [1, 2.5, "x"]}));
        r.http_context = Some(serde_json::json!({"method": "GET"}));
        r.callback = Some(Callback {
            url: "http://x/\"".into(),
            state: CallbackState::Failed,
            attempts: 2,
            last_error: Some("no".into()),
        });
        r.replica = Some("replica-1".into());
        same(&r);
        // Fractions of every length, and whole seconds.
        for ns in [0, 1, 10, 100_000, 120_000_000, 999_999_999, 17_308_240] {
            r.created_at = at(1_796_696_036, ns);
            same(&r);
        }
    }
}
