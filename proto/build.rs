//! Compiles `auth/v1/auth.proto` with protox (pure Rust, no `protoc`) and
//! writes the file descriptor set next to the generated code for reflection.
//!
//! Two passes: the messages and the server, whose requests decode with
//! `codec::ServerCodec` (src/codec.rs: a request that does not decode is
//! `INVALID_ARGUMENT`), then the client alone, on the same messages, with
//! tonic-prost's codec (a response that does not decode stays `INTERNAL`).

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=auth/v1/auth.proto");
    let fds = protox::compile(["auth/v1/auth.proto"], ["."])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("auth_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(false)
        .codec_path("crate::codec::ServerCodec")
        .compile_fds(fds.clone())?;
    let client_dir = out_dir.join("client");
    std::fs::create_dir_all(&client_dir)?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .extern_path(".auth.v1", "crate::auth::v1")
        .out_dir(&client_dir)
        .compile_fds(fds)?;
    Ok(())
}
