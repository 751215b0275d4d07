//! `s3`: serve an object in an S3 bucket (AWS, or any S3-compatible store
//! through `endpoint-url=`), read-only, with ranged GETs signed with AWS
//! Signature Version 4.
//!
//! Why it exists: disk images are often kept in buckets, private ones
//! included, and the `curl` plugin can only reach public or pre-signed
//! objects.  This plugin is the curl plugin's engine (connection pool,
//! retries, timeouts, the range checks) with libcurl's own SigV4 signing
//! (`CURLOPT_AWS_SIGV4`), so it needs no SDK: credentials come from the
//! parameters, the standard `AWS_*` environment variables, or the shared
//! credentials file, as the AWS tools find them.  Without credentials the
//! requests go unsigned (public buckets).

use std::path::PathBuf;
use std::sync::Arc;

use nbdkit_backend::{Backend, Config, ConfigError, Param, PluginSpec};

use crate::curl::{serve, transport};

/// Where the object is and how to sign for it.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    url: String,
    shown: String,
    region: String,
}

/// Percent-encode an object key for the URL path (and so for SigV4's
/// canonical URI): everything but unreserved characters and `/`.
fn encode_key(key: &str) -> String {
    let mut out = String::new();
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The HTTP URL of `bucket`/`key`: path-style under an endpoint, else AWS's
/// virtual-hosted style (path-style for bucket names with dots, which do
/// not match the wildcard certificate).
fn target(bucket: &str, key: &str, endpoint: Option<&str>, region: &str) -> Target {
    let k = encode_key(key);
    let url = match endpoint {
        Some(e) => format!("{}/{bucket}/{k}", e.trim_end_matches('/')),
        None if bucket.contains('.') => format!("https://s3.{region}.amazonaws.com/{bucket}/{k}"),
        None => format!("https://{bucket}.s3.{region}.amazonaws.com/{k}"),
    };
    Target {
        url,
        shown: format!("s3://{bucket}/{key}"),
        region: region.to_string(),
    }
}

/// `key = value` pairs of one `[section]` of an AWS INI file
/// (credentials or config).
fn ini_section(text: &str, section: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = name.trim() == section;
            continue;
        }
        if inside {
            if let Some((k, v)) = line.split_once('=') {
                out.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
    }
    out
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn aws_file(var: &str, default: &str) -> Option<PathBuf> {
    env(var)
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".aws").join(default)))
}

/// (access key, secret, session token) from the parameters, else the
/// environment, else the shared credentials file's profile.
fn credentials(
    cfg: &mut Config,
) -> std::result::Result<Option<(String, String, Option<String>)>, ConfigError> {
    let access = cfg.take("access-key");
    let secret = cfg.take_secret("secret-key", "s3")?;
    let token = cfg.take_secret("session-token", "s3")?;
    match (access, secret) {
        (Some(a), Some(s)) => return Ok(Some((a, s, token))),
        (Some(_), None) | (None, Some(_)) => {
            return Err(ConfigError::new(
                "s3: give both access-key= and secret-key=, or neither",
            ))
        }
        (None, None) => {}
    }
    if let (Some(a), Some(s)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
        return Ok(Some((a, s, token.or_else(|| env("AWS_SESSION_TOKEN")))));
    }
    let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
    if let Some(path) = aws_file("AWS_SHARED_CREDENTIALS_FILE", "credentials") {
        if let Ok(text) = std::fs::read_to_string(&path) {
            let sec = ini_section(&text, &profile);
            let get = |k: &str| sec.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            if let (Some(a), Some(s)) = (get("aws_access_key_id"), get("aws_secret_access_key")) {
                return Ok(Some((a, s, token.or_else(|| get("aws_session_token")))));
            }
        }
    }
    if token.is_some() {
        return Err(ConfigError::new(
            "s3: session-token= needs access-key= and secret-key=",
        ));
    }
    Ok(None)
}

