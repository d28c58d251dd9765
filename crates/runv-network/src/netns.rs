//! Work inside a network namespace, on a thread of its own.

use std::{fs::File, future::Future, path::Path};

use nix::sched::{setns, CloneFlags};
use rtnetlink::Handle;

use crate::{io_detail, NetworkError};

/// Runs `work` with a netlink handle of the namespace `ns` (opened from
/// `netns`), on a new thread that entered it: `setns` changes only the
/// calling thread, and the netlink socket and any tap opened there stay in
/// that namespace whatever thread uses them later.
pub fn run<T, F, Fut>(netns: &Path, ns: &File, work: F) -> Result<T, NetworkError>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetworkError>>,
{
    let error = |operation: &str, detail: String| NetworkError::Namespace {
        netns: netns.to_owned(),
        operation: operation.into(),
        detail,
    };
    let ns = ns
        .try_clone()
        .map_err(|e| error("duplicate the namespace fd", io_detail(&e)))?;
    let path = netns.to_owned();
    let thread = std::thread::Builder::new()
        .name("runv-netns".into())
        .spawn(move || {
            let error = |operation: &str, detail: String| NetworkError::Namespace {
                netns: path.clone(),
                operation: operation.into(),
                detail,
            };
            setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| {
                error(
                    "enter the namespace (setns)",
                    io_detail(&std::io::Error::from(e)),
                )
            })?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .map_err(|e| error("start a runtime for netlink", io_detail(&e)))?;
            runtime.block_on(async move {
                let (connection, handle, _) = rtnetlink::new_connection()
                    .map_err(|e| error("open a netlink socket", io_detail(&e)))?;
                let connection = tokio::spawn(connection);
                let result = work(handle).await;
                connection.abort();
                result
            })
        })
        .map_err(|e| error("start a thread", io_detail(&e)))?;
    match thread.join() {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
