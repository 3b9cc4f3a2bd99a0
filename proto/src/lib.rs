//! berth's gRPC protocols, generated at build time from `proto/` by protox and
//! tonic-prost-build (no protoc needed).
//!
//! - [`v1`]: the public API (`berth.v1.Sessions`, `berth.v1.Nodes`), served by the dispatcher.
//! - [`node::v1`]: the node API (`berth.node.v1.AgentServer`), served by agent-servers.

#![allow(clippy::all, missing_docs)]

pub mod codec;

/// The public API.
pub mod v1 {
    tonic::include_proto!("berth.v1");
}

/// The node API.
pub mod node {
    pub mod v1 {
        tonic::include_proto!("berth.node.v1");
    }
}

/// Encoded `FileDescriptorSet` of every berth proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/berth_descriptor.bin"));

/// The `buf lint` STANDARD rules (`buf.yaml`) that can be checked from the
/// compiled descriptors, so they hold without the `buf` binary: names, enum
/// zero values and prefixes, request names, packages and directories.
#[cfg(test)]
mod lint {
    use prost::Message;
    use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorSet};

    fn upper_snake(pascal: &str) -> String {
        let mut out = String::new();
        for (i, c) in pascal.chars().enumerate() {
            if c.is_ascii_uppercase() && i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_uppercase());
        }
        out
    }

    fn pascal(s: &str) -> bool {
        s.chars().next().is_some_and(|c| c.is_ascii_uppercase()) && !s.contains('_')
    }

    fn lower_snake(s: &str) -> bool {
        s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    }

    fn check_enum(e: &EnumDescriptorProto, problems: &mut Vec<String>) {
        let name = e.name();
        let prefix = format!("{}_", upper_snake(name));
        if !pascal(name) {
            problems.push(format!("enum {name}: not PascalCase"));
        }
        match e.value.first() {
            Some(v) if v.number() == 0 && v.name() == format!("{prefix}UNSPECIFIED") => {}
            _ => problems.push(format!(
                "enum {name}: zero value is not {prefix}UNSPECIFIED"
            )),
        }
        for v in &e.value {
            if !v.name().starts_with(&prefix) {
                problems.push(format!("enum {name}: value {} lacks {prefix}", v.name()));
            }
        }
    }

    fn check_message(m: &DescriptorProto, problems: &mut Vec<String>) {
        if !pascal(m.name()) {
            problems.push(format!("message {}: not PascalCase", m.name()));
        }
        for f in &m.field {
            if !lower_snake(f.name()) {
                problems.push(format!("{}.{}: not lower_snake_case", m.name(), f.name()));
            }
        }
        for o in &m.oneof_decl {
            if !lower_snake(o.name()) {
                problems.push(format!(
                    "{}.{}: oneof not lower_snake_case",
                    m.name(),
                    o.name()
                ));
            }
        }
        for e in &m.enum_type {
            check_enum(e, problems);
        }
        for n in &m.nested_type {
            if !n.options.as_ref().is_some_and(|o| o.map_entry()) {
                check_message(n, problems);
            }
        }
    }

    #[test]
    fn the_protos_follow_buf_standard_lint_less_the_documented_exceptions() {
        let set = FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET).expect("descriptors");
        let mut problems = Vec::new();
        let mut checked = 0;
        for file in set
            .file
            .iter()
            .filter(|f| f.package().starts_with("berth."))
        {
            checked += 1;
            let package = file.package();
            let dir = file.name().rsplit_once('/').map_or("", |(d, _)| d);
            if dir != package.replace('.', "/") {
                problems.push(format!(
                    "{}: package {package} not in its directory",
                    file.name()
                ));
            }
            if !package
                .rsplit('.')
                .next()
                .is_some_and(|v| v.starts_with('v'))
            {
                problems.push(format!("{package}: no version suffix"));
            }
            if file.syntax() != "proto3" {
                problems.push(format!("{}: syntax is not proto3", file.name()));
            }
            for e in &file.enum_type {
                check_enum(e, &mut problems);
            }
            for m in &file.message_type {
                check_message(m, &mut problems);
            }
            for s in &file.service {
                if !pascal(s.name()) {
                    problems.push(format!("service {}: not PascalCase", s.name()));
                }
                for rpc in &s.method {
                    let input = rpc.input_type().rsplit('.').next().unwrap_or_default();
                    if !pascal(rpc.name()) {
                        problems.push(format!("rpc {}: not PascalCase", rpc.name()));
                    }
                    // buf.yaml's ignore_only: the node API's request names.
                    let exempt = package == "berth.node.v1";
                    if !exempt && input != format!("{}Request", rpc.name()) && input != "Empty" {
                        problems.push(format!(
                            "rpc {}.{}: request is {input}, not {}Request",
                            s.name(),
                            rpc.name(),
                            rpc.name()
                        ));
                    }
                }
            }
        }
        assert!(checked >= 5, "{checked} files");
        assert!(
            problems.is_empty(),
            "buf lint STANDARD:\n{}",
            problems.join("\n")
        );
    }
}
