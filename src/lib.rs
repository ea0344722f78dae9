//! preseed: turn a pinned list of container images into one read-only
//! partition that a node imports into containerd at boot.
//!
//! Build side, in pipeline order: [`manifest`] (bundles.toml) → [`resolve`]
//! (registries) → [`verify`] (signatures) → [`fetch`] (blob cache) → [`build`] (in-tree images) →
//! [`layout`] (per-image tarballs) → [`partition`] (erofs/squashfs), driven by
//! [`bundle`]. Node side: [`load`] (partition → containerd), [`serve`] (partition → a
//! read-only registry); [`diff`] compares two partitions (what a node must newly import).
#![deny(missing_docs)]

pub mod build;
pub mod bundle;
pub mod cli;
pub mod diff;
pub mod digest;
pub mod fetch;
pub mod human;
pub mod layout;
pub mod load;
pub mod manifest;
pub mod oci;
pub mod parallel;
pub mod partition;
pub mod place;
pub mod resolve;
pub mod serve;
pub mod verify;
