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

/// One line a handler printed, sent as it was printed (a call that asked for live logs).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LogLine {
    /// `stdout` or `stderr`.
    pub stream: &'static str,
    pub line: String,
}

/// Where a call's live log lines go.
pub type LogListener = std::sync::Arc<dyn Fn(LogLine) + Send + Sync>;

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
    /// Where the handler's lines go as it prints them (the worker is asked to send them).
    logs: Option<LogListener>,
    /// `false`: nobody reads chunks (a call that only wants live logs); they are the answer.
    streams: bool,
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
                logs: None,
                streams: true,
            },
            opened,
        )
    }

    /// A sink for a call nobody streams from, whose printed lines go to `logs` as they are
    /// printed (an async run followed by `dispatch logs --follow`).
    pub fn logs_only(logs: LogListener) -> Sink {
        let (mut sink, _) = Sink::new(1);
        sink.logs = Some(logs);
        sink.streams = false;
        sink
    }

    /// The handler's lines also go to `logs` as they are printed.
    pub fn with_logs(mut self, logs: LogListener) -> Sink {
        self.logs = Some(logs);
        self
    }

    /// Whether its chunks are read as they come (else they are the call's answer).
    pub fn streams(&self) -> bool {
        self.streams
    }

    /// Whether the handler's lines go somewhere as they are printed.
    pub fn wants_logs(&self) -> bool {
        self.logs.is_some()
    }

    /// Hands on one line the handler printed.
    pub fn log(&self, line: LogLine) {
        if let Some(l) = &self.logs {
            l(line)
        }
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

    /// A session's messages, for the one call that runs it.
    pub fn take_inbox(&self) -> Option<mpsc::Receiver<Inbound>> {
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

/// The first byte of a raw chunk frame: text (UTF-8) or bytes (DESIGN §5's frames are JSON,
/// which starts with `{`; a chunk skips it both ways: no encoding, no base64, no copy of its
/// data on the reading side).
pub const RAW_TEXT: u8 = 0;
pub const RAW_BYTES: u8 = 1;
/// A raw chunk frame's head: the kind byte and the request id (8 bytes, big-endian).
const RAW_HEAD: usize = 9;

/// A raw chunk frame's kind and request id (`None` when the frame is JSON, or too short to
/// be a chunk); its data starts at [`RAW_HEAD`]. The worker's frames and `dispatch runner`'s
/// are both so.
pub(crate) fn raw_chunk(frame: &[u8]) -> Option<(bool, u64)> {
    let kind @ (RAW_TEXT | RAW_BYTES) = *frame.first()? else {
        return None;
    };
    let id = u64::from_be_bytes(frame.get(1..RAW_HEAD)?.try_into().ok()?);
    Some((kind == RAW_BYTES, id))
}

/// A raw chunk frame's data, without a copy.
pub(crate) fn raw_data(frame: bytes::Bytes) -> Bytes {
    frame.slice(RAW_HEAD..)
}

/// Whether a frame may be a live log line: `{"id":N,"log":…` (the bootstraps write it so; a
/// key inside a string would be escaped). A false positive is parsed and treated as the
/// answer.
pub(crate) fn is_log(frame: &[u8]) -> bool {
    let head = &frame[..frame.len().min(32)];
    head.windows(6).any(|w| w == b"\"log\":")
}

/// A live log line frame's request id (if it names one) and line; `None` when it has no
/// `log` (then it is something else).
pub(crate) fn log_of(frame: &[u8]) -> Result<Option<(Option<u64>, LogLine)>, String> {
    #[derive(serde::Deserialize)]
    struct LogFrame {
        id: Option<u64>,
        log: Option<String>,
        stream: Option<String>,
    }
    let f: LogFrame = serde_json::from_slice(frame).map_err(|e| e.to_string())?;
    let stream = if f.stream.as_deref() == Some("stderr") {
        "stderr"
    } else {
        "stdout"
    };
    Ok(f.log.map(|line| (f.id, LogLine { stream, line })))
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

/// `dispatch runner`'s streamed answers (the Kubernetes backend): a call POSTed with this
/// header is answered with frames (4-byte big-endian length + JSON, as the worker
/// protocol's): one per chunk as the handler yields it, then one [`RemoteEnd`].
pub const STREAM_HEADER: &str = "x-dispatch-stream";
/// The content type of such an answer.
pub const FRAMES_CONTENT_TYPE: &str = "application/x-dispatch-frames";
/// Asks `dispatch runner` for the handler's lines as it prints them, as `{"log","stream"}`
/// frames among the answer's (live logs through the Kubernetes backend).
pub const LIVE_HEADER: &str = "x-dispatch-live";
/// A WebSocket session through `dispatch runner`: the request's body is frames too, the call
/// (`{"context","payload"}`) first, then each message as it comes ([`message_frame`]'s
/// shape) and the end; the answer is frames as for [`STREAM_HEADER`]. Its value is how long
/// the session may last, in milliseconds (the function's timeout does not bound it).
pub const SESSION_HEADER: &str = "x-dispatch-session";

/// The last frame of a streamed answer over HTTP: how the call ended.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoteEnd {
    pub envelope: dispatch_core::Envelope,
    #[serde(default)]
    pub timed_out: bool,
    #[serde(default)]
    pub cancelled: bool,
    #[serde(default)]
    pub stream: Option<dispatch_core::StreamStats>,
}

/// One frame: its length, then `body`.
pub fn frame(body: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    Bytes::from(out)
}

/// A chunk as its frame: the length, then a raw chunk frame (request id 0).
pub fn chunk_frame(c: &Chunk) -> Bytes {
    let mut out = Vec::with_capacity(4 + RAW_HEAD + c.data.len());
    out.extend_from_slice(&((RAW_HEAD + c.data.len()) as u32).to_be_bytes());
    out.push(if c.binary { RAW_BYTES } else { RAW_TEXT });
    out.extend_from_slice(&0u64.to_be_bytes());
    out.extend_from_slice(&c.data);
    Bytes::from(out)
}

/// A printed line as its frame (`{"log","stream"}`).
pub fn log_frame(l: &LogLine) -> Bytes {
    frame(
        &serde_json::to_vec(&serde_json::json!({"log": l.line, "stream": l.stream}))
            .unwrap_or_default(),
    )
}

/// A session's message (or, `None`, its end) as a frame of a request's body.
pub fn session_frame(m: Option<Inbound>) -> Bytes {
    frame(&message_frame(0, m))
}

/// A frame read back: a chunk, a printed line, or the end.
#[derive(Debug)]
pub enum RemoteFrame {
    Chunk(Chunk),
    Log(LogLine),
    End(Box<RemoteEnd>),
}

/// The body of the next whole frame off the front of `buf` (`None`: not all of it yet).
pub fn take_raw_frame(buf: &mut bytes::BytesMut) -> Result<Option<bytes::BytesMut>, String> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > crate::protocol::MAX_FRAME_BYTES {
        return Err(format!("a frame of {len} bytes"));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let _ = buf.split_to(4);
    Ok(Some(buf.split_to(len)))
}

/// Takes the next session message off the front of `buf`: `Some(None)` is the end.
pub fn take_session_frame(buf: &mut bytes::BytesMut) -> Result<Option<Option<Inbound>>, String> {
    use base64::Engine as _;
    let Some(body) = take_raw_frame(buf)? else {
        return Ok(None);
    };
    #[derive(serde::Deserialize)]
    struct Message {
        message: Option<String>,
        #[serde(default)]
        binary: bool,
    }
    let m: Message = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    Ok(Some(match m.message {
        None => None,
        Some(b) if m.binary => Some(Inbound::Binary(Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(b.as_bytes())
                .map_err(|e| e.to_string())?,
        ))),
        Some(t) => Some(Inbound::Text(t)),
    }))
}

/// Takes the next whole frame off the front of `buf` (`None`: not all of it yet).
pub fn take_frame(buf: &mut bytes::BytesMut) -> Result<Option<RemoteFrame>, String> {
    let Some(body) = take_raw_frame(buf)? else {
        return Ok(None);
    };
    if let Some((binary, _)) = raw_chunk(&body) {
        let data = raw_data(body.freeze());
        return Ok(Some(RemoteFrame::Chunk(Chunk { data, binary })));
    }
    if is_log(&body)
        && let Some((_, line)) = log_of(&body)?
    {
        return Ok(Some(RemoteFrame::Log(line)));
    }
    let end: RemoteEnd = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    Ok(Some(RemoteFrame::End(Box::new(end))))
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

    #[test]
    fn remote_frames_round_trip_whole_or_cut() {
        let chunk = Chunk {
            data: Bytes::from_static(b"\xff\x00"),
            binary: true,
        };
        let end = RemoteEnd {
            envelope: dispatch_core::Envelope {
                context: Default::default(),
                payload: serde_json::value::to_raw_value(&"ab").unwrap(),
            },
            timed_out: false,
            cancelled: false,
            stream: None,
        };
        let line = LogLine {
            stream: "stderr",
            line: "a \"log\": line".into(),
        };
        let mut all = chunk_frame(&chunk).to_vec();
        all.extend_from_slice(&log_frame(&line));
        all.extend_from_slice(&frame(&serde_json::to_vec(&end).unwrap()));
        // Fed a byte at a time, the same three frames come out.
        let mut buf = bytes::BytesMut::new();
        let mut got = Vec::new();
        for b in all {
            buf.extend_from_slice(&[b]);
            while let Some(f) = take_frame(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert!(matches!(&got[0], RemoteFrame::Chunk(c) if *c == chunk));
        assert!(matches!(&got[1], RemoteFrame::Log(l) if *l == line));
        assert!(matches!(&got[2], RemoteFrame::End(e) if e.envelope.payload.get() == "\"ab\""));
        assert_eq!(got.len(), 3);
    }

    #[test]
    fn session_frames_round_trip() {
        let sent = [
            Some(Inbound::Text("hi".into())),
            Some(Inbound::Binary(Bytes::from_static(b"\x00\xff"))),
            None,
        ];
        let mut buf = bytes::BytesMut::new();
        for m in sent.clone() {
            buf.extend_from_slice(&session_frame(m));
        }
        let mut got = Vec::new();
        while let Some(m) = take_session_frame(&mut buf).unwrap() {
            got.push(m);
        }
        assert_eq!(got, sent);
    }
}
