//! The OpenAPI 3.1 document of the HTTP API (`GET /openapi.json`), made
//! from the same routes that serve it: each path and method, its path and
//! query parameters, its body, its reply, and a JSON Schema for every
//! message in proto3's JSON mapping.

use std::collections::BTreeMap;

use prost_reflect::{FieldDescriptor, Kind, MessageDescriptor};
use serde_json::{Map, Value, json};

use super::routes::{BodyRule, Route, Routes};

/// The whole document.
pub(crate) fn document(routes: &Routes) -> Value {
    let mut schemas = BTreeMap::new();
    let mut paths: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    for route in routes.iter() {
        let (path, _) = route.template.openapi();
        let operation = operation(route, &mut schemas);
        paths
            .entry(path)
            .or_default()
            .insert(route.method.as_str().to_ascii_lowercase(), operation);
    }
    schemas.insert("Error".to_string(), error_schema());
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "berth",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "berth's HTTP/JSON API: the gRPC API's operations (berth.v1) in proto3's JSON mapping, on the same port, with the same API keys. Errors are Google's JSON error body. StreamEvents is Server-Sent Events, resumable with Last-Event-ID.",
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "An API key (`berth_…`)"},
            },
        },
    })
}

fn operation(route: &Route, schemas: &mut BTreeMap<String, Value>) -> Value {
    let input = route.rpc.input();
    let output = route.rpc.output();
    let (_, names) = route.template.openapi();
    let fields = route.template.fields();
    let mut parameters: Vec<Value> = names
        .iter()
        .zip(&fields)
        .map(|(name, (field, prefix))| {
            json!({
                "name": name,
                "in": "path",
                "required": true,
                "description": format!("Fills `{field}` as `{prefix}{{{name}}}`."),
                "schema": {"type": "string", "pattern": "^[^/:]+$"},
            })
        })
        .collect();
    let bound: Vec<&str> = fields.iter().map(|(f, _)| f.as_str()).collect();
    if route.body == BodyRule::None {
        for field in input.fields().filter(|f| !bound.contains(&f.name())) {
            if let Some(schema) = query_schema(&field) {
                parameters.push(json!({
                    "name": field.json_name(),
                    "in": "query",
                    "required": false,
                    "schema": schema,
                }));
            }
        }
    }
    if route.streams() {
        parameters.push(json!({
            "name": "Last-Event-ID",
            "in": "header",
            "required": false,
            "description": "Resume after this event's seq (what an EventSource sends when it reconnects).",
            "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
        }));
    }
    let mut op = json!({
        "operationId": format!("{}_{}", route.rpc.parent_service().name(), route.rpc.name()),
        "tags": [route.rpc.parent_service().name()],
        "summary": format!("{} (gRPC {})", route.rpc.name(), route.grpc_path),
        "parameters": parameters,
        "responses": {
            "200": reply(route, &output, schemas),
            "default": {
                "description": "An error: its gRPC code's HTTP status, and Google's JSON error body.",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            },
        },
    });
    let body_schema = match &route.body {
        BodyRule::None => None,
        BodyRule::All => Some(reference(&input, schemas)),
        BodyRule::Field(name) => input
            .get_field_by_name(name)
            .map(|f| field_schema(&f, schemas)),
    };
    if let Some(schema) = body_schema {
        op["requestBody"] = json!({
            "required": false,
            "content": {"application/json": {"schema": schema}},
        });
    }
    op
}

fn reply(
    route: &Route,
    output: &MessageDescriptor,
    schemas: &mut BTreeMap<String, Value>,
) -> Value {
    if route.streams() {
        let event = reference(output, schemas);
        return json!({
            "description": format!("Server-Sent Events: one `message` per {} (its JSON in `data:`, its seq in `id:`), then one `end` event: `{{}}`, or the error body.", output.name()),
            "content": {"text/event-stream": {"schema": {"type": "string"}, "x-event-schema": event}},
        });
    }
    json!({
        "description": output.name(),
        "content": {"application/json": {"schema": reference(output, schemas)}},
    })
}

