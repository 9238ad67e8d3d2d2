//! The protocol state machine fed arbitrary bytes as if from a broker, under MQTT 3.1.1 and 5, with
//! some publishes of our own in flight: decoding and handling must never panic, every incoming
//! message can be released, and what the engine writes must decode again.
#![no_main]

use _core::session::codec::{Codec, Version};
use _core::session::proto::{Engine, Output, Outgoing, Settings};
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use std::time::{Duration, Instant};

fn run(version: Version, data: &[u8]) {
    let now = Instant::now();
    let mut engine: Engine<u32, u32> = Engine::new(
        Settings {
            version,
            client_id: "fuzz".to_owned(),
            keepalive: Duration::from_secs(5),
            clean: false,
            inflight: 8,
            receive_maximum: 8,
            max_incoming: 64 * 1024,
            max_outgoing: 64 * 1024,
        },
        now,
    );
    engine.connect(None, now);
    let mut written = engine.take_output();
    // A CONNACK first, so that the rest of the bytes meet a connected engine.
    let mut input = BytesMut::from(&[0x20u8, 0x02, 0x00, 0x00][..]);
    if version == Version::V5 {
        input = BytesMut::from(&[0x20u8, 0x03, 0x00, 0x00, 0x00][..]);
    }
    input.extend_from_slice(data);
    let mut tag = 0u32;
    let mut step = 0u64;
    loop {
        step += 1;
        let at = now + Duration::from_millis(step * 100);
        while engine.has_window() && tag < 4 {
            let message = Outgoing {
                topic: "a/b".to_owned(),
                payload: Bytes::from_static(b"x"),
                qos: (tag % 3) as u8,
                retain: false,
            };
            let _ = engine.publish(message, tag, at);
            tag += 1;
        }
        let packet = match engine.decode(&mut input) {
            Ok(Some(packet)) => packet,
            Ok(None) | Err(_) => break,
        };
        if engine.handle(packet, at).is_err() {
            break;
        }
        while let Some(output) = engine.poll_output() {
            if let Output::Message(publish) = output {
                if publish.qos > 0 {
                    engine.release(publish.pkid, at);
                }
            }
        }
        let _ = engine.tick(at);
        written.extend_from_slice(&engine.take_output());
    }
    let codec = Codec {
        version,
        max_incoming: usize::MAX,
    };
    while let Some(_packet) = codec.decode(&mut written).expect("what we write decodes") {}
    assert!(written.is_empty(), "what we write is whole packets");
}

fuzz_target!(|data: &[u8]| {
    run(Version::V311, data);
    run(Version::V5, data);
});
