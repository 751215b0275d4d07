//! `azure`: serve a blob in an Azure Blob Storage container, read-only,
//! with ranged GETs.
//!
//! Why it exists: disk images are kept in storage accounts, and Azure's
//! authentication (shared-key signatures, SAS tokens, Entra ID tokens from
//! client secrets, managed identities or the Azure CLI) is not something to
//! write by hand: the requests go through Apache Arrow's `object_store`
//! crate, and everything else — start-up HEAD, range checks, retries,
//! timeouts, the async bridge — is the shared adapter in `objstore.rs`.
//!
//! Credentials: the one named on the command line (`access-key=`,
//! `sas-token=` or a SAS in the URL, `bearer-token=`, `client-secret=`
//! with `client-id=`/`tenant-id=`, `use-azure-cli=true`,
//! `skip-signature=true`) is used, whatever the environment says; else
//! object_store's own choice from the `AZURE_*` variables (as its
//! `from_env` reads them), falling back to a managed identity.

use std::sync::Arc;

use nbdkit_backend::{Backend, Config, ConfigError, Param, PluginSpec};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::{ClientOptions, ObjectStore};

use crate::objstore::{check_http_url, object_path, serve, transport};

const WHO: &str = "azure";

/// Where the blob is, from the URL or the parameters.
#[derive(Debug, Default, PartialEq, Eq)]
struct Target {
    account: Option<String>,
    /// The account's blob service URL, when the URL gives one.
    endpoint: Option<String>,
    container: String,
    blob: String,
    /// A SAS token in the URL's query.
    sas: Option<String>,
    /// For messages: the URL without its query.
    shown: String,
}

/// `%XX` escapes decoded; None for a malformed escape or non-UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// True for hosts that address an account by path (Azurite's and the
/// emulator's "IP-style" URLs: `http://127.0.0.1:10000/ACCOUNT/…`).
fn is_ip_style(host: &str) -> bool {
    host == "localhost"
        || host.parse::<std::net::Ipv4Addr>().is_ok()
        || (host.starts_with('[') && host.ends_with(']'))
}

/// Parse `az://CONTAINER/BLOB` (or `azure://`),
/// `https://ACCOUNT.blob.core.windows.net/CONTAINER/BLOB[?SAS]`, or an
/// IP-style `http://HOST:PORT/ACCOUNT/CONTAINER/BLOB`.
fn parse_url(u: &str) -> std::result::Result<Target, ConfigError> {
    let form = || {
        ConfigError::new(format!(
            "azure: url={}: expected az://CONTAINER/BLOB or https://ACCOUNT.blob.core.windows.net/CONTAINER/BLOB",
            u.split('?').next().unwrap_or(u)
        ))
    };
    let two = |rest: &str| -> Option<(String, String)> {
        let (c, b) = rest.split_once('/')?;
        (!c.is_empty() && !b.is_empty()).then(|| (c.to_string(), b.to_string()))
    };
    if let Some(rest) = u
        .strip_prefix("az://")
        .or_else(|| u.strip_prefix("azure://"))
    {
        let (container, blob) = two(rest).ok_or_else(form)?;
        return Ok(Target {
            container,
            blob,
            shown: u.to_string(),
            ..Target::default()
        });
    }
    let (scheme, rest) = u.split_once("://").ok_or_else(form)?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "https" && scheme != "http" {
        return Err(form());
    }
    let (rest, sas) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q.to_string()).filter(|q| !q.is_empty())),
        None => (rest, None),
    };
    if rest.contains('#') {
        return Err(form());
    }
    let (authority, path) = rest.split_once('/').ok_or_else(form)?;
    if authority.is_empty() || authority.contains('@') {
        return Err(form());
    }
    let host = match authority.rsplit_once(':') {
        Some((h, port)) if !h.ends_with(']') || authority.starts_with('[') => {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                authority
            }
        }
        _ => authority,
    };
    let (account, endpoint, path) = if is_ip_style(host) {
        let (account, path) = path.split_once('/').ok_or_else(form)?;
        (
            account.to_string(),
            format!("{scheme}://{authority}/{account}"),
            path,
        )
    } else {
        match host.split_once('.') {
            Some((account, domain)) if domain.starts_with("blob.") => {
                (account.to_string(), format!("{scheme}://{authority}"), path)
            }
            _ => return Err(form()),
        }
    };
    let (container, blob) = two(path).ok_or_else(form)?;
    let blob = percent_decode(&blob)
        .ok_or_else(|| ConfigError::new(format!("azure: url: blob name {blob:?}: bad %-escape")))?;
    Ok(Target {
        account: Some(account),
        endpoint: Some(endpoint),
        container,
        blob,
        sas,
        shown: format!("{scheme}://{rest}"),
    })
}

