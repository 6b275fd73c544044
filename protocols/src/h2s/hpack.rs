//! HPACK (RFC 7541): the header compression of HTTP/2, both directions of a server connection.
//!
//! The [`Decoder`] turns a client's header blocks into names and values. It keeps the client's
//! dynamic table, whose entries are shared `Bytes`, so a header the client sends again by index
//! costs a reference count, not a copy. It never fails on a name or value HTTP forbids: those
//! are still entered in the table (the table must stay in step with the client's) and reported
//! as [`Name::Invalid`] or left to the caller's value check, which makes the request malformed
//! (a stream error) rather than the connection broken. Errors of the encoding itself are
//! connection errors (`COMPRESSION_ERROR`).
//!
//! The [`Encoder`] writes answers and trailers. It indexes what repeats from answer to answer
//! (`content-type`, `server`, a node's custom headers) in its dynamic table, so a steady flow of
//! like answers costs the client a byte or two per header. Strings are sent as they are, not
//! Huffman-coded: cheaper for the gateway, and indexing already removes most repeats.

use std::collections::VecDeque;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

/// An HPACK encoding error: the connection cannot go on (`COMPRESSION_ERROR`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HpackError(pub &'static str);

/// A pseudo-header field (RFC 9113 §8.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pseudo {
    Method,
    Scheme,
    Authority,
    Path,
    Status,
    Protocol,
}

/// A field name as decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Name {
    Pseudo(Pseudo),
    Header(HeaderName),
    /// Not a name HTTP/2 allows in a request (upper case, an unknown pseudo-header, a
    /// character outside a token): the request that carries it is malformed.
    Invalid,
}

impl Name {
    fn parse(raw: &[u8]) -> Name {
        if let Some(rest) = raw.strip_prefix(b":") {
            return match rest {
                b"method" => Name::Pseudo(Pseudo::Method),
                b"scheme" => Name::Pseudo(Pseudo::Scheme),
                b"authority" => Name::Pseudo(Pseudo::Authority),
                b"path" => Name::Pseudo(Pseudo::Path),
                b"status" => Name::Pseudo(Pseudo::Status),
                b"protocol" => Name::Pseudo(Pseudo::Protocol),
                _ => Name::Invalid,
            };
        }
        // HeaderName::from_bytes would lower-case; HTTP/2 wants names sent in lower case.
        if raw.iter().any(u8::is_ascii_uppercase) {
            return Name::Invalid;
        }
        HeaderName::from_bytes(raw).map_or(Name::Invalid, Name::Header)
    }
}

