//! HTTP/2 frame layout (RFC 9113 §4, §6): the 9-octet frame header, frame types, flags, error
//! codes and settings, and writers for the frames the gateway sends.

/// Length of a frame header.
pub(crate) const HEAD_LEN: usize = 9;

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Largest frame payload anyone may send before SETTINGS_MAX_FRAME_SIZE says otherwise; the
/// gateway never raises its own.
pub(crate) const DEFAULT_MAX_FRAME: usize = 16_384;

/// The flow-control window every stream and the connection start with.
pub(crate) const DEFAULT_WINDOW: i64 = 65_535;

/// Largest flow-control window (2^31 - 1).
pub(crate) const MAX_WINDOW: i64 = (1 << 31) - 1;

pub(crate) const DATA: u8 = 0x0;
pub(crate) const HEADERS: u8 = 0x1;
pub(crate) const PRIORITY: u8 = 0x2;
pub(crate) const RST_STREAM: u8 = 0x3;
pub(crate) const SETTINGS: u8 = 0x4;
pub(crate) const PUSH_PROMISE: u8 = 0x5;
pub(crate) const PING: u8 = 0x6;
pub(crate) const GOAWAY: u8 = 0x7;
pub(crate) const WINDOW_UPDATE: u8 = 0x8;
pub(crate) const CONTINUATION: u8 = 0x9;

pub(crate) const END_STREAM: u8 = 0x1;
pub(crate) const ACK: u8 = 0x1;
pub(crate) const END_HEADERS: u8 = 0x4;
pub(crate) const PADDED: u8 = 0x8;
pub(crate) const PRIORITY_FLAG: u8 = 0x20;

pub(crate) const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
pub(crate) const SETTINGS_ENABLE_PUSH: u16 = 0x2;
pub(crate) const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub(crate) const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub(crate) const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;
pub(crate) const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

/// An error code (RFC 9113 §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reason(pub u32);

impl Reason {
    pub const NO_ERROR: Reason = Reason(0x0);
    pub const PROTOCOL_ERROR: Reason = Reason(0x1);
    pub const INTERNAL_ERROR: Reason = Reason(0x2);
    pub const FLOW_CONTROL_ERROR: Reason = Reason(0x3);
    pub const STREAM_CLOSED: Reason = Reason(0x5);
    pub const FRAME_SIZE_ERROR: Reason = Reason(0x6);
    pub const REFUSED_STREAM: Reason = Reason(0x7);
    pub const CANCEL: Reason = Reason(0x8);
    pub const COMPRESSION_ERROR: Reason = Reason(0x9);
    pub const ENHANCE_YOUR_CALM: Reason = Reason(0xb);

    pub(crate) fn name(self) -> &'static str {
        match self.0 {
            0x0 => "NO_ERROR",
            0x1 => "PROTOCOL_ERROR",
            0x2 => "INTERNAL_ERROR",
            0x3 => "FLOW_CONTROL_ERROR",
            0x4 => "SETTINGS_TIMEOUT",
            0x5 => "STREAM_CLOSED",
            0x6 => "FRAME_SIZE_ERROR",
            0x7 => "REFUSED_STREAM",
            0x8 => "CANCEL",
            0x9 => "COMPRESSION_ERROR",
            0xa => "CONNECT_ERROR",
            0xb => "ENHANCE_YOUR_CALM",
            0xc => "INADEQUATE_SECURITY",
            0xd => "HTTP_1_1_REQUIRED",
            _ => "unknown error code",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Head {
    pub len: usize,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl Head {
    pub(crate) fn parse(b: &[u8]) -> Head {
        Head {
            len: (b[0] as usize) << 16 | (b[1] as usize) << 8 | b[2] as usize,
            kind: b[3],
            flags: b[4],
            // The reserved bit is ignored (RFC 9113 §4.1).
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }
}

pub(crate) fn head_bytes(len: usize, kind: u8, flags: u8, stream: u32) -> [u8; HEAD_LEN] {
    let l = (len as u32).to_be_bytes();
    let s = stream.to_be_bytes();
    [l[1], l[2], l[3], kind, flags, s[0], s[1], s[2], s[3]]
}

pub(crate) fn put_head(dst: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    dst.extend_from_slice(&head_bytes(len, kind, flags, stream));
}

pub(crate) fn put_u32(dst: &mut Vec<u8>, v: u32) {
    dst.extend_from_slice(&v.to_be_bytes());
}

pub(crate) fn put_rst(dst: &mut Vec<u8>, stream: u32, reason: Reason) {
    put_head(dst, 4, RST_STREAM, 0, stream);
    put_u32(dst, reason.0);
}

pub(crate) fn put_window_update(dst: &mut Vec<u8>, stream: u32, n: u32) {
    put_head(dst, 4, WINDOW_UPDATE, 0, stream);
    put_u32(dst, n);
}

pub(crate) fn put_goaway(dst: &mut Vec<u8>, last: u32, reason: Reason) {
    put_head(dst, 8, GOAWAY, 0, 0);
    put_u32(dst, last);
    put_u32(dst, reason.0);
}

pub(crate) fn put_ping(dst: &mut Vec<u8>, ack: bool, payload: [u8; 8]) {
    put_head(dst, 8, PING, if ack { ACK } else { 0 }, 0);
    dst.extend_from_slice(&payload);
}

pub(crate) fn put_setting(dst: &mut Vec<u8>, id: u16, v: u32) {
    dst.extend_from_slice(&id.to_be_bytes());
    put_u32(dst, v);
}

pub(crate) fn u32_at(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
