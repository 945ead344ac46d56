//! The binary's config file parser (TOML, then validation), compiled here as a module: the
//! binary has no library target. The path names no directory that exists, so an auth_file or
//! TLS file it names fails to load rather than touching the disk.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../crates/breakwater/src/config.rs"]
mod config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = std::path::Path::new("/nonexistent-breakwater-fuzz/pooler.toml");
    if let Ok(c) = config::Config::parse(path, text) {
        let _ = c.show();
        let _ = c.proxy_settings();
    }
});
