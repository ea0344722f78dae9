//! preseed: turn a pinned list of container images into one read-only
//! partition that a node imports into containerd at boot.
//!
//! Two wings over one floor (ARCHITECTURE.md draws it):
//!
//! * [`build`], the build wing, in pipeline order: `manifest` (bundles.toml)
//!   → `registry` (resolve, fetch) and `intree` (images built here) →
//!   `verify` (signature policy) → `cache` (blobs) → `layout` (tarball
//!   plans) → `write` (erofs / squashfs / verity), driven by `bundle`.
//! * [`node`], the node wing: `read` (open a partition, list and walk its
//!   tarballs) under `load` (→ containerd), `place` (→ containerd's store),
//!   `serve` (→ a read-only registry), `inspect` and `diff`.
//! * The floor both stand on: [`digest`], [`oci`], [`partition`] (the format:
//!   index, verity superblock, filesystem magic), [`trust`] (keys and
//!   cosign's signature formats), [`parallel`], [`human`].
//!
//! The node wing imports nothing of the build wing, and the other way
//! round; the floor imports neither (tests/tidy.rs holds these rules).
#![deny(missing_docs)]

pub mod build;
pub mod cli;
pub mod digest;
pub mod distribution;
pub mod human;
pub mod node;
pub mod oci;
pub mod parallel;
pub mod partition;
pub mod trust;
