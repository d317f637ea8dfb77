//! Streamed calls (issue 22): where a handler's chunks go as it yields them ([`Sink`]), and,
//! for a WebSocket session, the messages that go to it while it runs ([`Inbound`]).

use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

/// One chunk a handler yielded: text (a `str`, or JSON of anything else) or bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub data: Bytes,
    pub binary: bool,
}

/// One message of a WebSocket session, to its handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    Text(String),
    Binary(Bytes),
}

/// Where a streamed call's chunks go as the handler yields them: a bounded channel (a slow
/// reader slows the handler), made when the first chunk comes — most calls stream nothing,
/// and a channel costs an aligned allocation — and handed to whoever waits on
/// [`Sink::new`]'s receiver. A session's sink also carries the messages for the handler.
pub struct Sink {
    capacity: usize,
    opener: Mutex<Option<oneshot::Sender<mpsc::Receiver<Chunk>>>>,
    tx: std::sync::OnceLock<mpsc::Sender<Chunk>>,
    /// A session: the messages for the handler, taken by the call that runs it.
    inbox: Mutex<Option<mpsc::Receiver<Inbound>>>,
    /// The longest silence between two chunks (`spec.idleTimeout`), when bounded.
    idle: std::sync::OnceLock<Duration>,
}

/// The receiving end of a [`Sink`]: the chunks' channel once the first chunk comes; closed
/// (an error) when the call ended without streaming.
pub type Opened = oneshot::Receiver<mpsc::Receiver<Chunk>>;

impl Sink {
    /// A sink holding at most `capacity` chunks its reader has not taken.
    pub fn new(capacity: usize) -> (Sink, Opened) {
        let (open, opened) = oneshot::channel();
        (
            Sink {
                capacity: capacity.max(1),
                opener: Mutex::new(Some(open)),
                tx: std::sync::OnceLock::new(),
                inbox: Mutex::new(None),
                idle: std::sync::OnceLock::new(),
            },
            opened,
        )
    }

    /// The call is a session: its handler reads `inbox` as a stream of messages, which
    /// ends when the sender is dropped.
    pub fn with_inbox(self, inbox: mpsc::Receiver<Inbound>) -> Sink {
        *self.inbox.lock() = Some(inbox);
        self
    }

    /// A handler that sends nothing for `idle` between two chunks fails with a timeout
    /// (set once, by whoever knows the function).
    pub fn set_idle_timeout(&self, idle: Option<Duration>) {
        if let Some(d) = idle {
            let _ = self.idle.set(d);
        }
    }

    pub(crate) fn idle(&self) -> Option<Duration> {
        self.idle.get().copied()
    }

    pub(crate) fn has_inbox(&self) -> bool {
        self.inbox.lock().is_some()
    }

    pub(crate) fn take_inbox(&self) -> Option<mpsc::Receiver<Inbound>> {
        self.inbox.lock().take()
    }

    /// Sends one chunk, waiting while the reader is `capacity` chunks behind; `Err` when the
    /// reader went away.
    pub async fn send(&self, chunk: Chunk) -> Result<(), ()> {
        let tx = match self.tx.get() {
            Some(tx) => tx,
            None => {
                let (tx, rx) = mpsc::channel(self.capacity);
                let open = self.opener.lock().take().ok_or(())?;
                open.send(rx).map_err(|_| ())?;
                self.tx.get_or_init(|| tx)
            }
        };
        tx.send(chunk).await.map_err(|_| ())
    }
}

/// Whether a frame may be a chunk: `{"id":N,"chunk":…` (the bootstraps write it so; a key
/// inside a string would be escaped). A false positive is parsed and treated as the answer.
pub(crate) fn has_chunk(frame: &[u8]) -> bool {
    let head = &frame[..frame.len().min(48)];
    head.windows(8).any(|w| w == b"\"chunk\":")
}

/// The frame that hands a session's handler one message (or, `None`, its end).
pub(crate) fn message_frame(id: u64, message: Option<Inbound>) -> Vec<u8> {
    use base64::Engine as _;
    let v = match message {
        Some(Inbound::Text(t)) => serde_json::json!({"id": id, "message": t}),
        Some(Inbound::Binary(b)) => serde_json::json!({
            "id": id,
            "message": base64::engine::general_purpose::STANDARD.encode(&b),
            "binary": true,
        }),
        None => serde_json::json!({"id": id, "end": true}),
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_sink_opens_on_its_first_chunk_only() {
        let (sink, mut opened) = Sink::new(2);
        assert!(opened.try_recv().is_err(), "nothing streamed yet");
        let c = Chunk {
            data: Bytes::from("a"),
            binary: false,
        };
        sink.send(c.clone()).await.unwrap();
        let mut rx = opened.try_recv().unwrap();
        assert_eq!(rx.recv().await.unwrap(), c);
        drop(rx);
        assert!(sink.send(c).await.is_err(), "the reader went away");
    }

    #[test]
    fn message_frames_say_text_binary_or_end() {
        let f = |m| String::from_utf8(message_frame(3, m)).unwrap();
        assert_eq!(
            f(Some(Inbound::Text("hi".into()))),
            r#"{"id":3,"message":"hi"}"#
        );
        assert_eq!(
            f(Some(Inbound::Binary(Bytes::from_static(b"\x00\x01")))),
            r#"{"binary":true,"id":3,"message":"AAE="}"#
        );
        assert_eq!(f(None), r#"{"end":true,"id":3}"#);
    }
}
