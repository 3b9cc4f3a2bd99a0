//! What the CLI prints on stdout: tables for people (colour on a terminal),
//! proto3 JSON, YAML or resource names for programs. A closed stdout
//! (`berth … | head`) ends the CLI quietly.

use std::io::Write;
use std::sync::LazyLock;
use std::time::Duration;

use clap::ValueEnum;
use comfy_table::{Cell, Color, Table, presets};
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

use crate::CliError;

/// `--output`: how results are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    /// Columns for people (the default).
    #[default]
    Table,
    /// The table with more columns.
    Wide,
    /// Proto3 JSON (the API's own JSON mapping), one object per line.
    Json,
    /// YAML, one document per object.
    Yaml,
    /// Resource names only (`sessions/…`), one per line.
    Name,
}

/// Where and how this invocation prints.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Out {
    pub format: Format,
    /// Colour the tables: stdout is a terminal and `NO_COLOR` is unset.
    pub color: bool,
}

impl Out {
    pub fn new(format: Format) -> Self {
        let color = matches!(format, Format::Table | Format::Wide)
            && std::io::IsTerminal::is_terminal(&std::io::stdout())
            && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        Self { format, color }
    }

    /// Whether the output is for programs (JSON, YAML, names).
    pub fn machine(&self) -> bool {
        matches!(self.format, Format::Json | Format::Yaml | Format::Name)
    }

    pub fn wide(&self) -> bool {
        self.format == Format::Wide
    }

    /// Prints one API object: its proto3 JSON or YAML, its `name`, or
    /// `human` for people.
    pub fn object<M: prost::Message + prost::Name>(
        &self,
        m: &M,
        name: &str,
        human: impl FnOnce() -> String,
    ) -> Result<(), CliError> {
        match self.format {
            Format::Json => line(proto_json(m)),
            Format::Yaml => line(yaml(&proto_json(m))),
            Format::Name => line(name),
            Format::Table | Format::Wide => {
                let text = human();
                line(text.trim_end_matches('\n'))
            }
        }
    }

    /// Prints a list of API objects: a table for people (`table` builds it
    /// from the wide flag), else one object per line or document.
    pub fn list<M: prost::Message + prost::Name>(
        &self,
        items: &[M],
        name: impl Fn(&M) -> String,
        table: impl FnOnce(&Self) -> Table,
    ) -> Result<(), CliError> {
        match self.format {
            Format::Table | Format::Wide => {
                if items.is_empty() {
                    eprintln!("(none)");
                    return Ok(());
                }
                line(table(self))
            }
            _ => {
                for m in items {
                    self.object(m, &name(m), String::new)?;
                }
                Ok(())
            }
        }
    }

    /// A borderless table with `header`, coloured on a terminal.
    pub fn table(&self, header: &[&str]) -> Table {
        let mut t = Table::new();
        t.load_preset(presets::NOTHING)
            .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
            .set_header(header.iter().map(Cell::new));
        if !self.color {
            t.force_no_tty();
        }
        for c in t.column_iter_mut() {
            c.set_padding((0, 2));
        }
        t
    }

    /// A status cell, coloured by what it means.
    pub fn status(&self, status: &str) -> Cell {
        let color = match status {
            "running" | "up" => Some(Color::Green),
            "idle" | "starting" | "pending" | "rescheduling" | "draining" => Some(Color::Yellow),
            "failed" | "down" | "timeout" => Some(Color::Red),
            "stopping" | "stopped" | "paused" | "archived" => Some(Color::DarkGrey),
            _ => None,
        };
        match color {
            Some(c) if self.color => Cell::new(status).fg(c),
            _ => Cell::new(status),
        }
    }
}

/// Writes one line to stdout. A reader that went away (`| head`) becomes
/// [`CliError::closed`], which ends the CLI without a message.
pub(crate) fn line(text: impl std::fmt::Display) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")
        .and_then(|()| out.flush())
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                CliError::closed()
            } else {
                CliError::new(format!("writing to stdout: {e}"))
            }
        })
}

/// The API's descriptors, for proto3 JSON.
static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
    DescriptorPool::decode(berth_proto::FILE_DESCRIPTOR_SET).expect("the compiled-in descriptors")
});

