//! Opening a partition through dm-verity on the node (`--verity-root-hash`):
//! every block read from it is checked against the root hash by the kernel,
//! so a partition altered after the release engineer bundled it reads as
//! EIO instead of as other images.
//!
//! The node has only the partition, not the `preseed.json` beside the
//! image, so the hash tree is found from the partition itself: the
//! filesystem's size (erofs or squashfs superblock) rounded up to 4096 is
//! where `preseed bundle --verity` put the verity superblock
//! ([`crate::partition::verity`]). Before any device is created the root hash is
//! checked against the top block of the tree, so a wrong root hash is
//! refused with a message that says so, not as an I/O error later.
//!
//! The device is created by running `veritysetup open` (cryptsetup) rather
//! than through device-mapper ioctls from a crate: veritysetup is the
//! reference implementation of the on-disk format (the tests verify the
//! bundle side with it too), it handles udev synchronization and device
//! nodes when udev is not running (early boot, containers), and it adds no
//! crate to the node side. The cost is a runtime dependency on Debian's
//! `cryptsetup-bin` (or the distribution's equivalent) on nodes that use
//! `--verity-root-hash`, and a process per open and close.
//!
//! The device goes away when [`VerityDevice`] is dropped.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::partition::verity::{self, RootHash, Superblock, BLOCK};
use crate::partition::Format;

/// Why a partition could not be opened through dm-verity.
#[derive(Debug, thiserror::Error)]
pub enum VerityError {
    /// The partition could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The partition.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// No filesystem superblock to find the tree after.
    #[error("{path}: neither an erofs nor a squashfs filesystem (no superblock magic); nothing opened")]
    UnknownFormat {
        /// The partition.
        path: PathBuf,
    },
    /// No verity superblock after the filesystem.
    #[error(
        "{path}: no dm-verity hash tree after the {format} filesystem (no verity superblock at byte {offset}): \
         it was bundled without --verity; bundle it with `preseed bundle --verity`, or open it without a root hash"
    )]
    NoTree {
        /// The partition.
        path: PathBuf,
        /// Its filesystem.
        format: Format,
        /// Where the superblock was looked for.
        offset: u64,
    },
    /// A tree preseed does not write.
    #[error("{path}: unsupported dm-verity tree ({what}); preseed writes format 1, sha256, 4096-byte blocks")]
    Unsupported {
        /// The partition.
        path: PathBuf,
        /// What differs.
        what: String,
    },
    /// The root hash is not this partition's.
    #[error(
        "{path}: the root hash {root} does not match this partition; refused before anything was read from it. \
         Give the root hash of the release that wrote this partition (its preseed.roothash), \
         or the partition was altered and must be rewritten"
    )]
    RootHashMismatch {
        /// The partition.
        path: PathBuf,
        /// The root hash given.
        root: RootHash,
    },
    /// `veritysetup` is not installed.
    #[error("opening {path} through dm-verity needs `veritysetup`: install cryptsetup-bin (Debian) on the node")]
    NoVeritysetup {
        /// The partition.
        path: PathBuf,
    },
    /// `veritysetup open` failed.
    #[error(
        "veritysetup open {device} ({path}) failed: {message} (this needs root and a kernel with dm-verity, \
         CONFIG_DM_VERITY; try `modprobe dm-verity`)"
    )]
    Veritysetup {
        /// The partition.
        path: PathBuf,
        /// The device opened.
        device: PathBuf,
        /// What veritysetup said.
        message: String,
    },
}

/// Where the hash tree of a partition is, as its own superblocks say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeLocation {
    /// The filesystem in front of the tree.
    pub format: Format,
    /// Byte offset of the verity superblock (= data bytes).
    pub hash_offset: u64,
    /// Its salt.
    pub salt: Vec<u8>,
    /// Data blocks covered.
    pub data_blocks: u64,
}

fn read_block(f: &File, path: &Path, at: u64) -> Result<Vec<u8>, VerityError> {
    let mut b = vec![0u8; BLOCK as usize];
    f.read_exact_at(&mut b, at).map_err(|source| VerityError::Io { path: path.to_path_buf(), source })?;
    Ok(b)
}

/// Finds the tree after the filesystem on `device` (an image file or block
/// device), without anything from outside the partition.
pub fn locate(device: &Path) -> Result<TreeLocation, VerityError> {
    locate_named(device, device)
}

