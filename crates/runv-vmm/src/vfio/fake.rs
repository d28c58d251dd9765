//! An in-memory function for tests, shaped like an SR-IOV VF of a NIC: a
//! 64-bit BAR0 holding the MSI-X table and PBA, and a capability chain
//! PCIe -> MSI -> MSI-X. It remembers what the VMM asked of it.

use std::{ops::Range, sync::Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::{
    vfio::function::{HostMapping, PassthroughFunction, RegionInfo, CONFIG_REGION},
    VmmError,
};

pub const MSIX_VECTORS: u16 = 4;

#[derive(Debug, Default)]
pub struct FakeState {
    pub config: Vec<u8>,
    pub bar0: Vec<u8>,
    /// How many eventfds the last enable_msix got; None once disabled.
    pub msix_events: Option<usize>,
    pub resets: usize,
    pub mmaps: Vec<Range<u64>>,
}

pub struct FakeFunction {
    mappable: Vec<Range<u64>>,
    pub state: Mutex<FakeState>,
}

impl FakeFunction {
    pub const NAME: &'static str = "0000:3b:02.1";
    pub const VENDOR: u16 = 0x8086;
    pub const DEVICE: u16 = 0x154c;
    pub const BAR0_SIZE: u64 = 0x1_0000;
    pub const TABLE: u64 = 0x8000;
    pub const PBA: u64 = 0x9000;
    pub const PCIE_CAP: usize = 0x40;
    pub const MSI_CAP: usize = 0x50;
    pub const MSIX_CAP: usize = 0x70;

    /// A VF whose BAR0 may be mmap-ed whole.
    pub fn vf() -> FakeFunction {
        let mut config = vec![0u8; 256];
        config[0..2].copy_from_slice(&Self::VENDOR.to_le_bytes());
        config[2..4].copy_from_slice(&Self::DEVICE.to_le_bytes());
        // Status: capabilities list.
        config[6] = 1 << 4;
        // Class: Ethernet controller.
        config[0x0b] = 0x02;
        // BAR0: 64-bit (type 2), prefetchable.
        config[0x10] = 0b1100;
        config[0x34] = Self::PCIE_CAP as u8;
        // Interrupt pin INTA, which the guest must not see.
        config[0x3d] = 1;
        config[Self::PCIE_CAP] = 0x10;
        config[Self::PCIE_CAP + 1] = Self::MSI_CAP as u8;
        config[Self::MSI_CAP] = 0x05;
        config[Self::MSI_CAP + 1] = Self::MSIX_CAP as u8;
        config[Self::MSIX_CAP] = 0x11;
        // Table size field: vectors - 1.
        config[Self::MSIX_CAP + 2] = (MSIX_VECTORS - 1) as u8;
        config[Self::MSIX_CAP + 4..Self::MSIX_CAP + 8]
            .copy_from_slice(&(Self::TABLE as u32).to_le_bytes());
        config[Self::MSIX_CAP + 8..Self::MSIX_CAP + 12]
            .copy_from_slice(&(Self::PBA as u32).to_le_bytes());
        FakeFunction {
            mappable: std::iter::once(0..Self::BAR0_SIZE).collect(),
            state: Mutex::new(FakeState {
                config,
                bar0: vec![0; Self::BAR0_SIZE as usize],
                ..FakeState::default()
            }),
        }
    }

    /// A VF whose BAR0 can only be reached through region reads and writes.
    pub fn vf_without_mmap() -> FakeFunction {
        FakeFunction {
            mappable: Vec::new(),
            ..FakeFunction::vf()
        }
    }

    /// A function whose chain ends at MSI.
    pub fn without_msix() -> FakeFunction {
        let function = FakeFunction::vf();
        function.state.lock().unwrap().config[Self::MSI_CAP + 1] = 0;
        function
    }

    fn with_region<R>(&self, index: u32, access: impl FnOnce(&mut Vec<u8>) -> R) -> R {
        let mut state = self.state.lock().unwrap();
        match index {
            CONFIG_REGION => access(&mut state.config),
            0 => access(&mut state.bar0),
            _ => panic!("the fake has no region {index}"),
        }
    }
}

impl PassthroughFunction for FakeFunction {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn region(&self, index: u32) -> RegionInfo {
        match index {
            0 => RegionInfo {
                size: Self::BAR0_SIZE,
                mappable: self.mappable.clone(),
            },
            _ => RegionInfo::default(),
        }
    }

    fn read_region(&self, index: u32, offset: u64, data: &mut [u8]) {
        self.with_region(index, |region| {
            let at = offset as usize;
            data.copy_from_slice(&region[at..at + data.len()]);
        });
    }

    fn write_region(&self, index: u32, offset: u64, data: &[u8]) {
        self.with_region(index, |region| {
            let at = offset as usize;
            region[at..at + data.len()].copy_from_slice(data);
        });
    }

    fn mmap_region(&self, index: u32, range: Range<u64>) -> Result<HostMapping, VmmError> {
        assert_eq!(index, 0);
        let len = range.end - range.start;
        self.state.lock().unwrap().mmaps.push(range);
        HostMapping::new(None, 0, len).map_err(|e| VmmError::Device(e.to_string()))
    }

    fn enable_msix(&self, events: &[&EventFd]) -> Result<(), VmmError> {
        self.state.lock().unwrap().msix_events = Some(events.len());
        Ok(())
    }

    fn disable_msix(&self) -> Result<(), VmmError> {
        self.state.lock().unwrap().msix_events = None;
        Ok(())
    }

    fn reset(&self) {
        self.state.lock().unwrap().resets += 1;
    }
}
