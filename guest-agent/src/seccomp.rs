//! A container's OCI seccomp profile on its way to libcontainer, which loads it in the
//! container's init where runc does (see the `tern-seccomp` crate for why libcontainer's
//! libseccomp support and not `seccompiler`): before the capabilities are dropped when the
//! process does not ask for `noNewPrivileges`, else right before exec, after NO_NEW_PRIVS.
//!
//! Before the spec is written for libcontainer the agent:
//! - checks the profile against this (the guest's) kernel and libseccomp: an unknown syscall
//!   name, `SCMP_ACT_NOTIFY`, a flag or action the kernel lacks fail the start with the name,
//!   where libcontainer would drop the rule with a warning;
//! - rewrites `SCMP_CMP_MASKED_EQ` comparisons into libcontainer 0.7's operand order
//!   ([`tern_seccomp::masked_eq_for_libcontainer`]; without it containerd's default profile
//!   would let a container without CAP_SYS_ADMIN `clone` new namespaces, which runc refuses);
//! - drops an explicit `"noNewPrivileges": false`: libcontainer takes the "before the capability
//!   drop" path only when the field is absent, and with `false` would load the filter after
//!   CAP_SYS_ADMIN is gone and fail. OCI's default is `false`, so the meaning is unchanged.

use serde_json::Value;
use tern_seccomp::ProfileError;
use tracing::info;

/// Prepare the OCI spec `oci` of container `id` for libcontainer; see the module docs.
pub fn prepare_spec(id: &str, oci: &mut Value) -> Result<(), ProfileError> {
    if let Some(process) = oci.get_mut("process") {
        prepare_process(process);
    }
    let Some(profile) = oci.pointer_mut("/linux/seccomp").filter(|p| !p.is_null()) else {
        return Ok(());
    };
    tern_seccomp::check_for_this_kernel(profile)?;
    let swapped = tern_seccomp::masked_eq_for_libcontainer(profile);
    let rules = profile.get("syscalls").and_then(Value::as_array).map_or(0, Vec::len);
    let default = profile.get("defaultAction").and_then(Value::as_str).unwrap_or_default().to_owned();
    info!(id, rules, default, masked_eq = swapped, "seccomp profile checked");
    Ok(())
}

/// Prepare an OCI `process` object (a container's, or an exec's) for libcontainer.
pub fn prepare_process(process: &mut Value) {
    if let Some(fields) = process.as_object_mut() {
        if fields.get("noNewPrivileges") == Some(&Value::Bool(false)) {
            fields.remove("noNewPrivileges");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn an_explicit_false_no_new_privileges_is_dropped_and_true_kept() {
        let mut spec = json!({"process": {"args": ["sh"], "noNewPrivileges": false}});
        prepare_spec("c", &mut spec).unwrap();
        assert_eq!(spec, json!({"process": {"args": ["sh"]}}));
        let mut process = json!({"args": ["sh"], "noNewPrivileges": true});
        prepare_process(&mut process);
        assert_eq!(process["noNewPrivileges"], json!(true));
    }

    #[test]
    fn the_profile_is_checked_and_rewritten_for_libcontainer() {
        let clone = json!({"index": 0, "value": 2114060288u64, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"});
        let mut spec = json!({"linux": {"seccomp": {
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [{"names": ["clone"], "action": "SCMP_ACT_ALLOW", "args": [clone]}]
        }}});
        prepare_spec("c", &mut spec).unwrap();
        let arg = &spec["linux"]["seccomp"]["syscalls"][0]["args"][0];
        assert_eq!((arg["value"].as_u64(), arg["valueTwo"].as_u64()), (Some(0), Some(2114060288)));

        let mut spec = json!({"linux": {"seccomp": {
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["sethostname", "not_a_syscall"], "action": "SCMP_ACT_ERRNO"}]
        }}});
        let err = prepare_spec("c", &mut spec).unwrap_err();
        assert!(err.to_string().contains("\"not_a_syscall\""), "{err}");
        // No profile, nothing to check.
        prepare_spec("c", &mut json!({"linux": {"seccomp": null}})).unwrap();
        prepare_spec("c", &mut json!({})).unwrap();
    }
}
