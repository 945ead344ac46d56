//! The admin console's tokenizer and command parser: one command per Query, whatever the quotes.
#![no_main]

use admin::command::{parse, tokenize, Token};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let tokens = tokenize(text);
    let parsed = parse(text);
    // Two unquoted separators with something between them never parse as one command.
    if let Ok(t) = &tokens {
        let mut seen_semicolon = false;
        let mut two = false;
        for tok in t {
            match tok {
                Token::Semicolon => seen_semicolon = true,
                _ if seen_semicolon => two = true,
                _ => {}
            }
        }
        if two {
            assert!(parsed.is_err(), "{text:?} ran as {parsed:?}");
        }
    } else {
        assert!(parsed.is_err());
    }
});
