//! The host side of VF passthrough: a PCI function (an SR-IOV VF whose
//! netdev CNI put in the pod's namespace) taken from its host driver and
//! bound to vfio-pci for the VM, and given back afterwards.
//!
//! Everything goes through sysfs (and /dev/vfio), behind [`Sysfs`], whose
//! root tests point at a fake tree: the hardware (IOMMU, SR-IOV NIC) is
//! rarely at hand, and what matters is which files get which writes.

use std::{
    fmt, fs, io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::io_detail;

/// The driver a passed function is bound to.
pub const VFIO_PCI: &str = "vfio-pci";

/// How often [`Sysfs::wait_for_netdev`] looks.
const NETDEV_POLL: Duration = Duration::from_millis(20);

/// A failed step on a PCI function, with the system's reason and the fix.
#[derive(Debug, Clone, thiserror::Error)]
#[error("PCI function {bdf}: cannot {operation}: {detail}")]
pub struct VfioError {
    pub bdf: String,
    pub operation: String,
    pub detail: String,
}

/// The host's `/sys` and `/dev/vfio`.
#[derive(Debug, Clone)]
pub struct Sysfs {
    sys: PathBuf,
    dev_vfio: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Sysfs::at("/sys", "/dev/vfio")
    }
}

/// A function bound to vfio-pci for the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassedFunction {
    /// `0000:3b:02.1`.
    pub bdf: String,
    /// `/sys/bus/pci/devices/<bdf>`, as the VMM takes it.
    pub sysfs_path: PathBuf,
    /// The driver it had (iavf, mlx5_core, ...), reprobed at give-back.
    pub host_driver: Option<String>,
    pub iommu_group: String,
}

impl fmt::Display for PassedFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (IOMMU group {})", self.bdf, self.iommu_group)
    }
}

impl Sysfs {
    /// Sysfs mounted at `sys`, VFIO group devices under `dev_vfio`.
    pub fn at(sys: impl Into<PathBuf>, dev_vfio: impl Into<PathBuf>) -> Sysfs {
        Sysfs {
            sys: sys.into(),
            dev_vfio: dev_vfio.into(),
        }
    }

    fn device(&self, bdf: &str) -> PathBuf {
        self.sys.join("bus/pci/devices").join(bdf)
    }

    fn driver_dir(&self, driver: &str) -> PathBuf {
        self.sys.join("bus/pci/drivers").join(driver)
    }

    /// Whether `bdf` is an SR-IOV VF: only VFs link to their physical function.
    pub fn is_vf(&self, bdf: &str) -> bool {
        self.device(bdf).join("physfn").symlink_metadata().is_ok()
    }

    /// The driver `bdf` is bound to, None if none.
    fn driver(&self, bdf: &str) -> Result<Option<String>, VfioError> {
        match fs::read_link(self.device(bdf).join("driver")) {
            Ok(target) => Ok(file_name(&target)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(error(bdf, "read its driver link", io_detail(&e))),
        }
    }

    /// Writes `value` to an existing sysfs attribute (never creates one: a
    /// missing attribute is a kernel without the feature, or a wrong path).
    fn write(&self, bdf: &str, path: &Path, value: &str) -> Result<(), VfioError> {
        fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)
            .and_then(|mut file| io::Write::write_all(&mut file, value.as_bytes()))
            .map_err(|e| {
                error(
                    bdf,
                    &format!("write {value:?} to {}", path.display()),
                    io_detail(&e),
                )
            })
    }

