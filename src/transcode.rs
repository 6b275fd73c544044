//! `grpc-transcode`: HTTP/JSON clients calling gRPC methods (APISIX's plugin, plus server
//! streaming).
//!
//! * protos: `.proto` text compiled in-process (protox), or a base64 `FileDescriptorSet` (with
//!   imports);
//! * request: a JSON body (POST/PUT/PATCH with `application/json`), else form fields (POST),
//!   else the query string; nested messages (JSON, or `a.b=1` in forms and queries), repeated
//!   fields, maps, enums by name or number, 64-bit integers as strings or numbers;
//! * response: protobuf JSON with the proto field names (APISIX's lua-protobuf shape), empty
//!   repeated fields as `[]`; gRPC statuses become HTTP statuses with APISIX's table, with the
//!   `google.rpc.Status` in the body when `show_status_in_body` is set;
//! * beyond APISIX: server-streaming methods answer newline-delimited JSON, or Server-Sent
//!   Events when the client accepts `text/event-stream`; a mid-stream error is a final
//!   `{"error": ...}` object.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use prost::Message;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, MessageDescriptor, MethodDescriptor, ReflectMessage,
    SerializeOptions,
};
use serde_json::{Map, Value, json};
use strait_protocols::http::{ForwardCtx, forward};
use strait_protocols::respond::json_error;
use strait_protocols::{ProxyBody, grpc};

use crate::config::resources::ProtoSpec;
use crate::upstream::Upstream;

/// Largest request body transcoded (JSON or form).
const MAX_REQUEST_BODY: usize = 4 << 20;
/// Most parts a dotted query or form key may have (`a.b.c=1`): each is a level of the message
/// built from it, and building, encoding and dropping a message recurse once per level, so a
/// key of a million parts (a self-nested message type, a 4 MiB form) would overflow the stack.
/// A JSON body's nesting is bounded by serde_json's 128 levels.
const MAX_KEY_PARTS: usize = 32;
/// Deepest nesting of a node's message once the payloads of its `google.protobuf.Any` fields are
/// opened. Decoding bounds plain nesting (prost's 100 levels), but an `Any` is decoded afresh
/// when it is serialized, so a chain of them inside one another would recurse as deep as the
/// answer is long.
const MAX_NESTING: u32 = 100;
/// How much JSON one message may become, in multiples of `max_resp_body_size`: protobuf's
/// defaults cost nothing on the wire and a field each in JSON, so a few megabytes of empty
/// entries would otherwise become gigabytes.
const JSON_GROWTH: usize = 4;

/// A compiled transcoding route (one service method).
#[derive(Debug)]
pub struct Transcoder {
    method: MethodDescriptor,
    path: String,
    deadline: Option<Duration>,
    serialize: SerializeOptions,
    show_status_in_body: bool,
    status_detail_type: Option<MessageDescriptor>,
    max_resp_body_size: usize,
    /// The output message (or the status details) can hold a `google.protobuf.Any`: its nesting
    /// is checked before it is serialized.
    opens_any: bool,
}

/// Compiles a proto resource: `.proto` text first, else a base64 `FileDescriptorSet`.
pub fn compile_proto(content: &str) -> Result<DescriptorPool, String> {
    struct Mem(String);
    impl protox::file::FileResolver for Mem {
        fn open_file(&self, name: &str) -> Result<protox::file::File, protox::Error> {
            if name == "strait-proto.proto" {
                protox::file::File::from_source(name, &self.0)
            } else {
                Err(protox::Error::file_not_found(name))
            }
        }
    }
    let mut resolver = protox::file::ChainFileResolver::new();
    resolver.add(Mem(content.to_string()));
    resolver.add(protox::file::GoogleFileResolver::new());
    let mut compiler = protox::Compiler::with_file_resolver(resolver);
    compiler.include_imports(true);
    let text_error = match compiler.open_file("strait-proto.proto") {
        Ok(c) => return Ok(c.descriptor_pool()),
        Err(e) => e.to_string(),
    };
    let compact: String = content.chars().filter(|c| !c.is_whitespace()).collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|_| format!("neither valid .proto text ({text_error}) nor a base64 FileDescriptorSet"))?;
    DescriptorPool::decode(bytes.as_slice()).map_err(|e| format!("invalid FileDescriptorSet: {e}"))
}

/// Validates a `grpc-transcode` configuration against the protos; the error carries a path
/// relative to the plugin.
pub fn check(conf: &Value, protos: &[ProtoSpec]) -> Result<(), (String, String)> {
    build(conf, protos).map(|_| ())
}

