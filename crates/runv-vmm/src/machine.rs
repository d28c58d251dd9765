//! A whole microVM: RAM, the boot of the kernel, the devices, the vCPU
//! threads and the event loop, started together and ended together. This is
//! what an owner (runv's `builtin` hypervisor) holds; it never sees KVM.

use std::{
    collections::HashMap,
    io::Write,
    path::PathBuf,
    sync::{mpsc, Arc, Mutex},
    thread::JoinHandle,
};

use event_manager::MutEventSubscriber;
use vm_memory::GuestMemoryBackend as _;

use crate::{
    boot,
    device_manager::{DeviceManager, SlotIndex},
    devices::add_legacy_devices,
    event_loop::{EventLoop, SubscriberId},
    memory::{create_guest_memory, MMIO_GAP_END},
    mptable,
    pci::{BarAllocator, PciConfigIo, PciRoot, CONFIG_IO_PORT, CONFIG_IO_PORT_LEN},
    seccomp::{self, ThreadKind},
    vcpu::{VcpuHandle, VcpuStop},
    vfio::{DmaMapping, VfioHost, VfioPciDevice},
    virtio::{
        balloon::{self, Balloon},
        block::{Block, BlockConfig},
        fs::{Fs, FsConfig},
        net::{Net, NetConfig},
        pmem::{self, ImageMapping, Pmem},
        vsock::Vsock,
        VirtioDevice,
    },
    VfioConfig, Vm, VmmError,
};

/// Every thread the VMM starts is named with this prefix, so that an owner
/// (or a test) can see that none is left.
pub const THREAD_NAME_PREFIX: &str = "runv-";

/// The virtio-mmio slots declared to the guest at boot: the vsock device
/// takes one, the rest are free for hot-plug (see docs/hotplug.md).
const DEVICE_SLOTS: usize = 16;

/// The guest's vsock, exposed to the host as a hybrid Unix socket.
pub struct VsockConfig {
    pub guest_cid: u64,
    /// Host clients connect here and write `CONNECT <port>\n`; a guest
    /// connection to host port P arrives at `<uds_path>_P`.
    pub uds_path: PathBuf,
}

/// Where the guest's first file system comes from.
pub enum GuestRoot {
    /// A compressed cpio archive the kernel unpacks into guest RAM.
    Initramfs(PathBuf),
    /// An ext4 image given to the guest as a read-only virtio-pmem device
    /// (after the other boot devices), which it mounts as its root with
    /// DAX: its files stay in the host's page cache, shared by every VM.
    PmemImage(PathBuf),
}

/// What to boot.
pub struct MicroVmConfig {
    /// For logs.
    pub name: String,
    /// Uncompressed ELF vmlinux with a PVH entry.
    pub kernel: PathBuf,
    pub root: GuestRoot,
    /// The kernel command line, before the VMM's own device parameters.
    pub kernel_params: String,
    pub vcpus: u8,
    pub memory_bytes: u64,
    /// Where the serial console goes.
    pub console: Box<dyn Write + Send>,
    pub vsock: Option<VsockConfig>,
    /// Network interfaces on taps, in the slots after the vsock's and the
    /// file systems', in this order: the guest's eth0 first.
    pub net_devices: Vec<NetConfig>,
    /// Host directories shared through virtio-fs from boot on, found by
    /// the guest's first probe of their slots (no agent call needed).
    pub filesystems: Vec<FsConfig>,
    /// Host PCI functions passed through on the guest's PCI root bus, in
    /// this order (devices 1, 2, ... of bus 0), cold-plugged: found by the
    /// guest's PCI scan at boot, kept until the VM ends, never hot-plugged.
    /// Each must be bound to vfio-pci on an IOMMU host; the VM's RAM is
    /// then pinned for their DMA. Empty: the guest has no PCI bus.
    pub vfio_devices: Vec<VfioConfig>,
    /// A virtio-balloon through which the guest reports the pages it
    /// frees, whose memory goes back to the host (after the other devices).
    pub free_page_reporting: bool,
    /// The kernel and initramfs are mapped from their files, copy on write
    /// (boot.rs); ignored with VFIO devices.
    pub share_boot_files: bool,
}

