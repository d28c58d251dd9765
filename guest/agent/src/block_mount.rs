//! Block file systems, guest side: Mount puts a hot-plugged disk's file
//! system on a guest directory with mount(8)-style options, detecting its
//! type when the host does not say; Unmount takes it off again before the
//! host unplugs the disk, refusing rather than detaching lazily when the
//! file system is still in use.

use std::{
    fmt, fs, io,
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    mount::{mount, umount2, MntFlags, MsFlags},
};
use runv_protocol::agent;

use crate::share::top_mount_at;

const MOUNT_TABLE: &str = "/proc/self/mountinfo";
const FILESYSTEMS: &str = "/proc/filesystems";

/// Options as mount(2) takes them.
#[derive(Debug, PartialEq, Eq)]
pub struct MountOptions {
    pub flags: MsFlags,
    /// The file system's own options, comma-separated.
    pub data: String,
}

#[derive(Debug)]
pub enum MountError {
    InvalidRequest(String),
    /// The source does not exist.
    NoSource {
        source: PathBuf,
        mount_point: PathBuf,
        fs_type: String,
        error: io::Error,
    },
    MountPoint {
        path: PathBuf,
        error: io::Error,
    },
    ReadFile {
        path: &'static str,
        error: io::Error,
    },
    /// Something else is mounted at the mount point.
    Occupied {
        mount_point: PathBuf,
        fstype: String,
        source: String,
    },
    Mount {
        source: PathBuf,
        mount_point: PathBuf,
        fs_type: String,
        errno: Errno,
    },
    /// Detection found no file system type that fits.
    Undetected {
        source: PathBuf,
        mount_point: PathBuf,
        tried: Vec<String>,
    },
    Busy {
        mount_point: PathBuf,
    },
    Unmount {
        mount_point: PathBuf,
        errno: Errno,
    },
}

impl fmt::Display for MountError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MountError::InvalidRequest(why) => f.write_str(why),
            MountError::NoSource {
                source,
                mount_point,
                fs_type,
                error,
            } => write!(
                f,
                "mounting {} ({}) on {}: the source {}: {}",
                source.display(),
                type_or_detect(fs_type),
                mount_point.display(),
                if error.kind() == io::ErrorKind::NotFound {
                    "does not exist"
                } else {
                    "cannot be resolved"
                },
                match error.raw_os_error() {
                    Some(raw) => describe_errno(Errno::from_raw(raw)),
                    None => error.to_string(),
                }
            ),
            MountError::MountPoint { path, error } => {
                write!(f, "cannot create mount point {}: {error}", path.display())
            }
            MountError::ReadFile { path, error } => write!(f, "cannot read {path}: {error}"),
            MountError::Occupied {
                mount_point,
                fstype,
                source,
            } => write!(
                f,
                "{} already has {fstype} {source} mounted on it",
                mount_point.display()
            ),
            MountError::Mount {
                source,
                mount_point,
                fs_type,
                errno,
            } => write!(
                f,
                "mounting {} ({fs_type}) on {}: {}",
                source.display(),
                mount_point.display(),
                describe_errno(*errno)
            ),
            MountError::Undetected {
                source,
                mount_point,
                tried,
            } => write!(
                f,
                "mounting {} on {}: no file system type fits it (tried {}); the guest kernel may \
                 lack its file system, or the disk has none",
                source.display(),
                mount_point.display(),
                if tried.is_empty() {
                    "none: the guest kernel lists no block file system".to_owned()
                } else {
                    tried.join(", ")
                }
            ),
            MountError::Busy { mount_point } => write!(
                f,
                "cannot unmount {}: the file system is busy (a process still has files open \
                 or its working directory there, or something is mounted below it); it stays \
                 mounted",
                mount_point.display()
            ),
            MountError::Unmount { mount_point, errno } => write!(
                f,
                "unmounting {}: {}",
                mount_point.display(),
                describe_errno(*errno)
            ),
        }
    }
}

impl std::error::Error for MountError {}

/// What a message calls an empty file system type.
fn type_or_detect(fs_type: &str) -> &str {
    if fs_type.is_empty() {
        "type to detect"
    } else {
        fs_type
    }
}