/// Builds the transcoder for a route.
pub fn build(conf: &Value, protos: &[ProtoSpec]) -> Result<Transcoder, (String, String)> {
    let err = |p: &str, m: String| (format!(".{p}"), m);
    let Value::Object(c) = conf else {
        return Err((String::new(), "must be a map".into()));
    };
    const KNOWN: &[&str] = &[
        "proto_id",
        "service",
        "method",
        "deadline",
        "pb_option",
        "show_status_in_body",
        "status_detail_type",
        "max_resp_body_size",
        "_meta",
    ];
    for k in c.keys() {
        if !KNOWN.contains(&k.as_str()) {
            return Err(err(k, "unknown key".into()));
        }
    }
    let proto_id = match c.get("proto_id") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => return Err(err("proto_id", "required".into())),
    };
    let proto = protos
        .iter()
        .find(|p| p.id == proto_id)
        .ok_or_else(|| err("proto_id", format!("no proto with id {proto_id:?}")))?;
    let pool =
        compile_proto(&proto.content).map_err(|e| err("proto_id", format!("proto {proto_id:?}: {e}")))?;
    let service_name =
        c.get("service").and_then(Value::as_str).ok_or_else(|| err("service", "required".into()))?;
    let method_name =
        c.get("method").and_then(Value::as_str).ok_or_else(|| err("method", "required".into()))?;
    let service = pool
        .get_service_by_name(service_name)
        .ok_or_else(|| err("service", format!("Undefined service {service_name:?} in proto {proto_id:?}")))?;
    let method = service.methods().find(|m| m.name() == method_name).ok_or_else(|| {
        err("method", format!("Undefined method {method_name:?} in service {service_name:?}"))
    })?;
    if method.is_client_streaming() {
        return Err(err(
            "method",
            format!(
                "{method_name} is client-streaming; only unary and server-streaming methods can be transcoded"
            ),
        ));
    }
    let deadline = match c.get("deadline") {
        None => None,
        Some(v) => match v.as_f64() {
            Some(ms) if ms > 0.0 => Some(crate::config::seconds(ms / 1000.0)),
            Some(0.0) => None,
            _ => return Err(err("deadline", "must be a number of milliseconds >= 0".into())),
        },
    };
    let mut serialize = SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(false)
        .stringify_64_bit_integers(false)
        .use_enum_numbers(false);
    if let Some(opts) = c.get("pb_option") {
        let list = opts
            .as_array()
            .filter(|a| !a.is_empty())
            .ok_or_else(|| err("pb_option", "must be a non-empty list".into()))?;
        for (i, o) in list.iter().enumerate() {
            serialize = match o.as_str() {
                Some("enum_as_name") => serialize.use_enum_numbers(false),
                Some("enum_as_value") => serialize.use_enum_numbers(true),
                Some("int64_as_number") => serialize.stringify_64_bit_integers(false),
                Some("int64_as_string") => serialize.stringify_64_bit_integers(true),
                Some("auto_default_values") | Some("use_default_values") | Some("use_default_metatable") => {
                    serialize.skip_default_fields(false)
                }
                Some("no_default_values") => serialize.skip_default_fields(true),
                Some("enable_hooks") | Some("disable_hooks") => serialize,
                Some("int64_as_hexstring") => {
                    return Err(err(
                        &format!("pb_option[{i}]"),
                        "unsupported by Strait: int64_as_hexstring".into(),
                    ));
                }
                _ => return Err(err(&format!("pb_option[{i}]"), format!("unknown option {o}"))),
            };
        }
    }
    let show_status_in_body = match c.get("show_status_in_body") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(err("show_status_in_body", "must be a boolean".into())),
    };
    let status_detail_type =
        match c.get("status_detail_type") {
            None => None,
            Some(Value::String(t)) => Some(pool.get_message_by_name(t).ok_or_else(|| {
                err("status_detail_type", format!("no message {t:?} in proto {proto_id:?}"))
            })?),
            Some(_) => return Err(err("status_detail_type", "must be a string".into())),
        };
    let max_resp_body_size = match c.get("max_resp_body_size") {
        None => 64 << 20,
        Some(v) => v
            .as_u64()
            .filter(|n| *n >= 1)
            .ok_or_else(|| err("max_resp_body_size", "must be an integer >= 1".into()))?
            as usize,
    };
    let path = format!("/{}/{}", service.full_name(), method.name());
    let opens_any = reaches_any(&method.output()) || status_detail_type.as_ref().is_some_and(reaches_any);
    Ok(Transcoder {
        method,
        path,
        deadline,
        serialize,
        show_status_in_body,
        status_detail_type,
        max_resp_body_size,
        opens_any,
    })
}

/// Whether a message of type `desc` can contain a `google.protobuf.Any`, at any depth.
fn reaches_any(desc: &MessageDescriptor) -> bool {
    let mut seen = std::collections::HashSet::new();
    let mut todo = vec![desc.clone()];
    while let Some(d) = todo.pop() {
        if d.full_name() == "google.protobuf.Any" {
            return true;
        }
        if !seen.insert(d.full_name().to_string()) {
            continue;
        }
        for f in d.fields() {
            if let prost_reflect::Kind::Message(m) = f.kind() {
                todo.push(m);
            }
        }
    }
    false
}

