//! A remote artifact store and shared cache on object storage, through the `object_store`
//! crate: `s3://bucket/prefix` (endpoint, region and credentials from the usual `AWS_*`
//! variables or `remote_options`), `gs://bucket/prefix` (`GOOGLE_*`), `az://container/prefix`
//! (`AZURE_*`), `file:///path` and `memory://` (tests). Like a Bazel or
//! Turborepo remote cache, or a DVC remote:
//!
//! ```text
//! PREFIX/objects/<blake3>        a file object's bytes, or one file of a folder object
//! PREFIX/trees/<blake3>.json     a folder object: every entry (path, kind, digest or link target)
//! PREFIX/cache/<cache key>.json  a cache entry: outputs by name and their artifact records
//! ```
//!
//! Objects are content-addressed, so uploads are idempotent and skip what is there; cache
//! entries are written with a conditional put (`If-None-Match: *`), so two machines racing
//! on one key leave the first entry (both describe the same outputs). Nothing downloaded is
//! trusted before its bytes hash to the digest that names it: a folder is rebuilt in a
//! temp folder, its Merkle digest recomputed, and only then committed to the local store.
//! Transfers run in parallel up to a bound; large files go up in multipart uploads.
//! Credentials never appear in messages: the remote is shown as its URL without userinfo
//! or query.

mod layout;
mod transfer;

use std::collections::BTreeMap;
use std::sync::Arc;

use object_store::path::Path as RemotePath;
use object_store::ObjectStore;
use serde::{Deserialize, Serialize};

use crate::store::{ArtifactRecord, CacheKey, ObjectDigest, OutputRef};

pub use layout::{Tree, TreeKind};
pub use transfer::{Area, Stats, TransferProgress};

/// How many transfers run at once.
pub const DEFAULT_CONCURRENCY: usize = 32;

/// Files at least this large are uploaded in parts.
pub const MULTIPART_THRESHOLD: u64 = 16 << 20;

/// What can go wrong with a remote.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The URL or an option is wrong.
    #[error("remote {url}: {message}")]
    Config {
        /// The remote, without credentials.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// The remote could not be reached or refused a request.
    #[error("remote {url}: {message}")]
    Unavailable {
        /// The remote, without credentials.
        url: String,
        /// What failed.
        message: String,
    },
    /// Bytes that do not match their digest: never trusted.
    #[error("remote object {object} does not match its digest (expected {expected}, got {actual}); it was not used. Remove it from the remote (or run `cairn push` from a machine that has it intact)")]
    Corrupt {
        /// The object's key in the remote.
        object: String,
        /// The digest it is stored under.
        expected: String,
        /// What its bytes hash to.
        actual: String,
    },
    /// A cache entry that cannot be read.
    #[error("remote cache entry {object} is unreadable: {message}")]
    BadEntry {
        /// Its key in the remote.
        object: String,
        /// Why.
        message: String,
    },
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A local file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

impl RemoteError {
    /// Whether the remote itself failed (unreachable, refusing): the run stops asking
    /// it. Bad bytes or entries only cost that one hit.
    pub fn remote_failed(&self) -> bool {
        matches!(
            self,
            RemoteError::Unavailable { .. } | RemoteError::Config { .. }
        )
    }

    fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        RemoteError::Io {
            what: what.into(),
            source,
        }
    }
}

/// A cache entry as the remote keeps it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RemoteEntry {
    /// The cache key.
    pub key: CacheKey,
    /// Outputs by name.
    pub outputs: BTreeMap<String, OutputRef>,
    /// The run that produced them (on the machine that pushed).
    pub run_id: String,
    /// The step that produced them.
    pub step: String,
    /// Its pipeline.
    pub pipeline: String,
    /// The outputs' artifact records (kind, size, metadata).
    pub artifacts: Vec<ArtifactRecord>,
}

