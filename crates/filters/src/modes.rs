//! Parsing `key=word` parameters that pick one of a fixed set of modes.

use nbdkit_backend::{Config, ConfigError};

/// Take `key` and look it up in `table`; `default` when not given.  An
/// unknown word is refused with the list of valid ones.
pub(crate) fn take_mode<T: Copy>(
    cfg: &mut Config,
    who: &str,
    key: &str,
    table: &[(&str, T)],
    default: T,
) -> Result<T, ConfigError> {
    let Some(v) = cfg.take(key) else {
        return Ok(default);
    };
    table
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(v.trim()))
        .map(|(_, m)| *m)
        .ok_or_else(|| {
            let names: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
            ConfigError::new(format!(
                "{who} filter: {key}={v}: expected one of {}",
                names.join(", ")
            ))
        })
}
