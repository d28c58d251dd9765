//! The host's shared directory, guest side: MountVirtioFs mounts a
//! virtio-fs device by its tag and checks that the host's virtiofsd
//! answers before the shim relies on it for container root file systems.

use std::{
    fmt, fs, io,
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    mount::{mount, umount2, MntFlags, MsFlags},
    sys::statfs::{statfs, FUSE_SUPER_MAGIC},
};
use runv_protocol::agent;

const VIRTIOFS: &str = "virtiofs";
/// One directory per virtio-fs device, with its `tag` (Linux 6.9 and later).
const VIRTIOFS_SYSFS: &str = "/sys/fs/virtiofs";
/// Entry names the agent logs (at debug level) once a share is mounted.
const LOGGED_NAMES: usize = 16;

/// A mounted and answering share.
#[derive(Debug)]
pub struct Mounted {
    /// It was mounted there already: the call changed nothing.
    pub already: bool,
    /// What the share's top directory holds (names, sorted).
    pub entries: Vec<String>,
}

#[derive(Debug)]
pub enum ShareError {
    InvalidRequest(String),
    MountPoint {
        path: PathBuf,
        source: io::Error,
    },
    MountTable(io::Error),
    /// Something other than this share is mounted at the mount point.
    Occupied {
        mount_point: PathBuf,
        fstype: String,
        source: String,
    },
    /// The VM has no virtio-fs device with this tag.
    NoSuchTag {
        tag: String,
        known: Vec<String>,
    },
    Mount {
        tag: String,
        mount_point: PathBuf,
        source: Errno,
    },
    /// Mounted, but it is not virtio-fs or the host does not answer.
    Unanswered {
        mount_point: PathBuf,
        why: String,
    },
}

impl fmt::Display for ShareError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShareError::InvalidRequest(why) => f.write_str(why),
            ShareError::MountPoint { path, source } => {
                write!(f, "cannot create mount point {}: {source}", path.display())
            }
            ShareError::MountTable(e) => write!(f, "cannot read /proc/self/mountinfo: {e}"),
            ShareError::Occupied {
                mount_point,
                fstype,
                source,
            } => write!(
                f,
                "{} already has {fstype} {source} mounted on it",
                mount_point.display()
            ),
            ShareError::NoSuchTag { tag, known } => write!(
                f,
                "the VM has no virtio-fs device tagged {tag:?} (it has {known:?}): the \
                 hypervisor was started without that shared directory"
            ),
            ShareError::Mount {
                tag,
                mount_point,
                source,
            } => write!(
                f,
                "mounting virtio-fs {tag:?} on {}: {source}",
                mount_point.display()
            ),
            ShareError::Unanswered { mount_point, why } => write!(
                f,
                "virtio-fs on {} does not answer: {why}",
                mount_point.display()
            ),
        }
    }
}

impl std::error::Error for ShareError {}

/// Serves MountVirtioFs (see agent.proto). Mounting and the first requests
/// wait on the host, so they run off the runtime's only thread.
pub async fn serve_mount(request: agent::MountVirtioFsRequest) -> ttrpc::Result<agent::Empty> {
    let tag = request.tag;
    let mount_point = PathBuf::from(request.mount_point);
    let mounted = {
        let (tag, mount_point) = (tag.clone(), mount_point.clone());
        tokio::task::spawn_blocking(move || mount_virtio_fs(&tag, &mount_point))
            .await
            .map_err(|e| status(ttrpc::Code::INTERNAL, format!("virtio-fs mount task: {e}")))?
            .map_err(share_status)?
    };
    tracing::info!(
        tag,
        mount_point = %mount_point.display(),
        entries = mounted.entries.len(),
        already = mounted.already,
        "virtio-fs share mounted"
    );
    let shown = &mounted.entries[..mounted.entries.len().min(LOGGED_NAMES)];
    tracing::debug!(tag, entries = ?shown, "virtio-fs share contents");
    Ok(agent::Empty::new())
}

fn status(code: ttrpc::Code, message: String) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
}

