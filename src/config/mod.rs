//! Configuration: `conf/config.yaml` (node settings) and `apisix.yaml` beside it (resources),
//! both in Apache APISIX's format.
//!
//! Loading goes raw text -> `${{VAR}}` substitution -> YAML tree -> typed, validated [`Config`].
//! Every problem is reported as `file: yaml.path: reason`, and all problems of a file are reported
//! together where the shape allows it. Unknown keys are errors; keys that APISIX has but Strait
//! does not implement are errors that say "unsupported".

pub mod discovery;
pub mod node;
pub mod raw;
pub mod resources;
mod value;

use std::fmt;
use std::path::{Path, PathBuf};

pub use node::NodeConfig;
pub use resources::Resources;

/// One configuration problem, located by file and YAML path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// Dotted YAML path, e.g. `routes[2].upstream.nodes`; empty for the whole file.
    pub path: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}: {}", self.file, self.reason)
        } else {
            write!(f, "{}: {}: {}", self.file, self.path, self.reason)
        }
    }
}

/// All problems found while loading a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Collects errors for one file, with a path prefix.
#[derive(Debug)]
pub struct Errors {
    file: String,
    list: Vec<ConfigError>,
}

impl Errors {
    pub fn new(file: impl Into<String>) -> Self {
        Errors { file: file.into(), list: Vec::new() }
    }
    /// Records a problem at `path`.
    pub fn add(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.list.push(ConfigError { file: self.file.clone(), path: path.into(), reason: reason.into() });
    }
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
    pub fn into_result<T>(self, v: T) -> Result<T, ConfigErrors> {
        if self.list.is_empty() { Ok(v) } else { Err(ConfigErrors(self.list)) }
    }
    pub fn file(&self) -> &str {
        &self.file
    }
    pub fn extend(&mut self, other: ConfigErrors) {
        self.list.extend(other.0);
    }
}

/// The whole configuration: node settings and resources.
#[derive(Debug, Clone)]
pub struct Config {
    pub node: NodeConfig,
    pub resources: Resources,
    /// Path of `config.yaml`.
    pub config_path: PathBuf,
    /// Path of `apisix.yaml`.
    pub resources_path: PathBuf,
}

impl Config {
    /// Loads `config.yaml` at `path` and `apisix.yaml` beside it.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let node = NodeConfig::load(path)?;
        let resources_path = resources_path_for(path);
        let resources = Resources::load(&resources_path, &node)?;
        Ok(Config { node, resources, config_path: path.to_path_buf(), resources_path })
    }
}

/// Longest duration a setting can give, about 31 years: larger values (`1e300`) would make
/// `Duration` itself panic, or a timer's deadline overflow.
const MAX_SECONDS: f64 = 1e9;

/// A finite, non-negative number of seconds from configuration, as a `Duration` (at most
/// [`MAX_SECONDS`]; callers check the sign and finiteness and name the setting in errors).
pub fn seconds(t: f64) -> std::time::Duration {
    std::time::Duration::from_secs_f64(if t.is_nan() { 0.0 } else { t.clamp(0.0, MAX_SECONDS) })
}

/// `apisix.yaml` in the directory of `config.yaml`.
pub fn resources_path_for(config: &Path) -> PathBuf {
    config.parent().map(|d| d.join("apisix.yaml")).unwrap_or_else(|| PathBuf::from("apisix.yaml"))
}

/// Reads a file for the configuration, naming it in the error.
pub fn read_file(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.display().to_string(),
            path: String::new(),
            reason: format!("cannot read file: {e}"),
        }])
    })
}

