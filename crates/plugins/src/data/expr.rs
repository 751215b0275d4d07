//! The data plugin's expression language, as documented for nbdkit's data
//! plugin: bytes (`0 1 0x55 0377`), words (`le32:0x7ff`), base64
//! (`base64:MTIz`), strings (`"Hello\n"`), offsets (`@0x1fe`, `@1M`,
//! `@+N`, `@-N`, `@^ALIGN`), files
//! (`<FILE`), scripts (`<(SCRIPT)`), groups (`( ... )`), repeats
//! (`expr*N`), slices (`expr[N:M]`), names (`expr -> \NAME`, `\NAME`),
//! variables (`$VAR`) and comments (`# ...`).
//!
//! Hand-written because no crate parses this language.  The text comes from
//! the command line (and from variables and files it names), so the parser
//! is defensive: nesting depth, evaluation steps and the bytes an
//! expression may expand to are bounded, and every arithmetic step is
//! checked; errors are messages, never panics.
//!
//! Evaluation builds an [`Image`]: a size plus the non-overlapping runs of
//! bytes written, so `@1T 1` costs one byte, not a terabyte.  A group
//! placed into its parent covers its whole extent (the bytes it did not
//! write read as zero there), like a block copied into place.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::rc::Rc;

/// Bytes of a disk image described by an expression.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Image {
    /// Size: the furthest offset the expression reached.
    pub size: u64,
    /// Non-overlapping, non-adjacent runs of written bytes, by offset.
    runs: BTreeMap<u64, Vec<u8>>,
}

impl Image {
    /// An image of exactly these bytes.
    pub fn from_bytes(b: &[u8]) -> Image {
        let mut img = Image {
            size: b.len() as u64,
            runs: BTreeMap::new(),
        };
        img.write(0, b);
        img
    }

    /// The written runs, in order.  Everything else up to `size` is zero.
    pub fn runs(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.runs.iter().map(|(o, d)| (*o, d.as_slice()))
    }

    /// Bytes held in runs.
    pub fn data_len(&self) -> u64 {
        self.runs.values().map(|d| d.len() as u64).sum()
    }

    /// The whole image as one buffer (tests and small images only).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.size as usize];
        for (o, d) in self.runs() {
            let o = o as usize;
            let end = (o + d.len()).min(v.len());
            if o < end {
                v[o..end].copy_from_slice(&d[..end - o]);
            }
        }
        v
    }

    /// Forget the bytes in `[off, off+len)`.
    fn clear(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = off.saturating_add(len);
        // A run starting before `off` that reaches into the range.
        if let Some((&s, d)) = self.runs.range_mut(..off).next_back() {
            let rend = s + d.len() as u64;
            if rend > off {
                let tail = if rend > end {
                    Some(d[(end - s) as usize..].to_vec())
                } else {
                    None
                };
                d.truncate((off - s) as usize);
                if let Some(t) = tail {
                    self.runs.insert(end, t);
                    return;
                }
            }
        }
        let inside: Vec<u64> = self.runs.range(off..end).map(|(&s, _)| s).collect();
        for s in inside {
            let d = self.runs.remove(&s).unwrap_or_default();
            let rend = s + d.len() as u64;
            if rend > end {
                self.runs.insert(end, d[(end - s) as usize..].to_vec());
            }
        }
    }

    /// Write `data` at `off`, over whatever was there.
    fn write(&mut self, off: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let len = data.len() as u64;
        self.clear(off, len);
        // Join the run that ends where this one starts, and the one that
        // starts where this one ends, so sequential bytes make one run.
        let mut start = off;
        let mut buf = match self.runs.range(..off).next_back() {
            Some((&s, d)) if s + d.len() as u64 == off => {
                start = s;
                self.runs.remove(&s).unwrap_or_default()
            }
            _ => Vec::new(),
        };
        buf.extend_from_slice(data);
        if let Some(next) = self.runs.remove(&(off + len)) {
            buf.extend_from_slice(&next);
        }
        self.runs.insert(start, buf);
    }
}

/// What an expression may use from outside itself.
pub struct Context<'a> {
    /// `$VAR`: the plugin's other parameters, then the environment.
    pub var: &'a dyn Fn(&str) -> Option<String>,
    /// Whether `<FILE` and `<(SCRIPT)` may run (off in the fuzzer).
    pub allow_io: bool,
    /// Most bytes of data the whole expression may expand to.
    pub limit: u64,
}

