//! Both listeners against hostile clients, with real sockets and small limits: connections
//! past a listener's cap are answered 503 at once while the other listener keeps answering;
//! headers that never finish, idle keep-alive connections and bodies that stop arriving are
//! cut by their timeouts; every refusal is counted in `/metrics`.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn limits(gateway: usize, api: usize, header: Duration) -> dispatch_server::Options {
    dispatch_server::Options {
        edge: dispatch_server::serve::EdgeLimits {
            gateway_connections: Some(gateway),
            api_connections: Some(api),
            header_timeout: header,
            body_timeout: Duration::from_millis(500),
        },
        ..no_auth()
    }
}

fn addr(url: &str) -> String {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

/// Everything the server sends until it closes the connection (fails after 20 s).
async fn read_to_close(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out))
        .await
        .expect("the server did not close the connection within 20 s")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

/// A connection that has sent the first line of a request and nothing more.
async fn half_request(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /x HTTP/1.1\r\n").await.unwrap();
    s
}

async fn metric(t: &TestServer, name: &str, listener: &str) -> u64 {
    let text = reqwest::get(format!("{}/metrics", t.api()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let key = format!("{name}{{listener=\"{listener}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .unwrap_or_else(|| panic!("no {key} in\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_on_the_gateway_never_starves_the_api() {
    // The header timeout is long: the held connections stay for the whole test.
    let t = start_with(
        tempfile::tempdir().unwrap(),
        limits(3, 8, Duration::from_secs(60)),
    )
    .await;
    let gw = addr(&t.gateway);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(half_request(&gw).await);
    }
    // The cap is taken once the server has accepted them all.
    eventually("the 3 held connections to be open", || async {
        (metric(&t, "dispatch_connections_open", "gateway").await == 3).then_some(())
    })
    .await;
    let mut extra = TcpStream::connect(&gw).await.unwrap();
    let answer = read_to_close(&mut extra).await;
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(answer.contains("retry-after: 1"), "{answer}");
    // A client that reads only once it has sent its request (hyper, under reqwest) reads the
    // 503 too: an answer before the request would be a protocol error to it.
    let refused = reqwest::get(format!("{}/hello", t.gateway)).await;
    let refused = refused.expect("a refused hyper client reads an answer, not an error");
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    // The API has its own share: it answers while the gateway is full.
    let ready = reqwest::get(format!("{}/readyz", t.api())).await.unwrap();
    assert_eq!(ready.status(), 200);
    assert!(metric(&t, "dispatch_connections_refused_total", "gateway").await >= 1);
    assert_eq!(
        metric(&t, "dispatch_connections_max", "gateway").await,
        3,
        "the cap is shown"
    );
    // Once a held connection goes, its slot serves again.
    drop(held.pop());
    let served = eventually("a slot to free up", || async {
        let mut s = TcpStream::connect(&gw).await.unwrap();
        s.write_all(b"GET /nothing-here HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = read_to_close(&mut s).await;
        (!answer.starts_with("HTTP/1.1 503 ")).then_some(answer)
    })
    .await;
    assert!(served.starts_with("HTTP/1.1 404 "), "{served}");
    drop(held);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_headers_and_idle_keep_alive_connections_are_closed() {
    let t = start_with(
        tempfile::tempdir().unwrap(),
        limits(16, 16, Duration::from_millis(300)),
    )
    .await;
    for a in [addr(&t.gateway), addr(&t.api())] {
        // Headers that never finish: closed without an answer to act on.
        let mut slow = half_request(&a).await;
        let answer = read_to_close(&mut slow).await;
        assert!(!answer.contains(" 200 "), "{answer}");
        // A keep-alive connection that is answered, then sends nothing: closed too.
        let mut idle = TcpStream::connect(&a).await.unwrap();
        idle.write_all(b"GET /readyz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let answer = read_to_close(&mut idle).await;
        assert!(answer.starts_with("HTTP/1.1 "), "answered first: {answer}");
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_arriving_gets_408() {
    let t = start_with(
        tempfile::tempdir().unwrap(),
        limits(16, 16, Duration::from_secs(60)),
    )
    .await;
    let mut s = TcpStream::connect(addr(&t.api())).await.unwrap();
    s.write_all(
        b"POST /v1/namespaces/default/events HTTP/1.1\r\nhost: x\r\n\
          content-type: application/cloudevents+json\r\ncontent-length: 100\r\n\r\n{\"id\":",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf))
        .await
        .expect("no answer within 20 s")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(answer.contains("stopped arriving"), "{answer}");
    t.stop().await;
}