/// `ENOENT (No such file or directory)`.
fn describe_errno(errno: Errno) -> String {
    format!("{errno:?} ({})", errno.desc())
}

/// Serves Mount (see agent.proto) off the runtime's only thread: mounting
/// reads the disk.
pub async fn serve_mount(request: agent::MountRequest) -> ttrpc::Result<agent::Empty> {
    let (source, mount_point) = (request.source.clone(), request.mount_point.clone());
    let mounted = tokio::task::spawn_blocking(move || {
        mount_block(
            Path::new(&request.source),
            &request.fs_type,
            &request.options,
            Path::new(&request.mount_point),
        )
    })
    .await
    .map_err(|e| status(ttrpc::Code::INTERNAL, format!("mount task: {e}")))?
    .map_err(mount_status)?;
    tracing::info!(
        source,
        mount_point,
        fs_type = mounted.fs_type,
        already = mounted.already,
        "block file system mounted"
    );
    Ok(agent::Empty::new())
}

/// Serves Unmount (see agent.proto).
pub async fn serve_unmount(request: agent::UnmountRequest) -> ttrpc::Result<agent::Empty> {
    let mount_point = request.mount_point.clone();
    let unmounted = tokio::task::spawn_blocking(move || unmount(Path::new(&request.mount_point)))
        .await
        .map_err(|e| status(ttrpc::Code::INTERNAL, format!("unmount task: {e}")))?
        .map_err(mount_status)?;
    tracing::info!(mount_point, unmounted, "unmount");
    Ok(agent::Empty::new())
}

fn status(code: ttrpc::Code, message: String) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
}

/// A failure with the status code that says whose it is.
fn mount_status(e: MountError) -> ttrpc::Error {
    let code = match &e {
        MountError::InvalidRequest(_) => ttrpc::Code::INVALID_ARGUMENT,
        MountError::NoSource { .. } => ttrpc::Code::NOT_FOUND,
        MountError::Occupied { .. } | MountError::Busy { .. } => ttrpc::Code::FAILED_PRECONDITION,
        MountError::Undetected { .. } => ttrpc::Code::INVALID_ARGUMENT,
        MountError::Mount { errno, .. } if *errno == Errno::ENOENT => ttrpc::Code::NOT_FOUND,
        MountError::Mount { .. }
        | MountError::MountPoint { .. }
        | MountError::ReadFile { .. }
        | MountError::Unmount { .. } => ttrpc::Code::INTERNAL,
    };
    status(code, e.to_string())
}

/// mount(8)'s option words that are mount flags: each sets or clears one.
const FLAG_WORDS: &[(&str, MsFlags, bool)] = &[
    ("ro", MsFlags::MS_RDONLY, true),
    ("rw", MsFlags::MS_RDONLY, false),
    ("nosuid", MsFlags::MS_NOSUID, true),
    ("suid", MsFlags::MS_NOSUID, false),
    ("nodev", MsFlags::MS_NODEV, true),
    ("dev", MsFlags::MS_NODEV, false),
    ("noexec", MsFlags::MS_NOEXEC, true),
    ("exec", MsFlags::MS_NOEXEC, false),
    ("sync", MsFlags::MS_SYNCHRONOUS, true),
    ("async", MsFlags::MS_SYNCHRONOUS, false),
    ("dirsync", MsFlags::MS_DIRSYNC, true),
    ("noatime", MsFlags::MS_NOATIME, true),
    ("atime", MsFlags::MS_NOATIME, false),
    ("nodiratime", MsFlags::MS_NODIRATIME, true),
    ("diratime", MsFlags::MS_NODIRATIME, false),
    ("relatime", MsFlags::MS_RELATIME, true),
    ("norelatime", MsFlags::MS_RELATIME, false),
    ("strictatime", MsFlags::MS_STRICTATIME, true),
    ("nostrictatime", MsFlags::MS_STRICTATIME, false),
];

/// Option words that change what kind of mount this is: not for a disk.
const REFUSED_WORDS: &[&str] = &[
    "bind",
    "rbind",
    "remount",
    "move",
    "shared",
    "rshared",
    "private",
    "rprivate",
    "slave",
    "rslave",
    "unbindable",
    "runbindable",
];

