//! Cold starts of the container tier (DESIGN §9): a Python function with
//! `spec.isolation: container` on its base image (this host's Python, pushed to a local CNCF
//! registry), called after each scale to zero; the caller's time and the server's record of the
//! start (`coldStart.totalMs`). The image is pulled and unpacked once, before the samples.
//!
//! `cargo bench -p dispatch-cli --bench containers` (DISPATCH_BENCH_N samples, default 20;
//! needs runc and docker-registry, as the tests). Target: p50 ≤ 300 ms with the image
//! unpacked (Knative: 2-4 s).

mod support;
#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod test_support;

use std::time::Instant;

use serde_json::value::RawValue;
use support::pct;
use test_support::{ImageRegistry, ServerProc, eventually};

fn main() {
    let n = support::iterations(20);
    let hub = ImageRegistry::start();
    let base = hub.push_python();
    let s = ServerProc::start_with(
        tempfile::tempdir().unwrap(),
        &[
            &format!("--insecure-registry={}", hub.host),
            &std::env::var("DISPATCH_BENCH_OCI_RUNTIME")
                .map(|r| format!("--oci-runtime={r}"))
                .unwrap_or_else(|_| "--oci-runtime=runc".into()),
        ],
    );
    s.ok(&["create", "base-image", "py", &base, "--language", "python3"]);
    s.ok(&["create", "image", "py", "py", "--wait"]);
    let code = s.dir.path().join("hello.py");
    std::fs::write(
        &code,
        "def handle(context, payload):\n    return {'hello': payload}\n",
    )
    .unwrap();
    s.ok(&[
        "create",
        "function",
        "--image",
        "py",
        "hello",
        code.to_str().unwrap(),
        "--isolation",
        "container",
        "--idle-timeout",
        "1s",
        "--wait",
    ]);
    let c = s.client();
    let rt = test_support::rt();
    let input = RawValue::from_string(r#"{"name":"cold"}"#.into()).unwrap();
    let (mut e2e, mut total, mut spawn, mut import) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        // Scaled to zero: no container left of the function.
        eventually("the function to scale to zero", || {
            s.containers().is_empty().then_some(())
        });
        let t = Instant::now();
        let r = rt.block_on(c.exec("hello", &input)).unwrap();
        e2e.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(
            r.envelope.context.error.is_none(),
            "{:?}",
            r.envelope.context.error
        );
        let run = rt.block_on(c.get_run(&r.run_id.unwrap())).unwrap();
        let cold = run.cold_start.expect("a call after scale to zero is cold");
        total.push(cold.total_ms);
        spawn.push(cold.spawn_ms);
        import.push(cold.import_ms);
    }
    // Warm, for comparison: the same function with its worker kept.
    let mut warm = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        rt.block_on(c.exec("hello", &input)).unwrap();
        warm.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "container tier, python, {n} cold starts after scale to zero: caller p50 {:.1} ms p99 {:.1} ms; server total p50 {:.1} ms p99 {:.1} ms (start {:.1} + import {:.1} p50); warm call p50 {:.2} ms (target cold p50 <= 300 ms)",
        pct(&mut e2e, 0.5),
        pct(&mut e2e, 0.99),
        pct(&mut total, 0.5),
        pct(&mut total, 0.99),
        pct(&mut spawn, 0.5),
        pct(&mut import, 0.5),
        pct(&mut warm, 0.5),
    );
}
