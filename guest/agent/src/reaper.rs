//! Child reaping. The agent is PID 1: it adopts every orphan of the guest
//! and must reap it, while the exit statuses of container processes (its
//! children too) must reach WaitProcess instead of being lost.
//!
//! Container processes are *watched*: their status is kept for the process
//! table. While the OCI runtime library runs (it waits for helper children
//! and hooks of its own), a [`OrphanHold`] stops the reaper from taking
//! unwatched children; a process created under a hold is watched before
//! the hold ends, so even one that exits at once is never reaped unseen.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use nix::{
    errno::Errno,
    sys::wait::{waitpid, WaitPidFlag, WaitStatus},
    unistd::Pid,
};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{watch, Notify},
};

use crate::boot_clock;

/// How a watched process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The exit code, or 128 + the signal that killed the process.
    pub status: u32,
    /// Nanoseconds since the Unix epoch.
    pub at_ns: u64,
}

impl Exit {
    /// The shell's encoding of a wait status; `None` for a process that
    /// has not ended (stopped, continued).
    pub fn from_wait_status(status: WaitStatus, at_ns: u64) -> Option<Exit> {
        let status = match status {
            WaitStatus::Exited(_, code) => code as u32,
            WaitStatus::Signaled(_, signal, _) => 128 + signal as u32,
            _ => return None,
        };
        Some(Exit { status, at_ns })
    }
}

/// What a watcher sees: `None` until the process has ended.
pub type ExitWatch = watch::Receiver<Option<Exit>>;

#[derive(Default)]
struct State {
    watched: HashMap<i32, watch::Sender<Option<Exit>>>,
    holds: usize,
}

#[derive(Default)]
pub struct Reaper {
    state: Mutex<State>,
    /// Wakes the reaping task when a hold ends.
    rescan: Notify,
}

impl Reaper {
    pub fn new() -> Arc<Reaper> {
        Arc::new(Reaper::default())
    }

    /// Keeps unwatched children unreaped until the hold is dropped.
    pub fn hold_orphans(self: &Arc<Self>) -> OrphanHold {
        self.lock().holds += 1;
        OrphanHold {
            reaper: self.clone(),
        }
    }

    /// Keeps `pid`'s exit status for the returned watch. A process that
    /// has ended already is reaped at once.
    pub fn watch(&self, pid: Pid) -> ExitWatch {
        let (sender, receiver) = watch::channel(None);
        self.lock().watched.insert(pid.as_raw(), sender);
        self.rescan.notify_one();
        receiver
    }

    /// Reaps on every SIGCHLD and whenever a hold ends, until the runtime
    /// stops.
    pub async fn run(self: Arc<Self>) {
        let mut sigchld = match signal(SignalKind::child()) {
            Ok(sigchld) => sigchld,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch SIGCHLD: children will not be reaped");
                return;
            }
        };
        loop {
            self.reap_exited();
            tokio::select! {
                _ = sigchld.recv() => {}
                _ = self.rescan.notified() => {}
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn reap_exited(&self) {
        let mut state = self.lock();
        let watched: Vec<i32> = state.watched.keys().copied().collect();
        for pid in watched {
            if let Some(status) = wait_nohang(Pid::from_raw(pid)) {
                record(&mut state, status);
            }
        }
        if state.holds > 0 {
            return;
        }
        while let Some(status) = wait_nohang(Pid::from_raw(-1)) {
            if !record(&mut state, status) {
                tracing::debug!(?status, "reaped an orphan");
            }
        }
    }
}

/// Hands a watched process's end to its watch; false for any other child.
fn record(state: &mut State, status: WaitStatus) -> bool {
    let Some(pid) = status.pid() else {
        return false;
    };
    let Some(exit) = Exit::from_wait_status(status, boot_clock::wall_clock()) else {
        return false;
    };
    match state.watched.remove(&pid.as_raw()) {
        Some(sender) => {
            tracing::debug!(
                pid = pid.as_raw(),
                status = exit.status,
                "watched process exited"
            );
            sender.send_replace(Some(exit));
            true
        }
        None => false,
    }
}

/// One ended child matching `pid` (-1: any), if there is one.
fn wait_nohang(pid: Pid) -> Option<WaitStatus> {
    loop {
        // __WALL: children cloned with another exit signal count too.
        match waitpid(pid, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return None,
            Ok(status) => return Some(status),
            Err(Errno::EINTR) => continue,
            Err(e) => {
                tracing::warn!(error = %e, pid = pid.as_raw(), "waitpid failed");
                return None;
            }
        }
    }
}

/// While alive, the reaper leaves unwatched children alone.
pub struct OrphanHold {
    reaper: Arc<Reaper>,
}

impl Drop for OrphanHold {
    fn drop(&mut self) {
        self.reaper.lock().holds -= 1;
        // Children that ended during the hold sent their SIGCHLD already.
        self.reaper.rescan.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use std::{process::Command, time::Duration};

    use nix::sys::signal::Signal;

    use super::*;

    #[test]
    fn exit_statuses_are_encoded_as_the_shell_does() {
        let pid = Pid::from_raw(7);
        let exit = |status| Exit::from_wait_status(status, 5).map(|exit| exit.status);
        assert_eq!(exit(WaitStatus::Exited(pid, 0)), Some(0));
        assert_eq!(exit(WaitStatus::Exited(pid, 3)), Some(3));
        assert_eq!(
            exit(WaitStatus::Signaled(pid, Signal::SIGTERM, false)),
            Some(143)
        );
        assert_eq!(
            exit(WaitStatus::Signaled(pid, Signal::SIGKILL, true)),
            Some(137)
        );
        assert_eq!(exit(WaitStatus::Stopped(pid, Signal::SIGSTOP)), None);
        assert_eq!(exit(WaitStatus::Continued(pid)), None);
    }

    /// A child that exits while the reaper is held, before it is watched,
    /// still reports its status once watched. (The hold stays on to the
    /// end: the test process's other children are not the reaper's.)
    #[tokio::test]
    async fn held_child_exit_reaches_its_late_watcher() {
        let reaper = Reaper::new();
        tokio::spawn(reaper.clone().run());
        let _hold = reaper.hold_orphans();
        #[allow(
            clippy::zombie_processes,
            reason = "the reaper under test waits for it"
        )]
        let child = Command::new("sh").args(["-c", "exit 7"]).spawn().unwrap();
        let pid = Pid::from_raw(child.id() as i32);
        // Let it exit and its SIGCHLD be handled while the hold is on.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut exit = reaper.watch(pid);
        let exit = tokio::time::timeout(Duration::from_secs(5), exit.wait_for(Option::is_some))
            .await
            .expect("the exit arrives")
            .unwrap()
            .unwrap();
        assert_eq!(exit.status, 7);
        assert!(exit.at_ns > 0);
    }
}
