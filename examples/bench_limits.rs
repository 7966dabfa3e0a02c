//! The floor under the other benchmarks: what the parts redeliver is
//! built on cost on this machine, measured alone (see `floor/mod.rs`).
//!
//! `bash scripts/bench` runs it. Not a test.

#[path = "floor/mod.rs"]
mod floor;

use floor::*;

fn main() {
    let n = 50_000;
    println!("the parts alone, one core:");
    println!("| part | figure |");
    println!("|---|---|");
    let one = sled_rate(1, n, false);
    println!("| sled, one accept's 6 keys, a batch per message | {one:.0} messages/s |");
    let grouped = sled_rate(256, n, false);
    println!("| sled, the same, 256 messages per batch | {grouped:.0} messages/s |");
    let life = sled_rate(256, n, true);
    println!(
        "| sled, accept and later removal (10 keys), 256 messages per batch | {life:.0} messages/s |"
    );
    let ms = flush_ms(200);
    println!(
        "| sled flush (fsync) after one small write | {ms:.2} ms ({:.0} per second) |",
        1000.0 / ms
    );
    let parse = parse_us(n as u32);
    println!(
        "| XML in: stanza text to `Message` ({} bytes) | {parse:.1} µs |",
        STANZA.len()
    );
    let write = write_us(n as u32);
    println!("| XML out: `Message` to stanza text | {write:.1} µs |");
    let f = Floor {
        sled_life_rate: life,
        parse_us: parse,
        write_us: write,
    };
    println!(
        "| the floor per relayed and confirmed message | {:.1} µs |",
        f.per_message_us()
    );
}
