//! The kernels crate's one error type.

/// A kernel refused its inputs (shapes or block data that do not fit).
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{0}")]
    Shape(String),
    #[error("unsupported quantization type: {0}")]
    Unsupported(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, KernelError>;
