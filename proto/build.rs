//! Compiles `auth/v1/auth.proto` with protox (pure Rust, no `protoc`) and
//! writes the file descriptor set next to the generated code for reflection.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=auth/v1/auth.proto");
    let fds = protox::compile(["auth/v1/auth.proto"], ["."])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("auth_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(fds)?;
    Ok(())
}