/// region=, else AWS_REGION / AWS_DEFAULT_REGION, else the config file's
/// profile, else us-east-1.
fn region(cfg: &mut Config) -> String {
    if let Some(r) = cfg.take("region").filter(|r| !r.is_empty()) {
        return r;
    }
    if let Some(r) = env("AWS_REGION").or_else(|| env("AWS_DEFAULT_REGION")) {
        return r;
    }
    let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
    let section = if profile == "default" {
        profile
    } else {
        format!("profile {profile}")
    };
    aws_file("AWS_CONFIG_FILE", "config")
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| {
            ini_section(&t, &section)
                .into_iter()
                .find(|(k, _)| k == "region")
                .map(|(_, v)| v)
        })
        .unwrap_or_else(|| "us-east-1".into())
}

fn create(cfg: &mut Config) -> std::result::Result<Arc<dyn Backend>, ConfigError> {
    let url = cfg.take("url");
    let (bucket, key) = match (url, cfg.take("bucket"), cfg.take("key")) {
        (Some(u), None, None) => {
            let rest = u.strip_prefix("s3://").ok_or_else(|| {
                ConfigError::new(format!("s3: url={u}: expected s3://BUCKET/KEY"))
            })?;
            match rest.split_once('/') {
                Some((b, k)) if !b.is_empty() && !k.is_empty() => (b.to_string(), k.to_string()),
                _ => {
                    return Err(ConfigError::new(format!(
                        "s3: url={u}: expected s3://BUCKET/KEY"
                    )))
                }
            }
        }
        (None, Some(b), Some(k)) if !b.is_empty() && !k.is_empty() => (b, k),
        (Some(_), _, _) => {
            return Err(ConfigError::new(
                "s3: give url=s3://BUCKET/KEY or bucket= and key=, not both",
            ))
        }
        _ => {
            return Err(ConfigError::new(
                "s3: the object is required: url=s3://BUCKET/KEY (or bucket= and key=)",
            ))
        }
    };
    if bucket.contains(['/', '?', '#', '@', ':']) {
        return Err(ConfigError::new(format!(
            "s3: bucket {bucket}: not a valid bucket name"
        )));
    }
    let endpoint = match (cfg.take("endpoint-url"), cfg.take("endpoint")) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                "s3: endpoint= and endpoint-url= are the same parameter; give one",
            ))
        }
        (a, b) => a.or(b),
    };
    if let Some(e) = &endpoint {
        let scheme = e.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
        if !matches!(scheme.as_deref(), Some("http" | "https")) {
            return Err(ConfigError::new(format!(
                "s3: endpoint-url={e}: expected an http:// or https:// URL"
            )));
        }
    }
    let region = region(cfg);
    let creds = credentials(cfg)?;
    let (mut s, connections) = transport(cfg, "s3")?;
    let t = target(&bucket, &key, endpoint.as_deref(), &region);
    s.who = "s3";
    s.url = t.url;
    s.shown = t.shown;
    // A redirect would need a new signature: report it instead.
    s.followlocation = false;
    s.protocols = Some("http,https".into());
    if let Some((access, secret, token)) = creds {
        s.user = Some(access);
        s.password = Some(secret);
        s.aws_sigv4 = Some(format!("aws:amz:{}:s3", t.region));
        // S3 wants the payload hash header on signed requests; a GET has
        // no payload to sign.
        s.headers
            .push("x-amz-content-sha256: UNSIGNED-PAYLOAD".into());
        if let Some(tok) = token {
            if tok.contains(['\r', '\n']) {
                return Err(ConfigError::new("s3: session-token contains a newline"));
            }
            s.headers.push(format!("x-amz-security-token: {tok}"));
        }
    }
    serve(s, connections, "s3")
}

