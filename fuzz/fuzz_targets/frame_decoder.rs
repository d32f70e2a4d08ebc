//! Untrusted bytes from a client socket: the frame decoder, and for produce requests the
//! batch and record decoders behind it, must never panic or over-allocate; and whatever
//! decodes (topic settings and descriptions included) encodes back to a frame that
//! decodes to the same.
#![no_main]

use flowgate_core::BatchView;
use flowgate_protocol::{check_frame, decode_request, decode_response, encode_request, encode_response, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let mut scratch = Vec::new();
    while let Ok(Some(len)) = check_frame(rest, 1 << 20) {
        let frame = &rest[..len];
        if let Ok((_, Request::Produce { batch, .. })) = decode_request(frame) {
            if let Ok((view, _)) = BatchView::parse(batch) {
                if let Ok(records) = view.records(&mut scratch) {
                    for r in records {
                        if let Ok(r) = r {
                            let _ = r.headers().count();
                        }
                    }
                }
            }
        }
        if let Ok((id, request)) = decode_request(frame) {
            if let Request::CreateTopic { settings, .. } | Request::AlterTopic { settings, .. } = &request {
                assert!(settings.len() <= 3);
            }
            let mut again = Vec::new();
            encode_request(id, &request, &mut again);
            assert_eq!(decode_request(&again), Ok((id, request)));
        }
        if let Ok((id, response)) = decode_response(frame) {
            let mut again = Vec::new();
            encode_response(id, &response, &mut again);
            assert_eq!(decode_response(&again), Ok((id, response)));
        }
        rest = &rest[len..];
    }
});