/// Deepest nesting of groups and variables.
const MAX_DEPTH: usize = 64;
/// Most evaluation steps (guards against variables that double each other).
const MAX_STEPS: u64 = 10_000_000;

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Item {
    Abs(u64),
    Rel(i64),
    Align(u64),
    Expr(Expr),
    Assign(Expr, String),
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Expr {
    Bytes(Vec<u8>),
    File(String),
    Script(String),
    Group(Vec<Item>),
    Name(String),
    Var(String),
    Repeat(Box<Expr>, u64),
    Slice(Box<Expr>, Option<u64>, Option<u64>),
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
}

type PResult<T> = Result<T, String>;

impl<'a> Parser<'a> {
    fn err<T>(&self, msg: impl std::fmt::Display) -> PResult<T> {
        Err(format!("at offset {} of the data: {msg}", self.pos))
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn skip_space(&mut self) {
        while let Some(c) = self.peek() {
            if c.is_ascii_whitespace() {
                self.pos += 1;
            } else if c == b'#' {
                while self.peek().is_some_and(|c| c != b'\n') {
                    self.pos += 1;
                }
            } else {
                break;
            }
        }
    }

    /// A run of characters that may belong to a number or word.
    fn word(&mut self) -> &'a str {
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_')
        {
            self.pos += 1;
        }
        std::str::from_utf8(&self.s[start..self.pos]).unwrap_or("")
    }

    fn number(&mut self) -> PResult<u64> {
        let w = self.word();
        parse_number(w).or_else(|e| self.err(e))
    }

    /// A sequence of items, up to `)` (when `nested`) or the end.
    fn seq(&mut self, depth: usize) -> PResult<Vec<Item>> {
        if depth > MAX_DEPTH {
            return self.err("groups are nested too deeply");
        }
        let mut items = Vec::new();
        loop {
            self.skip_space();
            match self.peek() {
                None => {
                    if depth > 0 {
                        return self.err("'(' without a matching ')'");
                    }
                    return Ok(items);
                }
                Some(b')') => {
                    if depth == 0 {
                        return self.err("')' without a matching '('");
                    }
                    self.pos += 1;
                    return Ok(items);
                }
                Some(b'@') => {
                    self.pos += 1;
                    let item = match self.peek() {
                        Some(b'+') => {
                            self.pos += 1;
                            Item::Rel(self.signed(1)?)
                        }
                        Some(b'-') => {
                            self.pos += 1;
                            Item::Rel(self.signed(-1)?)
                        }
                        Some(b'^') => {
                            self.pos += 1;
                            let a = self.number()?;
                            if a == 0 {
                                return self.err("alignment @^0");
                            }
                            Item::Align(a)
                        }
                        _ => {
                            let w = self.word();
                            Item::Abs(parse_offset(w).or_else(|e| self.err(e))?)
                        }
                    };
                    items.push(item);
                }
                Some(_) => {
                    let mut e = self.primary(depth)?;
                    // Postfix operators, which may be chained.
                    loop {
                        self.skip_space();
                        match self.peek() {
                            Some(b'*') => {
                                self.pos += 1;
                                self.skip_space();
                                let n = self.number()?;
                                e = Expr::Repeat(Box::new(e), n);
                            }
                            Some(b'[') => {
                                self.pos += 1;
                                e = self.slice(e)?;
                            }
                            Some(b'-') if self.s.get(self.pos + 1) == Some(&b'>') => {
                                self.pos += 2;
                                self.skip_space();
                                if self.peek() != Some(b'\\') {
                                    return self.err("expected \\NAME after ->");
                                }
                                self.pos += 1;
                                let name = self.name()?;
                                items.push(Item::Assign(e, name));
                                break;
                            }
                            _ => {
                                items.push(Item::Expr(e));
                                break;
                            }
                        }
                    }
                }
            }
        }
    }

    fn signed(&mut self, sign: i64) -> PResult<i64> {
        let n = self.number()?;
        match i64::try_from(n) {
            Ok(v) => Ok(v * sign),
            Err(_) => self.err("offset change is too large"),
        }
    }

    fn slice(&mut self, e: Expr) -> PResult<Expr> {
        self.skip_space();
        let start = if self.peek() == Some(b':') {
            None
        } else {
            Some(self.number()?)
        };
        self.skip_space();
        if self.peek() != Some(b':') {
            return self.err("expected ':' in a slice [N:M]");
        }
        self.pos += 1;
        self.skip_space();
        let end = if self.peek() == Some(b']') {
            None
        } else {
            Some(self.number()?)
        };
        self.skip_space();
        if self.peek() != Some(b']') {
            return self.err("expected ']' to end a slice");
        }
        self.pos += 1;
        if let (Some(a), Some(b)) = (start, end) {
            if b < a {
                return self.err(format!("slice [{a}:{b}] ends before it starts"));
            }
        }
        Ok(Expr::Slice(Box::new(e), start, end))
    }

    fn name(&mut self) -> PResult<String> {
        let start = self.pos;
        while let Some(c) = self.peek() {
            let arrow = c == b'-' && self.s.get(self.pos + 1) == Some(&b'>');
            if (c.is_ascii_alphanumeric() || c == b'_' || c == b'-') && !arrow {
                self.pos += 1;
            } else {
                break;
            }
        }
        if start == self.pos {
            return self.err("expected a name (letters, digits, - and _)");
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.pos]).into_owned())
    }

    fn primary(&mut self, depth: usize) -> PResult<Expr> {
        match self.peek() {
            Some(b'(') => {
                self.pos += 1;
                Ok(Expr::Group(self.seq(depth + 1)?))
            }
            Some(b'"') => {
                self.pos += 1;
                self.string()
            }
            Some(b'\\') => {
                self.pos += 1;
                Ok(Expr::Name(self.name()?))
            }
            Some(b'$') => {
                self.pos += 1;
                let w = self.word();
                if w.is_empty() {
                    return self.err("expected a variable name after $");
                }
                Ok(Expr::Var(w.to_string()))
            }
            Some(b'<') => {
                self.pos += 1;
                if self.peek() == Some(b'(') {
                    self.pos += 1;
                    return self.script();
                }
                let start = self.pos;
                while self
                    .peek()
                    .is_some_and(|c| !c.is_ascii_whitespace() && !b"[*)".contains(&c))
                {
                    self.pos += 1;
                }
                if start == self.pos {
                    return self.err("expected a file name after <");
                }
                Ok(Expr::File(
                    String::from_utf8_lossy(&self.s[start..self.pos]).into_owned(),
                ))
            }
            Some(c) if c.is_ascii_alphanumeric() => {
                let w = self.word();
                if let Some(kind) = ["le16", "be16", "le32", "be32", "le64", "be64"]
                    .iter()
                    .find(|k| **k == w)
                {
                    if self.peek() != Some(b':') {
                        return self.err(format!("expected ':' after {kind}"));
                    }
                    self.pos += 1;
                    let v = self.number()?;
                    return word_bytes(kind, v).or_else(|e| self.err(e));
                }
                if w == "base64" && self.peek() == Some(b':') {
                    self.pos += 1;
                    return self.base64();
                }
                let v = parse_number(w).or_else(|e| self.err(e))?;
                match u8::try_from(v) {
                    Ok(b) => Ok(Expr::Bytes(vec![b])),
                    Err(_) => self.err(format!("byte {w} is out of range 0..255")),
                }
            }
            Some(c) => self.err(format!("unexpected '{}'", c as char)),
            None => self.err("unexpected end"),
        }
    }

    /// After `base64:`: the encoded text, which has no whitespace, up to
    /// whitespace or a postfix operator or `)` (none of which base64
    /// uses), decoded with the standard alphabet and padding, as the
    /// plugin's `base64=` parameter.
    fn base64(&mut self) -> PResult<Expr> {
        use base64::Engine;
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|c| !c.is_ascii_whitespace() && !b"[*)".contains(&c))
        {
            self.pos += 1;
        }
        match base64::engine::general_purpose::STANDARD.decode(&self.s[start..self.pos]) {
            Ok(bytes) => Ok(Expr::Bytes(bytes)),
            Err(e) => self.err(format!("base64: {e}")),
        }
    }

    /// After `<(`: everything to the matching `)`.
    fn script(&mut self) -> PResult<Expr> {
        let start = self.pos;
        let mut level = 1;
        while let Some(c) = self.peek() {
            self.pos += 1;
            match c {
                b'(' => level += 1,
                b')' => {
                    level -= 1;
                    if level == 0 {
                        let body = &self.s[start..self.pos - 1];
                        return Ok(Expr::Script(String::from_utf8_lossy(body).into_owned()));
                    }
                }
                _ => {}
            }
        }
        self.err("<( without a matching )")
    }

    /// After the opening quote: a C-style string.
    fn string(&mut self) -> PResult<Expr> {
        let mut out = Vec::new();
        loop {
            let Some(c) = self.peek() else {
                return self.err("string without a closing quote");
            };
            self.pos += 1;
            match c {
                b'"' => return Ok(Expr::Bytes(out)),
                b'\\' => {
                    let Some(e) = self.peek() else {
                        return self.err("string ends in a backslash");
                    };
                    self.pos += 1;
                    match e {
                        b'n' => out.push(b'\n'),
                        b't' => out.push(b'\t'),
                        b'r' => out.push(b'\r'),
                        b'a' => out.push(7),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        b'v' => out.push(11),
                        b'\\' | b'"' | b'\'' | b'?' => out.push(e),
                        b'x' => {
                            let start = self.pos;
                            while self.pos < start + 2
                                && self.peek().is_some_and(|c| c.is_ascii_hexdigit())
                            {
                                self.pos += 1;
                            }
                            let h = std::str::from_utf8(&self.s[start..self.pos]).unwrap_or("");
                            match u8::from_str_radix(h, 16) {
                                Ok(b) => out.push(b),
                                Err(_) => return self.err("\\x needs hex digits"),
                            }
                        }
                        b'0'..=b'7' => {
                            let mut v: u32 = (e - b'0') as u32;
                            for _ in 0..2 {
                                match self.peek() {
                                    Some(d @ b'0'..=b'7') => {
                                        v = v * 8 + (d - b'0') as u32;
                                        self.pos += 1;
                                    }
                                    _ => break,
                                }
                            }
                            match u8::try_from(v) {
                                Ok(b) => out.push(b),
                                Err(_) => return self.err("octal escape is out of range"),
                            }
                        }
                        _ => return self.err(format!("unknown escape \\{}", e as char)),
                    }
                }
                _ => out.push(c),
            }
        }
    }
}

