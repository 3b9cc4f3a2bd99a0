//! JSON ↔ protobuf for one route: the request message an HTTP request
//! makes (body, query string, path), its gRPC framing, and the JSON of a
//! reply. Proto3's JSON mapping throughout (prost-reflect's), so a body is
//! what `berth -o json` prints and what every other proto3 JSON tool reads.

use berth_common::grpc::rich_status;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost_reflect::{
    DeserializeOptions, DynamicMessage, Kind, MessageDescriptor, SerializeOptions,
};
use serde_json::{Map, Value};
use tonic::{Code, Status};

use super::routes::{BodyRule, Route};
use super::template::Bindings;

/// The request header an SSE client resumes with: the last seq it saw.
pub const LAST_EVENT_ID: &str = "last-event-id";

/// The request message of `route`: the body (as its rule says), then the
/// query string's fields, then the path's bindings. Every mistake is
/// INVALID_ARGUMENT naming the field.
pub(crate) fn request(
    route: &Route,
    bound: Bindings,
    query: Option<&str>,
    last_event_id: Option<&str>,
    body: &[u8],
) -> Result<DynamicMessage, Status> {
    let input = route.rpc.input();
    let mut json = match &route.body {
        BodyRule::None => Map::new(),
        BodyRule::All => object(body)?,
        BodyRule::Field(field) => {
            let mut json = Map::new();
            if !body.iter().all(u8::is_ascii_whitespace) {
                json.insert(field.clone(), parse(body)?);
            }
            json
        }
    };
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        query_field(&input, &mut json, &key, &value)?;
    }
    if let Some(id) = last_event_id.filter(|_| route.streams()) {
        resume_after(&input, &mut json, id)?;
    }
    for (field, value) in bound {
        json.insert(field, Value::String(value));
    }
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(Value::Object(json), &mut track);
    DynamicMessage::deserialize_with_options(input, de, &DeserializeOptions::new()).map_err(|e| {
        let field = track.path().to_string();
        let field = if field == "." {
            "body".to_string()
        } else {
            field
        };
        invalid(&field, format!("{field}: {e}"))
    })
}

/// A reply message, decoded.
pub(crate) fn decode(output: &MessageDescriptor, message: &[u8]) -> Result<DynamicMessage, Status> {
    DynamicMessage::decode(output.clone(), message)
        .map_err(|e| Status::internal(format!("the reply does not decode: {e}")))
}

/// A reply's JSON text (every field, defaults included, names in
/// lowerCamelCase, 64-bit integers as strings: proto3's JSON mapping),
/// written straight to bytes: one line, no raw newline.
pub(crate) fn reply(message: &DynamicMessage) -> Result<Vec<u8>, Status> {
    let options = SerializeOptions::new().skip_default_fields(false);
    let mut out = Vec::with_capacity(256);
    message
        .serialize_with_options(&mut serde_json::Serializer::new(&mut out), &options)
        .map_err(|e| Status::internal(format!("the reply has no JSON form: {e}")))?;
    Ok(out)
}

/// A message as one gRPC frame (uncompressed).
pub(crate) fn frame(message: &DynamicMessage) -> Bytes {
    use prost::Message;
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    message
        .encode(&mut buf)
        .expect("a BytesMut grows to fit the message");
    buf.freeze()
}

/// The next whole message in `buf` (consumed), `None` until one has
/// arrived. A compressed frame is an error: the call asks for none.
pub(crate) fn next_message(buf: &mut BytesMut) -> Result<Option<Bytes>, Status> {
    if buf.len() < 5 {
        return Ok(None);
    }
    if buf[0] != 0 {
        return Err(Status::internal(
            "a compressed reply frame, which was not asked for",
        ));
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() < 5 + len {
        return Ok(None);
    }
    buf.advance(5);
    Ok(Some(buf.split_to(len).freeze()))
}

pub(crate) fn invalid(field: &str, message: impl Into<String>) -> Status {
    rich_status(
        Code::InvalidArgument,
        message,
        "INVALID_FIELD",
        Some(field),
        None,
    )
}

/// The body as a JSON object; empty is `{}`.
fn object(body: &[u8]) -> Result<Map<String, Value>, Status> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match parse(body)? {
        Value::Object(map) => Ok(map),
        _ => Err(invalid("body", "the body must be a JSON object")),
    }
}

fn parse(body: &[u8]) -> Result<Value, Status> {
    serde_json::from_slice(body).map_err(|e| invalid("body", format!("the body is not JSON: {e}")))
}

