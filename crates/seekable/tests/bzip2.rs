//! bzip2 reader tests.

mod common;

use std::io::Write;

use common::*;
use proptest::prelude::*;
use seekable_compressed::{open, Bzip2Reader, Error, RandomAccess};

fn bz(data: &[u8], level: u32) -> Vec<u8> {
    let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::new(level));
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn random_reads_match(
        len in prop_oneof![Just(0usize), Just(1), 2usize..2000, 2000usize..500_000],
        seed in any::<u64>(),
        streams in 1usize..3,
        threshold in prop_oneof![Just(u64::MAX), 1u64..200_000],
        reads in proptest::collection::vec((any::<u64>(), 1usize..70_000), 1..8),
    ) {
        let data = image_like(len, seed);
        let mut file = Vec::new();
        for p in stream_pieces(&data, streams) {
            file.extend(bz(p, 1));
        }
        let r = Bzip2Reader::open_with_threshold(source(file), &opts(), threshold).unwrap();
        prop_assert_eq!(r.size(), data.len() as u64);
        check_reads(&r, &data, &reads);
    }
}

#[test]
fn command_line_bzip2_multi_block() {
    let data = image_like(1_500_000, 4);
    let file = run_tool("bzip2", &["-1"], &data);
    let r = open(source(file), &opts()).unwrap();
    assert_eq!(r.format(), "bzip2");
    check_range(&*r, &data, 0, data.len());
    check_range(&*r, &data, 1_234_567, 100_000);
    check_extents(&*r, &data);
}

#[test]
fn corrupt_and_truncated_bzip2() {
    let data = image_like(400_000, 5);
    let file = bz(&data, 1);
    let r = Bzip2Reader::open(source(file.clone()), &opts()).unwrap();
    assert!(r.blocks().len() >= 2);
    let b1 = r.blocks()[1];
    let mut bad = file.clone();
    let at = ((b1.start_bit + b1.end_bit) / 16) as usize;
    bad[at] ^= 0x10;
    // Sizes are learnt at open, so the damage is found there.
    match Bzip2Reader::open(source(bad), &opts()) {
        Err(Error::Corrupt { offset, .. }) => {
            assert!(
                offset >= b1.start_bit / 8 && offset <= b1.end_bit / 8 + 1,
                "{offset}"
            )
        }
        other => panic!("{:?}", other.map(|r| r.size())),
    }
    for cut in [0, 3, 4, 10, file.len() / 2, file.len() - 1] {
        assert!(
            Bzip2Reader::open(source(file[..cut].to_vec()), &opts()).is_err(),
            "cut {cut}"
        );
    }
    let mut x = 5u64;
    for _ in 0..100 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        let mut m = file.clone();
        let p = (x >> 33) as usize % m.len();
        m[p] ^= (x >> 8) as u8 | 1;
        let _ = Bzip2Reader::open(source(m), &opts());
    }
}

fn to_bits(b: &[u8]) -> Vec<u8> {
    b.iter()
        .flat_map(|&x| (0..8).rev().map(move |k| (x >> k) & 1))
        .collect()
}

fn from_bits(bits: &[u8]) -> Vec<u8> {
    bits.chunks(8)
        .map(|c| {
            let mut v = 0u8;
            for k in 0..8 {
                v = (v << 1) | c.get(k).copied().unwrap_or(0);
            }
            v
        })
        .collect()
}

/// Rebuild a one-stream file with its blocks' bits in `order` (indexes
/// into the blocks of `file`), keeping the header and the stream trailer.
fn splice_blocks(file: &[u8], blocks: &[(u64, u64)], order: &[usize]) -> Vec<u8> {
    let bits = to_bits(file);
    let first = blocks[0].0 as usize;
    let last = blocks[blocks.len() - 1].1 as usize;
    // End-of-stream magic, the combined CRC.
    let trailer = &bits[last..last + 80];
    let mut out = bits[..first].to_vec();
    for &i in order {
        out.extend_from_slice(&bits[blocks[i].0 as usize..blocks[i].1 as usize]);
    }
    out.extend_from_slice(trailer);
    from_bits(&out)
}

/// Issue #19: a damaged block magic, a deleted or a duplicated block is an
/// error naming the offset, never a shorter (or longer) disk.
#[test]
fn lost_deleted_or_duplicated_blocks_are_errors() {
    let data = image_like(450_000, 3);
    let file = run_tool("bzip2", &["-1"], &data);
    let r = Bzip2Reader::open(source(file.clone()), &opts()).unwrap();
    assert_eq!(r.size(), data.len() as u64);
    let blocks: Vec<(u64, u64)> = r
        .blocks()
        .iter()
        .map(|b| (b.start_bit, b.end_bit))
        .collect();
    assert!(blocks.len() >= 3, "{}", blocks.len());

    // Byte 4 is the first byte of the first block's magic.
    let mut bad = file.clone();
    bad[4] ^= 1;
    match Bzip2Reader::open(source(bad), &opts()) {
        Err(e @ Error::Corrupt { .. }) => assert!(e.to_string().contains("test-image"), "{e}"),
        Err(e) => panic!("{e}"),
        Ok(r) => panic!("served a disk of {} bytes", r.size()),
    }
    // The middle block's magic: the block before it can no longer be
    // decoded on its own.
    let mut bad = file.clone();
    bad[(blocks[1].0 / 8 + 1) as usize] ^= 0x10;
    assert!(Bzip2Reader::open(source(bad), &opts()).is_err());

    let n = blocks.len();
    let all: Vec<usize> = (0..n).collect();
    // Sanity: rebuilt unchanged, it still opens.
    let same = splice_blocks(&file, &blocks, &all);
    let r = Bzip2Reader::open(source(same), &opts()).unwrap();
    assert_eq!(r.size(), data.len() as u64);
    let deleted: Vec<usize> = (0..n).filter(|&i| i != 1).collect();
    let mut duplicated = all.clone();
    duplicated.insert(1, 1);
    let mut swapped = all.clone();
    swapped.swap(0, 1);
    for order in [deleted, duplicated, swapped] {
        let f = splice_blocks(&file, &blocks, &order);
        match Bzip2Reader::open(source(f), &opts()) {
            Err(Error::Corrupt { reason, .. }) => assert!(reason.contains("CRC"), "{reason}"),
            Err(e) => panic!("{e}"),
            Ok(r) => panic!("{order:?}: served a disk of {} bytes", r.size()),
        }
    }
}
