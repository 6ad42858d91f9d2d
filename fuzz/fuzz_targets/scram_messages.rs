//! The server half of SCRAM-SHA-256: client-first-message and client-final-message
//! parsers, fed attacker-chosen bytes before any password is proven. The input is split
//! at the first NUL: the part before is a client-first-message, the part after a
//! client-final-message for the exchange it started (or for a well-formed one, when the
//! first part is rejected), so both parsers see arbitrary bytes.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use shardgate::protocol::scram::{server_first, ScramSecret};

/// Deriving a secret costs 4096 PBKDF2 rounds: once per process, not per input.
fn secret() -> &'static ScramSecret {
    static SECRET: OnceLock<ScramSecret> = OnceLock::new();
    SECRET.get_or_init(|| ScramSecret::new("fuzz"))
}

fuzz_target!(|data: &[u8]| {
    let (first, last) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let secret = secret();
    let exchange = match server_first(secret, first) {
        Ok((exchange, _)) => exchange,
        Err(_) => match server_first(secret, b"n,,n=,r=fuzznonce") {
            Ok((exchange, _)) => exchange,
            Err(error) => panic!("a well-formed client-first-message was refused: {error}"),
        },
    };
    // Without the password no input may pass: a proof needs the client key.
    assert!(exchange.server_final(secret, last).is_err());
});
