//! Route selection on arbitrary resources and requests: VirtualService, HTTPRoute and
//! GRPCRoute matching, rewrites, redirects, header changes and weighted picks must never panic.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| mesh_node::proxy::route::fuzz_select(data));