/// An open remote.
#[derive(Clone)]
pub struct Remote {
    store: Arc<dyn ObjectStore>,
    prefix: RemotePath,
    shown: String,
    concurrency: usize,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl Remote {
    /// Opens `url` with `options` (object_store configuration keys such as
    /// `aws_endpoint`, `aws_region`, `azure_storage_use_emulator`, ...); each cloud also reads
    /// its variables (`AWS_*`, `GOOGLE_*`, `AZURE_*`).
    pub fn open(url: &str, options: &BTreeMap<String, String>) -> Result<Remote, RemoteError> {
        let shown = shown_url(url);
        let config = |message: String| RemoteError::Config {
            url: shown.clone(),
            message,
        };
        let parsed = url::Url::parse(url)
            .map_err(|e| config(format!("not a URL ({e}); write one of {SCHEMES}")))?;
        let prefix = RemotePath::from(parsed.path().trim_matches('/'));
        let store: Arc<dyn ObjectStore> = match parsed.scheme() {
            "s3" => Arc::new(s3(&parsed, options).map_err(config)?),
            "gs" => Arc::new(gcs(&parsed, options).map_err(config)?),
            "az" | "azure" => Arc::new(azure(&parsed, options).map_err(config)?),
            "file" => {
                let root = std::path::PathBuf::from(parsed.path());
                std::fs::create_dir_all(&root)
                    .map_err(|e| config(format!("cannot create {}: {e}", root.display())))?;
                let local = object_store::local::LocalFileSystem::new_with_prefix(&root)
                    .map_err(|e| config(e.to_string()))?;
                return Ok(Remote {
                    store: Arc::new(local),
                    prefix: RemotePath::default(),
                    shown,
                    concurrency: DEFAULT_CONCURRENCY,
                });
            }
            "memory" => Arc::new(object_store::memory::InMemory::new()),
            other => {
                return Err(config(format!(
                    "unsupported scheme `{other}:` (this build speaks {SCHEMES})"
                )))
            }
        };
        Ok(Remote {
            store,
            prefix,
            shown,
            concurrency: DEFAULT_CONCURRENCY,
        })
    }

    /// The remote as messages show it (no credentials).
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// At most this many transfers at once.
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    fn key(&self, parts: &[&str]) -> RemotePath {
        let mut path = self.prefix.clone();
        for part in parts {
            path = path.clone().join(*part);
        }
        path
    }

    fn object_key(&self, digest: &ObjectDigest) -> RemotePath {
        self.key(&["objects", &digest.to_hex()])
    }

    fn tree_key(&self, digest: &ObjectDigest) -> RemotePath {
        self.key(&["trees", &format!("{}.json", digest.to_hex())])
    }

    fn entry_key(&self, key: &CacheKey) -> RemotePath {
        self.key(&["cache", &format!("{}.json", key.to_hex())])
    }

    fn unavailable(&self, e: impl std::fmt::Display) -> RemoteError {
        RemoteError::Unavailable {
            url: self.shown.clone(),
            message: redact(&e.to_string()),
        }
    }
}

/// The remotes this build opens, as the messages list them.
const SCHEMES: &str =
    "s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, az://CONTAINER/PREFIX, file:///PATH or memory://";

/// A few quick retries: a remote that is down should not hold a run for minutes (the run
/// goes on locally and says why).
fn retry() -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig::default(),
        max_retries: 3,
        retry_timeout: std::time::Duration::from_secs(30),
    }
}

/// The bucket (or container) a URL names: its host.
fn bucket<'u>(parsed: &'u url::Url, what: &str) -> Result<&'u str, String> {
    parsed.host_str().filter(|b| !b.is_empty()).ok_or_else(|| {
        let scheme = parsed.scheme();
        format!(
            "names no {what}: write {scheme}://{}/PREFIX",
            what.to_uppercase()
        )
    })
}

/// Applies `options` (object_store configuration keys) through `apply`; an unknown key
/// is an error that lists `known`.
fn configure<K: std::str::FromStr>(
    options: &BTreeMap<String, String>,
    known: &str,
    mut apply: impl FnMut(K, &str),
) -> Result<(), String> {
    for (key, value) in options {
        let parsed: K = key
            .parse()
            .map_err(|_| format!("unknown option `{key}` ({known})"))?;
        apply(parsed, value);
    }
    Ok(())
}

