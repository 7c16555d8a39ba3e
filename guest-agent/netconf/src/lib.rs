//! Pod networking for tern over synchronous rtnetlink (no `ip`/`tc` processes, no async runtime,
//! no C libraries, so it links into the static guest agent).
//!
//! - [`host`]: on the host, connect a pod's network namespace to the VM with one tap per
//!   interface and `tc` mirred redirects (Kata's "tcfilter" model), read what the guest must
//!   configure, and undo it all again.
//! - [`guest`]: in the guest agent, bring up `lo` and apply that configuration.

mod error;
pub mod guest;
pub mod host;
mod link;
mod netlink;
mod netns;
mod route;
mod tap;
mod tc;

pub use error::NetError;
