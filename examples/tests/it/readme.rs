//! README.md, "Add a service", followed as written: the commands of its
//! shell block run in order (the binaries `cargo run` would build, in a
//! fresh directory, on free ports), with the environment `dev add-service`
//! printed, and the service code it shows is `examples/src/bin/payments.rs`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::{PATIENCE, Proc, auth_server_binary, command, free_port};

/// The README's "Add a service" section.
fn section() -> String {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let start = readme.find("\n## Add a service\n").expect("README has an \"Add a service\" section");
    let rest = &readme[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 3);
    rest[..end].to_owned()
}

/// The fenced blocks of `lang` in `text`, in order.
fn blocks(text: &str, lang: &str) -> Vec<String> {
    let open = format!("```{lang}\n");
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(&open) {
        let body = &rest[i + open.len()..];
        let end = body.find("\n```").expect("closed code block");
        out.push(body[..end + 1].to_owned());
        rest = &body[end + 4..];
    }
    out
}

#[test]
fn the_readme_shows_the_payments_service_verbatim() {
    let shown = blocks(&section(), "rust");
    let file = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/bin/payments.rs")).unwrap();
    assert_eq!(shown.len(), 1, "one Rust block in \"Add a service\"");
    assert!(shown[0] == file, "README.md's payments code differs from examples/src/bin/payments.rs: copy the file");
}

/// Waits until `proc` printed `text`; panics (with its output) if it exits
/// or takes longer than [`PATIENCE`].
fn wait_for(proc: &mut Proc, text: &str) {
    let start = Instant::now();
    while !proc.output().contains(text) {
        proc.assert_running();
        assert!(start.elapsed() < PATIENCE, "{} never printed {text:?}:\n{}", proc.name, proc.output());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `export K=V` lines of `printed`.
fn exports(printed: &str) -> BTreeMap<String, String> {
    printed
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('\'').to_owned()))
        .collect()
}

#[test]
fn add_a_service_as_the_readme_says_and_call_it_as_a_user() {
    let block = blocks(&section(), "sh").into_iter().next().expect("a shell block in \"Add a service\"");
    let dir = tempfile::tempdir().unwrap();
    let (grpc, http, inventory_port, payments_port) = (free_port(), free_port(), free_port(), free_port());
    let auth_url = format!("https://127.0.0.1:{grpc}");
    // What the shell block's later steps run with: the defaults, moved to
    // free ports.
    let ports = [
        ("AUTH_URL", auth_url.clone()),
        ("LISTEN", format!("127.0.0.1:{inventory_port}")),
        ("INVENTORY_URL", format!("https://127.0.0.1:{inventory_port}")),
    ];
    let mut service_env: BTreeMap<String, String> = BTreeMap::new();
    let mut running: Vec<Proc> = Vec::new();
    let mut server_pid = None;
    let mut charged = None;

    for line in block.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let args: Vec<&str> = words.iter().position(|w| *w == "--").map_or(vec![], |i| words[i + 1..].to_vec());
        match words.as_slice() {
            ["cargo", "run", "-p", "auth-server", "--", "dev"] => {
                let mut cmd = command(auth_server_binary());
                cmd.current_dir(dir.path()).args(["dev", "--grpc-addr", &format!("127.0.0.1:{grpc}")]);
                cmd.args(["--http-addr", &format!("127.0.0.1:{http}")]);
                let mut proc = Proc::spawn("auth-server dev", cmd);
                wait_for(&mut proc, "auth-server listening");
                server_pid = Some(proc.child.id());
                running.push(proc);
            }
            ["cargo", "run", "-p", "auth-server", "--", ..] => {
                let mut cmd = command(auth_server_binary());
                cmd.current_dir(dir.path()).args(&args);
                let mut proc = Proc::spawn("auth-server dev add-…", cmd);
                assert!(proc.wait().success(), "{line}:\n{}", proc.output());
                service_env.extend(exports(&proc.output()));
            }
            ["kill", "-HUP", ..] => {
                let pid = server_pid.expect("the dev server runs").to_string();
                assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
                wait_for(running.first_mut().unwrap(), "policy reloaded");
            }
            ["cargo", "run", "-p", "examples", "--bin", name, rest @ ..] => {
                let bin = match *name {
                    "inventory" => env!("CARGO_BIN_EXE_inventory"),
                    "payments" => env!("CARGO_BIN_EXE_payments"),
                    other => panic!("README runs an unknown example binary {other}"),
                };
                let mut cmd = command(bin);
                cmd.current_dir(dir.path()).args(&args).envs(ports.iter().map(|(k, v)| (*k, v.as_str())));
                if *name == "payments" {
                    // The lines add-service printed, pasted as the README says.
                    assert_eq!(service_env.get("AUTH_URL"), Some(&auth_url), "add-service names this server");
                    cmd.envs(&service_env).env("LISTEN", format!("127.0.0.1:{payments_port}"));
                    cmd.env("PAYMENTS_URL", format!("https://127.0.0.1:{payments_port}"));
                }
                let label = if *name == "inventory" { "inventory" } else { "payments" };
                let mut proc = Proc::spawn(label, cmd);
                if rest.is_empty() {
                    wait_for(&mut proc, "listening");
                    running.push(proc);
                } else {
                    let status = proc.wait();
                    assert!(status.success(), "{line}:\n{}", proc.output());
                    charged = Some(proc.output());
                }
            }
            _ => panic!("the test does not know how to run this README line: {line}"),
        }
    }

    let charged = charged.expect("the README calls payments");
    println!("{charged}");
    assert!(
        charged.contains(r#"inventory saw sub=carol act=["svc:payments"]"#),
        "inventory saw carol with payments acting for her:\n{charged}"
    );
    for mut proc in running {
        proc.assert_running();
    }
}
