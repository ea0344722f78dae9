//! The node wing: what runs on a node, at boot, beside its workloads. Each
//! command has its room, all standing on [`read`] (open a partition or
//! directory, list its tarballs, walk their images):
//!
//! * [`load`]: import into a running containerd over gRPC (the `containerd`
//!   cargo feature: its bindings need `protoc` to build);
//! * [`place`]: before containerd starts, put the blobs in its store
//!   (copied, or mounted under it with `--overlay`), and `settle`;
//! * [`serve`]: a read-only OCI registry mirror;
//! * [`inspect`] and [`diff`]: what a partition holds, what changes between two;
//! * [`pull`]: a released partition rebuilt from a registry, moving only
//!   the blobs the current partition lacks;
//! * [`policy`]: which images must be signed, and by whom, checked by
//!   `load`, `place` and `serve` against the signatures the partition carries.
//!
//! *Architecture invariant: nothing here imports the build wing
//! (`crate::build`), and nothing here talks to a registry except `pull`,
//! which fetches what a release names, by digest.* Every syscall
//! beyond plain file I/O goes through [`sys`], the seam tests swap.

/// containerd's default socket.
pub const DEFAULT_ADDRESS: &str = "/run/containerd/containerd.sock";

pub mod diff;
pub mod inspect;
#[cfg(feature = "containerd")]
pub mod load;
pub mod notify;
pub mod place;
pub mod policy;
pub mod pull;
pub mod read;
pub mod serve;
pub mod sys;