/// The static table (RFC 7541 Appendix A), 1-based in the protocol.
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// The names of [`STATIC`], decoded once.
static STATIC_NAMES: [Name; 61] = [
    Name::Pseudo(Pseudo::Authority),
    Name::Pseudo(Pseudo::Method),
    Name::Pseudo(Pseudo::Method),
    Name::Pseudo(Pseudo::Path),
    Name::Pseudo(Pseudo::Path),
    Name::Pseudo(Pseudo::Scheme),
    Name::Pseudo(Pseudo::Scheme),
    Name::Pseudo(Pseudo::Status),
    Name::Pseudo(Pseudo::Status),
    Name::Pseudo(Pseudo::Status),
    Name::Pseudo(Pseudo::Status),
    Name::Pseudo(Pseudo::Status),
    Name::Pseudo(Pseudo::Status),
    Name::Pseudo(Pseudo::Status),
    Name::Header(HeaderName::from_static("accept-charset")),
    Name::Header(HeaderName::from_static("accept-encoding")),
    Name::Header(HeaderName::from_static("accept-language")),
    Name::Header(HeaderName::from_static("accept-ranges")),
    Name::Header(HeaderName::from_static("accept")),
    Name::Header(HeaderName::from_static("access-control-allow-origin")),
    Name::Header(HeaderName::from_static("age")),
    Name::Header(HeaderName::from_static("allow")),
    Name::Header(HeaderName::from_static("authorization")),
    Name::Header(HeaderName::from_static("cache-control")),
    Name::Header(HeaderName::from_static("content-disposition")),
    Name::Header(HeaderName::from_static("content-encoding")),
    Name::Header(HeaderName::from_static("content-language")),
    Name::Header(HeaderName::from_static("content-length")),
    Name::Header(HeaderName::from_static("content-location")),
    Name::Header(HeaderName::from_static("content-range")),
    Name::Header(HeaderName::from_static("content-type")),
    Name::Header(HeaderName::from_static("cookie")),
    Name::Header(HeaderName::from_static("date")),
    Name::Header(HeaderName::from_static("etag")),
    Name::Header(HeaderName::from_static("expect")),
    Name::Header(HeaderName::from_static("expires")),
    Name::Header(HeaderName::from_static("from")),
    Name::Header(HeaderName::from_static("host")),
    Name::Header(HeaderName::from_static("if-match")),
    Name::Header(HeaderName::from_static("if-modified-since")),
    Name::Header(HeaderName::from_static("if-none-match")),
    Name::Header(HeaderName::from_static("if-range")),
    Name::Header(HeaderName::from_static("if-unmodified-since")),
    Name::Header(HeaderName::from_static("last-modified")),
    Name::Header(HeaderName::from_static("link")),
    Name::Header(HeaderName::from_static("location")),
    Name::Header(HeaderName::from_static("max-forwards")),
    Name::Header(HeaderName::from_static("proxy-authenticate")),
    Name::Header(HeaderName::from_static("proxy-authorization")),
    Name::Header(HeaderName::from_static("range")),
    Name::Header(HeaderName::from_static("referer")),
    Name::Header(HeaderName::from_static("refresh")),
    Name::Header(HeaderName::from_static("retry-after")),
    Name::Header(HeaderName::from_static("server")),
    Name::Header(HeaderName::from_static("set-cookie")),
    Name::Header(HeaderName::from_static("strict-transport-security")),
    Name::Header(HeaderName::from_static("transfer-encoding")),
    Name::Header(HeaderName::from_static("user-agent")),
    Name::Header(HeaderName::from_static("vary")),
    Name::Header(HeaderName::from_static("via")),
    Name::Header(HeaderName::from_static("www-authenticate")),
];

/// Entry overhead counted towards a table's size (RFC 7541 §4.1).
const ENTRY_OVERHEAD: usize = 32;

/// The size of a dynamic table the gateway allows the client (and the protocol's default).
pub(crate) const DEFAULT_TABLE_SIZE: usize = 4096;

/// Largest integer accepted in a header block: far above any legal length or index, low enough
/// that no arithmetic on it overflows.
const INT_MAX: usize = 1 << 24;

struct Entry {
    name: Name,
    value: Bytes,
    size: usize,
}

/// Decodes a client's header blocks; keeps the client's dynamic table.
pub(crate) struct Decoder {
    /// Newest first: index 62 is `table[0]`.
    table: VecDeque<Entry>,
    size: usize,
    /// Current maximum size, as last set by the client (at most `limit`).
    max_size: usize,
    /// The most the gateway allows (`SETTINGS_HEADER_TABLE_SIZE`, the default).
    limit: usize,
}

impl Decoder {
    pub(crate) fn new() -> Self {
        Decoder { table: VecDeque::new(), size: 0, max_size: DEFAULT_TABLE_SIZE, limit: DEFAULT_TABLE_SIZE }
    }

