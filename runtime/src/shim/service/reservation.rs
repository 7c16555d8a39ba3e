//! `Create`'s reservation of its container id (see [`IdReservation`]).

use std::sync::Arc;

use containerd_shim::TtrpcResult;
use containerd_shim_protos::ttrpc::Code;

use super::{rpc_error, Container, Inner};
use tern_sync::LockExt;

/// An id reserved by a `Create` in progress; dropping it (every failure path, or the request
/// being cancelled) frees the id again. [`IdReservation::commit`] turns it into the container.
pub(super) struct IdReservation {
    inner: Arc<Inner>,
    id: String,
}

impl IdReservation {
    /// Reserve `id`, or fail with ALREADY_EXISTS when it exists or is being created.
    pub(super) fn take(inner: &Arc<Inner>, id: &str) -> TtrpcResult<IdReservation> {
        let mut state = inner.state.lock_unpoisoned();
        if state.containers.contains_key(id) || !state.creating.insert(id.to_owned()) {
            return Err(rpc_error(Code::ALREADY_EXISTS, format!("container {id} already exists")));
        }
        Ok(IdReservation { inner: Arc::clone(inner), id: id.to_owned() })
    }

    /// Register the created container under the reserved id (in one step with the release).
    pub(super) fn commit(self, container: Container) {
        let mut state = self.inner.state.lock_unpoisoned();
        state.creating.remove(&self.id);
        state.containers.insert(self.id.clone(), container);
    }
}

impl Drop for IdReservation {
    fn drop(&mut self) {
        // A no-op after `commit`.
        self.inner.state.lock_unpoisoned().creating.remove(&self.id);
    }
}
