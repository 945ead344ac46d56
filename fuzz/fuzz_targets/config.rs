//! The binary's config file parser (TOML, then validation), compiled here as a module with the
//! pgbouncer.rs it uses: the binary has no library target.
#![no_main]

use libfuzzer_sys::fuzz_target;

// The binary's source directory, so that config.rs finds its own `config/value.rs`.
#[allow(dead_code)]
#[path = "../../crates/breakwater/src"]
mod bw {
    pub mod config;
    pub mod pgbouncer;
}
// config.rs names it as `crate::pgbouncer`.
use bw::{config, pgbouncer};

/// The config is read from a file, as the binary does (`Config::parse` is for tests only); a
/// directory of its own in /dev/shm keeps that cheap and any auth_file it names absent.
fn config_path() -> &'static std::path::Path {
    static PATH: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::path::PathBuf::from(format!("/dev/shm/breakwater-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a directory for the fuzzed config");
        dir.join("pooler.toml")
    })
}

fuzz_target!(|data: &[u8]| {
    let path = config_path();
    if std::fs::write(path, data).is_err() {
        return;
    }
    let layers = config::Layers {
        file: Some(path.to_owned()),
        ..config::Layers::default()
    };
    if let Ok(c) = config::Config::load(&layers) {
        let _ = c.show();
        let _ = c.proxy_settings();
    }
});
