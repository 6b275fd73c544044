//! `grpc-transcode`: HTTP/JSON requests to gRPC unary and server-streaming calls.

use serde_json::Value;

use crate::config::resources::ProtoSpec;

/// A compiled transcoding route (one service method).
#[derive(Debug)]
pub struct Transcoder;

/// Validates a `grpc-transcode` plugin configuration against the protos; the error carries a
/// path relative to the plugin.
pub fn check(_conf: &Value, _protos: &[ProtoSpec]) -> Result<(), (String, String)> {
    Err((
        String::new(),
        "unsupported by Strait: grpc-transcode is not implemented yet".into(),
    ))
}