/// Whether `msg`, with the payloads of its `Any` fields opened, nests at most [`MAX_NESTING`]
/// levels below `depth`. An `Any` whose payload cannot be opened counts as a leaf: serializing
/// it fails on its own, without recursing.
fn nesting_ok(msg: &DynamicMessage, depth: u32) -> bool {
    use prost_reflect::Value as V;
    if depth > MAX_NESTING {
        return false;
    }
    let desc = msg.descriptor();
    if desc.full_name() == "google.protobuf.Any" {
        let url = msg.get_field_by_number(1);
        let value = msg.get_field_by_number(2);
        let (Some(V::String(url)), Some(V::Bytes(value))) = (url.as_deref(), value.as_deref()) else {
            return true;
        };
        let name = url.rsplit('/').next().unwrap_or_default();
        let Some(inner) = desc.parent_pool().get_message_by_name(name) else { return true };
        return match DynamicMessage::decode(inner, value.clone()) {
            Ok(m) => nesting_ok(&m, depth + 1),
            Err(_) => true,
        };
    }
    let nested = |v: &V| match v {
        V::Message(m) => nesting_ok(m, depth + 1),
        _ => true,
    };
    msg.fields().all(|(_, v)| match v {
        V::List(items) => items.iter().all(nested),
        V::Map(entries) => entries.values().all(nested),
        v => nested(v),
    })
}

/// APISIX's gRPC status -> HTTP status table.
pub fn http_status_for(code: u16) -> StatusCode {
    let s = match code {
        1 => 499,
        2 => 500,
        3 => 400,
        4 => 504,
        5 => 404,
        6 => 409,
        7 => 403,
        8 => 429,
        9 => 400,
        10 => 409,
        11 => 400,
        12 => 501,
        13 => 500,
        14 => 503,
        15 => 500,
        16 => 401,
        _ => 599,
    };
    StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn bad_request(msg: &str) -> Response<ProxyBody> {
    json_error(StatusCode::BAD_REQUEST, msg)
}

/// Percent-decoded `key=value` pairs of a query string or form body.
fn pairs(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                crate::route::query_arg(&format!("x={k}"), "x").map(|c| c.into_owned()).unwrap_or_default(),
                crate::route::query_arg(&format!("x={v}"), "x").map(|c| c.into_owned()).unwrap_or_default(),
            )
        })
        .collect()
}

/// Turns flat `key=value` pairs into JSON for `desc`: values typed by the field they fill,
/// `a.b` for nested messages, repeated keys for repeated fields.
fn pairs_to_json(desc: &MessageDescriptor, pairs: &[(String, String)]) -> Result<Value, String> {
    use prost_reflect::Kind;
    let mut root = Map::new();
    for (key, raw) in pairs {
        let parts: Vec<&str> = key.split('.').collect();
        if parts.len() > MAX_KEY_PARTS {
            let start: String = key.chars().take(64).collect();
            return Err(format!("{start}...: more than {MAX_KEY_PARTS} nested fields"));
        }
        let mut msg = desc.clone();
        let mut obj = &mut root;
        for (i, part) in parts.iter().enumerate() {
            let Some(field) = msg.get_field_by_name(part).or_else(|| msg.get_field_by_json_name(part)) else {
                // Unknown arguments are ignored, as APISIX only walks the message's fields.
                break;
            };
            let last = i == parts.len() - 1;
            if !last {
                match field.kind() {
                    Kind::Message(m) if !field.is_list() && !field.is_map() => {
                        msg = m;
                        obj = obj
                            .entry(field.name().to_string())
                            .or_insert_with(|| Value::Object(Map::new()))
                            .as_object_mut()
                            .ok_or_else(|| format!("{key}: conflicting values"))?;
                        continue;
                    }
                    _ => return Err(format!("{key}: {} is not a message", field.name())),
                }
            }
            let value = match field.kind() {
                Kind::Bool => Value::Bool(match raw.as_str() {
                    "true" | "1" => true,
                    "false" | "0" | "" => false,
                    _ => return Err(format!("{key}: not a boolean: {raw:?}")),
                }),
                Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 | Kind::Uint32 | Kind::Fixed32 => {
                    Value::from(raw.parse::<i64>().map_err(|_| format!("{key}: not an integer: {raw:?}"))?)
                }
                // 64-bit integers travel as strings in the JSON mapping.
                Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 | Kind::Uint64 | Kind::Fixed64 => {
                    Value::from(raw.clone())
                }
                Kind::Float | Kind::Double => {
                    Value::from(raw.parse::<f64>().map_err(|_| format!("{key}: not a number: {raw:?}"))?)
                }
                Kind::Enum(_) => match raw.parse::<i64>() {
                    Ok(n) => Value::from(n),
                    Err(_) => Value::from(raw.clone()),
                },
                Kind::String | Kind::Bytes => Value::from(raw.clone()),
                Kind::Message(_) => {
                    return Err(format!("{key}: a message needs its fields (e.g. {key}.field)"));
                }
            };
            if field.is_list() {
                match obj.entry(field.name().to_string()).or_insert_with(|| Value::Array(vec![])) {
                    Value::Array(a) => a.push(value),
                    _ => return Err(format!("{key}: conflicting values")),
                }
            } else {
                obj.insert(field.name().to_string(), value);
            }
        }
    }
    Ok(Value::Object(root))
}

