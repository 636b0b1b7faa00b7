//! The attribute-flow expression language used by join rules, flows and display names.
//!
//! Grammar (whitespace is allowed between tokens):
//!
//! ```text
//! expr    := string | integer | name | "[" any-but-"]" "]" | name "(" [expr ("," expr)*] ")"
//! string  := '"' (char | '\"' | '\\' | '\n' | '\t')* '"'
//! integer := digit+
//! name    := (letter | "_") (letter | digit | "-" | "_" | ";")*      (ASCII letters)
//! ```
//!
//! A bare `dn` (any case) is the object's DN; `[dn]` is an attribute literally named `dn`.
//! Attribute names and function names are matched case-insensitively.
//!
//! Functions: `concat(a, ...)`, `lower(x)`, `upper(x)`, `trim(x)`, `coalesce(a, ...)`,
//! `substring(x, start, length?)` (start and length are integer literals, counted in Unicode
//! characters, clamped to the text).
//!
//! Evaluation never fails: a missing attribute is "no value". An attribute reference yields all
//! its values unchanged (multi-valued and binary included). String functions read the first
//! non-empty text value of their input (binary values count as missing) and yield one text
//! value; an empty text result is "no value", so `trim(concat(givenName, " ", sn))` is missing
//! when both names are. `concat` treats missing parts as "" and is missing only when every part
//! is. `coalesce` yields the first argument that has a value.
//!
//! Error positions are 0-based offsets in Unicode characters (not bytes) from the start of the
//! source.

use std::fmt::{self, Write as _};

use identitymesh_connectors::model::{Attributes, Value};

/// Longest accepted source, in characters: rules are typed by people, and a bound keeps
/// hostile input from costing memory or time.
pub const MAX_EXPRESSION_CHARS: usize = 4096;

/// Deepest accepted nesting of function calls; the parser and evaluator recurse once per level,
/// so this bound is what keeps hostile input from exhausting the stack.
pub const MAX_NESTING_DEPTH: usize = 64;

/// A parsed expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// A string literal.
    Text(String),
    /// An integer literal (yields its decimal text when evaluated on its own).
    Integer(u64),
    /// An attribute of the object, by name (case-insensitive lookup).
    Attribute(String),
    /// The object's DN.
    Dn,
    Concat(Vec<Expr>),
    Lower(Box<Expr>),
    Upper(Box<Expr>),
    Trim(Box<Expr>),
    Coalesce(Vec<Expr>),
    Substring {
        input: Box<Expr>,
        start: usize,
        length: Option<usize>,
    },
}

/// Why a source is not a valid expression, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("position {position}: {message}")]
pub struct ExprError {
    /// 0-based offset in Unicode characters.
    pub position: usize,
    pub message: String,
}

fn error(position: usize, message: impl Into<String>) -> ExprError {
    ExprError {
        position,
        message: message.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Function {
    Coalesce,
    Concat,
    Lower,
    Substring,
    Trim,
    Upper,
}

/// Alphabetical, so the "known functions" list in errors reads well.
const FUNCTIONS: [Function; 6] = [
    Function::Coalesce,
    Function::Concat,
    Function::Lower,
    Function::Substring,
    Function::Trim,
    Function::Upper,
];

impl Function {
    fn name(self) -> &'static str {
        match self {
            Function::Coalesce => "coalesce",
            Function::Concat => "concat",
            Function::Lower => "lower",
            Function::Substring => "substring",
            Function::Trim => "trim",
            Function::Upper => "upper",
        }
    }

    fn from_name(name: &str) -> Option<Function> {
        FUNCTIONS
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(name))
    }

    /// Checks the argument count, returning the message for a wrong one.
    fn check_arity(self, n: usize) -> Result<(), String> {
        let (ok, wanted) = match self {
            Function::Concat | Function::Coalesce => (n >= 1, "at least 1 argument"),
            Function::Lower | Function::Upper | Function::Trim => (n == 1, "exactly 1 argument"),
            Function::Substring => (
                n == 2 || n == 3,
                "2 or 3 arguments (text, start, optional length)",
            ),
        };
        if ok {
            Ok(())
        } else {
            Err(format!("{} takes {wanted} but was given {n}", self.name()))
        }
    }
}

/// True for the first character of a bare attribute or function name.
fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

/// True for the characters of a bare name after the first (LDAP attribute descriptions,
/// options such as `;binary` included).
fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ';')
}

/// Whether `s` can be written without brackets (and so is a valid identity attribute name).
pub fn is_bare_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(is_name_start) && chars.all(is_name_char)
}

