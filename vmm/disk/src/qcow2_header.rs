//! qcow2 header: parsing with full validation, feature checks, and the on-disk layout that
//! `qemu-img create -f qcow2` writes for a new image.
//!
//! Covered: version 2 and 3 headers, header extensions (backing format, feature name table,
//! external data file, encryption), every size/offset sanity check that decides whether the
//! image may be handed to the qcow2 engine. Not covered here: L1/L2/refcount contents (the
//! engine, `imago`, walks those), snapshot tables (only located, never parsed).
//!
//! The specification is QEMU's `docs/interop/qcow2.txt`; all fields are big-endian.

use crate::error::DiskError;
use std::path::Path;

/// "QFI\xfb": first four bytes of every qcow2 file.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";
/// Fixed part of a version-2 header.
pub const V2_HEADER_LEN: usize = 72;
/// Fixed part of a version-3 header (without the optional compression-type byte).
pub const V3_MIN_HEADER_LEN: usize = 104;
/// Header length `qemu-img create` writes for version 3 (104 + compression type + padding).
pub const V3_CREATE_HEADER_LEN: u32 = 112;
/// Smallest and largest cluster size (as powers of two) the format allows.
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Same bound QEMU uses: the L1 table may occupy at most 32 MiB.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Same bound QEMU uses: the refcount table may occupy at most 8 MiB.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Longest backing file name the format allows.
pub const MAX_BACKING_NAME_LEN: u32 = 1023;
/// Cluster size DeskVM creates (same default as qemu-img).
pub const DEFAULT_CLUSTER_BITS: u32 = 16;
/// Refcount order DeskVM creates: 16-bit refcounts (qemu-img default).
pub const DEFAULT_REFCOUNT_ORDER: u32 = 4;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
const EXT_FEATURE_TABLE: u32 = 0x6803_F857;
const EXT_FULL_DISK_ENCRYPTION: u32 = 0x0537_BE77;
const EXT_EXTERNAL_DATA_FILE: u32 = 0x4441_5441;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION_TYPE: u64 = 1 << 3;
pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
/// Compatible feature bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Feature name table entries qemu-img writes into every new image (type, bit, name).
const FEATURE_NAMES: [(u8, u8, &str); 8] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];
const FEATURE_ENTRY_LEN: usize = 48;

/// A parsed, validated qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub has_encryption_extension: bool,
    pub has_external_data_file_extension: bool,
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    if let Some(src) = bytes.get(at..at + 4) {
        word.copy_from_slice(src);
    }
    u32::from_be_bytes(word)
}

fn be_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    if let Some(src) = bytes.get(at..at + 8) {
        word.copy_from_slice(src);
    }
    u64::from_be_bytes(word)
}

/// Returns whether `bytes` starts with the qcow2 magic.
pub fn has_qcow2_magic(bytes: &[u8]) -> bool {
    bytes.get(..4) == Some(&QCOW2_MAGIC[..])
}

/// Number of L1 entries needed to map `size` bytes with clusters of `1 << cluster_bits`.
pub fn l1_entries_for(size: u64, cluster_bits: u32) -> u64 {
    // One L2 table is one cluster of 8-byte entries, each mapping one cluster.
    let bytes_per_l2 = 1u128 << (2 * cluster_bits - 3);
    (size as u128).div_ceil(bytes_per_l2) as u64
}