/// Builds the request message from the HTTP request (APISIX's rules).
async fn input_message(
    t: &Transcoder,
    req: Request<ProxyBody>,
) -> Result<DynamicMessage, Response<ProxyBody>> {
    let desc = t.method.input();
    let (parts, body) = req.into_parts();
    let ct = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let json_body =
        ct.contains("application/json") && matches!(parts.method, Method::POST | Method::PUT | Method::PATCH);
    let read_body = |body: ProxyBody| async move {
        let limited = http_body_util::Limited::new(body, MAX_REQUEST_BODY);
        limited
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|_| bad_request("request body too large or unreadable"))
    };
    let value = if json_body {
        let bytes = read_body(body).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            Value::Object(Map::new())
        } else {
            serde_json::from_slice::<Value>(&bytes)
                .map_err(|e| bad_request(&format!("invalid JSON body: {e}")))?
        }
    } else if parts.method == Method::POST {
        let bytes = read_body(body).await?;
        pairs_to_json(&desc, &pairs(&String::from_utf8_lossy(&bytes)))
            .map_err(|e| bad_request(&format!("failed to encode request data to protobuf: {e}")))?
    } else {
        pairs_to_json(&desc, &pairs(parts.uri.query().unwrap_or("")))
            .map_err(|e| bad_request(&format!("failed to encode request data to protobuf: {e}")))?
    };
    let opts = DeserializeOptions::new().deny_unknown_fields(false);
    DynamicMessage::deserialize_with_options(desc, value, &opts)
        .map_err(|e| bad_request(&format!("failed to encode request data to protobuf: {e}")))
}

/// Serves one transcoded call.
pub async fn handle(
    req: Request<ProxyBody>,
    t: &Transcoder,
    upstream: &Upstream,
    ctx: &ForwardCtx<'_>,
) -> Response<ProxyBody> {
    let sse = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"));
    let mut headers = req.headers().clone();
    // An HTTP/2 client's host is its request's authority (there is no Host header): the gRPC
    // request keeps it, so the node gets the same `X-Forwarded-Host` as over HTTP/1.1.
    let target = match (req.uri().scheme(), req.uri().authority()) {
        (Some(scheme), Some(authority)) => http::Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query(t.path.as_str())
            .build()
            .ok(),
        _ => None,
    };
    let msg = match input_message(t, req).await {
        Ok(m) => m,
        Err(resp) => return resp,
    };
    for h in [
        header::CONTENT_TYPE,
        header::CONTENT_LENGTH,
        header::ACCEPT_ENCODING,
        header::ACCEPT,
        header::TRANSFER_ENCODING,
    ] {
        headers.remove(h);
    }
    // The message goes uncompressed and only an uncompressed answer can be read: the client's
    // gRPC encodings (it is not speaking gRPC) must not ask the node for another.
    headers.remove("grpc-encoding");
    headers.remove("grpc-accept-encoding");
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    let mut ctx = ctx.clone();
    ctx.grpc_node = true;
    if let Some(d) = t.deadline {
        headers.insert("grpc-timeout", grpc::format_timeout(d));
        let at = tokio::time::Instant::now() + d;
        ctx.deadline = Some(ctx.deadline.map_or(at, |c| c.min(at)));
    }
    let mut builder = match target {
        Some(uri) => Request::post(uri),
        None => Request::post(t.path.as_str()),
    };
    if let Some(h) = builder.headers_mut() {
        *h = headers;
    }
    let Ok(grpc_req) = builder.body(ProxyBody::full(grpc::frame(&msg.encode_to_vec()))) else {
        return json_error(StatusCode::INTERNAL_SERVER_ERROR, "cannot build the gRPC request");
    };
    let call = forward(grpc_req, &ctx, upstream);
    let resp = match ctx.deadline {
        Some(d) => match tokio::time::timeout_at(d, call).await {
            Ok(r) => r,
            Err(_) => return json_error(StatusCode::GATEWAY_TIMEOUT, "gRPC deadline exceeded"),
        },
        None => call.await,
    };
    if resp.status() != StatusCode::OK || !grpc::is_grpc_request(resp.headers()) {
        // A gateway error (already JSON) or a node that is not speaking gRPC.
        return resp;
    }
    let head_status = grpc::status_of(resp.headers());
    if let Some(code) = head_status.filter(|c| *c != 0) {
        return error_response(t, code, resp.headers(), resp.headers());
    }
    if t.method.is_server_streaming() {
        return streaming_response(t, resp, sse, head_status.is_some(), ctx.deadline);
    }
    unary_response(t, resp, ctx.deadline).await
}

/// Whether a failure happened because the call's deadline passed (rather than the node).
fn past(deadline: Option<tokio::time::Instant>) -> bool {
    deadline.is_some_and(|d| d <= tokio::time::Instant::now())
}

