//! `key=value` parameters from the command line, consumed by the filters
//! and the plugin that know them.

use crate::ConfigError;

/// The parameters given after the plugin name, in order.  Each filter takes
/// its own keys, then the plugin takes the rest; the server rejects any key
/// that nobody took, so typos do not pass silently.
#[derive(Debug, Clone, Default)]
pub struct Config {
    params: Vec<(String, String)>,
    taken: Vec<bool>,
    /// Taken by an earlier layer (see [`Config::consume_taken`]).
    consumed: Vec<bool>,
}

impl Config {
    pub fn new(params: Vec<(String, String)>) -> Self {
        let taken = vec![false; params.len()];
        let consumed = taken.clone();
        Config {
            params,
            taken,
            consumed,
        }
    }

    /// From `key=value` pairs given as string slices (tests, embedders).
    pub fn from_pairs(params: &[(&str, &str)]) -> Self {
        Config::new(
            params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    /// Hide the keys taken so far from everyone after: a filter's key is
    /// its own, so the filter `cache=writeback` is not also seen by a
    /// plugin with a `cache` parameter of its own (as in nbdkit, where a
    /// filter's config callback does not pass on the keys it handles).
    pub fn consume_taken(&mut self) {
        self.consumed.clone_from(&self.taken);
    }

    /// Take the last value given for `key`, if any (a later value overrides
    /// an earlier one, as on nbdkit's command line).
    pub fn take(&mut self, key: &str) -> Option<String> {
        let mut found = None;
        for (i, (k, v)) in self.params.iter().enumerate() {
            if k == key && !self.consumed[i] {
                self.taken[i] = true;
                found = Some(v.clone());
            }
        }
        found
    }

    /// Take every value given for a repeatable key, in order.
    pub fn take_all(&mut self, key: &str) -> Vec<String> {
        let mut out = Vec::new();
        for (i, (k, v)) in self.params.iter().enumerate() {
            if k == key && !self.consumed[i] {
                self.taken[i] = true;
                out.push(v.clone());
            }
        }
        out
    }

    /// Take a required key.
    pub fn require(&mut self, key: &str, who: &str) -> Result<String, ConfigError> {
        self.take(key)
            .ok_or_else(|| ConfigError::new(format!("{who}: the '{key}' parameter is required")))
    }

    /// Take a secret (`-`, `-FD`, `+FILE` or the value itself, see
    /// [`crate::secret`]) and read it; errors start with `who: `.
    pub fn take_secret(&mut self, key: &str, who: &str) -> Result<Option<String>, ConfigError> {
        self.take(key)
            .map(|v| {
                crate::secret::read_secret(key, &v)
                    .map_err(|e| ConfigError::new(format!("{who}: {e}")))
            })
            .transpose()
    }

    /// Take a size like `1G`, `512M`, `4096`.
    pub fn take_size(&mut self, key: &str) -> Result<Option<u64>, ConfigError> {
        self.take(key)
            .map(|v| parse_size(&v).map_err(|e| ConfigError::new(format!("{key}={v}: {e}"))))
            .transpose()
    }

    /// Take a boolean like `true`, `off`, `1`.
    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>, ConfigError> {
        self.take(key)
            .map(|v| parse_bool(&v).map_err(|e| ConfigError::new(format!("{key}={v}: {e}"))))
            .transpose()
    }

    /// Take a value parsed with `FromStr`.
    pub fn take_parse<T: std::str::FromStr>(&mut self, key: &str) -> Result<Option<T>, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        self.take(key)
            .map(|v| {
                v.parse::<T>()
                    .map_err(|e| ConfigError::new(format!("{key}={v}: {e}")))
            })
            .transpose()
    }

    /// Take every parameter nobody has taken yet, in command-line order:
    /// for plugins that accept any key (a `Param` named [`ANY_KEY`](crate::registry::ANY_KEY)).
    pub fn take_rest(&mut self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (i, kv) in self.params.iter().enumerate() {
            if !self.taken[i] {
                self.taken[i] = true;
                out.push(kv.clone());
            }
        }
        out
    }

    /// Keys nobody has taken, in order of first appearance.
    pub fn untaken(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for (i, (k, _)) in self.params.iter().enumerate() {
            if !self.taken[i] && !out.contains(&k.as_str()) {
                out.push(k);
            }
        }
        out
    }
}

/// Parse a size with an optional binary suffix: `512`, `4k`, `1M`, `2G`,
/// `1T`, `1P`, `1E` (also `1GiB`, `1GB`: all powers of 1024, as nbdkit).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits_end == 0 {
        return Err("expected a size such as 512, 64K, 1G".into());
    }
    let n: u64 = t[..digits_end].parse().map_err(|e| format!("{e}"))?;
    let suffix = &t[digits_end..];
    let unit = suffix
        .trim_end_matches("iB")
        .trim_end_matches(['B', 'b'])
        .to_ascii_lowercase();
    let shift = match unit.as_str() {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        "e" => 60,
        _ => {
            return Err(format!(
                "unknown size suffix '{suffix}' (use K, M, G, T, P or E)"
            ))
        }
    };
    n.checked_mul(1u64 << shift)
        .filter(|&v| v <= i64::MAX as u64)
        .ok_or_else(|| "size is too large".to_string())
}

