//! ContainerStats from a container's cgroup v2 files: cpu.stat, memory.*,
//! pids.* and io.stat.

use std::{collections::HashMap, fs, io, path::Path};

use runv_protocol::agent;

/// Where the kernel links each block device number to its device.
const SYS_DEV_BLOCK: &str = "/sys/dev/block";

/// Reads the statistics of the cgroup directory `dir`. Files of a
/// controller the cgroup lacks read as zero; a missing cgroup is an error.
pub fn read(dir: &Path) -> io::Result<agent::ContainerStats> {
    read_with_devices(dir, Path::new(SYS_DEV_BLOCK))
}

/// [`read`], naming io.stat's devices through `sys_dev_block`.
fn read_with_devices(dir: &Path, sys_dev_block: &Path) -> io::Result<agent::ContainerStats> {
    if !dir.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("cgroup {} does not exist", dir.display()),
        ));
    }
    let file = |name: &str| fs::read_to_string(dir.join(name)).unwrap_or_default();
    let cpu = flat_keyed(&file("cpu.stat"));
    let events = flat_keyed(&file("memory.events"));
    let key = |map: &HashMap<String, u64>, name: &str| map.get(name).copied().unwrap_or(0);
    Ok(agent::ContainerStats {
        cpu: Some(agent::CpuStats {
            usage_usec: key(&cpu, "usage_usec"),
            user_usec: key(&cpu, "user_usec"),
            system_usec: key(&cpu, "system_usec"),
            nr_periods: key(&cpu, "nr_periods"),
            nr_throttled: key(&cpu, "nr_throttled"),
            throttled_usec: key(&cpu, "throttled_usec"),
            ..Default::default()
        })
        .into(),
        memory: Some(agent::MemoryStats {
            usage: single_value(&file("memory.current")),
            limit: single_value(&file("memory.max")),
            swap_usage: single_value(&file("memory.swap.current")),
            stat: flat_keyed(&file("memory.stat")),
            oom_events: key(&events, "oom"),
            oom_kill_events: key(&events, "oom_kill"),
            ..Default::default()
        })
        .into(),
        pids: Some(agent::PidsStats {
            current: single_value(&file("pids.current")),
            limit: single_value(&file("pids.max")),
            ..Default::default()
        })
        .into(),
        io: Some(agent::IoStats {
            devices: io_stat(&file("io.stat"))
                .into_iter()
                .map(|mut device| {
                    device.device = block_device_name(sys_dev_block, device.major, device.minor)
                        .unwrap_or_default();
                    device
                })
                .collect(),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    })
}

/// io.stat: one line per device, `MAJ:MIN key=value...`. Keys other than
/// the byte and operation counters (those of io.cost or io.latency, say)
/// are left out; a line without a device number is skipped.
fn io_stat(content: &str) -> Vec<agent::IoDeviceStats> {
    content
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (major, minor) = fields.next()?.split_once(':')?;
            let mut device = agent::IoDeviceStats {
                major: major.parse().ok()?,
                minor: minor.parse().ok()?,
                ..Default::default()
            };
            for field in fields {
                let Some((key, value)) = field.split_once('=') else {
                    continue;
                };
                let Ok(value) = value.parse::<u64>() else {
                    continue;
                };
                let counter = match key {
                    "rbytes" => &mut device.rbytes,
                    "wbytes" => &mut device.wbytes,
                    "rios" => &mut device.rios,
                    "wios" => &mut device.wios,
                    "dbytes" => &mut device.dbytes,
                    "dios" => &mut device.dios,
                    _ => continue,
                };
                *counter = value;
            }
            Some(device)
        })
        .collect()
}

