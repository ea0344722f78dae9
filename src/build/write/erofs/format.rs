//! The erofs on-disk structures this writer emits, as `#[repr(C)]` types whose
//! fields and offsets follow the kernel's `fs/erofs/erofs_fs.h`. Only what an
//! uncompressed, xattr-less image with chunk-based files needs is here.
//!
//! Every field is little-endian on disk; `encode` writes each one at its
//! documented offset, so the in-memory layout never leaks into the image and
//! the code is correct on any host.

/// Byte offset of the superblock (`EROFS_SUPER_OFFSET`).
pub const SUPER_OFFSET: u64 = 1024;
/// `EROFS_SUPER_MAGIC_V1`.
pub const SUPER_MAGIC: u32 = 0xE0F5_E1E2;
/// log2 of the block size: 4 KiB blocks.
pub const BLOCK_BITS: u8 = 12;
/// Block size in bytes.
pub const BLOCK: u64 = 1 << BLOCK_BITS;
/// Inode slots are addressed in 32-byte units: `nid = offset / 32`.
pub const NID_UNIT: u64 = 32;

/// `EROFS_FEATURE_COMPAT_SB_CHKSUM`: `checksum` holds the superblock's crc32c.
pub const FEATURE_COMPAT_SB_CHKSUM: u32 = 0x0000_0001;

/// `EROFS_FEATURE_INCOMPAT_CHUNKED_FILE`: the image has chunk-based inodes.
pub const FEATURE_INCOMPAT_CHUNKED_FILE: u32 = 0x0000_0004;

/// `EROFS_NULL_ADDR`: a block-map entry that is a hole (reads as zeros).
pub const NULL_ADDR: u32 = u32::MAX;

/// Data layouts (`i_format` bits 1..=3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum DataLayout {
    /// `EROFS_INODE_FLAT_PLAIN`: contiguous blocks from `raw_blkaddr`.
    FlatPlain = 0,
    /// `EROFS_INODE_FLAT_INLINE`: full blocks from `raw_blkaddr`, the tail
    /// right after the inode in the same metadata block.
    FlatInline = 2,
    /// `EROFS_INODE_CHUNK_BASED`: a block map after the inode, one entry per chunk.
    ChunkBased = 4,
}

/// `i_format` of an inode: version bit 0 (0 compact, 1 extended), layout bits 1..=3.
pub fn i_format(extended: bool, layout: DataLayout) -> u16 {
    u16::from(extended) | (layout as u16) << 1
}

/// `erofs_inode_chunk_info.format` for 4-byte block maps (no
/// `EROFS_CHUNK_FORMAT_INDEXES`) with `chunk size = block size << chunk_blkbits`.
pub fn chunk_format(chunk_blkbits: u16) -> u16 {
    chunk_blkbits & 0x001F
}

/// File types of directory entries (`EROFS_FT_*`, as the generic `FT_*`).
pub const FT_REG_FILE: u8 = 1;
/// Directory entry type of a directory.
pub const FT_DIR: u8 = 2;

/// `struct erofs_super_block` (128 bytes, at byte 1024 of the image).
#[repr(C)]
#[derive(Clone, Debug, Default)]
pub struct SuperBlock {
    /// 0: `magic`.
    pub magic: u32,
    /// 4: `checksum`, crc32c of the block when `SB_CHKSUM` is set (not used).
    pub checksum: u32,
    /// 8: `feature_compat`.
    pub feature_compat: u32,
    /// 12: `blkszbits`.
    pub blkszbits: u8,
    /// 13: `sb_extslots`.
    pub sb_extslots: u8,
    /// 14: `root_nid` (16 bits: the root inode must come early).
    pub root_nid: u16,
    /// 16: `inos`, total inode count.
    pub inos: u64,
    /// 24: `build_time`; compact inodes take it as their mtime.
    pub build_time: u64,
    /// 32: `build_time_nsec`.
    pub build_time_nsec: u32,
    /// 36: `blocks`, image size in blocks.
    pub blocks: u32,
    /// 40: `meta_blkaddr`, where nid 0 lives.
    pub meta_blkaddr: u32,
    /// 44: `xattr_blkaddr`.
    pub xattr_blkaddr: u32,
    /// 48: `uuid`.
    pub uuid: [u8; 16],
    /// 64: `volume_name`.
    pub volume_name: [u8; 16],
    /// 80: `feature_incompat`.
    pub feature_incompat: u32,
    /// 84: `u1.available_compr_algs` (uncompressed image: 0).
    pub available_compr_algs: u16,
    /// 86: `extra_devices`.
    pub extra_devices: u16,
    /// 88: `devt_slotoff`.
    pub devt_slotoff: u16,
    /// 90: `dirblkbits`: must be 0 (directory block = block).
    pub dirblkbits: u8,
    /// 91: `xattr_prefix_count`.
    pub xattr_prefix_count: u8,
    /// 92: `xattr_prefix_start`.
    pub xattr_prefix_start: u32,
    /// 96: `packed_nid`.
    pub packed_nid: u64,
    /// 104: `xattr_filter_reserved`.
    pub xattr_filter_reserved: u8,
    /// 105: `reserved2[23]`.
    pub reserved2: [u8; 23],
}