impl Qcow2Header {
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Parses and validates the header. `head` holds the first bytes of the file (at least
    /// the first cluster, or the whole file when it is smaller); `file_len` is the file size.
    /// Checks structure only; `check_openable` decides whether the features are supported.
    pub fn parse(path: &Path, head: &[u8], file_len: u64) -> Result<Self, DiskError> {
        let truncated = |what: String| DiskError::Truncated {
            path: path.to_path_buf(),
            what,
        };
        if head.len() < V2_HEADER_LEN {
            return Err(truncated(format!(
                "{} bytes, a qcow2 header needs at least {V2_HEADER_LEN}",
                head.len()
            )));
        }
        if !has_qcow2_magic(head) {
            return Err(DiskError::corrupt(path, "no qcow2 magic"));
        }
        let version = be_u32(head, 4);
        if version != 2 && version != 3 {
            return Err(DiskError::unsupported(
                path,
                format!("qcow2 version {version}"),
                "only versions 2 and 3 exist; the file may be damaged",
            ));
        }
        let cluster_bits = be_u32(head, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(DiskError::corrupt(
                path,
                format!("cluster size 2^{cluster_bits} outside 512 B..2 MiB"),
            ));
        }
        let cluster_size = 1u64 << cluster_bits;

        let mut header = Qcow2Header {
            version,
            backing_file_offset: be_u64(head, 8),
            backing_file_size: be_u32(head, 16),
            cluster_bits,
            size: be_u64(head, 24),
            crypt_method: be_u32(head, 32),
            l1_size: be_u32(head, 36),
            l1_table_offset: be_u64(head, 40),
            refcount_table_offset: be_u64(head, 48),
            refcount_table_clusters: be_u32(head, 56),
            nb_snapshots: be_u32(head, 60),
            snapshots_offset: be_u64(head, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: DEFAULT_REFCOUNT_ORDER,
            header_length: V2_HEADER_LEN as u32,
            compression_type: 0,
            backing_file: None,
            backing_format: None,
            has_encryption_extension: false,
            has_external_data_file_extension: false,
        };

        if version == 3 {
            if head.len() < V3_MIN_HEADER_LEN {
                return Err(truncated(format!(
                    "{} bytes, a version 3 header needs at least {V3_MIN_HEADER_LEN}",
                    head.len()
                )));
            }
            header.incompatible_features = be_u64(head, 72);
            header.compatible_features = be_u64(head, 80);
            header.autoclear_features = be_u64(head, 88);
            header.refcount_order = be_u32(head, 96);
            header.header_length = be_u32(head, 100);
            if (header.header_length as usize) < V3_MIN_HEADER_LEN {
                return Err(DiskError::corrupt(
                    path,
                    format!("header length {} below 104", header.header_length),
                ));
            }
            if u64::from(header.header_length) > cluster_size {
                return Err(DiskError::corrupt(
                    path,
                    format!(
                        "header length {} larger than a cluster",
                        header.header_length
                    ),
                ));
            }
            if header.header_length as usize > head.len() {
                return Err(truncated(format!(
                    "header length {} but the file has {} bytes",
                    header.header_length,
                    head.len()
                )));
            }
            if header.header_length > 104 {
                header.compression_type = head.get(104).copied().unwrap_or(0);
            }
            if header.refcount_order > 6 {
                return Err(DiskError::corrupt(
                    path,
                    format!("refcount order {} above 6", header.refcount_order),
                ));
            }
        }

        header.check_tables(path, file_len)?;
        header.parse_extensions(path, head)?;
        header.parse_backing_name(path, head, file_len)?;
        Ok(header)
    }

    fn check_tables(&self, path: &Path, file_len: u64) -> Result<(), DiskError> {
        let cluster_size = self.cluster_size();
        let check_region = |name: &str, offset: u64, len: u64| -> Result<(), DiskError> {
            if !offset.is_multiple_of(cluster_size) {
                return Err(DiskError::corrupt(
                    path,
                    format!("{name} offset {offset:#x} is not cluster aligned"),
                ));
            }
            let end = offset.checked_add(len).ok_or_else(|| {
                DiskError::corrupt(path, format!("{name} offset {offset:#x} overflows"))
            })?;
            if end > file_len {
                return Err(DiskError::Truncated {
                    path: path.to_path_buf(),
                    what: format!(
                        "{name} at {offset:#x} ({len} bytes) lies beyond the end of the \
                         {file_len}-byte file"
                    ),
                });
            }
            Ok(())
        };

        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(DiskError::corrupt(
                path,
                format!("L1 table of {} entries is larger than 32 MiB", self.l1_size),
            ));
        }
        let needed = l1_entries_for(self.size, self.cluster_bits);
        if u64::from(self.l1_size) < needed {
            return Err(DiskError::corrupt(
                path,
                format!(
                    "L1 table has {} entries, the {}-byte disk needs {needed}",
                    self.l1_size, self.size
                ),
            ));
        }
        if self.l1_size > 0 {
            check_region("L1 table", self.l1_table_offset, l1_bytes)?;
        }

        let reftable_bytes = u64::from(self.refcount_table_clusters) * cluster_size;
        if self.refcount_table_clusters == 0 {
            return Err(DiskError::corrupt(path, "refcount table has zero clusters"));
        }
        if reftable_bytes > MAX_REFTABLE_BYTES {
            return Err(DiskError::corrupt(
                path,
                format!(
                    "refcount table of {} clusters is larger than 8 MiB",
                    self.refcount_table_clusters
                ),
            ));
        }
        check_region("refcount table", self.refcount_table_offset, reftable_bytes)?;

        if self.nb_snapshots > 0 {
            // Each snapshot entry is at least 40 bytes.
            check_region(
                "snapshot table",
                self.snapshots_offset,
                u64::from(self.nb_snapshots) * 40,
            )?;
        }
        Ok(())
    }

    fn parse_extensions(&mut self, path: &Path, head: &[u8]) -> Result<(), DiskError> {
        let cluster_end = (self.cluster_size() as usize).min(head.len());
        let mut at = self.header_length as usize;
        // Extensions end at the backing file name when there is one.
        let limit = if self.backing_file_offset != 0 {
            (self.backing_file_offset as usize).min(cluster_end)
        } else {
            cluster_end
        };
        loop {
            if at + 8 > limit {
                // No room for another extension header: treat as the end (QEMU does the same).
                break;
            }
            let ext_type = be_u32(head, at);
            let ext_len = be_u32(head, at + 4) as usize;
            at += 8;
            if ext_type == EXT_END {
                break;
            }
            let data = head.get(at..at + ext_len).filter(|_| at + ext_len <= limit);
            let Some(data) = data else {
                return Err(DiskError::corrupt(
                    path,
                    format!(
                        "header extension {ext_type:#x} of {ext_len} bytes overruns the header"
                    ),
                ));
            };
            match ext_type {
                EXT_BACKING_FORMAT => {
                    let name = String::from_utf8_lossy(data)
                        .trim_end_matches('\0')
                        .to_string();
                    self.backing_format = Some(name);
                }
                EXT_FULL_DISK_ENCRYPTION => self.has_encryption_extension = true,
                EXT_EXTERNAL_DATA_FILE => self.has_external_data_file_extension = true,
                _ => {}
            }
            at += ext_len.next_multiple_of(8);
        }
        Ok(())
    }

    fn parse_backing_name(
        &mut self,
        path: &Path,
        head: &[u8],
        file_len: u64,
    ) -> Result<(), DiskError> {
        if self.backing_file_offset == 0 {
            return Ok(());
        }
        if self.backing_file_size == 0 || self.backing_file_size > MAX_BACKING_NAME_LEN {
            return Err(DiskError::corrupt(
                path,
                format!("backing file name length {}", self.backing_file_size),
            ));
        }
        let start = self.backing_file_offset;
        let end = start + u64::from(self.backing_file_size);
        if end > self.cluster_size() || end > file_len {
            return Err(DiskError::corrupt(
                path,
                format!("backing file name at {start:#x} lies outside the header cluster"),
            ));
        }
        let bytes = head
            .get(start as usize..end as usize)
            .ok_or_else(|| DiskError::Truncated {
                path: path.to_path_buf(),
                what: "backing file name".into(),
            })?;
        let name = std::str::from_utf8(bytes)
            .map_err(|_| DiskError::corrupt(path, "backing file name is not UTF-8"))?;
        self.backing_file = Some(name.to_string());
        Ok(())
    }

    /// Refuses everything the engine must not be given. `writable`: the caller wants to write.
    pub fn check_openable(&self, path: &Path, writable: bool) -> Result<(), DiskError> {
        if self.crypt_method != 0 || self.has_encryption_extension {
            let kind = match self.crypt_method {
                1 => "AES",
                2 => "LUKS",
                _ => "unknown",
            };
            return Err(DiskError::unsupported(
                path,
                format!("qcow2 encryption ({kind})"),
                "decrypt it with `qemu-img convert -O qcow2` (with --object secret,...) first",
            ));
        }
        let incompat = self.incompatible_features;
        if incompat & INCOMPAT_CORRUPT != 0 {
            return Err(DiskError::MarkedCorrupt {
                path: path.to_path_buf(),
            });
        }
        if incompat & INCOMPAT_DIRTY != 0 {
            return Err(DiskError::Dirty {
                path: path.to_path_buf(),
            });
        }
        if incompat & INCOMPAT_DATA_FILE != 0 || self.has_external_data_file_extension {
            return Err(DiskError::unsupported(
                path,
                "qcow2 external data file",
                "merge it with `qemu-img convert -O qcow2` into a self-contained image",
            ));
        }
        if incompat & INCOMPAT_COMPRESSION_TYPE != 0 || self.compression_type != 0 {
            return Err(DiskError::unsupported(
                path,
                "qcow2 zstd compression type",
                "convert it with `qemu-img convert -O qcow2` (without -c)",
            ));
        }
        if incompat & INCOMPAT_EXTENDED_L2 != 0 {
            return Err(DiskError::unsupported(
                path,
                "qcow2 extended L2 entries (subclusters)",
                "convert it with `qemu-img convert -O qcow2`",
            ));
        }
        let known = INCOMPAT_DIRTY
            | INCOMPAT_CORRUPT
            | INCOMPAT_DATA_FILE
            | INCOMPAT_COMPRESSION_TYPE
            | INCOMPAT_EXTENDED_L2;
        if incompat & !known != 0 {
            return Err(DiskError::unsupported(
                path,
                format!(
                    "unknown qcow2 incompatible feature bits {:#x}",
                    incompat & !known
                ),
                "the image needs a newer program; convert it with a current `qemu-img convert`",
            ));
        }
        if writable && self.version == 2 {
            return Err(DiskError::unsupported(
                path,
                "writing qcow2 version 2 (compat=0.10)",
                "open it read-only, or upgrade it with `qemu-img amend -o compat=1.1`",
            ));
        }
        if writable && self.nb_snapshots > 0 {
            return Err(DiskError::unsupported(
                path,
                format!(
                    "writing an image with {} internal snapshots",
                    self.nb_snapshots
                ),
                "open it read-only, or delete the snapshots with `qemu-img snapshot -d`",
            ));
        }
        Ok(())
    }
}

/// Builds the complete file content of a new, empty qcow2 v3 image with qemu-img's layout:
/// cluster 0 header (+ backing format and feature-name extensions, backing name), cluster 1
/// refcount table, cluster 2 refcount block, cluster 3.. L1 table (left unpadded, as qemu-img
/// does). Refcount order 4, lazy refcounts off.
pub fn new_image_bytes(
    size: u64,
    cluster_bits: u32,
    backing: Option<(&str, &str)>,
) -> Result<Vec<u8>, String> {
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(format!(
            "cluster size 2^{cluster_bits} outside 512 B..2 MiB"
        ));
    }
    let cluster_size = 1u64 << cluster_bits;
    let l1_entries = l1_entries_for(size, cluster_bits);
    if l1_entries * 8 > MAX_L1_BYTES {
        return Err(format!("disk size {size} is too large for qcow2"));
    }
    let l1_clusters = (l1_entries * 8).div_ceil(cluster_size).max(1);
    let reftable_offset = cluster_size;
    let refblock_offset = 2 * cluster_size;
    let l1_offset = 3 * cluster_size;
    let used_clusters = 3 + l1_clusters;
    let refcounts_per_block = cluster_size / 2;
    if used_clusters > refcounts_per_block {
        return Err(format!("disk size {size} needs a larger cluster size"));
    }