/// Turns mount(8)-style options into mount flags and file system data.
/// Each option may itself hold several, comma-separated; a later flag word
/// wins over an earlier one ("ro", then "rw" mounts read-write), and
/// "defaults" changes nothing.
pub fn parse_options(options: &[String]) -> Result<MountOptions, MountError> {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for option in options.iter().flat_map(|option| option.split(',')) {
        let option = option.trim();
        if option.is_empty() || option == "defaults" {
            continue;
        }
        if REFUSED_WORDS.contains(&option) {
            return Err(MountError::InvalidRequest(format!(
                "mount option {option:?} is not allowed: Mount mounts a block device's file \
                 system, not a bind mount, a remount or a propagation change"
            )));
        }
        match FLAG_WORDS.iter().find(|(word, _, _)| *word == option) {
            Some((_, flag, true)) => flags.insert(*flag),
            Some((_, flag, false)) => flags.remove(*flag),
            None => data.push(option),
        }
    }
    Ok(MountOptions {
        flags,
        data: data.join(","),
    })
}

/// The block file systems of a /proc/filesystems `listing`, in its order:
/// the lines not marked "nodev", as mount(8) tries them.
pub fn block_filesystems(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            match (fields.next(), fields.next()) {
                (Some("nodev"), _) => None,
                (Some(name), None) => Some(name.to_owned()),
                _ => None,
            }
        })
        .collect()
}

/// What Mount did.
#[derive(Debug)]
pub struct Mounted {
    /// The file system type, as given or detected.
    pub fs_type: String,
    /// The source was mounted there already: nothing changed.
    pub already: bool,
}

/// Mounts `source` on `mount_point` (created if missing) unless it is
/// mounted there already.
pub fn mount_block(
    source: &Path,
    fs_type: &str,
    options: &[String],
    mount_point: &Path,
) -> Result<Mounted, MountError> {
    if !source.is_absolute() {
        return Err(MountError::InvalidRequest(format!(
            "the mount source {source:?} is not an absolute path"
        )));
    }
    if !mount_point.is_absolute() {
        return Err(MountError::InvalidRequest(format!(
            "the mount point {mount_point:?} is not an absolute path"
        )));
    }
    let options = parse_options(options)?;
    // The mount table lists resolved paths.
    let source = fs::canonicalize(source).map_err(|error| MountError::NoSource {
        source: source.to_owned(),
        mount_point: mount_point.to_owned(),
        fs_type: fs_type.to_owned(),
        error,
    })?;
    let mount_point_error = |error| MountError::MountPoint {
        path: mount_point.to_owned(),
        error,
    };
    let created = !mount_point.exists();
    fs::create_dir_all(mount_point).map_err(mount_point_error)?;
    let mount_point = fs::canonicalize(mount_point).map_err(mount_point_error)?;
    let result = mount_unless_mounted(&source, fs_type, &options, &mount_point);
    if result.is_err() && created {
        // Leave no trace of a failed call.
        let _ = fs::remove_dir(&mount_point);
    }
    result
}