/// Case-insensitive comparison of attribute names (Unicode, without allocating).
fn names_equal(a: &str, b: &str) -> bool {
    if a.is_ascii() && b.is_ascii() {
        return a.eq_ignore_ascii_case(b);
    }
    a.chars()
        .flat_map(char::to_lowercase)
        .eq(b.chars().flat_map(char::to_lowercase))
}

/// Finds an attribute by name: the exact spelling first, otherwise the first (in name order)
/// that matches case-insensitively, so the answer is deterministic even if a source sends both
/// `mail` and `Mail`.
pub fn lookup<'a>(attrs: &'a Attributes, name: &str) -> Option<&'a Vec<Value>> {
    attrs.get(name).or_else(|| {
        attrs
            .iter()
            .find(|(k, _)| names_equal(k, name))
            .map(|(_, v)| v)
    })
}

/// The first text value that is not empty; binary values are skipped.
pub fn first_text(values: &[Value]) -> Option<&str> {
    values
        .iter()
        .filter_map(Value::as_text)
        .find(|s| !s.is_empty())
}

/// Whether values carry anything: at least one binary value or non-empty text.
pub fn has_content(values: &[Value]) -> bool {
    values
        .iter()
        .any(|v| !matches!(v, Value::Text(s) if s.is_empty()))
}

fn text_result(s: String) -> Vec<Value> {
    if s.is_empty() {
        Vec::new()
    } else {
        vec![Value::Text(s)]
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Str(String),
    Int(u64),
    Name(String),
    Bracket(String),
    LParen,
    RParen,
    Comma,
    End,
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    pos: usize,
}

fn describe(tok: &Tok) -> String {
    match tok {
        Tok::Str(s) => format!("the string \"{}\"", s.escape_debug()),
        Tok::Int(n) => format!("the number {n}"),
        Tok::Name(n) => format!("'{n}'"),
        Tok::Bracket(n) => format!("'[{n}]'"),
        Tok::LParen => "'('".into(),
        Tok::RParen => "')'".into(),
        Tok::Comma => "','".into(),
        Tok::End => "the end of the expression".into(),
    }
}

const EXPECTED_EXPRESSION: &str =
    "expected an expression (a \"string\", a number, an attribute name, [name] or a function call)";

fn lex(chars: &[char]) -> Result<Vec<Token>, ExprError> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(&c) = chars.get(i) {
        let start = i;
        let tok = match c {
            c if c.is_whitespace() => {
                i += 1;
                continue;
            }
            '(' => {
                i += 1;
                Tok::LParen
            }
            ')' => {
                i += 1;
                Tok::RParen
            }
            ',' => {
                i += 1;
                Tok::Comma
            }
            '"' => {
                i += 1;
                let mut s = String::new();
                loop {
                    match chars.get(i) {
                        None => {
                            return Err(error(
                                start,
                                "unterminated string: add the closing '\"'",
                            ))
                        }
                        Some('"') => {
                            i += 1;
                            break;
                        }
                        Some('\\') => {
                            let escaped = match chars.get(i + 1) {
                                Some('"') => '"',
                                Some('\\') => '\\',
                                Some('n') => '\n',
                                Some('t') => '\t',
                                Some(other) => {
                                    return Err(error(
                                        i,
                                        format!(
                                            "unknown escape '\\{}' in a string; the escapes are \\\" \\\\ \\n and \\t",
                                            other.escape_debug()
                                        ),
                                    ))
                                }
                                None => {
                                    return Err(error(
                                        start,
                                        "unterminated string: add the closing '\"'",
                                    ))
                                }
                            };
                            s.push(escaped);
                            i += 2;
                        }
                        Some(&other) => {
                            s.push(other);
                            i += 1;
                        }
                    }
                }
                Tok::Str(s)
            }
            '[' => {
                let Some(len) = chars[i + 1..].iter().position(|&c| c == ']') else {
                    return Err(error(start, "unterminated [name]: add the closing ']'"));
                };
                if len == 0 {
                    return Err(error(
                        start,
                        "empty attribute name '[]': put the attribute name between the brackets",
                    ));
                }
                let name: String = chars[i + 1..i + 1 + len].iter().collect();
                i += len + 2;
                Tok::Bracket(name)
            }
            d if d.is_ascii_digit() => {
                let mut n: u64 = 0;
                let mut overflow = false;
                while let Some(d) = chars.get(i).and_then(|c| c.to_digit(10)) {
                    match n.checked_mul(10).and_then(|n| n.checked_add(u64::from(d))) {
                        Some(v) => n = v,
                        None => overflow = true,
                    }
                    i += 1;
                }
                if chars.get(i).copied().is_some_and(is_name_char) {
                    while chars.get(i).copied().is_some_and(is_name_char) {
                        i += 1;
                    }
                    let word: String = chars[start..i].iter().collect();
                    return Err(error(
                        start,
                        format!(
                            "'{word}' is not a valid name: bare names start with a letter; write [{word}] for other attribute names"
                        ),
                    ));
                }
                if overflow {
                    return Err(error(
                        start,
                        format!("the number is too large; the largest is {}", u64::MAX),
                    ));
                }
                Tok::Int(n)
            }
            c if is_name_start(c) => {
                while chars.get(i).copied().is_some_and(is_name_char) {
                    i += 1;
                }
                Tok::Name(chars[start..i].iter().collect())
            }
            other => {
                return Err(error(
                    start,
                    format!(
                        "unexpected character '{}'; strings are written in double quotes, and attribute names with other characters in brackets, e.g. [Employee ID]",
                        other.escape_debug()
                    ),
                ))
            }
        };
        out.push(Token { tok, pos: start });
    }
    out.push(Token {
        tok: Tok::End,
        pos: chars.len(),
    });
    Ok(out)
}

