//! Verify benchmarks (being written).
fn main() {}
