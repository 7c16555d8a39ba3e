//! Agent errors as containerd's errdefs: the one place that decides which ttrpc code a failed
//! agent call becomes. containerd turns the codes back into `errdefs.ErrNotFound` and friends
//! (a `Kill` of a finished process must be NOT_FOUND, or `ctr task kill` and a forced delete
//! fail), so the code comes from the agent's typed answer, never from its message.

use containerd_shim_protos::ttrpc::{self, Code};
use tern_protocol::ErrorCode;

use crate::agent::AgentError;
use crate::sandbox::error_chain;

/// The ttrpc code for an agent error.
pub fn code_of(e: &AgentError) -> Code {
    match e {
        AgentError::Remote { code, .. } => match code {
            ErrorCode::NotFound => Code::NOT_FOUND,
            ErrorCode::AlreadyExists => Code::ALREADY_EXISTS,
            ErrorCode::InvalidArgument => Code::INVALID_ARGUMENT,
            ErrorCode::FailedPrecondition => Code::FAILED_PRECONDITION,
            ErrorCode::Unavailable => Code::UNAVAILABLE,
            ErrorCode::Timeout => Code::DEADLINE_EXCEEDED,
            ErrorCode::Internal => Code::INTERNAL,
        },
        AgentError::Timeout { .. } | AgentError::ConnectTimeout { .. } => Code::DEADLINE_EXCEEDED,
        // The guest (or its vsock) is gone or not there yet: retrying later may work.
        AgentError::Connect { .. }
        | AgentError::Refused(_)
        | AgentError::NotReady { .. }
        | AgentError::VmGone(_)
        | AgentError::Io(_)
        | AgentError::Protocol(tern_protocol::ProtocolError::Closed | tern_protocol::ProtocolError::Io(_)) => {
            Code::UNAVAILABLE
        }
        AgentError::Protocol(_) | AgentError::Handshake(_) | AgentError::Version { .. } | AgentError::Unexpected(_) => {
            Code::INTERNAL
        }
    }
}

/// `context: <error chain>` with the code of [`code_of`]. A client-side timeout names the
/// request that timed out (its `Display` does).
pub fn agent_error(context: &str, e: &AgentError) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code_of(e), format!("{context}: {}", error_chain(e))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn remote(code: ErrorCode) -> AgentError {
        AgentError::Remote { code, message: "m".into() }
    }

    #[test]
    fn each_agent_code_maps_to_its_errdefs_code() {
        let pairs = [
            (ErrorCode::NotFound, Code::NOT_FOUND),
            (ErrorCode::AlreadyExists, Code::ALREADY_EXISTS),
            (ErrorCode::InvalidArgument, Code::INVALID_ARGUMENT),
            (ErrorCode::FailedPrecondition, Code::FAILED_PRECONDITION),
            (ErrorCode::Unavailable, Code::UNAVAILABLE),
            (ErrorCode::Timeout, Code::DEADLINE_EXCEEDED),
            (ErrorCode::Internal, Code::INTERNAL),
        ];
        for (agent, ttrpc) in pairs {
            assert_eq!(code_of(&remote(agent)), ttrpc, "{agent:?}");
        }
    }

    #[test]
    fn a_client_timeout_is_deadline_exceeded_and_names_the_request() {
        let e = AgentError::Timeout { request: "container_stats", after: Duration::from_secs(30) };
        let ttrpc::Error::RpcStatus(status) = agent_error("cannot read the container's cgroup", &e) else {
            panic!("not a status");
        };
        assert_eq!(status.code(), Code::DEADLINE_EXCEEDED);
        assert!(status.message().contains("container_stats"), "{}", status.message());
        assert!(status.message().starts_with("cannot read the container's cgroup: "), "{}", status.message());
    }

    #[test]
    fn a_lost_guest_is_unavailable_and_a_confused_one_internal() {
        assert_eq!(code_of(&AgentError::VmGone("reset".into())), Code::UNAVAILABLE);
        assert_eq!(code_of(&AgentError::Refused(1024)), Code::UNAVAILABLE);
        assert_eq!(code_of(&AgentError::Protocol(tern_protocol::ProtocolError::Closed)), Code::UNAVAILABLE);
        assert_eq!(code_of(&AgentError::Unexpected("Ok".into())), Code::INTERNAL);
        assert_eq!(code_of(&AgentError::Version { got: 4 }), Code::INTERNAL);
    }
}
