//! W3C trace context (`traceparent`, <https://www.w3.org/TR/trace-context/>): the trace a
//! call belongs to — the client's when it sent a valid `traceparent`, else a new one — and
//! the span the server made for the call inside it. The run record keeps it, the handler
//! gets it as `context.trace`, a job as `TRACEPARENT`, a callback as its `traceparent`
//! header; an async run's attempts and retries, and an event's deliveries, stay in it.

use serde::{Deserialize, Serialize};

/// A call's place in a trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Trace {
    /// 32 lower-case hex digits.
    pub trace_id: String,
    /// The server's span for the call: 16 lower-case hex digits.
    pub span_id: String,
    /// The caller's span, when it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    /// The caller's sampling decision (`01`); a new trace is sampled.
    #[serde(default)]
    pub sampled: bool,
}

/// A valid `traceparent`'s trace id, parent span id and sampled flag; `None` for anything
/// else (a wrong length, upper case, all-zero ids, version `ff`, extra parts on version 00).
pub fn parse(traceparent: &str) -> Option<(&str, &str, bool)> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && hex(parent, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && parent.bytes().any(|b| b != b'0')
        // Version 00 has exactly four parts; later versions may add more.
        && (version != "00" || parts.next().is_none());
    let sampled = u8::from_str_radix(flags, 16).ok()? & 1 == 1;
    valid.then_some((trace, parent, sampled))
}

/// Lower-case hex of `bytes` (a table look-up a nibble: this is on every call's path).
fn hex_of(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
}

/// 64 random bits (a ULID's random part; thread-local randomness, no extra crate), never 0.
fn random_span() -> String {
    hex_of(&((ulid::Ulid::new().random() as u64).max(1)).to_be_bytes())
}

impl Trace {
    /// The server's span for a call whose client sent `traceparent` (a child of the client's
    /// span), or the root of a new trace when it sent none, or an invalid one. A new trace id
    /// is a ULID: 48 bits of time and 80 random ones, unique without coordination.
    pub fn child_of(traceparent: Option<&str>) -> Trace {
        match traceparent.and_then(parse) {
            Some((trace, parent, sampled)) => Trace {
                trace_id: trace.to_string(),
                span_id: random_span(),
                parent_id: Some(parent.to_string()),
                sampled,
            },
            None => Trace {
                trace_id: hex_of(&ulid::Ulid::new().0.to_be_bytes()),
                span_id: random_span(),
                parent_id: None,
                sampled: true,
            },
        }
    }

    /// The `traceparent` that makes the server's span the parent of what comes next.
    pub fn traceparent(&self) -> String {
        // Pushed, not format!ted: this is on every call's path.
        let mut out = String::with_capacity(55);
        out.push_str("00-");
        out.push_str(&self.trace_id);
        out.push('-');
        out.push_str(&self.span_id);
        out.push_str(if self.sampled { "-01" } else { "-00" });
        out
    }

    /// What a handler gets as `context.trace` (serialized straight into its context).
    pub fn context(&self) -> TraceContext<'_> {
        TraceContext {
            traceparent: self.traceparent(),
            trace_id: &self.trace_id,
            span_id: &self.span_id,
        }
    }
}

/// `context.trace`: the W3C trace a call is in, the server's span for it the parent of what
/// the handler makes.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TraceContext<'a> {
    pub traceparent: String,
    pub trace_id: &'a str,
    pub span_id: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_valid_traceparents_are_read() {
        let t = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(
            parse(&format!("00-{t}-00f067aa0ba902b7-01")),
            Some((t, "00f067aa0ba902b7", true))
        );
        assert_eq!(
            parse(&format!("00-{t}-00f067aa0ba902b7-00")).map(|p| p.2),
            Some(false)
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn hex_is_lower_case_two_digits_a_byte() {
        assert_eq!(hex_of(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(hex_of(&[]), "");
    }

    #[test]
    fn a_call_joins_its_clients_trace_or_starts_one() {
        let client = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = Trace::child_of(Some(client));
        assert_eq!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.parent_id.as_deref(), Some("00f067aa0ba902b7"));
        assert_ne!(t.span_id, "00f067aa0ba902b7");
        let tp = t.traceparent();
        assert_eq!(parse(&tp).map(|p| p.1), Some(t.span_id.as_str()), "{tp}");
        // A child of the server's span: same trace, the server's span as its parent.
        let c = Trace::child_of(Some(&t.traceparent()));
        assert_eq!(
            (c.trace_id.as_str(), c.parent_id.as_deref()),
            (t.trace_id.as_str(), Some(t.span_id.as_str()))
        );
        for bad in [None, Some("junk")] {
            let n = Trace::child_of(bad);
            assert!(parse(&n.traceparent()).is_some(), "{n:?}");
            assert_eq!(n.parent_id, None);
            assert_ne!(
                n.trace_id,
                Trace::child_of(bad).trace_id,
                "new traces differ"
            );
        }
    }
}