/// Decimal, octal (leading 0) or hexadecimal (0x) without sign.
fn parse_number(w: &str) -> Result<u64, String> {
    let r = if let Some(h) = w.strip_prefix("0x").or_else(|| w.strip_prefix("0X")) {
        u64::from_str_radix(h, 16)
    } else if w.len() > 1 && w.starts_with('0') {
        u64::from_str_radix(&w[1..], 8)
    } else {
        w.parse::<u64>()
    };
    r.map_err(|_| {
        if w.is_empty() {
            "expected a number".to_string()
        } else {
            format!("'{w}' is not a number (decimal, 0octal or 0xhex)")
        }
    })
}

/// `@OFFSET`: a number as [`parse_number`] reads it, or a decimal one
/// with a size suffix (`@1M`, `@4k`: powers of 1024, as every size
/// parameter), which newer nbdkit documents (the page gives no version)
/// for absolute offsets only.
fn parse_offset(w: &str) -> Result<u64, String> {
    parse_number(w).or_else(|e| {
        let digits = w.bytes().take_while(u8::is_ascii_digit).count();
        // Octal and hex take no suffix: in `0x1fe` the letters are digits.
        let decimal = digits == 1 || (digits > 1 && !w.starts_with('0'));
        if decimal && digits < w.len() {
            nbdkit_backend::parse_size(w).map_err(|se| format!("offset '{w}': {se}"))
        } else {
            Err(e)
        }
    })
}

