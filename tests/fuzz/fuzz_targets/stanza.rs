//! cargo-fuzz target `stanza`; the body is in common.rs.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| common::stanza(data));
