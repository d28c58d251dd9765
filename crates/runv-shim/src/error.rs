//! Errors as containerd reads them: a ttrpc status whose code containerd
//! maps to its errdefs (not found, failed precondition, ...).

use containerd_shim::protos::ttrpc::{self, Code};

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = ShimError> = std::result::Result<T, E>;

impl From<ShimError> for ttrpc::Error {
    fn from(error: ShimError) -> ttrpc::Error {
        let code = match &error {
            ShimError::NotFound(_) => Code::NOT_FOUND,
            ShimError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            ShimError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            ShimError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            ShimError::Unimplemented(_) => Code::UNIMPLEMENTED,
            ShimError::Internal(_) => Code::INTERNAL,
        };
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, error.to_string()))
    }
}

/// The agent's verdict carries over: containerd then says "invalid
/// argument" or "not found" rather than "unknown".
impl From<runv_agent_client::AgentError> for ShimError {
    fn from(error: runv_agent_client::AgentError) -> ShimError {
        use runv_agent_client::Code as AgentCode;
        let message = error.to_string();
        match error.status_code() {
            Some(AgentCode::INVALID_ARGUMENT) => ShimError::InvalidArgument(message),
            Some(AgentCode::NOT_FOUND) => ShimError::NotFound(message),
            Some(AgentCode::ALREADY_EXISTS) => ShimError::AlreadyExists(message),
            Some(AgentCode::FAILED_PRECONDITION) => ShimError::FailedPrecondition(message),
            _ => ShimError::Internal(message),
        }
    }
}
