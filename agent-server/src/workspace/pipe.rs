//! A pipe from the blocking pool's tar and zstd code to the async side
//! (Docker, the object store): a [`ChunkWriter`] that sends what is written
//! as chunks over a bounded channel, and the [`ChunkStream`] that yields
//! them. Memory is bounded by the channel: [`CHUNK_BYTES`] × [`IN_FLIGHT`].
//!
//! The stream ends cleanly only after [`ChunkWriter::finish`]. A writer
//! dropped before that (an error, a panic) ends the stream with an error,
//! so a half-written archive is never stored or extracted as whole.

use std::io::Write;

use bytes::{Bytes, BytesMut};
use futures::Stream;
use tokio::sync::mpsc;

/// Size of one chunk sent through the pipe.
pub(super) const CHUNK_BYTES: usize = 256 << 10;
/// Chunks buffered between the two sides.
const IN_FLIGHT: usize = 4;

enum Msg {
    Data(Bytes),
    End,
}

/// The writing end: use it from the blocking pool only (it blocks).
pub(super) struct ChunkWriter {
    tx: mpsc::Sender<Msg>,
    buf: BytesMut,
}

/// The reading end: chunks, then the end or an error.
pub(super) type ChunkStream = std::pin::Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// A new pipe.
pub(super) fn pipe() -> (ChunkWriter, ChunkStream) {
    let (tx, rx) = mpsc::channel(IN_FLIGHT);
    let stream = futures::stream::unfold(Some(rx), |rx| async move {
        let mut rx = rx?;
        match rx.recv().await {
            Some(Msg::Data(b)) => Some((Ok(b), Some(rx))),
            Some(Msg::End) => None,
            None => Some((
                Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the archive ended before it was complete",
                )),
                None,
            )),
        }
    });
    let writer = ChunkWriter {
        tx,
        buf: BytesMut::with_capacity(CHUNK_BYTES),
    };
    (writer, Box::pin(stream))
}

impl ChunkWriter {
    fn send(&mut self, msg: Msg) -> std::io::Result<()> {
        self.tx.blocking_send(msg).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the reader of the archive stopped",
            )
        })
    }

    /// Sends what is buffered and marks the end: the stream then ends
    /// cleanly.
    pub(super) fn finish(mut self) -> std::io::Result<()> {
        self.flush()?;
        self.send(Msg::End)
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(CHUNK_BYTES - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK_BYTES {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = self.buf.split().freeze();
        self.buf.reserve(CHUNK_BYTES);
        self.send(Msg::Data(chunk))
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    async fn drain(mut s: ChunkStream) -> (Vec<u8>, Option<String>) {
        let mut out = Vec::new();
        while let Some(chunk) = s.next().await {
            match chunk {
                Ok(b) => out.extend_from_slice(&b),
                Err(e) => return (out, Some(e.to_string())),
            }
        }
        (out, None)
    }

    #[tokio::test]
    async fn what_is_written_arrives_in_order_and_ends_cleanly_after_finish() {
        let (mut w, s) = pipe();
        let writer = tokio::task::spawn_blocking(move || {
            for i in 0..2000u32 {
                w.write_all(&i.to_le_bytes().repeat(100))?;
            }
            w.finish()
        });
        let (got, err) = drain(s).await;
        writer.await.expect("join").expect("write");
        assert_eq!(err, None);
        let want: Vec<u8> = (0..2000u32)
            .flat_map(|i| i.to_le_bytes().repeat(100))
            .collect();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn a_writer_dropped_before_finishing_ends_the_stream_with_an_error() {
        let (mut w, s) = pipe();
        let writer = tokio::task::spawn_blocking(move || {
            w.write_all(&[1u8; 1000])?;
            w.flush()
        });
        let (got, err) = drain(s).await;
        writer.await.expect("join").expect("write");
        assert_eq!(got.len(), 1000);
        assert_eq!(
            err.as_deref(),
            Some("the archive ended before it was complete")
        );
    }

    #[tokio::test]
    async fn a_reader_that_goes_away_stops_the_writer() {
        let (mut w, s) = pipe();
        drop(s);
        let result = tokio::task::spawn_blocking(move || w.write_all(&[0u8; 4 << 20]))
            .await
            .expect("join");
        assert_eq!(
            result.expect_err("broken pipe").kind(),
            std::io::ErrorKind::BrokenPipe
        );
    }
}
