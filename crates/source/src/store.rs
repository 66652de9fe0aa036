//! Object stores for remote URIs (credentials from the usual environment variables), and the
//! mapping of store failures to our errors: permanent (404, 401/403) or worth a retry.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::http::HttpBuilder;
use object_store::path::Path as StorePath;
use object_store::{ClientOptions, HeaderMap, HeaderValue, ObjectStore, RetryConfig};

use crate::uri::{RemoteUri, StoreKind};
use crate::{Result, SourceError};

/// A store and the folder inside it that holds the model.
#[derive(Clone)]
pub struct Store {
    pub store: Arc<dyn ObjectStore>,
    pub prefix: StorePath,
    /// The URI the user gave, for messages.
    pub uri: String,
    /// What to check when access is denied.
    pub hint: &'static str,
}

impl Store {
    /// The store path of `name` (relative to the model's folder).
    pub fn path(&self, name: &str) -> StorePath {
        name.split('/').fold(self.prefix.clone(), |p, part| p.join(part))
    }

    /// `URI/name` for messages.
    pub fn describe(&self, name: &str) -> String {
        match self.uri.strip_suffix(".gguf").and_then(|_| self.uri.rsplit_once('/')) {
            Some((_, file)) if file == name => self.uri.clone(),
            _ => format!("{}/{name}", self.uri.trim_end_matches('/')),
        }
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn truthy(name: &str) -> bool {
    env(name).is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
}

/// Install the ring TLS provider for https stores (once per process; an earlier choice stays).
/// Any other reqwest 0.13 client of the process needs it too.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn client(allow_http: bool) -> ClientOptions {
    ClientOptions::new()
        .with_allow_http(allow_http)
        .with_connect_timeout(Duration::from_secs(10))
        .with_timeout(Duration::from_secs(300))
}

/// Our own loop retries (see `fetch`), so the store's client does not.
fn no_retry() -> RetryConfig {
    RetryConfig { max_retries: 0, ..RetryConfig::default() }
}

fn built<T: ObjectStore>(r: &RemoteUri, s: object_store::Result<T>) -> Result<Arc<dyn ObjectStore>> {
    s.map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
        .map_err(|e| SourceError::Uri { uri: r.uri.clone(), why: format!("cannot configure the store: {e}") })
}

/// Build the store a remote URI names, with credentials and endpoints from the environment.
pub fn open(r: &RemoteUri) -> Result<Store> {
    install_tls_provider();
    let prefix = StorePath::from(r.prefix.as_str());
    let (store, hint) = match &r.store {
        StoreKind::S3 { bucket } => {
            let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket).with_retry(no_retry());
            let endpoint =
                env("AWS_ENDPOINT_URL_S3").or_else(|| env("AWS_ENDPOINT_URL")).or_else(|| env("AWS_ENDPOINT"));
            let http = endpoint.as_deref().is_some_and(|e| e.starts_with("http://"));
            if let Some(e) = endpoint {
                b = b.with_endpoint(e);
            }
            if env("AWS_REGION").is_none() && env("AWS_DEFAULT_REGION").is_none() {
                b = b.with_region("us-east-1");
            }
            let credentials = [
                "AWS_ACCESS_KEY_ID",
                "AWS_WEB_IDENTITY_TOKEN_FILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_PROFILE",
            ]
            .iter()
            .any(|k| env(k).is_some());
            if !credentials {
                tracing::info!("{}: no AWS credentials in the environment; sending anonymous requests", r.uri);
            }
            if !credentials || truthy("AWS_NO_SIGN_REQUEST") || truthy("AWS_SKIP_SIGNATURE") {
                b = b.with_skip_signature(true);
            }
            let b = b.with_client_options(client(http || truthy("AWS_ALLOW_HTTP")));
            (
                built(r, b.build())?,
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the pod's IAM role); AWS_NO_SIGN_REQUEST=true for a public bucket",
            )
        }
        StoreKind::Gcs { bucket } => {
            let b = GoogleCloudStorageBuilder::from_env()
                .with_bucket_name(bucket)
                .with_retry(no_retry())
                .with_client_options(client(false));
            (built(r, b.build())?, "GOOGLE_APPLICATION_CREDENTIALS / GOOGLE_SERVICE_ACCOUNT (or workload identity)")
        }
        StoreKind::Azure { url } => {
            let b = MicrosoftAzureBuilder::from_env()
                .with_url(url.as_str())
                .with_retry(no_retry())
                .with_client_options(client(false));
            (
                built(r, b.build())?,
                "AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY or a SAS / workload identity",
            )
        }
        StoreKind::Http { base } => {
            let b = HttpBuilder::new()
                .with_url(base.as_str())
                .with_retry(no_retry())
                .with_client_options(client(base.starts_with("http://")));
            (built(r, b.build())?, "the server's access rules (no credentials are sent to http(s):// URIs)")
        }
        StoreKind::Hf { repo, revision } => {
            let endpoint = env("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into());
            let base = format!("{}/{repo}/resolve/{revision}", endpoint.trim_end_matches('/'));
            let mut headers = HeaderMap::new();
            if let Some(token) = env("HF_TOKEN").or_else(|| env("HUGGING_FACE_HUB_TOKEN")) {
                let v = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| SourceError::Uri {
                    uri: r.uri.clone(),
                    why: "HF_TOKEN is not a valid header value".into(),
                })?;
                headers.insert("authorization", v);
            }
            let b = HttpBuilder::new()
                .with_url(base.as_str())
                .with_retry(no_retry())
                .with_client_options(client(base.starts_with("http://")).with_default_headers(headers));
            (built(r, b.build())?, "HF_TOKEN (a gated or private repository needs a token with access)")
        }
    };
    Ok(Store { store, prefix, uri: r.uri.trim_end_matches('/').to_string(), hint })
}