fn mount_unless_mounted(
    source: &Path,
    fs_type: &str,
    options: &MountOptions,
    mount_point: &Path,
) -> Result<Mounted, MountError> {
    let table = fs::read_to_string(MOUNT_TABLE).map_err(|error| MountError::ReadFile {
        path: MOUNT_TABLE,
        error,
    })?;
    if let Some(entry) = top_mount_at(&table, mount_point) {
        let same_type = fs_type.is_empty() || entry.fstype == fs_type;
        if Path::new(&entry.source) == source && same_type {
            return Ok(Mounted {
                fs_type: entry.fstype,
                already: true,
            });
        }
        return Err(MountError::Occupied {
            mount_point: mount_point.to_owned(),
            fstype: entry.fstype,
            source: entry.source,
        });
    }
    let attempt = |fs_type: &str| {
        mount(
            Some(source),
            mount_point,
            Some(fs_type),
            options.flags,
            (!options.data.is_empty()).then_some(options.data.as_str()),
        )
    };
    let mount_error = |fs_type: &str, errno| MountError::Mount {
        source: source.to_owned(),
        mount_point: mount_point.to_owned(),
        fs_type: fs_type.to_owned(),
        errno,
    };
    if !fs_type.is_empty() {
        attempt(fs_type).map_err(|errno| mount_error(fs_type, errno))?;
        return Ok(Mounted {
            fs_type: fs_type.to_owned(),
            already: false,
        });
    }
    let listing = fs::read_to_string(FILESYSTEMS).map_err(|error| MountError::ReadFile {
        path: FILESYSTEMS,
        error,
    })?;
    let mut tried = Vec::new();
    for candidate in block_filesystems(&listing) {
        match attempt(&candidate) {
            Ok(()) => {
                return Ok(Mounted {
                    fs_type: candidate,
                    already: false,
                })
            }
            // What a file system answers a superblock that is not its own
            // (EINVAL), or a type gone meanwhile (ENODEV): try the next.
            Err(Errno::EINVAL | Errno::ENODEV) => tried.push(candidate),
            // Anything else concerns the device or the mount point, not
            // the type: every other try would fail the same way.
            Err(errno) => return Err(mount_error(&candidate, errno)),
        }
    }
    Err(MountError::Undetected {
        source: source.to_owned(),
        mount_point: mount_point.to_owned(),
        tried,
    })
}

