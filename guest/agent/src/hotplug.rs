//! Virtio-mmio hot-plug, guest side. The VMM declares its device slots on
//! the kernel command line as platform devices `virtio-mmio.<slot>`. An
//! empty slot fails the driver's probe (device ID 0) and stays unbound.
//! Plugging binds the slot to the virtio-mmio driver, whose new probe
//! registers the virtio device the host has put there; unplugging unbinds
//! it, which removes that device. A virtio-blk disk is plugged once its
//! block device node exists in /dev (devtmpfs). See docs/hotplug.md.

use std::{
    fmt, fs, io,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

/// How long a plug waits for the virtio device, and for a disk its block
/// device node, to appear.
pub const PLUG_TIMEOUT: Duration = Duration::from_secs(5);
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// The virtio device ID of a block device.
const VIRTIO_ID_BLOCK: u32 = 2;

/// The virtio device found in a slot.
#[derive(Debug, PartialEq, Eq)]
pub struct PluggedDevice {
    /// `virtio<N>`.
    pub name: String,
    pub device_id: u32,
    /// The virtio driver bound to it, if any.
    pub driver: Option<String>,
    /// For a disk the driver took, its block device node (`/dev/vdb`).
    pub block_device: Option<PathBuf>,
}

#[derive(Debug)]
pub enum HotplugError {
    NoSuchSlot {
        slot: u32,
    },
    EmptySlot {
        slot: u32,
    },
    Bind {
        slot: u32,
        source: io::Error,
    },
    Unbind {
        slot: u32,
        source: io::Error,
    },
    Read {
        path: PathBuf,
        source: io::Error,
    },
    Timeout {
        slot: u32,
        waited: Duration,
    },
    /// A disk whose block device, or its node, did not appear.
    NoBlockDevice {
        slot: u32,
        device: String,
        waiting_for: String,
        waited: Duration,
    },
}

impl fmt::Display for HotplugError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HotplugError::NoSuchSlot { slot } => write!(
                f,
                "there is no {}: the VM declared fewer virtio-mmio slots on the kernel command line",
                platform_device_name(*slot)
            ),
            HotplugError::EmptySlot { slot } => write!(
                f,
                "{} is empty: the driver's probe found no device (ID 0); the host must attach \
                 the device before asking the guest to plug it",
                platform_device_name(*slot)
            ),
            HotplugError::Bind { slot, source } => write!(
                f,
                "binding {} to the virtio-mmio driver: {source}",
                platform_device_name(*slot)
            ),
            HotplugError::Unbind { slot, source } => write!(
                f,
                "unbinding {} from the virtio-mmio driver: {source}",
                platform_device_name(*slot)
            ),
            HotplugError::Read { path, source } => write!(f, "reading {}: {source}", path.display()),
            HotplugError::Timeout { slot, waited } => write!(
                f,
                "{} is bound but no virtio device appeared under it within {waited:?}",
                platform_device_name(*slot)
            ),
            HotplugError::NoBlockDevice {
                slot,
                device,
                waiting_for,
                waited,
            } => write!(
                f,
                "the virtio-blk disk {device} in {} has no {waiting_for} after {waited:?}",
                platform_device_name(*slot)
            ),
        }
    }
}

impl std::error::Error for HotplugError {}

/// The guest kernel's name for slot `slot`.
pub fn platform_device_name(slot: u32) -> String {
    format!("virtio-mmio.{slot}")
}

/// The platform bus in sysfs, and where device nodes appear.
pub struct PlatformBus {
    root: PathBuf,
    dev: PathBuf,
}

impl PlatformBus {
    /// The guest's own.
    pub fn system() -> PlatformBus {
        PlatformBus::at("/sys/bus/platform", "/dev")
    }

    fn at(root: impl Into<PathBuf>, dev: impl Into<PathBuf>) -> PlatformBus {
        PlatformBus {
            root: root.into(),
            dev: dev.into(),
        }
    }

    fn device_dir(&self, slot: u32) -> PathBuf {
        self.root.join("devices").join(platform_device_name(slot))
    }

    fn driver_control(&self, action: &str) -> PathBuf {
        self.root.join("drivers/virtio-mmio").join(action)
    }

