//! Checks of an OCI process before the runtime sees it: the OCI runtime
//! reports these mistakes late and vaguely ("failed to unix syscall"), so
//! the agent names the field at fault and what to give instead.

use std::path::Path;

use oci_spec::runtime::Process;

/// The search path when the process's environment has no PATH, as the OCI
/// runtimes use it.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Checks that `process` (of `whose`) has a command and an absolute
/// working directory, and, given the container's `root`, that its program
/// is there.
pub fn check(process: &Process, root: Option<&Path>, whose: &str) -> Result<(), String> {
    let program = process
        .args()
        .as_ref()
        .and_then(|args| args.first())
        .ok_or_else(|| {
            format!("the process of {whose} has no args: give the container a command")
        })?;
    let cwd = process.cwd();
    if !cwd.is_absolute() {
        return Err(format!(
            "the working directory {} of {whose} is not an absolute path (process.cwd, \
             `ctr run --cwd`): give an absolute one",
            cwd.display()
        ));
    }
    match root {
        Some(root) if !program_exists(root, program, search_path(process)) => Err(format!(
            "the program {program:?} of {whose} does not exist in its root file system \
             (searched PATH={}): check the image's entrypoint and command, or the command \
             given to the container",
            search_path(process)
        )),
        _ => Ok(()),
    }
}

fn search_path(process: &Process) -> &str {
    process
        .env()
        .iter()
        .flatten()
        .find_map(|variable| variable.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH)
}

/// Whether `program` names an entry in `root`: a path as it is, a bare
/// name in one of `path`'s directories. A symbolic link counts as there
/// (its target is the runtime's to resolve, inside the container).
fn program_exists(root: &Path, program: &str, path: &str) -> bool {
    let in_root = |guest_path: &Path| {
        let relative = guest_path.strip_prefix("/").unwrap_or(guest_path);
        root.join(relative).symlink_metadata().is_ok()
    };
    match program.contains('/') {
        true => in_root(Path::new(program)),
        false => path
            .split(':')
            .filter(|dir| !dir.is_empty())
            .any(|dir| in_root(&Path::new(dir).join(program))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(args: &[&str], cwd: &str, env: &[&str]) -> Process {
        let mut process = Process::default();
        process.set_args(Some(args.iter().map(|a| a.to_string()).collect()));
        process.set_cwd(cwd.into());
        process.set_env(Some(env.iter().map(|e| e.to_string()).collect()));
        process
    }

    #[test]
    fn programs_are_found_by_path_or_in_the_search_path() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("bin")).unwrap();
        std::fs::write(root.path().join("bin/busybox"), "").unwrap();
        std::os::unix::fs::symlink("busybox", root.path().join("bin/sh")).unwrap();
        let root = Some(root.path());
        for args in [["/bin/busybox"], ["sh"], ["/bin/sh"]] {
            check(&process(&args, "/", &["PATH=/usr/bin:/bin"]), root, "c1").unwrap();
        }
        // No PATH in the environment: the default one, which has /bin.
        check(&process(&["sh"], "/", &[]), root, "c1").unwrap();

        let err = check(&process(&["/no/such/program"], "/", &[]), root, "c1").unwrap_err();
        assert!(
            err.contains("\"/no/such/program\" of c1 does not exist"),
            "{err}"
        );
        let err = check(&process(&["sh"], "/", &["PATH=/usr/bin"]), root, "c1").unwrap_err();
        assert!(err.contains("searched PATH=/usr/bin"), "{err}");
    }

    #[test]
    fn args_and_cwd_are_checked_without_a_root() {
        check(&process(&["anything"], "/work", &[]), None, "c1").unwrap();
        let err = check(&process(&[], "/", &[]), None, "c1").unwrap_err();
        assert!(err.contains("has no args"), "{err}");
        let err = check(&process(&["sh"], "relative/dir", &[]), None, "c1").unwrap_err();
        assert!(
            err.contains("relative/dir of c1 is not an absolute path"),
            "{err}"
        );
    }
}
