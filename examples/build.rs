//! Compiles the example services' proto with protox (no `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/shop/v1/shop.proto");
    let fds = protox::compile(["shop/v1/shop.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