/// How a microVM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEnd {
    /// The guest reset itself: how a runv guest powers off.
    GuestReset,
    /// The owner ended it.
    Stopped,
    /// A vCPU failed, with the reason.
    Failed(String),
}

/// Called once, from the VMM's supervisor thread, when the VM has ended and
/// its vCPU and event-loop threads are gone.
pub type OnEnd = Box<dyn FnOnce(VmEnd) + Send>;

/// What the supervisor waits for: a vCPU stopping, or the owner's request.
enum Event {
    Vcpu(u64, Result<VcpuStop, String>),
    StopRequested,
}

/// How an attached device gets its I/O done.
enum Registration {
    /// On the VM's event loop, under this ID.
    Shared(SubscriberId),
    /// On a worker of its own (virtio-fs), whose end takes the device off.
    Worker(EventLoop),
}

/// A running microVM. Dropping it ends the VM.
pub struct MicroVm {
    /// The IOMMU's view of guest RAM for passed-through functions. Dropped
    /// first, while the functions (held by the VM's buses) still hold
    /// their IOMMU domain.
    _vfio_dma: Option<DmaMapping>,
    /// The pmem root image in the guest: taken out after the vCPUs end.
    _root_image: Option<ImageMapping>,
    name: String,
    vm: Arc<Vm>,
    devices: DeviceManager,
    /// Taken and stopped by the supervisor when the VM ends.
    event_loop: Arc<Mutex<Option<EventLoop>>>,
    /// How each attached device is served; shared with the supervisor,
    /// which stops the fs workers when the VM ends.
    registrations: Arc<Mutex<HashMap<SlotIndex, Registration>>>,
    events: mpsc::Sender<Event>,
    supervisor: Mutex<Option<JoinHandle<()>>>,
}