    /// The slot's platform device directory, which must exist, and whether
    /// a driver is bound to it.
    fn slot(&self, slot: u32) -> Result<(PathBuf, bool), HotplugError> {
        let dir = self.device_dir(slot);
        if !dir.exists() {
            return Err(HotplugError::NoSuchSlot { slot });
        }
        // The kernel links `driver` to the bound driver.
        let bound = dir.join("driver").symlink_metadata().is_ok();
        Ok((dir, bound))
    }

    /// Binds `slot` unless it is bound already, then waits up to `timeout`
    /// for its virtio device and, for a disk the virtio-blk driver took,
    /// for its block device node.
    pub fn plug(&self, slot: u32, timeout: Duration) -> Result<PluggedDevice, HotplugError> {
        let (dir, bound) = self.slot(slot)?;
        if !bound {
            fs::write(self.driver_control("bind"), platform_device_name(slot))
                .map_err(|e| bind_error(slot, e))?;
        }
        // The probe registers the virtio device before the write returns;
        // the wait covers its sysfs entries still being filled in.
        let start = Instant::now();
        let mut device = loop {
            if let Some(device) = find_virtio_device(&dir)? {
                break device;
            }
            if start.elapsed() >= timeout {
                return Err(HotplugError::Timeout {
                    slot,
                    waited: start.elapsed(),
                });
            }
            thread::sleep(POLL_INTERVAL);
        };
        if device.device_id == VIRTIO_ID_BLOCK && device.driver.is_some() {
            device.block_device =
                Some(self.wait_for_block_device(slot, &dir, &device.name, start, timeout)?);
        }
        Ok(device)
    }

