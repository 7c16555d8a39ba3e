//! Checks a container's OCI `linux.seccomp` profile with libseccomp before the container is
//! created, so a profile tern cannot enforce fails with the offending name instead of letting
//! the container run unfiltered or with rules missing.
//!
//! The filter itself is built and loaded by libcontainer (its `libseccomp` feature) inside the
//! container's init, where runc loads it: before the capabilities are dropped when the process
//! does not set `noNewPrivileges` (loading then needs CAP_SYS_ADMIN), else right before exec.
//! tern does not compile the profile itself with `seccompiler`: the only hook libcontainer offers
//! a caller is the executor, which runs after the capabilities are dropped, so a process without
//! `noNewPrivileges` (a Kubernetes pod's default) could not load a filter there; and libseccomp
//! is what runc uses, so the BPF (architectures, the x32 syscall bit, 64-bit argument
//! comparisons, `errnoRet`) is the one runc would load.
//!
//! [`check_profile`] builds the filter as runc does (libcontainer's translation, its skipped rules
//! and runc's operand order for `SCMP_CMP_MASKED_EQ`, see [`masked_eq_for_libcontainer`]) without
//! loading it, and refuses what libcontainer would skip or libseccomp would silently change:
//! - a syscall name libseccomp knows on no architecture (libcontainer and runc log a warning and
//!   drop the rule);
//! - `SCMP_ACT_NOTIFY` and `listenerPath`: the guest runs no seccomp agent to answer;
//! - an `errnoRet` beyond the 16 bits of `SECCOMP_RET_DATA` (libseccomp truncates it).
//!
//! Names libseccomp knows but x86_64 lacks (`_llseek`, `socketcall`, … in containerd's default
//! profile, which also lists `SCMP_ARCH_X86` and `SCMP_ARCH_X32`) are accepted: libseccomp applies
//! them on the architectures that have them, as for runc.
//!
//! The shim calls [`check_profile`] at Create; the agent calls [`check_for_this_kernel`] before
//! libcontainer runs, which also asks the running (guest) kernel for the flags.

use libseccomp::error::SeccompError;
use libseccomp::{ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall};
use serde::Deserialize;

/// A profile tern cannot enforce as written.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("the seccomp profile is not valid")]
    Parse(#[source] serde_json::Error),
    #[error("seccomp action SCMP_ACT_NOTIFY ({0}) is not supported: no seccomp agent runs in the guest to answer it")]
    Notify(String),
    #[error("seccomp listenerPath {0:?} is not supported: no seccomp agent runs in the guest")]
    Listener(String),
    #[error("unknown seccomp action {action:?} ({what})")]
    UnknownAction { action: String, what: String },
    #[error("unknown seccomp architecture {0:?}")]
    UnknownArch(String),
    #[error("unknown seccomp filter flag {0:?}")]
    UnknownFlag(String),
    #[error("seccomp filter flag {flag} is not supported by this kernel or libseccomp")]
    Flag {
        flag: String,
        #[source]
        source: SeccompError,
    },
    #[error(
        "unknown syscall {0:?} in the seccomp profile: libseccomp knows no syscall of that name on any architecture"
    )]
    UnknownSyscall(String),
    #[error("errnoRet {errno} ({what}) does not fit the 16 bits a seccomp filter returns")]
    Errno { errno: u32, what: String },
    #[error("unknown seccomp comparison {op:?} for syscall {name:?}")]
    UnknownOperator { op: String, name: String },
    #[error("seccomp argument index {index} for syscall {name:?} is out of range (a syscall has arguments 0 to 5)")]
    ArgIndex { index: u64, name: String },
    #[error("seccomp default action {action} cannot be used on this kernel")]
    DefaultAction {
        action: String,
        #[source]
        source: SeccompError,
    },
    #[error("cannot add seccomp architecture {arch}")]
    AddArch {
        arch: String,
        #[source]
        source: SeccompError,
    },
    #[error("cannot add the seccomp rule for syscall {name:?} ({action})")]
    Rule {
        name: String,
        action: String,
        #[source]
        source: SeccompError,
    },
}

/// `linux.seccomp` of an OCI runtime spec, as far as the filter goes.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Profile {
    default_action: String,
    default_errno_ret: Option<u32>,
    architectures: Option<Vec<String>>,
    flags: Option<Vec<String>>,
    listener_path: Option<String>,
    syscalls: Option<Vec<Rule>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rule {
    names: Vec<String>,
    action: String,
    errno_ret: Option<u32>,
    args: Option<Vec<Arg>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Arg {
    index: u64,
    value: u64,
    value_two: Option<u64>,
    op: String,
}

/// Whether a check also asks the running kernel (the agent in the guest) or only libseccomp
/// (the shim on the host, whose kernel is not the guest's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Ignore,
    Running,
}