/// A share failure with the status code that says whose it is.
fn share_status(e: ShareError) -> ttrpc::Error {
    let code = match e {
        ShareError::InvalidRequest(_) => ttrpc::Code::INVALID_ARGUMENT,
        ShareError::Occupied { .. } => ttrpc::Code::FAILED_PRECONDITION,
        ShareError::NoSuchTag { .. } => ttrpc::Code::NOT_FOUND,
        ShareError::MountPoint { .. }
        | ShareError::MountTable(_)
        | ShareError::Mount { .. }
        | ShareError::Unanswered { .. } => ttrpc::Code::INTERNAL,
    };
    status(code, e.to_string())
}

/// Mounts virtio-fs `tag` on `mount_point` (created if missing) unless it
/// is mounted there already, then checks that it answers.
pub fn mount_virtio_fs(tag: &str, mount_point: &Path) -> Result<Mounted, ShareError> {
    if tag.is_empty() {
        return Err(ShareError::InvalidRequest(
            "the virtio-fs tag is empty".into(),
        ));
    }
    if !mount_point.is_absolute() {
        return Err(ShareError::InvalidRequest(format!(
            "the mount point {:?} is not an absolute path",
            mount_point
        )));
    }
    let mount_point_error = |source| ShareError::MountPoint {
        path: mount_point.to_owned(),
        source,
    };
    fs::create_dir_all(mount_point).map_err(mount_point_error)?;
    // The mount table lists resolved paths.
    let mount_point = fs::canonicalize(mount_point).map_err(mount_point_error)?;
    let table = fs::read_to_string("/proc/self/mountinfo").map_err(ShareError::MountTable)?;
    let already = match top_mount_at(&table, &mount_point) {
        Some(entry) if entry.fstype == VIRTIOFS && entry.source == tag => true,
        Some(entry) => {
            return Err(ShareError::Occupied {
                mount_point,
                fstype: entry.fstype,
                source: entry.source,
            })
        }
        None => false,
    };
    if !already {
        // The kernel answers an unknown tag with a bare EINVAL.
        if let Some(known) = device_tags(Path::new(VIRTIOFS_SYSFS)) {
            if !known.iter().any(|known| known == tag) {
                return Err(ShareError::NoSuchTag {
                    tag: tag.to_owned(),
                    known,
                });
            }
        }
        mount(
            Some(tag),
            &mount_point,
            Some(VIRTIOFS),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|source| ShareError::Mount {
            tag: tag.to_owned(),
            mount_point: mount_point.clone(),
            source,
        })?;
    }
    match list_answering_share(&mount_point) {
        Ok(entries) => Ok(Mounted { already, entries }),
        Err(why) => {
            // Leave the place as it was, so that a later call starts afresh.
            if !already {
                let _ = umount2(&mount_point, MntFlags::MNT_DETACH);
            }
            Err(ShareError::Unanswered { mount_point, why })
        }
    }
}

/// The tags of the guest's virtio-fs devices, as `sysfs` lists them; None
/// when the kernel does not list them.
fn device_tags(sysfs: &Path) -> Option<Vec<String>> {
    let devices = fs::read_dir(sysfs).ok()?;
    let mut tags: Vec<String> = devices
        .flatten()
        .filter_map(|device| fs::read_to_string(device.path().join("tag")).ok())
        .map(|tag| tag.trim_end().to_owned())
        .collect();
    tags.sort();
    Some(tags)
}

/// The names in a virtio-fs mount's top directory. Both the statfs and the
/// listing are requests to the host's virtiofsd.
fn list_answering_share(mount_point: &Path) -> Result<Vec<String>, String> {
    let fs_stat = statfs(mount_point).map_err(|e| format!("statfs: {e}"))?;
    if fs_stat.filesystem_type() != FUSE_SUPER_MAGIC {
        return Err(format!(
            "statfs reports file system type {:#x}, not FUSE (virtio-fs)",
            fs_stat.filesystem_type().0
        ));
    }
    let mut names = fs::read_dir(mount_point)
        .and_then(|entries| {
            entries
                .map(|entry| entry.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<io::Result<Vec<_>>>()
        })
        .map_err(|e| format!("listing it: {e}"))?;
    names.sort();
    Ok(names)
}

/// A line of /proc/self/mountinfo, as far as it matters here.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct MountEntry {
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// The topmost mount at `path` in a mountinfo `table`: the last one listed
/// there, as a later mount hides an earlier one.
pub(crate) fn top_mount_at(table: &str, path: &Path) -> Option<MountEntry> {
    table
        .lines()
        .rev()
        .filter_map(parse_mountinfo_line)
        .find(|entry| entry.mount_point == path)
}

/// `id parent major:minor root mount-point options [optional...] - fstype
/// source super-options`, see proc(5).
fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    let (mount_fields, fs_fields) = line.split_once(" - ")?;
    let mount_point = mount_fields.split(' ').nth(4)?;
    let mut fs_fields = fs_fields.split(' ');
    Some(MountEntry {
        mount_point: PathBuf::from(unescape(mount_point)),
        fstype: unescape(fs_fields.next()?),
        source: unescape(fs_fields.next()?),
    })
}