fn target(cfg: &mut Config) -> std::result::Result<Target, ConfigError> {
    let mut t = match (cfg.take("url"), cfg.take("container"), cfg.take("blob")) {
        (Some(u), None, None) => parse_url(&u)?,
        (None, Some(container), Some(blob)) => Target {
            shown: format!("az://{container}/{blob}"),
            container,
            blob,
            ..Target::default()
        },
        (Some(_), _, _) => {
            return Err(ConfigError::new(
                "azure: give url= or container= and blob=, not both",
            ))
        }
        _ => {
            return Err(ConfigError::new(
                "azure: the blob is required: az://CONTAINER/BLOB (or container= and blob=)",
            ))
        }
    };
    if let Some(a) = cfg.take("account") {
        match &t.account {
            Some(from_url) if *from_url != a => {
                return Err(ConfigError::new(format!(
                    "azure: account={a}, but the URL names the account {from_url}"
                )))
            }
            _ => t.account = Some(a),
        }
    }
    match (cfg.take("endpoint-url"), cfg.take("endpoint")) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                "azure: endpoint= and endpoint-url= are the same parameter; give one",
            ))
        }
        (Some(e), None) | (None, Some(e)) => {
            if t.endpoint.is_some() {
                return Err(ConfigError::new(
                    "azure: endpoint-url= and an http(s) URL both give the endpoint; give one",
                ));
            }
            check_http_url(WHO, "endpoint-url", &e)?;
            t.endpoint = Some(e.trim_end_matches('/').to_string());
        }
        (None, None) => {}
    }
    if let Some(a) = &t.account {
        if a.is_empty() || !a.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(ConfigError::new(format!(
                "azure: account {a:?}: not a valid storage account name"
            )));
        }
    }
    let c = &t.container;
    if !c
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'$')
    {
        return Err(ConfigError::new(format!(
            "azure: container {c:?}: not a valid container name"
        )));
    }
    Ok(t)
}

/// A credential named on the command line.
struct Named {
    /// The parameter that named it, for messages.
    given: &'static str,
    /// object_store's credential type.
    kind: &'static str,
    /// The builder setting that carries it.
    setting: Option<(AzureConfigKey, String)>,
}

