//! The guest's serial console on the host, bounded: the guest decides
//! how much it writes, so the log it fills is capped
//! (`vm.console_log_kib`), with one previous file (`<log>.1`) kept when it
//! rotates. Both backends write the console into a pipe (QEMU's
//! `chardev file` and the builtin serial port alike just write to a path,
//! here `/proc/self/fd/N` of the pipe's write end, which has no name a
//! crash could leave behind), and a thread of runv copies it into the
//! capped log: the hypervisor never holds the log file itself, nor renames
//! or creates files. The log is made at the first byte, so a VM that never
//! ran leaves none.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use std::os::fd::{AsRawFd, OwnedFd};

use nix::{fcntl::OFlag, unistd::pipe2};

/// A log file that rotates to `<path>.1` at `cap` bytes.
pub struct CappedLog {
    path: PathBuf,
    /// Made at the first write.
    file: Option<File>,
    written: u64,
    cap: u64,
}

impl CappedLog {
    pub fn new(path: &Path, cap: u64) -> CappedLog {
        CappedLog {
            path: path.to_owned(),
            file: None,
            written: 0,
            cap,
        }
    }

    /// The rotated file beside `log`.
    pub fn previous(log: &Path) -> PathBuf {
        let mut name = log.as_os_str().to_owned();
        name.push(".1");
        PathBuf::from(name)
    }

    fn rotate(&mut self) -> io::Result<()> {
        fs::rename(&self.path, Self::previous(&self.path))?;
        self.file = None;
        self.written = 0;
        Ok(())
    }
}

impl Write for CappedLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written >= self.cap {
            self.rotate()?;
        }
        let room = usize::try_from(self.cap - self.written).unwrap_or(usize::MAX);
        let file = match &mut self.file {
            Some(file) => file,
            None => self.file.insert(create_private(&self.path)?),
        };
        let written = file.write(&buf[..buf.len().min(room)])?;
        self.written += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.as_mut().map_or(Ok(()), Write::flush)
    }
}

/// Guest output is for the host's operators only.
fn create_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// The pipe a hypervisor writes the console into, copied into a
/// [`CappedLog`] until every writer has closed it.
pub struct ConsoleCapture {
    /// `/proc/self/fd/N` of the write end below.
    path: PathBuf,
    /// Holds the pipe open for writing while the hypervisor opens it, so
    /// that the copy does not see an end before it starts.
    _write_end: OwnedFd,
}

impl ConsoleCapture {
    /// Makes the pipe and starts copying it into `log`, `cap` bytes a file.
    pub fn start(log: &Path, cap: u64) -> io::Result<ConsoleCapture> {
        let (read_end, write_end) = pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        let mut log_file = CappedLog::new(log, cap);
        let reader = File::from(read_end);
        std::thread::Builder::new()
            .name("console".into())
            .spawn(move || copy(reader, &mut log_file))?;
        Ok(ConsoleCapture {
            path: PathBuf::from(format!("/proc/self/fd/{}", write_end.as_raw_fd())),
            _write_end: write_end,
        })
    }

    /// Where the hypervisor writes the console (`VmSpec::console_log`):
    /// a path for this process only, valid while `self` lives.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Copies until every writer is gone, then drains nothing more. A log
/// that cannot be written is given up, but the FIFO is still read so that
/// the guest's console never blocks.
fn copy(mut reader: File, log: &mut CappedLog) {
    let mut buf = [0u8; 8192];
    let mut logging = true;
    loop {
        let read = match reader.read(&mut buf) {
            Ok(0) => return,
            Ok(read) => read,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, "the guest console cannot be read");
                return;
            }
        };
        if logging {
            if let Err(e) = log.write_all(&buf[..read]) {
                tracing::warn!(log = %log.path.display(), error = %e, "the guest console log stops here");
                logging = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_rotates_at_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = CappedLog::new(&path, 10);
        log.flush().unwrap();
        assert!(!path.exists(), "made at the first byte");
        log.write_all(b"0123456789abcdefghijklmnopqrstuvwxyz")
            .unwrap();
        // 36 bytes through a 10-byte cap: the last 6 in the log, the 10
        // before them in the previous file, the rest gone.
        assert_eq!(fs::read(&path).unwrap(), b"uvwxyz");
        assert_eq!(fs::read(CappedLog::previous(&path)).unwrap(), b"klmnopqrst");
    }

    #[test]
    fn the_console_is_copied_capped_and_leaves_no_name() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let cap = 1 << 20;
        let capture = ConsoleCapture::start(&log, cap).unwrap();
        // What a hypervisor does: open the path and write.
        let mut writer = OpenOptions::new()
            .append(true)
            .open(capture.path())
            .unwrap();
        drop(capture);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0, "nothing yet");
        let chunk = vec![b'x'; 64 << 10];
        // 100 MiB, as a guest flooding its console would write.
        for _ in 0..((100 << 20) / chunk.len()) {
            writer.write_all(&chunk).unwrap();
        }
        writer.write_all(b"end\n").unwrap();
        drop(writer);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !fs::read(&log).unwrap_or_default().ends_with(b"end\n") {
            assert!(
                std::time::Instant::now() < deadline,
                "the copy did not finish"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(fs::metadata(&log).unwrap().len() <= cap);
        assert_eq!(fs::metadata(CappedLog::previous(&log)).unwrap().len(), cap);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&log).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn a_console_nobody_wrote_leaves_no_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        drop(ConsoleCapture::start(&log, 1024).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!log.exists());
    }
}
