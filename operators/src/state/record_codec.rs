//! zstd compression of stored records with one compression and one
//! decompression context per thread.
//!
//! `zstd::bulk::compress` and `zstd::stream::decode_all` allocate and
//! initialise a fresh zstd context on every call; with one call per record
//! that was about 10 % of a replay run's CPU time (`ZSTD_createCCtx` and
//! `ZSTD_createDCtx` in a profile of `bench pipeline`). The contexts are
//! reused here instead. The bytes are the same as before (same level, same
//! frame format), so stores written by either version read back alike.

use std::cell::RefCell;
use std::io;

/// zstd level of stored records (fast: records are compressed on the
/// workers while the dataflow runs).
const LEVEL: i32 = 1;

/// The largest record a frame header may announce before decoding falls
/// back to the growing stream decoder (records are kilobytes; a header from
/// a damaged store must not decide an allocation).
const MAX_PREALLOCATED: u64 = 16 << 20;

thread_local! {
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Compresses one record's bytes (a zstd frame with its content size).
pub(crate) fn compress(bytes: &[u8]) -> io::Result<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let compressor = match slot.as_mut() {
            Some(c) => c,
            None => slot.insert(zstd::bulk::Compressor::new(LEVEL)?),
        };
        compressor.compress(bytes)
    })
}

/// Decompresses one stored frame.
pub(crate) fn decompress(frame: &[u8]) -> io::Result<Vec<u8>> {
    let size = match zstd::zstd_safe::get_frame_content_size(frame) {
        Ok(Some(n)) if n <= MAX_PREALLOCATED => n as usize,
        // No size in the header, or an implausible one: the stream decoder
        // grows its buffer as the data really decodes.
        _ => return zstd::stream::decode_all(frame),
    };
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let decompressor = match slot.as_mut() {
            Some(d) => d,
            None => slot.insert(zstd::bulk::Decompressor::new()?),
        };
        decompressor.decompress(frame, size)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_match_the_one_shot_functions() {
        let record = br#"{"query":{"query_id":1},"answers":["a","b"]}"#.repeat(40);
        let frame = compress(&record).unwrap();
        assert_eq!(frame, zstd::bulk::compress(&record, LEVEL).unwrap());
        assert_eq!(decompress(&frame).unwrap(), record);
        // A second call reuses the thread's contexts.
        assert_eq!(decompress(&compress(b"x").unwrap()).unwrap(), b"x");
    }

    #[test]
    fn frames_without_a_size_and_garbage_are_handled() {
        let streamed = zstd::stream::encode_all(&b"streamed record"[..], 3).unwrap();
        assert_eq!(decompress(&streamed).unwrap(), b"streamed record");
        assert!(decompress(b"not a zstd frame").is_err());
        // A truncated frame is an error, not a short record.
        let mut frame = compress(&[7u8; 1000]).unwrap();
        frame.truncate(frame.len() / 2);
        assert!(decompress(&frame).is_err());
    }
}
