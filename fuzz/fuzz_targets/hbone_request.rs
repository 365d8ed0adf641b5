//! The HBONE server's parsers of what a peer sends: the `CONNECT` target and the `forwarded`
//! claim (`authority\nforwarded`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| mesh_node::proxy::hbone::fuzz_request(data));
