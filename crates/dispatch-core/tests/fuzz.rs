//! Fuzz targets of the core's parsers (dispatch_core::fuzz: seeded and bounded here, long with
//! `scripts/fuzz.sh MINUTES`): manifests, CloudEvents, cron schedules, job-template rendering,
//! the JSON nesting bound. Each must never panic; the invariant each keeps is said beside it.

use dispatch_core::fuzz::{Arbitrary, Unstructured, check, grammar_string};
use dispatch_core::{MAX_JSON_DEPTH, json_too_deep};
use serde_json::{Value, json};

/// Manifests (YAML multi-document or JSON): what parses validates or says why, and every
/// object that validates survives a round trip through its JSON form.
#[test]
fn fuzz_manifests() {
    const TOKENS: &[&str] = &[
        "---\n",
        "apiVersion: dispatch.dev/v1\n",
        "apiVersion: dispatcher.ivan.vc/v1alpha1\n",
        "kind: Function\n",
        "kind: Endpoint\n",
        "kind: JobTemplate\n",
        "kind: Secret\n",
        "metadata:\n",
        "  name: f\n",
        "  name: ",
        "  namespace: default\n",
        "spec:\n",
        "  image: py\n",
        "  source: sha256:",
        "  timeout: 1s\n",
        "  maxQueued: 5\n",
        "  paths: [/a/{id}]\n",
        "  methods: [GET]\n",
        "  function: f\n",
        "  data: {k: v}\n",
        "  resources: {memory: 1Gi, cpu: 500m}\n",
        "{",
        "}",
        "[",
        "]",
        ":",
        "- ",
        "&a ",
        "*a",
        "!!binary ",
        "\"",
        "'",
        "\n",
        "  ",
        "0",
        "-1",
        "1e999",
        "null",
        "~",
        "<<: ",
    ];
    check("manifests", |u| {
        let text = grammar_string(u, TOKENS)?;
        if let Ok(docs) = dispatch_core::manifest::parse_manifest(&text) {
            for d in docs {
                let mut o = d.object;
                if o.validate().is_ok() {
                    let again: dispatch_core::Object =
                        serde_json::from_value(serde_json::to_value(&o).unwrap()).unwrap();
                    assert_eq!(again, o, "round trip of {text:?}");
                }
            }
        }
        Ok(())
    });
}

/// CloudEvents as they arrive (structured JSON): parse, validate, match subscriptions.
#[test]
fn fuzz_cloudevents() {
    const TOKENS: &[&str] = &[
        "{",
        "}",
        ",",
        ":",
        "\"specversion\"",
        "\"1.0\"",
        "\"id\"",
        "\"source\"",
        "\"type\"",
        "\"data\"",
        "\"time\"",
        "\"2024-01-01T00:00:00Z\"",
        "\"order.created\"",
        "\"x\"",
        "[",
        "]",
        "null",
        "1",
        "\"datacontenttype\"",
        "\"application/json\"",
        "\"ext\"",
    ];
    check("cloudevents", |u| {
        let text = grammar_string(u, TOKENS)?;
        if let Ok(e) = serde_json::from_str::<dispatch_core::events::CloudEvent>(&text)
            && e.validate().is_ok()
        {
            for p in ["*", "order.*", "order.created", &e.kind] {
                let _ = dispatch_core::events::type_matches(p, &e.kind);
            }
            assert!(dispatch_core::events::type_matches(&e.kind, &e.kind));
        }
        Ok(())
    });
}

/// Cron schedules: what parses fires strictly later each time (never panics, never stalls).
#[test]
fn fuzz_cron_schedules() {
    const TOKENS: &[&str] = &[
        "*", "*/", "0", "5", "59", "60", "1-5", ",", " ", "L", "W", "#", "?", "MON", "JAN",
        "@hourly", "@daily", "@every ", "30s", "1ms", "0s", "@yearly", "-", "/",
    ];
    const ZONES: &[&str] = &[
        "UTC",
        "Europe/Berlin",
        "America/New_York",
        "Nowhere/Else",
        "",
    ];
    check("cron", |u| {
        let text = grammar_string(u, TOKENS)?;
        let tz = *u.choose(ZONES)?;
        if let Ok(s) = dispatch_core::events::Schedule::parse(&text, tz) {
            let mut t = jiff::Timestamp::from_second(u.int_in_range(0..=4_000_000_000)?).unwrap();
            for _ in 0..3 {
                match s.next_after(t) {
                    Some(n) => {
                        assert!(n > t, "{text:?} in {tz}: {n} after {t}");
                        t = n;
                    }
                    None => break,
                }
            }
        }
        Ok(())
    });
}

/// Job templates (Go templates) with hostile payloads: rendering answers a value or an
/// error naming the field, and a payload is never evaluated as a template.
#[test]
fn fuzz_job_template_rendering() {
    const TOKENS: &[&str] = &[
        "{{",
        "}}",
        "{{ .Payload }}",
        "{{ .Name }}",
        "{{ .Namespace }}",
        "{{ .UUID }}",
        "{{ .ShortUUID }}",
        "{{ b64enc .Payload }}",
        "{{ if .Payload }}",
        "{{ end }}",
        "{{ range . }}",
        "{{ else }}",
        "{{ printf \"%s\" .Name }}",
        "{{ .Nope }}",
        "{{-",
        "-}}",
        "|",
        "(",
        ")",
        "\"",
        "x",
        " ",
        "{{ template \"a\" }}",
        "{{ define \"a\" }}",
    ];
    check("job templates", |u| {
        let template = grammar_string(u, TOKENS)?;
        let payload = format!("{{{{ .Name }}}}{}", String::arbitrary(u)?);
        let job = json!({"spec": {"containers": [{"command": ["sh", "-c", template]}]}});
        let data = dispatch_core::jobs::RenderData {
            payload: payload.clone(),
            name: "job".into(),
            namespace: "default".into(),
            uuid: dispatch_core::jobs::new_uuid(),
            created: jiff::Timestamp::UNIX_EPOCH,
        };
        if let Ok(out) = dispatch_core::jobs::render(&job, &data)
            && template == "{{ .Payload }}"
        {
            assert_eq!(out["spec"]["containers"][0]["command"][2], payload);
        }
        Ok(())
    });
}

/// The JSON nesting bound agrees with the real depth of any JSON document.
#[test]
fn fuzz_json_depth() {
    fn nest(u: &mut Unstructured<'_>, depth: usize) -> dispatch_core::fuzz::Result<Value> {
        if depth == 0 {
            return Ok(match u.int_in_range(0..=3)? {
                0 => Value::Null,
                1 => json!(String::arbitrary(u)?),
                2 => json!(i64::arbitrary(u)?),
                _ => json!("[{\"\\\"]}"),
            });
        }
        let inner = nest(u, depth - 1)?;
        Ok(if bool::arbitrary(u)? {
            json!([inner, "]]}}"])
        } else {
            json!({ String::arbitrary(u)?: inner })
        })
    }
    check("json depth", |u| {
        let scalar_depth = u.int_in_range(0..=MAX_JSON_DEPTH + 5)?;
        let v = nest(u, scalar_depth)?;
        let text = serde_json::to_string(&v).unwrap();
        assert_eq!(
            json_too_deep(text.as_bytes(), MAX_JSON_DEPTH),
            scalar_depth > MAX_JSON_DEPTH,
            "{text}"
        );
        Ok(())
    });
}