impl MicroVm {
    /// Builds the VM, loads the kernel and starts every vCPU. `on_end` is
    /// called when the VM ends, whatever ends it. On error nothing is left
    /// running.
    pub fn start(config: MicroVmConfig, on_end: OnEnd) -> Result<MicroVm, VmmError> {
        if config.vcpus == 0 {
            return Err(VmmError::Device("a VM needs at least one vCPU".into()));
        }
        let memory = create_guest_memory(config.memory_bytes)?;
        let mut vm = Vm::new(memory.clone())?;
        add_legacy_devices(&mut vm, config.console)?;
        let devices = DeviceManager::new(&mut vm, DEVICE_SLOTS)?;
        let event_loop = EventLoop::spawn(&format!("{THREAD_NAME_PREFIX}events"))?;
        let mut registrations = HashMap::new();
        if let Some(vsock) = config.vsock {
            let device = Vsock::new(vsock.guest_cid, vsock.uds_path)?;
            let (slot, id) = plug(&vm, &devices, &event_loop, device)?;
            registrations.insert(slot, Registration::Shared(id));
        }
        for fs in config.filesystems {
            let (slot, worker) = plug_fs(&vm, &devices, fs)?;
            registrations.insert(slot, worker);
        }
        for net in config.net_devices {
            let (slot, id) = plug(&vm, &devices, &event_loop, Net::new(net)?)?;
            registrations.insert(slot, Registration::Shared(id));
        }
        if config.free_page_reporting {
            let (slot, id) = plug(&vm, &devices, &event_loop, Balloon::new()?)?;
            registrations.insert(slot, Registration::Shared(id));
        }
        let ram_end = vm.memory().last_addr().0 + 1;
        let (initramfs, root_image) = match &config.root {
            GuestRoot::Initramfs(path) => (Some(path.as_path()), None),
            GuestRoot::PmemImage(path) => {
                let address = ram_end.max(MMIO_GAP_END).next_multiple_of(pmem::ALIGNMENT);
                let (device, mapping) = Pmem::new(&vm, path, address)?;
                let (slot, id) = plug(&vm, &devices, &event_loop, device)?;
                registrations.insert(slot, Registration::Shared(id));
                (None, Some(mapping))
            }
        };
        let memory_end = root_image.as_ref().map_or(ram_end, ImageMapping::guest_end);
        let registrations = Arc::new(Mutex::new(registrations));
        let vfio_dma = attach_vfio_devices(&mut vm, &config.vfio_devices, memory_end)?;
        let event_loop = Arc::new(Mutex::new(Some(event_loop)));
        let mut cmdline = format!("{} {}", config.kernel_params, devices.kernel_params());
        if config.free_page_reporting {
            cmdline.push(' ');
            cmdline.push_str(balloon::KERNEL_PARAMS);
        }
        if initramfs.is_none() {
            cmdline.push(' ');
            cmdline.push_str(pmem::ROOT_KERNEL_PARAMS);
        }
        // VFIO pinned guest RAM's pages for DMA above: a boot file mapped
        // over them now would leave the device and the guest on
        // different pages.
        let share_boot_files = config.share_boot_files && config.vfio_devices.is_empty();
        if share_boot_files {
            cmdline.push(' ');
            cmdline.push_str(boot::SHARED_KERNEL_PARAMS);
        }
        let entry = boot::load(
            &memory,
            &config.kernel,
            initramfs,
            &cmdline,
            share_boot_files,
        )?;
        mptable::write(&memory, config.vcpus)?;

        // Every vCPU is set up before any thread starts, so that a failure
        // here has no thread to clean up.
        let vcpus = (0..config.vcpus)
            .map(|id| vm.create_vcpu(id, config.vcpus))
            .collect::<Result<Vec<_>, _>>()?;
        boot::set_up_boot_vcpu(&vcpus[0], vm.memory(), entry)?;

        let vm = Arc::new(vm);
        let (events, events_rx) = mpsc::channel();
        let mut handles = Vec::with_capacity(vcpus.len());
        for vcpu in vcpus {
            let id = vcpu.id();
            let (vm, events) = (vm.clone(), events.clone());
            let handle =
                VcpuHandle::spawn(format!("{THREAD_NAME_PREFIX}vcpu{id}"), vcpu, move |vcpu| {
                    let stop = vcpu.run(&vm).map_err(|e| e.to_string());
                    let _ = events.send(Event::Vcpu(id, stop));
                });
            match handle {
                Ok(handle) => handles.push(handle),
                Err(e) => {
                    stop_vcpus(handles);
                    return Err(e);
                }
            }
        }
        let name = config.name;
        let supervisor = std::thread::Builder::new()
            .name(format!("{THREAD_NAME_PREFIX}vmm"))
            .spawn({
                let (name, event_loop, registrations) =
                    (name.clone(), event_loop.clone(), registrations.clone());
                move || {
                    let threads = VmThreads {
                        vcpus: handles,
                        event_loop: &event_loop,
                        registrations: &registrations,
                    };
                    supervise(&name, events_rx, threads, on_end)
                }
            })
            .map_err(|e| VmmError::Device(format!("cannot start the VMM supervisor: {e}")))?;
        tracing::info!(vm = %name, "microVM started");
        Ok(MicroVm {
            _vfio_dma: vfio_dma,
            _root_image: root_image,
            name,
            vm,
            devices,
            event_loop,
            registrations,
            events,
            supervisor: Mutex::new(Some(supervisor)),
        })
    }

    /// The VM, for hot-plugging devices through [`MicroVm::devices`].
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The virtio-mmio slots, for hot-plug.
    pub fn devices(&self) -> &DeviceManager {
        &self.devices
    }

    /// Hot-plugs a virtio-blk device into a free slot; the guest agent then
    /// binds the slot (docs/hotplug.md).
    pub fn attach_block(&self, config: BlockConfig) -> Result<SlotIndex, VmmError> {
        self.attach_on_loop(Block::new(config)?)
    }

