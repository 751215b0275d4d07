//! `gcs`: serve an object in a Google Cloud Storage bucket, read-only,
//! with ranged GETs.
//!
//! Why it exists: disk images are kept in buckets, private ones included,
//! and Google's authentication (service-account keys signed into JWTs,
//! application-default credentials, the GCE metadata server) is not
//! something to write by hand: the requests go through Apache Arrow's
//! `object_store` crate, and everything else — start-up HEAD, range
//! checks, retries, timeouts, the async bridge — is the shared adapter in
//! `objstore.rs`.
//!
//! Credentials, in order: `bearer-token=`, `service-account-key=`,
//! `credentials=FILE`, `skip-signature=true` (none: public objects); else
//! whatever `GOOGLE_*` variables say (`GOOGLE_SERVICE_ACCOUNT`,
//! `GOOGLE_SERVICE_ACCOUNT_KEY`, `GOOGLE_APPLICATION_CREDENTIALS`, …, as
//! object_store's `from_env` reads them), else gcloud's
//! application-default credentials file, else the metadata server of the
//! GCE machine we run on.

use std::sync::Arc;

use nbdkit_backend::{Backend, Config, ConfigError, Param, PluginSpec};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::{ClientOptions, ObjectStore};

use crate::objstore::{check_http_url, object_path, serve, transport};

const WHO: &str = "gcs";

/// The bucket and object from `gs://BUCKET/OBJECT` or `bucket=`/`object=`.
fn target(
    url: Option<String>,
    bucket: Option<String>,
    object: Option<String>,
) -> std::result::Result<(String, String), ConfigError> {
    let (bucket, object) = match (url, bucket, object) {
        (Some(u), None, None) => {
            let form = || ConfigError::new(format!("gcs: url={u}: expected gs://BUCKET/OBJECT"));
            let rest = u.strip_prefix("gs://").ok_or_else(form)?;
            match rest.split_once('/') {
                Some((b, o)) if !b.is_empty() && !o.is_empty() => (b.to_string(), o.to_string()),
                _ => return Err(form()),
            }
        }
        (None, Some(b), Some(o)) => (b, o),
        (Some(_), _, _) => {
            return Err(ConfigError::new(
                "gcs: give url=gs://BUCKET/OBJECT or bucket= and object=, not both",
            ))
        }
        _ => {
            return Err(ConfigError::new(
                "gcs: the object is required: gs://BUCKET/OBJECT (or bucket= and object=)",
            ))
        }
    };
    // Bucket names are DNS-like: letters, digits, '-', '_', '.'.
    if bucket.is_empty()
        || !bucket
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(ConfigError::new(format!(
            "gcs: bucket {bucket:?}: not a valid bucket name"
        )));
    }
    Ok((bucket, object))
}

/// The credential the parameters name, at most one.
enum Credential {
    Bearer(String),
    Key(String),
    File(String),
    Anonymous,
}

fn credential(cfg: &mut Config) -> std::result::Result<Option<Credential>, ConfigError> {
    let mut given = Vec::new();
    if let Some(token) = cfg.take_secret("bearer-token", WHO)? {
        given.push(("bearer-token", Credential::Bearer(token)));
    }
    if let Some(key) = cfg.take_secret("service-account-key", WHO)? {
        given.push(("service-account-key", Credential::Key(key)));
    }
    if let Some(path) = cfg.take("credentials") {
        given.push(("credentials", Credential::File(path)));
    }
    let skip = cfg
        .take_bool("skip-signature")
        .map_err(|e| ConfigError::new(format!("gcs: {e}")))?;
    if skip == Some(true) {
        given.push(("skip-signature", Credential::Anonymous));
    }
    if given.len() > 1 {
        let names: Vec<&str> = given.iter().map(|(k, _)| *k).collect();
        return Err(ConfigError::new(format!(
            "gcs: {} each name the credentials: give one",
            names.join(", ")
        )));
    }
    Ok(given.pop().map(|(_, c)| c))
}