    /// Decodes one whole header block, calling `emit` for each field in order.
    pub(crate) fn decode(
        &mut self,
        mut src: &[u8],
        mut emit: impl FnMut(Name, Bytes),
    ) -> Result<(), HpackError> {
        let mut first = true;
        while let Some(&b) = src.first() {
            if b & 0x80 != 0 {
                // Indexed field.
                let idx = int(&mut src, 7)?;
                let (name, value) = self.get(idx)?;
                emit(name, value);
            } else if b & 0x40 != 0 {
                // Literal with incremental indexing.
                let (name, raw_len, value) = self.literal(&mut src, 6)?;
                self.insert(name.clone(), raw_len, value.clone());
                emit(name, value);
            } else if b & 0x20 != 0 {
                // Dynamic table size update: only before the block's first field.
                if !first {
                    return Err(HpackError("table size update after a field"));
                }
                let n = int(&mut src, 5)?;
                if n > self.limit {
                    return Err(HpackError("table size update above the limit"));
                }
                self.max_size = n;
                self.evict(0);
                continue;
            } else {
                // Literal without indexing (0000) or never indexed (0001).
                let (name, _, value) = self.literal(&mut src, 4)?;
                emit(name, value);
            }
            first = false;
        }
        Ok(())
    }

    fn get(&self, idx: usize) -> Result<(Name, Bytes), HpackError> {
        match idx {
            0 => Err(HpackError("index 0")),
            1..=61 => Ok((STATIC_NAMES[idx - 1].clone(), Bytes::from_static(STATIC[idx - 1].1.as_bytes()))),
            _ => self
                .table
                .get(idx - 62)
                .map(|e| (e.name.clone(), e.value.clone()))
                .ok_or(HpackError("index beyond the table")),
        }
    }

    /// A literal field: the name (by index or literal), its length in octets, and the value.
    fn literal(&self, src: &mut &[u8], prefix: u8) -> Result<(Name, usize, Bytes), HpackError> {
        let idx = int(src, prefix)?;
        let (name, raw_len) = if idx == 0 {
            let raw = string(src)?;
            (Name::parse(&raw), raw.len())
        } else {
            let raw_len = match idx {
                1..=61 => STATIC[idx - 1].0.len(),
                _ => self.table.get(idx - 62).map_or(0, |e| e.size - e.value.len() - ENTRY_OVERHEAD),
            };
            (self.get(idx)?.0, raw_len)
        };
        let value = string(src)?;
        Ok((name, raw_len, value))
    }

    fn insert(&mut self, name: Name, name_len: usize, value: Bytes) {
        let size = name_len + value.len() + ENTRY_OVERHEAD;
        if size > self.max_size {
            // An entry larger than the table empties it (RFC 7541 §4.4).
            self.table.clear();
            self.size = 0;
            return;
        }
        self.evict(size);
        self.size += size;
        self.table.push_front(Entry { name, value, size });
    }

    /// Evicts the oldest entries until `room` more octets fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max_size {
            match self.table.pop_back() {
                Some(e) => self.size -= e.size,
                None => break,
            }
        }
    }
}

/// Reads an integer with an `prefix`-bit prefix (RFC 7541 §5.1).
fn int(src: &mut &[u8], prefix: u8) -> Result<usize, HpackError> {
    let mask = (1usize << prefix) - 1;
    let (&first, rest) = src.split_first().ok_or(HpackError("truncated integer"))?;
    *src = rest;
    let mut v = first as usize & mask;
    if v < mask {
        return Ok(v);
    }
    let mut shift = 0;
    loop {
        let (&b, rest) = src.split_first().ok_or(HpackError("truncated integer"))?;
        *src = rest;
        if shift > 21 {
            // Four continuation octets already hold more than any legal value.
            return Err(HpackError("integer too long"));
        }
        v += ((b & 0x7f) as usize) << shift;
        if v > INT_MAX {
            return Err(HpackError("integer too large"));
        }
        if b & 0x80 == 0 {
            return Ok(v);
        }
        shift += 7;
    }
}

/// Reads a string literal (RFC 7541 §5.2), Huffman-decoded if it is coded.
fn string(src: &mut &[u8]) -> Result<Bytes, HpackError> {
    let huffman = src.first().is_some_and(|b| b & 0x80 != 0);
    let len = int(src, 7)?;
    if len > src.len() {
        return Err(HpackError("truncated string"));
    }
    let (raw, rest) = src.split_at(len);
    *src = rest;
    if huffman { huffman::decode(raw).map(Bytes::from) } else { Ok(Bytes::copy_from_slice(raw)) }
}

