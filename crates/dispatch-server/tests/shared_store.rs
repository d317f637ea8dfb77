//! Two servers on one PostgreSQL database (the fake backend: deploys anything; one blob
//! folder): what one changes reaches the other's in-memory copies — routes, tokens,
//! namespaces — through the store's notifications, without a request polling for it.

mod support;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use dispatch_core::auth::Role;
use dispatch_server::{AppState, Options, Stores};
use dispatch_store::{BlobStore, PgOptions, PgStore};
use serde_json::json;
use support::eventually;
use tower::ServiceExt as _;

async fn server(url: &str, blobs: &std::path::Path) -> Arc<AppState> {
    let url = url.to_string();
    let pg = tokio::task::spawn_blocking(move || PgStore::connect(&PgOptions::new(url)))
        .await
        .unwrap()
        .unwrap();
    dispatch_server::Server::builder()
        .stores(Stores::single(Arc::new(pg)))
        .blobs(BlobStore::open(blobs).unwrap())
        .backend(Arc::new(support::fake::FakeBackend::default()))
        .options(Options::default())
        .state()
        .await
        .unwrap()
}

/// The status of one request to a router (the API's or the gateway's).
async fn status(
    app: &axum::Router,
    token: &str,
    method: &str,
    uri: &str,
    body: serde_json::Value,
) -> StatusCode {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {token}"))
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    if status.is_client_error()
        && status != StatusCode::NOT_FOUND
        && status != StatusCode::UNAUTHORIZED
    {
        use http_body_util::BodyExt as _;
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        eprintln!(
            "{method} {uri}: {status} {}",
            String::from_utf8_lossy(&body)
        );
    }
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_on_one_server_reaches_the_other() {
    let pg = tokio::task::spawn_blocking(dispatch_testkit::postgres::Postgres::start)
        .await
        .unwrap();
    let url = pg.create_database("shared");
    let blobs = tempfile::tempdir().unwrap();
    let a = server(&url, blobs.path()).await;
    let b = server(&url, blobs.path()).await;
    let (api_a, api_b) = (
        dispatch_server::api::router(a.clone()),
        dispatch_server::api::router(b.clone()),
    );
    let gw_b = dispatch_server::gateway::router(b.clone());

    // A token made on one server is taken by the other.
    let (root, _) = a
        .create_token("root", Role::Admin, "*", None)
        .await
        .unwrap();
    let b_answers = |token: String| {
        let api_b = api_b.clone();
        async move {
            status(
                &api_b,
                &token,
                "GET",
                "/v1/namespaces/default/functions",
                json!(null),
            )
            .await
        }
    };
    eventually("b to take a's token", || async {
        (b_answers(root.clone()).await == StatusCode::OK).then_some(())
    })
    .await;

    // A namespace created on one is known to the other.
    assert_eq!(
        status(
            &api_a,
            &root,
            "POST",
            "/v1/namespaces",
            json!({"name": "team"})
        )
        .await,
        StatusCode::CREATED
    );
    eventually("b to know namespace team", || async {
        b.namespaces()
            .iter()
            .any(|(n, _)| n == "team")
            .then_some(())
    })
    .await;

    // A function and its endpoint made on one route on the other.
    let source = a
        .blobs
        .put(&support::archive_of(
            "h.py",
            "def handle(context, payload):\n    return payload\n",
        ))
        .unwrap();
    let function = json!({"apiVersion": "dispatch.dev/v1", "kind": "Function", "metadata": {"name": "hello"},
        "spec": {"image": "py", "source": source, "handler": "h.handle"}});
    let image = json!({"apiVersion": "dispatch.dev/v1", "kind": "Image", "metadata": {"name": "py"}, "spec": {"baseImage": "python3"}});
    assert_eq!(
        status(
            &api_a,
            &root,
            "POST",
            "/v1/namespaces/default/images",
            image
        )
        .await,
        StatusCode::CREATED
    );
    assert_eq!(
        status(
            &api_a,
            &root,
            "POST",
            "/v1/namespaces/default/functions",
            function
        )
        .await,
        StatusCode::CREATED
    );
    let endpoint = json!({"apiVersion": "dispatch.dev/v1", "kind": "Endpoint", "metadata": {"name": "hello"},
        "spec": {"function": "hello", "methods": ["POST"], "paths": ["/hello"]}});
    assert_eq!(
        status(
            &api_a,
            &root,
            "POST",
            "/v1/namespaces/default/endpoints",
            endpoint
        )
        .await,
        StatusCode::CREATED
    );
    eventually("b's gateway to route /hello", || async {
        let s = status(&gw_b, &root, "POST", "/hello", json!({})).await;
        (s != StatusCode::NOT_FOUND).then_some(())
    })
    .await;
    // Deleted on one: gone from the other's routes.
    assert_eq!(
        status(
            &api_a,
            &root,
            "DELETE",
            "/v1/namespaces/default/endpoints/hello",
            json!(null)
        )
        .await,
        StatusCode::OK
    );
    eventually("b's gateway to stop routing /hello", || async {
        let s = status(&gw_b, &root, "POST", "/hello", json!({})).await;
        (s == StatusCode::NOT_FOUND).then_some(())
    })
    .await;
    // A deleted token stops working on the other too.
    assert_eq!(
        status(&api_a, &root, "DELETE", "/v1/tokens/root", json!(null)).await,
        StatusCode::OK
    );
    eventually("b to drop a's deleted token", || async {
        (b_answers(root.clone()).await == StatusCode::UNAUTHORIZED).then_some(())
    })
    .await;
}