fn word_bytes(kind: &str, v: u64) -> Result<Expr, String> {
    let bytes = match kind {
        "le16" | "be16" => {
            let x = u16::try_from(v).map_err(|_| format!("{kind}:{v} does not fit"))?;
            if kind == "le16" {
                x.to_le_bytes().to_vec()
            } else {
                x.to_be_bytes().to_vec()
            }
        }
        "le32" | "be32" => {
            let x = u32::try_from(v).map_err(|_| format!("{kind}:{v} does not fit"))?;
            if kind == "le32" {
                x.to_le_bytes().to_vec()
            } else {
                x.to_be_bytes().to_vec()
            }
        }
        "le64" => v.to_le_bytes().to_vec(),
        _ => v.to_be_bytes().to_vec(),
    };
    Ok(Expr::Bytes(bytes))
}

struct Evaluator<'c, 'a> {
    ctx: &'c Context<'a>,
    /// Bytes copied into images so far, against `ctx.limit`.
    spent: u64,
    steps: u64,
    /// Named expressions, one map per scope (innermost last).
    scopes: Vec<HashMap<String, Rc<Image>>>,
}

impl Evaluator<'_, '_> {
    fn charge(&mut self, bytes: u64) -> Result<(), String> {
        self.spent = self.spent.saturating_add(bytes);
        if self.spent > self.ctx.limit {
            return Err(format!(
                "the data expands to more than {} bytes (the limit)",
                self.ctx.limit
            ));
        }
        Ok(())
    }

    fn step(&mut self) -> Result<(), String> {
        self.steps += 1;
        if self.steps > MAX_STEPS {
            return Err("the data expression takes too many steps to evaluate".into());
        }
        Ok(())
    }

    fn seq(&mut self, items: &[Item], depth: usize) -> Result<Image, String> {
        if depth > MAX_DEPTH {
            return Err("groups or variables are nested too deeply".into());
        }
        self.scopes.push(HashMap::new());
        let r = self.seq_inner(items, depth);
        self.scopes.pop();
        r
    }

    fn seq_inner(&mut self, items: &[Item], depth: usize) -> Result<Image, String> {
        let mut img = Image::default();
        let mut off: u64 = 0;
        let too_big = || "offset is out of range".to_string();
        for item in items {
            self.step()?;
            match item {
                Item::Abs(n) => off = *n,
                Item::Rel(d) => {
                    off = off.checked_add_signed(*d).ok_or_else(|| {
                        format!("@{d:+} moves the offset out of range (from {off})")
                    })?
                }
                Item::Align(a) => off = off.checked_next_multiple_of(*a).ok_or_else(too_big)?,
                Item::Expr(e) => {
                    let v = self.expr(e, None, depth)?;
                    self.place(&mut img, off, &v)?;
                    off = off.checked_add(v.size).ok_or_else(too_big)?;
                }
                Item::Assign(e, name) => {
                    let v = self.expr(e, None, depth)?;
                    if let Some(scope) = self.scopes.last_mut() {
                        scope.insert(name.clone(), Rc::new(v));
                    }
                }
            }
            if off > i64::MAX as u64 {
                return Err(too_big());
            }
            img.size = img.size.max(off);
        }
        Ok(img)
    }

    /// Copy `v` into `img` at `off`, covering its whole extent.
    fn place(&mut self, img: &mut Image, off: u64, v: &Image) -> Result<(), String> {
        off.checked_add(v.size)
            .filter(|&e| e <= i64::MAX as u64)
            .ok_or("the data is too large")?;
        self.charge(v.data_len())?;
        img.clear(off, v.size);
        for (o, d) in v.runs() {
            self.step()?;
            img.write(off + o, d);
        }
        Ok(())
    }

