//! Test support shared by the workspace's tests (a dev-dependency only): ports that no other
//! caller in the process was given, real brokers ([`brokers`]) and a real PostgreSQL
//! ([`postgres`]) started on them.

pub mod brokers;
pub mod postgres;

use std::net::TcpListener;
use std::sync::Mutex;

/// A port no other caller in this process was given (the kernel may hand a just-closed port
/// out again, and a driver would then talk to another test's broker).
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Two free ports (an API and a gateway), distinct and never given out before.
pub fn free_ports() -> (u16, u16) {
    (free_port(), free_port())
}

/// Polls `probe` (every 20 ms, ticks from a small tokio runtime of its own) until it gives a
/// value, failing with `what` after `limit`: the way tests wait for something, never a fixed
/// delay standing in for readiness. The probe runs on the caller's thread.
pub fn eventually<T>(
    what: &str,
    limit: std::time::Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> T {
    let timer = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a timer runtime");
    let mut tick = timer.block_on(async {
        let mut t = tokio::time::interval(std::time::Duration::from_millis(20));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let deadline = std::time::Instant::now() + limit;
    loop {
        timer.block_on(tick.tick());
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
    }
}
