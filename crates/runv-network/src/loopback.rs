//! The pod network namespace's loopback, steered to one listener: how
//! port-forwarding reaches a pod VM.
//!
//! containerd serves CRI PortForward (`kubectl port-forward`) itself, by
//! dialing `127.0.0.1:<port>` inside the pod's network namespace on the
//! host. A runv pod's servers listen in its VM, not there. So that any
//! port reaches the VM, an eBPF `sk_lookup` program attached to that
//! namespace hands every TCP connection to 127.0.0.1 to one listening
//! socket of the shim's, whatever the port (Linux 5.9 and later). The
//! accepted socket's local address is the one the client dialed, so its
//! port is the guest port to connect to. No netfilter rule, no connection
//! tracking, and nothing outside the pod's namespace changes.
//!
//! The program is 21 instructions, written here in eBPF machine code
//! (no compiler at run time). It and its one-entry socket map are made
//! once per process, by [`SteeringProgram::load`], which a process under a
//! seccomp filter that denies loading programs calls before installing it
//! (the shim does); steering a namespace then only puts the listener in
//! the map and attaches the program to the namespace. The steering lasts
//! as long as the [`LoopbackSteering`] (the shim's) or the namespace.

use std::{
    fs::File,
    io,
    net::{Ipv4Addr, SocketAddr, TcpListener as StdTcpListener},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use nix::sched::{setns, CloneFlags};
use tokio::net::{TcpListener, TcpStream};

use crate::{io_detail, NetworkError};

/// The steering program and its socket map, ready to steer one namespace
/// at a time: a second [`SteeringProgram::steer`] takes the first one's
/// connections (a shim serves one pod).
pub struct SteeringProgram {
    map: OwnedFd,
    program: OwnedFd,
}

impl SteeringProgram {
    /// Makes the map and loads the program.
    pub fn load() -> Result<SteeringProgram, String> {
        let map = bpf::socket_map().map_err(|e| format!("cannot make a socket map: {e}"))?;
        let program = bpf::steering_program(&map).map_err(|e| {
            format!(
                "cannot load the eBPF sk_lookup program that steers a pod's loopback (it \
                 needs Linux 5.9 or later with CONFIG_BPF_SYSCALL, and CAP_BPF with \
                 CAP_NET_ADMIN): {e}"
            )
        })?;
        Ok(SteeringProgram { map, program })
    }

    /// Steers the loopback of the namespace at `netns` to a new listener.
    /// Call it inside a tokio runtime, which then serves the listener.
    pub fn steer(&self, netns: &Path) -> Result<LoopbackSteering, NetworkError> {
        let error = |operation: &str, e: io::Error| NetworkError::Namespace {
            netns: netns.to_owned(),
            operation: operation.into(),
            detail: io_detail(&e),
        };
        let ns = File::open(netns).map_err(|e| error("open the namespace", e))?;
        let listener = listen_in(&ns).map_err(|e| error("listen on its loopback", e))?;
        bpf::put(&self.map, &listener)
            .map_err(|e| error("put its loopback listener in the socket map", e))?;
        let link = bpf::attach(&self.program, &ns)
            .map_err(|e| error("attach the sk_lookup program to it", e))?;
        let listener =
            TcpListener::from_std(listener).map_err(|e| error("serve its loopback listener", e))?;
        Ok(LoopbackSteering {
            listener,
            _link: link,
        })
    }
}

/// A listener that gets every TCP connection made to 127.0.0.1 in a
/// network namespace.
pub struct LoopbackSteering {
    listener: TcpListener,
    /// The attachment: closing it detaches the program.
    _link: OwnedFd,
}

impl LoopbackSteering {
    /// The next connection, with the port its client dialed.
    pub async fn accept(&self) -> io::Result<(TcpStream, u16)> {
        let (stream, _) = self.listener.accept().await?;
        let port = stream.local_addr()?.port();
        Ok((stream, port))
    }
}

/// A listener on 127.0.0.1 in the namespace `ns`, made on a thread of its
/// own: `setns` changes the calling thread only, and the socket stays in
/// the namespace it was made in.
fn listen_in(ns: &File) -> io::Result<StdTcpListener> {
    let ns = ns.try_clone()?;
    std::thread::Builder::new()
        .name("runv-loopback".into())
        .spawn(move || {
            setns(&ns, CloneFlags::CLONE_NEWNET)?;
            let listener = StdTcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })?
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// The bpf(2) calls this needs, with the parts of `union bpf_attr` each
/// one reads (the kernel takes a shorter attr and zero-fills the rest).
mod bpf {
    use super::*;

    const BPF_MAP_CREATE: libc::c_int = 0;
    const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
    const BPF_PROG_LOAD: libc::c_int = 5;
    const BPF_LINK_CREATE: libc::c_int = 28;
    const BPF_MAP_TYPE_SOCKMAP: u32 = 15;
    const BPF_PROG_TYPE_SK_LOOKUP: u32 = 30;
    const BPF_SK_LOOKUP: u32 = 36;

    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
    }

    #[repr(C)]
    struct MapUpdate {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }

    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }

    #[repr(C)]
    struct LinkCreate {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
    }

    /// bpf(2) with `attr`; its result is a new file descriptor for the
    /// commands that make one.
    fn bpf<T>(command: libc::c_int, attr: &T) -> io::Result<libc::c_long> {
        // SAFETY: `attr` is a live, fully initialised #[repr(C)] prefix of
        // union bpf_attr, of the size passed; the kernel only reads it
        // (and the buffers it points to, which outlive the call).
        let result = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                command,
                attr as *const T,
                std::mem::size_of::<T>(),
            )
        };
        if result < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(result)
        }
    }

    fn new_fd(command: libc::c_int, attr: &impl Sized) -> io::Result<OwnedFd> {
        let fd = bpf(command, attr)?;
        // SAFETY: these commands return a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// A one-entry socket map.
    pub fn socket_map() -> io::Result<OwnedFd> {
        new_fd(
            BPF_MAP_CREATE,
            &MapCreate {
                map_type: BPF_MAP_TYPE_SOCKMAP,
                key_size: 4,
                value_size: 4,
                max_entries: 1,
            },
        )
    }

    /// Puts `listener` in `map` at key 0, in place of any other.
    pub fn put(map: &OwnedFd, listener: &StdTcpListener) -> io::Result<()> {
        let key: u32 = 0;
        let value: u32 = listener.as_raw_fd() as u32;
        bpf(
            BPF_MAP_UPDATE_ELEM,
            &MapUpdate {
                map_fd: map.as_raw_fd() as u32,
                _pad: 0,
                key: &key as *const u32 as u64,
                value: &value as *const u32 as u64,
                flags: 0,
            },
        )
        .map(drop)
    }

    /// One eBPF instruction: opcode, destination and source registers,
    /// offset, immediate.
    const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
        (code as u64)
            | (((dst | (src << 4)) as u64) << 8)
            | ((off as u16 as u64) << 16)
            | ((imm as u32 as u64) << 32)
    }

    // Opcodes (linux/bpf_common.h, linux/bpf.h).
    const MOV64_REG: u8 = 0xbf;
    const MOV64_IMM: u8 = 0xb7;
    const ADD64_IMM: u8 = 0x07;
    const LDX_W: u8 = 0x61;
    const ST_W: u8 = 0x62;
    const LD_IMM64: u8 = 0x18;
    const JNE_IMM: u8 = 0x55;
    const JEQ_IMM: u8 = 0x15;
    const CALL: u8 = 0x85;
    const EXIT: u8 = 0x95;
    /// LD_IMM64's source register when its immediate is a map's fd.
    const PSEUDO_MAP_FD: u8 = 1;
    // struct bpf_sk_lookup
    const PROTOCOL_OFFSET: i16 = 12;
    const LOCAL_IP4_OFFSET: i16 = 40;
    // Helpers
    const MAP_LOOKUP_ELEM: i32 = 1;
    const SK_RELEASE: i32 = 86;
    const SK_ASSIGN: i32 = 124;
    const IPPROTO_TCP: i32 = 6;
    /// 127.0.0.1 as the program reads it: network order, loaded as a
    /// little-endian u32.
    const LOOPBACK: i32 = u32::from_ne_bytes([127, 0, 0, 1]) as i32;
    const SK_PASS: i32 = 1;

    /// The program: a TCP lookup for 127.0.0.1 gets the map's listener;
    /// every lookup then goes on (to that socket, or as it would have).
    fn steering_instructions(map: &OwnedFd) -> [u64; 21] {
        let map_fd = map.as_raw_fd();
        [
            insn(MOV64_REG, 6, 1, 0, 0),                 // r6 = ctx
            insn(LDX_W, 2, 6, PROTOCOL_OFFSET, 0),       // r2 = ctx->protocol
            insn(JNE_IMM, 2, 0, 16, IPPROTO_TCP),        // not TCP: pass
            insn(LDX_W, 2, 6, LOCAL_IP4_OFFSET, 0),      // r2 = ctx->local_ip4
            insn(JNE_IMM, 2, 0, 14, LOOPBACK),           // not 127.0.0.1: pass
            insn(ST_W, 10, 0, -4, 0),                    // key 0 on the stack
            insn(LD_IMM64, 1, PSEUDO_MAP_FD, 0, map_fd), // r1 = map
            insn(0, 0, 0, 0, 0),                         // (its upper half)
            insn(MOV64_REG, 2, 10, 0, 0),                // r2 = frame pointer
            insn(ADD64_IMM, 2, 0, 0, -4),                // r2 = &key
            insn(CALL, 0, 0, 0, MAP_LOOKUP_ELEM),        // r0 = listener or NULL
            insn(JEQ_IMM, 0, 0, 7, 0),                   // none: pass
            insn(MOV64_REG, 7, 0, 0, 0),                 // r7 = listener
            insn(MOV64_REG, 1, 6, 0, 0),                 // r1 = ctx
            insn(MOV64_REG, 2, 7, 0, 0),                 // r2 = listener
            insn(MOV64_IMM, 3, 0, 0, 0),                 // r3 = no flags
            insn(CALL, 0, 0, 0, SK_ASSIGN),              // sk_assign(ctx, listener, 0)
            insn(MOV64_REG, 1, 7, 0, 0),                 // r1 = listener
            insn(CALL, 0, 0, 0, SK_RELEASE),             // drop the lookup's reference
            insn(MOV64_IMM, 0, 0, 0, SK_PASS),           // pass:
            insn(EXIT, 0, 0, 0, 0),                      // return SK_PASS
        ]
    }

    /// Loads the steering program for `map`; the verifier's log comes
    /// with a refusal.
    pub fn steering_program(map: &OwnedFd) -> io::Result<OwnedFd> {
        let instructions = steering_instructions(map);
        let license = c"Apache-2.0";
        let mut log = vec![0u8; 4096];
        let mut name = [0u8; 16];
        name[..13].copy_from_slice(b"runv_loopback");
        let attr = ProgLoad {
            prog_type: BPF_PROG_TYPE_SK_LOOKUP,
            insn_cnt: instructions.len() as u32,
            insns: instructions.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 1,
            log_size: log.len() as u32,
            log_buf: log.as_mut_ptr() as u64,
            kern_version: 0,
            prog_flags: 0,
            prog_name: name,
            prog_ifindex: 0,
            expected_attach_type: BPF_SK_LOOKUP,
        };
        new_fd(BPF_PROG_LOAD, &attr).map_err(|e| {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let verifier = String::from_utf8_lossy(&log[..end]);
            match verifier.trim() {
                "" => e,
                verifier => io::Error::new(e.kind(), format!("{e}; verifier: {verifier}")),
            }
        })
    }

    /// Attaches `program` to the network namespace `ns`.
    pub fn attach(program: &OwnedFd, ns: &File) -> io::Result<OwnedFd> {
        new_fd(
            BPF_LINK_CREATE,
            &LinkCreate {
                prog_fd: program.as_raw_fd() as u32,
                target_fd: ns.as_raw_fd() as u32,
                attach_type: BPF_SK_LOOKUP,
                flags: 0,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A network namespace of its own, named for `ip netns`, removed at
    /// the end.
    struct TestNetns(String);

    impl TestNetns {
        fn new() -> Option<TestNetns> {
            // SAFETY: geteuid only reads the process's credentials.
            if unsafe { libc::geteuid() } != 0 {
                eprintln!("SKIPPED: network namespaces need root");
                return None;
            }
            let name = format!("runv-loopback-{}", std::process::id());
            let made = Command::new("ip").args(["netns", "add", &name]).status();
            assert!(made.is_ok_and(|s| s.success()), "ip netns add {name}");
            let up = Command::new("ip")
                .args(["-n", &name, "link", "set", "lo", "up"])
                .status();
            assert!(up.is_ok_and(|s| s.success()), "lo up in {name}");
            Some(TestNetns(name))
        }

        fn path(&self) -> std::path::PathBuf {
            Path::new("/run/netns").join(&self.0)
        }
    }

    impl Drop for TestNetns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    /// Dials `port` on 127.0.0.1 inside the namespace, as containerd does.
    fn dial_in(netns: &Path, port: u16) -> io::Result<std::net::TcpStream> {
        let ns = File::open(netns)?;
        std::thread::spawn(move || {
            setns(&ns, CloneFlags::CLONE_NEWNET)?;
            std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        })
        .join()
        .unwrap()
    }

    #[tokio::test]
    async fn every_loopback_port_of_the_namespace_reaches_the_listener() {
        let Some(netns) = TestNetns::new() else {
            return;
        };
        let path = netns.path();
        // Nothing listens there: a dial is refused.
        let refused = dial_in(&path, 8080).unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);

        let steering = SteeringProgram::load().unwrap().steer(&path).unwrap();
        for port in [80, 8080, 65535] {
            let client = dial_in(&path, port).unwrap();
            let (mut stream, asked) = steering.accept().await.unwrap();
            assert_eq!(asked, port);
            let mut client = TcpStream::from_std({
                client.set_nonblocking(true).unwrap();
                client
            })
            .unwrap();
            client.write_all(b"ping").await.unwrap();
            let mut got = [0u8; 4];
            stream.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"ping");
        }

        // The host's own loopback is untouched.
        let host = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let host_port = host.local_addr().unwrap().port();
        drop(host);
        let dialed = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, host_port));
        assert_eq!(dialed.unwrap_err().kind(), io::ErrorKind::ConnectionRefused);

        // Dropped, it steers nothing any more.
        drop(steering);
        let refused = dial_in(&path, 8080).unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
    }
}