fn decode_status_details(t: &Transcoder, headers: &HeaderMap) -> Vec<Value> {
    #[derive(Clone, PartialEq, prost::Message)]
    struct RpcStatus {
        #[prost(int32, tag = "1")]
        code: i32,
        #[prost(string, tag = "2")]
        message: String,
        #[prost(message, repeated, tag = "3")]
        details: Vec<prost_types::Any>,
    }
    let Some(raw) = headers.get("grpc-status-details-bin").and_then(|v| v.to_str().ok()) else {
        return vec![];
    };
    let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(raw.trim_end_matches('='))
        .unwrap_or_default();
    let Ok(status) = RpcStatus::decode(bytes.as_slice()) else { return vec![] };
    status
        .details
        .into_iter()
        .map(|any| {
            if let Some(desc) = &t.status_detail_type
                && let Ok(m) = DynamicMessage::decode(desc.clone(), any.value.as_slice())
                && nesting_ok(&m, 0)
                && let Ok(v) = m.serialize_with_options(serde_json::value::Serializer, &t.serialize)
            {
                return v;
            }
            json!({ "type_url": any.type_url, "value": base64::engine::general_purpose::STANDARD.encode(&any.value) })
        })
        .collect()
}

/// An HTTP answer for a failed call (`code` != 0), with the status in the body when asked.
fn error_response(
    t: &Transcoder,
    code: u16,
    status_headers: &HeaderMap,
    head: &HeaderMap,
) -> Response<ProxyBody> {
    let message = status_headers.get("grpc-message").map(grpc::decode_message).unwrap_or_default();
    let body = if t.show_status_in_body {
        let details = decode_status_details(t, status_headers);
        ProxyBody::full(json!({"error": {"code": code, "message": message, "details": details}}).to_string())
    } else {
        ProxyBody::empty()
    };
    let mut r = Response::new(body);
    *r.status_mut() = http_status_for(code);
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for name in ["grpc-status", "grpc-message"] {
        if let Some(v) = status_headers.get(name).or_else(|| head.get(name)) {
            h.insert(name, v.clone());
        }
    }
    r
}