/// [`locate`], naming the partition `shown` in errors.
fn locate_named(device: &Path, shown: &Path) -> Result<TreeLocation, VerityError> {
    let f = File::open(device).map_err(|source| VerityError::Io { path: shown.to_path_buf(), source })?;
    let head = read_block(&f, shown, 0)?;
    let format = Format::sniff(&head).ok_or_else(|| VerityError::UnknownFormat { path: shown.to_path_buf() })?;
    let fs_bytes = match format {
        // erofs: `blocks` (u32 at 36) << `blkszbits` (u8 at 12), superblock at 1024.
        Format::Erofs => {
            let sb = &head[1024..];
            let blocks = u32::from_le_bytes([sb[36], sb[37], sb[38], sb[39]]) as u64;
            blocks.checked_shl(sb[12] as u32).unwrap_or(u64::MAX)
        }
        // squashfs: `bytes_used` (u64 at 40).
        Format::Squashfs => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&head[40..48]);
            u64::from_le_bytes(b)
        }
    };
    let hash_offset = fs_bytes.div_ceil(BLOCK).saturating_mul(BLOCK);
    let no_tree = || VerityError::NoTree { path: shown.to_path_buf(), format, offset: hash_offset };
    let sb = match read_block(&f, shown, hash_offset) {
        Ok(b) => Superblock::parse(&b).ok_or_else(no_tree)?,
        Err(VerityError::Io { source, .. }) if source.kind() == io::ErrorKind::UnexpectedEof => return Err(no_tree()),
        Err(e) => return Err(e),
    };
    let unsupported = |what: String| VerityError::Unsupported { path: shown.to_path_buf(), what };
    if sb.version != 1 || sb.hash_type != 1 {
        return Err(unsupported(format!("version {}, hash type {}", sb.version, sb.hash_type)));
    }
    if sb.algorithm != "sha256" {
        return Err(unsupported(format!("hash {}", sb.algorithm)));
    }
    if sb.data_block_size as u64 != BLOCK || sb.hash_block_size as u64 != BLOCK {
        return Err(unsupported(format!("blocks of {} and {} bytes", sb.data_block_size, sb.hash_block_size)));
    }
    // The tree must cover the whole filesystem, exactly (a crafted block
    // count must not wrap around to match).
    if sb.data_blocks.checked_mul(BLOCK) != Some(hash_offset) {
        return Err(unsupported(format!(
            "it covers {} blocks, the filesystem has {}",
            sb.data_blocks,
            hash_offset / BLOCK
        )));
    }
    Ok(TreeLocation { format, hash_offset, salt: sb.salt, data_blocks: sb.data_blocks })
}

/// Checks `root` against the top block of the tree: refuses a wrong root
/// hash before anything is attached (the kernel would only fail reads).
pub fn check_root(device: &Path, at: &TreeLocation, root: &RootHash) -> Result<(), VerityError> {
    check_root_named(device, device, at, root)
}

fn check_root_named(device: &Path, shown: &Path, at: &TreeLocation, root: &RootHash) -> Result<(), VerityError> {
    let f = File::open(device).map_err(|source| VerityError::Io { path: shown.to_path_buf(), source })?;
    // The top level comes first, right after the superblock block.
    debug_assert_eq!(verity::levels(at.data_blocks).last(), Some(&1));
    let top = read_block(&f, shown, at.hash_offset + BLOCK)?;
    if verity::salted(&at.salt, &top) != root.0 {
        return Err(VerityError::RootHashMismatch { path: shown.to_path_buf(), root: *root });
    }
    Ok(())
}

/// A dm-verity device over a partition; closed on drop.
pub struct VerityDevice {
    name: String,
    path: PathBuf,
    partition: PathBuf,
}

impl VerityDevice {
    /// Opens `device` (the partition's block or loop device) through
    /// dm-verity with `root`, after [`locate`] and [`check_root`];
    /// `partition` is what the user named, for messages.
    pub fn open(partition: &Path, device: &Path, root: &RootHash) -> Result<VerityDevice, VerityError> {
        let shown = if partition == device {
            partition.to_path_buf()
        } else {
            PathBuf::from(format!("{} (on {})", partition.display(), device.display()))
        };
        let at = locate_named(device, &shown)?;
        check_root_named(device, &shown, &at, root)?;
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = format!("preseed-verity-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let out = Command::new(veritysetup())
            .arg("open")
            .arg(device)
            .arg(&name)
            .arg(device)
            .arg(root.hex())
            .arg(format!("--hash-offset={}", at.hash_offset))
            .output()
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => VerityError::NoVeritysetup { path: partition.to_path_buf() },
                _ => VerityError::Io { path: veritysetup(), source: e },
            })?;
        let path = PathBuf::from("/dev/mapper").join(&name);
        let opened = VerityDevice { name, path, partition: partition.to_path_buf() };
        if !out.status.success() {
            // Dropping `opened` removes whatever veritysetup left behind.
            let message = String::from_utf8_lossy(&out.stderr).lines().map(str::trim).collect::<Vec<_>>().join("; ");
            let message = if message.is_empty() { out.status.to_string() } else { message };
            return Err(VerityError::Veritysetup {
                path: partition.to_path_buf(),
                device: device.to_path_buf(),
                message,
            });
        }
        // udev (when running) may create the node a moment later.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !opened.path.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(opened)
    }

    /// `/dev/mapper/<name>`: the verified partition.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device-mapper name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The partition it verifies, as the user named it.
    pub fn partition(&self) -> &Path {
        &self.partition
    }
}

