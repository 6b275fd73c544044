//! Read buffers kept per worker thread between requests.
//!
//! The relay reads a client's request head into a 4 KiB buffer and a node's answer into a
//! 128 KiB one, and lets go of both when the request ends, so that a connection waiting for its
//! next request holds no buffer; the HTTP/2 server reads into a 16 KiB one, which it lets go of
//! whenever the connection has no stream open. Allocations that large leave the allocator's fast
//! path (which mimalloc keeps for blocks up to 1 KiB): taking them from a short list of spares
//! instead saves a few hundred instructions per buffer, per request. Each worker keeps at most
//! [`HEAD_SPARES`] head buffers, [`NODE_SPARES`] node buffers and [`H2_READ_SPARES`] HTTP/2 read
//! buffers, so the memory this holds is bounded per worker, not per connection.
//!
//! A buffer comes back only if nothing else shares its memory (no `Bytes` split from it is
//! alive): [`BytesMut::try_reclaim`] says so, without copying.

use std::cell::RefCell;

use bytes::BytesMut;

/// Size of a client's request head buffer.
pub const HEAD_BUF: usize = 4096;
/// Size of a node's answer buffer: room for a 64 KiB body and its head in one read, so such an
/// answer costs one read and one write.
pub const NODE_BUF: usize = 128 * 1024;
/// Size of an HTTP/2 connection's read buffer: a frame of the default maximum size (16 KiB) and
/// its 9-byte head.
pub const H2_READ_BUF: usize = 16 * 1024 + 9;
/// Head buffers kept per worker (128 KiB).
const HEAD_SPARES: usize = 32;
/// Node buffers kept per worker (512 KiB).
const NODE_SPARES: usize = 4;
/// HTTP/2 read buffers kept per worker (about 130 KiB).
const H2_READ_SPARES: usize = 8;

thread_local! {
    static HEADS: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    static NODES: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    static H2_READS: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

type Spares = std::thread::LocalKey<RefCell<Vec<BytesMut>>>;

/// An empty buffer with room for [`HEAD_BUF`] bytes.
pub fn head_buf() -> BytesMut {
    take(&HEADS, HEAD_BUF)
}

/// An empty buffer with room for [`NODE_BUF`] bytes.
pub fn node_buf() -> BytesMut {
    take(&NODES, NODE_BUF)
}

/// An empty buffer with room for [`H2_READ_BUF`] bytes.
pub fn h2_read_buf() -> BytesMut {
    take(&H2_READS, H2_READ_BUF)
}

/// Gives back a buffer from [`h2_read_buf`] once its bytes are no longer needed.
pub fn give_h2_read(buf: BytesMut) {
    give(&H2_READS, buf, H2_READ_BUF, H2_READ_SPARES);
}

/// Gives back a buffer from [`head_buf`] once its bytes are no longer needed.
pub fn give_head(buf: BytesMut) {
    give(&HEADS, buf, HEAD_BUF, HEAD_SPARES);
}

/// Gives back a buffer from [`node_buf`] once its bytes are no longer needed.
pub fn give_node(buf: BytesMut) {
    give(&NODES, buf, NODE_BUF, NODE_SPARES);
}

fn take(list: &'static Spares, size: usize) -> BytesMut {
    list.with(|l| l.borrow_mut().pop()).unwrap_or_else(|| BytesMut::with_capacity(size))
}

fn give(list: &'static Spares, mut buf: BytesMut, size: usize, keep: usize) {
    // Only a buffer of this kind: one that grew (a large head) is not kept at its new size.
    if buf.capacity() == 0 {
        return;
    }
    buf.clear();
    if !buf.try_reclaim(size) || buf.capacity() > size {
        return;
    }
    list.with(|l| {
        let mut l = l.borrow_mut();
        if l.len() < keep {
            l.push(buf);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_comes_back_whole_once_nothing_shares_it() {
        let mut b = node_buf();
        let p = b.as_ptr();
        b.extend_from_slice(b"HTTP/1.1 200 OK\r\n\r\nbody");
        let body = b.split_off(19).freeze();
        give_node(b);
        // `body` still uses the buffer's memory: it was not kept.
        let c = node_buf();
        assert_ne!(c.as_ptr(), p);
        drop(body);
        give_node(c);
        let d = node_buf();
        assert_eq!(d.capacity(), NODE_BUF);
        assert!(d.is_empty());
    }

    #[test]
    fn a_buffer_is_reused_from_its_start() {
        let mut b = head_buf();
        let p = b.as_ptr();
        b.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        bytes::Buf::advance(&mut b, 18);
        give_head(b);
        let c = head_buf();
        assert_eq!(c.as_ptr(), p);
        assert_eq!(c.capacity(), HEAD_BUF);
    }

    #[test]
    fn a_buffer_that_grew_is_not_kept() {
        let mut b = head_buf();
        b.extend_from_slice(&[b'x'; HEAD_BUF + 1]);
        give_head(b);
        assert!(head_buf().capacity() <= HEAD_BUF);
    }
}