    let mut header = Vec::with_capacity(cluster_size as usize);
    header.extend_from_slice(&QCOW2_MAGIC);
    header.extend_from_slice(&3u32.to_be_bytes());
    header.extend_from_slice(&0u64.to_be_bytes()); // backing offset, patched below
    header.extend_from_slice(&0u32.to_be_bytes()); // backing size, patched below
    header.extend_from_slice(&cluster_bits.to_be_bytes());
    header.extend_from_slice(&size.to_be_bytes());
    header.extend_from_slice(&0u32.to_be_bytes()); // crypt_method
    header.extend_from_slice(&(l1_entries as u32).to_be_bytes());
    header.extend_from_slice(&l1_offset.to_be_bytes());
    header.extend_from_slice(&reftable_offset.to_be_bytes());
    header.extend_from_slice(&1u32.to_be_bytes()); // refcount_table_clusters
    header.extend_from_slice(&0u32.to_be_bytes()); // nb_snapshots
    header.extend_from_slice(&0u64.to_be_bytes()); // snapshots_offset
    header.extend_from_slice(&0u64.to_be_bytes()); // incompatible
    header.extend_from_slice(&0u64.to_be_bytes()); // compatible (no lazy refcounts)
    header.extend_from_slice(&0u64.to_be_bytes()); // autoclear
    header.extend_from_slice(&DEFAULT_REFCOUNT_ORDER.to_be_bytes());
    header.extend_from_slice(&V3_CREATE_HEADER_LEN.to_be_bytes());
    header.extend_from_slice(&[0u8; 8]); // compression type zlib + padding

