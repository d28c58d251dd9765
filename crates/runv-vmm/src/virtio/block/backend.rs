//! What a virtio-blk device reads and writes: a raw image file or a host
//! block device, through the host page cache.
//!
//! Not O_DIRECT: guest buffers need not be aligned to the backend's
//! logical block size, which O_DIRECT requires of every address and
//! length, so it would need bounce buffers; and nothing was measured that
//! says the page cache costs more than it saves here.

use std::{
    fs::{File, OpenOptions},
    io,
    os::{
        fd::AsRawFd,
        unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt},
    },
    path::Path,
};

use vmm_sys_util::{
    ioctl::{ioctl_with_mut_ref, ioctl_with_ref},
    ioctl_io_nr, ioctl_ior_nr,
};

use super::request::SECTOR_SIZE;

ioctl_ior_nr!(BLKGETSIZE64, 0x12, 114, u64);
ioctl_io_nr!(BLKDISCARD, 0x12, 119);
ioctl_io_nr!(BLKZEROOUT, 0x12, 127);

/// Where the blocks live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    BlockDevice,
}

pub(super) struct Backend {
    file: File,
    kind: Kind,
    writable: bool,
    size: u64,
    /// Discard (and unmapping write-zeroes) works on this backend.
    discard: bool,
    /// The granularity of a discard, in bytes.
    discard_granularity: u64,
}

impl Backend {
    /// Opens `path`, a regular file or a block device.
    pub(super) fn open(path: &Path, read_only: bool) -> io::Result<Backend> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        let metadata = file.metadata()?;
        let kind = if metadata.file_type().is_block_device() {
            Kind::BlockDevice
        } else if metadata.is_file() {
            Kind::File
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "neither a regular file nor a block device",
            ));
        };
        let mut backend = Backend {
            file,
            kind,
            writable: !read_only,
            size: 0,
            discard: false,
            discard_granularity: SECTOR_SIZE,
        };
        match kind {
            Kind::File => {
                backend.size = metadata.len();
                backend.discard_granularity = metadata.blksize().max(SECTOR_SIZE);
                // A hole punched past the end changes nothing but says
                // whether the file system can punch holes at all.
                backend.discard = !read_only
                    && backend
                        .fallocate(
                            libc::FALLOC_FL_PUNCH_HOLE,
                            backend.size.next_multiple_of(backend.discard_granularity),
                            backend.discard_granularity,
                        )
                        .is_ok();
            }
            Kind::BlockDevice => {
                // SAFETY: BLKGETSIZE64 writes one u64, which `size` is.
                let ret =
                    unsafe { ioctl_with_mut_ref(&backend.file, BLKGETSIZE64(), &mut backend.size) };
                if ret < 0 {
                    return Err(io::Error::last_os_error());
                }
                let granularity = block_queue_limit(&metadata, "discard_granularity");
                backend.discard = !read_only
                    && block_queue_limit(&metadata, "discard_max_bytes").is_some_and(|max| max > 0);
                backend.discard_granularity = granularity.unwrap_or(SECTOR_SIZE).max(SECTOR_SIZE);
            }
        }
        Ok(backend)
    }

    /// The size in bytes; a partial last sector is not reachable.
    pub(super) fn size(&self) -> u64 {
        self.size
    }

    pub(super) fn supports_discard(&self) -> bool {
        self.discard
    }

    /// Files zero ranges by the same means as they discard; block devices
    /// always can (the kernel writes zeroes where the device cannot).
    pub(super) fn supports_write_zeroes(&self) -> bool {
        match self.kind {
            Kind::File => self.discard,
            Kind::BlockDevice => self.writable,
        }
    }

    pub(super) fn discard_granularity(&self) -> u64 {
        self.discard_granularity
    }

    /// Fills `buffers` from `offset` on.
    pub(super) fn read_at(&self, buffers: &mut [libc::iovec], offset: u64) -> io::Result<()> {
        self.transfer(buffers, offset, |fd, iov, count, at| {
            // SAFETY: the iovecs point into guest memory the caller holds
            // mapped for the call; preadv writes at most their lengths.
            unsafe { libc::preadv(fd, iov, count, at) }
        })
    }

    /// Writes `buffers` at `offset`.
    pub(super) fn write_at(&self, buffers: &mut [libc::iovec], offset: u64) -> io::Result<()> {
        self.transfer(buffers, offset, |fd, iov, count, at| {
            // SAFETY: the iovecs point into guest memory the caller holds
            // mapped for the call; pwritev only reads them.
            unsafe { libc::pwritev(fd, iov, count, at) }
        })
    }

    /// Runs `op` until every byte of `buffers` moved, resuming after short
    /// transfers; hitting the end of the backend is an error.
    fn transfer(
        &self,
        mut buffers: &mut [libc::iovec],
        mut offset: u64,
        op: impl Fn(i32, *const libc::iovec, i32, libc::off_t) -> isize,
    ) -> io::Result<()> {
        while !buffers.is_empty() {
            let count = buffers.len().min(libc::UIO_MAXIOV as usize) as i32;
            let at = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
            let done = op(self.file.as_raw_fd(), buffers.as_ptr(), count, at);
            let mut done = match done {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n if n < 0 => {
                    let error = io::Error::last_os_error();
                    if error.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(error);
                }
                n => n as usize,
            };
            offset += done as u64;
            while let Some(first) = buffers.first_mut() {
                if done < first.iov_len {
                    // SAFETY: `done` is within the buffer the iovec describes.
                    first.iov_base = unsafe { first.iov_base.cast::<u8>().add(done) }.cast();
                    first.iov_len -= done;
                    break;
                }
                done -= first.iov_len;
                buffers = &mut std::mem::take(&mut buffers)[1..];
            }
        }
        Ok(())
    }

    pub(super) fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Lets the backend forget `len` bytes at `offset`: a hole in a file,
    /// a discard on a device.
    pub(super) fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.kind {
            Kind::File => self.fallocate(libc::FALLOC_FL_PUNCH_HOLE, offset, len),
            Kind::BlockDevice => self.block_range_ioctl(BLKDISCARD(), offset, len),
        }
    }

    /// Makes `len` bytes at `offset` read as zeroes, deallocating them if
    /// `unmap` allows it and the backend can.
    pub(super) fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        match self.kind {
            Kind::File if unmap && self.discard => self.discard(offset, len),
            Kind::File => match self.fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len) {
                // Some file systems (tmpfs) punch holes but cannot zero a
                // range in place; a hole reads as zeroes too.
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => self.discard(offset, len),
                result => result,
            },
            Kind::BlockDevice => self.block_range_ioctl(BLKZEROOUT(), offset, len),
        }
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
        else {
            return Err(io::Error::from_raw_os_error(libc::EOVERFLOW));
        };
        // SAFETY: fallocate only acts on the descriptor we own.
        let ret = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn block_range_ioctl(&self, request: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
        let range = [offset, len];
        // SAFETY: BLKDISCARD and BLKZEROOUT read two u64s, which `range` is.
        let ret = unsafe { ioctl_with_ref(&self.file, request, &range) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// A number from the block device's queue limits in sysfs.
fn block_queue_limit(metadata: &std::fs::Metadata, name: &str) -> Option<u64> {
    let (major, minor) = (libc::major(metadata.rdev()), libc::minor(metadata.rdev()));
    std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/queue/{name}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}