fn put_int(dst: &mut Vec<u8>, first_bits: u8, prefix: u8, mut v: usize) {
    let mask = (1usize << prefix) - 1;
    if v < mask {
        dst.push(first_bits | v as u8);
        return;
    }
    dst.push(first_bits | mask as u8);
    v -= mask;
    while v >= 0x80 {
        dst.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    dst.push(v as u8);
}

fn put_str(dst: &mut Vec<u8>, s: &[u8]) {
    put_int(dst, 0, 7, s.len());
    dst.extend_from_slice(s);
}

/// Static-table index of a name the gateway may send (answers and trailers).
fn static_name(name: &HeaderName) -> Option<usize> {
    use http::header::*;
    // The standard headers compare by tag, so this is a short chain of integer comparisons.
    let table: [(&HeaderName, usize); 31] = [
        (&CONTENT_TYPE, 31),
        (&CONTENT_LENGTH, 28),
        (&DATE, 33),
        (&SERVER, 54),
        (&CACHE_CONTROL, 24),
        (&CONTENT_ENCODING, 26),
        (&ETAG, 34),
        (&LAST_MODIFIED, 44),
        (&LOCATION, 46),
        (&SET_COOKIE, 55),
        (&VARY, 59),
        (&EXPIRES, 36),
        (&ACCEPT_RANGES, 18),
        (&AGE, 21),
        (&ALLOW, 22),
        (&ACCESS_CONTROL_ALLOW_ORIGIN, 20),
        (&CONTENT_DISPOSITION, 25),
        (&CONTENT_LANGUAGE, 27),
        (&CONTENT_LOCATION, 29),
        (&CONTENT_RANGE, 30),
        (&LINK, 45),
        (&PROXY_AUTHENTICATE, 48),
        (&RETRY_AFTER, 53),
        (&STRICT_TRANSPORT_SECURITY, 56),
        (&VIA, 60),
        (&WWW_AUTHENTICATE, 61),
        (&ACCEPT, 19),
        (&ACCEPT_ENCODING, 16),
        (&ACCEPT_LANGUAGE, 17),
        (&COOKIE, 32),
        (&HOST, 38),
    ];
    table.iter().find(|(n, _)| *n == name).map(|&(_, i)| i)
}

/// Encodes the gateway's answers and trailers; keeps its own dynamic table (the client's
/// decoder mirrors it).
pub(crate) struct Encoder {
    /// Newest first, as in [`Decoder`].
    table: VecDeque<(HeaderName, HeaderValue)>,
    size: usize,
    max_size: usize,
    /// The client's `SETTINGS_HEADER_TABLE_SIZE`.
    limit: usize,
    /// A size change to signal at the start of the next block: the smallest size since the last
    /// block, then the current one (RFC 7541 §4.2).
    pending: Option<usize>,
}

impl Encoder {
    pub(crate) fn new() -> Self {
        Encoder {
            table: VecDeque::new(),
            size: 0,
            max_size: DEFAULT_TABLE_SIZE,
            limit: DEFAULT_TABLE_SIZE,
            pending: None,
        }
    }

    /// The client's `SETTINGS_HEADER_TABLE_SIZE` changed.
    pub(crate) fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
        let want = limit.min(DEFAULT_TABLE_SIZE);
        if want == self.max_size {
            return;
        }
        self.pending = Some(self.pending.map_or(want.min(self.max_size), |p| p.min(want)));
        self.max_size = want;
        self.evict(0);
    }

    fn start_block(&mut self, dst: &mut Vec<u8>) {
        if let Some(smallest) = self.pending.take() {
            if smallest < self.max_size {
                put_int(dst, 0x20, 5, smallest);
            }
            put_int(dst, 0x20, 5, self.max_size);
        }
    }

    /// Encodes an answer's head: `:status`, then the headers.
    pub(crate) fn encode_head(&mut self, status: StatusCode, headers: &HeaderMap, dst: &mut Vec<u8>) {
        self.start_block(dst);
        let idx = match status.as_u16() {
            200 => 8,
            204 => 9,
            206 => 10,
            304 => 11,
            400 => 12,
            404 => 13,
            500 => 14,
            _ => 0,
        };
        if idx != 0 {
            dst.push(0x80 | idx as u8);
        } else {
            // Literal without indexing, name `:status` (static 8).
            put_int(dst, 0, 4, 8);
            put_str(dst, status.as_str().as_bytes());
        }
        self.encode_fields(headers, dst);
    }

    /// Encodes a trailer block.
    pub(crate) fn encode_trailers(&mut self, headers: &HeaderMap, dst: &mut Vec<u8>) {
        self.start_block(dst);
        self.encode_fields(headers, dst);
    }

    fn encode_fields(&mut self, headers: &HeaderMap, dst: &mut Vec<u8>) {
        for (name, value) in headers {
            self.encode_field(name, value, dst);
        }
    }

    fn encode_field(&mut self, name: &HeaderName, value: &HeaderValue, dst: &mut Vec<u8>) {
        // The dynamic table first (newest first): a whole match is one index.
        let mut name_idx = 0;
        for (i, (n, v)) in self.table.iter().enumerate() {
            if n == name {
                if v == value {
                    put_int(dst, 0x80, 7, 62 + i);
                    return;
                }
                if name_idx == 0 {
                    name_idx = 62 + i;
                }
            }
        }
        if name_idx == 0 {
            name_idx = static_name(name).unwrap_or(0);
        }
        let size = name.as_str().len() + value.len() + ENTRY_OVERHEAD;
        let index = !value.is_sensitive() && size <= self.max_size / 2 && worth_indexing(name);
        if index {
            put_int(dst, 0x40, 6, name_idx);
        } else if value.is_sensitive() {
            put_int(dst, 0x10, 4, name_idx);
        } else {
            put_int(dst, 0, 4, name_idx);
        }
        if name_idx == 0 {
            put_str(dst, name.as_str().as_bytes());
        }
        put_str(dst, value.as_bytes());
        if index {
            self.evict(size);
            self.size += size;
            self.table.push_front((name.clone(), value.clone()));
        }
    }

    fn evict(&mut self, room: usize) {
        while self.size + room > self.max_size {
            match self.table.pop_back() {
                Some((n, v)) => self.size -= n.as_str().len() + v.len() + ENTRY_OVERHEAD,
                None => break,
            }
        }
    }
}

