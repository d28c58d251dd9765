//! The guest's boot clock: time since the guest kernel started.

use nix::time::{clock_gettime, ClockId};

/// Nanoseconds on CLOCK_BOOTTIME.
pub fn now() -> u64 {
    let time = clock_gettime(ClockId::CLOCK_BOOTTIME).expect("CLOCK_BOOTTIME is always readable");
    time.tv_sec() as u64 * 1_000_000_000 + time.tv_nsec() as u64
}