/// Check `seccomp` (the JSON of `linux.seccomp`) for everything that does not depend on the
/// guest kernel: actions, architectures, flag names, syscall names, argument comparisons.
pub fn check_profile(seccomp: &serde_json::Value) -> Result<(), ProfileError> {
    build(seccomp, Kernel::Ignore).map(drop)
}

/// [`check_profile`], plus the filter flags on the running kernel (the guest's, in the agent).
/// The actions are checked against the running kernel by libseccomp in both.
pub fn check_for_this_kernel(seccomp: &serde_json::Value) -> Result<(), ProfileError> {
    build(seccomp, Kernel::Running).map(drop)
}

/// The filter libcontainer's `seccomp::initialize_seccomp` (0.7) builds from the profile, with
/// its rules: `SCMP_ACT_KILL` is KILL_THREAD, errno defaults to EPERM, a rule whose action is the
/// default action is skipped, and comparisons of one argument index twice become one rule each;
/// `SCMP_CMP_MASKED_EQ` as runc means it (`value` the mask, `valueTwo` the datum).
fn build(seccomp: &serde_json::Value, kernel: Kernel) -> Result<ScmpFilterContext, ProfileError> {
    let profile = Profile::deserialize(seccomp).map_err(ProfileError::Parse)?;
    if let Some(path) = profile.listener_path.as_ref().filter(|p| !p.is_empty()) {
        return Err(ProfileError::Listener(path.clone()));
    }
    let default_what = "the default action";
    let default = action(&profile.default_action, profile.default_errno_ret, default_what)?;
    let mut ctx = ScmpFilterContext::new(default)
        .map_err(|source| ProfileError::DefaultAction { action: profile.default_action.clone(), source })?;
    for name in profile.flags.iter().flatten() {
        let set = match name.as_str() {
            "SECCOMP_FILTER_FLAG_LOG" => ScmpFilterContext::set_ctl_log,
            "SECCOMP_FILTER_FLAG_TSYNC" => ScmpFilterContext::set_ctl_tsync,
            "SECCOMP_FILTER_FLAG_SPEC_ALLOW" => ScmpFilterContext::set_ctl_ssb,
            "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV" => ScmpFilterContext::set_ctl_waitkill,
            _ => return Err(ProfileError::UnknownFlag(name.clone())),
        };
        if kernel == Kernel::Running {
            set(&mut ctx, true).map_err(|source| ProfileError::Flag { flag: name.clone(), source })?;
        }
    }
    for name in profile.architectures.iter().flatten() {
        let arch: ScmpArch = name.parse().map_err(|_| ProfileError::UnknownArch(name.clone()))?;
        ctx.add_arch(arch).map_err(|source| ProfileError::AddArch { arch: name.clone(), source })?;
    }
    for rule in profile.syscalls.iter().flatten() {
        let what = format!("syscalls {}", rule.names.join(", "));
        let rule_action = action(&rule.action, rule.errno_ret, &what)?;
        for name in &rule.names {
            // Resolved even when the rule is skipped below: a misspelt name is a mistake in the
            // profile whatever its action.
            let syscall = ScmpSyscall::from_name(name).map_err(|_| ProfileError::UnknownSyscall(name.clone()))?;
            if rule_action == default {
                continue;
            }
            let comparisons = comparisons(rule, name)?;
            let rule_err = |source| ProfileError::Rule { name: name.clone(), action: rule.action.clone(), source };
            let mut indexes: Vec<u32> = comparisons.iter().map(|(index, _)| *index).collect();
            indexes.sort_unstable();
            indexes.dedup();
            let comparisons: Vec<ScmpArgCompare> = comparisons.into_iter().map(|(_, c)| c).collect();
            if comparisons.is_empty() {
                ctx.add_rule(rule_action, syscall).map_err(rule_err)?;
            } else if indexes.len() == comparisons.len() {
                ctx.add_rule_conditional(rule_action, syscall, &comparisons).map_err(rule_err)?;
            } else {
                for c in &comparisons {
                    ctx.add_rule_conditional(rule_action, syscall, std::slice::from_ref(c)).map_err(rule_err)?;
                }
            }
        }
    }
    Ok(ctx)
}

