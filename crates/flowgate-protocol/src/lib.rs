//! flowgate's binary protocol, versions 1 to 3 (`docs/protocol.md`).
//!
//! - [`check_frame`]: is a whole frame in the buffer? Looks only at the length prefix,
//!   so an oversized frame is refused before anything is allocated for it.
//! - [`decode_request`] / [`decode_response`]: parse a whole frame, borrowing strings
//!   and batches from it.
//! - [`encode_request`] / [`encode_response`]: append a whole frame to a buffer, so
//!   many frames can share one write; [`encode_fetch_ok_head`] lets a large FETCH_OK be
//!   written from the buffer its batches were read into.
//!
//! Decoders take untrusted bytes: they never panic, reject trailing bytes, bad UTF-8
//! and unknown kinds, never reserve memory for a count the frame cannot hold, and say
//! what was wrong.

#![warn(missing_docs)]

mod codec;
mod topic_admin;

pub use codec::{
    check_frame, decode_request, decode_response, encode_fetch_ok_head, encode_request, encode_response, ErrorCode,
    PartitionAck, PartitionInfo, ProtocolError, Request, Response, TopicInfo, DEFAULT_MAX_FRAME_BYTES,
    FRAME_HEADER_LEN, MAGIC, MIN_VERSION, VERSION,
};
pub use topic_admin::{
    ConsumerOffset, PartitionDetail, Setting, SettingSource, SettingUpdate, SettingValue, TopicDescription,
};