/// The credential named on the command line, at most one.
fn credential(
    cfg: &mut Config,
    url_sas: Option<String>,
) -> std::result::Result<Option<Named>, ConfigError> {
    let secret = |cfg: &mut Config, key: &str| cfg.take_secret(key, WHO);
    let flag = |cfg: &mut Config, key: &str| {
        cfg.take_bool(key)
            .map(|b| b == Some(true))
            .map_err(|e| ConfigError::new(format!("azure: {e}")))
    };
    let named = |given, kind, key, value| Named {
        given,
        kind,
        setting: Some((key, value)),
    };
    let mut all = Vec::new();
    if let Some(k) = secret(cfg, "access-key")? {
        all.push(named(
            "access-key",
            "access_key",
            AzureConfigKey::AccessKey,
            k,
        ));
    }
    if let Some(s) = secret(cfg, "sas-token")? {
        all.push(named("sas-token", "sas_token", AzureConfigKey::SasKey, s));
    }
    if let Some(s) = url_sas {
        all.push(named(
            "a SAS in the URL",
            "sas_token",
            AzureConfigKey::SasKey,
            s,
        ));
    }
    if let Some(t) = secret(cfg, "bearer-token")? {
        all.push(named(
            "bearer-token",
            "bearer_token",
            AzureConfigKey::Token,
            t,
        ));
    }
    if let Some(s) = secret(cfg, "client-secret")? {
        all.push(named(
            "client-secret",
            "client_secret",
            AzureConfigKey::ClientSecret,
            s,
        ));
    }
    if flag(cfg, "use-azure-cli")? {
        all.push(Named {
            given: "use-azure-cli",
            kind: "azure_cli",
            setting: None,
        });
    }
    if flag(cfg, "skip-signature")? {
        all.push(named(
            "skip-signature",
            "auto",
            AzureConfigKey::SkipSignature,
            "true".into(),
        ));
    }
    if all.len() > 1 {
        let names: Vec<&str> = all.iter().map(|n| n.given).collect();
        return Err(ConfigError::new(format!(
            "azure: {} each name the credentials: give one",
            names.join(", ")
        )));
    }
    Ok(all.pop())
}

/// Credential settings the environment may hold, which give way to the
/// one named on the command line.
fn is_credential_key(k: &AzureConfigKey) -> bool {
    matches!(
        k,
        AzureConfigKey::AccessKey
            | AzureConfigKey::SasKey
            | AzureConfigKey::Token
            | AzureConfigKey::ClientSecret
            | AzureConfigKey::UseAzureCli
            | AzureConfigKey::SkipSignature
            | AzureConfigKey::CredentialType
    )
}

fn create(cfg: &mut Config) -> std::result::Result<Arc<dyn Backend>, ConfigError> {
    let mut t = target(cfg)?;
    let path = object_path(WHO, "blob", &t.blob)?;
    let cred = credential(cfg, t.sas.take())?;
    let client_id = cfg.take("client-id");
    let tenant_id = cfg.take("tenant-id");
    let tr = transport(cfg, WHO)?;

    // from_env, by hand: the HTTP client settings go into our options (so
    // that ours apply on top), and credentials from the environment give
    // way to the one named on the command line.
    let mut builder = MicrosoftAzureBuilder::new();
    let mut client = ClientOptions::new();
    for (k, v) in std::env::vars() {
        if !k.starts_with("AZURE_") {
            continue;
        }
        match k.to_ascii_lowercase().parse::<AzureConfigKey>() {
            Ok(AzureConfigKey::Client(c)) => client = client.with_config(c, v),
            Ok(key) if cred.is_some() && is_credential_key(&key) => {}
            Ok(key) => builder = builder.with_config(key, v),
            Err(_) => {}
        }
    }
    if let Ok(msi) = std::env::var("MSI_ENDPOINT") {
        builder = builder.with_msi_endpoint(msi);
    }
    let kind = cred.as_ref().map(|n| n.kind);
    if let Some(n) = cred {
        builder = builder.with_config(AzureConfigKey::CredentialType, n.kind);
        if let Some((k, v)) = n.setting {
            builder = builder.with_config(k, v);
        }
    }
    if let Some(id) = client_id {
        builder = builder.with_client_id(id);
    }
    if let Some(id) = tenant_id {
        builder = builder.with_tenant_id(id);
    }
    if kind == Some("client_secret") {
        for (key, what) in [
            (AzureConfigKey::ClientId, "client-id="),
            (AzureConfigKey::AuthorityId, "tenant-id="),
        ] {
            if builder.get_config_value(&key).is_none() {
                return Err(ConfigError::new(format!(
                    "azure: client-secret= needs {what} too (or its AZURE_* variable)"
                )));
            }
        }
    }
    if let Some(a) = &t.account {
        builder = builder.with_account(a);
    } else if builder
        .get_config_value(&AzureConfigKey::AccountName)
        .is_none()
        && builder
            .get_config_value(&AzureConfigKey::UseEmulator)
            .as_deref()
            != Some("true")
    {
        return Err(ConfigError::new(
            "azure: the storage account is required: account= (or AZURE_STORAGE_ACCOUNT_NAME, or an https://ACCOUNT.blob.core.windows.net/… URL)",
        ));
    }
    if let Some(e) = &t.endpoint {
        if e.to_ascii_lowercase().starts_with("http://") {
            client = client.with_allow_http(true);
        }
        builder = builder.with_endpoint(e.clone());
    }
    let builder = builder
        .with_container_name(&t.container)
        .with_client_options(tr.client_options(client))
        .with_retry(tr.retry_config());
    let build = Arc::new(move || {
        builder
            .clone()
            .build()
            .map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
    });
    serve(WHO, t.shown, path, build, tr)
}