/// Parses an expression.
pub fn parse(src: &str) -> Result<Expr, ExprError> {
    // Bounded work even for a huge input: stop counting at the limit.
    if src.chars().nth(MAX_EXPRESSION_CHARS).is_some() {
        return Err(error(
            MAX_EXPRESSION_CHARS,
            format!("the expression is longer than {MAX_EXPRESSION_CHARS} characters; shorten it"),
        ));
    }
    let chars: Vec<char> = src.chars().collect();
    let toks = lex(&chars)?;
    let mut p = Parser { toks, i: 0 };
    let expr = p.expr(0)?;
    let t = p.next();
    if t.tok != Tok::End {
        return Err(error(
            t.pos,
            format!(
                "unexpected {} after the end of the expression; join values with concat(a, b, ...)",
                describe(&t.tok)
            ),
        ));
    }
    Ok(expr)
}

struct Parser {
    toks: Vec<Token>,
    i: usize,
}

impl Parser {
    fn peek(&self) -> &Token {
        // The lexer always ends the list with End, and `next` never moves past it.
        &self.toks[self.i.min(self.toks.len() - 1)]
    }

    fn next(&mut self) -> Token {
        let t = self.peek().clone();
        if t.tok != Tok::End {
            self.i += 1;
        }
        t
    }

    fn expr(&mut self, depth: usize) -> Result<Expr, ExprError> {
        let t = self.next();
        match t.tok {
            Tok::Str(s) => Ok(Expr::Text(s)),
            Tok::Int(n) => Ok(Expr::Integer(n)),
            Tok::Bracket(n) => Ok(Expr::Attribute(n)),
            Tok::Name(n) => {
                if self.peek().tok == Tok::LParen {
                    self.call(&n, t.pos, depth)
                } else if n.eq_ignore_ascii_case("dn") {
                    Ok(Expr::Dn)
                } else {
                    Ok(Expr::Attribute(n))
                }
            }
            other => Err(error(
                t.pos,
                format!("{EXPECTED_EXPRESSION}, found {}", describe(&other)),
            )),
        }
    }

