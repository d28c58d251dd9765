//! What this host's KVM can do, and the accelerator choice that follows.

use std::{fs, path::Path};

use runv_config::AccelMode;

/// How guest code runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "KVM",
            Accel::Tcg => "TCG",
        })
    }
}

/// What /dev/kvm offers on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmSupport {
    /// Hardware virtualization: an ordinary guest kernel runs.
    Hardware { extension: &'static str },
    /// The PVM backend (`kvm_pvm`): only PVM-enabled guest kernels run.
    Pvm,
    /// No usable KVM, with the reason.
    Unavailable(String),
}

impl KvmSupport {
    /// Probes /dev/kvm, the loaded KVM backend and the CPU flags.
    pub fn probe() -> KvmSupport {
        Self::probe_at(
            Path::new("/dev/kvm"),
            Path::new("/sys/module"),
            Path::new("/proc/cpuinfo"),
        )
    }

    fn probe_at(dev_kvm: &Path, sys_module: &Path, cpuinfo: &Path) -> KvmSupport {
        if let Err(e) = fs::OpenOptions::new().read(true).write(true).open(dev_kvm) {
            return KvmSupport::Unavailable(format!("cannot open {}: {e}", dev_kvm.display()));
        }
        if sys_module.join("kvm_pvm").exists() {
            return KvmSupport::Pvm;
        }
        let flags = fs::read_to_string(cpuinfo).unwrap_or_default();
        let flags = flags
            .lines()
            .find(|line| line.starts_with("flags"))
            .unwrap_or_default();
        let has = |flag: &str| flags.split_whitespace().any(|f| f == flag);
        if has("vmx") {
            KvmSupport::Hardware { extension: "VT-x" }
        } else if has("svm") {
            KvmSupport::Hardware { extension: "AMD-V" }
        } else {
            KvmSupport::Unavailable("the CPU offers neither VT-x nor AMD-V".into())
        }
    }

    /// Why KVM cannot run an ordinary guest kernel, if it cannot.
    pub fn why_not_usable(&self) -> Option<String> {
        match self {
            KvmSupport::Hardware { .. } => None,
            KvmSupport::Pvm => Some(
                "/dev/kvm is the PVM backend (module kvm_pvm), which runs only PVM-enabled \
                 guest kernels"
                    .into(),
            ),
            KvmSupport::Unavailable(reason) => Some(reason.clone()),
        }
    }
}

/// Whether the builtin hypervisor can boot the guest on a host with `kvm`:
/// the reason it can, or why not with the way out.
pub fn builtin_usable(kvm: &KvmSupport, pvm_guest_kernel: bool) -> Result<String, String> {
    match kvm {
        KvmSupport::Hardware { extension } => Ok(format!("/dev/kvm with {extension}")),
        KvmSupport::Pvm if pvm_guest_kernel => {
            Ok("/dev/kvm is the PVM backend and vm.kernel is a PVM guest kernel".into())
        }
        KvmSupport::Pvm => Err(format!(
            "{}; build a PVM guest kernel (docs/guest-kernel.md) and set \
             builtin.pvm_guest_kernel = true, or set hypervisor = \"qemu\" in the runv config",
            kvm.why_not_usable().unwrap_or_default()
        )),
        KvmSupport::Unavailable(reason) => Err(format!(
            "the builtin hypervisor needs KVM, and {reason}; set hypervisor = \"qemu\" in the \
             runv config (it falls back to TCG software emulation, with qemu.allow_tcg = true)"
        )),
    }
}

/// Why TCG needs `qemu.allow_tcg`, for errors and `runv-ctl check`.
pub const TCG_NOT_A_BOUNDARY: &str = "TCG software emulation is not a security boundary \
     (QEMU's security policy covers only KVM guests): a guest that exploits a TCG bug runs \
     code in QEMU";

