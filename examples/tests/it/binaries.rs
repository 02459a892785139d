//! The example binaries as an operator meets them: `--help` answers without
//! starting anything.

use crate::{Proc, command};

/// `--help` prints the usage and exits 0 at once: nothing is bound or
/// dialled (a binary that started serving would never exit and fail here).
#[test]
fn every_example_binary_answers_help_without_starting() {
    for (name, bin) in [
        ("order", env!("CARGO_BIN_EXE_order")),
        ("inventory", env!("CARGO_BIN_EXE_inventory")),
        ("demo", env!("CARGO_BIN_EXE_demo")),
        ("loadgen", env!("CARGO_BIN_EXE_loadgen")),
        ("floor", env!("CARGO_BIN_EXE_floor")),
        ("payments", env!("CARGO_BIN_EXE_payments")),
    ] {
        let mut cmd = command(bin);
        cmd.arg("--help");
        let mut proc = Proc::spawn(name, cmd);
        let status = proc.wait();
        let out = proc.output();
        assert!(status.success(), "{name} --help exited with {status}:\n{out}");
        assert!(out.contains("Usage:"), "{name} --help printed no usage:\n{out}");
        assert!(!out.contains("listening"), "{name} --help started serving:\n{out}");
    }
}
