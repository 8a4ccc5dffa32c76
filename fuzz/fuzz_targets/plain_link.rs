#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vsm::fuzz::plain_link(data));
