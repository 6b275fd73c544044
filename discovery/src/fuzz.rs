//! Test-only: seeded mutations of registry payloads, for the backends' robustness tests, and
//! [`answering_server`], a loopback registry that answers every request as told.
//!
//! A registry may answer any JSON. Each backend's test takes realistic answers, and for every
//! seed of a fixed range mutates them with [`input`] (values replaced by nulls, extreme numbers,
//! odd strings or other parts of the payload; keys deleted or added; array entries dropped or
//! duplicated; the serialized text cut short, or random bytes instead), then runs its parser on
//! the result through [`each_seed`], which names the seed and the input when anything panics
//! or an assertion fails.

use std::panic::{AssertUnwindSafe, catch_unwind};

use serde_json::{Value, json};

/// splitmix64: small, deterministic, good enough to pick mutations.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `[0, n)`; `n` must not be 0.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Strings a registry might send where an address, a port, a status or a name is expected.
pub fn odd_string(rng: &mut Rng) -> String {
    const FIXED: &[&str] = &[
        "",
        " ",
        "é漢字🚀",
        "999999999999",
        "18446744073709551616",
        "-1",
        "0",
        "65535",
        "65536",
        "8080",
        " 80",
        "+80",
        "1e3",
        "::1",
        "[::1]",
        "[::1]:80",
        "1.2.3.4:80",
        "256.1.1.1",
        "10.0.0.1",
        "UP",
        "DOWN",
        "UNKNOWN",
        "true",
        "false",
        "null",
        "ADDED",
        "DELETED",
        "ERROR",
        "\0",
        "a\nb",
        "%2F",
        "../..",
    ];
    match rng.below(10) {
        0 => "x".repeat(1 + rng.below(70_000)),
        1 => "é".repeat(1 + rng.below(5_000)),
        _ => rng.pick(FIXED).to_string(),
    }
}

/// A value of any JSON type, biased to the edges.
pub fn odd_value(rng: &mut Rng) -> Value {
    match rng.below(20) {
        0..=2 => Value::Null,
        3 => Value::Bool(rng.below(2) == 0),
        4..=7 => {
            let numbers = [
                json!(0),
                json!(1),
                json!(-1),
                json!(80),
                json!(65535),
                json!(65536),
                json!(i32::MAX),
                json!(i32::MIN),
                json!(u32::MAX as u64 + 1),
                json!(u64::MAX),
                json!(i64::MIN),
                json!(0.5),
                json!(-0.0),
                json!(8080.0),
                json!(1e308),
                json!(-1e308),
                json!(1e-308),
            ];
            rng.pick(&numbers).clone()
        }
        8..=13 => Value::String(odd_string(rng)),
        14..=16 => {
            let n = rng.below(3);
            Value::Array((0..n).map(|_| shallow_value(rng)).collect())
        }
        _ => {
            let n = rng.below(3);
            let keys = ["$", "@enabled", "ip", "port", "name", "ready", "x"];
            Value::Object((0..n).map(|_| (rng.pick(&keys).to_string(), shallow_value(rng))).collect())
        }
    }
}

/// A scalar, for filling arrays and objects without deep recursion.
fn shallow_value(rng: &mut Rng) -> Value {
    match rng.below(4) {
        0 => Value::Null,
        1 => json!(rng.below(70_000)),
        _ => Value::String(odd_string(rng)),
    }
}

/// A JSON pointer step (`/` and `~` escaped).
fn step(key: &str) -> String {
    format!("/{}", key.replace('~', "~0").replace('/', "~1"))
}

/// Every JSON pointer in `v` (the root is `""`), and every object key seen.
fn paths(v: &Value, at: String, out: &mut Vec<String>, keys: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                keys.push(k.clone());
                paths(x, format!("{at}{}", step(k)), out, keys);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                paths(x, format!("{at}/{i}"), out, keys);
            }
        }
        _ => {}
    }
    out.push(at);
}

/// Splits a non-root pointer into its parent and last step (unescaped).
fn parent_of(p: &str) -> (&str, String) {
    let cut = p.rfind('/').unwrap_or(0);
    (&p[..cut], p[cut + 1..].replace("~1", "/").replace("~0", "~"))
}