/// The libseccomp action of an OCI action name; `what` names its use in errors.
fn action(name: &str, errno_ret: Option<u32>, what: &str) -> Result<ScmpAction, ProfileError> {
    let errno = errno_ret.unwrap_or(libc::EPERM as u32);
    let data = u16::try_from(errno).map_err(|_| ProfileError::Errno { errno, what: what.to_owned() })?;
    Ok(match name {
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => ScmpAction::KillThread,
        "SCMP_ACT_KILL_PROCESS" => ScmpAction::KillProcess,
        "SCMP_ACT_TRAP" => ScmpAction::Trap,
        "SCMP_ACT_ERRNO" => ScmpAction::Errno(i32::from(data)),
        "SCMP_ACT_TRACE" => ScmpAction::Trace(data),
        "SCMP_ACT_ALLOW" => ScmpAction::Allow,
        "SCMP_ACT_LOG" => ScmpAction::Log,
        "SCMP_ACT_NOTIFY" => return Err(ProfileError::Notify(what.to_owned())),
        _ => return Err(ProfileError::UnknownAction { action: name.to_owned(), what: what.to_owned() }),
    })
}

/// The argument comparisons of `rule`, with their argument index, for syscall `name`.
fn comparisons(rule: &Rule, name: &str) -> Result<Vec<(u32, ScmpArgCompare)>, ProfileError> {
    rule.args
        .iter()
        .flatten()
        .map(|arg| {
            let index = u32::try_from(arg.index)
                .ok()
                .filter(|i| *i < 6)
                .ok_or_else(|| ProfileError::ArgIndex { index: arg.index, name: name.to_owned() })?;
            let op = match arg.op.as_str() {
                "SCMP_CMP_NE" => ScmpCompareOp::NotEqual,
                "SCMP_CMP_LT" => ScmpCompareOp::Less,
                "SCMP_CMP_LE" => ScmpCompareOp::LessOrEqual,
                "SCMP_CMP_EQ" => ScmpCompareOp::Equal,
                "SCMP_CMP_GE" => ScmpCompareOp::GreaterEqual,
                "SCMP_CMP_GT" => ScmpCompareOp::Greater,
                "SCMP_CMP_MASKED_EQ" => ScmpCompareOp::MaskedEqual(arg.value),
                _ => return Err(ProfileError::UnknownOperator { op: arg.op.clone(), name: name.to_owned() }),
            };
            let datum =
                if matches!(op, ScmpCompareOp::MaskedEqual(_)) { arg.value_two.unwrap_or(0) } else { arg.value };
            Ok((index, ScmpArgCompare::new(index, op, datum)))
        })
        .collect()
}

/// The libseccomp version linked in (`major.minor.micro`), for `tern check` and logs.
pub fn libseccomp_version() -> Option<String> {
    libseccomp::ScmpVersion::current().ok().map(|v| format!("{}.{}.{}", v.major, v.minor, v.micro))
}

/// Rewrite the `SCMP_CMP_MASKED_EQ` comparisons of `seccomp` (the JSON of `linux.seccomp`) so
/// that libcontainer 0.7 loads what runc loads; returns how many it rewrote.
///
/// runc (libseccomp-golang's `MakeCondition(index, op, value, valueTwo)`) compares
/// `(arg & value) == valueTwo`: containerd's default profile allows `clone` only when
/// `(flags & CLONE_NEW*) == 0`. libcontainer 0.7 passes `valueTwo` as the mask and `value` as the
/// datum; libseccomp masks the datum too, so the rule becomes `(flags & 0) == 0` and allows every
/// `clone`, namespace flags included (measured with libseccomp 2.5.4: `clone(CLONE_NEWUSER)`
/// passes that rule and is refused by runc's). Swapping the two operands in the spec makes
/// libcontainer's translation runc's.
pub fn masked_eq_for_libcontainer(seccomp: &mut serde_json::Value) -> usize {
    let mut swapped = 0;
    let rules = seccomp.get_mut("syscalls").and_then(serde_json::Value::as_array_mut);
    for rule in rules.into_iter().flatten() {
        let args = rule.get_mut("args").and_then(serde_json::Value::as_array_mut);
        for arg in args.into_iter().flatten() {
            if arg.get("op").and_then(serde_json::Value::as_str) != Some("SCMP_CMP_MASKED_EQ") {
                continue;
            }
            let Some(fields) = arg.as_object_mut() else { continue };
            let value = fields.remove("value").unwrap_or(serde_json::Value::from(0u64));
            let value_two = fields.remove("valueTwo").unwrap_or(serde_json::Value::from(0u64));
            fields.insert("value".to_owned(), value_two);
            fields.insert("valueTwo".to_owned(), value);
            swapped += 1;
        }
    }
    swapped
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
