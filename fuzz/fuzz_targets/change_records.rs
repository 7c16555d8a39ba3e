#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tern_agent::mirror::fuzzing::change_records(data));