/// Headers whose values rarely repeat are sent without indexing, so they do not push out the
/// ones that do.
fn worth_indexing(name: &HeaderName) -> bool {
    use http::header::*;
    !(name == AGE || name == ETAG || name == LAST_MODIFIED || name == LOCATION || name == SET_COOKIE)
}

/// The Huffman code of RFC 7541 Appendix B. It is canonical (codes ordered by length, then by
/// symbol), so the code lengths alone define it; the codes and the decoding tables are derived
/// from them at compile time.
mod huffman {
    use super::HpackError;

    /// Code length of each symbol; 256 is EOS.
    const LENS: [u8; 257] = [
        13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28, 28,
        28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5, 5, 6, 6, 6,
        6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
        7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, 6, 7, 6, 5, 5, 6,
        7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23,
        24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22, 21, 20, 22, 22, 23, 23, 21, 23,
        22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, 26, 26,
        20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26,
        26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26,
        27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
    ];
    const MAX_LEN: usize = 30;

    /// Per code length: the first code of that length, how many there are, and where their
    /// symbols start in `SORTED`.
    struct Canon {
        first: [u32; MAX_LEN + 1],
        count: [u32; MAX_LEN + 1],
        offset: [u16; MAX_LEN + 1],
        sorted: [u16; 257],
        #[cfg_attr(not(test), allow(dead_code))]
        codes: [u32; 257],
    }

