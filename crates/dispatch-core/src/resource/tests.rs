use std::time::Duration;

use super::*;

#[test]
fn history_policies_keep_what_they_say() {
    let spec = |v: serde_json::Value| -> FunctionSpec {
        let mut base =
            serde_json::json!({"image": "py", "source": format!("sha256:{}", "0".repeat(64))});
        base.as_object_mut()
            .unwrap()
            .extend(v.as_object().unwrap().clone());
        serde_json::from_value(base).unwrap()
    };
    let ids: Vec<String> = (0..20_000).map(|_| crate::run::new_run_id()).collect();
    let kept = |s: &FunctionSpec, failed: bool| {
        let p = s.history_policy();
        ids.iter().filter(|id| p.records(failed, id)).count()
    };
    let all = spec(serde_json::json!({}));
    assert_eq!((kept(&all, false), kept(&all, true)), (20_000, 20_000));
    let errors = spec(serde_json::json!({"history": "errors"}));
    assert_eq!((kept(&errors, false), kept(&errors, true)), (0, 20_000));
    let none = spec(serde_json::json!({"history": "none"}));
    assert_eq!((kept(&none, false), kept(&none, true)), (0, 0));
    let tenth = spec(serde_json::json!({"history": "sample", "historySampleRate": 0.1}));
    let n = kept(&tenth, false);
    assert!((1_600..2_400).contains(&n), "about a tenth of 20000: {n}");
    assert_eq!(kept(&tenth, true), 20_000, "failures are always kept");
    let default_rate = spec(serde_json::json!({"history": "sample"}));
    assert!(kept(&default_rate, false) < 400);
    // The same id decides the same way every time (a retry of a read sees the same).
    let p = tenth.history_policy();
    assert!(
        ids.iter()
            .all(|id| p.records(false, id) == p.records(false, id))
    );
    // Bad specs say what is wrong.
    for (bad, says) in [
        (
            serde_json::json!({"historySampleRate": 0.5}),
            "history: sample",
        ),
        (
            serde_json::json!({"history": "sample", "historySampleRate": 0}),
            "above 0",
        ),
        (
            serde_json::json!({"history": "sample", "historySampleRate": 2}),
            "at most 1",
        ),
    ] {
        let e = spec(bad).normalize().unwrap_err();
        assert!(e.message.contains(says), "{}", e.message);
    }
    assert!(
        serde_json::from_value::<FunctionSpec>(
            serde_json::json!({"image": "py", "history": "some"})
        )
        .is_err()
    );
}

#[test]
fn retry_delays_double_cap_and_jitter() {
    let r = Retry {
        max_attempts: 5,
        initial: Duration::from_secs(1),
        max: Duration::from_secs(4),
        max_age: DEFAULT_MAX_AGE,
    };
    assert_eq!(r.delay(2, 0.0), Duration::from_millis(500));
    assert_eq!(r.delay(2, 0.999), Duration::from_micros(999_500));
    assert_eq!(r.delay(3, 0.0), Duration::from_secs(1));
    assert_eq!(
        r.delay(5, 0.0),
        Duration::from_secs(2),
        "capped at max, then halved"
    );
    assert_eq!(r.delay(60, 1.0), Duration::from_secs(4));
    let bad = RetryPolicy {
        max_attempts: Some(0),
        ..Default::default()
    };
    assert!(bad.resolve().unwrap_err().message.contains("maxAttempts"));
    let inverted = RetryPolicy {
        backoff: Some(Backoff {
            initial: Some("10s".into()),
            max: Some("1s".into()),
        }),
        ..Default::default()
    };
    assert!(inverted.resolve().is_err());
}