async fn unary_response(
    t: &Transcoder,
    resp: Response<ProxyBody>,
    deadline: Option<tokio::time::Instant>,
) -> Response<ProxyBody> {
    let (parts, body) = resp.into_parts();
    let collected = match http_body_util::Limited::new(body, t.max_resp_body_size).collect().await {
        Ok(c) => c,
        // The node answered the head in time but not its message.
        Err(_) if past(deadline) => return json_error(StatusCode::GATEWAY_TIMEOUT, "gRPC deadline exceeded"),
        Err(e) => return json_error(StatusCode::BAD_GATEWAY, &format!("reading the gRPC response: {e}")),
    };
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let code = grpc::status_of(&trailers).unwrap_or(0);
    if code != 0 {
        return error_response(t, code, &trailers, &parts.headers);
    }
    let data = collected.to_bytes();
    let mut frames = FrameReader::new(usize::MAX);
    frames.push(&data);
    let msg = match frames.next_message() {
        Ok(Some(m)) => m,
        Ok(None) => return json_error(StatusCode::BAD_GATEWAY, "the gRPC response has no message"),
        Err(e) => return json_error(StatusCode::BAD_GATEWAY, &e),
    };
    match to_json(t, &msg) {
        Ok(json) => {
            let mut r = Response::new(ProxyBody::full(json));
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        Err(e) => json_error(StatusCode::BAD_GATEWAY, &e),
    }
}

fn to_json(t: &Transcoder, msg: &[u8]) -> Result<Vec<u8>, String> {
    let m = DynamicMessage::decode(t.method.output(), msg)
        .map_err(|e| format!("failed to decode the gRPC response: {e}"))?;
    message_json(&m, &t.serialize, t.opens_any, t.max_resp_body_size.saturating_mul(JSON_GROWTH))
}

/// A node's message as JSON, at most `limit` bytes of it, its nesting checked first when it can
/// hold an `Any`.
fn message_json(
    m: &DynamicMessage,
    opts: &SerializeOptions,
    opens_any: bool,
    limit: usize,
) -> Result<Vec<u8>, String> {
    if opens_any && !nesting_ok(m, 0) {
        return Err(format!("the gRPC response nests messages more than {MAX_NESTING} deep"));
    }
    let mut out = Capped { buf: Vec::new(), limit };
    let mut ser = serde_json::Serializer::new(&mut out);
    m.serialize_with_options(&mut ser, opts)
        .map_err(|e| format!("failed to encode the gRPC response as JSON: {e}"))?;
    Ok(out.buf)
}

/// A writer that fails past `limit` bytes.
struct Capped {
    buf: Vec<u8>,
    limit: usize,
}

impl std::io::Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + b.len() > self.limit {
            return Err(std::io::Error::other(format!("the JSON is larger than {} bytes", self.limit)));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Splits a gRPC byte stream into messages.
struct FrameReader {
    buf: BytesMut,
    /// Largest message taken: a node that announces a larger one (up to 4 GiB in its length
    /// prefix) gets an error at once instead of the gateway buffering it.
    max: usize,
}

impl FrameReader {
    fn new(max: usize) -> FrameReader {
        FrameReader { buf: BytesMut::new(), max }
    }

    fn push(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }
    fn next_message(&mut self) -> Result<Option<Bytes>, String> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        if self.buf[0] != 0 {
            return Err("compressed gRPC messages are not supported".into());
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > self.max {
            return Err(format!(
                "a streamed message of {len} bytes is larger than max_resp_body_size ({})",
                self.max
            ));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        self.buf.advance(5);
        Ok(Some(self.buf.split_to(len).freeze()))
    }
}

fn streaming_response(
    t: &Transcoder,
    resp: Response<ProxyBody>,
    sse: bool,
    status_in_head: bool,
    deadline: Option<tokio::time::Instant>,
) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    let stream = JsonStream {
        inner: body,
        frames: FrameReader::new(t.max_resp_body_size),
        out: VecDeque::new(),
        done: false,
        sse,
        status_in_head,
        deadline,
        t: StreamCtx {
            output: t.method.output(),
            serialize: t.serialize.clone(),
            opens_any: t.opens_any,
            json_limit: t.max_resp_body_size.saturating_mul(JSON_GROWTH),
        },
    };
    parts.headers.clear();
    let ct = if sse { "text/event-stream" } else { "application/x-ndjson" };
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    parts.headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Response::from_parts(parts, ProxyBody::boxed(stream))
}

struct StreamCtx {
    output: MessageDescriptor,
    serialize: SerializeOptions,
    opens_any: bool,
    json_limit: usize,
}

/// Server-streaming response as NDJSON or SSE.
struct JsonStream {
    inner: ProxyBody,
    frames: FrameReader,
    out: VecDeque<Bytes>,
    done: bool,
    sse: bool,
    /// The status came with the head (a trailers-only answer): no trailers are due.
    status_in_head: bool,
    deadline: Option<tokio::time::Instant>,
    t: StreamCtx,
}

impl JsonStream {
    fn emit(&mut self, json: Vec<u8>) {
        let mut b = Vec::with_capacity(json.len() + 8);
        if self.sse {
            b.extend_from_slice(b"data: ");
            b.extend_from_slice(&json);
            b.extend_from_slice(b"\n\n");
        } else {
            b.extend_from_slice(&json);
            b.push(b'\n');
        }
        self.out.push_back(Bytes::from(b));
    }

    fn emit_error(&mut self, code: u16, message: &str) {
        let v = json!({"error": {"code": code, "message": message, "http_status": http_status_for(code).as_u16()}});
        self.emit(v.to_string().into_bytes());
    }

    fn drain_messages(&mut self) {
        loop {
            match self.frames.next_message() {
                Ok(Some(m)) => match DynamicMessage::decode(self.t.output.clone(), m) {
                    Ok(msg) => {
                        match message_json(&msg, &self.t.serialize, self.t.opens_any, self.t.json_limit) {
                            Ok(json) => self.emit(json),
                            Err(e) => {
                                self.emit_error(13, &e);
                                self.done = true;
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        self.emit_error(13, &format!("failed to decode a streamed message: {e}"));
                        self.done = true;
                        return;
                    }
                },
                Ok(None) => return,
                Err(e) => {
                    self.emit_error(13, &e);
                    self.done = true;
                    return;
                }
            }
        }
    }
}

impl Body for JsonStream {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        loop {
            if let Some(b) = this.out.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(b))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    // Ended without trailers: a call's end is its status.
                    if !this.frames.buf.is_empty() {
                        this.emit_error(13, "the gRPC stream ended inside a message");
                    } else if !this.status_in_head {
                        this.emit_error(13, "the gRPC stream ended without a status");
                    }
                    this.done = true;
                }
                Poll::Ready(Some(Err(_))) if past(this.deadline) => {
                    this.emit_error(4, "deadline exceeded");
                    this.done = true;
                }
                Poll::Ready(Some(Err(e))) => {
                    this.emit_error(14, &format!("the upstream stream broke: {e}"));
                    this.done = true;
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        this.frames.push(&data);
                        this.drain_messages();
                    }
                    Err(frame) => {
                        if let Some(tr) = frame.trailers_ref() {
                            let code = grpc::status_of(tr).unwrap_or(2);
                            if code != 0 {
                                let msg =
                                    tr.get("grpc-message").map(grpc::decode_message).unwrap_or_default();
                                this.emit_error(code, &msg);
                            } else if !this.frames.buf.is_empty() {
                                this.emit_error(13, "the gRPC stream ended inside a message");
                            }
                        }
                        this.done = true;
                    }
                },
            }
        }
    }
}

/// Shared compiled transcoders are cheap to clone.
pub type SharedTranscoder = Arc<Transcoder>;

#[cfg(test)]
mod tests {
    use super::*;

    const PROTO: &str = r#"
        syntax = "proto3";
        package t;
        import "google/protobuf/any.proto";
        service S {
          rpc Get (Req) returns (Rep);
          rpc List (Req) returns (stream Rep);
          rpc Up (stream Req) returns (Rep);
          rpc Open (Req) returns (Boxed);
          rpc Lots (Req) returns (Many);
        }
        message Boxed { google.protobuf.Any any = 1; string note = 2; }
        message Many { repeated Req items = 1; }
        enum Kind { K0 = 0; BIG = 1; }
        message Inner { string note = 1; }
        message Req { string name = 1; int32 n = 2; int64 big = 3; Kind kind = 4; repeated string tags = 5; Inner inner = 6; bool flag = 7; }
        message Rep { string message = 1; repeated string empty = 2; int64 big = 3; Kind kind = 4; }
    "#;

