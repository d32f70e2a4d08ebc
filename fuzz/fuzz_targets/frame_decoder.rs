//! Untrusted bytes from a client socket: the frame decoder, and for produce requests the
//! batch and record decoders behind it, must never panic or over-allocate.
#![no_main]

use flowgate_core::BatchView;
use flowgate_protocol::{check_frame, decode_request, decode_response, Request};
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
        let _ = decode_response(frame);
        rest = &rest[len..];
    }
});