    /// Hot-plugs a virtio-fs device into a free slot.
    pub fn attach_fs(&self, config: FsConfig) -> Result<SlotIndex, VmmError> {
        if self.event_loop.lock().expect("event loop lock").is_none() {
            return Err(vm_ended());
        }
        let (slot, worker) = plug_fs(&self.vm, &self.devices, config)?;
        self.registrations
            .lock()
            .expect("registrations lock")
            .insert(slot, worker);
        Ok(slot)
    }

    /// Hot-plugs a virtio-net device on a tap into a free slot; the guest
    /// agent then binds the slot, as for a block device.
    pub fn attach_net(&self, config: NetConfig) -> Result<SlotIndex, VmmError> {
        self.attach_on_loop(Net::new(config)?)
    }

    fn attach_on_loop<D>(&self, device: Arc<Mutex<D>>) -> Result<SlotIndex, VmmError>
    where
        D: MutEventSubscriber + Send + 'static,
        Arc<Mutex<D>>: VirtioDevice,
    {
        let event_loop = self.event_loop.lock().expect("event loop lock");
        let event_loop = event_loop.as_ref().ok_or_else(vm_ended)?;
        let (slot, id) = plug(&self.vm, &self.devices, event_loop, device)?;
        self.registrations
            .lock()
            .expect("registrations lock")
            .insert(slot, Registration::Shared(id));
        Ok(slot)
    }

    /// Empties `slot` and takes its device off the event loop (or stops
    /// its worker), which drops the device. The guest must have unbound the slot first
    /// (`UnplugVirtioMmio`).
    pub fn detach(&self, slot: SlotIndex) -> Result<(), VmmError> {
        self.devices.detach(&self.vm, slot)?;
        let registration = self
            .registrations
            .lock()
            .expect("registrations lock")
            .remove(&slot);
        let event_loop = self.event_loop.lock().expect("event loop lock");
        match (registration, event_loop.as_ref()) {
            (Some(Registration::Shared(id)), Some(event_loop)) => event_loop.remove_subscriber(id),
            (Some(Registration::Worker(worker)), _) => {
                worker.stop();
                Ok(())
            }
            // A device without I/O of its own, or a VM that has ended
            // and dropped every subscriber with its loop.
            _ => Ok(()),
        }
    }

    /// Ends the VM and waits until its threads are gone. Safe to call more
    /// than once, and after the guest has ended the VM itself.
    pub fn shutdown(&self) {
        let _ = self.events.send(Event::StopRequested);
        let supervisor = self.supervisor.lock().expect("supervisor lock").take();
        if let Some(supervisor) = supervisor {
            if supervisor.join().is_err() {
                tracing::error!(vm = %self.name, "the VMM supervisor panicked");
            }
        }
    }
}

impl Drop for MicroVm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The threads of a VM the supervisor ends.
struct VmThreads<'a> {
    vcpus: Vec<VcpuHandle>,
    event_loop: &'a Mutex<Option<EventLoop>>,
    registrations: &'a Mutex<HashMap<SlotIndex, Registration>>,
}

/// Waits for the first vCPU to stop or for the owner's request, then ends
/// every thread of the VM and reports how it ended. Confines itself first:
/// a VM whose supervisor cannot be confined is ended at once.
fn supervise(name: &str, events: mpsc::Receiver<Event>, threads: VmThreads, on_end: OnEnd) {
    let end = match seccomp::install(ThreadKind::Supervisor) {
        Ok(()) => wait_for_end(name, &events),
        Err(why) => {
            tracing::error!(vm = %name, %why, "ending the VM");
            VmEnd::Failed(why)
        }
    };
    stop_vcpus(threads.vcpus);
    if let Some(event_loop) = threads.event_loop.lock().expect("event loop lock").take() {
        event_loop.stop();
    }
    // Stops the fs workers; the shared loop's IDs mean nothing any more.
    threads
        .registrations
        .lock()
        .expect("registrations lock")
        .clear();
    tracing::info!(vm = %name, ?end, "microVM ended");
    on_end(end);
}