/// A `$ref` to `message`'s schema, adding it (and what it uses) first.
fn reference(message: &MessageDescriptor, schemas: &mut BTreeMap<String, Value>) -> Value {
    if let Some(wkt) = well_known(message) {
        return wkt;
    }
    let name = message.full_name().to_string();
    if !schemas.contains_key(&name) {
        // Placed before its fields are walked: a message may hold itself.
        schemas.insert(name.clone(), Value::Null);
        let mut properties = Map::new();
        for field in message.fields() {
            properties.insert(field.json_name().to_string(), field_schema(&field, schemas));
        }
        schemas.insert(
            name.clone(),
            json!({"type": "object", "properties": properties}),
        );
    }
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn field_schema(field: &FieldDescriptor, schemas: &mut BTreeMap<String, Value>) -> Value {
    if field.is_map() {
        let Kind::Message(entry) = field.kind() else {
            return json!({});
        };
        let value = entry.map_entry_value_field();
        return json!({"type": "object", "additionalProperties": field_schema(&value, schemas)});
    }
    let one = match field.kind() {
        Kind::Message(message) => reference(&message, schemas),
        kind => scalar(&kind),
    };
    if field.is_list() {
        json!({"type": "array", "items": one})
    } else {
        one
    }
}

/// A query parameter's schema: scalars, enums, timestamps and lists of
/// them; messages go in bodies.
fn query_schema(field: &FieldDescriptor) -> Option<Value> {
    let one = match field.kind() {
        Kind::Message(message) => well_known(&message)?,
        _ if field.is_map() => return None,
        kind => scalar(&kind),
    };
    Some(if field.is_list() {
        json!({"type": "array", "items": one})
    } else {
        one
    })
}

fn scalar(kind: &Kind) -> Value {
    match kind {
        Kind::Bool => json!({"type": "boolean"}),
        Kind::String => json!({"type": "string"}),
        Kind::Bytes => json!({"type": "string", "contentEncoding": "base64"}),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            json!({"type": "integer", "format": "int32", "minimum": i32::MIN, "maximum": i32::MAX})
        }
        Kind::Uint32 | Kind::Fixed32 => {
            json!({"type": "integer", "format": "uint32", "minimum": 0, "maximum": u32::MAX})
        }
        // Proto3's JSON writes 64-bit integers as strings, and reads both.
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => json!({
            "type": ["string", "integer"], "format": "int64", "pattern": "^-?[0-9]{1,18}$",
            "minimum": -999_999_999_999_999_999_i64, "maximum": 999_999_999_999_999_999_i64,
        }),
        Kind::Uint64 | Kind::Fixed64 => json!({
            "type": ["string", "integer"], "format": "uint64", "pattern": "^[0-9]{1,18}$",
            "minimum": 0, "maximum": 999_999_999_999_999_999_i64,
        }),
        Kind::Float | Kind::Double => json!({"type": "number"}),
        Kind::Enum(e) => {
            let names: Vec<String> = e.values().map(|v| v.name().to_string()).collect();
            json!({"type": "string", "enum": names})
        }
        Kind::Message(_) => json!({"type": "object"}),
    }
}

fn well_known(message: &MessageDescriptor) -> Option<Value> {
    match message.full_name() {
        "google.protobuf.Timestamp" => Some(json!({"type": "string", "format": "date-time"})),
        "google.protobuf.Duration" => Some(json!({
            "type": "string", "pattern": "^-?[0-9]{1,12}(\\.[0-9]{1,9})?s$",
        })),
        _ => None,
    }
}

fn error_schema() -> Value {
    json!({
        "type": "object",
        "required": ["error"],
        "properties": {"error": {
            "type": "object",
            "required": ["code", "status", "message"],
            "properties": {
                "code": {"type": "integer", "description": "The HTTP status."},
                "status": {"type": "string", "description": "The gRPC code's name (INVALID_ARGUMENT…)."},
                "message": {"type": "string"},
                "reason": {"type": "string", "description": "berth's reason (google.rpc.ErrorInfo)."},
                "details": {"type": "array", "items": {"type": "object"}},
            },
        }},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_has_every_route_and_resolves_every_reference() {
        let pool = prost_reflect::DescriptorPool::decode(berth_proto::FILE_DESCRIPTOR_SET)
            .expect("descriptors");
        let routes = Routes::from_pool(&pool, "berth.v1").expect("routes");
        let doc = document(&routes);
        for route in routes.iter() {
            let (path, _) = route.template.openapi();
            let method = route.method.as_str().to_ascii_lowercase();
            assert!(
                doc["paths"][&path][&method].is_object(),
                "{method} {path} is missing"
            );
        }
        let text = doc.to_string();
        let schemas = doc["components"]["schemas"].as_object().expect("schemas");
        for (i, _) in text.match_indices("#/components/schemas/") {
            let rest = &text[i + "#/components/schemas/".len()..];
            let name = &rest[..rest.find('"').expect("closed")];
            assert!(
                schemas.get(name).is_some_and(Value::is_object),
                "{name} is referenced but not defined"
            );
        }
    }
}
