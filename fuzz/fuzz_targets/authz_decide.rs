//! AuthorizationPolicy decisions on arbitrary policies and requests: matching never panics,
//! and no verdict names a policy that could not have given it.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| mesh_node::model::authz::fuzz_decide(data));