    fn call(&mut self, name: &str, pos: usize, depth: usize) -> Result<Expr, ExprError> {
        let Some(f) = Function::from_name(name) else {
            return Err(unknown_function(name, pos));
        };
        if depth >= MAX_NESTING_DEPTH {
            return Err(error(
                pos,
                format!(
                    "function calls nest more than {MAX_NESTING_DEPTH} deep; flatten the expression (concat and coalesce take any number of arguments)"
                ),
            ));
        }
        let fname = f.name();
        self.next(); // the '(' the caller saw
        let mut args: Vec<(usize, Expr)> = Vec::new();
        if self.peek().tok == Tok::RParen {
            self.next();
        } else {
            loop {
                let arg_pos = self.peek().pos;
                args.push((arg_pos, self.expr(depth + 1)?));
                let t = self.next();
                match t.tok {
                    Tok::Comma => {}
                    Tok::RParen => break,
                    Tok::End => {
                        return Err(error(
                            t.pos,
                            format!("expected ')' after the arguments of {fname}"),
                        ))
                    }
                    other => {
                        return Err(error(
                            t.pos,
                            format!(
                                "expected ',' or ')' after argument {} of {fname}, found {}",
                                args.len(),
                                describe(&other)
                            ),
                        ))
                    }
                }
            }
        }
        f.check_arity(args.len()).map_err(|m| error(pos, m))?;
        let mut args = args.into_iter();
        // After the arity check this cannot miss; it still answers with an error, not a panic.
        let mut next_expr = || {
            args.next()
                .ok_or_else(|| error(pos, format!("{fname} is missing an argument")))
        };
        Ok(match f {
            Function::Concat => Expr::Concat(args.map(|a| a.1).collect()),
            Function::Coalesce => Expr::Coalesce(args.map(|a| a.1).collect()),
            Function::Lower => Expr::Lower(Box::new(next_expr()?.1)),
            Function::Upper => Expr::Upper(Box::new(next_expr()?.1)),
            Function::Trim => Expr::Trim(Box::new(next_expr()?.1)),
            Function::Substring => {
                let input = Box::new(next_expr()?.1);
                let start = integer_arg(next_expr()?, "start")?;
                let length = next_expr()
                    .ok()
                    .map(|a| integer_arg(a, "length"))
                    .transpose()?;
                Expr::Substring {
                    input,
                    start,
                    length,
                }
            }
        })
    }
}

fn integer_arg((pos, e): (usize, Expr), what: &str) -> Result<usize, ExprError> {
    match e {
        // Larger than the address space only on 32-bit targets; clamping keeps the meaning.
        Expr::Integer(n) => Ok(usize::try_from(n).unwrap_or(usize::MAX)),
        _ => Err(error(
            pos,
            format!(
                "the {what} of substring must be a whole number written as digits, e.g. 0 or 3"
            ),
        )),
    }
}

fn unknown_function(name: &str, pos: usize) -> ExprError {
    let known: Vec<&str> = FUNCTIONS.iter().map(|f| f.name()).collect();
    let lower = name.to_ascii_lowercase();
    let suggestion = known
        .iter()
        .map(|k| (edit_distance(&lower, k), *k))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, k)| format!(" did you mean '{k}'?"))
        .unwrap_or_default();
    error(
        pos,
        format!(
            "unknown function '{name}';{suggestion} known functions: {}",
            known.join(", ")
        ),
    )
}

/// Levenshtein distance, for "did you mean" suggestions only (inputs are short).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

impl Expr {
    /// Evaluates against an object's attributes and DN. Never fails: see the module docs.
    pub fn eval(&self, attrs: &Attributes, dn: Option<&str>) -> Vec<Value> {
        match self {
            Expr::Text(s) => text_result(s.clone()),
            Expr::Integer(n) => vec![Value::Text(n.to_string())],
            Expr::Attribute(name) => lookup(attrs, name).cloned().unwrap_or_default(),
            Expr::Dn => text_result(dn.unwrap_or_default().to_owned()),
            Expr::Concat(parts) => {
                let mut out = String::new();
                let mut any = false;
                for p in parts {
                    if let Some(s) = p.eval_text(attrs, dn) {
                        any = true;
                        out.push_str(&s);
                    }
                }
                if any {
                    text_result(out)
                } else {
                    Vec::new()
                }
            }
            Expr::Coalesce(parts) => parts
                .iter()
                .map(|p| p.eval(attrs, dn))
                .find(|v| has_content(v))
                .unwrap_or_default(),
            Expr::Lower(e) => e.map_text(attrs, dn, |s| s.to_lowercase()),
            Expr::Upper(e) => e.map_text(attrs, dn, |s| s.to_uppercase()),
            Expr::Trim(e) => e.map_text(attrs, dn, |s| s.trim().to_owned()),
            Expr::Substring {
                input,
                start,
                length,
            } => input.map_text(attrs, dn, |s| {
                s.chars()
                    .skip(*start)
                    .take(length.unwrap_or(usize::MAX))
                    .collect()
            }),
        }
    }

    /// The first non-empty text value of the result, as string functions see their input.
    pub fn eval_text(&self, attrs: &Attributes, dn: Option<&str>) -> Option<String> {
        match self {
            // Borrow instead of cloning every value of a multi-valued attribute.
            Expr::Attribute(name) => lookup(attrs, name)
                .and_then(|v| first_text(v))
                .map(str::to_owned),
            _ => first_text(&self.eval(attrs, dn)).map(str::to_owned),
        }
    }