/// The kernel writes space, tab, newline and backslash as `\ooo` octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            let text = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
22 1 0:20 / /run rw,nosuid,nodev shared:5 - tmpfs tmpfs rw
30 22 0:27 / /run/runv/shared rw,relatime - virtiofs runv-shared rw
31 22 0:28 / /run/other rw - tmpfs tmpfs rw
32 31 0:29 / /run/other rw - virtiofs other-tag rw
33 22 0:30 / /run/with\\040space rw - virtiofs runv-shared rw
";

    #[test]
    fn finds_the_topmost_mount_at_a_path() {
        assert_eq!(
            top_mount_at(TABLE, Path::new("/run/runv/shared")),
            Some(MountEntry {
                mount_point: "/run/runv/shared".into(),
                fstype: "virtiofs".into(),
                source: "runv-shared".into(),
            })
        );
        let over = top_mount_at(TABLE, Path::new("/run/other")).unwrap();
        assert_eq!(
            (over.fstype.as_str(), over.source.as_str()),
            ("virtiofs", "other-tag")
        );
        assert!(top_mount_at(TABLE, Path::new("/run/with space")).is_some());
        assert_eq!(top_mount_at(TABLE, Path::new("/run/runv")), None);
        assert_eq!(top_mount_at("garbage\n\n", Path::new("/run")), None);
    }

    #[test]
    fn device_tags_are_read_from_sysfs() {
        let sysfs =
            std::env::temp_dir().join(format!("runv-agent-virtiofs-{}", std::process::id()));
        for (device, tag) in [("1", "runv-shared\n"), ("0", "volumes\n")] {
            fs::create_dir_all(sysfs.join(device)).unwrap();
            fs::write(sysfs.join(device).join("tag"), tag).unwrap();
        }
        let tags = device_tags(&sysfs);
        fs::remove_dir_all(&sysfs).unwrap();
        assert_eq!(tags, Some(vec!["runv-shared".into(), "volumes".into()]));
        assert_eq!(device_tags(&sysfs), None, "an older kernel lists none");
    }

    #[test]
    fn octal_escapes_are_decoded() {
        assert_eq!(unescape("a\\040b\\011c\\134d"), "a b\tc\\d");
        assert_eq!(unescape("plain"), "plain");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
    }

    #[test]
    fn bad_requests_are_refused_before_touching_anything() {
        let err = mount_virtio_fs("", Path::new("/run/x")).unwrap_err();
        assert!(matches!(err, ShareError::InvalidRequest(_)), "{err}");
        let err = mount_virtio_fs("tag", Path::new("relative/dir")).unwrap_err();
        assert!(err.to_string().contains("not an absolute path"), "{err}");
        assert!(!Path::new("relative").exists());
    }

    #[test]
    fn a_directory_that_is_not_virtio_fs_does_not_pass_as_one() {
        let dir = std::env::temp_dir();
        let err = list_answering_share(&dir).unwrap_err();
        assert!(err.contains("not FUSE (virtio-fs)"), "{err}");
    }

    #[test]
    fn failures_carry_the_status_code_that_says_whose_they_are() {
        let code = |e| match share_status(e) {
            ttrpc::Error::RpcStatus(status) => status.code(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            code(ShareError::NoSuchTag {
                tag: "t".into(),
                known: vec![],
            }),
            ttrpc::Code::NOT_FOUND
        );
        assert_eq!(
            code(ShareError::InvalidRequest("x".into())),
            ttrpc::Code::INVALID_ARGUMENT
        );
        assert_eq!(
            code(ShareError::Occupied {
                mount_point: "/m".into(),
                fstype: "tmpfs".into(),
                source: "tmpfs".into(),
            }),
            ttrpc::Code::FAILED_PRECONDITION
        );
    }
}
