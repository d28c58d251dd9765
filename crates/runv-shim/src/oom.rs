//! TaskOOM: the guest kernel counts the OOM kills in a container's cgroup
//! (memory.events' oom_kill, which the agent reports in ContainerStats).
//! While a container's init process runs, its exit watcher polls that
//! counter, and reads it once more when the process has exited, so that a
//! kill which ended the container is published before its TaskExit.

use std::{future::Future, time::Duration};

/// How often a running container's OOM kill counter is read: one small
/// agent call a second per container.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Runs `until` to completion, reading the OOM kill count with `kills`
/// every `interval` and once `until` is done, and calls `on_oom` whenever
/// the count grew. A read that fails (`None`) is skipped.
pub async fn watch_during<T, Kills, Reported>(
    interval: Duration,
    until: impl Future<Output = T>,
    mut kills: impl FnMut() -> Kills,
    mut on_oom: impl FnMut() -> Reported,
) -> T
where
    Kills: Future<Output = Option<u64>>,
    Reported: Future<Output = ()>,
{
    let mut seen = 0;
    let mut until = std::pin::pin!(until);
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let ended = tokio::select! {
            result = &mut until => Some(result),
            _ = ticks.tick() => None,
        };
        if let Some(count) = kills().await.filter(|&count| count > seen) {
            seen = count;
            on_oom().await;
        }
        if let Some(result) = ended {
            return result;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    };

    use super::*;

    #[tokio::test]
    async fn each_increase_is_reported_once_and_the_last_after_the_end() {
        let count = Arc::new(AtomicU64::new(0));
        let reported = AtomicU64::new(0);
        let (end, ended) = tokio::sync::oneshot::channel::<u32>();
        let process = {
            let count = count.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                count.store(2, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                // The kill that ends the process, counted as it exits.
                count.store(3, Ordering::SeqCst);
                let _ = end.send(137);
            }
        };
        tokio::spawn(process);
        let status = watch_during(
            Duration::from_millis(5),
            ended,
            || std::future::ready(Some(count.load(Ordering::SeqCst))),
            || {
                reported.fetch_add(1, Ordering::SeqCst);
                std::future::ready(())
            },
        )
        .await;
        assert_eq!(status.unwrap(), 137);
        assert_eq!(reported.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn no_kills_and_failed_reads_report_nothing() {
        let reported = AtomicU64::new(0);
        let mut reads = 0;
        let done = watch_during(
            Duration::from_millis(1),
            tokio::time::sleep(Duration::from_millis(20)),
            || {
                reads += 1;
                std::future::ready((reads % 2 == 0).then_some(0))
            },
            || {
                reported.fetch_add(1, Ordering::SeqCst);
                std::future::ready(())
            },
        );
        done.await;
        assert_eq!(reported.load(Ordering::SeqCst), 0);
        assert!(reads > 2);
    }
}