/// One `key=value` of the query string into `json`: `key` is a field's
/// name (proto or lowerCamelCase), dotted into nested messages; a repeated
/// field takes the key once per value.
fn query_field(
    input: &MessageDescriptor,
    json: &mut Map<String, Value>,
    key: &str,
    value: &str,
) -> Result<(), Status> {
    let unknown = || invalid(key, format!("no query parameter `{key}` on this method"));
    let mut desc = input.clone();
    let mut map = json;
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        let field = desc
            .get_field_by_name(part)
            .or_else(|| desc.get_field_by_json_name(part))
            .ok_or_else(unknown)?;
        let name = field.json_name().to_string();
        if parts.peek().is_some() {
            let Kind::Message(inner) = field.kind() else {
                return Err(unknown());
            };
            if field.is_list() || field.is_map() || is_wkt(&inner) {
                return Err(unknown());
            }
            let entry = map.entry(name).or_insert_with(|| Value::Object(Map::new()));
            let Value::Object(next) = entry else {
                return Err(unknown());
            };
            map = next;
            desc = inner;
            continue;
        }
        if field.is_map() || matches!(field.kind(), Kind::Message(m) if !is_wkt(&m)) {
            return Err(invalid(
                key,
                format!("`{key}` is a message; send it in a body"),
            ));
        }
        let scalar = match field.kind() {
            Kind::Bool => match value {
                "true" => Value::Bool(true),
                "false" => Value::Bool(false),
                _ => {
                    return Err(invalid(
                        key,
                        format!("`{key}` is true or false, not `{value}`"),
                    ));
                }
            },
            // Proto3 JSON takes every other scalar, enum and well-known
            // type from a string.
            _ => Value::String(value.to_string()),
        };
        if field.is_list() {
            let entry = map.entry(name).or_insert_with(|| Value::Array(Vec::new()));
            match entry {
                Value::Array(items) => items.push(scalar),
                _ => return Err(unknown()),
            }
        } else {
            map.insert(name, scalar);
        }
    }
    Ok(())
}

/// `Last-Event-ID` (an SSE client's reconnect) resumes after that seq.
fn resume_after(
    input: &MessageDescriptor,
    json: &mut Map<String, Value>,
    id: &str,
) -> Result<(), Status> {
    let Some(field) = input.get_field_by_name("after_seq") else {
        return Ok(());
    };
    let seq: u64 = id.trim().parse().map_err(|_| {
        invalid(
            "Last-Event-ID",
            format!("Last-Event-ID is an event's seq, not `{id}`"),
        )
    })?;
    json.remove(field.name());
    json.insert(
        field.json_name().to_string(),
        Value::String(seq.to_string()),
    );
    Ok(())
}

/// Timestamp and Duration: one JSON string each.
fn is_wkt(desc: &MessageDescriptor) -> bool {
    matches!(
        desc.full_name(),
        "google.protobuf.Timestamp" | "google.protobuf.Duration"
    )
}

#[cfg(test)]
mod tests {
    use super::super::routes::{Found, Routes};
    use super::*;
    use prost_reflect::{DescriptorPool, ReflectMessage};

    fn make(
        method: http::Method,
        path: &str,
        query: Option<&str>,
        body: &str,
    ) -> Result<DynamicMessage, Status> {
        let pool = DescriptorPool::decode(berth_proto::FILE_DESCRIPTOR_SET).expect("descriptors");
        let routes = Routes::from_pool(&pool, "berth.v1").expect("routes");
        let Found::Route(route, bound) = routes.find(&method, path) else {
            panic!("no route for {path}");
        };
        request(route, bound, query, None, body.as_bytes())
    }

    fn json(m: &DynamicMessage) -> Value {
        m.serialize_with_options(serde_json::value::Serializer, &SerializeOptions::new())
            .expect("json")
    }

    #[test]
    fn body_path_and_query_fill_one_request() {
        let m = make(
            http::Method::POST,
            "/v1/sessions/abc:sendMessage",
            None,
            r#"{"text": "hello"}"#,
        )
        .expect("request");
        assert_eq!(
            json(&m),
            serde_json::json!({"name": "sessions/abc", "text": "hello"})
        );
        let m = make(
            http::Method::GET,
            "/v1/sessions",
            Some("pageSize=5&status=SESSION_STATUS_RUNNING&page_token=t"),
            "",
        )
        .expect("request");
        assert_eq!(
            json(&m),
            serde_json::json!({"pageSize": 5, "status": "SESSION_STATUS_RUNNING", "pageToken": "t"})
        );
    }

    #[test]
    fn mistakes_name_their_field() {
        let field = |r: Result<DynamicMessage, Status>| {
            let status = r.expect_err("an error");
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            status.message().to_string()
        };
        let m = field(make(
            http::Method::GET,
            "/v1/sessions",
            Some("pageSize=many"),
            "",
        ));
        assert!(m.starts_with("pageSize:"), "{m}");
        let m = field(make(
            http::Method::GET,
            "/v1/sessions",
            Some("colour=red"),
            "",
        ));
        assert!(m.contains("`colour`"), "{m}");
        let m = field(make(
            http::Method::POST,
            "/v1/sessions",
            None,
            r#"{"spec": {"image": 5}}"#,
        ));
        assert!(m.starts_with("spec.image:"), "{m}");
        let m = field(make(http::Method::POST, "/v1/sessions", None, "[1]"));
        assert!(m.contains("JSON object"), "{m}");
        let m = field(make(http::Method::POST, "/v1/sessions", None, "{"));
        assert!(m.contains("not JSON"), "{m}");
    }

    #[test]
    fn frames_round_trip_whole_or_in_pieces() {
        let m = make(http::Method::GET, "/v1/sessions/abc", None, "").expect("request");
        let framed = frame(&m);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&framed[..3]);
        assert_eq!(next_message(&mut buf).expect("ok"), None);
        buf.extend_from_slice(&framed[3..]);
        buf.extend_from_slice(&framed);
        for _ in 0..2 {
            let body = next_message(&mut buf).expect("ok").expect("a message");
            let back = DynamicMessage::decode(m.descriptor(), body).expect("decodes");
            assert_eq!(back, m);
        }
        assert!(buf.is_empty());
    }
}