/// The guest's name of block device `major:minor` ("vdb"): the last
/// component of the link `sys_dev_block/MAJ:MIN` points to.
fn block_device_name(sys_dev_block: &Path, major: u32, minor: u32) -> Option<String> {
    let target = fs::read_link(sys_dev_block.join(format!("{major}:{minor}"))).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// A one-value file such as memory.max: a number, or "max" (no limit),
/// which reads as 0 as the protocol has it.
fn single_value(content: &str) -> u64 {
    content.trim().parse().unwrap_or(0)
}

/// A flat-keyed file such as cpu.stat: one `key value` pair a line.
fn flat_keyed(content: &str) -> HashMap<String, u64> {
    content
        .lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(' ')?;
            Some((key.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cgroup_files() {
        assert_eq!(single_value("max\n"), 0);
        assert_eq!(single_value("1048576\n"), 1_048_576);
        assert_eq!(single_value(""), 0);
        let stat = flat_keyed("usage_usec 1200\nuser_usec 1000\nsystem_usec 200\nbogus\n");
        assert_eq!(stat.get("usage_usec"), Some(&1200));
        assert_eq!(stat.get("system_usec"), Some(&200));
        assert_eq!(stat.len(), 3);
    }

    #[test]
    fn parses_io_stat() {
        let devices = io_stat(
            "254:16 rbytes=4096 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n\
             254:0 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=5 dios=6 cost.vrate=100.00 \
             cost.usage=7\n\
             garbage\n\
             \n",
        );
        assert_eq!(devices.len(), 2, "{devices:?}");
        let first = &devices[0];
        assert_eq!((first.major, first.minor), (254, 16));
        assert_eq!(
            (first.rbytes, first.wbytes, first.rios, first.wios),
            (4096, 0, 1, 0)
        );
        assert_eq!((first.dbytes, first.dios), (0, 0));
        assert_eq!(first.device, "", "named later, from sysfs");
        let second = &devices[1];
        assert_eq!(
            (
                second.rbytes,
                second.wbytes,
                second.rios,
                second.wios,
                second.dbytes,
                second.dios
            ),
            (1, 2, 3, 4, 5, 6)
        );
        assert!(io_stat("").is_empty());
    }

    #[test]
    fn reads_a_cgroup_directory() {
        let cgroup = tempfile::tempdir().unwrap();
        let write =
            |name: &str, content: &str| fs::write(cgroup.path().join(name), content).unwrap();
        write("cpu.stat", "usage_usec 50\nuser_usec 30\nsystem_usec 20\nnr_periods 4\nnr_throttled 1\nthrottled_usec 9\n");
        write("memory.current", "4096\n");
        write("memory.max", "max\n");
        write("memory.stat", "anon 1024\nfile 2048\n");
        write("memory.events", "low 0\nhigh 0\nmax 3\noom 2\noom_kill 1\n");
        write("pids.current", "3\n");
        write("pids.max", "64\n");
        write(
            "io.stat",
            "254:16 rbytes=4096 wbytes=512 rios=1 wios=1 dbytes=0 dios=0\n\
             254:32 rbytes=8 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n",
        );
        // No memory.swap.current: a kernel without swap accounting.
        let sys_dev_block = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(
            "../../devices/platform/virtio-mmio.3/virtio3/block/vdb",
            sys_dev_block.path().join("254:16"),
        )
        .unwrap();

        let stats = read_with_devices(cgroup.path(), sys_dev_block.path()).unwrap();
        let cpu = stats.cpu.unwrap();
        assert_eq!(
            (cpu.usage_usec, cpu.user_usec, cpu.system_usec),
            (50, 30, 20)
        );
        assert_eq!(
            (cpu.nr_periods, cpu.nr_throttled, cpu.throttled_usec),
            (4, 1, 9)
        );
        let memory = stats.memory.unwrap();
        assert_eq!(
            (memory.usage, memory.limit, memory.swap_usage),
            (4096, 0, 0)
        );
        assert_eq!(memory.stat.get("file"), Some(&2048));
        assert_eq!((memory.oom_events, memory.oom_kill_events), (2, 1));
        let pids = stats.pids.unwrap();
        assert_eq!((pids.current, pids.limit), (3, 64));
        let io = stats.io.unwrap();
        let named: Vec<_> = io
            .devices
            .iter()
            .map(|d| (d.major, d.minor, d.device.as_str(), d.rbytes, d.wbytes))
            .collect();
        assert_eq!(named, [(254, 16, "vdb", 4096, 512), (254, 32, "", 8, 0)]);

        let err = read(&cgroup.path().join("gone")).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }
}
