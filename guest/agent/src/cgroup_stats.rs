//! ContainerStats from a container's cgroup v2 files.

use std::{collections::HashMap, fs, io, path::Path};

use runv_protocol::agent;

/// Reads the statistics of the cgroup directory `dir`. Files of a
/// controller the cgroup lacks read as zero; a missing cgroup is an error.
pub fn read(dir: &Path) -> io::Result<agent::ContainerStats> {
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
        ..Default::default()
    })
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
        // No memory.swap.current: a kernel without swap accounting.

        let stats = read(cgroup.path()).unwrap();
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

        let err = read(&cgroup.path().join("gone")).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }
}
