//! Writing the partition: the planned file tree ([`crate::build::layout::tree`]:
//! tarballs, `.content/`, `preseed.json`) streamed into an [`erofs`] image
//! (the native writer) or a [`squashfs`] one (backhand), then a dm-verity
//! hash tree appended (`partition::hashtree`, which `preseed pull` uses too). *Invariant: same tree → byte-identical image.*

pub mod erofs;
pub mod squashfs;
