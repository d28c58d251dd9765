//! PID 1 adopts every orphan in the guest and must reap it.

use nix::{
    errno::Errno,
    sys::wait::{waitpid, WaitPidFlag, WaitStatus},
    unistd::Pid,
};
use tokio::signal::unix::{signal, SignalKind};

/// Reaps exited children whenever SIGCHLD arrives.
pub async fn reap_orphans() {
    let mut sigchld = match signal(SignalKind::child()) {
        Ok(sigchld) => sigchld,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGCHLD: orphans will not be reaped");
            return;
        }
    };
    while sigchld.recv().await.is_some() {
        reap_exited();
    }
}

fn reap_exited() {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Ok(status) => tracing::debug!(?status, "reaped"),
            Err(Errno::EINTR) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "waitpid failed");
                return;
            }
        }
    }
}