    if let Some((_, format)) = backing {
        push_extension(&mut header, EXT_BACKING_FORMAT, format.as_bytes());
    }
    let mut table = Vec::with_capacity(FEATURE_NAMES.len() * FEATURE_ENTRY_LEN);
    for (kind, bit, name) in FEATURE_NAMES {
        let mut entry = [0u8; FEATURE_ENTRY_LEN];
        entry[0] = kind;
        entry[1] = bit;
        entry[2..2 + name.len()].copy_from_slice(name.as_bytes());
        table.extend_from_slice(&entry);
    }
    push_extension(&mut header, EXT_FEATURE_TABLE, &table);
    header.extend_from_slice(&[0u8; 8]); // end of extensions

    if let Some((name, _)) = backing {
        let len = name.len();
        if len == 0 || len > MAX_BACKING_NAME_LEN as usize {
            return Err(format!("backing file name length {len} outside 1..1023"));
        }
        let offset = header.len() as u64;
        if offset + len as u64 > cluster_size {
            return Err("backing file name does not fit in the header cluster".into());
        }
        header[8..16].copy_from_slice(&offset.to_be_bytes());
        header[16..20].copy_from_slice(&(len as u32).to_be_bytes());
        header.extend_from_slice(name.as_bytes());
    }

    let file_len = l1_offset + l1_entries * 8;
    let mut image = vec![0u8; file_len.max(l1_offset) as usize];
    image[..header.len()].copy_from_slice(&header);
    let rt = reftable_offset as usize;
    image[rt..rt + 8].copy_from_slice(&refblock_offset.to_be_bytes());
    let rb = refblock_offset as usize;
    for cluster in 0..used_clusters as usize {
        image[rb + 2 * cluster..rb + 2 * cluster + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    Ok(image)
}

fn push_extension(header: &mut Vec<u8>, ext_type: u32, data: &[u8]) {
    header.extend_from_slice(&ext_type.to_be_bytes());
    header.extend_from_slice(&(data.len() as u32).to_be_bytes());
    header.extend_from_slice(data);
    header.resize(header.len().next_multiple_of(8), 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Result<Qcow2Header, DiskError> {
        Qcow2Header::parse(Path::new("t.qcow2"), bytes, bytes.len() as u64)
    }

    fn fresh(size: u64) -> Vec<u8> {
        new_image_bytes(size, DEFAULT_CLUSTER_BITS, None).unwrap()
    }

    #[test]
    fn new_image_matches_qemu_img_layout() {
        let image = fresh(1 << 30);
        // qemu-img create -f qcow2 x 1G makes a 196624-byte file.
        assert_eq!(image.len(), 196_624);
        let header = parse(&image).unwrap();
        assert_eq!(header.version, 3);
        assert_eq!(header.cluster_size(), 65536);
        assert_eq!(header.l1_size, 2);
        assert_eq!(header.l1_table_offset, 0x30000);
        assert_eq!(header.refcount_table_offset, 0x10000);
        assert_eq!(header.refcount_table_clusters, 1);
        assert_eq!(header.refcount_order, 4);
        assert_eq!(header.header_length, 112);
        assert_eq!(header.compatible_features & COMPAT_LAZY_REFCOUNTS, 0);
        assert_eq!(&image[0x10000..0x10008], &0x20000u64.to_be_bytes());
        // Four clusters in use: header, refcount table, refcount block, L1.
        for cluster in 0..4 {
            assert_eq!(
                &image[0x20000 + 2 * cluster..0x20002 + 2 * cluster],
                &[0, 1]
            );
        }
        assert_eq!(&image[0x20008..0x2000a], &[0, 0]);
        header.check_openable(Path::new("t"), true).unwrap();
    }

    #[test]
    fn backing_name_and_format_round_trip() {
        let image = new_image_bytes(1 << 20, 16, Some(("base.qcow2", "qcow2"))).unwrap();
        let header = parse(&image).unwrap();
        assert_eq!(header.backing_file.as_deref(), Some("base.qcow2"));
        assert_eq!(header.backing_format.as_deref(), Some("qcow2"));
        // qemu-img puts the name right after the extensions: 0x210 with a 5-byte format name.
        assert_eq!(header.backing_file_offset, 0x210);
    }

    #[test]
    fn large_disk_gets_multi_cluster_l1() {
        let image = fresh(3 << 40);
        assert_eq!(image.len(), 245_760);
        let header = parse(&image).unwrap();
        assert_eq!(header.l1_size, 6144);
        // header, reftable, refblock, 1 L1 cluster (48 KiB)
        assert_eq!(&image[0x20006..0x20008], &[0, 1]);
    }

    #[test]
    fn truncated_headers_are_reported() {
        let image = fresh(1 << 20);
        assert!(matches!(
            parse(&image[..50]),
            Err(DiskError::Truncated { .. })
        ));
        assert!(matches!(
            parse(&image[..90]),
            Err(DiskError::Truncated { .. })
        ));
        // Whole header present but the L1 table is cut off.
        assert!(matches!(
            parse(&image[..0x30004]),
            Err(DiskError::Truncated { .. })
        ));
        assert!(matches!(
            parse(&image[..0x10000]),
            Err(DiskError::Truncated { .. })
        ));
    }

    #[test]
    fn bad_fields_are_refused() {
        let base = fresh(1 << 20);
        let patch = |at: usize, bytes: &[u8]| {
            let mut image = base.clone();
            image[at..at + bytes.len()].copy_from_slice(bytes);
            parse(&image)
        };
        assert!(matches!(patch(0, b"QFI\0"), Err(DiskError::Corrupt { .. })));
        assert!(matches!(
            patch(4, &4u32.to_be_bytes()),
            Err(DiskError::Unsupported { .. })
        ));
        assert!(matches!(
            patch(20, &8u32.to_be_bytes()),
            Err(DiskError::Corrupt { .. })
        ));
        assert!(matches!(
            patch(20, &22u32.to_be_bytes()),
            Err(DiskError::Corrupt { .. })
        ));
        assert!(matches!(
            patch(20, &200u32.to_be_bytes()),
            Err(DiskError::Corrupt { .. })
        ));
        // L1 too small for the size.
        assert!(matches!(
            patch(24, &(1u64 << 40).to_be_bytes()),
            Err(DiskError::Corrupt { .. })
        ));
        // L1 absurdly large.
        assert!(matches!(
            patch(36, &u32::MAX.to_be_bytes()),
            Err(DiskError::Corrupt { .. })
        ));
        // Misaligned L1.
        assert!(matches!(
            patch(40, &0x30008u64.to_be_bytes()),
            Err(DiskError::Corrupt { .. })
        ));
        // L1 beyond the file.
        assert!(matches!(
            patch(40, &(1u64 << 40).to_be_bytes()),
            Err(DiskError::Truncated { .. })
        ));
        assert!(matches!(
            patch(40, &(u64::MAX - 0xffff).to_be_bytes()),
            Err(DiskError::Truncated { .. })
        ));
        // Zero-cluster and oversized refcount tables.
        assert!(matches!(
            patch(56, &0u32.to_be_bytes()),
            Err(DiskError::Corrupt { .. })
        ));
        assert!(matches!(
            patch(56, &1000u32.to_be_bytes()),
            Err(DiskError::Corrupt { .. })
        ));
        // Header length below 104 or above a cluster.
        assert!(matches!(
            patch(100, &96u32.to_be_bytes()),
            Err(DiskError::Corrupt { .. })
        ));
        assert!(matches!(
            patch(100, &0x20000u32.to_be_bytes()),
            Err(DiskError::Corrupt { .. })
        ));
        // Refcount order above 6.
        assert!(matches!(
            patch(96, &7u32.to_be_bytes()),
            Err(DiskError::Corrupt { .. })
        ));
        // Extension longer than the header cluster.
        assert!(matches!(
            patch(0x74, &0x10_0000u32.to_be_bytes()),
            Err(DiskError::Corrupt { .. })
        ));
        // Backing name outside the header cluster.
        let mut image = base.clone();
        image[8..16].copy_from_slice(&0xfff0u64.to_be_bytes());
        image[16..20].copy_from_slice(&100u32.to_be_bytes());
        assert!(matches!(parse(&image), Err(DiskError::Corrupt { .. })));
    }

    #[test]
    fn unsupported_features_are_refused_when_opening() {
        let base = parse(&fresh(1 << 20)).unwrap();
        let path = Path::new("t.qcow2");
        let with = |f: &dyn Fn(&mut Qcow2Header)| {
            let mut header = base.clone();
            f(&mut header);
            header.check_openable(path, true)
        };
        assert!(matches!(
            with(&|h| h.crypt_method = 2),
            Err(DiskError::Unsupported { .. })
        ));
        assert!(matches!(
            with(&|h| h.incompatible_features = INCOMPAT_DIRTY),
            Err(DiskError::Dirty { .. })
        ));
        assert!(matches!(
            with(&|h| h.incompatible_features = INCOMPAT_CORRUPT),
            Err(DiskError::MarkedCorrupt { .. })
        ));
        for bit in [
            INCOMPAT_DATA_FILE,
            INCOMPAT_COMPRESSION_TYPE,
            INCOMPAT_EXTENDED_L2,
            1 << 9,
        ] {
            assert!(matches!(
                with(&|h| h.incompatible_features = bit),
                Err(DiskError::Unsupported { .. })
            ));
        }
        assert!(matches!(
            with(&|h| h.version = 2),
            Err(DiskError::Unsupported { .. })
        ));
        let mut v2 = base.clone();
        v2.version = 2;
        v2.check_openable(path, false).unwrap();
        assert!(matches!(
            with(&|h| h.nb_snapshots = 1),
            Err(DiskError::Unsupported { .. })
        ));
        // Lazy refcounts (a compatible bit) alone is fine.
        with(&|h| h.compatible_features = COMPAT_LAZY_REFCOUNTS).unwrap();
    }

    #[test]
    fn l1_entries_cover_the_disk() {
        assert_eq!(l1_entries_for(0, 16), 0);
        assert_eq!(l1_entries_for(1, 16), 1);
        assert_eq!(l1_entries_for(512 << 20, 16), 1);
        assert_eq!(l1_entries_for((512 << 20) + 1, 16), 2);
        assert_eq!(l1_entries_for(u64::MAX, 9), 1u64 << 49);
    }
}
