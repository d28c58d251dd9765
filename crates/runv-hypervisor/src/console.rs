//! The guest's serial console on the host, bounded: the guest decides
//! how much it writes, so the log it fills is capped at
//! [`CONSOLE_LOG_CAP`] bytes, with one previous file (`<log>.1`) kept when
//! it rotates. Both backends write the console into a FIFO (QEMU's
//! `chardev file` and the builtin serial port alike just write to a path),
//! and a thread of runv copies it into the capped log: the hypervisor
//! never holds the log file itself, nor renames or creates files.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use nix::{sys::stat::Mode, unistd::mkfifo};

/// The most bytes one console log file holds.
pub const CONSOLE_LOG_CAP: u64 = 1 << 20;

/// A log file that rotates to `<path>.1` at `cap` bytes.
pub struct CappedLog {
    path: PathBuf,
    file: File,
    written: u64,
    cap: u64,
}

impl CappedLog {
    pub fn create(path: &Path, cap: u64) -> io::Result<CappedLog> {
        Ok(CappedLog {
            path: path.to_owned(),
            file: create_private(path)?,
            written: 0,
            cap,
        })
    }

    /// The rotated file beside `log`.
    pub fn previous(log: &Path) -> PathBuf {
        let mut name = log.as_os_str().to_owned();
        name.push(".1");
        PathBuf::from(name)
    }

    fn rotate(&mut self) -> io::Result<()> {
        fs::rename(&self.path, Self::previous(&self.path))?;
        self.file = create_private(&self.path)?;
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
        let written = self.file.write(&buf[..buf.len().min(room)])?;
        self.written += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
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

/// The FIFO a hypervisor writes the console into, copied into a
/// [`CappedLog`] until every writer has closed it.
pub struct ConsoleCapture {
    fifo: PathBuf,
    /// Holds the FIFO open for writing until the hypervisor has opened
    /// it, so that the copy does not see an end before it starts.
    _keep_open: File,
}

impl ConsoleCapture {
    /// Makes the FIFO `<log>.pipe` and starts copying it into `log`.
    pub fn start(log: &Path) -> io::Result<ConsoleCapture> {
        let mut fifo = log.as_os_str().to_owned();
        fifo.push(".pipe");
        let fifo = PathBuf::from(fifo);
        let _ = fs::remove_file(&fifo);
        mkfifo(&fifo, Mode::S_IRUSR | Mode::S_IWUSR).map_err(io::Error::from)?;
        let opened = (|| {
            // Non-blocking: no writer is there yet.
            let reader = OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_NONBLOCK)
                .open(&fifo)?;
            let keep_open = OpenOptions::new().write(true).open(&fifo)?;
            set_blocking(&reader)?;
            let mut log_file = CappedLog::create(log, CONSOLE_LOG_CAP)?;
            std::thread::Builder::new()
                .name("console".into())
                .spawn(move || copy(reader, &mut log_file))?;
            Ok(keep_open)
        })();
        match opened {
            Ok(keep_open) => Ok(ConsoleCapture {
                fifo,
                _keep_open: keep_open,
            }),
            Err(e) => {
                let _ = fs::remove_file(&fifo);
                Err(e)
            }
        }
    }

    /// Where the hypervisor writes the console (`VmSpec::console_log`).
    pub fn fifo(&self) -> &Path {
        &self.fifo
    }
}

impl Drop for ConsoleCapture {
    /// The hypervisor has its own descriptor by now (or never will): the
    /// FIFO's name goes, and the copy ends when the hypervisor's end closes.
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.fifo);
    }
}

fn set_blocking(file: &File) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(file, FcntlArg::F_GETFL)?);
    fcntl(file, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK))?;
    Ok(())
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
        let mut log = CappedLog::create(&path, 10).unwrap();
        log.write_all(b"0123456789abcdefghijklmnopqrstuvwxyz")
            .unwrap();
        // 36 bytes through a 10-byte cap: the last 6 in the log, the 10
        // before them in the previous file, the rest gone.
        assert_eq!(fs::read(&path).unwrap(), b"uvwxyz");
        assert_eq!(fs::read(CappedLog::previous(&path)).unwrap(), b"klmnopqrst");
    }

    #[test]
    fn the_fifo_is_copied_capped_and_goes_away() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let capture = ConsoleCapture::start(&log).unwrap();
        let fifo = capture.fifo().to_owned();
        // What a hypervisor does: open the path and write.
        let mut writer = OpenOptions::new().write(true).open(&fifo).unwrap();
        drop(capture);
        assert!(!fifo.exists(), "the FIFO's name is removed");
        let chunk = vec![b'x'; 64 << 10];
        // 100 MiB, as a guest flooding its console would write.
        for _ in 0..((100 << 20) / chunk.len()) {
            writer.write_all(&chunk).unwrap();
        }
        writer.write_all(b"end\n").unwrap();
        drop(writer);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !fs::read(&log).unwrap().ends_with(b"end\n") {
            assert!(
                std::time::Instant::now() < deadline,
                "the copy did not finish"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(fs::metadata(&log).unwrap().len() <= CONSOLE_LOG_CAP);
        assert_eq!(
            fs::metadata(CappedLog::previous(&log)).unwrap().len(),
            CONSOLE_LOG_CAP
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&log).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
