//! The data expression optimiser: before evaluation, runs of equal bytes
//! become fills, adjacent bytes and strings merge, nested groups flatten,
//! repeats of fills multiply and slices of literals are cut, so a large
//! disk written as `0*1G` or `(0x55 0xaa)*1M` costs a fill, not a loop.
//! It rewrites only the *pure* part of an expression (bytes, strings,
//! groups of them, repeats, slices): a group with offsets, alignment,
//! assignments, names, files or scripts keeps its shape (its own items
//! are optimised one by one), since flattening it would move its offsets.
//!
//! `-D data.AST=1` prints the optimised tree, in nbdkit's notation
//! (`fill(B*N)`, `"..."`, `( … )`, `null`), between `BEGIN AST` and
//! `END AST` debug lines.

use super::expr::{Expr, Item};

/// A string repeat is written out when the result is at most this long;
/// longer ones stay repeats.
const EXPAND_LIMIT: u64 = 4096;

/// The pure subset of an expression, in optimised form.
#[derive(Debug, Clone, PartialEq)]
enum Node {
    Null,
    Byte(u8),
    Fill(u8, u64),
    Str(Vec<u8>),
    List(Vec<Node>),
    Repeat(Box<Node>, u64),
    Slice(Box<Node>, Option<u64>, Option<u64>),
}

/// Optimise a top-level sequence.
pub(crate) fn optimize_items(items: &[Item]) -> Vec<Item> {
    if let Some(node) = pure_items(items) {
        return match opt(node) {
            Node::List(v) => v.into_iter().map(|n| Item::Expr(to_expr(n))).collect(),
            Node::Null => Vec::new(),
            n => vec![Item::Expr(to_expr(n))],
        };
    }
    items.iter().map(optimize_item).collect()
}

fn optimize_item(item: &Item) -> Item {
    match item {
        Item::Expr(e) => Item::Expr(optimize_expr(e)),
        Item::Assign(e, name) => Item::Assign(optimize_expr(e), name.clone()),
        other => other.clone(),
    }
}

fn optimize_expr(e: &Expr) -> Expr {
    if let Some(n) = pure(e) {
        return to_expr(opt(n));
    }
    match e {
        Expr::Group(items) => Expr::Group(items.iter().map(optimize_item).collect()),
        Expr::Repeat(inner, n) => Expr::Repeat(Box::new(optimize_expr(inner)), *n),
        Expr::Slice(inner, a, b) => Expr::Slice(Box::new(optimize_expr(inner)), *a, *b),
        other => other.clone(),
    }
}

