//! CI's check that the benchmark harness still works end to end: `breakwater-bench --smoke`
//! against the breakwater binary of this build (one 2 s pgbench run per target, 200 idle
//! clients), with results written to a temp dir. PgBouncer takes part only where it is installed.

use std::path::PathBuf;
use std::process::Command;

/// target/<profile>/breakwater, beside this test's own target/<profile>/deps/ directory. Cargo
/// builds it for any workspace-wide test run (the e2e tests need it).
fn breakwater_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary lives in target/<profile>/deps");
    profile_dir.join("breakwater")
}

#[test]
fn the_smoke_run_measures_every_target_and_writes_its_report() {
    let breakwater = breakwater_bin();
    assert!(
        breakwater.is_file(),
        "{} is missing: build it first (`cargo build -p breakwater`; `cargo test --workspace` does)",
        breakwater.display()
    );
    let out = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_breakwater-bench"))
        .arg("--smoke")
        .arg("--breakwater")
        .arg(&breakwater)
        .arg("--out")
        .arg(out.path())
        .output()
        .expect("running breakwater-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "breakwater-bench --smoke failed ({}):\n{stderr}\n{stdout}",
        output.status
    );
    for expected in [
        "| select-simple-c16 | `-S -M simple -c 16` | direct |",
        "| select-simple-c16 | `-S -M simple -c 16` | breakwater |",
        "| breakwater | 200 |",
    ] {
        assert!(stdout.contains(expected), "no {expected:?} in:\n{stdout}");
    }
    let files: Vec<String> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for suffix in ["-runs.csv", "-summary.csv", "-memory.csv", ".md"] {
        assert!(
            files.iter().any(|f| f.ends_with(suffix)),
            "no *{suffix} in {files:?}"
        );
    }
}
