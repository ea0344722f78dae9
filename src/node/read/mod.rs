//! The node's reading room, shared by `load`, `place`, `serve`, `inspect`
//! and `diff`: [`open`] a source (an image file, a block device, through
//! dm-verity with [`verity`], or a directory), [`mount`] it read-only,
//! [`source`] lists its tarballs (`preseed.json`, or Monogon/k3s layouts),
//! [`archive`] finds a tarball's entries by seeking, and [`image`] walks the
//! images inside (OCI layout or docker save) into blobs, GC labels and names.
//!
//! Everything here reads untrusted bytes (a partition may be damaged or
//! crafted): sizes are checked before they are trusted, and errors name the
//! file and what is wrong.

pub mod archive;
pub mod file;
pub mod image;
pub mod mount;
pub mod open;
pub mod source;
pub mod verity;