fn pure_items(items: &[Item]) -> Option<Node> {
    items
        .iter()
        .map(|i| match i {
            Item::Expr(e) => pure(e),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()
        .map(Node::List)
}

fn pure(e: &Expr) -> Option<Node> {
    Some(match e {
        Expr::Bytes(b) => Node::Str(b.clone()),
        Expr::Group(items) => pure_items(items)?,
        Expr::Repeat(inner, n) => Node::Repeat(Box::new(pure(inner)?), *n),
        Expr::Slice(inner, a, b) => Node::Slice(Box::new(pure(inner)?), *a, *b),
        _ => return None,
    })
}

/// A string in its smallest form: null, a byte, a fill or a string.
fn string(s: Vec<u8>) -> Node {
    match s.as_slice() {
        [] => Node::Null,
        [b] => Node::Byte(*b),
        [b, rest @ ..] if rest.iter().all(|x| x == b) => Node::Fill(*b, s.len() as u64),
        _ => Node::Str(s),
    }
}

fn fill(b: u8, n: u64) -> Node {
    match n {
        0 => Node::Null,
        1 => Node::Byte(b),
        _ => Node::Fill(b, n),
    }
}

fn opt(n: Node) -> Node {
    match n {
        Node::Str(s) => string(s),
        Node::List(items) => {
            let mut out: Vec<Node> = Vec::new();
            for item in items.into_iter().map(opt) {
                match item {
                    Node::Null => {}
                    Node::List(inner) => {
                        for i in inner {
                            push(&mut out, i)
                        }
                    }
                    i => push(&mut out, i),
                }
            }
            match out.len() {
                0 => Node::Null,
                1 => out.pop().unwrap_or(Node::Null),
                _ => Node::List(out),
            }
        }
        Node::Repeat(inner, count) => {
            // Zero repeats are nothing, whatever they repeat (even a slice
            // that would not evaluate).
            if count == 0 {
                return Node::Null;
            }
            match opt(*inner) {
                Node::Null => Node::Null,
                Node::Byte(b) => fill(b, count),
                Node::Fill(b, m) => match m.checked_mul(count) {
                    Some(t) => fill(b, t),
                    None => Node::Repeat(Box::new(Node::Fill(b, m)), count),
                },
                Node::Str(s) if (s.len() as u64).saturating_mul(count) <= EXPAND_LIMIT => {
                    string(s.repeat(count as usize))
                }
                i if count == 1 => i,
                i => Node::Repeat(Box::new(i), count),
            }
        }
        Node::Slice(inner, a, b) => {
            let inner = opt(*inner);
            let len = match &inner {
                Node::Null => Some(0),
                Node::Byte(_) => Some(1),
                Node::Fill(_, n) => Some(*n),
                Node::Str(s) => Some(s.len() as u64),
                _ => None,
            };
            let start = a.unwrap_or(0);
            match len {
                Some(len) => {
                    let end = b.unwrap_or(len);
                    if start == end {
                        return Node::Null;
                    }
                    if start > end || end > len {
                        // Left for evaluation to report.
                        return Node::Slice(Box::new(inner), a, b);
                    }
                    match inner {
                        Node::Byte(x) | Node::Fill(x, _) => fill(x, end - start),
                        Node::Str(s) => string(s[start as usize..end as usize].to_vec()),
                        _ => Node::Null,
                    }
                }
                None => Node::Slice(Box::new(inner), a, b),
            }
        }
        other => other,
    }
}

/// Append `n` to a list, merging it with the last element when they
/// combine into one byte run or one string.
fn push(out: &mut Vec<Node>, n: Node) {
    let Some(last) = out.pop() else {
        out.push(n);
        return;
    };
    let merged = match (last, n) {
        (Node::Byte(a), Node::Byte(b)) if a == b => Node::Fill(a, 2),
        (Node::Byte(a), Node::Byte(b)) => Node::Str(vec![a, b]),
        (Node::Byte(a), Node::Fill(b, m)) if a == b => Node::Fill(a, m + 1),
        (Node::Fill(a, m), Node::Byte(b)) if a == b => Node::Fill(a, m + 1),
        (Node::Fill(a, m), Node::Fill(b, k)) if a == b && m.checked_add(k).is_some() => {
            Node::Fill(a, m + k)
        }
        (Node::Str(mut s), Node::Byte(b)) => {
            s.push(b);
            string(s)
        }
        (Node::Byte(a), Node::Str(s)) => {
            let mut v = vec![a];
            v.extend_from_slice(&s);
            string(v)
        }
        (Node::Str(mut s), Node::Str(t)) => {
            s.extend_from_slice(&t);
            string(s)
        }
        (last, n) => {
            out.push(last);
            n
        }
    };
    out.push(merged);
}

fn to_expr(n: Node) -> Expr {
    match n {
        Node::Null => Expr::Group(Vec::new()),
        Node::Byte(b) => Expr::Bytes(vec![b]),
        Node::Fill(b, n) => Expr::Repeat(Box::new(Expr::Bytes(vec![b])), n),
        Node::Str(s) => Expr::Bytes(s),
        Node::List(v) => Expr::Group(v.into_iter().map(|n| Item::Expr(to_expr(n))).collect()),
        Node::Repeat(i, n) => Expr::Repeat(Box::new(to_expr(*i)), n),
        Node::Slice(i, a, b) => Expr::Slice(Box::new(to_expr(*i)), a, b),
    }
}

/// The optimised tree in nbdkit's notation, for `-D data.AST=1`.
pub(crate) fn show_items(items: &[Item]) -> String {
    match items {
        [] => "null".into(),
        [one] => show_item(one),
        _ => format!(
            "( {} )",
            items.iter().map(show_item).collect::<Vec<_>>().join(" ")
        ),
    }
}

fn show_item(i: &Item) -> String {
    match i {
        Item::Abs(n) => format!("@{n}"),
        Item::Rel(d) => format!("@{d:+}"),
        Item::Align(a) => format!("@^{a}"),
        Item::Expr(e) => show(e),
        Item::Assign(e, name) => format!("{} -> \\{name}", show(e)),
    }
}

fn show(e: &Expr) -> String {
    match e {
        Expr::Bytes(b) if b.is_empty() => "null".into(),
        Expr::Bytes(b) if b.len() == 1 => b[0].to_string(),
        Expr::Bytes(b) => {
            let mut s = String::from("\"");
            for &c in b {
                match c {
                    b'"' => s.push_str("\\\""),
                    b'\\' => s.push_str("\\\\"),
                    0x20..=0x7e => s.push(c as char),
                    _ => s.push_str(&format!("\\x{c:02x}")),
                }
            }
            s.push('"');
            s
        }
        Expr::Repeat(inner, n) => match inner.as_ref() {
            Expr::Bytes(b) if b.len() == 1 => format!("fill({}*{n})", b[0]),
            other => format!("{}*{n}", show(other)),
        },
        Expr::Slice(inner, a, b) => format!(
            "{}[{}:{}]",
            show(inner),
            a.map(|v| v.to_string()).unwrap_or_default(),
            b.map(|v| v.to_string()).unwrap_or_default()
        ),
        Expr::Group(items) => show_items(items),
        Expr::File(f) => format!("<{f}"),
        Expr::Script(s) => format!("<({s})"),
        Expr::Name(n) => format!("\\{n}"),
        Expr::Var(v) => format!("${v}"),
    }
}
