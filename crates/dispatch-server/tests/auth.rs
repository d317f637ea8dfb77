//! Tokens, roles and namespaces on the API (table-driven), token expiry with paused time,
//! endpoints with `auth: token` on the gateway, the audit log.

mod support;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use dispatch_core::Kind;
use dispatch_core::auth::Role;
use dispatch_runtime::LocalBackend;
use dispatch_server::{Options, api};
use dispatch_store::{BlobStore, SqliteStore};
use http_body_util::BodyExt;
use serde_json::json;
use support::*;
use tower::ServiceExt;

async fn call(
    app: &axum::Router,
    token: Option<&str>,
    method: &str,
    uri: &str,
    body: serde_json::Value,
) -> StatusCode {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = app
        .clone()
        .oneshot(req.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    status
}

fn image(ns: &str, name: &str) -> serde_json::Value {
    json!({"apiVersion": "dispatch.dev/v1", "kind": "Image", "metadata": {"name": name, "namespace": ns}, "spec": {"baseImage": "python3"}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_verbs_and_namespaces() {
    let dir = tempfile::tempdir().unwrap();
    let state = state_in(dir.path()).await;
    let app = api::router(state.clone());
    for ns in ["a", "b"] {
        assert!(state.create_namespace(ns).await.unwrap());
    }
    let mut tokens = std::collections::HashMap::new();
    for (name, role, ns) in [
        ("root", Role::Admin, "*"),
        ("a-admin", Role::Admin, "a"),
        ("a-dev", Role::Developer, "a"),
        ("a-view", Role::Viewer, "a"),
        ("b-dev", Role::Developer, "b"),
        ("scraper", Role::Viewer, "*"),
    ] {
        let (t, _) = state.create_token(name, role, ns, None).await.unwrap();
        tokens.insert(name, t);
    }
    let t = |n: &str| Some(tokens[n].clone());
    // (token, method, uri, body, expected)
    let cases: Vec<(Option<String>, &str, String, serde_json::Value, StatusCode)> = vec![
        (None, "GET", "/healthz".into(), json!(null), StatusCode::OK),
        // /metrics names every namespace's functions: a token for all namespaces (a viewer
        // is enough), not one tenant's, even its admin's.
        (
            None,
            "GET",
            "/metrics".into(),
            json!(null),
            StatusCode::UNAUTHORIZED,
        ),
        (
            t("a-admin"),
            "GET",
            "/metrics".into(),
            json!(null),
            StatusCode::FORBIDDEN,
        ),
        (
            t("a-view"),
            "GET",
            "/metrics".into(),
            json!(null),
            StatusCode::FORBIDDEN,
        ),
        (
            t("scraper"),
            "GET",
            "/metrics".into(),
            json!(null),
            StatusCode::OK,
        ),
        (
            t("root"),
            "GET",
            "/metrics".into(),
            json!(null),
            StatusCode::OK,
        ),
        (
            None,
            "GET",
            "/v1/version".into(),
            json!(null),
            StatusCode::OK,
        ),
        (
            None,
            "GET",
            "/v1/namespaces/a/images".into(),
            json!(null),
            StatusCode::UNAUTHORIZED,
        ),
        (
            Some("dsp_not-a-token".into()),
            "GET",
            "/v1/namespaces/a/images".into(),
            json!(null),
            StatusCode::UNAUTHORIZED,
        ),
        // viewer: reads only
        (
            t("a-view"),
            "GET",
            "/v1/namespaces/a/images".into(),
            json!(null),
            StatusCode::OK,
        ),
        (
            t("a-view"),
            "POST",
            "/v1/namespaces/a/images".into(),
            image("a", "v"),
            StatusCode::FORBIDDEN,
        ),
        (
            t("a-view"),
            "GET",
            "/v1/namespaces/a/runs".into(),
            json!(null),
            StatusCode::OK,
        ),
        // A function's versions: viewers read them (404: no such function), rolling back is
        // a developer's change, and another namespace's token learns nothing.
        (
            t("a-view"),
            "GET",
            "/v1/namespaces/a/functions/nope/versions".into(),
            json!(null),
            StatusCode::NOT_FOUND,
        ),
        (
            t("a-view"),
            "POST",
            "/v1/namespaces/a/functions/nope/rollback".into(),
            json!({}),
            StatusCode::FORBIDDEN,
        ),
        (
            t("a-dev"),
            "POST",
            "/v1/namespaces/a/functions/nope/rollback".into(),
            json!({"to": 1}),
            StatusCode::NOT_FOUND,
        ),
        (
            t("b-dev"),
            "GET",
            "/v1/namespaces/a/functions/nope/versions".into(),
            json!(null),
            StatusCode::NOT_FOUND,
        ),
        (
            t("a-dev"),
            "POST",
            "/v1/namespaces/a/functions/nope/rollback".into(),
            json!({"to": "one"}),
            StatusCode::BAD_REQUEST,
        ),
        // developer: creates, updates, deletes, execs in its namespace
        (
            t("a-dev"),
            "POST",
            "/v1/namespaces/a/images".into(),
            image("a", "img"),
            StatusCode::CREATED,
        ),
        (
            t("a-dev"),
            "DELETE",
            "/v1/namespaces/a/images/img".into(),
            json!(null),
            StatusCode::OK,
        ),
        (
            t("a-dev"),
            "POST",
            "/v1/tokens".into(),
            json!({"name": "x", "role": "viewer", "namespace": "a"}),
            StatusCode::FORBIDDEN,
        ),
        (
            t("a-dev"),
            "POST",
            "/v1/gc".into(),
            json!(null),
            StatusCode::FORBIDDEN,
        ),
        (
            t("a-dev"),
            "GET",
            "/v1/audit".into(),
            json!(null),
            StatusCode::FORBIDDEN,
        ),
        // another namespace is invisible: 404, not 403
        (
            t("a-dev"),
            "GET",
            "/v1/namespaces/b/images".into(),
            json!(null),
            StatusCode::NOT_FOUND,
        ),
        (
            t("a-admin"),
            "POST",
            "/v1/namespaces/b/images".into(),
            image("b", "img"),
            StatusCode::NOT_FOUND,
        ),
        (
            t("b-dev"),
            "POST",
            "/v1/namespaces/b/images".into(),
            image("b", "img"),
            StatusCode::CREATED,
        ),
        (
            t("a-view"),
            "PUT",
            "/execute/b/job".into(),
            json!(null),
            StatusCode::NOT_FOUND,
        ),
        (
            t("a-view"),
            "PUT",
            "/execute/a/job".into(),
            json!(null),
            StatusCode::FORBIDDEN,
        ),
        (
            t("a-dev"),
            "PUT",
            "/execute/a/job".into(),
            json!(null),
            StatusCode::NOT_FOUND,
        ), // allowed; no such template
        // admin: tokens, gc, audit (a namespace admin cannot make cluster-wide tokens)
        (
            t("root"),
            "POST",
            "/v1/tokens".into(),
            json!({"name": "new", "role": "viewer", "namespace": "a"}),
            StatusCode::CREATED,
        ),
        (
            t("root"),
            "POST",
            "/v1/tokens".into(),
            json!({"name": "new", "role": "viewer", "namespace": "a"}),
            StatusCode::CONFLICT,
        ),
        (
            t("root"),
            "POST",
            "/v1/tokens".into(),
            json!({"name": "bad", "role": "king", "namespace": "a"}),
            StatusCode::BAD_REQUEST,
        ),
        (
            t("a-admin"),
            "POST",
            "/v1/tokens".into(),
            json!({"name": "y", "role": "admin", "namespace": "*"}),
            StatusCode::FORBIDDEN,
        ),
        (
            t("root"),
            "GET",
            "/v1/tokens".into(),
            json!(null),
            StatusCode::OK,
        ),
        (
            t("root"),
            "POST",
            "/v1/gc".into(),
            json!(null),
            StatusCode::OK,
        ),
        (
            t("root"),
            "DELETE",
            "/v1/tokens/new".into(),
            json!(null),
            StatusCode::OK,
        ),
        (
            t("root"),
            "GET",
            "/v1/whoami".into(),
            json!(null),
            StatusCode::OK,
        ),
        // namespaces: created by cluster admins, deleted by their admins, invisible to others
        (
            t("a-admin"),
            "POST",
            "/v1/namespaces".into(),
            json!({"name": "c"}),
            StatusCode::FORBIDDEN,
        ),
        (
            t("root"),
            "POST",
            "/v1/namespaces".into(),
            json!({"name": "c"}),
            StatusCode::CREATED,
        ),
        (
            t("root"),
            "POST",
            "/v1/namespaces".into(),
            json!({"name": "c"}),
            StatusCode::CONFLICT,
        ),
        (
            t("a-dev"),
            "GET",
            "/v1/namespaces/c".into(),
            json!(null),
            StatusCode::NOT_FOUND,
        ),
        (
            t("a-dev"),
            "DELETE",
            "/v1/namespaces/a".into(),
            json!(null),
            StatusCode::FORBIDDEN,
        ),
        // A namespace's budget protects the server: its own admin cannot raise it.
        (
            t("a-admin"),
            "PATCH",
            "/v1/namespaces/a".into(),
            json!({"spec": {"runHistoryBudget": "100Gi"}}),
            StatusCode::FORBIDDEN,
        ),
        (
            t("root"),
            "PATCH",
            "/v1/namespaces/a".into(),
            json!({"spec": {"runHistoryBudget": "8Mi"}}),
            StatusCode::OK,
        ),
        (
            t("root"),
            "POST",
            "/v1/namespaces/zz/images".into(),
            image("zz", "img"),
            StatusCode::NOT_FOUND,
        ),
        (
            t("root"),
            "DELETE",
            "/v1/namespaces/c".into(),
            json!(null),
            StatusCode::OK,
        ),
    ];
    for (i, (tok, method, uri, body, expected)) in cases.into_iter().enumerate() {
        let got = call(&app, tok.as_deref(), method, &uri, body).await;
        assert_eq!(got, expected, "case {i}: {method} {uri}");
    }
    // A deleted token stops working at once.
    state
        .create_token("temp", Role::Viewer, "a", None)
        .await
        .unwrap();
    let (temp, _) = state
        .create_token("temp2", Role::Viewer, "a", None)
        .await
        .unwrap();
    assert_eq!(
        call(
            &app,
            Some(&temp),
            "GET",
            "/v1/namespaces/a/images",
            json!(null)
        )
        .await,
        StatusCode::OK
    );
    assert_eq!(
        call(
            &app,
            t("root").as_deref(),
            "DELETE",
            "/v1/tokens/temp2",
            json!(null)
        )
        .await,
        StatusCode::OK
    );
    assert_eq!(
        call(
            &app,
            Some(&temp),
            "GET",
            "/v1/namespaces/a/images",
            json!(null)
        )
        .await,
        StatusCode::UNAUTHORIZED
    );

    // The audit log has the mutations, with who made them.
    // Audit writes are off the request path: poll until they are in.
    let entries = eventually("the audit entries", || async {
        let resp = app
            .clone()
            .oneshot(
                Request::get("/v1/audit")
                    .header("authorization", format!("Bearer {}", tokens["root"]))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let entries: Vec<serde_json::Value> =
            serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        let done = entries.iter().any(|e| {
            e["who"] == "a-dev"
                && e["method"] == "POST"
                && e["path"] == "/v1/namespaces/a/images"
                && e["status"] == 201
        }) && entries
            .iter()
            .any(|e| e["who"] == "a-view" && e["status"] == 403)
            && entries
                .iter()
                .any(|e| e["path"] == "/v1/tokens/temp2" && e["status"] == 200);
        done.then_some(entries)
    })
    .await;
    assert!(entries.iter().all(|e| e["method"] != "GET"));
    state.stop().await;
}

#[tokio::test(start_paused = true)]
async fn tokens_expire() {
    let dir = tempfile::tempdir().unwrap();
    let state = state_in(dir.path()).await;
    let app = api::router(state.clone());
    let (t, rec) = state
        .create_token("short", Role::Viewer, "a", Some(Duration::from_secs(3600)))
        .await
        .unwrap();
    assert!(rec.expires_at.is_some());
    assert_eq!(
        call(
            &app,
            Some(&t),
            "GET",
            "/v1/namespaces/a/images",
            json!(null)
        )
        .await,
        StatusCode::OK
    );
    tokio::time::advance(Duration::from_secs(3599)).await;
    assert_eq!(
        call(
            &app,
            Some(&t),
            "GET",
            "/v1/namespaces/a/images",
            json!(null)
        )
        .await,
        StatusCode::OK
    );
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(
        call(
            &app,
            Some(&t),
            "GET",
            "/v1/namespaces/a/images",
            json!(null)
        )
        .await,
        StatusCode::UNAUTHORIZED
    );
    state.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_with_token_auth() {
    let dir = tempfile::tempdir().unwrap();
    let t = start_with(dir, Options::default()).await;
    let state = t.server.as_ref().unwrap().state.clone();
    let (admin, _) = state
        .create_token("root", Role::Admin, "*", None)
        .await
        .unwrap();
    let c = dispatch_client::Client::new(&dispatch_client::Target {
        server: t.api(),
        token: Some(admin),
        namespace: "default".into(),
        insecure: false,
    })
    .unwrap();
    images(&c).await;
    create_function(&c, "hello", "py", "hello.py", HELLO_PY, json!({}))
        .await
        .unwrap();
    settled(&c, Kind::Function, "hello").await;
    c.create(&object(
        Kind::Endpoint,
        "open",
        json!({"function": "hello", "paths": ["/open"]}),
    ))
    .await
    .unwrap();
    c.create(&object(
        Kind::Endpoint,
        "closed",
        json!({"function": "hello", "paths": ["/closed"], "auth": "token"}),
    ))
    .await
    .unwrap();
    let (dev, _) = state
        .create_token("dev", Role::Developer, "default", None)
        .await
        .unwrap();
    let (other, _) = state
        .create_token("other", Role::Developer, "elsewhere", None)
        .await
        .unwrap();
    let (viewer, _) = state
        .create_token("viewer", Role::Viewer, "default", None)
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let get = |path: &str, tok: Option<&str>| {
        let mut rb = http.get(format!("{}{path}", t.gateway));
        if let Some(tk) = tok {
            rb = rb.bearer_auth(tk);
        }
        rb.send()
    };
    assert_eq!(get("/open", None).await.unwrap().status(), 200);
    assert_eq!(
        get("/open", Some("an-app-token-not-ours"))
            .await
            .unwrap()
            .status(),
        200,
        "public endpoints ignore Authorization"
    );
    assert_eq!(get("/closed", None).await.unwrap().status(), 401);
    assert_eq!(get("/closed", Some(&dev)).await.unwrap().status(), 200);
    assert_eq!(get("/closed", Some(&viewer)).await.unwrap().status(), 403);
    assert_eq!(get("/closed", Some(&other)).await.unwrap().status(), 404);
    let bad = c
        .create(&object(
            Kind::Endpoint,
            "x",
            json!({"function": "hello", "paths": ["/x"], "auth": "maybe"}),
        ))
        .await
        .unwrap_err();
    assert_eq!(bad.status().unwrap().as_u16(), 400);
    t.stop().await;
}

/// A server's state on an in-memory store and local workers in `dir`, not listening.
async fn state_in(dir: &std::path::Path) -> Arc<dispatch_server::AppState> {
    dispatch_server::Server::builder()
        .stores(dispatch_server::Stores::single(Arc::new(
            SqliteStore::in_memory().unwrap(),
        )))
        .blobs(BlobStore::open(dir.join("blobs")).unwrap())
        .backend(LocalBackend::new(dir).unwrap())
        .options(Options::default())
        .state()
        .await
        .unwrap()
}