/// `m` in the proto3 JSON mapping (lowerCamelCase names, enums by name,
/// 64-bit integers as strings, defaults left out), as any gRPC tool shows it.
pub(crate) fn proto_json<M: prost::Message + prost::Name>(m: &M) -> serde_json::Value {
    let desc = POOL
        .get_message_by_name(&M::full_name())
        .expect("every API message is in the descriptors");
    let dynamic = DynamicMessage::decode(desc, m.encode_to_vec().as_slice())
        .expect("a message decodes from its own encoding");
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &SerializeOptions::new())
        .expect("a message serializes to JSON")
}

/// A JSON value as one YAML document.
pub(crate) fn yaml(v: &serde_json::Value) -> String {
    fn convert(v: &serde_json::Value) -> yaml_rust2::Yaml {
        use serde_json::Value;
        use yaml_rust2::Yaml;
        match v {
            Value::Null => Yaml::Null,
            Value::Bool(b) => Yaml::Boolean(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => Yaml::Integer(i),
                None => Yaml::Real(n.to_string()),
            },
            Value::String(s) => Yaml::String(s.clone()),
            Value::Array(a) => Yaml::Array(a.iter().map(convert).collect()),
            Value::Object(o) => Yaml::Hash(
                o.iter()
                    .map(|(k, v)| (Yaml::String(k.clone()), convert(v)))
                    .collect(),
            ),
        }
    }
    let mut out = String::new();
    let mut emitter = yaml_rust2::YamlEmitter::new(&mut out);
    emitter.multiline_strings(true);
    emitter.dump(&convert(v)).expect("writing YAML to a String");
    out
}

/// How long ago `t` was, kubectl style: `42s`, `5m`, `3h`, `2d`.
pub(crate) fn age(t: &Option<prost_types::Timestamp>) -> String {
    let Some(t) = t.as_ref().and_then(berth_common::time::from_timestamp) else {
        return "-".into();
    };
    let secs = (chrono::Utc::now() - t).num_seconds().max(0) as u64;
    let rounded = match secs {
        0..120 => secs,
        120..7_200 => secs / 60 * 60,
        7_200..172_800 => secs / 3_600 * 3_600,
        _ => return format!("{}d", secs / 86_400),
    };
    humantime::format_duration(Duration::from_secs(rounded)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proto::v1 as pb;

    #[test]
    fn json_is_the_proto3_mapping() {
        let s = pb::Session {
            name: "sessions/x".into(),
            status: pb::SessionStatus::Idle as i32,
            last_seq: 7,
            runtime_session_id: "r".into(),
            ..Default::default()
        };
        let v = proto_json(&s);
        assert_eq!(v["name"], "sessions/x");
        assert_eq!(v["status"], "SESSION_STATUS_IDLE");
        // int64 is a string, names are lowerCamelCase, defaults are left out.
        assert_eq!(v["lastSeq"], "7");
        assert_eq!(v["runtimeSessionId"], "r");
        assert!(v.get("epoch").is_none(), "{v}");
    }

    #[test]
    fn yaml_keeps_structure() {
        let v = serde_json::json!({"a": [1, "x"], "b": {"c": true, "d": 1.5}});
        let y = yaml(&v);
        let back = yaml_rust2::YamlLoader::load_from_str(&y).expect("valid YAML");
        assert_eq!(back[0]["a"][1].as_str(), Some("x"));
        assert_eq!(back[0]["b"]["c"].as_bool(), Some(true));
        assert_eq!(back[0]["b"]["d"].as_f64(), Some(1.5));
    }

    #[test]
    fn ages_round_to_one_unit_past_two() {
        let ago = |secs: i64| {
            let t = chrono::Utc::now() - chrono::Duration::seconds(secs);
            age(&Some(berth_common::time::to_timestamp(t)))
        };
        assert_eq!(ago(42), "42s");
        assert_eq!(ago(130), "2m");
        assert_eq!(ago(3 * 3600 + 100), "3h");
        assert_eq!(ago(3 * 86_400 + 100), "3d");
    }
}
