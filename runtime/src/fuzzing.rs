//! The harness of the `oci_spec` fuzz target (`fuzz/`, feature `fuzzing`), also run over the
//! committed corpus by this crate's unit tests: an arbitrary OCI spec (as JSON, the way the shim
//! reads a bundle's `config.json`) through [`guest_spec_for`] with arbitrary bind translations
//! and joinable pids. It must never panic, and what it returns must parse as a spec again (the
//! agent parses it) with the guest rootfs as `root.path`, no hooks and no user namespace.

use oci_spec::runtime::{LinuxNamespaceType, Spec};

use crate::shim::container::{guest_spec_for, GuestAdaptation};

/// Adapt the spec in `data` (after a few bytes choosing the adaptation).
pub fn guest_spec(data: &[u8]) {
    let (head, json) = data.split_at(data.len().min(4));
    let mut head = head.iter().copied().chain(std::iter::repeat(0));
    let mut next = || head.next().unwrap_or(0);
    let mut adapt = GuestAdaptation::default();
    for i in 0..usize::from(next() % 4) {
        adapt.binds.insert(usize::from(next()) % 8, format!("/run/tern/shares/b{i}/x"));
    }
    adapt.joinable_pids = (0..next() % 3).map(|i| u32::from(i) + 1).collect();
    let rootfs = if next() & 1 == 0 { "/run/tern/shares/rootfs" } else { "" };
    let Ok(spec) = serde_json::from_slice::<Spec>(json) else { return };
    let Ok((out, _dropped)) = guest_spec_for(&spec, rootfs, &adapt) else { return };
    let parsed: Spec = match serde_json::from_str(&out) {
        Ok(s) => s,
        Err(e) => panic!("the adapted spec does not parse: {e}\n{out}"),
    };
    assert_eq!(parsed.root().as_ref().map(|r| r.path().clone()), Some(rootfs.into()), "root.path not the guest's");
    assert!(parsed.hooks().is_none(), "hooks reached the guest");
    let namespaces = parsed.linux().as_ref().and_then(|l| l.namespaces().clone()).unwrap_or_default();
    assert!(namespaces.iter().all(|ns| ns.typ() != LinuxNamespaceType::User), "a user namespace reached the guest");
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    /// The committed corpus (`fuzz/corpus/oci_spec/`), replayed by `cargo test`.
    #[test]
    fn committed_corpus_replays_without_a_failure() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/oci_spec");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            super::guest_spec(&std::fs::read(entry.unwrap().path()).unwrap());
            n += 1;
        }
        assert!(n > 0, "no corpus in {}", dir.display());
    }
}