/// Replaces `${{VAR}}` and `${{VAR:=default}}` with environment values, as APISIX does before
/// parsing. A variable that is unset and has no default is an error, naming its line. Comments
/// are left alone: APISIX's own `config.yaml` mentions `${{VAR}}` in comments (it substitutes
/// that file's values after parsing, so they never count).
pub fn substitute_env(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    // While a block scalar (`key: |`, `- >-`) is open: the indentation of the line that
    // opened it, and of its first content line once seen. Its content lines (blank ones, and
    // those indented at least as its first) are text, where `#` is no comment.
    let mut block: Option<(usize, Option<usize>)> = None;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let indent = line.len() - line.trim_start_matches([' ', '\t']).len();
        let blank = line.trim().is_empty();
        if let Some((opener, content)) = block {
            let inside = blank || content.map_or(indent > opener, |c| indent >= c);
            if inside {
                if content.is_none() && !blank {
                    block = Some((opener, Some(indent)));
                }
                substitute_line(line, &lookup, &mut out).map_err(|e| format!("line {}: {e}", i + 1))?;
                continue;
            }
        }
        block = None;
        let code = &line[..comment_start(line)];
        substitute_line(code, &lookup, &mut out).map_err(|e| format!("line {}: {e}", i + 1))?;
        out.push_str(&line[code.len()..]);
        if opens_block_scalar(code) {
            block = Some((indent, None));
        }
    }
    Ok(out)
}

/// Whether a line (without its comment) ends with a block scalar's indicator: `|` or `>`,
/// with an optional chomping sign or indentation digit, after a key or a list dash.
fn opens_block_scalar(code: &str) -> bool {
    let t = code.trim_end();
    let t = t.trim_end_matches(|c: char| c == '-' || c == '+' || c.is_ascii_digit());
    let Some(rest) = t.strip_suffix(['|', '>']) else { return false };
    let rest = rest.trim_end();
    rest.ends_with(':') || rest.trim() == "-" || rest.is_empty()
}

/// Where a line's YAML comment starts (its length if it has none): a `#` at the start or after
/// a space or tab, outside quotes.
fn comment_start(line: &str) -> usize {
    let (mut single, mut double, mut prev) = (false, false, b' ');
    for (i, b) in line.bytes().enumerate() {
        match b {
            b'\'' if !double => single = !single,
            b'"' if !single && prev != b'\\' => double = !double,
            b'#' if !single && !double && (prev == b' ' || prev == b'\t') => return i,
            _ => {}
        }
        prev = b;
    }
    line.len()
}

fn substitute_line(
    text: &str,
    lookup: &impl Fn(&str) -> Option<String>,
    out: &mut String,
) -> Result<(), String> {
    let mut rest = text;
    while let Some(start) = rest.find("${{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 3..];
        let Some(end) = after.find("}}") else {
            return Err("unterminated ${{".into());
        };
        let inner = after[..end].trim();
        let (name, default) = match inner.split_once(":=") {
            Some((n, d)) => (n.trim(), Some(d.trim())),
            None => (inner, None),
        };
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!("invalid environment variable name {name:?}"));
        }
        match lookup(name).or_else(|| default.map(str::to_string)) {
            Some(v) => out.push_str(&v),
            None => {
                return Err(format!("environment variable {name} is not set and has no default"));
            }
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(())
}

