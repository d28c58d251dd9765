//! The guest's clocks: time since boot, and the wall clock that follows
//! the host's.

use nix::sys::time::TimeSpec;
use nix::time::{clock_gettime, clock_settime, ClockId};

/// Wall-clock differences up to this much are left alone.
const WALL_CLOCK_TOLERANCE_NS: u64 = 1_000_000_000;

fn nanos(clock: ClockId) -> u64 {
    let time = clock_gettime(clock).expect("the kernel's clocks are always readable");
    time.tv_sec() as u64 * 1_000_000_000 + time.tv_nsec() as u64
}

/// Nanoseconds since the guest kernel started (CLOCK_BOOTTIME).
pub fn now() -> u64 {
    nanos(ClockId::CLOCK_BOOTTIME)
}

/// Nanoseconds since the Unix epoch (CLOCK_REALTIME).
pub fn wall_clock() -> u64 {
    nanos(ClockId::CLOCK_REALTIME)
}

/// Sets the wall clock to the host's `host_ns` when it is off by more
/// than the tolerance. A guest without an RTC starts in 1970.
pub fn follow_host(host_ns: u64) -> nix::Result<bool> {
    if host_ns == 0 || wall_clock().abs_diff(host_ns) <= WALL_CLOCK_TOLERANCE_NS {
        return Ok(false);
    }
    let time = TimeSpec::new(
        (host_ns / 1_000_000_000) as i64,
        (host_ns % 1_000_000_000) as i64,
    );
    clock_settime(ClockId::CLOCK_REALTIME, time)?;
    Ok(true)
}
