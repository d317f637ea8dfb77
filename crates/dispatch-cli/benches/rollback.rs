//! Rollback (issue 23): the time from `POST …/rollback` to the first call answered by the
//! version rolled back to, and back again to the newer one. A Python function with two
//! versions on the embedded server (sandboxed); calls made back to back until the answer
//! changes, so the figure includes the controller's redeploy of a build the server has (no
//! upload, no install) and the first worker's cold start.
//!
//! `cargo bench -p dispatch-cli --bench rollback` (DISPATCH_BENCH_N round trips, default 20).

mod support;
#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod test_support;

use std::time::Instant;

use serde_json::value::RawValue;
use support::pct;
use test_support::ServerProc;

fn main() {
    let n = support::iterations(20);
    let s = ServerProc::start();
    s.ok(&["create", "image", "py", "python3", "--wait"]);
    let code = |text: &str| s.python_returning(text);
    let handler = ["--handler", "v.handle", "--wait"];
    s.ok(&[
        &["create", "function", "f", &code("one"), "--image", "py"][..],
        &handler[..],
    ]
    .concat());
    s.ok(&[&["update", "function", "f", &code("two")][..], &handler[..]].concat());
    let c = s.client();
    let rt = test_support::rt();
    let input = RawValue::from_string("null".into()).unwrap();
    let says = || -> String {
        let r = rt.block_on(c.exec("f", &input)).unwrap();
        r.envelope.payload.get().trim_matches('"').to_string()
    };
    assert_eq!(says(), "two");
    let (mut api, mut back, mut forward) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        for (to, want, times) in [(1, "one", &mut back), (2, "two", &mut forward)] {
            let t = Instant::now();
            rt.block_on(c.rollback("f", Some(to), None)).unwrap();
            api.push(t.elapsed().as_secs_f64() * 1e3);
            let mut calls = 0;
            while says() != want {
                calls += 1;
                assert!(calls < 100_000, "version {to} never answered");
            }
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    println!(
        "rollback, python, {n} round trips: the API's answer p50 {:.1} ms; first answer by the older version p50 {:.1} ms p99 {:.1} ms; forward again p50 {:.1} ms p99 {:.1} ms",
        pct(&mut api, 0.5),
        pct(&mut back, 0.5),
        pct(&mut back, 0.99),
        pct(&mut forward, 0.5),
        pct(&mut forward, 0.99),
    );
}
