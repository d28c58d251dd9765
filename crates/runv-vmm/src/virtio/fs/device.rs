//! The virtio-fs device: a FUSE server (fuse-backend-rs's passthrough file
//! system over the shared directory) answering the hiprio and request
//! queues on the event loop.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use fuse_backend_rs::{
    api::server::Server,
    passthrough::{Config as PassthroughConfig, PassthroughFs},
    transport::{Reader, VirtioFsWriter, Writer},
};
use fuse_virtio_queue::{DescriptorChain, QueueT};
use virtio_queue::Queue;

use super::{
    bridge::{fuse_memory, fuse_queue, FuseMemory, FuseQueue},
    gate,
};
use crate::{
    event_loop::EventLoop,
    memory::GuestMemory,
    virtio::{
        queue_device::{QueueDevice, QueueHandler},
        Interrupt,
    },
    VmmError,
};

/// The virtio device ID of a file system device.
pub const DEVICE_TYPE: u32 = 26;
/// The longest tag the configuration space holds.
pub const MAX_TAG_LEN: usize = 36;
const QUEUE_SIZE: u16 = 256;
/// The hiprio queue (FORGET, INTERRUPT) and one request queue.
const REQUEST_QUEUES: u32 = 1;

/// What to share.
pub struct FsConfig {
    /// What the guest mounts: `mount -t virtiofs <tag> <dir>`.
    pub tag: String,
    /// The host directory the guest sees.
    pub shared_dir: PathBuf,
    /// Every request that would change the share fails with EROFS.
    pub read_only: bool,
}

/// The driver's queues while the device runs.
struct Active {
    /// A view of `_guest`'s mappings, which must outlive it.
    memory: FuseMemory,
    _guest: GuestMemory,
    queues: Vec<FuseQueue>,
    interrupt: Interrupt,
}

/// The device as its slot and its worker share it.
pub type SharedFs = Arc<Mutex<QueueDevice<Fs>>>;

/// A virtio-fs device whose FUSE server runs in the VMM.
pub struct Fs {
    server: Server<Arc<PassthroughFs>>,
    read_only: bool,
    config: [u8; MAX_TAG_LEN + 4],
    active: Option<Active>,
}

impl Fs {
    /// Opens the shared directory and starts the device's own worker, the
    /// event loop that answers its queues in a file system root that is
    /// the share (see [`super::worker`]). Put the device in a slot;
    /// stopping the worker takes it off its queues.
    pub fn new(config: FsConfig) -> Result<(SharedFs, EventLoop), VmmError> {
        if config.tag.is_empty() || config.tag.len() > MAX_TAG_LEN {
            return Err(VmmError::Device(format!(
                "virtio-fs tag {:?} must be 1 to {MAX_TAG_LEN} bytes",
                config.tag
            )));
        }
        let shared_error = |e: std::io::Error| {
            VmmError::Device(format!(
                "virtio-fs shared directory {}: {e}",
                config.shared_dir.display()
            ))
        };
        if !std::fs::metadata(&config.shared_dir)
            .map_err(shared_error)?
            .is_dir()
        {
            return Err(shared_error(std::io::ErrorKind::NotADirectory.into()));
        }
        // The file system is opened here, where /proc is reachable (it keeps
        // /proc/self/fd and /proc/self/mountinfo open), and its root is
        // imported on the worker, once that thread's root is the share.
        let fs = PassthroughFs::new(PassthroughConfig {
            root_dir: "/".into(),
            ..Default::default()
        })
        .map(Arc::new)
        .map_err(shared_error)?;
        // struct virtio_fs_config: tag, then num_request_queues.
        let mut config_space = [0u8; MAX_TAG_LEN + 4];
        config_space[..config.tag.len()].copy_from_slice(config.tag.as_bytes());
        config_space[MAX_TAG_LEN..].copy_from_slice(&REQUEST_QUEUES.to_le_bytes());
        let device = QueueDevice::shared(Fs {
            server: Server::new(fs.clone()),
            read_only: config.read_only,
            config: config_space,
            active: None,
        })?;
        let worker = super::worker::spawn(&config.shared_dir, move || fs.import())?;
        worker.add_subscriber(device.clone())?;
        Ok((device, worker))
    }
}

/// Serves one request; returns the length of the reply written into the
/// chain (0 for a request that has none).
fn serve(
    server: &Server<Arc<PassthroughFs>>,
    read_only: bool,
    memory: &FuseMemory,
    chain: DescriptorChain<&FuseMemory>,
) -> Result<usize, String> {
    let reader =
        Reader::from_descriptor_chain(memory, chain.clone()).map_err(|e| format!("{e}"))?;
    let writer = || -> Result<Writer<'_>, String> {
        let writer = VirtioFsWriter::new(memory, chain.clone()).map_err(|e| format!("{e}"))?;
        Ok(writer.into())
    };
    let header = gate::header(&reader).ok_or("no FUSE header")?;
    if let Some(errno) = gate::refusal(&header, &reader, read_only) {
        return gate::reply_error(&mut writer()?, errno, header.unique).map_err(|e| e.to_string());
    }
    server
        .handle_message(reader, writer()?, None, None)
        .or_else(|e| {
            // A request the server could not decode still gets an answer,
            // so that the guest's caller does not wait for ever.
            tracing::debug!(error = %e, opcode = header.opcode, "malformed FUSE request");
            if !gate::expects_reply(header.opcode) {
                return Ok(0);
            }
            gate::reply_error(&mut writer()?, libc::EINVAL, header.unique)
                .map_err(|e| e.to_string())
        })
}

/// No features: neither notifications nor DAX (which would need a shared
/// memory region).
impl QueueHandler for Fs {
    const DEVICE_TYPE: u32 = DEVICE_TYPE;
    const QUEUE_MAX_SIZES: &'static [u16] = &[QUEUE_SIZE; 1 + REQUEST_QUEUES as usize];

    fn config_space(&self) -> &[u8] {
        &self.config
    }

    fn activate(
        &mut self,
        memory: GuestMemory,
        queues: Vec<Queue>,
        _features: u64,
        interrupt: Interrupt,
    ) -> Result<(), String> {
        if self.active.is_some() {
            return Err("virtio-fs is already active".into());
        }
        self.active = Some(Active {
            memory: fuse_memory(&memory)?,
            _guest: memory,
            queues: queues.iter().map(fuse_queue).collect::<Result<_, _>>()?,
            interrupt,
        });
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(queue) = active.queues.get_mut(index) else {
            return;
        };
        let memory = &active.memory;
        let mut returned = false;
        while let Some(chain) = queue.pop_descriptor_chain(memory) {
            let head = chain.head_index();
            let used = serve(&self.server, self.read_only, memory, chain).unwrap_or_else(|why| {
                tracing::debug!(%why, "virtio-fs request failed");
                0
            });
            if let Err(e) = queue.add_used(memory, head, used as u32) {
                tracing::warn!(error = %e, "cannot return a virtio-fs request");
            }
            returned = true;
        }
        if returned && queue.needs_notification(memory).unwrap_or(true) {
            active.interrupt.signal_used_queue();
        }
    }

    fn reset(&mut self) {
        self.active = None;
    }
}
