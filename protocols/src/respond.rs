//! The one place where gateway-generated errors become HTTP statuses or gRPC statuses.
//!
//! An HTTP client gets APISIX's JSON error shape (`{"error_msg":"..."}`); a gRPC client gets a
//! Trailers-Only response (HTTP 200, `content-type: application/grpc`, `grpc-status` and
//! `grpc-message` in the head), so gRPC clients see a real status, never a bare 502.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::ProxyError;
use crate::body::ProxyBody;
use crate::grpc::{self, Code};

/// HTTP status for a gateway error.
pub fn http_status(err: &ProxyError) -> StatusCode {
    match err {
        ProxyError::NoRoute => StatusCode::NOT_FOUND,
        ProxyError::NoNode | ProxyError::NoHealthyNode | ProxyError::ShuttingDown => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        ProxyError::Connect(_)
        | ProxyError::BadResponse(_)
        | ProxyError::InvalidResponse(_)
        | ProxyError::NodeReset(..)
        | ProxyError::RetryTimeout
        | ProxyError::AllTried => StatusCode::BAD_GATEWAY,
        ProxyError::Timeout(_) | ProxyError::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
        ProxyError::Status(s, _) => StatusCode::from_u16(*s).unwrap_or(StatusCode::BAD_GATEWAY),
    }
}

/// gRPC status for a gateway error.
pub fn grpc_code(err: &ProxyError) -> Code {
    match err {
        ProxyError::NoRoute => Code::Unimplemented,
        ProxyError::NoNode
        | ProxyError::NoHealthyNode
        | ProxyError::ShuttingDown
        | ProxyError::Connect(_)
        | ProxyError::BadResponse(_)
        | ProxyError::InvalidResponse(_)
        | ProxyError::RetryTimeout
        | ProxyError::AllTried => Code::Unavailable,
        ProxyError::NodeReset(code, _) => *code,
        // A node that timed out reaches a gRPC client behind APISIX as nginx's 504, which gRPC
        // maps to UNAVAILABLE; DEADLINE_EXCEEDED is for the client's own `grpc-timeout`, which
        // it set and can act on.
        ProxyError::Timeout(_) => Code::Unavailable,
        ProxyError::DeadlineExceeded => Code::DeadlineExceeded,
        ProxyError::BadRequest(_) => Code::Internal,
        ProxyError::Status(s, _) => grpc::code_for_http_status(*s),
    }
}

/// Builds the response for a gateway error: gRPC-shaped when `grpc` is set, JSON otherwise.
pub fn error_response(err: &ProxyError, grpc: bool) -> Response<ProxyBody> {
    if grpc {
        return grpc::trailers_only(grpc_code(err), &err.to_string());
    }
    let status = http_status(err);
    let msg = match err {
        ProxyError::NoRoute => "404 Route Not Found".to_string(),
        other => other.to_string(),
    };
    json_error(status, &msg)
}

/// `{"error_msg": msg}` with `status`, APISIX's error body.
pub fn json_error(status: StatusCode, msg: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({ "error_msg": msg }).to_string();
    let mut resp = Response::new(ProxyBody::full(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_errors_are_trailers_only_with_http_200() {
        let r = error_response(&ProxyError::NoNode, true);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()["content-type"], "application/grpc");
        let r = error_response(&ProxyError::Timeout("read"), true);
        assert_eq!(r.headers()["grpc-status"], "14");
        let r = error_response(&ProxyError::DeadlineExceeded, true);
        assert_eq!(r.headers()["grpc-status"], "4");
        let r = error_response(&ProxyError::NoRoute, true);
        assert_eq!(r.headers()["grpc-status"], "12");
    }

    #[test]
    fn http_errors_carry_apisix_json() {
        let r = error_response(&ProxyError::NoRoute, false);
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let r = error_response(&ProxyError::Connect("refused".into()), false);
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
        let r = error_response(&ProxyError::Timeout("read"), false);
        assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
        let r = error_response(&ProxyError::NoNode, false);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