    /// The node of the disk registered under virtio device `name`, once
    /// devtmpfs has created it: the disk shows in sysfs as
    /// `<virtio device>/block/<vdX>`, its node as `/dev/<vdX>`.
    fn wait_for_block_device(
        &self,
        slot: u32,
        platform_device: &Path,
        name: &str,
        start: Instant,
        timeout: Duration,
    ) -> Result<PathBuf, HotplugError> {
        let block_dir = platform_device.join(name).join("block");
        loop {
            let disk = match fs::read_dir(&block_dir) {
                Ok(mut entries) => entries
                    .next()
                    .transpose()
                    .map_err(|source| HotplugError::Read {
                        path: block_dir.clone(),
                        source,
                    })?
                    .map(|entry| entry.file_name().to_string_lossy().into_owned()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(source) => {
                    return Err(HotplugError::Read {
                        path: block_dir,
                        source,
                    })
                }
            };
            let node = disk.as_ref().map(|disk| self.dev.join(disk));
            if let Some(node) = &node {
                if node.exists() {
                    return Ok(node.clone());
                }
            }
            if start.elapsed() >= timeout {
                let waiting_for = match node {
                    Some(node) => format!("device node {}", node.display()),
                    None => format!("block device in {}", block_dir.display()),
                };
                return Err(HotplugError::NoBlockDevice {
                    slot,
                    device: name.to_owned(),
                    waiting_for,
                    waited: start.elapsed(),
                });
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Unbinds `slot` if it is bound.
    pub fn unplug(&self, slot: u32) -> Result<(), HotplugError> {
        let (_, bound) = self.slot(slot)?;
        if bound {
            fs::write(self.driver_control("unbind"), platform_device_name(slot))
                .map_err(|source| HotplugError::Unbind { slot, source })?;
        }
        Ok(())
    }
}

/// ENODEV from a bind is the probe finding device ID 0.
fn bind_error(slot: u32, source: io::Error) -> HotplugError {
    if source.raw_os_error() == Some(nix::errno::Errno::ENODEV as i32) {
        HotplugError::EmptySlot { slot }
    } else {
        HotplugError::Bind { slot, source }
    }
}

/// The virtio device registered under a platform device, once its
/// `device` attribute can be read.
fn find_virtio_device(platform_device: &Path) -> Result<Option<PluggedDevice>, HotplugError> {
    let read_error = |path: &Path| {
        let path = path.to_owned();
        move |source| HotplugError::Read { path, source }
    };
    let entries = fs::read_dir(platform_device).map_err(read_error(platform_device))?;
    for entry in entries {
        let entry = entry.map_err(read_error(platform_device))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_virtio_device_name(&name) {
            continue;
        }
        let id_path = entry.path().join("device");
        let id_text = match fs::read_to_string(&id_path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(read_error(&id_path)(e)),
        };
        let device_id = parse_device_id(&id_text).ok_or_else(|| HotplugError::Read {
            path: id_path.clone(),
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not a device ID: {id_text:?}"),
            ),
        })?;
        let driver = fs::read_link(entry.path().join("driver"))
            .ok()
            .and_then(|target| Some(target.file_name()?.to_string_lossy().into_owned()));
        return Ok(Some(PluggedDevice {
            name,
            device_id,
            driver,
            block_device: None,
        }));
    }
    Ok(None)
}

/// `virtio<N>`, as the virtio core names its devices.
fn is_virtio_device_name(name: &str) -> bool {
    name.strip_prefix("virtio")
        .is_some_and(|index| !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()))
}

/// The virtio core shows device IDs as `0x%04x`.
fn parse_device_id(text: &str) -> Option<u32> {
    u32::from_str_radix(text.trim().strip_prefix("0x")?, 16).ok()
}

#[cfg(test)]
mod tests {
    use std::{
        os::unix::fs::symlink,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use super::*;

    /// A platform bus tree in a temporary directory, removed on drop.
    struct FakeBus {
        root: PathBuf,
    }

    impl FakeBus {
        /// With the virtio-mmio driver and platform devices for `slots`.
        fn new(slots: u32) -> FakeBus {
            static COUNT: AtomicUsize = AtomicUsize::new(0);
            let root = std::env::temp_dir().join(format!(
                "runv-agent-hotplug-{}-{}",
                std::process::id(),
                COUNT.fetch_add(1, Ordering::SeqCst)
            ));
            fs::create_dir_all(root.join("drivers/virtio-mmio")).unwrap();
            for slot in 0..slots {
                fs::create_dir_all(root.join("devices").join(platform_device_name(slot))).unwrap();
            }
            FakeBus { root }
        }

        fn bus(&self) -> PlatformBus {
            PlatformBus::at(&self.root, self.root.join("dev"))
        }

        /// Registers disk `disk` under virtio device `name` of `slot`, and
        /// with `node` its node in the fake /dev.
        fn add_disk(&self, slot: u32, name: &str, disk: &str, node: bool) {
            let dir = self
                .root
                .join("devices")
                .join(platform_device_name(slot))
                .join(name)
                .join("block")
                .join(disk);
            fs::create_dir_all(dir).unwrap();
            if node {
                fs::create_dir_all(self.root.join("dev")).unwrap();
                fs::write(self.root.join("dev").join(disk), "").unwrap();
            }
        }

        /// What was written to the driver's `bind` or `unbind`.
        fn written(&self, action: &str) -> Option<String> {
            fs::read_to_string(self.root.join("drivers/virtio-mmio").join(action)).ok()
        }

        /// Marks `slot` bound, as the kernel does with a `driver` link.
        fn bind(&self, slot: u32) {
            symlink(
                "../../../bus/platform/drivers/virtio-mmio",
                self.root
                    .join("devices")
                    .join(platform_device_name(slot))
                    .join("driver"),
            )
            .unwrap();
        }

        /// Registers virtio device `name` with `id_text` under `slot`.
        fn add_virtio_device(&self, slot: u32, name: &str, id_text: &str) {
            let dir = self
                .root
                .join("devices")
                .join(platform_device_name(slot))
                .join(name);
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("device"), id_text).unwrap();
            symlink("../../../bus/virtio/drivers/virtio_blk", dir.join("driver")).unwrap();
        }
    }

    impl Drop for FakeBus {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    #[test]
    fn names_and_device_ids_are_read_as_the_kernel_writes_them() {
        assert_eq!(platform_device_name(7), "virtio-mmio.7");
        assert!(is_virtio_device_name("virtio0"));
        assert!(is_virtio_device_name("virtio12"));
        for other in ["virtio", "virtio-mmio.1", "driver", "virtio1a", "subsystem"] {
            assert!(!is_virtio_device_name(other), "{other}");
        }
        assert_eq!(parse_device_id("0x0013\n"), Some(19));
        assert_eq!(parse_device_id("0x0002"), Some(2));
        assert_eq!(parse_device_id("19"), None);
        assert_eq!(parse_device_id("0xzz"), None);
    }

    #[test]
    fn plug_binds_the_slot_and_reports_its_virtio_device() {
        let fake = FakeBus::new(4);
        fake.add_virtio_device(3, "virtio1", "0x0002\n");
        fake.add_disk(3, "virtio1", "vdb", true);
        let device = fake.bus().plug(3, PLUG_TIMEOUT).unwrap();
        assert_eq!(fake.written("bind").as_deref(), Some("virtio-mmio.3"));
        assert_eq!(
            device,
            PluggedDevice {
                name: "virtio1".into(),
                device_id: 2,
                driver: Some("virtio_blk".into()),
                block_device: Some(fake.root.join("dev/vdb")),
            }
        );
    }

    #[test]
    fn a_disk_is_plugged_once_its_node_exists() {
        let fake = FakeBus::new(1);
        fake.add_virtio_device(0, "virtio2", "0x0002\n");
        let err = fake.bus().plug(0, Duration::from_millis(30)).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("the virtio-blk disk virtio2 in virtio-mmio.0 has no block device in"),
            "{err}"
        );
        fake.add_disk(0, "virtio2", "vdc", false);
        let err = fake.bus().plug(0, Duration::from_millis(30)).unwrap_err();
        assert!(
            matches!(&err, HotplugError::NoBlockDevice { waiting_for, .. }
                if waiting_for.ends_with("dev/vdc")),
            "{err}"
        );
        fs::create_dir_all(fake.root.join("dev")).unwrap();
        fs::write(fake.root.join("dev/vdc"), "").unwrap();
        let device = fake.bus().plug(0, Duration::from_millis(30)).unwrap();
        assert_eq!(device.block_device, Some(fake.root.join("dev/vdc")));
    }

    #[test]
    fn plugging_a_bound_slot_only_reports_its_device() {
        let fake = FakeBus::new(1);
        fake.bind(0);
        fake.add_virtio_device(0, "virtio0", "0x0013\n");
        let device = fake.bus().plug(0, PLUG_TIMEOUT).unwrap();
        assert_eq!(device.device_id, 19);
        assert_eq!(device.block_device, None, "not a disk");
        assert_eq!(fake.written("bind"), None, "no second bind");
    }

    #[test]
    fn plug_gives_up_when_no_virtio_device_appears() {
        let fake = FakeBus::new(2);
        let err = fake.bus().plug(1, Duration::from_millis(30)).unwrap_err();
        assert!(
            matches!(err, HotplugError::Timeout { slot: 1, .. }),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("virtio-mmio.1 is bound but no virtio device"),
            "{err}"
        );
    }

    #[test]
    fn slots_the_vm_did_not_declare_are_refused() {
        let fake = FakeBus::new(2);
        let err = fake.bus().plug(5, PLUG_TIMEOUT).unwrap_err();
        assert!(
            err.to_string().starts_with("there is no virtio-mmio.5"),
            "{err}"
        );
        assert!(matches!(
            fake.bus().unplug(5),
            Err(HotplugError::NoSuchSlot { slot: 5 })
        ));
    }

    #[test]
    fn an_empty_slot_is_named_as_such() {
        let enodev = io::Error::from_raw_os_error(nix::errno::Errno::ENODEV as i32);
        let err = bind_error(2, enodev);
        assert!(
            err.to_string().starts_with("virtio-mmio.2 is empty"),
            "{err}"
        );
        let eio = io::Error::from_raw_os_error(nix::errno::Errno::EIO as i32);
        assert!(matches!(
            bind_error(2, eio),
            HotplugError::Bind { slot: 2, .. }
        ));
    }

    #[test]
    fn unplug_unbinds_only_a_bound_slot() {
        let fake = FakeBus::new(2);
        fake.bus().unplug(1).unwrap();
        assert_eq!(fake.written("unbind"), None, "nothing to unbind");
        fake.bind(1);
        fake.bus().unplug(1).unwrap();
        assert_eq!(fake.written("unbind").as_deref(), Some("virtio-mmio.1"));
    }
}