    fn map_text(
        &self,
        attrs: &Attributes,
        dn: Option<&str>,
        f: impl FnOnce(&str) -> String,
    ) -> Vec<Value> {
        self.eval_text(attrs, dn)
            .map(|s| text_result(f(&s)))
            .unwrap_or_default()
    }
}

fn write_call<'a>(
    f: &mut fmt::Formatter<'_>,
    name: &str,
    args: impl IntoIterator<Item = &'a Expr>,
) -> fmt::Result {
    write!(f, "{name}(")?;
    for (i, a) in args.into_iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{a}")?;
    }
    f.write_char(')')
}

/// The canonical source form; parsing it gives back an equal expression.
impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Text(s) => {
                f.write_char('"')?;
                for c in s.chars() {
                    match c {
                        '"' => f.write_str("\\\"")?,
                        '\\' => f.write_str("\\\\")?,
                        '\n' => f.write_str("\\n")?,
                        '\t' => f.write_str("\\t")?,
                        c => f.write_char(c)?,
                    }
                }
                f.write_char('"')
            }
            Expr::Integer(n) => write!(f, "{n}"),
            Expr::Attribute(n) if is_bare_name(n) && !n.eq_ignore_ascii_case("dn") => {
                f.write_str(n)
            }
            Expr::Attribute(n) => write!(f, "[{n}]"),
            Expr::Dn => f.write_str("dn"),
            Expr::Concat(a) => write_call(f, "concat", a),
            Expr::Coalesce(a) => write_call(f, "coalesce", a),
            Expr::Lower(e) => write_call(f, "lower", [e.as_ref()]),
            Expr::Upper(e) => write_call(f, "upper", [e.as_ref()]),
            Expr::Trim(e) => write_call(f, "trim", [e.as_ref()]),
            Expr::Substring {
                input,
                start,
                length,
            } => {
                write!(f, "substring({input}, {start}")?;
                if let Some(l) = length {
                    write!(f, ", {l}")?;
                }
                f.write_char(')')
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    const DN: &str = "uid=zoe,ou=people,dc=example,dc=org";

    fn t(s: &str) -> Value {
        Value::Text(s.into())
    }

    fn sample() -> Attributes {
        let mut a = Attributes::new();
        a.insert("givenName".into(), vec![t("Zoë")]);
        a.insert("sn".into(), vec![t("Ünal")]);
        a.insert(
            "mail".into(),
            vec![t("zoe@example.org"), t("z.unal@example.org")],
        );
        a.insert(
            "jpegPhoto".into(),
            vec![Value::Binary(vec![0xff, 0xd8, 0x00])],
        );
        a.insert("cn".into(), vec![t("山田太郎")]);
        a.insert("displayName".into(), vec![t("  Zoë Ünal \t")]);
        a.insert("empty".into(), vec![t("")]);
        a.insert("Employee ID".into(), vec![t("E-42")]);
        a.insert(
            "userCertificate;binary".into(),
            vec![Value::Binary(vec![1, 2, 3])],
        );
        a.insert(
            "mixed".into(),
            vec![Value::Binary(vec![9]), t(""), t("After-Binary")],
        );
        a.insert("street".into(), vec![t("Straße")]);
        a
    }

    #[test]
    fn good_expressions_evaluate_on_a_sample_object() {
        let attrs = sample();
        let bin = |b: &[u8]| vec![Value::Binary(b.to_vec())];
        let cases: Vec<(&str, Vec<Value>)> = vec![
            ("givenName", vec![t("Zoë")]),
            ("GIVENNAME", vec![t("Zoë")]),
            ("mail", vec![t("zoe@example.org"), t("z.unal@example.org")]),
            ("jpegPhoto", bin(&[0xff, 0xd8, 0x00])),
            ("userCertificate;binary", bin(&[1, 2, 3])),
            ("[Employee ID]", vec![t("E-42")]),
            ("[employee id]", vec![t("E-42")]),
            ("missing", vec![]),
            ("empty", vec![t("")]),
            ("upper(givenName)", vec![t("ZOË")]),
            ("lower(sn)", vec![t("ünal")]),
            ("upper(street)", vec![t("STRASSE")]),
            ("LoWeR(upper(lower(givenName)))", vec![t("zoë")]),
            ("substring(cn, 1, 2)", vec![t("田太")]),
            ("substring(cn, 2)", vec![t("太郎")]),
            ("substring(cn, 3, 100)", vec![t("郎")]),
            ("substring(cn, 10)", vec![]),
            ("substring(cn, 0, 0)", vec![]),
            (
                "substring(cn, 18446744073709551615, 18446744073709551615)",
                vec![],
            ),
            ("substring(missing, 0, 1)", vec![]),
            ("concat(givenName, \" \", sn)", vec![t("Zoë Ünal")]),
            ("concat(missing, \"-\", givenName)", vec![t("-Zoë")]),
            ("concat(missing, alsoMissing)", vec![]),
            ("concat(mail)", vec![t("zoe@example.org")]),
            ("trim(concat(missing, \" \", alsoMissing))", vec![]),
            ("coalesce(missing, empty, givenName, sn)", vec![t("Zoë")]),
            ("coalesce(missing, empty)", vec![]),
            ("coalesce(jpegPhoto, givenName)", bin(&[0xff, 0xd8, 0x00])),
            (
                "coalesce(missing, mail)",
                vec![t("zoe@example.org"), t("z.unal@example.org")],
            ),
            ("trim(displayName)", vec![t("Zoë Ünal")]),
            ("upper(jpegPhoto)", vec![]),
            ("lower(mixed)", vec![t("after-binary")]),
            ("dn", vec![t(DN)]),
            ("DN", vec![t(DN)]),
            ("upper(substring(dn, 0, 7))", vec![t("UID=ZOE")]),
            ("\"a\\\"b\\\\c\\nd\\te\"", vec![t("a\"b\\c\nd\te")]),
            ("\"\"", vec![]),
            ("42", vec![t("42")]),
            ("  Concat ( givenName ,\"!\" )  ", vec![t("Zoë!")]),
            ("concat(\n\tgivenName,\n\t\"é\"\n)", vec![t("Zoëé")]),
        ];
        for (src, want) in cases {
            let e = parse(src).unwrap_or_else(|e| panic!("{src}: {e}"));
            assert_eq!(e.eval(&attrs, Some(DN)), want, "{src}");
            // The canonical form parses back to the same expression.
            assert_eq!(parse(&e.to_string()).as_ref(), Ok(&e), "{src} → {e}");
        }
    }

    #[test]
    fn dn_without_a_dn_is_missing_and_brackets_reach_an_attribute_named_dn() {
        let mut attrs = sample();
        assert_eq!(parse("dn").unwrap().eval(&attrs, None), vec![]);
        attrs.insert("dn".into(), vec![t("from-csv")]);
        assert_eq!(parse("dn").unwrap().eval(&attrs, None), vec![]);
        assert_eq!(
            parse("[dn]").unwrap().eval(&attrs, Some(DN)),
            vec![t("from-csv")]
        );
        assert_eq!(parse("[dn]").unwrap().to_string(), "[dn]");
        assert_eq!(
            parse("coalesce(dn, [dn])").unwrap().eval(&attrs, None),
            vec![t("from-csv")]
        );
    }

    #[test]
    fn exact_spelling_wins_over_case_insensitive_matches() {
        let mut attrs = Attributes::new();
        attrs.insert("MAIL".into(), vec![t("upper")]);
        attrs.insert("Mail".into(), vec![t("title")]);
        attrs.insert("mail".into(), vec![t("lower")]);
        assert_eq!(parse("Mail").unwrap().eval(&attrs, None), vec![t("title")]);
        // No exact match: the first in name order ("MAIL" < "Mail" < "mail").
        assert_eq!(parse("mAIL").unwrap().eval(&attrs, None), vec![t("upper")]);
        let mut attrs = Attributes::new();
        attrs.insert("Ärger".into(), vec![t("x")]);
        assert_eq!(parse("[ärger]").unwrap().eval(&attrs, None), vec![t("x")]);
    }

    #[test]
    fn bad_expressions_report_exact_positions() {
        let cases: &[(&str, usize, &str)] = &[
            ("", 0, "expected an expression"),
            ("   ", 3, "expected an expression"),
            ("lowr(x)", 0, "unknown function 'lowr'; did you mean 'lower'? known functions: coalesce, concat, lower, substring, trim, upper"),
            ("dn(x)", 0, "unknown function 'dn'"),
            ("concat(givenName, sn", 20, "expected ')' after the arguments of concat"),
            ("concat(givenName sn)", 17, "expected ',' or ')' after argument 1 of concat, found 'sn'"),
            ("concat(a,)", 9, "expected an expression"),
            ("concat()", 0, "concat takes at least 1 argument but was given 0"),
            ("lower()", 0, "lower takes exactly 1 argument but was given 0"),
            ("x(lower(a, b))", 0, "unknown function 'x'"),
            ("concat(lower(a, b))", 7, "lower takes exactly 1 argument but was given 2"),
            ("substring(cn)", 0, "substring takes 2 or 3 arguments"),
            ("substring(cn, 1, 2, 3)", 0, "substring takes 2 or 3 arguments"),
            ("substring(cn, \"1\")", 14, "the start of substring must be a whole number"),
            ("substring(cn, 1, sn)", 17, "the length of substring must be a whole number"),
            ("\"abc", 0, "unterminated string"),
            ("concat(\"abc\\", 7, "unterminated string"),
            ("\"a\\qb\"", 2, "unknown escape '\\q'"),
            ("[abc", 0, "unterminated [name]"),
            ("[]", 0, "empty attribute name"),
            ("givenName sn", 10, "unexpected 'sn' after the end of the expression"),
            ("concat(a, b))", 12, "unexpected ')' after the end"),
            ("mail,", 4, "unexpected ','"),
            (")", 0, "expected an expression (a \"string\", a number, an attribute name, [name] or a function call), found ')'"),
            ("(a)", 0, "found '('"),
            ("2fa", 0, "'2fa' is not a valid name"),
            ("99999999999999999999999", 0, "the number is too large"),
            ("a % b", 2, "unexpected character '%'"),
            // Positions count characters, not bytes: 'é' is two bytes in UTF-8.
            ("\"é\" %", 4, "unexpected character '%'"),
            ("concat(\"山田\" sn)", 12, "after argument 1 of concat"),
            ("lower(\u{0})", 6, "unexpected character '\\0'"),
        ];
        for (src, pos, msg) in cases {
            let e = parse(src).expect_err(src);
            assert_eq!(e.position, *pos, "{src}: {e}");
            assert!(e.message.contains(msg), "{src}: got {e}, wanted {msg}");
            assert!(
                e.to_string().starts_with(&format!("position {pos}: ")),
                "{e}"
            );
        }
    }

    #[test]
    fn length_limit() {
        let name = "a".repeat(MAX_EXPRESSION_CHARS);
        assert_eq!(parse(&name), Ok(Expr::Attribute(name.clone())));
        let e = parse(&format!("{name}a")).unwrap_err();
        assert_eq!(e.position, MAX_EXPRESSION_CHARS);
        assert!(e.message.contains("longer than 4096 characters"), "{e}");
        // Counted in characters: 4096 three-byte characters are accepted.
        let wide = format!("[{}]", "山".repeat(MAX_EXPRESSION_CHARS - 2));
        assert!(parse(&wide).is_ok());
        assert!(parse(&"(".repeat(10_000_000)).is_err());
    }

    #[test]
    fn nesting_limit() {
        let nest = |n: usize| format!("{}x{}", "lower(".repeat(n), ")".repeat(n));
        let ok = parse(&nest(MAX_NESTING_DEPTH)).unwrap();
        assert_eq!(ok.eval(&sample(), None), vec![]);
        let e = parse(&nest(MAX_NESTING_DEPTH + 1)).unwrap_err();
        assert_eq!(e.position, 6 * MAX_NESTING_DEPTH);
        assert!(e.message.contains("nest more than 64 deep"), "{e}");
        // Hostile input fails on depth long before it could exhaust the stack.
        let e = parse(&"concat(".repeat(580)).unwrap_err();
        assert_eq!(e.position, 7 * MAX_NESTING_DEPTH);
    }

    /// A random valid expression, as source text with random spacing.
    fn gen_expr(rng: &mut StdRng, depth: usize) -> String {
        let sp = |rng: &mut StdRng| ["", " ", "\n\t "][rng.gen_range(0..3)];
        let leaf = |rng: &mut StdRng| {
            [
                "givenName",
                "MAIL",
                "cn",
                "jpegPhoto",
                "[Employee ID]",
                "dn",
                "missing",
                "\"a\\\"b\"",
                "\"\"",
                "7",
                "\"山田\"",
            ][rng.gen_range(0..11)]
            .to_string()
        };
        if depth == 0 || rng.gen_bool(0.3) {
            return leaf(rng);
        }
        let (name, n) = match rng.gen_range(0..6) {
            0 => ("concat", rng.gen_range(1..4)),
            1 => ("coalesce", rng.gen_range(1..4)),
            2 => ("Lower", 1),
            3 => ("UPPER", 1),
            4 => ("trim", 1),
            _ => {
                let len = if rng.gen_bool(0.5) {
                    format!(",{}{}", sp(rng), rng.gen_range(0..9))
                } else {
                    String::new()
                };
                let inner = gen_expr(rng, depth - 1);
                return format!("substring({inner},{}{}{len})", sp(rng), rng.gen_range(0..9));
            }
        };
        let args: Vec<String> = (0..n).map(|_| gen_expr(rng, depth - 1)).collect();
        let s1 = sp(rng);
        format!(
            "{name}{s1}({}){}",
            args.join(&format!(",{}", sp(rng))),
            sp(rng)
        )
    }

    #[test]
    fn generated_expressions_parse_and_mutations_never_panic() {
        let mut rng = StdRng::seed_from_u64(64);
        let attrs = sample();
        for _ in 0..3_000 {
            let src = gen_expr(&mut rng, 6);
            let e = parse(&src).unwrap_or_else(|e| panic!("{src:?}: {e}"));
            let _ = e.eval(&attrs, Some(DN));
            assert_eq!(parse(&e.to_string()).as_ref(), Ok(&e), "{src:?}");
            // One-character damage anywhere: an error or another valid expression, never a panic.
            let mut chars: Vec<char> = src.chars().collect();
            let at = rng.gen_range(0..chars.len());
            match rng.gen_range(0..3) {
                0 => {
                    chars.remove(at);
                }
                1 => chars.insert(
                    at,
                    ['(', ')', ',', '"', '[', ']', '\\', 'x'][rng.gen_range(0..8)],
                ),
                _ => chars.truncate(at),
            }
            let damaged: String = chars.into_iter().collect();
            if let Ok(e) = parse(&damaged) {
                let _ = e.eval(&attrs, None);
            }
        }
    }

    #[test]
    fn random_input_never_panics() {
        let mut rng = StdRng::seed_from_u64(0x1de7_17e5);
        let attrs = sample();
        let pieces = [
            "concat",
            "lower",
            "upper",
            "trim",
            "coalesce",
            "substring",
            "dn",
            "givenName",
            "mail",
            "jpegPhoto",
            "cn",
            "(",
            ")",
            ",",
            " ",
            "\"",
            "\\",
            "\"x\"",
            "[",
            "]",
            "[a b]",
            "0",
            "1",
            "3",
            "99999999999999999999",
            "é",
            "山",
            "\n",
            ";",
            "-",
        ];
        let mut parsed = 0;
        for round in 0..30_000 {
            let src = if round % 2 == 0 {
                let len = rng.gen_range(0..48);
                let bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            } else {
                let len = rng.gen_range(0..24);
                (0..len)
                    .map(|_| pieces[rng.gen_range(0..pieces.len())])
                    .collect()
            };
            match parse(&src) {
                Ok(e) => {
                    parsed += 1;
                    let _ = e.eval(&attrs, Some(DN));
                    assert_eq!(parse(&e.to_string()).as_ref(), Ok(&e), "{src:?}");
                }
                Err(e) => {
                    assert!(e.position <= src.chars().count(), "{src:?}: {e}");
                }
            }
        }
        // The token soup must reach the success paths too, or the test proves little.
        assert!(parsed > 500, "only {parsed} inputs parsed");
    }
}

