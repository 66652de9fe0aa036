//! The parallel crate's one error type.

/// A failed collective, transfer or rendezvous; the message names the rank involved.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("rank {rank}: {what}: {source}")]
    Io { rank: usize, what: String, source: std::io::Error },
    #[error("rendezvous failed: {0}")]
    Rendezvous(String),
    #[error("rank {0} disconnected (crashed or stopped)")]
    PeerGone(usize),
    #[error("malformed message from rank {rank}: {what}")]
    Protocol { rank: usize, what: String },
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Usage(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, CommError>;