/// Applies one random mutation somewhere in `v`.
pub fn mutate(v: &mut Value, rng: &mut Rng) {
    let (mut all, mut keys) = (Vec::new(), Vec::new());
    paths(v, String::new(), &mut all, &mut keys);
    let at = rng.pick(&all).clone();
    let op = rng.below(12);
    // Deleting or duplicating needs a parent; at the root they replace instead.
    if !at.is_empty() && (op == 0 || op == 1) {
        let (parent, last) = parent_of(&at);
        let Some(parent) = v.pointer_mut(parent) else { return };
        match parent {
            Value::Object(m) => {
                if op == 0 {
                    m.remove(&last);
                } else if let Some(x) = m.get(&last).cloned() {
                    // An object cannot hold a key twice: the copy goes under a new key.
                    m.insert(format!("{last}{}", rng.below(3)), x);
                }
            }
            Value::Array(a) => {
                let i: usize = last.parse().unwrap_or(0);
                if i >= a.len() {
                    return;
                }
                if op == 0 {
                    a.remove(i);
                } else {
                    let x = a[i].clone();
                    a.insert(rng.below(a.len() + 1), x);
                }
            }
            _ => {}
        }
        return;
    }
    let donor = if op == 2 { v.pointer(rng.pick(&all).as_str()).cloned() } else { None };
    let Some(target) = v.pointer_mut(&at) else { return };
    match op {
        // Another part of the same payload: the right shape in the wrong place.
        2 => *target = donor.unwrap_or(Value::Null),
        // A known key, added where it was not.
        3 if target.is_object() && !keys.is_empty() => {
            let k = rng.pick(&keys).clone();
            let x = odd_value(rng);
            if let Value::Object(m) = target {
                m.insert(k, x);
            }
        }
        // One given as a list of one, or a list of one given as the one.
        4 => {
            *target = match target.take() {
                Value::Array(mut a) if a.len() == 1 => a.remove(0),
                other => Value::Array(vec![other]),
            }
        }
        _ => *target = odd_value(rng),
    }
}

/// What one seed makes of the payloads: a mutated document, or text that may not parse.
#[derive(Clone)]
pub enum Input {
    Json(Value),
    Text(Vec<u8>),
}

impl Input {
    /// The document, parsed from the text as a backend would (`None` when it does not parse).
    pub fn value(&self) -> Option<Value> {
        match self {
            Input::Json(v) => Some(v.clone()),
            Input::Text(b) => serde_json::from_slice(b).ok(),
        }
    }

    /// Bytes, as read off the wire.
    pub fn bytes(&self) -> Vec<u8> {
        match self {
            Input::Json(v) => serde_json::to_vec(v).unwrap_or_default(),
            Input::Text(b) => b.clone(),
        }
    }
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.bytes()))
    }
}

/// The input of `seed`: one of `payloads` with 1 to 4 mutations; one time in eight its text
/// cut short, one in sixteen random bytes instead.
pub fn input(seed: u64, payloads: &[Value]) -> Input {
    let mut rng = Rng::new(seed);
    let mut v = rng.pick(payloads).clone();
    for _ in 0..1 + rng.below(4) {
        mutate(&mut v, &mut rng);
    }
    match rng.below(16) {
        0 | 1 => {
            let mut b = serde_json::to_vec(&v).unwrap_or_default();
            b.truncate(rng.below(b.len().max(1)));
            Input::Text(b)
        }
        2 => Input::Text((0..rng.below(64)).map(|_| rng.next_u64() as u8).collect()),
        _ => Input::Json(v),
    }
}

/// Runs `check` on the input of every seed in `0..seeds`; a panic or failed assertion names the
/// seed and the input.
pub fn each_seed(seeds: u64, payloads: &[Value], check: impl FnMut(u64, &Input)) {
    each_case(seeds, |seed| input(seed, payloads), check)
}

/// Runs `check` on the case `make` builds from every seed in `0..seeds`; a panic or failed
/// assertion names the seed and the case (its first 3,000 characters).
pub fn each_case<T: std::fmt::Debug>(seeds: u64, make: impl Fn(u64) -> T, mut check: impl FnMut(u64, &T)) {
    for seed in 0..seeds {
        let case = make(seed);
        if catch_unwind(AssertUnwindSafe(|| check(seed, &case))).is_err() {
            let shown = format!("{case:?}");
            let short: String = shown.chars().take(3000).collect();
            let more = if short.len() < shown.len() {
                format!("... ({} bytes)", shown.len())
            } else {
                String::new()
            };
            panic!("seed {seed} failed on: {short}{more}");
        }
    }
}

/// All strings found under `key`, anywhere in `v`.
pub fn strings_under(v: &Value, key: &str) -> Vec<String> {
    let mut out = Vec::new();
    collect(v, key, &mut out);
    out
}

fn collect(v: &Value, key: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == key
                    && let Some(s) = x.as_str()
                {
                    out.push(s.to_string());
                }
                collect(x, key, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect(x, key, out)),
        _ => {}
    }
}

mod tests {
    use super::*;

    #[test]
    fn mutations_are_deterministic_and_change_the_payload() {
        let base = json!({"a": [1, {"b/c": "x"}], "d": {"e": null}});
        let a: Vec<Vec<u8>> = (0..200).map(|s| input(s, std::slice::from_ref(&base)).bytes()).collect();
        let b: Vec<Vec<u8>> = (0..200).map(|s| input(s, std::slice::from_ref(&base)).bytes()).collect();
        assert_eq!(a, b, "a seed always makes the same input");
        let same = a.iter().filter(|x| **x == serde_json::to_vec(&base).unwrap()).count();
        assert!(same < 20, "{same} of 200 inputs are the payload unchanged");
    }
}

/// A loopback HTTP server that reads each request's head and writes `answer()` (a whole HTTP
/// response) back; its address as a URL, and how many connections it took.
pub async fn answering_server(
    answer: impl Fn() -> Vec<u8> + Send + Sync + 'static,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = conn.write_all(&answer()).await;
            });
        }
    });
    (url, count)
}
