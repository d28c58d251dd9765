//! Where the time of a VM boot goes.

use std::{fmt, time::Duration};

use runv_protocol::agent::BootTimes;

/// Milestones the guest measured on its own clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct GuestBootTimes {
    /// Guest kernel start to the agent running as /init.
    pub kernel_to_init: Duration,
    /// The agent running to the agent listening on vsock.
    pub init_to_agent_ready: Duration,
}

impl From<BootTimes> for GuestBootTimes {
    fn from(times: BootTimes) -> Self {
        GuestBootTimes {
            kernel_to_init: Duration::from_nanos(times.init_started_ns),
            init_to_agent_ready: Duration::from_nanos(
                times.agent_ready_ns.saturating_sub(times.init_started_ns),
            ),
        }
    }
}

/// The boot of one VM, host and guest views together.
#[derive(Debug, Clone, Copy)]
pub struct BootTimeline {
    /// Host: checks, helpers and the hypervisor process started.
    pub hypervisor_spawn: Duration,
    /// Guest: as the agent reported them (absent from an agent that did not).
    pub guest: Option<GuestBootTimes>,
    /// Host: from the boot request to the agent's first answer.
    pub agent_ready: Duration,
    /// Host: round trip of the first call that the agent answered.
    pub first_rpc: Duration,
}

impl fmt::Display for BootTimeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        writeln!(
            f,
            "  hypervisor spawn        {:>9.1} ms  (host)",
            ms(self.hypervisor_spawn)
        )?;
        if let Some(guest) = self.guest {
            writeln!(
                f,
                "  kernel start to init    {:>9.1} ms  (guest clock)",
                ms(guest.kernel_to_init)
            )?;
            writeln!(
                f,
                "  init to agent ready     {:>9.1} ms  (guest clock)",
                ms(guest.init_to_agent_ready)
            )?;
        }
        writeln!(
            f,
            "  boot to agent answering {:>9.1} ms  (host)",
            ms(self.agent_ready)
        )?;
        write!(
            f,
            "  first RPC round trip    {:>9.1} ms  (host)",
            ms(self.first_rpc)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_times_split_at_init() {
        let times = BootTimes {
            init_started_ns: 800_000_000,
            agent_ready_ns: 812_000_000,
            ..Default::default()
        };
        let guest = GuestBootTimes::from(times);
        assert_eq!(guest.kernel_to_init, Duration::from_millis(800));
        assert_eq!(guest.init_to_agent_ready, Duration::from_millis(12));
    }

    #[test]
    fn display_lists_every_milestone() {
        let timeline = BootTimeline {
            hypervisor_spawn: Duration::from_millis(40),
            guest: Some(GuestBootTimes {
                kernel_to_init: Duration::from_millis(800),
                init_to_agent_ready: Duration::from_millis(12),
            }),
            agent_ready: Duration::from_millis(2500),
            first_rpc: Duration::from_micros(1500),
        };
        let text = timeline.to_string();
        for milestone in [
            "hypervisor spawn",
            "kernel start to init",
            "init to agent ready",
            "boot to agent answering",
            "first RPC round trip",
        ] {
            assert!(text.contains(milestone), "{text}");
        }
        assert!(text.contains("800.0 ms"), "{text}");
    }
}