    const CANON: Canon = {
        let mut count = [0u32; MAX_LEN + 1];
        let mut s = 0;
        while s < 257 {
            count[LENS[s] as usize] += 1;
            s += 1;
        }
        let mut first = [0u32; MAX_LEN + 1];
        let mut offset = [0u16; MAX_LEN + 1];
        let mut code = 0u32;
        let mut off = 0u16;
        let mut len = 1;
        while len <= MAX_LEN {
            first[len] = code;
            offset[len] = off;
            code = (code + count[len]) << 1;
            off += count[len] as u16;
            len += 1;
        }
        // Symbols in code order: by length, then by symbol.
        let mut sorted = [0u16; 257];
        let mut codes = [0u32; 257];
        let mut next = offset;
        let mut s = 0;
        while s < 257 {
            let l = LENS[s] as usize;
            let i = next[l];
            sorted[i as usize] = s as u16;
            codes[s] = first[l] + (i - offset[l]) as u32;
            next[l] += 1;
            s += 1;
        }
        Canon { first, count, offset, sorted, codes }
    };

    /// Decodes a Huffman-coded string.
    pub(super) fn decode(src: &[u8]) -> Result<Vec<u8>, HpackError> {
        let mut out = Vec::with_capacity(src.len() * 8 / 5);
        let mut code = 0u32;
        let mut len = 0usize;
        for &byte in src {
            for bit in (0..8).rev() {
                code = (code << 1) | ((byte >> bit) & 1) as u32;
                len += 1;
                let i = code.wrapping_sub(CANON.first[len]);
                if i < CANON.count[len] {
                    let sym = CANON.sorted[(CANON.offset[len] as u32 + i) as usize];
                    if sym == 256 {
                        return Err(HpackError("EOS in a Huffman string"));
                    }
                    out.push(sym as u8);
                    code = 0;
                    len = 0;
                } else if len == MAX_LEN {
                    return Err(HpackError("invalid Huffman code"));
                }
            }
        }
        // Padding: fewer than 8 bits, all ones (the start of EOS).
        if len >= 8 || code != (1u32 << len) - 1 {
            return Err(HpackError("invalid Huffman padding"));
        }
        Ok(out)
    }

    /// Encodes `src` (for tests: the gateway sends strings uncoded).
    #[cfg(test)]
    pub(super) fn encode(src: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut acc = 0u64;
        let mut bits = 0;
        for &b in src {
            let l = LENS[b as usize] as u32;
            acc = (acc << l) | CANON.codes[b as usize] as u64;
            bits += l;
            while bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
        }
        if bits > 0 {
            out.push(((acc << (8 - bits)) | (0xff >> bits)) as u8);
        }
        out
    }