pub static SPEC: PluginSpec = PluginSpec {
    name: "azure",
    summary: "a blob in an Azure Blob Storage container, read with range requests (read-only)",
    description: "Reads are ranged GETs through the object_store crate; the size comes from a\n\
                  HEAD at start-up (a missing blob or refused credentials stop the server).\n\
                  Credentials: access-key=, sas-token= (or a SAS in the URL), bearer-token=,\n\
                  client-secret= with client-id= and tenant-id=, use-azure-cli=true or\n\
                  skip-signature=true (public containers); else the AZURE_* variables\n\
                  (AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_SAS_KEY, AZURE_CLIENT_SECRET, …),\n\
                  else a managed identity.  Failures are EIO; 5xx answers, broken\n\
                  connections and timeouts are retried retries= times.  Read-only.\n\n\
                  Examples:\n  nbdkit-rs azure az://images/disk.img account=myaccount access-key=+key.txt\n  \
                  nbdkit-rs --filter=xz azure 'https://myaccount.blob.core.windows.net/images/disk.img.xz?sv=…&sig=…'\n  \
                  nbdkit-rs azure az://c/disk.img account=devstoreaccount1 endpoint-url=http://127.0.0.1:10000/devstoreaccount1 access-key=…   (Azurite)",
    magic_config_key: Some("url"),
    params: &[
        Param { name: "url", help: "az://CONTAINER/BLOB or https://ACCOUNT.blob.core.windows.net/CONTAINER/BLOB[?SAS] (the magic key)" },
        Param { name: "container", help: "the container (with blob=, instead of url=)" },
        Param { name: "blob", help: "the blob's name (with container=)" },
        Param { name: "account", help: "the storage account (default from the URL or AZURE_STORAGE_ACCOUNT_NAME)" },
        Param { name: "access-key", help: "the account's shared key, or +FILE, - (stdin) or -FD" },
        Param { name: "sas-token", help: "a SAS token (the query string), or +FILE, - or -FD" },
        Param { name: "bearer-token", help: "an Entra ID access token, or +FILE, - or -FD (not refreshed)" },
        Param { name: "client-id", help: "application (client) id: with client-secret=, or a user-assigned managed identity" },
        Param { name: "client-secret", help: "the application's client secret, or +FILE, - or -FD" },
        Param { name: "tenant-id", help: "the directory (tenant) id, with client-secret=" },
        Param { name: "use-azure-cli", help: "take tokens from the Azure CLI (az login; default false)" },
        Param { name: "skip-signature", help: "send no credentials (public containers; default false)" },
        Param { name: "endpoint-url", help: "the account's blob service URL: an emulator or private endpoint (also endpoint=)" },
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

    #[test]
    fn url_forms() {
        let t = parse_url("az://images/a/disk.img").unwrap();
        assert_eq!(
            (t.container.as_str(), t.blob.as_str()),
            ("images", "a/disk.img")
        );
        assert_eq!((t.account, t.endpoint), (None, None));
        let t = parse_url("https://acct.blob.core.windows.net/images/my%20disk.img?sv=1&sig=x%2By")
            .unwrap();
        assert_eq!(t.account.as_deref(), Some("acct"));
        assert_eq!(
            t.endpoint.as_deref(),
            Some("https://acct.blob.core.windows.net")
        );
        assert_eq!(t.blob, "my disk.img");
        assert_eq!(t.sas.as_deref(), Some("sv=1&sig=x%2By"));
        assert_eq!(
            t.shown,
            "https://acct.blob.core.windows.net/images/my%20disk.img"
        );
        let t = parse_url("http://127.0.0.1:10000/devstoreaccount1/c/d/e.img").unwrap();
        assert_eq!(t.account.as_deref(), Some("devstoreaccount1"));
        assert_eq!(
            t.endpoint.as_deref(),
            Some("http://127.0.0.1:10000/devstoreaccount1")
        );
        assert_eq!((t.container.as_str(), t.blob.as_str()), ("c", "d/e.img"));
        for bad in [
            "az://container",
            "az:///blob",
            "s3://b/k",
            "https://example.com/c/b",
            "https://acct.blob.core.windows.net/container",
            "https://u@acct.blob.core.windows.net/c/b",
            "https://acct.blob.core.windows.net/c/b%zz",
            "http://127.0.0.1:10000/devstoreaccount1/c",
        ] {
            let e = parse_url(bad).unwrap_err();
            assert!(e.0.starts_with("azure: url"), "{bad}: {e}");
        }
    }

    fn fails(params: &[(&str, &str)]) -> String {
        let mut cfg = Config::from_pairs(params);
        create(&mut cfg).err().expect("must fail").0
    }

    #[test]
    fn bad_parameters_are_refused_at_start_up() {
        let acct = ("account", "acct");
        for (params, want) in [
            (vec![("container", "c")], "the blob is required"),
            (vec![("url", "az://c/b"), ("blob", "b")], "not both"),
            (vec![("url", "az://c/b")], "the storage account is required"),
            (
                vec![
                    ("url", "https://a.blob.core.windows.net/c/b"),
                    ("account", "other"),
                ],
                "account=other",
            ),
            (
                vec![
                    ("url", "https://a.blob.core.windows.net/c/b"),
                    ("endpoint-url", "http://x"),
                ],
                "give one",
            ),
            (
                vec![("url", "az://c/b"), acct, ("endpoint-url", "x")],
                "endpoint-url=x",
            ),
            (
                vec![("url", "az://c/b"), ("account", "a.b")],
                "not a valid storage account",
            ),
            (vec![("url", "az://c.d/b"), acct], "not a valid container"),
            (vec![("url", "az://c/b/"), acct], "trailing '/'"),
            (
                vec![
                    ("url", "az://c/b"),
                    acct,
                    ("access-key", "k"),
                    ("sas-token", "sv=1"),
                ],
                "access-key, sas-token each name the credentials",
            ),
            (
                vec![
                    ("url", "https://a.blob.core.windows.net/c/b?sig=x"),
                    ("bearer-token", "t"),
                ],
                "a SAS in the URL, bearer-token each name",
            ),
            (
                vec![
                    ("url", "az://c/b"),
                    acct,
                    ("client-secret", "s"),
                    ("tenant-id", "t"),
                ],
                "needs client-id=",
            ),
            (
                vec![
                    ("url", "az://c/b"),
                    acct,
                    ("access-key", "+/nonexistent/key"),
                ],
                "access-key=+/nonexistent/key",
            ),
            // Not base64: refused by object_store before any request.
            (
                vec![("url", "az://c/b"), acct, ("access-key", "not base64!")],
                "az://c/b",
            ),
            (
                vec![("url", "az://c/b"), acct, ("retries", "x")],
                "retries=x",
            ),
        ] {
            let e = fails(&params);
            assert!(
                e.starts_with("azure: ") && e.contains(want),
                "{params:?}: {e}"
            );
        }
    }
}
