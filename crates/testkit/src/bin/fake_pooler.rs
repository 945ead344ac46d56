//! A stand-in for `breakwater` in the test kit's own tests: `--config <file>`, listens on the
//! file's `listen_port` on 127.0.0.1, logs what a test wants to check, and accepts and drops
//! connections until killed. It speaks no PostgreSQL.

use std::net::TcpListener;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let Some(config) = args
        .iter()
        .position(|arg| arg == "--config")
        .and_then(|i| args.get(i + 1))
    else {
        eprintln!("usage: testkit-fake-pooler --config <file>");
        return ExitCode::from(2);
    };
    let text = match std::fs::read_to_string(config) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("cannot read {config}: {e}");
            return ExitCode::from(2);
        }
    };
    let port = text.lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        (key.trim() == "listen_port").then(|| value.trim().parse::<u16>().ok())?
    });
    let Some(port) = port else {
        eprintln!("fatal: no listen_port in {config}");
        return ExitCode::from(2);
    };
    println!(
        "RUST_LOG={}",
        std::env::var("RUST_LOG").unwrap_or_else(|_| "<unset>".to_owned())
    );
    let listener = match TcpListener::bind(("127.0.0.1", port)) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("fatal: cannot listen on 127.0.0.1:{port}: {e}");
            return ExitCode::from(1);
        }
    };
    println!("listening on 127.0.0.1:{port}");
    for stream in listener.incoming() {
        drop(stream);
        println!("accepted a connection");
    }
    ExitCode::SUCCESS
}