/// The accelerator for `mode` on a host with `kvm`, and the reason, for the
/// log. TCG is chosen only when `allow_tcg` (`qemu.allow_tcg`) says so.
pub fn choose_accel(
    mode: AccelMode,
    allow_tcg: bool,
    kvm: &KvmSupport,
) -> Result<(Accel, String), String> {
    let (accel, reason) = match (mode, kvm.why_not_usable()) {
        (AccelMode::Tcg, _) => (Accel::Tcg, "qemu.accel is \"tcg\"".to_owned()),
        (AccelMode::Kvm | AccelMode::Auto, None) => {
            let KvmSupport::Hardware { extension } = kvm else {
                unreachable!("only hardware support is usable")
            };
            return Ok((Accel::Kvm, format!("/dev/kvm with {extension}")));
        }
        (AccelMode::Auto, Some(reason)) => (Accel::Tcg, format!("KVM unusable: {reason}")),
        (AccelMode::Kvm, Some(reason)) => {
            return Err(format!(
                "qemu.accel is \"kvm\" but {reason}; set qemu.accel = \"auto\" or \"tcg\""
            ))
        }
    };
    if !allow_tcg {
        return Err(format!(
            "QEMU would run the guest with TCG ({reason}), and qemu.allow_tcg is false: \
             {TCG_NOT_A_BOUNDARY}; use a host with usable KVM, or set qemu.allow_tcg = true \
             in the runv config to accept that"
        ));
    }
    Ok((accel, reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FakeHost {
        dir: tempfile::TempDir,
    }

    impl FakeHost {
        fn new(kvm_dev: bool, pvm: bool, flags: &str) -> FakeHost {
            let dir = tempfile::tempdir().unwrap();
            if kvm_dev {
                fs::write(dir.path().join("kvm"), "").unwrap();
            }
            fs::create_dir(dir.path().join("module")).unwrap();
            if pvm {
                fs::create_dir(dir.path().join("module/kvm_pvm")).unwrap();
            }
            fs::write(
                dir.path().join("cpuinfo"),
                format!("processor\t: 0\nflags\t\t: {flags}\n"),
            )
            .unwrap();
            FakeHost { dir }
        }

        fn probe(&self) -> KvmSupport {
            let p = self.dir.path();
            KvmSupport::probe_at(&p.join("kvm"), &p.join("module"), &p.join("cpuinfo"))
        }
    }

    #[test]
    fn vmx_host_uses_kvm() {
        let kvm = FakeHost::new(true, false, "fpu vme vmx sse").probe();
        assert_eq!(kvm, KvmSupport::Hardware { extension: "VT-x" });
        let (accel, reason) = choose_accel(AccelMode::Auto, true, &kvm).unwrap();
        assert_eq!(accel, Accel::Kvm);
        assert!(reason.contains("VT-x"));
    }

    #[test]
    fn pvm_host_falls_back_to_tcg_with_reason() {
        let kvm = FakeHost::new(true, true, "fpu sse").probe();
        assert_eq!(kvm, KvmSupport::Pvm);
        let (accel, reason) = choose_accel(AccelMode::Auto, true, &kvm).unwrap();
        assert_eq!(accel, Accel::Tcg);
        assert!(reason.contains("kvm_pvm"), "{reason}");
        let err = choose_accel(AccelMode::Kvm, true, &kvm).unwrap_err();
        assert!(err.contains("qemu.accel = \"auto\""), "{err}");
    }

    #[test]
    fn tcg_needs_the_explicit_switch() {
        let pvm = FakeHost::new(true, true, "fpu sse").probe();
        let hardware = FakeHost::new(true, false, "vmx").probe();
        for (mode, kvm) in [(AccelMode::Auto, &pvm), (AccelMode::Tcg, &hardware)] {
            let err = choose_accel(mode, false, kvm).unwrap_err();
            assert!(
                err.contains("qemu.allow_tcg = true") && err.contains("not a security boundary"),
                "{err}"
            );
        }
        assert_eq!(
            choose_accel(AccelMode::Auto, false, &hardware).unwrap().0,
            Accel::Kvm
        );
    }

    #[test]
    fn missing_dev_kvm_is_named() {
        let kvm = FakeHost::new(false, false, "svm").probe();
        let reason = kvm.why_not_usable().unwrap();
        assert!(
            reason.contains("cannot open") && reason.contains("kvm"),
            "{reason}"
        );
    }

    #[test]
    fn builtin_needs_hardware_or_a_pvm_guest_kernel() {
        let hardware = FakeHost::new(true, false, "vmx").probe();
        assert!(builtin_usable(&hardware, false).unwrap().contains("VT-x"));
        let pvm = FakeHost::new(true, true, "vmx").probe();
        let err = builtin_usable(&pvm, false).unwrap_err();
        assert!(
            err.contains("kvm_pvm") && err.contains("pvm_guest_kernel = true"),
            "{err}"
        );
        assert!(err.contains("hypervisor = \"qemu\""), "{err}");
        assert!(builtin_usable(&pvm, true).is_ok());
        let none = FakeHost::new(false, false, "vmx").probe();
        let err = builtin_usable(&none, true).unwrap_err();
        assert!(
            err.contains("cannot open") && err.contains("hypervisor = \"qemu\""),
            "{err}"
        );
    }

    #[test]
    fn amd_host_uses_kvm_and_tcg_can_be_forced() {
        let kvm = FakeHost::new(true, false, "fpu svm").probe();
        assert_eq!(kvm, KvmSupport::Hardware { extension: "AMD-V" });
        assert_eq!(
            choose_accel(AccelMode::Tcg, true, &kvm).unwrap().0,
            Accel::Tcg
        );
    }
}