/// Parse a delay or duration in nbdkit_parse_delay's forms: a number of
/// seconds (`2`, `1.5`, `2s`), milliseconds (`100ms`), microseconds
/// (`250us` or `250μs`) or nanoseconds (`1000ns`).  Filters' delays and the
/// server's `--timeout` read the same syntax, as in nbdkit.
pub fn parse_delay(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    // The longer suffixes first: "ms" also ends in "s".
    let (num, scale) = [("ms", 1e-3), ("us", 1e-6), ("\u{3bc}s", 1e-6), ("ns", 1e-9)]
        .iter()
        .find_map(|(suffix, scale)| t.strip_suffix(suffix).map(|n| (n, *scale)))
        .unwrap_or_else(|| (t.strip_suffix('s').unwrap_or(t), 1.0));
    let x: f64 = num
        .trim()
        .parse()
        .map_err(|_| "expected a delay such as 2, 2s, 0.5, 100ms, 250us or 1000ns".to_string())?;
    if !x.is_finite() || x < 0.0 {
        return Err("expected a delay of zero or more".to_string());
    }
    std::time::Duration::try_from_secs_f64(x * scale)
        .map_err(|_| "expected a delay of zero or more".to_string())
}

/// Parse a boolean the way nbdkit does.
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "t" | "yes" | "y" | "on" => Ok(true),
        "0" | "false" | "f" | "no" | "n" | "off" => Ok(false),
        _ => Err("expected a boolean (true/false, yes/no, on/off, 1/0)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("2MB").unwrap(), 2 << 20);
        assert!(parse_size("1X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("16E").is_err());
        assert!(parse_size("-1").is_err());
    }

    #[test]
    fn delays_in_nbdkit_parse_delay_forms() {
        use std::time::Duration;
        assert_eq!(parse_delay("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_delay("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_delay("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_delay("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_delay("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_delay("250\u{3bc}s"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_delay("1000ns"), Ok(Duration::from_micros(1)));
        assert_eq!(parse_delay(" 0 "), Ok(Duration::ZERO));
        for bad in ["", "s", "-1", "2m", "1h", "soon", "inf", "nan", "1.5 min"] {
            assert!(parse_delay(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn take_marks_and_last_wins() {
        let mut c = Config::new(vec![
            ("a".into(), "1".into()),
            ("b".into(), "2".into()),
            ("a".into(), "3".into()),
        ]);
        assert_eq!(c.take("a").as_deref(), Some("3"));
        assert_eq!(c.untaken(), vec!["b"]);
        assert_eq!(c.take_all("b"), vec!["2"]);
        assert!(c.untaken().is_empty());
    }

    #[test]
    fn consumed_keys_are_hidden_from_later_layers() {
        let mut c = Config::new(vec![("cache".into(), "writeback".into())]);
        assert_eq!(c.take("cache").as_deref(), Some("writeback"));
        c.consume_taken();
        assert_eq!(c.take("cache"), None);
        assert!(c.untaken().is_empty());
    }
}
