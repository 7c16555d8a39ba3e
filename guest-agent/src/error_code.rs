//! Which [`ErrorCode`] each agent error crosses the protocol with: the host maps the code to
//! containerd's errdefs and never reads the message to decide (a process id the agent does not
//! know is `NotFound`, a duplicate one `AlreadyExists`, a bad signal `InvalidArgument` …).

use tern_protocol::ErrorCode;

use crate::cgroups::CgroupError;
use crate::container::ContainerError;
use crate::mirror::MirrorError;
use crate::mounts::MountError;
use crate::process::ProcessError;
use crate::pty::PtyError;
use crate::stats::StatsError;

/// An error that knows its protocol code.
pub trait CodedError: std::error::Error {
    fn code(&self) -> ErrorCode;
}

impl CodedError for ProcessError {
    fn code(&self) -> ErrorCode {
        match self {
            ProcessError::EmptyId | ProcessError::EmptyArgv | ProcessError::BadEnv(_) | ProcessError::BadSignal(_) => {
                ErrorCode::InvalidArgument
            }
            ProcessError::BadCwd { .. } => ErrorCode::InvalidArgument,
            ProcessError::DuplicateId(_) => ErrorCode::AlreadyExists,
            // An exited process cannot be signalled or fed: to containerd it is gone.
            ProcessError::Unknown(_) | ProcessError::Exited(_) => ErrorCode::NotFound,
            ProcessError::NoTerminal(_) | ProcessError::StreamTaken { .. } => ErrorCode::FailedPrecondition,
            ProcessError::Terminal(e) => e.code(),
            ProcessError::Spawn { .. } | ProcessError::Kill { .. } | ProcessError::Resize { .. } => ErrorCode::Internal,
        }
    }
}

impl CodedError for PtyError {
    fn code(&self) -> ErrorCode {
        match self {
            PtyError::Timeout(_) => ErrorCode::Timeout,
            PtyError::Bind { .. } | PtyError::Receive(_) | PtyError::NoFd | PtyError::Resize(_) | PtyError::Open(_) => {
                ErrorCode::Internal
            }
        }
    }
}

impl CodedError for CgroupError {
    fn code(&self) -> ErrorCode {
        match self {
            // The container's cgroup (or its process) is gone: so is the container.
            CgroupError::Read { source, .. } | CgroupError::Write { source, .. }
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                ErrorCode::NotFound
            }
            CgroupError::ProcCgroup { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                ErrorCode::NotFound
            }
            CgroupError::Empty => ErrorCode::NotFound,
            CgroupError::FreezeTimeout { .. } => ErrorCode::Timeout,
            CgroupError::ProcCgroup { .. }
            | CgroupError::NoUnifiedEntry(_)
            | CgroupError::Read { .. }
            | CgroupError::Write { .. }
            | CgroupError::Parse { .. }
            | CgroupError::Watch(_) => ErrorCode::Internal,
        }
    }
}

impl CodedError for ContainerError {
    fn code(&self) -> ErrorCode {
        match self {
            ContainerError::Process(e) => e.code(),
            ContainerError::Pty(e) => e.code(),
            ContainerError::Cgroup(e) => e.code(),
            ContainerError::InvalidId(_) | ContainerError::Spec(_) | ContainerError::ProcessSpec(_) => {
                ErrorCode::InvalidArgument
            }
            ContainerError::UnknownContainer(_) => ErrorCode::NotFound,
            ContainerError::Paused(_) => ErrorCode::FailedPrecondition,
            // libcontainer, bundle and pipe failures; a wildcard because `container.rs` gains
            // variants (seccomp) that are guest-side failures too unless mapped here.
            #[allow(unreachable_patterns)]
            _ => ErrorCode::Internal,
        }
    }
}

