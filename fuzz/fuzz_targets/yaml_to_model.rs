//! Arbitrary bytes through the file source's decoder (YAML or JSON → typed model), then
//! through snapshot assembly: nothing may panic, and every rejection names a field and a reason.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_node::source::{assemble, file::parse_documents};

fuzz_target!(|data: &[u8]| {
    // The file name decides the parser, as in the file source.
    for name in ["input.yaml", "input.json"] {
        let results = parse_documents(name, data);
        let mut objects = Vec::new();
        for (_, result) in results {
            match result {
                Ok(object) => objects.push(object),
                Err(invalid) => assert!(!invalid.field.is_empty() && !invalid.reason.is_empty()),
            }
        }
        let _ = assemble(&objects, None);
    }
});
