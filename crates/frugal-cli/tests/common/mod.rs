//! What the end-to-end tests of the `frugal` binary share: scratch folders, commands and the
//! files of a run directory.
#![allow(dead_code)] // each test crate uses its own part

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const FAST: &[&str] = &[
    "--batch-size",
    "2",
    "--seq-len",
    "32",
    "--eval-tokens",
    "512",
    "--vocab-size",
    "512",
];

/// A test's own folder, removed when the test passes (kept for a look when it fails).
pub struct Scratch(pub PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for Scratch {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub fn scratch(name: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("frugal-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

pub fn frugal(cache: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_frugal"));
    c.env("FRUGAL_CACHE", cache);
    c
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    out
}

/// Runs `cmd` with `input` on its standard input; it must succeed.
pub fn run_with_input(cmd: &mut Command, input: &[u8]) -> Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Dropped after writing: the end of the input.
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `cmd`, which must fail with a message that names `named`.
pub fn run_fails(cmd: &mut Command, named: &str) -> Output {
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(named),
        "{:?} should fail naming `{named}`: {err}",
        cmd.get_args().collect::<Vec<_>>()
    );
    out
}

pub fn train(cache: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = frugal(cache);
    c.arg("train").args(FAST).arg("--out").arg(out).args(extra);
    c
}

pub fn metrics(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// (step, loss) of every logged training step.
pub fn losses(run: &Path) -> Vec<(u64, String)> {
    metrics(run)
        .iter()
        .filter(|v| v.get("loss").is_some())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].to_string()))
        .collect()
}

/// A JSON file's contents.
pub fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub fn summary(run: &Path) -> Value {
    json(&run.join("summary.json"))
}
