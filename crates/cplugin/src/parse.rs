//! The number parsers behind `nbdkit_parse_int*` and
//! `nbdkit_parse_probability`, with C's `strtol(…, 0)` syntax: optional
//! leading space and sign, `0x` hex, leading-`0` octal, else decimal; the
//! whole string must be the number.

/// Parse an integer; `signed` false refuses a minus sign (C's strtoul
/// would silently wrap it).
pub fn c_integer(s: &str, signed: bool) -> Result<i128, String> {
    let t = s.trim_start();
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    if neg && !signed {
        return Err("a negative number is not allowed here".into());
    }
    let (radix, digits) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (16, h)
    } else if t.len() > 1 && t.starts_with('0') {
        (8, &t[1..])
    } else {
        (10, t)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err("not a number".into());
    }
    let v = u128::from_str_radix(digits, radix)
        .map_err(|_| "the number is out of range".to_string())?;
    let v = i128::try_from(v).map_err(|_| "the number is out of range".to_string())?;
    Ok(if neg { -v } else { v })
}

/// A probability: `0.1`, `10%`, `1:10` or `1/10`.  Not negative.
pub fn probability(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let num = |x: &str| -> Result<f64, String> {
        x.trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| "not a number".to_string())
    };
    let v = if let Some(p) = t.strip_suffix('%') {
        num(p)? / 100.0
    } else if let Some((a, b)) = t.split_once([':', '/']) {
        let d = num(b)?;
        if d == 0.0 {
            return Err("division by zero".into());
        }
        num(a)? / d
    } else {
        num(t)?
    };
    if v < 0.0 {
        return Err("a probability cannot be negative".into());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_like_strtol() {
        assert_eq!(c_integer("42", true), Ok(42));
        assert_eq!(c_integer("  -7", true), Ok(-7));
        assert_eq!(c_integer("0x1F", false), Ok(31));
        assert_eq!(c_integer("010", false), Ok(8));
        assert_eq!(c_integer("0", false), Ok(0));
        assert!(c_integer("-1", false).is_err());
        assert!(c_integer("12abc", true).is_err());
        assert!(c_integer("", true).is_err());
        assert!(c_integer("08", true).is_err());
        assert!(c_integer("99999999999999999999999999999999999999999", true).is_err());
    }

    #[test]
    fn probabilities() {
        assert_eq!(probability("0.25"), Ok(0.25));
        assert_eq!(probability("10%"), Ok(0.1));
        assert_eq!(probability("1:4"), Ok(0.25));
        assert_eq!(probability("1/4"), Ok(0.25));
        assert!(probability("1/0").is_err());
        assert!(probability("-1").is_err());
        assert!(probability("x").is_err());
    }
}
