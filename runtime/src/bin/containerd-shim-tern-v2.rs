//! `containerd-shim-tern-v2`: containerd's shim v2 for tern. containerd finds it on its PATH
//! for `--runtime io.containerd.tern.v2`; see `tern_runtime::shim`.

#[tokio::main]
async fn main() {
    containerd_shim::asynchronous::run::<tern_runtime::shim::TernShim>(tern_runtime::shim::RUNTIME_ID, None).await;
}
