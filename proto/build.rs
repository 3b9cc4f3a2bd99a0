//! Compiles the .proto files with protox (pure Rust, no protoc) and feeds the
//! descriptors to tonic-prost-build. The descriptor set is also written out for
//! gRPC reflection and the HTTP/JSON API (with the methods' `google.api.http`
//! options).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/berth/v1/sessions.proto",
        "proto/berth/v1/agents.proto",
        "proto/berth/v1/nodes.proto",
        "proto/berth/v1/access.proto",
        "proto/berth/v1/schedules.proto",
        "proto/berth/v1/webhooks.proto",
        "proto/berth/v1/audit.proto",
        "proto/berth/node/v1/agent_server.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    for f in [
        "proto/google/api/http.proto",
        "proto/google/api/annotations.proto",
    ] {
        println!("cargo:rerun-if-changed={f}");
    }
    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler
        .include_imports(true)
        .include_source_info(true)
        .open_files(files)?;
    let fds = compiler.file_descriptor_set();
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // Encoded by protox itself: `prost_types` drops the methods'
    // `google.api.http` options, which the HTTP/JSON API is built from.
    std::fs::write(
        out.join("berth_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    tonic_prost_build::configure()
        .build_client(cfg!(feature = "client"))
        .build_server(cfg!(feature = "server"))
        // `Sessions.Connect` would clash with the generated `connect()` constructor;
        // callers build a `Channel` themselves and use `new(channel)`.
        .build_transport(false)
        // Small per-call buffers: see `src/codec.rs`.
        .codec_path("crate::codec::LeanCodec")
        // `prost::Name` on every message: clients print proto3 JSON by
        // looking a message's full name up in the descriptors.
        .compile_fds_with_config(fds, {
            let mut config = prost_build::Config::new();
            config.enable_type_names();
            // A frame's size is its largest variant's: the start (with the
            // whole spec) would make every frame, and each slot of a
            // channel of frames, 700 bytes.
            config.boxed(".berth.node.v1.DispatcherFrame.kind.start");
            config
        })?;
    Ok(())
}