/// A credentials file: gcloud's application-default credentials of a user
/// (`"type": "authorized_user"`) go to object_store as such; anything else
/// is read as a service-account key file (which may also carry
/// object_store's emulator settings, `gcs_base_url` and `disable_oauth`).
fn is_authorized_user(path: &str) -> std::result::Result<bool, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(format!("gcs: credentials={path}: {e}")))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        ConfigError::new(format!(
            "gcs: credentials={path}: not a JSON credentials file: {e}"
        ))
    })?;
    Ok(json.get("type").and_then(|t| t.as_str()) == Some("authorized_user"))
}

fn create(cfg: &mut Config) -> std::result::Result<Arc<dyn Backend>, ConfigError> {
    let (bucket, object) = target(cfg.take("url"), cfg.take("bucket"), cfg.take("object"))?;
    let path = object_path(WHO, "object", &object)?;
    let endpoint = match (cfg.take("endpoint-url"), cfg.take("endpoint")) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                "gcs: endpoint= and endpoint-url= are the same parameter; give one",
            ))
        }
        (a, b) => a.or(b),
    };
    if let Some(e) = &endpoint {
        check_http_url(WHO, "endpoint-url", e)?;
    }
    let cred = credential(cfg)?;
    let t = transport(cfg, WHO)?;

    // from_env, by hand: the HTTP client settings go into our options (so
    // that ours apply on top), and credentials from the environment give
    // way to the ones named on the command line.
    let mut builder = GoogleCloudStorageBuilder::new();
    // GCS's default: plain HTTP is allowed (emulators).
    let mut client = ClientOptions::new().with_allow_http(true);
    if cred.is_none() {
        if let Ok(p) = std::env::var("SERVICE_ACCOUNT") {
            builder = builder.with_service_account_path(p);
        }
    }
    for (k, v) in std::env::vars() {
        if !k.starts_with("GOOGLE_") {
            continue;
        }
        match k.to_ascii_lowercase().parse::<GoogleConfigKey>() {
            Ok(GoogleConfigKey::Client(c)) => client = client.with_config(c, v),
            Ok(
                GoogleConfigKey::ServiceAccount
                | GoogleConfigKey::ServiceAccountKey
                | GoogleConfigKey::ApplicationCredentials
                | GoogleConfigKey::BearerToken
                | GoogleConfigKey::SkipSignature,
            ) if cred.is_some() => {}
            Ok(key) => builder = builder.with_config(key, v),
            Err(_) => {}
        }
    }
    builder = match cred {
        Some(Credential::Bearer(tok)) => builder.with_bearer_token(tok),
        Some(Credential::Key(key)) => builder.with_service_account_key(key),
        Some(Credential::File(path)) if is_authorized_user(&path)? => {
            builder.with_application_credentials(path)
        }
        Some(Credential::File(path)) => builder.with_service_account_path(path),
        Some(Credential::Anonymous) => builder.with_skip_signature(true),
        None => builder,
    };
    if let Some(e) = &endpoint {
        builder = builder.with_base_url(e.trim_end_matches('/'));
    }
    let builder = builder
        .with_bucket_name(&bucket)
        .with_client_options(t.client_options(client))
        .with_retry(t.retry_config());
    let build = Arc::new(move || {
        builder
            .clone()
            .build()
            .map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
    });
    serve(WHO, format!("gs://{bucket}/{object}"), path, build, t)
}