impl Drop for VerityDevice {
    fn drop(&mut self) {
        let veritysetup = |args: &[&str]| {
            Command::new(veritysetup())
                .args(args)
                .arg(&self.name)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        // A lazily unmounted filesystem may hold it a moment longer.
        for _ in 0..20 {
            if veritysetup(&["close"]) || !veritysetup(&["status"]) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Removed by the kernel once its last user goes.
        veritysetup(&["close", "--deferred"]);
    }
}

/// veritysetup, from PATH or the sbin directories boot units may lack.
fn veritysetup() -> PathBuf {
    ["/usr/sbin/veritysetup", "/sbin/veritysetup"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("veritysetup"))
}

/// Whether an error (or one of its causes) is EIO: what dm-verity returns
/// for a block that does not match the tree.
pub fn is_eio(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            if io.raw_os_error() == Some(libc::EIO) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// What an EIO through dm-verity means, for messages.
pub const CORRUPT: &str =
    "the partition is corrupt (dm-verity: a block does not match the root hash; rewrite it from the release)";

#[cfg(test)]
mod tests {
    use super::*;

    fn image(fs: &[u8], salt: [u8; 32]) -> (tempfile::NamedTempFile, RootHash) {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), fs).unwrap();
        let info = crate::partition::hashtree::append(f.path(), &salt, &[9; 16]).unwrap();
        (f, info.root_hash.parse().unwrap())
    }

    /// Found by `cargo xtask fuzz` (target `verity`): a verity superblock
    /// whose block count times 4096 overflows 64 bits; kept in
    /// `fuzz/regressions/verity/` too.
    #[test]
    fn a_block_count_that_overflows_is_unsupported() {
        let mut img = vec![0u8; 8192];
        img[1024..1028].copy_from_slice(&0xE0F5_E1E2u32.to_le_bytes());
        img[1024 + 12] = 12;
        img[1024 + 36..1024 + 40].copy_from_slice(&1u32.to_le_bytes());
        img[4096..8192].copy_from_slice(&verity::superblock(300, &[5; 32], &[6; 16]));
        img[4096 + 72..4096 + 80].copy_from_slice(&0x2000_0000_0000_012cu64.to_le_bytes());
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), &img).unwrap();
        let e = locate(f.path()).unwrap_err();
        assert!(e.to_string().contains("it covers 2305843009213694252 blocks, the filesystem has 1"), "{e}");
    }

    fn squashfs(len: usize) -> Vec<u8> {
        let mut b = vec![3u8; len];
        b[..4].copy_from_slice(b"hsqs");
        b[40..48].copy_from_slice(&(len as u64).to_le_bytes());
        b
    }

    #[test]
    fn tree_is_found_after_a_squashfs_and_the_root_checked() {
        let (f, root) = image(&squashfs(10_000), [1; 32]);
        let at = locate(f.path()).unwrap();
        assert_eq!((at.format, at.hash_offset, at.data_blocks), (Format::Squashfs, 12288, 3));
        check_root(f.path(), &at, &root).unwrap();
        let wrong: RootHash = "ab".repeat(32).parse().unwrap();
        let e = check_root(f.path(), &at, &wrong).unwrap_err();
        assert!(e.to_string().contains("does not match this partition"), "{e}");
    }

    #[test]
    fn tree_is_found_after_an_erofs() {
        let mut fs = vec![0u8; 5 * 4096];
        fs[1024..1028].copy_from_slice(&0xE0F5_E1E2u32.to_le_bytes());
        fs[1024 + 12] = 12;
        fs[1024 + 36..1024 + 40].copy_from_slice(&5u32.to_le_bytes());
        let (f, root) = image(&fs, [2; 32]);
        let at = locate(f.path()).unwrap();
        assert_eq!((at.format, at.hash_offset), (Format::Erofs, 5 * 4096));
        check_root(f.path(), &at, &root).unwrap();
    }

    #[test]
    fn no_tree_is_said_plainly() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), squashfs(8192)).unwrap();
        let e = locate(f.path()).unwrap_err();
        assert!(e.to_string().contains("bundled without --verity"), "{e}");
    }

    #[test]
    fn root_hash_from_text_file_or_kernel_command_line() {
        let hex = "0123456789abcdef".repeat(4);
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), format!("{hex}\n")).unwrap();
        assert_eq!(RootHash::from_file(f.path()).unwrap().hex(), hex);
        std::fs::write(f.path(), format!("BOOT_IMAGE=/vmlinuz ro preseed.roothash={hex} quiet\n")).unwrap();
        assert_eq!(RootHash::from_file(f.path()).unwrap().hex(), hex);
        std::fs::write(f.path(), "BOOT_IMAGE=/vmlinuz ro quiet\n").unwrap();
        assert!(RootHash::from_file(f.path()).unwrap_err().to_string().contains("preseed.roothash=HEX"));
        assert!("abc".parse::<RootHash>().is_err());
    }

    #[test]
    fn eio_is_found_among_causes() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] io::Error);
        assert!(is_eio(&Outer(io::Error::from_raw_os_error(libc::EIO))));
        assert!(!is_eio(&Outer(io::Error::from_raw_os_error(libc::ENOENT))));
    }
}
