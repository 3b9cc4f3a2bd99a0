//! A server-streaming RPC as Server-Sent Events (`text/event-stream`).
//!
//! Each reply message is one `message` event: `data:` its JSON, `id:` its
//! `seq` (so a browser's `EventSource`, or any client, reconnects with
//! `Last-Event-ID` and resumes with no gap and no repeat). The stream ends
//! with one `end` event: `{}` when the RPC ended cleanly (the session
//! stopped running), or the error body when it failed. A comment line
//! every [`KEEPALIVE`] keeps proxies from closing a quiet stream.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, StatusCode, header};
use http_body::Frame;
use http_body_util::BodyExt;
use prost_reflect::MessageDescriptor;
use tonic::Status;

use super::{errors, respond, transcode};

/// How often a quiet stream sends a comment.
pub const KEEPALIVE: Duration = Duration::from_secs(15);

/// The SSE response for a stream of gRPC reply frames.
pub(crate) fn response(
    output: MessageDescriptor,
    body: tonic::body::Body,
) -> http::Response<tonic::body::Body> {
    let state = State {
        output,
        body,
        buf: BytesMut::new(),
        ended: false,
        keepalive: tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE),
    };
    let stream = futures::stream::unfold(state, |mut state| async move {
        let chunk = state.next().await?;
        Some((Ok::<_, Status>(Frame::data(chunk)), state))
    });
    let mut response = respond::bytes(StatusCode::OK, "text/event-stream", Bytes::new());
    *response.body_mut() = tonic::body::Body::new(http_body_util::StreamBody::new(stream));
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // nginx and its kin buffer responses unless told not to.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

struct State {
    output: MessageDescriptor,
    body: tonic::body::Body,
    buf: BytesMut,
    ended: bool,
    keepalive: tokio::time::Interval,
}

impl State {
    /// The next chunk of the event stream; `None` once it has ended.
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if self.ended {
                return None;
            }
            let mut out = Vec::new();
            loop {
                match transcode::next_message(&mut self.buf) {
                    Ok(Some(bytes)) => {
                        let written = transcode::decode(&self.output, &bytes)
                            .and_then(|m| Ok((seq(&m), transcode::reply(&m)?)));
                        match written {
                            Ok((seq, json)) => event(&mut out, seq, &json),
                            Err(status) => return Some(self.end(Some(&status))),
                        }
                    }
                    Ok(None) => break,
                    Err(status) => return Some(self.end(Some(&status))),
                }
            }
            if !out.is_empty() {
                return Some(Bytes::from(out));
            }
            tokio::select! {
                frame = self.body.frame() => match frame {
                    None => return Some(self.end(None)),
                    Some(Err(status)) => return Some(self.end(Some(&status))),
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => self.buf.extend_from_slice(&data),
                        Err(frame) => {
                            let status = frame
                                .trailers_ref()
                                .and_then(Status::from_header_map)
                                .filter(|s| s.code() != tonic::Code::Ok);
                            return Some(self.end(status.as_ref()));
                        }
                    },
                },
                _ = self.keepalive.tick() => return Some(Bytes::from_static(b": keep-alive\n\n")),
            }
        }
    }

    /// The `end` event: `{}`, or the error that ended the stream.
    fn end(&mut self, status: Option<&Status>) -> Bytes {
        self.ended = true;
        let data = status.map_or_else(|| serde_json::json!({}), errors::body);
        Bytes::from(format!("event: end\ndata: {data}\n\n"))
    }
}

/// A reply's `seq` field, when it has one (an `Event` does).
fn seq(message: &prost_reflect::DynamicMessage) -> Option<i64> {
    message.get_field_by_name("seq").and_then(|v| v.as_i64())
}

/// One reply as an event; its `seq` (when it has one) is the event's id.
fn event(out: &mut Vec<u8>, seq: Option<i64>, json: &[u8]) {
    use std::io::Write;
    if let Some(seq) = seq {
        let _ = writeln!(out, "id: {seq}");
    }
    // Compact JSON has no raw newline: one `data:` line.
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(json);
    out.extend_from_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_carries_its_seq_as_its_id() {
        use prost::Message;
        let pool = prost_reflect::DescriptorPool::decode(berth_proto::FILE_DESCRIPTOR_SET)
            .expect("descriptors");
        let desc = pool.get_message_by_name("berth.v1.Event").expect("Event");
        let wire = berth_proto::v1::Event {
            seq: 7,
            r#type: "agent.message".into(),
            payload_json: r#"{"text":"a\nb"}"#.into(),
            ..Default::default()
        }
        .encode_to_vec();
        let m = transcode::decode(&desc, &wire).expect("decodes");
        let mut out = Vec::new();
        event(&mut out, seq(&m), &transcode::reply(&m).expect("json"));
        let text = String::from_utf8(out).expect("utf-8");
        assert!(text.starts_with("id: 7\ndata: {"), "{text}");
        assert!(text.contains(r#""seq":"7""#), "{text}");
        assert!(
            text.ends_with("}\n\n") && text.matches('\n').count() == 3,
            "one data line: {text}"
        );
    }
}
