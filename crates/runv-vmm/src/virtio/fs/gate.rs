//! Requests answered before they reach fuse-backend-rs's server: opcodes
//! it cannot represent, and changes to a read-only share.
//!
//! fuse-backend-rs turns an opcode into its `Opcode` enum with a
//! `transmute` (when it traces a request), which is undefined behaviour for
//! the values in the enum's gaps (7 and 19): a guest must not be able to
//! choose them. The passthrough file system has no read-only mode of its
//! own, so a read-only share refuses here every request that would change
//! it, with EROFS as a read-only mount would.

use fuse_backend_rs::{
    abi::fuse_abi::{InHeader, Opcode, OpenIn, OutHeader},
    transport::{Reader, Writer},
};
use fuse_vm_memory::ByteValued;

/// FUSE opcodes that fuse-backend-rs has no `Opcode` variant for, below
/// its `MaxOpcode` (CUSE's are not FUSE's).
const UNREPRESENTABLE: [u32; 2] = [7, 19];

/// The request's header, read from a copy of `reader`.
pub(super) fn header(reader: &Reader<'_>) -> Option<InHeader> {
    reader.clone().read_obj().ok()
}

/// The error to answer the request with instead of serving it, if any.
pub(super) fn refusal(header: &InHeader, reader: &Reader<'_>, read_only: bool) -> Option<i32> {
    if UNREPRESENTABLE.contains(&header.opcode) {
        return Some(libc::ENOSYS);
    }
    let mut body = reader.clone();
    body.read_obj::<InHeader>().ok()?;
    (read_only && modifies(header.opcode, &mut body)).then_some(libc::EROFS)
}

/// Whether the client waits for an answer to a request with `opcode`.
pub(super) fn expects_reply(opcode: u32) -> bool {
    opcode != Opcode::Forget as u32 && opcode != Opcode::BatchForget as u32
}

/// Whether the request changes the shared tree. Reads the body of an OPEN.
fn modifies(opcode: u32, body: &mut Reader<'_>) -> bool {
    const CHANGES: [Opcode; 16] = [
        Opcode::Setattr,
        Opcode::Symlink,
        Opcode::Mknod,
        Opcode::Mkdir,
        Opcode::Unlink,
        Opcode::Rmdir,
        Opcode::Rename,
        Opcode::Link,
        Opcode::Write,
        Opcode::Setxattr,
        Opcode::Removexattr,
        Opcode::Create,
        Opcode::Fallocate,
        Opcode::Rename2,
        Opcode::CopyFileRange,
        Opcode::SetupMapping,
    ];
    if opcode == Opcode::Open as u32 {
        // A malformed OPEN is the server's to refuse.
        return body.read_obj::<OpenIn>().is_ok_and(|open| {
            let flags = open.flags as i32;
            flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0
        });
    }
    CHANGES.iter().any(|&change| change as u32 == opcode)
}

/// Answers the request `unique` with `errno`; returns the reply's length.
pub(super) fn reply_error(
    writer: &mut Writer<'_>,
    errno: i32,
    unique: u64,
) -> std::io::Result<usize> {
    let header = OutHeader {
        len: std::mem::size_of::<OutHeader>() as u32,
        error: -errno,
        unique,
    };
    std::io::Write::write_all(writer, header.as_slice())?;
    Ok(header.len as usize)
}