pub static SPEC: PluginSpec = PluginSpec {
    name: "s3",
    summary: "an object in an S3 bucket (AWS or S3-compatible), read with signed range requests (read-only)",
    description: "Reads are ranged GETs signed with AWS Signature Version 4 (by libcurl).\n\
                  Credentials: access-key=/secret-key=, else AWS_ACCESS_KEY_ID and\n\
                  AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), else the profile\n\
                  (AWS_PROFILE, default \"default\") of ~/.aws/credentials\n\
                  (AWS_SHARED_CREDENTIALS_FILE); with none, requests go unsigned (public\n\
                  objects).  Region: region=, AWS_REGION, AWS_DEFAULT_REGION, ~/.aws/config,\n\
                  else us-east-1.  Pool, retries and timeouts are the curl plugin's.\n\n\
                  Examples:\n  nbdkit-rs s3 s3://my-bucket/images/disk.img\n  \
                  nbdkit-rs --filter=xz s3 url=s3://my-bucket/disk.img.xz region=eu-west-1\n  \
                  nbdkit-rs s3 s3://bkt/disk.img endpoint-url=http://127.0.0.1:9000   (MinIO, moto, …)",
    magic_config_key: Some("url"),
    params: &[
        Param { name: "url", help: "s3://BUCKET/KEY (the magic key)" },
        Param { name: "bucket", help: "the bucket (with key=, instead of url=)" },
        Param { name: "key", help: "the object's key (with bucket=)" },
        Param { name: "endpoint-url", help: "an S3-compatible server, path-style (also endpoint=)" },
        Param { name: "endpoint", help: "same as endpoint-url=" },
        Param { name: "region", help: "the region to sign for (default from the environment, else us-east-1)" },
        Param { name: "access-key", help: "access key id (default from the environment or ~/.aws)" },
        Param { name: "secret-key", help: "secret access key, or +FILE, - (stdin) or -FD" },
        Param { name: "session-token", help: "session token of temporary credentials, or +FILE, - or -FD" },
        Param { name: "connections", help: "HTTP connections shared by all clients (default 4)" },
        Param { name: "timeout", help: "seconds a request may take (default: none, but a transfer stalled for 60 s fails)" },
        Param { name: "sslverify", help: "verify the server's certificate (default true)" },
        Param { name: "cainfo", help: "CA bundle file" },
        Param { name: "capath", help: "CA certificates directory" },
        Param { name: "ssl-version", help: "tlsv1, sslv2, sslv3, tlsv1.0, tlsv1.1, tlsv1.2 or tlsv1.3" },
        Param { name: "ssl-cipher-list", help: "allowed TLS ciphers (CIPHER[:CIPHER...])" },
        Param { name: "proxy", help: "proxy URL" },
        Param { name: "proxy-user", help: "proxy user name" },
        Param { name: "proxy-password", help: "proxy password, or +FILE, - or -FD" },
        Param { name: "user-agent", help: "User-Agent header (default: none)" },
        Param { name: "tcp-keepalive", help: "enable TCP keepalives (default false)" },
        Param { name: "tcp-nodelay", help: "disable Nagle's algorithm (default true)" },
    ],
    create,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_for_aws_and_endpoints() {
        assert_eq!(
            target("bkt", "a/b c.img", None, "eu-west-1").url,
            "https://bkt.s3.eu-west-1.amazonaws.com/a/b%20c.img"
        );
        assert_eq!(
            target("my.bkt", "d", None, "us-east-1").url,
            "https://s3.us-east-1.amazonaws.com/my.bkt/d"
        );
        let t = target("bkt", "k+1", Some("http://127.0.0.1:9000/"), "r");
        assert_eq!(t.url, "http://127.0.0.1:9000/bkt/k%2B1");
        assert_eq!(t.shown, "s3://bkt/k+1");
    }

    #[test]
    fn ini_sections() {
        let text = "[default]\naws_access_key_id = A\n# c\n[profile x]\nregion=eu-north-1\n[other]\naws_access_key_id=B\n";
        assert_eq!(
            ini_section(text, "default"),
            vec![("aws_access_key_id".to_string(), "A".to_string())]
        );
        assert_eq!(ini_section(text, "profile x")[0].1, "eu-north-1");
        assert!(ini_section(text, "missing").is_empty());
    }

    #[test]
    fn bad_objects_are_refused() {
        for params in [
            vec![("url", "http://x/y")],
            vec![("url", "s3://bucket")],
            vec![("url", "s3:///key")],
            vec![("bucket", "b")],
            vec![("url", "s3://b/k"), ("bucket", "b"), ("key", "k")],
            vec![("url", "s3://b/k"), ("endpoint", "ftp://x")],
            vec![("url", "s3://b/k"), ("access-key", "A")],
        ] {
            let mut cfg = Config::from_pairs(&params);
            let e = create(&mut cfg).err().expect("must fail");
            assert!(e.0.starts_with("s3: "), "{params:?}: {e}");
        }
    }
}
