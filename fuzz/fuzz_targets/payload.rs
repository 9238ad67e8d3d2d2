//! Payloads: any bytes as a raw-tree message, a field push, a measurement push, a command, an ISO 8601
//! text, and a push republished as Capture would. Nothing may panic; a parsed raw point must go into
//! an Arrow batch.
#![no_main]

use _core::{columnar, payload, timestamp};
use libfuzzer_sys::fuzz_target;

const RAW: &str = "v1/raw/AcmeCorp/5b0f2c1e/Conn/Measurement/Key";
const PUSH: &str = "v1/sources/5b0f2c1e/data/read/Conn/Measurement";

fuzz_target!(|data: &[u8]| {
    if let Ok(point) = payload::parse_raw(RAW, data, 0) {
        let batch = columnar::build(
            &[point],
            &columnar::BatchOptions {
                tag_columns: vec!["MachineName".to_owned()],
            },
        )
        .expect("a parsed point always fits the schema");
        assert_eq!(batch.num_rows(), 1);
    }
    let _ = payload::parse_field(data);
    let _ = payload::parse_measurement(data);
    let _ = payload::parse_command("v1/sources/5b0f2c1e/cmd/writedata", data);
    let _ = payload::to_raw("AcmeCorp", PUSH, data, 0);
    let _ = payload::to_raw("AcmeCorp", &format!("{PUSH}/Key"), data, 0);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = timestamp::parse_iso8601(text);
    }
});