/// Property tests with shrinking, in the ordinary test run (bounded cases), beside the seeded
/// random tests above.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    fn expr() -> impl Strategy<Value = Expr> {
        let leaf = prop_oneof![
            "\\PC{0,12}".prop_map(Expr::Text),
            (0u64..1_000_000).prop_map(Expr::Integer),
            "[a-zA-Z][a-zA-Z0-9;-]{0,10}".prop_map(Expr::Attribute),
            Just(Expr::Dn),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 1..4).prop_map(Expr::Concat),
                proptest::collection::vec(inner.clone(), 1..4).prop_map(Expr::Coalesce),
                inner.clone().prop_map(|e| Expr::Lower(Box::new(e))),
                inner.clone().prop_map(|e| Expr::Upper(Box::new(e))),
                inner.clone().prop_map(|e| Expr::Trim(Box::new(e))),
                (inner, 0usize..50, proptest::option::of(0usize..50)).prop_map(
                    |(e, start, length)| Expr::Substring {
                        input: Box::new(e),
                        start,
                        length,
                    }
                ),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_text_never_panics(src in "\\PC{0,80}") {
            let _ = parse(&src);
        }

        #[test]
        fn canonical_form_round_trips(e in expr()) {
            let src = e.to_string();
            let back = parse(&src).map_err(|err| TestCaseError::fail(format!("{src:?}: {err}")))?;
            prop_assert_eq!(back, e, "{}", src);
        }
    }
}
