//! Statement analysis (`routing::analyze::analyze`): any text a client sends in a Query
//! or Parse reaches it, including what sqlparser cannot parse. It must classify
//! everything, never panic, and answer the same for the same text (the analysis cache
//! relies on it).
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardgate::routing::analyze::analyze;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    assert_eq!(analyze(&text), analyze(&text));
});
