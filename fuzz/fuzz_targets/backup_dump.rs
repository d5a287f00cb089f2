//! The whole backup download (`GET /room_keys/keys`), as restore parses it from its spool.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(items) = mxhsm::account::restore::parse_backup(data) {
        // The order restore relies on to resume: sorted by room, then session.
        for w in items.windows(2) {
            assert!((&w[0].room_id, &w[0].session_id) < (&w[1].room_id, &w[1].session_id));
        }
    }
});