/// Parses YAML text into a JSON-like tree (map order kept).
///
/// serde-saphyr's default budget stops at 250,000 YAML nodes and a million parser events, which
/// a standalone file of about 13,000 routes and upstreams passes ("budget breached"). Without
/// aliases a text cannot hold more nodes or events than it has bytes, so those limits (and the
/// one on scalar bytes) grow with the text; the limits on aliases, which are what lets a small
/// text expand into a huge tree, stay as they are.
pub fn parse_yaml(text: &str) -> Result<serde_json::Value, String> {
    if text.trim().is_empty() {
        return Ok(serde_json::Value::Object(Default::default()));
    }
    let mut budget = serde_saphyr::Budget::default();
    let room = text.len().saturating_add(64);
    budget.max_nodes = budget.max_nodes.max(room);
    budget.max_events = budget.max_events.max(room);
    budget.max_total_scalar_bytes = budget.max_total_scalar_bytes.max(room);
    let options = serde_saphyr::options! { budget: Some(budget) };
    let v: serde_json::Value =
        serde_saphyr::from_str_with_options(text, options).map_err(|e| format!("invalid YAML: {e}"))?;
    Ok(match v {
        serde_json::Value::Null => serde_json::Value::Object(Default::default()),
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_substitution_with_defaults() {
        let env = |k: &str| (k == "PORT").then(|| "9081".to_string());
        assert_eq!(substitute_env("p: ${{PORT}}", env).unwrap(), "p: 9081");
        assert_eq!(substitute_env("p: ${{ HOST:=127.0.0.1 }}", env).unwrap(), "p: 127.0.0.1");
        assert_eq!(substitute_env("p: ${{PORT:=1}}", env).unwrap(), "p: 9081");
        assert!(substitute_env("p: ${{MISSING}}", env).unwrap_err().contains("MISSING"));
        assert!(substitute_env("p: ${{PORT", env).is_err());
        assert_eq!(substitute_env("no vars $HOME {{x}}", env).unwrap(), "no vars $HOME {{x}}");
        // Comments are not substituted (APISIX's shipped config.yaml has `${{VAR}}` in some),
        // and errors name the line.
        let text = "# port: ${{UNSET}}\np: ${{PORT}} # or ${{UNSET}}\nq: \"a # ${{PORT}}\"\nr: x#${{PORT}}\n";
        assert_eq!(
            substitute_env(text, env).unwrap(),
            "# port: ${{UNSET}}\np: 9081 # or ${{UNSET}}\nq: \"a # 9081\"\nr: x#9081\n"
        );
        assert_eq!(
            substitute_env("a: 1\nb: ${{MISSING}}\n", env).unwrap_err(),
            "line 2: environment variable MISSING is not set and has no default"
        );
        // A block scalar ends where a line is indented less than its first content line: the
        // next key of a list item (`- uri: |`) is not content, and its comment is left alone.
        let text = "- uri: |\n    text ${{PORT}}\n  name: foo  # see ${{UNSET}}\n";
        assert_eq!(
            substitute_env(text, env).unwrap(),
            "- uri: |\n    text 9081\n  name: foo  # see ${{UNSET}}\n"
        );
        // In a block scalar's content, `#` is text: what follows it is substituted too.
        let text = "x: |\n  #!/bin/sh ${{PORT}}\n  a # ${{PORT}}\n\ny: 1 # ${{UNSET}}\nz:\n  - >-\n    # ${{PORT}}\n";
        assert_eq!(
            substitute_env(text, env).unwrap(),
            "x: |\n  #!/bin/sh 9081\n  a # 9081\n\ny: 1 # ${{UNSET}}\nz:\n  - >-\n    # 9081\n"
        );
    }

    #[test]
    fn yaml_keeps_map_order_and_rejects_garbage() {
        let v = parse_yaml("b: 1\na: 2\n").unwrap();
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["b", "a"]);
        assert!(parse_yaml("a: [1, 2").is_err());
    }

    /// A large standalone file (here 260,000 list items, past serde-saphyr's default budget of
    /// 250,000 nodes) parses, while aliases that expand into a huge tree are still refused with
    /// an error, in a small text and in a large one (whose size raised the node budget).
    #[test]
    fn large_files_parse_and_alias_bombs_do_not() {
        let big = format!("items:\n{}", "  - 1\n".repeat(260_000));
        let v = parse_yaml(&big).unwrap();
        assert_eq!(v["items"].as_array().map(Vec::len), Some(260_000));
        let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for (prev, name) in
            ["a", "b", "c", "d", "e", "f", "g", "h"].iter().zip(["b", "c", "d", "e", "f", "g", "h", "i"])
        {
            let refs = vec![format!("*{prev}"); 10].join(", ");
            bomb.push_str(&format!("{name}: &{name} [{refs}]\n"));
        }
        // Two megabytes of one scalar raise the node budget to two million.
        let padded = format!("pad: {}\n{bomb}", "x".repeat(2 << 20));
        for text in [bomb, padded] {
            let err = parse_yaml(&text).unwrap_err();
            assert!(err.starts_with("invalid YAML") && err.contains("budget"), "{err}");
        }
    }
}
