//! Disks for storage tests: ext4 images made without mounting anything
//! (`mkfs.ext4 -d`), raw images with known bytes, loop devices that detach when dropped, reading an
//! image's files from the host (`debugfs`), and who holds a device open.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

/// Why a disk test cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid only reads the process's credentials.
    if unsafe { libc::geteuid() } != 0 {
        return Some("loop devices need root".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("no /dev/loop-control (the loop module is not loaded)".into());
    }
    ["mkfs.ext4", "debugfs", "losetup"]
        .into_iter()
        .find(|tool| Command::new(tool).arg("-V").output().is_err())
        .map(|tool| format!("{tool} not installed (apt-get install e2fsprogs mount)"))
}

/// An ext4 image of `size_mib` MiB at `image`, holding a copy of the tree
/// at `contents` when given.
pub fn ext4_image(image: &Path, size_mib: u32, contents: Option<&Path>) {
    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.args(["-q", "-F", "-E", "root_owner=0:0"]);
    if let Some(contents) = contents {
        mkfs.arg("-d").arg(contents);
    }
    let status = mkfs
        .arg(image)
        .arg(format!("{size_mib}M"))
        .status()
        .expect("running mkfs.ext4");
    assert!(status.success(), "mkfs.ext4 {} failed", image.display());
}

/// A raw disk image of `size_mib` MiB at `image` that starts with `head`
/// (zeros after it), for a container to use as a raw block device.
pub fn raw_image(image: &Path, size_mib: u64, head: &[u8]) {
    let file = fs::File::create(image).expect("creating a raw image");
    file.set_len(size_mib << 20).expect("sizing the raw image");
    std::os::unix::fs::FileExt::write_all_at(&file, head, 0).expect("writing the raw image");
}

/// `len` bytes of `image` at `offset`.
pub fn read_at(image: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    let file = fs::File::open(image).expect("opening the image");
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut bytes, offset)
        .expect("reading the image");
    bytes
}

/// The contents of `path` inside the ext4 file system of `disk` (an image
/// or a block device), read with debugfs; None if it is not there.
pub fn read_ext4_file(disk: &Path, path: &str) -> Option<String> {
    let output = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(disk)
        .output()
        .expect("running debugfs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    (output.status.success() && !stderr.contains("File not found"))
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A loop device over an image, detached when dropped.
pub struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    pub fn attach(image: &Path) -> LoopDevice {
        let output = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(image)
            .output()
            .expect("running losetup");
        assert!(
            output.status.success(),
            "losetup {} failed: {}",
            image.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        LoopDevice { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn path_str(&self) -> &str {
        self.path.to_str().expect("loop device paths are ASCII")
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// The processes that have `path` open, as "pid: command line".
pub fn processes_holding(path: &Path) -> Vec<String> {
    let Ok(target) = fs::canonicalize(path) else {
        return Vec::new();
    };
    let mut holders = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let holds = fs::read_dir(entry.path().join("fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| fs::read_link(fd.path()).is_ok_and(|link| link == target));
        if holds {
            let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
            holders.push(format!(
                "{pid}: {}",
                String::from_utf8_lossy(&cmdline).replace('\0', " ")
            ));
        }
    }
    holders
}
