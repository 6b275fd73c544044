//! Route `vars`: the lua-resty-expr language APISIX uses.
//!
//! A rule is `[var, op, value]` or `[var, "!", op, value]`; a list of rules is an AND; a list whose
//! first element is `"AND"`, `"OR"`, `"!AND"` or `"!OR"` combines the sub-expressions that follow.
//! Operators: `==`, `~=`, `>`, `>=`, `<`, `<=`, `~~` (regex), `~*` (case-insensitive regex),
//! `in`, `has`, `ipmatch`. Comparisons with a number on the right compare numerically.

use std::borrow::Cow;

use regex::{Regex, RegexBuilder};
use serde_json::Value;

use super::ip::IpNet;

/// A request variable an expression can read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Var {
    Uri,
    RequestUri,
    QueryString,
    Host,
    RemoteAddr,
    RemotePort,
    ServerAddr,
    ServerPort,
    RequestMethod,
    Scheme,
    /// `arg_<name>`: a query-string argument.
    Arg(String),
    /// `http_<name>`: a request header, `_` standing for `-`, case-insensitive.
    Http(String),
    /// `cookie_<name>`: a cookie, case-sensitive.
    Cookie(String),
}

impl Var {
    /// Parses a variable name as written in APISIX configs.
    pub fn parse(name: &str) -> Result<Var, String> {
        Ok(match name {
            "uri" => Var::Uri,
            "request_uri" => Var::RequestUri,
            "query_string" | "args" => Var::QueryString,
            "host" => Var::Host,
            "remote_addr" => Var::RemoteAddr,
            "remote_port" => Var::RemotePort,
            "server_addr" => Var::ServerAddr,
            "server_port" => Var::ServerPort,
            "request_method" => Var::RequestMethod,
            "scheme" => Var::Scheme,
            _ => {
                if let Some(a) = name.strip_prefix("arg_").filter(|a| !a.is_empty()) {
                    Var::Arg(a.to_string())
                } else if let Some(h) = name.strip_prefix("http_").filter(|h| !h.is_empty()) {
                    Var::Http(h.to_ascii_lowercase().replace('_', "-"))
                } else if let Some(c) = name.strip_prefix("cookie_").filter(|c| !c.is_empty()) {
                    Var::Cookie(c.to_string())
                } else {
                    return Err(format!(
                        "unknown variable {name:?}: expected uri, request_uri, query_string, host, remote_addr, remote_port, server_addr, server_port, request_method, scheme, arg_*, http_* or cookie_*"
                    ));
                }
            }
        })
    }
}

/// What a rule compares against.
#[derive(Debug, Clone)]
pub enum Operand {
    Str(String),
    Num(f64),
}

impl Operand {
    fn from_json(v: &Value) -> Result<Operand, String> {
        match v {
            Value::String(s) => Ok(Operand::Str(s.clone())),
            Value::Number(n) => n.as_f64().map(Operand::Num).ok_or_else(|| "invalid number".into()),
            Value::Bool(b) => Ok(Operand::Str(b.to_string())),
            other => Err(format!("expected a string or number, found {other}")),
        }
    }
    fn matches_eq(&self, l: &str) -> bool {
        match self {
            Operand::Str(s) => l == s,
            Operand::Num(n) => l.trim().parse::<f64>().is_ok_and(|x| x == *n),
        }
    }
}

/// A comparison.
#[derive(Debug, Clone)]
pub enum Op {
    Eq(Operand),
    Ne(Operand),
    Gt(f64),
    Ge(f64),
    Lt(f64),
    Le(f64),
    Regex(Regex),
    In(Vec<Operand>),
    Has(String),
    IpMatch(Vec<IpNet>),
}

/// A compiled `vars` expression.
#[derive(Debug, Clone)]
pub enum Expr {
    All(Vec<Expr>),
    Any(Vec<Expr>),
    Not(Box<Expr>),
    Rule { var: Var, op: Op },
}

/// Gives expressions access to request variables.
pub trait VarSource {
    fn var(&self, v: &Var) -> Option<Cow<'_, str>>;
}

impl Expr {
    /// Compiles a `vars` value; the error names the offending element relative to `vars`.
    pub fn parse(v: &Value) -> Result<Expr, (String, String)> {
        let Value::Array(items) = v else {
            return Err((String::new(), "must be a list of rules".into()));
        };
        if items.is_empty() {
            // lua-resty-expr: no rules, always true.
            return Ok(Expr::All(Vec::new()));
        }
        parse_list(items, "")
    }