    #[cfg(test)]
    pub(super) fn code(sym: usize) -> (u32, u8) {
        (CANON.codes[sym], LENS[sym])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    fn decode_all(d: &mut Decoder, block: &[u8]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        d.decode(block, |n, v| {
            let n = match n {
                Name::Pseudo(Pseudo::Method) => ":method".to_string(),
                Name::Pseudo(Pseudo::Scheme) => ":scheme".to_string(),
                Name::Pseudo(Pseudo::Authority) => ":authority".to_string(),
                Name::Pseudo(Pseudo::Path) => ":path".to_string(),
                Name::Pseudo(Pseudo::Status) => ":status".to_string(),
                Name::Pseudo(Pseudo::Protocol) => ":protocol".to_string(),
                Name::Header(h) => h.as_str().to_string(),
                Name::Invalid => "<invalid>".to_string(),
            };
            out.push((n, String::from_utf8(v.to_vec()).unwrap()));
        })
        .unwrap();
        out
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn huffman_codes_match_the_rfc() {
        // Spot checks against RFC 7541 Appendix B.
        assert_eq!(huffman::code(b'0' as usize), (0x0, 5));
        assert_eq!(huffman::code(b'a' as usize), (0x3, 5));
        assert_eq!(huffman::code(b' ' as usize), (0x14, 6));
        assert_eq!(huffman::code(b'A' as usize), (0x21, 6));
        assert_eq!(huffman::code(0), (0x1ff8, 13));
        assert_eq!(huffman::code(256), (0x3fffffff, 30));
        assert_eq!(huffman::code(255), (0x3ffffee, 26));
    }

    /// RFC 7541 C.3: requests without Huffman coding, one connection.
    #[test]
    fn rfc_c3_requests_without_huffman() {
        let mut d = Decoder::new();
        let r1 = decode_all(&mut d, &hex("8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d"));
        assert_eq!(
            r1,
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com")
            ])
        );
        assert_eq!(d.size, 57);
        let r2 = decode_all(&mut d, &hex("8286 84be 5808 6e6f 2d63 6163 6865"));
        assert_eq!(
            r2,
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache")
            ])
        );
        assert_eq!(d.size, 110);
        let r3 = decode_all(
            &mut d,
            &hex("8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65"),
        );
        assert_eq!(
            r3,
            pairs(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value")
            ])
        );
        assert_eq!(d.size, 164);
    }

    /// RFC 7541 C.4: the same requests with Huffman coding.
    #[test]
    fn rfc_c4_requests_with_huffman() {
        let mut d = Decoder::new();
        let r1 = decode_all(&mut d, &hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff"));
        assert_eq!(r1[3], (":authority".into(), "www.example.com".into()));
        let r2 = decode_all(&mut d, &hex("8286 84be 5886 a8eb 1064 9cbf"));
        assert_eq!(r2[4], ("cache-control".into(), "no-cache".into()));
        let r3 = decode_all(&mut d, &hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"));
        assert_eq!(r3[4], ("custom-key".into(), "custom-value".into()));
        assert_eq!(d.size, 164);
        assert_eq!(huffman::encode(b"www.example.com"), hex("f1e3 c2e5 f23a 6ba0 ab90 f4ff"));
    }

    /// RFC 7541 C.6: answers with Huffman coding and a 256-octet table, so entries are evicted.
    #[test]
    fn rfc_c6_eviction_with_a_small_table() {
        let mut d = Decoder::new();
        d.decode(&[0x3f, 0xe1, 0x01], |_, _| {}).unwrap(); // size update to 256
        assert_eq!(d.max_size, 256);
        let r1 = decode_all(
            &mut d,
            &hex(
                "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
            ),
        );
        assert_eq!(
            r1,
            pairs(&[
                (":status", "302"),
                ("cache-control", "private"),
                ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
                ("location", "https://www.example.com")
            ])
        );
        assert_eq!(d.size, 222);
        let r2 = decode_all(&mut d, &hex("4883 640e ffc1 c0bf"));
        assert_eq!(r2[0], (":status".into(), "307".into()));
        assert_eq!(d.size, 222);
        let r3 = decode_all(
            &mut d,
            &hex(
                "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab 77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f 9587 3160 65c0 03ed 4ee5 b106 3d50 07",
            ),
        );
        assert_eq!(
            r3[5],
            ("set-cookie".into(), "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1".into())
        );
        assert_eq!(d.size, 215);
    }

    #[test]
    fn encoding_errors_are_caught() {
        let mut d = Decoder::new();
        // Index 0, an index past the table, a truncated string, a huge integer, a long run of
        // continuation octets adding nothing.
        let zeros = [0xff, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01];
        for bad in [&[0x80][..], &[0xbe], &[0x40, 0x05, b'a'], &[0xff, 0xff, 0xff, 0xff, 0xff, 0x7f], &zeros]
        {
            assert!(d.decode(bad, |_, _| {}).is_err(), "{bad:?}");
        }
        // A size update above the limit, or after a field.
        assert!(d.decode(&[0x3f, 0xe2, 0x1f], |_, _| {}).is_err());
        assert!(d.decode(&[0x82, 0x20], |_, _| {}).is_err());
        // Huffman: padding longer than 7 bits, padding that is not all ones, EOS.
        assert!(huffman::decode(&[0xff, 0xff]).is_err());
        assert!(huffman::decode(&[0x00]).is_err()); // '0' (00000) then 000 padding
        assert!(huffman::decode(&[0xff, 0xff, 0xff, 0xff]).is_err());
        assert_eq!(huffman::decode(&[0x07]).unwrap(), b"0"); // 00000 111
    }

    #[test]
    fn invalid_names_are_entered_but_flagged() {
        let mut d = Decoder::new();
        // Literal with indexing, new name "Up" (upper case), value "x"; then the entry by index.
        let block = [0x40, 0x02, b'U', b'p', 0x01, b'x', 0xbe];
        let mut names = Vec::new();
        d.decode(&block, |n, _| names.push(n)).unwrap();
        assert_eq!(names, vec![Name::Invalid, Name::Invalid]);
    }

    #[test]
    fn encoder_output_decodes_and_indexes_repeats() {
        let mut e = Encoder::new();
        let mut d = Decoder::new();
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        h.insert("x-custom", HeaderValue::from_static("abc"));
        h.insert("content-length", HeaderValue::from_static("13"));
        let mut first = Vec::new();
        e.encode_head(StatusCode::OK, &h, &mut first);
        let mut second = Vec::new();
        e.encode_head(StatusCode::OK, &h, &mut second);
        assert_eq!(second.len(), 4, "all indexed the second time: {second:?}");
        for block in [&first, &second] {
            let got = decode_all(&mut d, block);
            assert_eq!(
                got,
                pairs(&[
                    (":status", "200"),
                    ("content-type", "text/plain"),
                    ("x-custom", "abc"),
                    ("content-length", "13")
                ])
            );
        }
        let mut third = Vec::new();
        e.encode_head(StatusCode::BAD_GATEWAY, &HeaderMap::new(), &mut third);
        assert_eq!(decode_all(&mut d, &third), pairs(&[(":status", "502")]));
        // The client shrinks its table: the next block starts with the size updates, and both
        // sides still agree.
        e.set_limit(0);
        d.limit = 0;
        let mut fourth = Vec::new();
        e.encode_head(StatusCode::OK, &h, &mut fourth);
        assert_eq!(fourth[0], 0x20);
        assert_eq!(decode_all(&mut d, &fourth).len(), 4);
        assert_eq!(d.size, 0);
    }

    /// Mangled header blocks (from the encoder: literals, indexed fields, Huffman strings, table
    /// size updates) decode or fail with an error, never a panic, and the dynamic table stays
    /// within its size. Each mangled block goes to a decoder that has seen the clean blocks
    /// before it, as a connection's decoder has.
    #[test]
    fn mangled_header_blocks_decode_or_fail_never_panic() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        h.insert("x-custom", HeaderValue::from_static("a value long enough to be Huffman coded"));
        h.insert("content-length", HeaderValue::from_static("13"));
        let mut e = Encoder::new();
        let mut seeds = Vec::new();
        for status in [StatusCode::OK, StatusCode::NOT_FOUND, StatusCode::OK] {
            let mut block = Vec::new();
            e.encode_head(status, &h, &mut block);
            seeds.push(block);
        }
        e.set_limit(0);
        let mut block = Vec::new();
        e.encode_head(StatusCode::OK, &h, &mut block);
        seeds.push(block);
        seeds.push(huffman::encode(b"www.example.com"));
        let mut rng = crate::test_rng::Rng::new(11);
        for round in 0..20_000 {
            let mut d = Decoder::new();
            // The blocks before it, as the client sent them, then the mangled one.
            let upto = rng.below(seeds.len() as u64) as usize;
            for clean in &seeds[..upto] {
                let _ = d.decode(clean, |_, _| {});
            }
            let m = rng.mangle(&seeds[upto]);
            let _ = d.decode(&m, |_, _| {});
            let _ = huffman::decode(&m);
            assert!(d.size <= d.max_size.max(DEFAULT_TABLE_SIZE), "round {round}: table over its size");
        }
    }
}