/// `s3://BUCKET/PREFIX`: the `AWS_*` variables, then `options`.
fn s3(
    parsed: &url::Url,
    options: &BTreeMap<String, String>,
) -> Result<object_store::aws::AmazonS3, String> {
    use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(bucket(parsed, "bucket")?)
        .with_retry(retry());
    configure(
        options,
        "S3 options: aws_endpoint, aws_region, aws_allow_http, aws_access_key_id, ...",
        |key: AmazonS3ConfigKey, value| {
            builder = std::mem::take(&mut builder).with_config(key, value)
        },
    )?;
    // Endpoints such as a local S3 API speak plain HTTP when told so by AWS_ALLOW_HTTP;
    // object_store reads AWS_ENDPOINT, many tools AWS_ENDPOINT_URL.
    if let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL") {
        if std::env::var_os("AWS_ENDPOINT").is_none() && !options.contains_key("aws_endpoint") {
            builder = builder.with_endpoint(endpoint);
        }
    }
    builder.build().map_err(|e| redact(&e.to_string()))
}

/// `gs://BUCKET/PREFIX`: the `GOOGLE_*` variables (`GOOGLE_SERVICE_ACCOUNT`,
/// `GOOGLE_APPLICATION_CREDENTIALS`, ...), then `options`.
fn gcs(
    parsed: &url::Url,
    options: &BTreeMap<String, String>,
) -> Result<object_store::gcp::GoogleCloudStorage, String> {
    use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
    let mut builder = GoogleCloudStorageBuilder::from_env()
        .with_bucket_name(bucket(parsed, "bucket")?)
        .with_retry(retry());
    configure(
        options,
        "GCS options: google_service_account, google_service_account_key, google_application_credentials, ...",
        |key: GoogleConfigKey, value| builder = std::mem::take(&mut builder).with_config(key, value),
    )?;
    builder.build().map_err(|e| redact(&e.to_string()))
}

/// `az://CONTAINER/PREFIX`: the `AZURE_*` variables (`AZURE_STORAGE_ACCOUNT_NAME`,
/// `AZURE_STORAGE_ACCOUNT_KEY`, `AZURE_STORAGE_USE_EMULATOR` for Azurite, ...), then
/// `options`.
fn azure(
    parsed: &url::Url,
    options: &BTreeMap<String, String>,
) -> Result<object_store::azure::MicrosoftAzure, String> {
    use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
    let mut builder = MicrosoftAzureBuilder::from_env()
        .with_container_name(bucket(parsed, "container")?)
        .with_retry(retry());
    configure(
        options,
        "Azure options: azure_storage_account_name, azure_storage_account_key, azure_storage_sas_key, azure_storage_use_emulator, ...",
        |key: AzureConfigKey, value| builder = std::mem::take(&mut builder).with_config(key, value),
    )?;
    builder.build().map_err(|e| redact(&e.to_string()))
}

/// `url` without userinfo and query (where credentials hide).
pub fn shown_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            parsed.set_query(None);
            parsed.to_string()
        }
        Err(_) => crate::redact::redact_text(url),
    }
}

fn redact(text: &str) -> String {
    crate::redact::redact_text(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_error(url: &str, options: &[(&str, &str)]) -> String {
        let options = options
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Remote::open(url, &options).unwrap_err().to_string()
    }

    #[test]
    fn every_cloud_scheme_opens_and_says_what_is_wrong() {
        let none = BTreeMap::new();
        for url in ["s3://b/p", "gs://b/p", "az://c/p", "azure://c/p"] {
            let options: BTreeMap<String, String> = match url {
                // Azure needs an account before anything is sent; GCS and S3 look for
                // credentials only when a request is made.
                "az://c/p" | "azure://c/p" => {
                    [("azure_storage_account_name".into(), "acct".into())].into()
                }
                _ => none.clone(),
            };
            let remote = Remote::open(url, &options).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(remote.shown(), url);
        }
        assert!(open_error("gs:///p", &[]).contains("names no bucket: write gs://BUCKET/PREFIX"));
        assert!(
            open_error("az:///p", &[]).contains("names no container: write az://CONTAINER/PREFIX")
        );
        let unknown = open_error("gs://b/p", &[("aws_region", "x")]);
        assert!(
            unknown.contains("unknown option `aws_region` (GCS options: google_service_account"),
            "{unknown}"
        );
        let unknown = open_error("az://c/p", &[("google_bucket", "x")]);
        assert!(
            unknown.contains("(Azure options: azure_storage_account_name"),
            "{unknown}"
        );
        let scheme = open_error("ftp://h/p", &[]);
        assert!(
            scheme.contains("gs://BUCKET/PREFIX, az://CONTAINER/PREFIX"),
            "{scheme}"
        );
    }
}
