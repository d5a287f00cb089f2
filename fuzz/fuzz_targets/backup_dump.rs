//! The whole backup download (`GET /room_keys/keys`), as restore parses it while it
//! downloads.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(items) = mxhsm::account::restore::parse_backup(data) {
        // What streams must be what a whole parse sees: every session of every room (a
        // key the server sent twice streams twice; a whole parse keeps one).
        // serde_json skips a string it ignores without checking its UTF-8, so a document
        // whose only invalid bytes sit in keys restore does not read streams and yet is no
        // `Value`: nothing of it was taken, and there is nothing to compare.
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
            return;
        };
        let sessions = v["rooms"]
            .as_object()
            .map(|rooms| {
                rooms
                    .values()
                    .filter_map(|r| r["sessions"].as_object())
                    .map(|s| s.len())
                    .sum::<usize>()
            })
            .unwrap_or(0);
        assert!(items.len() >= sessions);
    }
});