    /// Checks, changing nothing, that `bdf` can be passed through: vfio-pci
    /// is loaded, the function has an IOMMU group whose other functions
    /// are free, and it is not bound to vfio-pci already.
    pub fn check_passable(&self, bdf: &str) -> Result<PassedFunction, VfioError> {
        if !self.driver_dir(VFIO_PCI).is_dir() {
            return Err(error(
                bdf,
                "bind it to vfio-pci",
                "vfio-pci is not loaded: modprobe vfio-pci".into(),
            ));
        }
        let iommu_group = self.iommu_group(bdf)?;
        self.check_group_is_free(bdf, &iommu_group)?;
        let host_driver = self.driver(bdf)?;
        if host_driver.as_deref() == Some(VFIO_PCI) {
            return Err(error(
                bdf,
                "take it for the VM",
                "it is bound to vfio-pci already: another VM may hold it".into(),
            ));
        }
        Ok(PassedFunction {
            bdf: bdf.to_owned(),
            sysfs_path: Path::new("/sys/bus/pci/devices").join(bdf),
            host_driver,
            iommu_group,
        })
    }

    /// Unbinds `function` from its host driver, which takes its netdev
    /// away. On error nothing changed.
    pub fn unbind_host_driver(&self, function: &PassedFunction) -> Result<(), VfioError> {
        let Some(driver) = &function.host_driver else {
            return Ok(());
        };
        let bdf = function.bdf.as_str();
        self.write(bdf, &self.device(bdf).join("driver/unbind"), bdf)
            .map_err(|e| VfioError {
                operation: format!("unbind it from {driver} ({})", e.operation),
                ..e
            })
    }

    /// Binds the unbound `function` to vfio-pci. On error it is given
    /// back to its host driver ([`Sysfs::give_back`]).
    pub fn bind_vfio(&self, function: &PassedFunction) -> Result<(), VfioError> {
        let bdf = function.bdf.as_str();
        // driver_override makes vfio-pci the only driver that may take it,
        // so that a probe racing with ours cannot give it back to the host.
        let bound = self
            .write(bdf, &self.device(bdf).join("driver_override"), VFIO_PCI)
            .and_then(|()| self.write(bdf, &self.driver_dir(VFIO_PCI).join("bind"), bdf))
            .and_then(|()| self.check_group_device(function));
        if let Err(e) = &bound {
            tracing::warn!(error = %e, "giving the function back after a failed bind");
            if let Err(undo) = self.give_back(function) {
                tracing::warn!(error = %undo, "cannot give a function back after a failed bind");
            }
        }
        bound
    }

    /// The IOMMU group of `bdf`: its number.
    fn iommu_group(&self, bdf: &str) -> Result<String, VfioError> {
        fs::read_link(self.device(bdf).join("iommu_group"))
            .ok()
            .and_then(|target| file_name(&target))
            .ok_or_else(|| {
                error(
                    bdf,
                    "find its IOMMU group",
                    "no IOMMU group: the host's IOMMU is off; boot it with intel_iommu=on \
                     (or amd_iommu=on) and enable VT-d/AMD-Vi in the firmware"
                        .into(),
                )
            })
    }

