//! The build wing: `bundles.toml` in, a partition image out. Its folders
//! are the pipeline's stages, in order:
//!
//! 1. [`manifest`]: read and validate `bundles.toml` (and `pin` tags).
//! 2. [`registry`]: resolve each image's manifests, fetch blobs and the
//!    signatures attached to them; [`intree`] builds `images/` packages instead.
//! 3. [`verify`]: the `[verify]` signature policy, before any blob is fetched.
//! 4. [`cache`]: the content-addressed blob cache every blob lands in.
//! 5. [`layout`]: plan one OCI image-layout tarball per image.
//! 6. [`write`](mod@write): the partition image (erofs, squashfs) and its verity tree.
//!
//! [`bundle`] runs them in that order; [`pin`] (tags → digests, written into
//! `bundles.toml`) and [`push`] (a bundled partition published as a release
//! that `preseed pull` rebuilds) are the other commands here. Nothing here is used on a node.

pub mod bundle;
pub mod cache;
pub mod intree;
pub mod layout;
pub mod manifest;
pub mod pin;
pub mod push;
pub mod registry;
pub mod verify;
pub mod write;
