//! The source crate's one error type. Every message names the URI or file at fault.

/// Errors raised while finding, reading or downloading a model.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A URI this crate cannot read (unknown scheme, malformed).
    #[error("model URI `{uri}`: {why}")]
    Uri { uri: String, why: String },
    /// The object does not exist (HTTP 404 or a missing local file).
    #[error("{0}: not found")]
    NotFound(String),
    /// The store refused us (HTTP 401/403).
    #[error("{what}: access denied ({detail}); check the credentials: {hint}")]
    Denied { what: String, detail: String, hint: String },
    /// A transient failure that outlived the retries.
    #[error("{what}: gave up after {attempts} attempts: {last}")]
    GaveUp { what: String, attempts: u32, last: String },
    /// The bytes received are not the bytes promised (length, checksum).
    #[error("{0}")]
    Integrity(String),
    /// A model layout problem found while discovering files (no config.json, missing shard).
    #[error("{0}")]
    Layout(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The server answered a ranged GET with the whole file (or refused ranges): the caller
    /// falls back to one plain GET of the whole file.
    #[error("{0}: the server does not serve byte ranges")]
    RangesUnsupported(String),
    /// Any other store failure that retrying does not help.
    #[error("{what}: {detail}")]
    Store { what: String, detail: String },
}

impl SourceError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io { path: path.display().to_string(), source }
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, SourceError>;