/// How the VM ends: the first vCPU to stop, or the owner.
fn wait_for_end(name: &str, events: &mpsc::Receiver<Event>) -> VmEnd {
    match events.recv() {
        Ok(Event::Vcpu(id, Ok(stop))) => {
            tracing::info!(vm = %name, id, ?stop, "vCPU stopped");
            match stop {
                VcpuStop::Reset => VmEnd::GuestReset,
                VcpuStop::Halted => VmEnd::Failed(format!("vCPU {id} halted for good")),
                VcpuStop::Kicked => VmEnd::Stopped,
            }
        }
        Ok(Event::Vcpu(id, Err(why))) => {
            tracing::error!(vm = %name, id, %why, "vCPU failed");
            VmEnd::Failed(why)
        }
        // The owner asked, or went away without asking.
        Ok(Event::StopRequested) | Err(_) => VmEnd::Stopped,
    }
}

/// Puts the functions of `configs` on a PCI root bus of the guest's, their
/// BARs above `memory_end` (the end of RAM and device memory), and maps
/// the guest's RAM for their DMA; returns that mapping, for the caller to
/// keep until the VM ends. On error, what was attached goes with `vm`.
fn attach_vfio_devices(
    vm: &mut Vm,
    configs: &[VfioConfig],
    memory_end: u64,
) -> Result<Option<DmaMapping>, VmmError> {
    if configs.is_empty() {
        return Ok(None);
    }
    let host = VfioHost::new(vm)?;
    let mut root = PciRoot::new();
    let mut allocator = BarAllocator::new(memory_end);
    for config in configs {
        let function = host.open(config)?;
        let device = VfioPciDevice::attach(vm, &mut allocator, function)?;
        root.add_device(Arc::new(Mutex::new(device)))?;
    }
    let config_io = PciConfigIo::new(Arc::new(Mutex::new(root)));
    vm.pio.insert(
        "pci-config",
        CONFIG_IO_PORT,
        CONFIG_IO_PORT_LEN,
        Arc::new(Mutex::new(config_io)),
    )?;
    // After the functions: the container's IOMMU is set up with the first.
    host.map_guest_memory(vm.memory()).map(Some)
}

/// Registers `device` with the event loop and puts it in a free slot;
/// undoes the registration if no slot takes it.
fn plug<D>(
    vm: &Vm,
    devices: &DeviceManager,
    event_loop: &EventLoop,
    device: Arc<Mutex<D>>,
) -> Result<(SlotIndex, SubscriberId), VmmError>
where
    D: MutEventSubscriber + Send + 'static,
    Arc<Mutex<D>>: VirtioDevice,
{
    let id = event_loop.add_subscriber(device.clone())?;
    match devices.attach(vm, Box::new(device)) {
        Ok(slot) => Ok((slot, id)),
        Err(e) => {
            if let Err(undo) = event_loop.remove_subscriber(id) {
                tracing::warn!(error = %undo, "cannot undo a failed attach");
            }
            Err(e)
        }
    }
}

/// Starts a virtio-fs device on its own worker and puts it in a free slot;
/// the worker stops (dropping the device) if no slot takes it.
fn plug_fs(
    vm: &Vm,
    devices: &DeviceManager,
    config: FsConfig,
) -> Result<(SlotIndex, Registration), VmmError> {
    let (device, worker) = Fs::new(config)?;
    let slot = devices.attach(vm, Box::new(device))?;
    Ok((slot, Registration::Worker(worker)))
}

fn vm_ended() -> VmmError {
    VmmError::Device("the VM has ended".into())
}

/// Kicks every vCPU out of the guest and joins its thread.
fn stop_vcpus(vcpus: Vec<VcpuHandle>) {
    for vcpu in &vcpus {
        vcpu.kick();
    }
    for vcpu in vcpus {
        vcpu.join();
    }
}
