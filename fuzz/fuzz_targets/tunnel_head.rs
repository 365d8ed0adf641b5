//! The node tunnel's request and response heads: whatever a peer on port 15008 sends, parsing
//! must never panic, and a request that parses must mean the same when written back.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| mesh_node::proxy::tunnel::fuzz_head(data));