impl SuperBlock {
    /// On-disk size.
    pub const SIZE: usize = 128;

    /// The 128 on-disk bytes.
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        put(&mut b, 0, &self.magic.to_le_bytes());
        put(&mut b, 4, &self.checksum.to_le_bytes());
        put(&mut b, 8, &self.feature_compat.to_le_bytes());
        b[12] = self.blkszbits;
        b[13] = self.sb_extslots;
        put(&mut b, 14, &self.root_nid.to_le_bytes());
        put(&mut b, 16, &self.inos.to_le_bytes());
        put(&mut b, 24, &self.build_time.to_le_bytes());
        put(&mut b, 32, &self.build_time_nsec.to_le_bytes());
        put(&mut b, 36, &self.blocks.to_le_bytes());
        put(&mut b, 40, &self.meta_blkaddr.to_le_bytes());
        put(&mut b, 44, &self.xattr_blkaddr.to_le_bytes());
        put(&mut b, 48, &self.uuid);
        put(&mut b, 64, &self.volume_name);
        put(&mut b, 80, &self.feature_incompat.to_le_bytes());
        put(&mut b, 84, &self.available_compr_algs.to_le_bytes());
        put(&mut b, 86, &self.extra_devices.to_le_bytes());
        put(&mut b, 88, &self.devt_slotoff.to_le_bytes());
        b[90] = self.dirblkbits;
        b[91] = self.xattr_prefix_count;
        put(&mut b, 92, &self.xattr_prefix_start.to_le_bytes());
        put(&mut b, 96, &self.packed_nid.to_le_bytes());
        b[104] = self.xattr_filter_reserved;
        put(&mut b, 105, &self.reserved2);
        b
    }
}

/// `struct erofs_inode_compact` (32 bytes): size < 4 GiB, nlink < 65536,
/// mtime taken from the superblock's build time.
#[repr(C)]
#[derive(Clone, Debug, Default)]
pub struct InodeCompact {
    /// 0: `i_format`.
    pub i_format: u16,
    /// 2: `i_xattr_icount`.
    pub i_xattr_icount: u16,
    /// 4: `i_mode`.
    pub i_mode: u16,
    /// 6: `i_nlink`.
    pub i_nlink: u16,
    /// 8: `i_size`.
    pub i_size: u32,
    /// 12: `i_reserved`.
    pub i_reserved: u32,
    /// 16: `i_u`: `raw_blkaddr`, or `erofs_inode_chunk_info` (format, reserved).
    pub i_u: u32,
    /// 20: `i_ino`.
    pub i_ino: u32,
    /// 24: `i_uid`.
    pub i_uid: u16,
    /// 26: `i_gid`.
    pub i_gid: u16,
    /// 28: `i_reserved2`.
    pub i_reserved2: u32,
}

impl InodeCompact {
    /// On-disk size.
    pub const SIZE: usize = 32;

    /// The 32 on-disk bytes.
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        put(&mut b, 0, &self.i_format.to_le_bytes());
        put(&mut b, 2, &self.i_xattr_icount.to_le_bytes());
        put(&mut b, 4, &self.i_mode.to_le_bytes());
        put(&mut b, 6, &self.i_nlink.to_le_bytes());
        put(&mut b, 8, &self.i_size.to_le_bytes());
        put(&mut b, 12, &self.i_reserved.to_le_bytes());
        put(&mut b, 16, &self.i_u.to_le_bytes());
        put(&mut b, 20, &self.i_ino.to_le_bytes());
        put(&mut b, 24, &self.i_uid.to_le_bytes());
        put(&mut b, 26, &self.i_gid.to_le_bytes());
        put(&mut b, 28, &self.i_reserved2.to_le_bytes());
        b
    }
}

/// `struct erofs_inode_extended` (64 bytes): 64-bit size, 32-bit nlink/uid/gid.
#[repr(C)]
#[derive(Clone, Debug, Default)]
pub struct InodeExtended {
    /// 0: `i_format`.
    pub i_format: u16,
    /// 2: `i_xattr_icount`.
    pub i_xattr_icount: u16,
    /// 4: `i_mode`.
    pub i_mode: u16,
    /// 6: `i_reserved`.
    pub i_reserved: u16,
    /// 8: `i_size`.
    pub i_size: u64,
    /// 16: `i_u`, as in the compact inode.
    pub i_u: u32,
    /// 20: `i_ino`.
    pub i_ino: u32,
    /// 24: `i_uid`.
    pub i_uid: u32,
    /// 28: `i_gid`.
    pub i_gid: u32,
    /// 32: `i_mtime`.
    pub i_mtime: u64,
    /// 40: `i_mtime_nsec`.
    pub i_mtime_nsec: u32,
    /// 44: `i_nlink`.
    pub i_nlink: u32,
    /// 48: `i_reserved2[16]`.
    pub i_reserved2: [u8; 16],
}

