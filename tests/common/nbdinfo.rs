//! What nbdinfo reports, in forms tests can compare.

use std::collections::HashMap;
use std::process::Command;

use super::{stdout_of, PYTHON};

/// `nbdinfo --json URI`, flattened for the first export: key -> JSON value
/// (strings without quotes).
pub fn nbdinfo_json(extra: &[&str], uri: &str) -> HashMap<String, String> {
    let json = stdout_of(Command::new("nbdinfo").arg("--json").args(extra).arg(uri));
    let flat = stdout_of(
        Command::new(PYTHON)
            .arg("-c")
            .arg(
                "import json,sys\n\
                 d=json.loads(sys.argv[1])\n\
                 e=d['exports'][0]\n\
                 e.update({k:v for k,v in d.items() if k!='exports'})\n\
                 for k,v in e.items(): print(k+'='+(v if isinstance(v,str) else json.dumps(v)))",
            )
            .arg(&json),
    );
    flat.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Whether `nbdinfo ARGS` succeeds (its output is not wanted).
pub fn nbdinfo_ok(args: &[&str]) -> bool {
    let out = Command::new("nbdinfo").args(args).output();
    out.expect("run nbdinfo").status.success()
}

/// nbdinfo shows the same export through `a` and `b` (size, flags,
/// meta contexts, block sizes): a proxy passes all of it through.
pub fn assert_same_offer(a: &str, b: &str) {
    let (a, b) = (nbdinfo_json(&[], a), nbdinfo_json(&[], b));
    for k in [
        "export-size",
        "is_read_only",
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_cache",
        "can_multi_conn",
        "contexts",
        "block_size_minimum",
        "block_size_preferred",
        "block_size_maximum",
    ] {
        assert_eq!(a.get(k), b.get(k), "{k}");
    }
}

/// `nbdinfo --map URI` as merged (offset, length, is_hole) runs.
pub fn map_of(uri: &str) -> Vec<(u64, u64, bool)> {
    let out = stdout_of(Command::new("nbdinfo").arg("--map").arg(uri));
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(f.len() >= 4, "unexpected map line {line:?}");
        let (off, len): (u64, u64) = (f[0].parse().unwrap(), f[1].parse().unwrap());
        let hole = f[3].contains("hole");
        match runs.last_mut() {
            Some(last) if last.2 == hole && last.0 + last.1 == off => last.1 += len,
            _ => {
                if let Some(last) = runs.last() {
                    assert_eq!(last.0 + last.1, off, "map has a gap: {out}");
                }
                runs.push((off, len, hole));
            }
        }
    }
    runs
}