#[test]
fn dependency_manifests_normalize() {
    let deps = |m: &str| RuntimeDependencies {
        manifest: m.into(),
        index_url: None,
    };
    let a = deps("# deps\nsix==1.16.0  # small\n\n  requests>=2\n")
        .normalized(Language::Python3)
        .unwrap();
    assert_eq!(a.as_deref(), Some("six==1.16.0\nrequests>=2\n"));
    assert_eq!(
        deps(" \n# only comments\n")
            .normalized(Language::Python3)
            .unwrap(),
        None
    );
    let j1 = deps(r#"{"name":"x","dependencies":{"is-number":"7.0.0"}}"#)
        .normalized(Language::Nodejs)
        .unwrap();
    let j2 = deps("{\n  \"dependencies\": {\"is-number\": \"7.0.0\"},\n  \"name\": \"x\"\n}")
        .normalized(Language::Nodejs)
        .unwrap();
    assert_eq!(j1, j2);
    assert!(
        deps("six")
            .normalized(Language::Nodejs)
            .unwrap_err()
            .message
            .contains("package.json")
    );
    assert!(
        deps("{}")
            .normalized(Language::Python3)
            .unwrap_err()
            .message
            .contains("requirements.txt")
    );
    assert!(deps("six").normalized(Language::Exec).is_err());
}
use serde_json::json;

#[test]
fn kinds_parse_from_every_spelling() {
    for s in ["base-image", "base-images", "BaseImage", "baseimages"] {
        assert_eq!(Kind::parse(s), Some(Kind::BaseImage), "{s}");
    }
    assert_eq!(Kind::parse("functions"), Some(Kind::Function));
    assert_eq!(Kind::parse("Endpoint"), Some(Kind::Endpoint));
    assert_eq!(Kind::parse("gadget"), None);
    assert_eq!(Kind::parse("apis"), Some(Kind::Endpoint), "Dispatch's word");
}

#[test]
fn base_image_language_is_inferred_or_required() {
    let mut o = Object::new(
        Kind::BaseImage,
        "default",
        "py",
        json!({"image": "dispatchframework/python3-base:0.0.13-knative"}),
    );
    o.validate().unwrap();
    assert_eq!(o.spec["language"], "python3");
    let mut o = Object::new(
        Kind::BaseImage,
        "default",
        "x",
        json!({"image": "alpine:3"}),
    );
    let err = o.validate().unwrap_err();
    assert!(err.message.contains("--language"), "{err}");
}

#[test]
fn unknown_spec_fields_are_rejected_with_the_resource_name() {
    let mut o = Object::new(
        Kind::Function,
        "default",
        "hello",
        json!({"image": "python3", "source": crate::digest::sha256(b"x"), "retyr": 1}),
    );
    let err = o.validate().unwrap_err();
    assert!(err.message.contains("function \"hello\""), "{err}");
    assert!(err.message.contains("retyr"), "{err}");
}

#[test]
fn function_limits_are_checked() {
    let src = crate::digest::sha256(b"x");
    let mut o = Object::new(
        Kind::Function,
        "default",
        "f",
        json!({"image": "python3", "source": src, "concurrency": {"minWorkers": 5, "maxWorkers": 2}}),
    );
    assert!(o.validate().unwrap_err().message.contains("minWorkers"));
    let mut o = Object::new(
        Kind::Function,
        "default",
        "f",
        json!({"image": "python3", "source": src, "timeout": "soon"}),
    );
    assert!(o.validate().unwrap_err().message.contains("spec.timeout"));
    let mut o = Object::new(
        Kind::Function,
        "default",
        "f",
        json!({"image": "python3", "source": src, "env": {"1BAD": "x"}}),
    );
    assert!(o.validate().unwrap_err().message.contains("1BAD"));
}

#[test]
fn endpoints_normalize_methods_and_check_paths() {
    let mut o = Object::new(
        Kind::Endpoint,
        "default",
        "e",
        json!({"function": "hello", "methods": ["post", "get"], "paths": ["/hello", "/u/{id}", "/api/*"]}),
    );
    o.validate().unwrap();
    assert_eq!(o.spec["methods"], json!(["GET", "POST"]));
    for bad in ["hello", "/a/*/b", "/u/{}", "/u/{id"] {
        let mut o = Object::new(
            Kind::Endpoint,
            "default",
            "e",
            json!({"function": "hello", "paths": [bad]}),
        );
        assert!(o.validate().is_err(), "{bad}");
    }
    let mut o = Object::new(
        Kind::Endpoint,
        "default",
        "e",
        json!({"function": "hello", "methods": ["FETCH"], "paths": ["/x"]}),
    );
    assert!(o.validate().unwrap_err().message.contains("FETCH"));
}

#[test]
fn objects_round_trip_in_kubernetes_shape() {
    let o = Object::new(
        Kind::Image,
        "default",
        "python3",
        json!({"baseImage": "python3"}),
    );
    let v = serde_json::to_value(&o).unwrap();
    assert_eq!(v["apiVersion"], API_VERSION);
    assert_eq!(v["kind"], "Image");
    assert_eq!(v["metadata"]["name"], "python3");
    let back: Object = serde_json::from_value(v).unwrap();
    assert_eq!(back, o);
}