    fn protos() -> Vec<ProtoSpec> {
        vec![ProtoSpec { id: "p".into(), content: PROTO.into() }]
    }

    #[test]
    fn unknown_service_method_and_client_streaming_are_errors_with_paths() {
        let p = protos();
        assert!(build(&json!({"proto_id": "p", "service": "t.S", "method": "Get"}), &p).is_ok());
        let e = build(&json!({"proto_id": "p", "service": "t.Nope", "method": "Get"}), &p).unwrap_err();
        assert_eq!(e.0, ".service");
        let e = build(&json!({"proto_id": "p", "service": "t.S", "method": "Nope"}), &p).unwrap_err();
        assert_eq!(e.0, ".method");
        let e = build(&json!({"proto_id": "p", "service": "t.S", "method": "Up"}), &p).unwrap_err();
        assert!(e.1.contains("client-streaming"));
        let e = build(&json!({"proto_id": "x", "service": "t.S", "method": "Get"}), &p).unwrap_err();
        assert_eq!(e.0, ".proto_id");
        let e =
            build(&json!({"proto_id": "p", "service": "t.S", "method": "Get", "pb_option": ["nope"]}), &p)
                .unwrap_err();
        assert_eq!(e.0, ".pb_option[0]");
    }

    #[test]
    fn query_pairs_become_typed_nested_and_repeated_fields() {
        let t = build(&json!({"proto_id": "p", "service": "t.S", "method": "Get"}), &protos()).unwrap();
        let v = pairs_to_json(
            &t.method.input(),
            &pairs(
                "name=a%20b&n=7&big=9007199254740993&kind=BIG&tags=x&tags=y&inner.note=hi&flag=true&zzz=1",
            ),
        )
        .unwrap();
        assert_eq!(
            v,
            json!({"name": "a b", "n": 7, "big": "9007199254740993", "kind": "BIG", "tags": ["x", "y"], "inner": {"note": "hi"}, "flag": true})
        );
        let m = DynamicMessage::deserialize_with_options(t.method.input(), v, &DeserializeOptions::new())
            .unwrap();
        assert_eq!(m.get_field_by_name("big").unwrap().as_i64(), Some(9_007_199_254_740_993));
        assert!(pairs_to_json(&t.method.input(), &pairs("n=x")).is_err());
    }

    #[test]
    fn responses_keep_proto_names_and_empty_repeated() {
        let t = build(&json!({"proto_id": "p", "service": "t.S", "method": "Get"}), &protos()).unwrap();
        let mut m = DynamicMessage::new(t.method.output());
        m.set_field_by_name("message", prost_reflect::Value::String("hi".into()));
        m.set_field_by_name("big", prost_reflect::Value::I64(12345678901234));
        let out: Value = serde_json::from_slice(&to_json(&t, &m.encode_to_vec()).unwrap()).unwrap();
        assert_eq!(out, json!({"message": "hi", "empty": [], "big": 12345678901234u64, "kind": "K0"}));
        let t = build(&json!({"proto_id": "p", "service": "t.S", "method": "Get", "pb_option": ["int64_as_string", "enum_as_value"]}), &protos()).unwrap();
        let out: Value = serde_json::from_slice(&to_json(&t, &m.encode_to_vec()).unwrap()).unwrap();
        assert_eq!(out["big"], "12345678901234");
        assert_eq!(out["kind"], 0);
    }

