#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vsm::fuzz::secure_handshake(data));