    /// Evaluates against a request.
    pub fn eval(&self, src: &dyn VarSource) -> bool {
        match self {
            Expr::All(list) => list.iter().all(|e| e.eval(src)),
            Expr::Any(list) => list.iter().any(|e| e.eval(src)),
            Expr::Not(e) => !e.eval(src),
            Expr::Rule { var, op } => {
                let val = src.var(var);
                match (op, val.as_deref()) {
                    (Op::Ne(_), None) => true,
                    (_, None) => false,
                    (Op::Eq(r), Some(l)) => r.matches_eq(l),
                    (Op::Ne(r), Some(l)) => !r.matches_eq(l),
                    (Op::Gt(r), Some(l)) => num(l).is_some_and(|x| x > *r),
                    (Op::Ge(r), Some(l)) => num(l).is_some_and(|x| x >= *r),
                    (Op::Lt(r), Some(l)) => num(l).is_some_and(|x| x < *r),
                    (Op::Le(r), Some(l)) => num(l).is_some_and(|x| x <= *r),
                    (Op::Regex(re), Some(l)) => re.is_match(l),
                    (Op::In(list), Some(l)) => list.iter().any(|o| o.matches_eq(l)),
                    (Op::Has(r), Some(l)) => l.split(',').any(|p| p.trim() == r),
                    (Op::IpMatch(nets), Some(l)) => {
                        l.parse().is_ok_and(|ip| nets.iter().any(|n| n.contains(ip)))
                    }
                }
            }
        }
    }
}

fn num(s: &str) -> Option<f64> {
    s.trim().parse().ok()
}

fn parse_list(items: &[Value], path: &str) -> Result<Expr, (String, String)> {
    if items.is_empty() {
        return Err((path.to_string(), "empty expression".into()));
    }
    // A logical operator followed by sub-expressions.
    if let Some(Value::String(first)) = items.first() {
        // Logic words in any case, as lua-resty-expr upper-cases them.
        let logic = match first.to_ascii_uppercase().as_str() {
            "AND" => Some((false, false)),
            "OR" => Some((true, false)),
            "!AND" => Some((false, true)),
            "!OR" => Some((true, true)),
            _ => None,
        };
        if let Some((or, neg)) = logic {
            let mut subs = Vec::new();
            for (i, sub) in items.iter().enumerate().skip(1) {
                let p = format!("{path}[{i}]");
                match sub {
                    Value::Array(a) => subs.push(parse_list(a, &p)?),
                    _ => return Err((p, "expected a rule or sub-expression (a list)".into())),
                }
            }
            let e = if or { Expr::Any(subs) } else { Expr::All(subs) };
            return Ok(if neg { Expr::Not(Box::new(e)) } else { e });
        }
        // A single rule written flat: [var, op, value].
        return parse_rule(items, path);
    }
    let mut rules = Vec::new();
    for (i, r) in items.iter().enumerate() {
        let p = format!("{path}[{i}]");
        match r {
            Value::Array(a) => rules.push(parse_list(a, &p)?),
            _ => return Err((p, "expected a rule (a list)".into())),
        }
    }
    Ok(Expr::All(rules))
}