    /// Evaluate one expression.  `want` is how many bytes a slice around
    /// it needs, so endless files and scripts are read only that far.
    fn expr(&mut self, e: &Expr, want: Option<u64>, depth: usize) -> Result<Image, String> {
        self.step()?;
        match e {
            Expr::Bytes(b) => {
                self.charge(b.len() as u64)?;
                let mut img = Image {
                    size: b.len() as u64,
                    runs: BTreeMap::new(),
                };
                img.write(0, b);
                Ok(img)
            }
            Expr::Group(items) => self.seq(items, depth + 1),
            Expr::Name(n) => self
                .scopes
                .iter()
                .rev()
                .find_map(|s| s.get(n))
                .map(|v| (**v).clone())
                .ok_or_else(|| format!("\\{n} is not defined here")),
            Expr::Var(name) => {
                let text = (self.ctx.var)(name).ok_or_else(|| {
                    format!("${name}: no parameter or environment variable of that name")
                })?;
                let mut p = Parser {
                    s: text.as_bytes(),
                    pos: 0,
                };
                let items = p.seq(0).map_err(|e| format!("${name}: {e}"))?;
                self.seq(&items, depth + 1)
            }
            Expr::File(path) => self.read_source(path, want, false),
            Expr::Script(body) => self.read_source(body, want, true),
            Expr::Repeat(inner, n) => {
                let v = self.expr(inner, None, depth)?;
                let size = v
                    .size
                    .checked_mul(*n)
                    .filter(|&s| s <= i64::MAX as u64)
                    .ok_or("a repeat makes the data too large")?;
                let mut img = Image {
                    size,
                    runs: BTreeMap::new(),
                };
                if v.runs.is_empty() || *n == 0 {
                    return Ok(img);
                }
                self.charge(v.data_len().saturating_mul(*n))?;
                // A dense expression (one run covering it) repeats as one
                // buffer; others are placed copy by copy.
                if let Some(d) = v.runs.get(&0).filter(|d| d.len() as u64 == v.size) {
                    img.write(0, &d.repeat(*n as usize));
                } else {
                    for i in 0..*n {
                        for (o, d) in v.runs() {
                            self.step()?;
                            img.write(i * v.size + o, d);
                        }
                    }
                }
                Ok(img)
            }
            Expr::Slice(inner, a, b) => {
                let v = self.expr(inner, *b, depth)?;
                let start = a.unwrap_or(0);
                let end = b.unwrap_or(v.size);
                // An empty slice ([N:N]) is empty wherever N is, as nbdkit.
                if start == end {
                    return Ok(Image {
                        size: 0,
                        runs: BTreeMap::new(),
                    });
                }
                if start > end || end > v.size {
                    return Err(format!(
                        "slice [{start}:{end}] is outside the expression (size {})",
                        v.size
                    ));
                }
                let mut img = Image {
                    size: end - start,
                    runs: BTreeMap::new(),
                };
                for (o, d) in v.runs() {
                    let (s, e) = (o.max(start), (o + d.len() as u64).min(end));
                    if s < e {
                        self.step()?;
                        img.write(s - start, &d[(s - o) as usize..(e - o) as usize]);
                    }
                }
                Ok(img)
            }
        }
    }

    /// `<FILE` or `<(SCRIPT)`: read at most `want` bytes (or up to the
    /// limit when the whole source is used).
    fn read_source(
        &mut self,
        what: &str,
        want: Option<u64>,
        script: bool,
    ) -> Result<Image, String> {
        let label = if script {
            "<(...)".to_string()
        } else {
            format!("<{what}")
        };
        if !self.ctx.allow_io {
            return Err(format!("{label}: files and scripts are not allowed here"));
        }
        let room = self.ctx.limit.saturating_sub(self.spent);
        let max = want.unwrap_or(room.saturating_add(1));
        let mut buf = Vec::new();
        if script {
            let mut child = std::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(what)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .map_err(|e| format!("{label}: {e}"))?;
            let mut out = child.stdout.take().ok_or("no stdout")?;
            let r = (&mut out).take(max).read_to_end(&mut buf);
            let stopped_early = buf.len() as u64 == max;
            drop(out);
            if stopped_early {
                // An endless script: stop it now that we have enough.
                let _ = child.kill();
            }
            let status = child.wait().map_err(|e| format!("{label}: {e}"))?;
            r.map_err(|e| format!("{label}: {e}"))?;
            if !stopped_early && !status.success() {
                return Err(format!("{label}: the script failed ({status})"));
            }
        } else {
            let f = std::fs::File::open(what).map_err(|e| format!("{label}: {e}"))?;
            f.take(max)
                .read_to_end(&mut buf)
                .map_err(|e| format!("{label}: {e}"))?;
        }
        if want.is_none() && buf.len() as u64 > room {
            return Err(format!(
                "{label}: more than {} bytes (the limit); use a slice like [:N]",
                self.ctx.limit
            ));
        }
        self.charge(buf.len() as u64)?;
        let mut img = Image {
            size: buf.len() as u64,
            runs: BTreeMap::new(),
        };
        img.write(0, &buf);
        Ok(img)
    }
}

/// Parse and evaluate a data expression.
pub fn evaluate(text: &str, ctx: &Context) -> Result<Image, String> {
    evaluate_as(text, ctx, true)
}

