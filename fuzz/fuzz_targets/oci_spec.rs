#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tern_runtime::fuzzing::guest_spec(data));
