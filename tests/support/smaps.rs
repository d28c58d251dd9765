//! A process's memory, mapping by mapping, from /proc/<pid>/smaps: where
//! its PSS lies (guest RAM, translated code, loaded files, the rest).

use std::fs;

/// One mapping of a process and what of it is resident.
#[derive(Debug, Clone, Default)]
pub struct Mapping {
    /// Where it starts in the process, in KiB.
    pub start_kib: u64,
    pub size_kib: u64,
    /// Permissions as smaps writes them, e.g. "rw-s".
    pub perms: String,
    /// The mapped file, "/memfd:NAME (deleted)", "[heap]", or empty.
    pub path: String,
    pub rss_kib: u64,
    pub pss_kib: u64,
    /// Private pages of a file mapping that were written (copied on write).
    pub anonymous_kib: u64,
}

/// The mappings of `pid`, empty when it is gone.
pub fn mappings(pid: u32) -> Vec<Mapping> {
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut all: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        let first = line.split(' ').next().unwrap_or_default();
        // A header: "start-end perms offset dev inode [path]"; field lines
        // start with "Name:".
        if first.contains('-') && !first.ends_with(':') {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (start, end) = first
                .split_once('-')
                .and_then(|(start, end)| {
                    Some((
                        u64::from_str_radix(start, 16).ok()?,
                        u64::from_str_radix(end, 16).ok()?,
                    ))
                })
                .unwrap_or((0, 0));
            all.push(Mapping {
                start_kib: start / 1024,
                size_kib: end.saturating_sub(start) / 1024,
                perms: fields.get(1).copied().unwrap_or_default().to_owned(),
                path: fields.get(5..).map(|p| p.join(" ")).unwrap_or_default(),
                ..Mapping::default()
            });
        } else if let Some(current) = all.last_mut() {
            if let Some(kib) = field_kib(line, "Rss:") {
                current.rss_kib = kib;
            } else if let Some(kib) = field_kib(line, "Pss:") {
                current.pss_kib = kib;
            } else if let Some(kib) = field_kib(line, "Anonymous:") {
                current.anonymous_kib = kib;
            }
        }
    }
    all
}

/// The guest RAM mappings among `mappings`, of a guest with
/// `guest_ram_kib` of memory below the 32-bit MMIO gap: the mapping of
/// exactly that size (QEMU's memfd, Firecracker's anonymous memory), or,
/// where the builtin VMM mapped the boot files over parts of its memfd,
/// every mapping in the span that starts with the memfd's first piece.
pub fn guest_ram(mappings: &[Mapping], guest_ram_kib: u64) -> Vec<&Mapping> {
    let whole: Vec<&Mapping> = mappings
        .iter()
        .filter(|m| m.size_kib == guest_ram_kib)
        .collect();
    if !whole.is_empty() {
        return whole;
    }
    let builtin_memfd = format!("/memfd:{}", runv_vmm::memory::GUEST_RAM_MEMFD_NAME);
    let Some(first) = mappings.iter().find(|m| m.path.starts_with(&builtin_memfd)) else {
        return Vec::new();
    };
    let end = first.start_kib + guest_ram_kib;
    mappings
        .iter()
        .filter(|m| m.start_kib >= first.start_kib && m.start_kib + m.size_kib <= end)
        .collect()
}

fn field_kib(line: &str, key: &str) -> Option<u64> {
    line.strip_prefix(key)?
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .ok()
}
