//! gRPC wire details shared by proxying, health probes and transcoding: status codes,
//! `grpc-timeout`, Trailers-Only responses and message framing.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};

use crate::body::ProxyBody;

/// gRPC status codes (<https://grpc.github.io/grpc/core/md_doc_statuscodes.html>).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

impl Code {
    /// The decimal form used in the `grpc-status` header.
    pub fn as_header(self) -> HeaderValue {
        const V: [&str; 17] =
            ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16"];
        HeaderValue::from_static(V[self as usize])
    }
}

/// Maps an HTTP status to a gRPC code as the gRPC spec does for non-gRPC answers
/// (<https://github.com/grpc/grpc/blob/master/doc/http-grpc-status-mapping.md>).
pub fn code_for_http_status(status: u16) -> Code {
    match status {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
    }
}

/// The gRPC code for a node's stream that broke: for an HTTP/2 stream the node reset, its
/// error code as gRPC's HTTP/2 transport maps it (PROTOCOL-HTTP2.md, "Errors": CANCEL is
/// CANCELLED, ENHANCE_YOUR_CALM RESOURCE_EXHAUSTED, INADEQUATE_SECURITY PERMISSION_DENIED,
/// REFUSED_STREAM UNAVAILABLE, the others INTERNAL); anything else (the connection went away)
/// UNAVAILABLE. A client retries UNAVAILABLE, so a node whose handler failed mid-call must not
/// look like one that never saw it.
pub fn code_for_broken_stream(e: &(dyn std::error::Error + 'static)) -> Code {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(h2e) = s.downcast_ref::<h2::Error>()
            && h2e.is_remote()
            && !h2e.is_go_away()
            && !h2e.is_io()
            && let Some(reason) = h2e.reason()
        {
            return match reason {
                h2::Reason::REFUSED_STREAM => Code::Unavailable,
                h2::Reason::CANCEL => Code::Cancelled,
                h2::Reason::ENHANCE_YOUR_CALM => Code::ResourceExhausted,
                h2::Reason::INADEQUATE_SECURITY => Code::PermissionDenied,
                _ => Code::Internal,
            };
        }
        source = s.source();
    }
    Code::Unavailable
}

/// Whether a request is a gRPC call (`content-type: application/grpc[+proto|...]`).
pub fn is_grpc_request(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc") && !ct.starts_with("application/grpc-web"))
}

/// Parses a `grpc-timeout` header value (`<1-8 digits><H|M|S|m|u|n>`).
pub fn parse_timeout(value: &HeaderValue) -> Option<Duration> {
    let s = value.to_str().ok()?;
    if s.len() < 2 || s.len() > 9 {
        return None;
    }
    let (digits, unit) = s.split_at(s.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Formats a duration as a `grpc-timeout` value (milliseconds, at most 8 digits).
pub fn format_timeout(d: Duration) -> HeaderValue {
    let ms = d.as_millis();
    let text = if ms < 100_000_000 {
        format!("{}m", ms.max(1))
    } else {
        format!("{}S", d.as_secs().min(99_999_999))
    };
    HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("99999999S"))
}

/// Percent-encodes a `grpc-message` value as the gRPC spec requires.
pub fn encode_message(msg: &str) -> HeaderValue {
    let mut out = String::with_capacity(msg.len());
    for b in msg.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::from_str(&out).unwrap_or(HeaderValue::from_static("error"))
}

/// Decodes a percent-encoded `grpc-message`.
pub fn decode_message(value: &HeaderValue) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A Trailers-Only gRPC response: HTTP 200 with the status in the head and no body.
pub fn trailers_only(code: Code, message: &str) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::empty());
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", code.as_header());
    if !message.is_empty() {
        h.insert("grpc-message", encode_message(message));
    }
    resp
}

/// Frames one protobuf message for the gRPC wire (uncompressed).
pub fn frame(message: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + message.len());
    b.put_u8(0);
    b.put_u32(message.len() as u32);
    b.put_slice(message);
    b.freeze()
}

/// Reads the `grpc-status` of a header or trailer map.
pub fn status_of(headers: &HeaderMap) -> Option<u16> {
    let v = headers.get("grpc-status")?;
    // What is not a status number reads as UNKNOWN, as gRPC's clients read it.
    Some(v.to_str().ok().and_then(|s| s.trim().parse().ok()).unwrap_or(Code::Unknown as u16))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a reset the node sent is mapped by its code (the test `grpc` suite's
    /// `a_node_resetting_a_call_after_its_head_gives_the_mapped_status` has a node send one):
    /// one made here (h2's own, for a client body that failed or a malformed answer) blames no
    /// node, nor does a lost connection: UNAVAILABLE.
    #[test]
    fn a_broken_stream_not_reset_by_the_node_is_unavailable() {
        #[derive(Debug)]
        struct Wrapped(h2::Error);
        impl std::fmt::Display for Wrapped {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "wrapped")
            }
        }
        impl std::error::Error for Wrapped {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        for reason in [h2::Reason::INTERNAL_ERROR, h2::Reason::CANCEL, h2::Reason::ENHANCE_YOUR_CALM] {
            let local = Wrapped(h2::Error::from(reason));
            assert_eq!(code_for_broken_stream(&local) as u16, Code::Unavailable as u16, "{reason:?}");
        }
        let lost = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(code_for_broken_stream(&lost) as u16, Code::Unavailable as u16);
    }

    #[test]
    fn a_status_that_is_not_a_number_reads_as_unknown() {
        let status = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("grpc-status", HeaderValue::from_static(v));
            status_of(&h)
        };
        assert_eq!(status_of(&HeaderMap::new()), None);
        assert_eq!(status("0"), Some(0));
        assert_eq!(status("14"), Some(14));
        assert_eq!(status("abc"), Some(2));
        assert_eq!(status("70000"), Some(2));
        assert_eq!(status(""), Some(2));
    }

    #[test]
    fn timeouts_parse_every_unit() {
        let p = |s: &str| parse_timeout(&HeaderValue::from_str(s).unwrap());
        assert_eq!(p("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(p("2M"), Some(Duration::from_secs(120)));
        assert_eq!(p("3S"), Some(Duration::from_secs(3)));
        assert_eq!(p("250m"), Some(Duration::from_millis(250)));
        assert_eq!(p("7u"), Some(Duration::from_micros(7)));
        assert_eq!(p("9n"), Some(Duration::from_nanos(9)));
        assert_eq!(p("123456789S"), None);
        assert_eq!(p("S"), None);
        assert_eq!(p("1x"), None);
        assert_eq!(p("-1S"), None);
    }

    #[test]
    fn messages_round_trip_percent_encoding() {
        let v = encode_message("no node: 100% übel");
        assert_eq!(v.to_str().unwrap(), "no node: 100%25 %C3%BCbel");
        assert_eq!(decode_message(&v), "no node: 100% übel");
        assert_eq!(decode_message(&HeaderValue::from_static("bad%")), "bad%");
    }

    #[test]
    fn frame_has_length_prefix() {
        assert_eq!(&frame(b"ab")[..], &[0, 0, 0, 0, 2, b'a', b'b']);
    }
}