fn parse_rule(items: &[Value], path: &str) -> Result<Expr, (String, String)> {
    let err = |m: String| (path.to_string(), m);
    let strs: Vec<Option<&str>> = items.iter().map(Value::as_str).collect();
    let (var, negate, op, value) = match (items.len(), strs.get(1).copied().flatten()) {
        (4, Some("!")) => (strs[0], true, strs[2], &items[3]),
        (3, _) => (strs[0], false, strs[1], &items[2]),
        // lua-resty-expr's shorthand for `==`.
        (2, _) => (strs[0], false, Some("=="), &items[1]),
        _ => {
            return Err(err("a rule is [var, op, value], [var, value] or [var, \"!\", op, value]".into()));
        }
    };
    let var = Var::parse(var.ok_or_else(|| err("variable name must be a string".into()))?).map_err(err)?;
    let op_name = op.ok_or_else(|| err("operator must be a string".into()))?;
    let number = |v: &Value| -> Result<f64, (String, String)> {
        match v {
            Value::Number(n) => n.as_f64().ok_or_else(|| err("invalid number".into())),
            Value::String(s) => s.trim().parse().map_err(|_| err(format!("{op_name} needs a number"))),
            _ => Err(err(format!("{op_name} needs a number"))),
        }
    };
    let regex = |ci: bool| -> Result<Regex, (String, String)> {
        let pat = value.as_str().ok_or_else(|| err("a regex must be a string".into()))?;
        RegexBuilder::new(pat)
            .case_insensitive(ci)
            .size_limit(1 << 20)
            .build()
            .map_err(|e| err(format!("invalid regex: {e}")))
    };
    // Operators in any case, as lua-resty-expr lower-cases them (`IN`, `HAS`).
    let op = match op_name.to_ascii_lowercase().as_str() {
        "==" => Op::Eq(Operand::from_json(value).map_err(err)?),
        "~=" => Op::Ne(Operand::from_json(value).map_err(err)?),
        ">" => Op::Gt(number(value)?),
        ">=" => Op::Ge(number(value)?),
        "<" => Op::Lt(number(value)?),
        "<=" => Op::Le(number(value)?),
        "~~" => Op::Regex(regex(false)?),
        "~*" => Op::Regex(regex(true)?),
        "in" => match value {
            Value::Array(a) => {
                Op::In(a.iter().map(Operand::from_json).collect::<Result<_, _>>().map_err(err)?)
            }
            _ => return Err(err("`in` needs a list".into())),
        },
        "has" => match value {
            Value::String(s) => Op::Has(s.clone()),
            Value::Number(n) => Op::Has(n.to_string()),
            _ => return Err(err("`has` needs a string".into())),
        },
        "ipmatch" => {
            let list: Vec<&Value> = match value {
                Value::Array(a) => a.iter().collect(),
                v => vec![v],
            };
            let mut nets = Vec::new();
            for v in list {
                let s = v.as_str().ok_or_else(|| err("`ipmatch` needs IPs or CIDRs".into()))?;
                nets.push(IpNet::parse(s).ok_or_else(|| err(format!("invalid IP or CIDR {s:?}")))?);
            }
            Op::IpMatch(nets)
        }
        other => return Err(err(format!("unknown operator {other:?}"))),
    };
    let rule = Expr::Rule { var, op };
    Ok(if negate { Expr::Not(Box::new(rule)) } else { rule })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Src(HashMap<String, String>);
    impl VarSource for Src {
        fn var(&self, v: &Var) -> Option<Cow<'_, str>> {
            let k = match v {
                Var::Arg(a) => format!("arg_{a}"),
                Var::Http(h) => format!("http_{h}"),
                Var::Cookie(c) => format!("cookie_{c}"),
                Var::RemoteAddr => "remote_addr".into(),
                Var::Uri => "uri".into(),
                _ => return None,
            };
            self.0.get(&k).map(|s| Cow::Borrowed(s.as_str()))
        }
    }

    fn src(pairs: &[(&str, &str)]) -> Src {
        Src(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    fn eval(expr: &str, s: &Src) -> bool {
        Expr::parse(&serde_json::from_str(expr).unwrap()).unwrap().eval(s)
    }

    #[test]
    fn operators() {
        let s = src(&[
            ("arg_name", "json"),
            ("arg_age", "18"),
            ("http_x-env", "Prod"),
            ("remote_addr", "10.0.0.7"),
            ("cookie_k", "v"),
        ]);
        assert!(eval(r#"[["arg_name", "==", "json"]]"#, &s));
        assert!(eval(r#"[["arg_name", "~=", "xml"]]"#, &s));
        assert!(eval(r#"[["arg_age", ">", 17], ["arg_age", "<=", 18]]"#, &s));
        assert!(!eval(r#"[["arg_age", ">=", 19]]"#, &s));
        assert!(eval(r#"[["arg_age", "==", 18]]"#, &s));
        assert!(eval(r#"[["http_x_env", "~*", "^prod$"]]"#, &s));
        assert!(!eval(r#"[["http_x_env", "~~", "^prod$"]]"#, &s));
        assert!(eval(r#"[["arg_name", "in", ["xml", "json"]]]"#, &s));
        assert!(eval(r#"[["arg_name", "!", "in", ["xml"]]]"#, &s));
        assert!(eval(r#"[["remote_addr", "ipmatch", ["10.0.0.0/24"]]]"#, &s));
        assert!(eval(r#"[["cookie_k", "==", "v"]]"#, &s));
        assert!(!eval(r#"[["arg_missing", "==", "x"]]"#, &s));
        assert!(eval(r#"[["arg_missing", "~=", "x"]]"#, &s));
    }

    #[test]
    fn logic_forms() {
        let s = src(&[("arg_a", "1"), ("arg_b", "2")]);
        assert!(eval(r#"["OR", ["arg_a", "==", "9"], ["arg_b", "==", "2"]]"#, &s));
        assert!(!eval(r#"["AND", ["arg_a", "==", "9"], ["arg_b", "==", "2"]]"#, &s));
        assert!(eval(r#"["!AND", ["arg_a", "==", "9"], ["arg_b", "==", "2"]]"#, &s));
        assert!(eval(
            r#"["OR", ["AND", ["arg_a", "==", "1"], ["arg_b", "==", "2"]], ["arg_a", "==", "3"]]"#,
            &s
        ));
        assert!(eval(r#"["arg_a", "==", "1"]"#, &s));
        // As lua-resty-expr takes them: logic words and operators in any case, the two-item
        // shorthand for `==`, and no rules at all (always true).
        assert!(eval(r#"["or", ["arg_a", "==", "9"], ["arg_b", "==", "2"]]"#, &s));
        assert!(!eval(r#"["!Or", ["arg_a", "==", "9"], ["arg_b", "==", "2"]]"#, &s));
        assert!(eval(r#"[["arg_a", "IN", ["1", "3"]], ["arg_b", "!", "In", ["1"]]]"#, &s));
        assert!(eval(r#"[["arg_a", "1"]]"#, &s));
        assert!(!eval(r#"[["arg_a", "2"]]"#, &s));
        assert!(eval("[]", &s));
    }

    #[test]
    fn bad_expressions_say_where() {
        let p = |s: &str| Expr::parse(&serde_json::from_str(s).unwrap()).unwrap_err();
        assert_eq!(p(r#"[["arg_a", "=~", "x"]]"#).0, "[0]");
        assert!(p(r#"[["arg_a", "~~", "("]]"#).1.contains("regex"));
        assert!(p(r#"[["nope", "==", "x"]]"#).1.contains("unknown variable"));
        assert_eq!(p(r#"["OR", ["arg_a", "==", "1"], "x"]"#).0, "[2]");
    }
}
