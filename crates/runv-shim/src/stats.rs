//! A container's stats as containerd wants them: the agent reads the guest
//! cgroup (v2) files, containerd expects the cgroups `Metrics` message of
//! the host's cgroup version, packed in an `Any`: v1
//! (`io.containerd.cgroups.v1.Metrics`, from containerd-shim-protos) on v1
//! and hybrid hosts, v2 (`io.containerd.cgroups.v2.Metrics`, generated here
//! from protos/cgroups_v2.proto) on unified hosts, as runc's shim answers.

use std::{path::Path, sync::OnceLock};

use containerd_shim::{
    protos::{
        cgroups::metrics::{
            BlkIOEntry, BlkIOStat, CPUStat, CPUUsage, MemoryEntry, MemoryOomControl, MemoryStat,
            Metrics, NetworkStat, PidsStat, Throttle,
        },
        protobuf::{well_known_types::any::Any, MessageField},
    },
    util::convert_to_any,
};
use runv_protocol::agent::{ContainerStats, IoDeviceStats};

/// containerd's cgroup v2 metrics message.
#[allow(warnings, clippy::all)]
mod v2 {
    include!(concat!(env!("OUT_DIR"), "/protos/mod.rs"));
}

const NANOS_PER_MICRO: u64 = 1000;

/// Which cgroups the host runs, and so which metrics message containerd
/// expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// v1, or hybrid (v1 controllers with v2 mounted beside them).
    V1,
    /// Unified: only cgroup v2.
    V2,
}

impl CgroupVersion {
    /// The host's: unified when /sys/fs/cgroup itself is the v2 hierarchy.
    /// Read once: a host does not change its cgroup mode while it runs.
    pub fn of_host() -> CgroupVersion {
        static HOST: OnceLock<CgroupVersion> = OnceLock::new();
        *HOST.get_or_init(|| {
            if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
                CgroupVersion::V2
            } else {
                CgroupVersion::V1
            }
        })
    }
}

/// The `Metrics` of `stats` for a host with cgroups `version`, packed for
/// containerd.
pub fn metrics_any(stats: &ContainerStats, version: CgroupVersion) -> Result<Any, String> {
    let packed = match version {
        CgroupVersion::V1 => convert_to_any(Box::new(v1_metrics(stats))),
        CgroupVersion::V2 => convert_to_any(Box::new(v2_metrics(stats))),
    };
    packed.map_err(|e| format!("packing metrics: {e}"))
}

