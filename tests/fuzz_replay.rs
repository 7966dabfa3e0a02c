//! The fuzz corpus replay: every input kept under tests/fuzz/seeds and
//! tests/fuzz/corpus (inputs the fuzzers found interesting, and any that
//! once failed) runs through the same target bodies as `scripts/fuzz`.

#[path = "fuzz/fuzz_targets/common.rs"]
mod fuzz;

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz");
    let mut n = 0;
    for dir in [
        root.join("seeds").join(target),
        root.join("corpus").join(target),
    ] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let data = std::fs::read(e.path()).unwrap();
            run(&data);
            n += 1;
        }
    }
    n
}

#[test]
fn stanza_corpus() {
    assert!(replay("stanza", fuzz::stanza) > 0);
}

#[test]
fn adhoc_corpus() {
    assert!(replay("adhoc", fuzz::adhoc) > 0);
}

#[test]
fn address_corpus() {
    assert!(replay("address", fuzz::address) > 0);
}