impl CodedError for MirrorError {
    fn code(&self) -> ErrorCode {
        match self {
            MirrorError::InvalidRequest(_) => ErrorCode::InvalidArgument,
            MirrorError::ShareMissing { .. } | MirrorError::NotMounted(_) => ErrorCode::NotFound,
            MirrorError::AlreadyMounted(_) => ErrorCode::AlreadyExists,
            #[allow(unreachable_patterns)]
            _ => ErrorCode::Internal,
        }
    }
}

impl CodedError for MountError {
    fn code(&self) -> ErrorCode {
        match self {
            MountError::InvalidGuestPath(_) | MountError::InvalidShare(_) => ErrorCode::InvalidArgument,
            MountError::NoDevice => ErrorCode::FailedPrecondition,
            MountError::ShareMissing(_) => ErrorCode::NotFound,
            MountError::AlreadyMounted(_) => ErrorCode::AlreadyExists,
            MountError::Mirror(e) => e.code(),
            #[allow(unreachable_patterns)]
            _ => ErrorCode::Internal,
        }
    }
}

impl CodedError for StatsError {
    fn code(&self) -> ErrorCode {
        ErrorCode::Internal
    }
}

impl CodedError for tern_netconf::NetError {
    fn code(&self) -> ErrorCode {
        ErrorCode::Internal
    }
}

impl CodedError for tern_protocol::ProtocolError {
    fn code(&self) -> ErrorCode {
        match self {
            // The request, not the agent, is at fault.
            tern_protocol::ProtocolError::FrameTooLarge(_) | tern_protocol::ProtocolError::Decode(_) => {
                ErrorCode::InvalidArgument
            }
            tern_protocol::ProtocolError::Io(_) | tern_protocol::ProtocolError::Closed => ErrorCode::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(kind: std::io::ErrorKind) -> std::io::Error {
        std::io::Error::from(kind)
    }

    #[test]
    fn an_id_the_agent_does_not_know_is_not_found() {
        assert_eq!(ProcessError::Unknown("p".into()).code(), ErrorCode::NotFound);
        assert_eq!(ProcessError::Exited("p".into()).code(), ErrorCode::NotFound);
        assert_eq!(ContainerError::UnknownContainer("c".into()).code(), ErrorCode::NotFound);
        assert_eq!(ContainerError::Process(ProcessError::Unknown("c".into())).code(), ErrorCode::NotFound);
        assert_eq!(MountError::ShareMissing("c1".into()).code(), ErrorCode::NotFound);
        // A container whose cgroup went away.
        let gone = CgroupError::Read {
            path: "/sys/fs/cgroup/c/cgroup.procs".into(),
            source: io(std::io::ErrorKind::NotFound),
        };
        assert_eq!(ContainerError::Cgroup(gone).code(), ErrorCode::NotFound);
    }

    #[test]
    fn each_class_keeps_its_code() {
        assert_eq!(ProcessError::DuplicateId("p".into()).code(), ErrorCode::AlreadyExists);
        assert_eq!(MountError::AlreadyMounted("/m".into()).code(), ErrorCode::AlreadyExists);
        assert_eq!(ProcessError::BadSignal(99).code(), ErrorCode::InvalidArgument);
        assert_eq!(ContainerError::InvalidId("a/b".into()).code(), ErrorCode::InvalidArgument);
        assert_eq!(MountError::InvalidGuestPath("..".into()).code(), ErrorCode::InvalidArgument);
        assert_eq!(ContainerError::Paused("c".into()).code(), ErrorCode::FailedPrecondition);
        assert_eq!(ProcessError::NoTerminal("p".into()).code(), ErrorCode::FailedPrecondition);
        let freeze = CgroupError::FreezeTimeout { frozen: true, timeout: std::time::Duration::from_secs(10) };
        assert_eq!(ContainerError::Cgroup(freeze).code(), ErrorCode::Timeout);
        let denied = CgroupError::Read { path: "/x".into(), source: io(std::io::ErrorKind::PermissionDenied) };
        assert_eq!(denied.code(), ErrorCode::Internal);
        assert_eq!(ContainerError::NoPid.code(), ErrorCode::Internal);
    }
}