impl InodeExtended {
    /// On-disk size.
    pub const SIZE: usize = 64;

    /// The 64 on-disk bytes.
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        put(&mut b, 0, &self.i_format.to_le_bytes());
        put(&mut b, 2, &self.i_xattr_icount.to_le_bytes());
        put(&mut b, 4, &self.i_mode.to_le_bytes());
        put(&mut b, 6, &self.i_reserved.to_le_bytes());
        put(&mut b, 8, &self.i_size.to_le_bytes());
        put(&mut b, 16, &self.i_u.to_le_bytes());
        put(&mut b, 20, &self.i_ino.to_le_bytes());
        put(&mut b, 24, &self.i_uid.to_le_bytes());
        put(&mut b, 28, &self.i_gid.to_le_bytes());
        put(&mut b, 32, &self.i_mtime.to_le_bytes());
        put(&mut b, 40, &self.i_mtime_nsec.to_le_bytes());
        put(&mut b, 44, &self.i_nlink.to_le_bytes());
        put(&mut b, 48, &self.i_reserved2);
        b
    }
}

/// `struct erofs_dirent` (12 bytes, packed). A directory block holds the
/// dirents first, then the names (not NUL-terminated); the first dirent's
/// `nameoff / 12` is the number of entries in the block.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Dirent {
    /// 0: `nid`.
    pub nid: u64,
    /// 8: `nameoff`, offset of the name inside the block.
    pub nameoff: u16,
    /// 10: `file_type`.
    pub file_type: u8,
    /// 11: `reserved`.
    pub reserved: u8,
}

impl Dirent {
    /// On-disk size.
    pub const SIZE: usize = 12;

    /// The 12 on-disk bytes.
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        put(&mut b, 0, &self.nid.to_le_bytes());
        put(&mut b, 8, &self.nameoff.to_le_bytes());
        b[10] = self.file_type;
        b[11] = self.reserved;
        b
    }
}

/// The superblock checksum as the kernel verifies it: `crc32c(~0, …)` (no
/// final inversion) over the first block from byte 1024 on, with the
/// `checksum` field zeroed.
pub fn superblock_checksum(first_block: &[u8]) -> u32 {
    let mut region = first_block[SUPER_OFFSET as usize..BLOCK as usize].to_vec();
    region[4..8].fill(0);
    crc32c_raw(!0, &region)
}

/// Bitwise crc32c (Castagnoli, reflected polynomial 0x82F63B78): runs once
/// per image over 3 KiB, so no table.
fn crc32c_raw(mut crc: u32, bytes: &[u8]) -> u32 {
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82F6_3B78 & (crc & 1).wrapping_neg());
        }
    }
    crc
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

// The Rust types mirror the C ones field for field.
const _: () = assert!(std::mem::size_of::<SuperBlock>() == SuperBlock::SIZE);
const _: () = assert!(std::mem::size_of::<InodeCompact>() == InodeCompact::SIZE);
const _: () = assert!(std::mem::size_of::<InodeExtended>() == InodeExtended::SIZE);
const _: () = assert!(std::mem::size_of::<Dirent>() == Dirent::SIZE);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn i_format_bits() {
        assert_eq!(i_format(false, DataLayout::FlatPlain), 0);
        assert_eq!(i_format(true, DataLayout::FlatInline), 0b101);
        assert_eq!(i_format(false, DataLayout::ChunkBased), 0b1000);
    }

    #[test]
    fn crc32c_check_value() {
        // The standard check value of CRC-32C is 0xE3069283 (with final inversion).
        assert_eq!(!crc32c_raw(!0, b"123456789"), 0xE306_9283);
    }

    #[test]
    fn superblock_fields_at_kernel_offsets() {
        let sb = SuperBlock {
            magic: SUPER_MAGIC,
            blkszbits: BLOCK_BITS,
            root_nid: 36,
            blocks: 7,
            feature_incompat: FEATURE_INCOMPAT_CHUNKED_FILE,
            ..Default::default()
        };
        let b = sb.encode();
        assert_eq!(b[..4], SUPER_MAGIC.to_le_bytes());
        assert_eq!(b[12], 12);
        assert_eq!(b[14..16], 36u16.to_le_bytes());
        assert_eq!(b[36..40], 7u32.to_le_bytes());
        assert_eq!(b[80..84], 4u32.to_le_bytes());
    }
}