/// A failed store call: give up at once, or try again.
pub enum Failure {
    Permanent(SourceError),
    Transient(String),
}

/// Sort a store error for `what` (a URI/file) into permanent or transient.
pub fn classify(e: object_store::Error, what: &str, hint: &str) -> Failure {
    use object_store::Error as E;
    match e {
        E::NotFound { .. } => Failure::Permanent(SourceError::NotFound(what.into())),
        E::PermissionDenied { source, .. } | E::Unauthenticated { source, .. } => {
            Failure::Permanent(SourceError::Denied { what: what.into(), detail: chain(&*source), hint: hint.into() })
        }
        // Some calls (listing) wrap the HTTP status in a generic error: read it from the text.
        E::Generic { source, .. } => {
            let text = chain(&*source);
            if text.contains("403 Forbidden") || text.contains("401 Unauthorized") {
                Failure::Permanent(SourceError::Denied { what: what.into(), detail: text, hint: hint.into() })
            } else if text.contains("404 Not Found") {
                Failure::Permanent(SourceError::NotFound(what.into()))
            } else {
                Failure::Transient(text)
            }
        }
        E::Precondition { .. } => Failure::Permanent(SourceError::Integrity(format!(
            "{what}: the object changed while it was being read (its ETag no longer matches); start again to read the new version"
        ))),
        // object_store's HTTP client refuses a 200 answer to a ranged GET.
        E::NotSupported { source } if chain(&*source).contains("Range request not supported") => {
            Failure::Permanent(SourceError::RangesUnsupported(what.into()))
        }
        other => Failure::Permanent(SourceError::Store { what: what.into(), detail: other.to_string() }),
    }
}

/// An error and its causes on one line (reqwest hides "connection refused" in a source).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut at = e.source();
    while let Some(c) = at {
        let c_s = c.to_string();
        if !s.contains(&c_s) {
            s += &format!(": {c_s}");
        }
        at = c.source();
    }
    s
}
