//! Client errors.

use flowgate_protocol::ErrorCode;

/// What went wrong talking to an engine.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// Could not connect, or the connection failed.
    #[error("connection to {addr} failed: {message}; is the engine running there?")]
    Io {
        /// The engine address.
        addr: String,
        /// The OS error.
        message: String,
    },
    /// The connection closed with requests outstanding; they may or may not have been
    /// applied (a [`crate::Producer`] retries them safely).
    #[error("connection to {0} closed before the reply arrived")]
    Disconnected(String),
    /// The engine answered with an error.
    #[error("engine refused the request: {code}: {message}")]
    Server {
        /// The error code.
        code: ErrorCode,
        /// The engine's explanation.
        message: String,
    },
    /// The engine sent something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A batch larger than the engine accepts.
    #[error("request of {size} bytes exceeds the engine's frame limit of {max} bytes; send smaller batches")]
    TooLarge {
        /// Request size.
        size: usize,
        /// The limit.
        max: u32,
    },
}

impl ClientError {
    /// True when resending the same request may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            ClientError::Io { .. } | ClientError::Disconnected(_) => true,
            ClientError::Server { code, .. } => code.is_retriable(),
            _ => false,
        }
    }
}
