//! Writing the partition: the planned file tree ([`crate::build::layout::tree`]:
//! tarballs, `.content/`, `preseed.json`) streamed into an [`erofs`] image
//! (the native writer) or a [`squashfs`] one (backhand), then a dm-verity
//! hash tree appended ([`verity`]). *Invariant: same tree → byte-identical image.*

pub mod erofs;
pub mod squashfs;
pub mod verity;