    #[test]
    fn status_table_follows_apisix() {
        assert_eq!(http_status_for(14), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(http_status_for(4), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(http_status_for(5), StatusCode::NOT_FOUND);
        assert_eq!(http_status_for(16), StatusCode::UNAUTHORIZED);
        assert_eq!(http_status_for(1).as_u16(), 499);
        // A code the table does not know.
        assert_eq!(http_status_for(17).as_u16(), 599);
        assert_eq!(http_status_for(u16::MAX).as_u16(), 599);
    }

    /// `Boxed` bytes whose `any` holds a `Boxed` whose `any` holds ... `levels` deep.
    fn nested_anys(levels: usize) -> Vec<u8> {
        let mut inner = Vec::new();
        for _ in 0..levels {
            let any = prost_types::Any { type_url: "type.googleapis.com/t.Boxed".into(), value: inner };
            let any = any.encode_to_vec();
            let mut boxed = vec![0x0a];
            prost::encoding::encode_varint(any.len() as u64, &mut boxed);
            boxed.extend_from_slice(&any);
            inner = boxed;
        }
        inner
    }

    /// A node's answer whose `Any` payloads hold one another thousands deep gets an error, not
    /// a stack overflow: each payload is decoded afresh when serialized, past prost's limit.
    #[test]
    fn any_payloads_nested_past_the_limit_are_an_error() {
        let t = build(&json!({"proto_id": "p", "service": "t.S", "method": "Open"}), &protos()).unwrap();
        assert!(t.opens_any);
        let out: Value = serde_json::from_slice(&to_json(&t, &nested_anys(3)).unwrap()).unwrap();
        assert_eq!(out["any"]["@type"], "type.googleapis.com/t.Boxed");
        assert_eq!(out["any"]["any"]["any"]["@type"], "type.googleapis.com/t.Boxed");
        assert!(to_json(&t, &nested_anys(40)).is_ok());
        let e = to_json(&t, &nested_anys(3000)).unwrap_err();
        assert!(e.contains("more than 100 deep"), "{e}");
        // Without an Any anywhere, nothing is walked.
        let t = build(&json!({"proto_id": "p", "service": "t.S", "method": "Get"}), &protos()).unwrap();
        assert!(!t.opens_any);
    }

    /// An answer of empty entries (two bytes each on the wire, a field each in JSON) may become
    /// at most four times `max_resp_body_size` of JSON.
    #[test]
    fn json_grown_past_four_times_the_answer_limit_is_an_error() {
        let mut many = Vec::new();
        for _ in 0..1000 {
            many.extend_from_slice(&[0x0a, 0x00]);
        }
        let conf = |max: u64| json!({"proto_id": "p", "service": "t.S", "method": "Lots", "max_resp_body_size": max});
        let t = build(&conf(2000), &protos()).unwrap();
        let e = to_json(&t, &many).unwrap_err();
        assert!(e.contains("larger than 8000 bytes"), "{e}");
        let t = build(&conf(1 << 20), &protos()).unwrap();
        let out: Value = serde_json::from_slice(&to_json(&t, &many).unwrap()).unwrap();
        assert_eq!(out["items"].as_array().map(Vec::len), Some(1000));
        assert_eq!(out["items"][999]["name"], "");
    }

    #[test]
    fn keys_nested_past_32_parts_are_refused() {
        let proto = PROTO.replace(
            "message Inner { string note = 1; }",
            "message Inner { string note = 1; Inner child = 2; }",
        );
        let protos = vec![ProtoSpec { id: "p".into(), content: proto }];
        let t = build(&json!({"proto_id": "p", "service": "t.S", "method": "Get"}), &protos).unwrap();
        let key = |depth: usize| format!("inner.{}note=x", "child.".repeat(depth));
        let v = pairs_to_json(&t.method.input(), &pairs(&key(30))).unwrap();
        assert!(v["inner"]["child"]["child"]["child"]["child"].is_object());
        let e = pairs_to_json(&t.method.input(), &pairs(&key(31))).unwrap_err();
        assert!(e.contains("more than 32 nested fields"), "{e}");
        // A key of a hundred thousand parts is refused before anything is built.
        assert!(pairs_to_json(&t.method.input(), &pairs(&key(100_000))).is_err());
    }

    /// What a streamed answer ends with when the node's stream ends without trailers: an error
    /// line (INTERNAL), unless the status came in the head; a message cut short is one too.
    #[tokio::test]
    async fn a_stream_that_ends_without_its_status_ends_with_an_error_line() {
        let t = build(&json!({"proto_id": "p", "service": "t.S", "method": "List"}), &protos()).unwrap();
        let mut rep = DynamicMessage::new(t.method.output());
        rep.set_field_by_name("message", prost_reflect::Value::String("one".into()));
        let framed = grpc::frame(&rep.encode_to_vec());
        let lines = |body: Bytes, status_in_head: bool| {
            let resp = Response::new(ProxyBody::full(body));
            let resp = streaming_response(&t, resp, false, status_in_head, None);
            async move {
                let bytes = resp.into_body().collect().await.unwrap().to_bytes();
                String::from_utf8_lossy(&bytes)
                    .lines()
                    .map(|l| serde_json::from_str::<Value>(l).unwrap())
                    .collect::<Vec<_>>()
            }
        };
        let got = lines(framed.clone(), false).await;
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0]["message"], "one");
        assert_eq!(got[1]["error"]["code"], 13);
        assert_eq!(got[1]["error"]["message"], "the gRPC stream ended without a status");
        let got = lines(framed.clone(), true).await;
        assert_eq!(got.len(), 1, "{got:?}");
        let got = lines(framed.slice(..framed.len() - 1), true).await;
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0]["error"]["message"], "the gRPC stream ended inside a message");
    }

    #[test]
    fn frames_split_across_chunks() {
        let mut r = FrameReader::new(3);
        let f = grpc::frame(b"abc");
        r.push(&f[..2]);
        assert_eq!(r.next_message().unwrap(), None);
        r.push(&f[2..]);
        assert_eq!(&r.next_message().unwrap().unwrap()[..], b"abc");
        assert_eq!(r.next_message().unwrap(), None);
        // A message longer than the limit is an error as soon as its length is read.
        r.push(&grpc::frame(b"abcd")[..5]);
        assert!(r.next_message().unwrap_err().contains("larger than max_resp_body_size"));
    }
}