    /// Every other function of the group must be bound to vfio-pci or to
    /// nothing: the VM gets the whole group, and VFIO refuses a group in
    /// which a host driver still owns a function.
    fn check_group_is_free(&self, bdf: &str, group: &str) -> Result<(), VfioError> {
        let devices = self
            .sys
            .join("kernel/iommu_groups")
            .join(group)
            .join("devices");
        let entries = fs::read_dir(&devices).map_err(|e| {
            error(
                bdf,
                &format!("list IOMMU group {group} ({})", devices.display()),
                io_detail(&e),
            )
        })?;
        let mut others: Vec<String> = entries
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|other| other != bdf)
            .collect();
        others.sort();
        for other in others {
            if let Some(driver) = self.driver(&other)?.filter(|d| d != VFIO_PCI) {
                return Err(error(
                    bdf,
                    "give its IOMMU group to the VM",
                    format!(
                        "function {other} in the same IOMMU group {group} is bound to driver \
                         {driver}; the VM takes the whole group: unbind it (echo {other} > \
                         /sys/bus/pci/devices/{other}/driver/unbind), or use a VF that is \
                         alone in its group (ACS on the PCIe path)"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The group's VFIO device appears once a function of it is bound to
    /// vfio-pci; the VMM opens it.
    fn check_group_device(&self, function: &PassedFunction) -> Result<(), VfioError> {
        let path = self.dev_vfio.join(&function.iommu_group);
        if path.exists() {
            return Ok(());
        }
        Err(error(
            &function.bdf,
            &format!("find {}", path.display()),
            "vfio-pci took the function but its group has no VFIO device; is /dev mounted \
             with devtmpfs, and vfio loaded (modprobe vfio)?"
                .into(),
        ))
    }

    /// Unbinds `function` from vfio-pci, clears its driver_override and has
    /// the kernel probe it again, which gives it to its host driver. Every
    /// step runs even if one before failed; the first failure is returned.
    pub fn give_back(&self, function: &PassedFunction) -> Result<(), VfioError> {
        let bdf = function.bdf.as_str();
        let device = self.device(bdf);
        let mut first_error = None;
        let mut step = |result: Result<(), VfioError>| {
            if let Err(e) = result {
                tracing::warn!(error = %e, "giving a PCI function back to the host");
                first_error.get_or_insert(e);
            }
        };
        match self.driver(bdf) {
            Ok(Some(driver)) if driver == VFIO_PCI => {
                step(self.write(bdf, &self.driver_dir(VFIO_PCI).join("unbind"), bdf))
            }
            Ok(_) => {}
            Err(e) => step(Err(e)),
        }
        // A lone newline clears the override.
        step(self.write(bdf, &device.join("driver_override"), "\n"));
        if function.host_driver.is_some() {
            step(self.write(bdf, &self.sys.join("bus/pci/drivers_probe"), bdf));
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The netdev of `bdf` once its host driver has made one (in the host's
    /// namespace), waiting at most `timeout`.
    pub fn wait_for_netdev(&self, bdf: &str, timeout: Duration) -> Result<HostNetdev, VfioError> {
        let net = self.device(bdf).join("net");
        let deadline = Instant::now() + timeout;
        loop {
            // The index, not the name, identifies it: udev may rename it.
            let netdev = fs::read_dir(&net).ok().and_then(|entries| {
                entries.filter_map(|entry| entry.ok()).find_map(|entry| {
                    let index = fs::read_to_string(entry.path().join("ifindex")).ok()?;
                    Some(HostNetdev {
                        name: entry.file_name().into_string().ok()?,
                        index: index.trim().parse().ok()?,
                    })
                })
            });
            if let Some(netdev) = netdev {
                return Ok(netdev);
            }
            if Instant::now() >= deadline {
                return Err(error(
                    bdf,
                    "find its network interface after giving it back",
                    format!(
                        "{} has no interface after {timeout:?}: is its host driver loaded?",
                        net.display()
                    ),
                ));
            }
            std::thread::sleep(NETDEV_POLL);
        }
    }
}

/// A function's network interface in the host's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostNetdev {
    pub name: String,
    pub index: u32,
}

fn error(bdf: &str, operation: &str, detail: String) -> VfioError {
    VfioError {
        bdf: bdf.to_owned(),
        operation: operation.to_owned(),
        detail,
    }
}

fn file_name(path: &Path) -> Option<String> {
    path.file_name()?.to_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    const VF: &str = "0000:3b:02.1";

    /// A fake of the sysfs of a host with one VF of an iavf NIC, in IOMMU
    /// group 42, and vfio-pci loaded. Attribute files are plain files that
    /// record the last write.
    struct FakeHost {
        dir: tempfile::TempDir,
    }

    impl FakeHost {
        fn new() -> FakeHost {
            let host = FakeHost {
                dir: tempfile::tempdir().unwrap(),
            };
            for driver in ["iavf", VFIO_PCI, "nvme"] {
                host.file(&format!("sys/bus/pci/drivers/{driver}/bind"));
                host.file(&format!("sys/bus/pci/drivers/{driver}/unbind"));
            }
            host.file("sys/bus/pci/drivers_probe");
            fs::create_dir_all(host.path("dev/vfio")).unwrap();
            host.function(VF, Some("iavf"), "42");
            symlink(
                "../../../0000:3b:00.0",
                host.path(&format!("sys/bus/pci/devices/{VF}/physfn")),
            )
            .unwrap();
            host
        }

        fn path(&self, relative: &str) -> PathBuf {
            self.dir.path().join(relative)
        }

        fn file(&self, relative: &str) {
            let path = self.path(relative);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, "").unwrap();
        }

        fn read(&self, relative: &str) -> String {
            fs::read_to_string(self.path(relative)).unwrap()
        }

        /// A function bound to `driver`, in IOMMU `group`.
        fn function(&self, bdf: &str, driver: Option<&str>, group: &str) {
            let device = format!("sys/bus/pci/devices/{bdf}");
            self.file(&format!("{device}/driver_override"));
            if let Some(driver) = driver {
                symlink(
                    format!("../../drivers/{driver}"),
                    self.path(&format!("{device}/driver")),
                )
                .unwrap();
            }
            let members = self.path(&format!("sys/kernel/iommu_groups/{group}/devices"));
            fs::create_dir_all(&members).unwrap();
            symlink(
                format!("../../../../bus/pci/devices/{bdf}"),
                members.join(bdf),
            )
            .unwrap();
            symlink(
                format!("../../../../kernel/iommu_groups/{group}"),
                self.path(&format!("{device}/iommu_group")),
            )
            .unwrap();
        }

        /// What the kernel does when vfio-pci takes a function of `group`.
        fn group_device(&self, group: &str) {
            fs::write(self.path(&format!("dev/vfio/{group}")), "").unwrap();
        }

        /// What the kernel does on unbind or bind: the driver link moves.
        fn rebind(&self, bdf: &str, driver: &str) {
            let link = self.path(&format!("sys/bus/pci/devices/{bdf}/driver"));
            let _ = fs::remove_file(&link);
            symlink(format!("../../drivers/{driver}"), link).unwrap();
        }

        fn sysfs(&self) -> Sysfs {
            Sysfs::at(self.path("sys"), self.path("dev/vfio"))
        }
    }

    /// The three steps of taking a function, as the pod network does.
    fn pass(sysfs: &Sysfs, bdf: &str) -> Result<PassedFunction, VfioError> {
        let function = sysfs.check_passable(bdf)?;
        sysfs.unbind_host_driver(&function)?;
        sysfs.bind_vfio(&function)?;
        Ok(function)
    }

    #[test]
    fn a_vf_is_unbound_overridden_and_bound_to_vfio_pci() {
        let host = FakeHost::new();
        host.group_device("42");
        let sysfs = host.sysfs();
        assert!(sysfs.is_vf(VF));
        let function = pass(&sysfs, VF).unwrap();
        assert_eq!(
            function,
            PassedFunction {
                bdf: VF.into(),
                sysfs_path: PathBuf::from(format!("/sys/bus/pci/devices/{VF}")),
                host_driver: Some("iavf".into()),
                iommu_group: "42".into(),
            }
        );
        assert_eq!(host.read("sys/bus/pci/drivers/iavf/unbind"), VF);
        assert_eq!(
            host.read(&format!("sys/bus/pci/devices/{VF}/driver_override")),
            "vfio-pci"
        );
        assert_eq!(host.read("sys/bus/pci/drivers/vfio-pci/bind"), VF);
        assert_eq!(host.read("sys/bus/pci/drivers_probe"), "", "no reprobe");
    }

    #[test]
    fn give_back_unbinds_clears_the_override_and_reprobes() {
        let host = FakeHost::new();
        host.group_device("42");
        let sysfs = host.sysfs();
        let function = pass(&sysfs, VF).unwrap();
        host.rebind(VF, VFIO_PCI);
        host.file(&format!("sys/bus/pci/devices/{VF}/net/ens1f0v1/ifindex"));
        fs::write(
            host.path(&format!("sys/bus/pci/devices/{VF}/net/ens1f0v1/ifindex")),
            "17\n",
        )
        .unwrap();
        sysfs.give_back(&function).unwrap();
        assert_eq!(host.read("sys/bus/pci/drivers/vfio-pci/unbind"), VF);
        assert_eq!(
            host.read(&format!("sys/bus/pci/devices/{VF}/driver_override")),
            "\n"
        );
        assert_eq!(host.read("sys/bus/pci/drivers_probe"), VF);
        assert_eq!(
            sysfs.wait_for_netdev(VF, Duration::from_secs(1)).unwrap(),
            HostNetdev {
                name: "ens1f0v1".into(),
                index: 17
            }
        );
    }

    #[test]
    fn give_back_runs_every_step_and_reports_the_first_failure() {
        let host = FakeHost::new();
        host.group_device("42");
        let sysfs = host.sysfs();
        let function = pass(&sysfs, VF).unwrap();
        host.rebind(VF, VFIO_PCI);
        fs::remove_file(host.path("sys/bus/pci/drivers/vfio-pci/unbind")).unwrap();
        let err = sysfs.give_back(&function).unwrap_err();
        assert!(err.operation.contains("vfio-pci/unbind"), "{err}");
        assert_eq!(host.read("sys/bus/pci/drivers_probe"), VF, "still reprobed");
    }

    #[test]
    fn a_missing_group_device_gives_the_function_back() {
        let host = FakeHost::new();
        let err = pass(&host.sysfs(), VF).unwrap_err().to_string();
        assert!(
            err.contains("/dev/vfio/42") && err.contains("modprobe vfio"),
            "{err}"
        );
        assert_eq!(host.read("sys/bus/pci/drivers/vfio-pci/bind"), VF);
        assert_eq!(
            host.read(&format!("sys/bus/pci/devices/{VF}/driver_override")),
            "\n"
        );
        assert_eq!(host.read("sys/bus/pci/drivers_probe"), VF);
    }

    #[test]
    fn refusals_touch_nothing_and_name_the_fix() {
        let untouched = |host: &FakeHost| {
            assert_eq!(host.read("sys/bus/pci/drivers/iavf/unbind"), "");
            assert_eq!(
                host.read(&format!("sys/bus/pci/devices/{VF}/driver_override")),
                ""
            );
        };

        let host = FakeHost::new();
        fs::remove_dir_all(host.path("sys/bus/pci/drivers/vfio-pci")).unwrap();
        let err = pass(&host.sysfs(), VF).unwrap_err().to_string();
        assert!(
            err.contains("vfio-pci is not loaded: modprobe vfio-pci"),
            "{err}"
        );
        untouched(&host);

        let host = FakeHost::new();
        fs::remove_file(host.path(&format!("sys/bus/pci/devices/{VF}/iommu_group"))).unwrap();
        let err = pass(&host.sysfs(), VF).unwrap_err().to_string();
        assert!(
            err.contains("no IOMMU group") && err.contains("intel_iommu=on"),
            "{err}"
        );
        untouched(&host);

        let host = FakeHost::new();
        host.function("0000:3b:02.0", None, "42");
        host.function("0000:3b:02.2", Some(VFIO_PCI), "42");
        host.function("0000:3c:00.0", Some("nvme"), "42");
        let err = pass(&host.sysfs(), VF).unwrap_err().to_string();
        assert!(
            err.contains(
                "function 0000:3c:00.0 in the same IOMMU group 42 is bound to driver nvme"
            ),
            "{err}"
        );
        untouched(&host);

        let host = FakeHost::new();
        host.rebind(VF, VFIO_PCI);
        let err = pass(&host.sysfs(), VF).unwrap_err().to_string();
        assert!(err.contains("bound to vfio-pci already"), "{err}");
    }

    #[test]
    fn a_physical_function_is_no_vf_and_a_late_netdev_times_out() {
        let host = FakeHost::new();
        host.function("0000:3b:00.0", Some("iavf"), "7");
        let sysfs = host.sysfs();
        assert!(!sysfs.is_vf("0000:3b:00.0"));
        let err = sysfs
            .wait_for_netdev(VF, Duration::from_millis(50))
            .unwrap_err()
            .to_string();
        assert!(err.contains("has no interface after"), "{err}");
    }
}
