//! Helpers to read a YAML tree with paths in every error.

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::Errors;

/// Joins a YAML path and a key.
pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_string() } else { format!("{path}.{key}") }
}

/// Joins a YAML path and an index.
pub fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

/// Deserializes `v` into `T`, recording a path-qualified error on failure.
pub fn decode<T: DeserializeOwned>(v: &Value, path: &str, errs: &mut Errors) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(v) {
        Ok(t) => Some(t),
        Err(e) => {
            let inner = e.path().to_string();
            let full = if inner == "." || inner.is_empty() {
                path.to_string()
            } else if path.is_empty() {
                inner
            } else if inner.starts_with('[') {
                format!("{path}{inner}")
            } else {
                format!("{path}.{inner}")
            };
            errs.add(full, e.into_inner().to_string());
            None
        }
    }
}

/// Removes keys that APISIX has but Strait does not implement, recording an "unsupported" error
/// for each one present.
pub fn reject_unsupported(v: &mut Value, path: &str, keys: &[&str], errs: &mut Errors) {
    if let Value::Object(map) = v {
        for k in keys {
            if map.remove(*k).is_some() {
                errs.add(join(path, k), "unsupported by Strait");
            }
        }
    }
}

/// Describes a JSON value's type for error messages.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}
