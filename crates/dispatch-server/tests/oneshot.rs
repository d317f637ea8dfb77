//! The API router without sockets (`oneshot`): error shapes and status codes.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use dispatch_runtime::LocalBackend;
use dispatch_server::api;
use dispatch_store::{BlobStore, SqliteStore};
use http_body_util::BodyExt;
use tower::ServiceExt;

async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    body: &str,
) -> (StatusCode, serde_json::Value) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test]
async fn errors_have_one_shape() {
    let dir = tempfile::tempdir().unwrap();
    let state = dispatch_server::Server::builder()
        .stores(dispatch_server::Stores::single(Arc::new(
            SqliteStore::in_memory().unwrap(),
        )))
        .blobs(BlobStore::open(dir.path().join("blobs")).unwrap())
        .backend(LocalBackend::new(dir.path()).unwrap())
        .options(dispatch_server::Options {
            auth: false,
            ..Default::default()
        })
        .state()
        .await
        .unwrap();
    let app = api::router(state.clone());
    let cases = [
        (
            "GET",
            "/v1/namespaces/default/widgets",
            "",
            StatusCode::NOT_FOUND,
            "NotFound",
        ),
        (
            "GET",
            "/v1/namespaces/Bad_NS/functions",
            "",
            StatusCode::BAD_REQUEST,
            "Invalid",
        ),
        (
            "POST",
            "/v1/namespaces/default/functions",
            "{oops",
            StatusCode::BAD_REQUEST,
            "InvalidJson",
        ),
        (
            "GET",
            "/v1/namespaces/default/functions/ghost",
            "",
            StatusCode::NOT_FOUND,
            "NotFound",
        ),
        (
            "POST",
            "/v1/namespaces/default/functions/ghost/runs",
            "{\"input\":1}",
            StatusCode::NOT_FOUND,
            "NotFound",
        ),
        (
            "POST",
            "/v1/namespaces/default/functions/x/runs",
            "{\"payload\":1}",
            StatusCode::BAD_REQUEST,
            "InvalidJson",
        ),
        (
            "POST",
            "/v1/namespaces/default/functions/x/source",
            "not a tarball",
            StatusCode::BAD_REQUEST,
            "BadRequest",
        ),
        (
            "DELETE",
            "/v1/namespaces/default/baseimages/nodejs",
            "",
            StatusCode::CONFLICT,
            "BuiltIn",
        ),
        (
            "GET",
            "/v1/namespaces/default/runs?status=nope",
            "",
            StatusCode::BAD_REQUEST,
            "BadRequest",
        ),
        ("GET", "/nope", "", StatusCode::NOT_FOUND, "NotFound"),
        (
            "POST",
            "/v1/namespaces/default/images",
            r#"{"apiVersion":"dispatch.dev/v1","kind":"Function","metadata":{"name":"f"},"spec":{}}"#,
            StatusCode::BAD_REQUEST,
            "BadRequest",
        ),
        (
            "POST",
            "/v1/namespaces/default/images",
            r#"{"apiVersion":"dispatch.dev/v1","kind":"Image","metadata":{"name":"i","namespace":"other"},"spec":{"baseImage":"python3"}}"#,
            StatusCode::BAD_REQUEST,
            "BadRequest",
        ),
    ];
    for (method, uri, body, status, code) in cases {
        let (s, v) = call(&app, method, uri, body).await;
        assert_eq!(s, status, "{method} {uri}: {v}");
        assert_eq!(v["error"]["code"], code, "{method} {uri}: {v}");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    }
    let (s, v) = call(&app, "GET", "/v1/namespaces/default/images", "").await;
    assert_eq!(
        (s, v),
        (StatusCode::OK, serde_json::json!([])),
        "nothing was stored"
    );
    state.stop().await;
}