pub static SPEC: PluginSpec = PluginSpec {
    name: "gcs",
    summary: "an object in a Google Cloud Storage bucket, read with range requests (read-only)",
    description: "Reads are ranged GETs through the object_store crate; the size comes from a\n\
                  HEAD at start-up (a missing object or refused credentials stop the server).\n\
                  Credentials: bearer-token=, service-account-key=, credentials=FILE or\n\
                  skip-signature=true (public objects); else GOOGLE_SERVICE_ACCOUNT,\n\
                  GOOGLE_SERVICE_ACCOUNT_KEY, GOOGLE_APPLICATION_CREDENTIALS, gcloud's\n\
                  application-default credentials, else the GCE metadata server.  Failures\n\
                  are EIO; 5xx answers, broken connections and timeouts are retried\n\
                  retries= times.  Read-only.\n\n\
                  Examples:\n  nbdkit-rs gcs gs://my-bucket/images/disk.img\n  \
                  nbdkit-rs --filter=xz gcs gs://my-bucket/disk.img.xz credentials=sa.json\n  \
                  nbdkit-rs gcs bucket=b object=disk.img endpoint-url=http://127.0.0.1:4443 skip-signature=true",
    magic_config_key: Some("url"),
    params: &[
        Param { name: "url", help: "gs://BUCKET/OBJECT (the magic key)" },
        Param { name: "bucket", help: "the bucket (with object=, instead of url=)" },
        Param { name: "object", help: "the object's name (with bucket=)" },
        Param { name: "credentials", help: "a service-account key file, or gcloud's application-default credentials file" },
        Param { name: "service-account-key", help: "a service-account key (JSON), or +FILE, - (stdin) or -FD" },
        Param { name: "bearer-token", help: "an OAuth access token, or +FILE, - or -FD (not refreshed)" },
        Param { name: "skip-signature", help: "send no credentials (public objects; default false)" },
        Param { name: "endpoint-url", help: "another base URL: an emulator or private endpoint (also endpoint=)" },
        Param { name: "endpoint", help: "same as endpoint-url=" },
        Param { name: "timeout", help: "seconds one request attempt may take (default 60)" },
        Param { name: "retries", help: "retries of a transient failure (default 4)" },
        Param { name: "connections", help: "requests in flight at once, shared by all clients (default 16)" },
        Param { name: "proxy", help: "proxy URL" },
        Param { name: "cainfo", help: "CA certificates (PEM) trusted besides the system's" },
        Param { name: "sslverify", help: "verify the server's certificate (default true)" },
    ],
    create,
};

#[cfg(test)]
mod tests {
    use super::*;

    fn fails(params: &[(&str, &str)]) -> String {
        let mut cfg = Config::from_pairs(params);
        create(&mut cfg).err().expect("must fail").0
    }

    #[test]
    fn urls_and_names() {
        assert_eq!(
            target(Some("gs://b/a/b.img".into()), None, None).unwrap(),
            ("b".into(), "a/b.img".into())
        );
        assert_eq!(
            target(None, Some("b".into()), Some("o".into())).unwrap(),
            ("b".into(), "o".into())
        );
    }

    #[test]
    fn bad_parameters_are_refused_at_start_up() {
        for (params, want) in [
            (vec![("url", "s3://b/o")], "expected gs://BUCKET/OBJECT"),
            (vec![("url", "gs://bucket")], "expected gs://BUCKET/OBJECT"),
            (vec![("url", "gs:///o")], "expected gs://BUCKET/OBJECT"),
            (vec![("bucket", "b")], "the object is required"),
            (vec![("url", "gs://b/o"), ("bucket", "b")], "not both"),
            (vec![("url", "gs://b@x/o")], "not a valid bucket name"),
            (vec![("url", "gs://b/o/")], "trailing '/'"),
            (
                vec![("url", "gs://b/o"), ("endpoint-url", "ftp://x")],
                "endpoint-url=ftp://x",
            ),
            (
                vec![
                    ("url", "gs://b/o"),
                    ("endpoint", "http://a"),
                    ("endpoint-url", "http://b"),
                ],
                "same parameter",
            ),
            (
                vec![
                    ("url", "gs://b/o"),
                    ("bearer-token", "t"),
                    ("skip-signature", "true"),
                ],
                "bearer-token, skip-signature each name the credentials",
            ),
            (
                vec![("url", "gs://b/o"), ("credentials", "/nonexistent/sa.json")],
                "credentials=/nonexistent/sa.json",
            ),
            (
                vec![("url", "gs://b/o"), ("service-account-key", "{not json")],
                "gs://b/o",
            ),
            (
                vec![("url", "gs://b/o"), ("bearer-token", "+/nonexistent/tok")],
                "bearer-token=+/nonexistent/tok",
            ),
            (
                vec![("url", "gs://b/o"), ("timeout", "soon")],
                "timeout=soon",
            ),
        ] {
            let e = fails(&params);
            assert!(
                e.starts_with("gcs: ") && e.contains(want),
                "{params:?}: {e}"
            );
        }
    }
}
