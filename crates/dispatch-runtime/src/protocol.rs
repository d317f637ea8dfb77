//! The worker protocol (DESIGN §5): frames of a 4-byte big-endian length followed by JSON,
//! over a Unix socket pair. The bootstraps in `runtimes/` are the other end.

use std::io;

use dispatch_core::ErrorObject;
use dispatch_core::envelope::EnvelopeContext;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame either side accepts (payloads are capped at 6 MiB before they get here;
/// answers may be larger, but not unbounded).
pub const MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;

/// Host → worker. `payload` is passed through as raw JSON.
#[derive(Serialize)]
pub struct Request<'a> {
    pub id: u64,
    pub context: &'a RawValue,
    pub payload: &'a RawValue,
    /// A WebSocket session: the handler's payload is the stream of `{"id", "message"}`
    /// frames that follow, ended by `{"id", "end": true}`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub session: bool,
    /// Send each line the handler prints as `{"id", "log", "stream"}` as it is printed (the
    /// answer's logs still carry them all).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub live: bool,
}

/// Worker → host, once at start-up.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hello {
    pub ready: bool,
    #[serde(default)]
    pub error: Option<ErrorObject>,
    /// How long loading the handler took, as the worker measured it.
    #[serde(default)]
    pub import_ms: Option<f64>,
}

/// Worker → host: once per request, its answer; before it, when the handler streams, one raw
/// frame per chunk it yields (`stream::RAW_TEXT`/`RAW_BYTES`, the id, the data) and, for a
/// `live` request, `{"id", "log", "stream"}` per line printed.
#[derive(Deserialize)]
pub struct Response {
    pub id: u64,
    #[serde(default)]
    pub context: EnvelopeContext,
    #[serde(default)]
    pub payload: Option<Box<RawValue>>,
}

pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    // One write for small frames keeps a call to one syscall on each side.
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(body);
    w.write_all(&buf).await?;
    w.flush().await
}

/// Reads one frame; `Ok(None)` on a clean end of stream before a frame starts.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Vec<u8>>> {
    let mut head = [0u8; 4];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(head) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is larger than {MAX_FRAME_BYTES}"),
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(Some(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_eof_is_none() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        write_frame(&mut a, br#"{"x":1}"#).await.unwrap();
        drop(a);
        assert_eq!(read_frame(&mut b).await.unwrap().unwrap(), br#"{"x":1}"#);
        assert!(read_frame(&mut b).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn oversized_frames_are_refused() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        assert!(read_frame(&mut b).await.is_err());
    }
}
