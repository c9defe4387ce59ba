//! (nodetunnel patch) Recycled buffers for packet-sized payloads.
//!
//! Each decrypted packet of at least half a buffer becomes its own `Bytes`:
//! the client's read buffer itself (`client::Session::maybe_decompress`,
//! which reads the next packet into a buffer from here), or a copy (the
//! server side, and every chunk an application writes to a channel through
//! `ChannelTx`). Both are about 32 KiB and live only until consumed, so
//! with the system allocator each one came from freshly faulted pages: a
//! `perf record -e page-faults` of a 1 GiB download found all of the
//! process's page faults (about 2.5 per packet) in that copy. Buffers of
//! that size are taken from and given back to a small shared free list
//! instead; the `Bytes` handed out returns its buffer when its last clone
//! is dropped.
//!
//! Smaller payloads get a buffer of their own size: a 36 KiB buffer held
//! for a 5 KiB packet would multiply the memory a stalled stream holds
//! (up to one receive window of packets) by seven.
//!
//! Memory: at most [`MAX_FREE`] x [`CAPACITY`] bytes (2.3 MiB) are kept free
//! after a burst; buffers beyond that are released to the allocator.

use std::sync::Mutex;

use bytes::Bytes;

/// Capacity of a pooled buffer: a maximum-size packet (32 KiB of data plus
/// headers) fits.
pub(crate) const CAPACITY: usize = 36 * 1024;
/// Below this a payload gets a buffer of its own size (see the module
/// docs): half a pooled buffer.
pub(crate) const MIN_POOLED: usize = CAPACITY / 2;
/// Free buffers kept at most.
pub(crate) const MAX_FREE: usize = 64;

static FREE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A pooled buffer inside a `Bytes`; gives the buffer back when dropped.
struct Pooled(Vec<u8>);

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let mut buf = std::mem::take(&mut self.0);
        buf.clear();
        if let Ok(mut free) = FREE.lock() {
            if free.len() < MAX_FREE {
                free.push(buf);
            }
        }
    }
}

/// `data` copied into a `Vec`, a recycled one when it is packet-sized (it
/// goes back to the pool only through [`into_bytes`]).
pub(crate) fn vec_copy(data: &[u8]) -> Vec<u8> {
    if data.len() < MIN_POOLED || data.len() > CAPACITY {
        return data.to_vec();
    }
    let mut buf = take();
    buf.extend_from_slice(data);
    buf
}

/// An empty buffer of [`CAPACITY`], a recycled one if the pool has one (it
/// goes back to the pool only through [`into_bytes`]).
pub(crate) fn take() -> Vec<u8> {
    FREE.lock()
        .ok()
        .and_then(|mut free| free.pop())
        .unwrap_or_else(|| Vec::with_capacity(CAPACITY))
}

/// `buf` as a `Bytes` that gives it back to the pool when the last clone is
/// dropped, if it is one of the pool's buffers.
pub(crate) fn into_bytes(buf: Vec<u8>) -> Bytes {
    if buf.capacity() == CAPACITY {
        Bytes::from_owner(Pooled(buf))
    } else {
        Bytes::from(buf)
    }
}

/// `data` copied into a `Bytes`, in a recycled buffer when it is
/// packet-sized.
pub(crate) fn copy(data: &[u8]) -> Bytes {
    into_bytes(vec_copy(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_exact_and_buffers_come_back() {
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let a = copy(&data);
        let b = a.slice(100..200);
        assert_eq!(&a[..], &data[..]);
        drop(a);
        assert_eq!(&b[..], &data[100..200]);
        let before = FREE.lock().unwrap().len();
        drop(b);
        assert!(FREE.lock().unwrap().len() >= before.min(MAX_FREE - 1));
        let small = copy(b"tiny");
        assert_eq!(&small[..], b"tiny");
    }
}