/// [`evaluate`], with or without the optimiser (the tests compare both).
fn evaluate_as(text: &str, ctx: &Context, optimize: bool) -> Result<Image, String> {
    let mut p = Parser {
        s: text.as_bytes(),
        pos: 0,
    };
    let mut items = p.seq(0)?;
    if optimize {
        items = super::optimize::optimize_items(&items);
        if nbdkit_backend::debug_flag("data", "AST").is_some_and(|v| v != 0) {
            tracing::debug!("BEGIN AST");
            tracing::debug!("{}", super::optimize::show_items(&items));
            tracing::debug!("END AST");
        }
    }
    let mut ev = Evaluator {
        ctx,
        spent: 0,
        steps: 0,
        scopes: Vec::new(),
    };
    ev.seq(&items, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn no_vars(_: &str) -> Option<String> {
        None
    }

    fn eval(text: &str) -> Result<Vec<u8>, String> {
        let ctx = Context {
            var: &no_vars,
            allow_io: true,
            limit: 1 << 24,
        };
        evaluate(text, &ctx).map(|i| i.to_vec())
    }

    #[test]
    fn documented_examples() {
        let mut want = vec![0u8; 512];
        want[..4].copy_from_slice(&[0, 1, 2, 3]);
        want[510] = 0x55;
        want[511] = 0xaa;
        assert_eq!(eval("0 1 2 3 @0x1fe 0x55 0xaa").unwrap(), want);
        assert_eq!(eval("0 1 2 3 @^0x200 @-2 le16:0xaa55").unwrap(), want);
        assert_eq!(
            eval(" ( 0x55 0xAA )*2048 ").unwrap(),
            [0x55, 0xaa].repeat(2048)
        );
        assert_eq!(eval("0xFF*16").unwrap(), vec![0xff; 16]);
        assert_eq!(eval(" be32:0x1 ").unwrap(), vec![0, 0, 0, 1]);
        assert_eq!(
            eval("le64:1 be16:0x0102").unwrap(),
            vec![1, 0, 0, 0, 0, 0, 0, 0, 1, 2]
        );
        assert_eq!(eval("010 0x10 10").unwrap(), vec![8, 16, 10]);
        assert_eq!(
            eval(r#""Hello\n\x41\101\"""#).unwrap(),
            b"Hello\nAA\"".to_vec()
        );
        let sig = eval(
            r" ( 0x55 0xAA ) -> \boot-signature
               ( @0x1fe \boot-signature ) -> \sector
               \sector \sector ",
        )
        .unwrap();
        assert_eq!(sig.len(), 1024);
        assert_eq!(&sig[510..512], &[0x55, 0xaa]);
        assert_eq!(&sig[1022..], &[0x55, 0xaa]);
        assert_eq!(eval("(1 2 3 4 5)[1:3] ( 9 )[:1]").unwrap(), vec![2, 3, 9]);
        assert_eq!(eval("1 # a comment\n 2").unwrap(), vec![1, 2]);
        assert_eq!(eval("@4 @+2 @-1 7").unwrap(), vec![0, 0, 0, 0, 0, 7]);
        // nbdkit >= 1.46: base64 inside the language; newer nbdkit: size
        // suffixes on decimal absolute offsets.
        assert_eq!(eval("base64:MTIz 0x34").unwrap(), b"1234".to_vec());
        assert_eq!(eval("(base64:aGk=)*2 base64:").unwrap(), b"hihi".to_vec());
        assert_eq!(eval("base64:AAEC[1:]").unwrap(), vec![1, 2]);
        let k = eval("@1k 7").unwrap();
        assert_eq!((k.len(), k[1024]), (1025, 7));
        assert_eq!(eval("@1M").unwrap().len(), 1 << 20);
        assert_eq!(eval("@2K @-1 9").unwrap().len(), 2048);
        assert_eq!(eval("@0k 5").unwrap(), vec![5]);
        // Later bytes overwrite earlier ones; a group covers its extent.
        assert_eq!(eval("1 1 1 1 @1 2").unwrap(), vec![1, 2, 1, 1]);
        assert_eq!(eval("1 1 1 1 @0 (@2 5)").unwrap(), vec![0, 0, 5, 1]);
    }

    #[test]
    fn files_scripts_and_variables() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"abc").unwrap();
        assert_eq!(
            eval(&format!("<{} @^8 <{}[1:]", f.display(), f.display())).unwrap(),
            b"abc\0\0\0\0\0bc".to_vec()
        );
        // An endless script is read only as far as the slice needs.
        assert_eq!(eval("<(yes ab)[:5]*2").unwrap(), b"ab\nabab\nab".to_vec());
        assert_eq!(eval("<(printf '(x)')").unwrap(), b"(x)".to_vec());
        assert!(eval("<(exit 1)").is_err());
        assert_eq!(eval("</dev/zero[:3]").unwrap(), vec![0, 0, 0]);
        let vars = |n: &str| (n == "pattern").then(|| "0x55 0xAA".to_string());
        let ctx = Context {
            var: &vars,
            allow_io: false,
            limit: 1 << 20,
        };
        assert_eq!(
            evaluate("$pattern*2", &ctx).unwrap().to_vec(),
            vec![0x55, 0xaa, 0x55, 0xaa]
        );
        assert!(evaluate("$nope", &ctx).is_err());
        assert!(evaluate("</etc/passwd", &ctx).is_err());
    }

    #[test]
    fn errors_not_panics() {
        for bad in [
            "256",
            "0x",
            "@-1",
            "(",
            ")",
            "((1)",
            "1*",
            "[",
            "1[2:1]",
            "1[0:2]",
            "\"abc",
            "le16:65536",
            "le8:1",
            "\\x",
            "$",
            "<",
            "@^0",
            "1 ->",
            "1 -> x",
            "\"\\q\"",
            "\\undefined",
            "0x1*0x7fffffffffffffff*2",
            "@0x7fffffffffffffff 1 1",
            "@18446744073709551615",
            "08",
            "base64:MTI",
            "base64:M!Iz",
            "base64 :MTIz",
            "base64",
            "@1q",
            "@0x10k",
            "@010k",
            "@16E",
            "@+1k",
            "@^1k",
        ] {
            assert!(eval(bad).is_err(), "{bad:?} should fail");
        }
        // Bounded: a huge repeat of data fails, of nothing is free.
        assert!(eval("1*1000000000000").is_err());
        let ctx = Context {
            var: &no_vars,
            allow_io: false,
            limit: 100,
        };
        assert_eq!(
            evaluate("(@0x10000000000)*1000", &ctx).unwrap().size,
            1000 << 40
        );
        assert_eq!(
            evaluate("@0x7fffffffffffffff", &ctx).unwrap().size,
            i64::MAX as u64
        );
        let deep = "(".repeat(1000) + &")".repeat(1000);
        assert!(eval(&deep).is_err());
        // Variables that double each other run out of steps, not memory.
        let vars = |n: &str| {
            let i: u32 = n.strip_prefix('v')?.parse().ok()?;
            Some(if i >= 60 {
                "1".to_string()
            } else {
                format!("$v{} $v{}", i + 1, i + 1)
            })
        };
        let ctx = Context {
            var: &vars,
            allow_io: false,
            limit: 1 << 20,
        };
        assert!(evaluate("$v0", &ctx).is_err());
    }

    /// Every input the fuzzer kept is an image within the limit or an
    /// error, as in the fuzz target (fuzz/fuzz_targets/data_expr.rs).
    #[test]
    fn fuzz_corpus_replays() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/corpus/data_expr");
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let var = |name: &str| match name {
            "a" => Some("0x55 $b".to_string()),
            "b" => Some("( 1 2 )*3 $a".to_string()),
            _ => None,
        };
        let ctx = Context {
            var: &var,
            allow_io: false,
            limit: 1 << 20,
        };
        for e in entries.flatten() {
            let bytes = std::fs::read(e.path()).unwrap();
            if let Ok(text) = std::str::from_utf8(&bytes) {
                if let Ok(img) = evaluate(text, &ctx) {
                    assert!(img.data_len() <= 1 << 20, "{:?}", e.path());
                }
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Tok {
        Byte(u8),
        At(u16),
        /// `@Nk`.
        AtK(u8),
        /// `base64:` of these bytes.
        B64(Vec<u8>),
        Rel(i8),
        Group(Vec<u8>, u8),
    }

    fn render(toks: &[Tok]) -> String {
        let mut s = String::new();
        for t in toks {
            match t {
                Tok::Byte(b) => s += &format!(" {b:#x}"),
                Tok::At(o) => s += &format!(" @{o}"),
                Tok::AtK(k) => s += &format!(" @{k}k"),
                Tok::B64(b) => {
                    use base64::Engine;
                    s += &format!(
                        " base64:{}",
                        base64::engine::general_purpose::STANDARD.encode(b)
                    );
                }
                Tok::Rel(d) if *d < 0 => s += &format!(" @-{}", -(*d as i16)),
                Tok::Rel(d) => s += &format!(" @+{d}"),
                Tok::Group(b, n) => {
                    s += " (";
                    for x in b {
                        s += &format!(" {x}");
                    }
                    s += &format!(" )*{n}");
                }
            }
        }
        s
    }

    /// The same sequence written into a flat buffer.
    fn model(toks: &[Tok]) -> Option<Vec<u8>> {
        let mut v: Vec<u8> = Vec::new();
        let mut size = 0usize;
        let mut off = 0i64;
        let put = |v: &mut Vec<u8>, off: usize, b: u8| {
            if v.len() <= off {
                v.resize(off + 1, 0);
            }
            v[off] = b;
        };
        for t in toks {
            match t {
                Tok::Byte(b) => {
                    put(&mut v, off as usize, *b);
                    off += 1;
                }
                Tok::At(o) => off = *o as i64,
                Tok::AtK(k) => off = *k as i64 * 1024,
                Tok::B64(b) => {
                    for x in b {
                        put(&mut v, off as usize, *x);
                        off += 1;
                    }
                }
                Tok::Rel(d) => {
                    off += *d as i64;
                    if off < 0 {
                        return None;
                    }
                }
                Tok::Group(b, n) => {
                    for _ in 0..*n {
                        for x in b {
                            put(&mut v, off as usize, *x);
                            off += 1;
                        }
                    }
                }
            }
            size = size.max(off as usize);
        }
        v.resize(size, 0);
        Some(v)
    }

    fn arb_tok() -> impl Strategy<Value = Tok> {
        prop_oneof![
            4 => any::<u8>().prop_map(Tok::Byte),
            1 => (0u16..2000).prop_map(Tok::At),
            1 => (0u8..3).prop_map(Tok::AtK),
            1 => proptest::collection::vec(any::<u8>(), 0..7).prop_map(Tok::B64),
            1 => any::<i8>().prop_map(Tok::Rel),
            1 => (proptest::collection::vec(any::<u8>(), 0..5), 0u8..10).prop_map(|(b, n)| Tok::Group(b, n)),
        ]
    }

    /// The optimised tree as `-D data.AST=1` shows it.
    fn ast(text: &str) -> String {
        let mut p = Parser {
            s: text.as_bytes(),
            pos: 0,
        };
        super::super::optimize::show_items(&super::super::optimize::optimize_items(
            &p.seq(0).unwrap(),
        ))
    }

    #[test]
    fn optimiser_folds_runs_strings_groups_repeats_and_slices() {
        for (text, want) in [
            ("7", "7"),
            ("9 9 9 9", "fill(9*4)"),
            ("0x41 0x42", "\"AB\""),
            ("\"aaa\" 0x61 \"a\"", "fill(97*5)"),
            ("\"ab\" 0x63 \"de\"", "\"abcde\""),
            ("(((5)))", "5"),
            ("(4 4) 4 (4 4 4)", "fill(4*6)"),
            ("(8 8) (7 7 7 6)", "( fill(8*2) fill(7*3) 6 )"),
            ("(1 2)*0", "null"),
            ("(0x41 0x42)*2*2", "\"ABABABAB\""),
            ("0*1000000", "fill(0*1000000)"),
            ("\"wxyz\"[1:3]", "\"xy\""),
            ("\"wxyz\"[3:]", "122"),
            ("(6 6 6 6)[1:3]", "fill(6*2)"),
            ("\"\"", "null"),
            ("0 @10 1", "( 0 @10 1 )"),
        ] {
            assert_eq!(ast(text), want, "{text}");
        }
    }

    /// Pure expressions (bytes, strings, groups, repeats, slices), as text.
    fn arb_pure() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            (0u8..4).prop_map(|b| b.to_string()),
            "[ab]{0,4}".prop_map(|s| format!("\"{s}\"")),
        ];
        leaf.prop_recursive(4, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| format!("( {} )", v.join(" "))),
                (inner.clone(), 0u8..4).prop_map(|(e, n)| format!("{e}*{n}")),
                (inner, 0u8..5, 0u8..5).prop_map(|(e, a, b)| format!("{e}[{a}:{b}]")),
            ]
        })
    }

    proptest! {
        /// The optimiser never changes what an expression means: the same
        /// bytes, or an error for the same expressions.
        #[test]
        fn optimised_and_plain_evaluation_agree(
            parts in proptest::collection::vec(arb_pure(), 1..5)
        ) {
            let text = parts.join(" ");
            let ctx = Context { var: &no_vars, allow_io: false, limit: 1 << 20 };
            let plain = evaluate_as(&text, &ctx, false).map(|i| i.to_vec());
            let optimised = evaluate_as(&text, &ctx, true).map(|i| i.to_vec());
            match (plain, optimised) {
                (Ok(a), Ok(b)) => prop_assert_eq!(a, b, "{}", text),
                (Err(_), Err(_)) => {}
                // A zero repeat of a bad slice is empty once optimised.
                (Err(_), Ok(b)) => prop_assert!(text.contains("*0"), "{}: {:?}", text, b),
                (Ok(a), Err(e)) => prop_assert!(false, "{}: {:?} became {}", text, a, e),
            }
        }
    }

    proptest! {
        /// Bytes, offsets and repeats land where a flat model puts them.
        #[test]
        fn matches_a_flat_model(toks in proptest::collection::vec(arb_tok(), 0..60)) {
            let text = render(&toks);
            match model(&toks) {
                Some(want) => prop_assert_eq!(eval(&text).unwrap(), want, "{}", text),
                None => prop_assert!(eval(&text).is_err(), "{}", text),
            }
        }

        /// Any text at all is an image or an error, never a panic, within
        /// the limit.
        #[test]
        fn never_panics(text in "[ -~\n]{0,80}") {
            let ctx = Context { var: &no_vars, allow_io: false, limit: 1 << 16 };
            if let Ok(img) = evaluate(&text, &ctx) {
                prop_assert!(img.data_len() <= 1 << 16);
            }
        }

        /// Written runs never overlap or touch, and stay within the size.
        #[test]
        fn runs_are_disjoint(toks in proptest::collection::vec(arb_tok(), 0..60)) {
            let ctx = Context { var: &no_vars, allow_io: false, limit: 1 << 20 };
            if let Ok(img) = evaluate(&render(&toks), &ctx) {
                let mut end = None;
                for (o, d) in img.runs() {
                    prop_assert!(!d.is_empty());
                    if let Some(e) = end { prop_assert!(o > e); }
                    end = Some(o + d.len() as u64);
                }
                prop_assert!(end.unwrap_or(0) <= img.size);
            }
        }
    }
}
