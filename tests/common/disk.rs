//! Building disk images for tests: a GPT disk with one Linux partition
//! holding an ext4 file system made from a directory (`mkfs.ext4 -d`, so
//! nothing is mounted).  Needs sfdisk and mkfs.ext4 (check with `have`).

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{run_ok, sparse_file};

const MIB: u64 = 1 << 20;

/// A disk image and where its only partition is.
pub struct GptDisk {
    pub path: PathBuf,
    /// Byte offset of the partition (and of the file system in it).
    pub part_offset: u64,
    /// Byte length of the partition.
    pub part_size: u64,
}

/// Make `dir/disk.img`: a GPT disk whose single partition starts at 1 MiB
/// and holds an ext4 file system of `fs_mib` MiB containing `files`
/// (relative path, contents).  Scratch files go in `dir` too.
pub fn gpt_ext4(dir: &Path, fs_mib: u64, files: &[(&str, &[u8])]) -> GptDisk {
    let src = dir.join("fs-src");
    for (name, data) in files {
        let p = src.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, data).unwrap();
    }
    std::fs::create_dir_all(&src).unwrap();

    let fs = dir.join("fs.img");
    sparse_file(&fs, fs_mib * MIB);
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "nbdtest", "-d"])
            .arg(&src)
            .arg(&fs),
    );

    // 1 MiB before the partition for the GPT, 1 MiB after for its backup.
    let path = dir.join("disk.img");
    let part_offset = MIB;
    let part_size = fs_mib * MIB;
    let disk = std::fs::File::create(&path).unwrap();
    disk.set_len(part_offset + part_size + MIB).unwrap();
    drop(disk);
    let mut sfdisk = Command::new("sfdisk")
        .arg("-q")
        .arg(&path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sfdisk");
    write!(
        sfdisk.stdin.take().unwrap(),
        "label: gpt\nstart={}, size={}, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n",
        part_offset / 512,
        part_size / 512
    )
    .unwrap();
    let out = sfdisk.wait_with_output().unwrap();
    assert!(out.status.success(), "sfdisk: {out:?}");

    // Check the table says what we think before copying the file system in.
    let dump = super::stdout_of(Command::new("sfdisk").arg("-d").arg(&path));
    assert!(
        dump.contains(&format!(
            "start={:>12}, size={:>12}",
            part_offset / 512,
            part_size / 512
        )),
        "{dump}"
    );
    let data = std::fs::read(&fs).unwrap();
    let disk = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    disk.write_all_at(&data, part_offset).unwrap();
    disk.sync_all().unwrap();
    std::fs::remove_file(&fs).unwrap();
    GptDisk {
        path,
        part_offset,
        part_size,
    }
}