/// Unmounts `mount_point` and removes the directory. Returns whether
/// something was mounted there.
pub fn unmount(mount_point: &Path) -> Result<bool, MountError> {
    if !mount_point.is_absolute() {
        return Err(MountError::InvalidRequest(format!(
            "the mount point {mount_point:?} is not an absolute path"
        )));
    }
    let mount_point = match fs::canonicalize(mount_point) {
        Ok(path) => path,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(error) => {
            return Err(MountError::MountPoint {
                path: mount_point.to_owned(),
                error,
            })
        }
    };
    let mounted = || -> Result<bool, MountError> {
        let table = fs::read_to_string(MOUNT_TABLE).map_err(|error| MountError::ReadFile {
            path: MOUNT_TABLE,
            error,
        })?;
        Ok(top_mount_at(&table, &mount_point).is_some())
    };
    if !mounted()? {
        return Ok(false);
    }
    match umount2(&mount_point, MntFlags::empty()) {
        Ok(()) => {}
        Err(Errno::EBUSY) => return Err(MountError::Busy { mount_point }),
        // Unmounted meanwhile.
        Err(Errno::EINVAL) => return Ok(false),
        Err(errno) => return Err(MountError::Unmount { mount_point, errno }),
    }
    if mounted()? {
        tracing::warn!(
            mount_point = %mount_point.display(),
            "another mount is still on the mount point; keeping the directory"
        );
        return Ok(true);
    }
    // The file system is off; a directory that will not go is no reason
    // to tell the host otherwise.
    if let Err(e) = fs::remove_dir(&mount_point) {
        tracing::warn!(
            mount_point = %mount_point.display(),
            error = %e,
            "unmounted, but cannot remove the mount point"
        );
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of(e: MountError) -> ttrpc::Code {
        match mount_status(e) {
            ttrpc::Error::RpcStatus(status) => status.code(),
            other => panic!("{other:?}"),
        }
    }

    fn options(words: &[&str]) -> Result<MountOptions, MountError> {
        parse_options(&words.iter().map(|w| w.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn flag_words_become_mount_flags() {
        let parsed = options(&["ro", "nosuid", "nodev", "noexec", "noatime"]).unwrap();
        assert_eq!(
            parsed.flags,
            MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC
                | MsFlags::MS_NOATIME
        );
        assert_eq!(parsed.data, "");
        let parsed = options(&["sync,dirsync", "nodiratime", "relatime"]).unwrap();
        assert_eq!(
            parsed.flags,
            MsFlags::MS_SYNCHRONOUS
                | MsFlags::MS_DIRSYNC
                | MsFlags::MS_NODIRATIME
                | MsFlags::MS_RELATIME
        );
        assert_eq!(
            options(&["strictatime"]).unwrap().flags,
            MsFlags::MS_STRICTATIME
        );
    }

    #[test]
    fn later_words_win_and_defaults_change_nothing() {
        let parsed = options(&["ro", "rw", "nosuid", "suid", "nodev", "dev"]).unwrap();
        assert_eq!(parsed.flags, MsFlags::empty());
        let parsed = options(&["noexec,exec", "sync", "async", "noatime", "atime"]).unwrap();
        assert_eq!(parsed.flags, MsFlags::empty());
        let parsed = options(&["defaults", "", "rw,ro"]).unwrap();
        assert_eq!(parsed.flags, MsFlags::MS_RDONLY);
        assert_eq!(options(&[]).unwrap().flags, MsFlags::empty());
    }

    #[test]
    fn other_options_are_file_system_data() {
        let parsed = options(&["errors=remount-ro", "ro", "data=ordered,noload"]).unwrap();
        assert_eq!(parsed.flags, MsFlags::MS_RDONLY);
        assert_eq!(parsed.data, "errors=remount-ro,data=ordered,noload");
    }

    #[test]
    fn bind_and_remount_are_refused() {
        for word in ["bind", "rbind", "remount", "ro,remount", "move", "rshared"] {
            let err = options(&[word]).unwrap_err();
            assert!(
                matches!(err, MountError::InvalidRequest(_)),
                "{word}: {err}"
            );
            assert!(err.to_string().contains("is not allowed"), "{err}");
        }
    }

    #[test]
    fn detection_tries_the_block_file_systems_in_order() {
        let listing = "nodev\tsysfs\nnodev\ttmpfs\nnodev\tproc\n\text3\n\text2\n\text4\n\
                       nodev\tdevtmpfs\n\tvfat\nnodev\tvirtiofs\n\tbtrfs\n\n";
        assert_eq!(
            block_filesystems(listing),
            ["ext3", "ext2", "ext4", "vfat", "btrfs"]
        );
        assert!(block_filesystems("nodev\tproc\n").is_empty());
    }

    #[test]
    fn errors_name_source_mount_point_type_and_errno() {
        let err = MountError::Mount {
            source: "/dev/vdb".into(),
            mount_point: "/run/disk".into(),
            fs_type: "ext4".into(),
            errno: Errno::EROFS,
        };
        assert_eq!(
            err.to_string(),
            "mounting /dev/vdb (ext4) on /run/disk: EROFS (Read-only file system)"
        );
        let err = MountError::Undetected {
            source: "/dev/vdb".into(),
            mount_point: "/run/disk".into(),
            tried: vec!["ext4".into(), "vfat".into()],
        };
        assert!(
            err.to_string().starts_with(
                "mounting /dev/vdb on /run/disk: no file system type fits it (tried ext4, vfat)"
            ),
            "{err}"
        );
        let err = MountError::Busy {
            mount_point: "/run/disk".into(),
        };
        assert!(
            err.to_string()
                .starts_with("cannot unmount /run/disk: the file system is busy"),
            "{err}"
        );
        assert_eq!(code_of(err), ttrpc::Code::FAILED_PRECONDITION);
    }

    #[test]
    fn bad_requests_are_refused_before_touching_anything() {
        let err = mount_block(Path::new("vdb"), "", &[], Path::new("/run/x")).unwrap_err();
        assert!(err.to_string().contains("not an absolute path"), "{err}");
        let err = mount_block(Path::new("/dev/vdb"), "", &[], Path::new("rel/dir")).unwrap_err();
        assert!(err.to_string().contains("not an absolute path"), "{err}");
        assert!(!Path::new("rel").exists());
        let err = unmount(Path::new("rel/dir")).unwrap_err();
        assert!(matches!(err, MountError::InvalidRequest(_)), "{err}");
    }

    #[test]
    fn a_missing_source_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mount_point = dir.path().join("disk");
        let err = mount_block(
            Path::new("/dev/runv-no-such-disk"),
            "ext4",
            &[],
            &mount_point,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "mounting /dev/runv-no-such-disk (ext4) on {}: the source does not exist: \
                 ENOENT (No such file or directory)",
                mount_point.display()
            )
        );
        assert_eq!(
            code_of(err),
            ttrpc::Code::NOT_FOUND,
            "the host named a disk the guest lacks"
        );
        assert!(!mount_point.exists(), "no mount point left behind");
    }

    /// An ext4 image on a loop device of its own, detached when dropped.
    struct LoopDisk {
        device: PathBuf,
        _image: tempfile::TempPath,
    }

    impl LoopDisk {
        /// None, saying why, where loop devices cannot be made (not root).
        fn new() -> Option<LoopDisk> {
            let image = tempfile::NamedTempFile::new().unwrap().into_temp_path();
            fs::File::options()
                .write(true)
                .open(&image)
                .and_then(|file| file.set_len(16 << 20))
                .unwrap();
            let run = |program: &str, args: &[&std::ffi::OsStr]| {
                std::process::Command::new(program)
                    .args(args)
                    .output()
                    .map_err(|e| format!("{program}: {e}"))
                    .and_then(|out| match out.status.success() {
                        true => Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned()),
                        false => Err(format!(
                            "{program}: {}",
                            String::from_utf8_lossy(&out.stderr).trim()
                        )),
                    })
            };
            let made = run(
                "mkfs.ext4",
                &["-q".as_ref(), "-F".as_ref(), image.as_os_str()],
            )
            .and_then(|_| {
                run(
                    "losetup",
                    &["--find".as_ref(), "--show".as_ref(), image.as_os_str()],
                )
            });
            match made {
                Ok(device) => Some(LoopDisk {
                    device: PathBuf::from(device),
                    _image: image,
                }),
                Err(why) => {
                    println!("SKIPPED: a loop device with ext4 needs root and e2fsprogs: {why}");
                    None
                }
            }
        }
    }

    impl Drop for LoopDisk {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .arg("-d")
                .arg(&self.device)
                .status();
        }
    }

    /// The whole round on a real disk: an ext4 loop device made here.
    #[test]
    fn mounts_detects_refuses_busy_and_unmounts_a_real_disk() {
        let Some(disk) = LoopDisk::new() else {
            return;
        };
        let device = disk.device.clone();
        let dir = tempfile::tempdir().unwrap();
        let mount_point = dir.path().join("a/disk");
        let opts = ["nodev,noatime".to_owned(), "errors=remount-ro".to_owned()];
        let mounted = mount_block(&device, "", &opts, &mount_point).unwrap();
        assert_eq!((mounted.fs_type.as_str(), mounted.already), ("ext4", false));
        let again = mount_block(&device, "ext4", &[], &mount_point).unwrap();
        assert!(again.already, "the same mount again is a no-op");
        let err = mount_block(&device, "vfat", &[], &mount_point).unwrap_err();
        assert!(matches!(err, MountError::Occupied { .. }), "{err}");
        let table = fs::read_to_string(MOUNT_TABLE).unwrap();
        let line = table
            .lines()
            .find(|line| line.contains(&*mount_point.to_string_lossy()))
            .unwrap();
        assert!(line.contains("nodev") && line.contains("noatime"), "{line}");
        assert!(line.contains("errors=remount-ro"), "{line}");

        let open = fs::File::create(mount_point.join("held")).unwrap();
        let err = unmount(&mount_point).unwrap_err();
        assert!(matches!(err, MountError::Busy { .. }), "{err}");
        assert!(top_mount_at(&fs::read_to_string(MOUNT_TABLE).unwrap(), &mount_point).is_some());
        drop(open);
        assert!(unmount(&mount_point).unwrap());
        assert!(!mount_point.exists(), "the mount point is removed");
        assert!(!unmount(&mount_point).unwrap(), "then it is a no-op");
    }

    #[test]
    fn unmounting_what_is_not_mounted_is_a_no_op() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!unmount(&dir.path().join("gone")).unwrap());
        // A fresh directory, never a mount point (unlike /tmp may be).
        let plain = dir.path().join("plain");
        fs::create_dir(&plain).unwrap();
        assert!(!unmount(&plain).unwrap());
        assert!(plain.exists(), "a directory with nothing mounted stays");
    }
}
