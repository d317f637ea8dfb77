//! Fuzz target of the gateway's payload mapping (dispatch_core::fuzz: seeded and bounded here,
//! long with `scripts/fuzz.sh MINUTES`): any method, query, content type and body from an
//! anonymous caller becomes a JSON payload within the nesting bound, or a 400.

use axum::http::{HeaderMap, HeaderValue, Method, header};
use dispatch_core::fuzz::{Arbitrary, check, grammar_string};
use dispatch_server::gateway::payload_of;

#[test]
fn fuzz_gateway_payload_mapping() {
    const BODY: &[&str] = &[
        "{",
        "}",
        "[",
        "]",
        "\"",
        "\\",
        ":",
        ",",
        "1",
        "-0",
        "1e400",
        "null",
        "true",
        "a=b",
        "&",
        "%",
        "%zz",
        "+",
        "=",
        "\u{0}",
        "\u{FEFF}",
        " ",
        "\n",
        "\"\\u0000\"",
        "\"\\ud800\"",
    ];
    const TYPES: &[&str] = &[
        "",
        "application/json",
        "application/cloudevents+json",
        "APPLICATION/JSON; charset=x",
        "application/x-www-form-urlencoded",
        "text/plain",
        "application/octet-stream",
        "+json",
    ];
    const METHODS: &[Method] = &[
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::HEAD,
    ];
    check("gateway payloads", |u| {
        let method = u.choose(METHODS)?.clone();
        let query = u
            .ratio(1, 2)?
            .then(|| grammar_string(u, BODY))
            .transpose()?;
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(u.choose(TYPES)?) {
            headers.insert(header::CONTENT_TYPE, v);
        }
        let body = if u.ratio(1, 3)? {
            Vec::arbitrary(u)?
        } else {
            grammar_string(u, BODY)?.into_bytes()
        };
        if let Ok(p) = payload_of(&method, query.as_deref(), &headers, &body) {
            let v: serde_json::Value = serde_json::from_str(p.get()).expect("valid JSON");
            let text = v.to_string();
            assert!(
                !dispatch_core::json_too_deep(text.as_bytes(), dispatch_core::MAX_JSON_DEPTH),
                "{text}"
            );
        }
        Ok(())
    });
}
