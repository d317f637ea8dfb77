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