/// The guest's own cgroup v2 figures, as they are.
fn v2_metrics(stats: &ContainerStats) -> v2::cgroups_v2::Metrics {
    use v2::cgroups_v2::{CPUStat, IOEntry, IOStat, MemoryEvents, MemoryStat, Metrics, PidsStat};
    let mut metrics = Metrics::new();
    if let Some(cpu) = stats.cpu.as_ref() {
        metrics.cpu = MessageField::some(CPUStat {
            usage_usec: cpu.usage_usec,
            user_usec: cpu.user_usec,
            system_usec: cpu.system_usec,
            nr_periods: cpu.nr_periods,
            nr_throttled: cpu.nr_throttled,
            throttled_usec: cpu.throttled_usec,
            ..Default::default()
        });
    }
    if let Some(memory) = stats.memory.as_ref() {
        let stat = |key: &str| memory.stat.get(key).copied().unwrap_or(0);
        metrics.memory = MessageField::some(MemoryStat {
            anon: stat("anon"),
            file: stat("file"),
            kernel_stack: stat("kernel_stack"),
            slab: stat("slab"),
            sock: stat("sock"),
            shmem: stat("shmem"),
            file_mapped: stat("file_mapped"),
            file_dirty: stat("file_dirty"),
            file_writeback: stat("file_writeback"),
            anon_thp: stat("anon_thp"),
            inactive_anon: stat("inactive_anon"),
            active_anon: stat("active_anon"),
            inactive_file: stat("inactive_file"),
            active_file: stat("active_file"),
            unevictable: stat("unevictable"),
            slab_reclaimable: stat("slab_reclaimable"),
            slab_unreclaimable: stat("slab_unreclaimable"),
            pgfault: stat("pgfault"),
            pgmajfault: stat("pgmajfault"),
            workingset_refault: stat("workingset_refault"),
            workingset_activate: stat("workingset_activate"),
            workingset_nodereclaim: stat("workingset_nodereclaim"),
            pgrefill: stat("pgrefill"),
            pgscan: stat("pgscan"),
            pgsteal: stat("pgsteal"),
            pgactivate: stat("pgactivate"),
            pgdeactivate: stat("pgdeactivate"),
            pglazyfree: stat("pglazyfree"),
            pglazyfreed: stat("pglazyfreed"),
            thp_fault_alloc: stat("thp_fault_alloc"),
            thp_collapse_alloc: stat("thp_collapse_alloc"),
            usage: memory.usage,
            // 0 is "max" in the agent's figures and in containerd's.
            usage_limit: memory.limit,
            swap_usage: memory.swap_usage,
            ..Default::default()
        });
        metrics.memory_events = MessageField::some(MemoryEvents {
            oom: memory.oom_events,
            oom_kill: memory.oom_kill_events,
            ..Default::default()
        });
    }
    if let Some(pids) = stats.pids.as_ref() {
        metrics.pids = MessageField::some(PidsStat {
            current: pids.current,
            limit: pids.limit,
            ..Default::default()
        });
    }
    if let Some(io) = stats.io.as_ref() {
        metrics.io = MessageField::some(IOStat {
            usage: io
                .devices
                .iter()
                .map(|device| IOEntry {
                    major: device.major.into(),
                    minor: device.minor.into(),
                    rbytes: device.rbytes,
                    wbytes: device.wbytes,
                    rios: device.rios,
                    wios: device.wios,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
    }
    metrics
}

fn v1_metrics(stats: &ContainerStats) -> Metrics {
    let mut metrics = Metrics::new();
    if let Some(cpu) = stats.cpu.as_ref() {
        metrics.cpu = MessageField::some(CPUStat {
            usage: MessageField::some(CPUUsage {
                total: cpu.usage_usec * NANOS_PER_MICRO,
                user: cpu.user_usec * NANOS_PER_MICRO,
                kernel: cpu.system_usec * NANOS_PER_MICRO,
                ..Default::default()
            }),
            throttling: MessageField::some(Throttle {
                periods: cpu.nr_periods,
                throttled_periods: cpu.nr_throttled,
                throttled_time: cpu.throttled_usec * NANOS_PER_MICRO,
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    if let Some(memory) = stats.memory.as_ref() {
        let stat = |key: &str| memory.stat.get(key).copied().unwrap_or(0);
        // v2 has no limit for "max": v1 reports the largest value instead.
        let limit = if memory.limit == 0 {
            u64::MAX
        } else {
            memory.limit
        };
        // The container's cgroup is the whole hierarchy below it, so its
        // own and its hierarchical (total_*) figures are the same.
        let (rss, cache, mapped_file, dirty, writeback) = (
            stat("anon"),
            stat("file"),
            stat("file_mapped"),
            stat("file_dirty"),
            stat("file_writeback"),
        );
        let (pg_fault, pg_maj_fault) = (stat("pgfault"), stat("pgmajfault"));
        let (inactive_anon, active_anon) = (stat("inactive_anon"), stat("active_anon"));
        let (inactive_file, active_file) = (stat("inactive_file"), stat("active_file"));
        let unevictable = stat("unevictable");
        metrics.memory = MessageField::some(MemoryStat {
            cache,
            rss,
            rss_huge: stat("anon_thp"),
            mapped_file,
            dirty,
            writeback,
            pg_fault,
            pg_maj_fault,
            inactive_anon,
            active_anon,
            inactive_file,
            active_file,
            unevictable,
            hierarchical_memory_limit: limit,
            total_cache: cache,
            total_rss: rss,
            total_mapped_file: mapped_file,
            total_dirty: dirty,
            total_writeback: writeback,
            total_pg_fault: pg_fault,
            total_pg_maj_fault: pg_maj_fault,
            total_inactive_anon: inactive_anon,
            total_active_anon: active_anon,
            total_inactive_file: inactive_file,
            total_active_file: active_file,
            total_unevictable: unevictable,
            usage: MessageField::some(MemoryEntry {
                usage: memory.usage,
                limit,
                ..Default::default()
            }),
            swap: MessageField::some(MemoryEntry {
                usage: memory.swap_usage,
                ..Default::default()
            }),
            ..Default::default()
        });
        metrics.memory_oom_control = MessageField::some(MemoryOomControl {
            oom_kill: memory.oom_kill_events,
            under_oom: u64::from(memory.oom_events > memory.oom_kill_events),
            ..Default::default()
        });
    }
    if let Some(pids) = stats.pids.as_ref() {
        metrics.pids = MessageField::some(PidsStat {
            current: pids.current,
            limit: pids.limit,
            ..Default::default()
        });
    }
    if let Some(io) = stats.io.as_ref() {
        metrics.blkio = MessageField::some(v1_blkio(&io.devices));
    }
    // The pod's interfaces: like runc's containers, every container of the
    // pod shares them. v2 Metrics has no place for them.
    metrics.network = stats
        .network
        .iter()
        .map(|interface| NetworkStat {
            name: interface.name.clone(),
            rx_bytes: interface.rx_bytes,
            rx_packets: interface.rx_packets,
            rx_errors: interface.rx_errors,
            rx_dropped: interface.rx_dropped,
            tx_bytes: interface.tx_bytes,
            tx_packets: interface.tx_packets,
            tx_errors: interface.tx_errors,
            tx_dropped: interface.tx_dropped,
            ..Default::default()
        })
        .collect();
    metrics
}

/// io.stat's counters as v1's recursive blkio entries, one per device and
/// operation, as runc's shim reports them from blkio.throttle.*.
fn v1_blkio(devices: &[IoDeviceStats]) -> BlkIOStat {
    let entries = |read: fn(&IoDeviceStats) -> u64, write: fn(&IoDeviceStats) -> u64| {
        devices
            .iter()
            .flat_map(|device| {
                [("Read", read(device)), ("Write", write(device))].map(|(op, value)| BlkIOEntry {
                    op: op.to_owned(),
                    device: device.device.clone(),
                    major: device.major.into(),
                    minor: device.minor.into(),
                    value,
                    ..Default::default()
                })
            })
            .collect()
    };
    BlkIOStat {
        io_service_bytes_recursive: entries(|d| d.rbytes, |d| d.wbytes),
        io_serviced_recursive: entries(|d| d.rios, |d| d.wios),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use containerd_shim::protos::protobuf::Message;
    use runv_protocol::agent::{CpuStats, IoStats, MemoryStats, NetworkInterfaceStats, PidsStats};

    use super::*;

    fn sample_stats() -> ContainerStats {
        ContainerStats {
            cpu: Some(CpuStats {
                usage_usec: 1500,
                user_usec: 1000,
                system_usec: 500,
                ..Default::default()
            })
            .into(),
            memory: Some(MemoryStats {
                usage: 4096,
                limit: 0,
                stat: [("anon".to_owned(), 1024), ("file".to_owned(), 2048)].into(),
                oom_kill_events: 2,
                oom_events: 2,
                ..Default::default()
            })
            .into(),
            pids: Some(PidsStats {
                current: 3,
                limit: 100,
                ..Default::default()
            })
            .into(),
            io: Some(IoStats {
                devices: vec![IoDeviceStats {
                    major: 254,
                    minor: 16,
                    rbytes: 8192,
                    wbytes: 4096,
                    rios: 2,
                    wios: 1,
                    device: "vdb".into(),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .into(),
            network: vec![NetworkInterfaceStats {
                name: "eth0".into(),
                rx_bytes: 1500,
                tx_packets: 3,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn guest_cgroup_v2_figures_become_v1_metrics() {
        let any = metrics_any(&sample_stats(), CgroupVersion::V1).unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v1.Metrics");
        let metrics = Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(metrics.cpu.usage.total, 1_500_000);
        assert_eq!(metrics.cpu.usage.kernel, 500_000);
        assert_eq!(metrics.memory.usage.usage, 4096);
        assert_eq!(metrics.memory.usage.limit, u64::MAX);
        assert_eq!(metrics.memory.total_rss, 1024);
        assert_eq!(metrics.memory.total_cache, 2048);
        assert_eq!(metrics.memory_oom_control.oom_kill, 2);
        assert_eq!(metrics.memory_oom_control.under_oom, 0);
        assert_eq!(metrics.pids.current, 3);
        let bytes: Vec<_> = metrics
            .blkio
            .io_service_bytes_recursive
            .iter()
            .map(|e| (e.op.as_str(), e.device.as_str(), e.major, e.minor, e.value))
            .collect();
        assert_eq!(
            bytes,
            [
                ("Read", "vdb", 254, 16, 8192),
                ("Write", "vdb", 254, 16, 4096)
            ]
        );
        assert_eq!(metrics.blkio.io_serviced_recursive[1].value, 1);
        let eth0 = &metrics.network[0];
        assert_eq!(
            (eth0.name.as_str(), eth0.rx_bytes, eth0.tx_packets),
            ("eth0", 1500, 3)
        );
    }

    #[test]
    fn unified_hosts_get_the_guest_figures_as_v2_metrics() {
        let any = metrics_any(&sample_stats(), CgroupVersion::V2).unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
        let metrics = v2::cgroups_v2::Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(metrics.cpu.usage_usec, 1500);
        assert_eq!(metrics.cpu.system_usec, 500);
        assert_eq!(metrics.memory.usage, 4096);
        assert_eq!(metrics.memory.usage_limit, 0);
        assert_eq!(metrics.memory.anon, 1024);
        assert_eq!(metrics.memory.file, 2048);
        assert_eq!(metrics.memory_events.oom_kill, 2);
        assert_eq!(metrics.pids.limit, 100);
        let io = &metrics.io.usage[0];
        assert_eq!((io.major, io.minor, io.rbytes, io.wios), (254, 16, 8192, 1));
    }

    /// Field numbers are containerd's wire contract: spot-check a few
    /// against the bytes (tag = field number << 3 | varint).
    #[test]
    fn v2_field_numbers_are_containerds() {
        let any = metrics_any(&sample_stats(), CgroupVersion::V2).unwrap();
        let bytes = &any.value;
        // Metrics.pids = 1, Metrics.cpu = 2, Metrics.memory = 4,
        // Metrics.io = 6, Metrics.memory_events = 8, all length-delimited.
        for tag in [0x0a, 0x12, 0x22, 0x32, 0x42] {
            assert!(bytes.contains(&tag), "tag {tag:#x} in {bytes:?}");
        }
        let memory = v2::cgroups_v2::MemoryStat {
            usage: 1,
            ..Default::default()
        };
        // MemoryStat.usage = 32: tag 32 << 3 = 256, varint 0x80 0x02.
        assert_eq!(memory.write_to_bytes().unwrap(), [0x80, 0x02, 0x01]);
    }
}
