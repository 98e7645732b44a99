//! The virtio-over-PCI transport (VIRTIO 1.2 section 4.1), shared by virtio devices.
//!
//! Emulated: vendor 1af4; a transitional function (device 0x1000 + type, revision 0,
//! subsystem id = virtio device type) with the legacy I/O header in BAR0 *and* the modern
//! capabilities, or a modern-only function (device 0x1040 + type, revision 1, subsystem id
//! 0x1100). Modern registers live in BAR4 (64-bit prefetchable memory, 16 KiB): common
//! configuration at 0x0000, ISR at 0x1000, device configuration at 0x2000, notifications at
//! 0x3000 (`notify_off_multiplier` 4, queue *n* at 0x3000 + 4n); the PCI configuration
//! access capability (`VIRTIO_PCI_CAP_PCI_CFG`) reaches any BAR through configuration space.
//! MSI-X: capability at 0x40, table at BAR1 offset 0, PBA at BAR1 offset 0x800, a config
//! vector and one vector per queue, per-vector and function masking with pending bits,
//! delivered through [`MsiSink`]. Without MSI-X: INTA# through `IrqLine`, level while the ISR
//! is non-zero, cleared by reading the ISR. Device status with FEATURES_OK checking (features
//! the device does not offer or, on the modern interface, a missing VERSION_1 refuse it),
//! DEVICE_NEEDS_RESET on bad guest input (with a configuration interrupt), reset by writing 0.
//!
//! The transport knows nothing about the device behind it: queue notifications, resets,
//! DRIVER_OK and device-configuration writes come back to the device as [`TransportEvent`]s;
//! the device's configuration bytes are a plain buffer the device keeps up to date.
//!
//! Not emulated: packed rings, per-queue reset (1.2 `queue_reset`), notification data,
//! shared memory capabilities, SR-IOV, MSI (only MSI-X).

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::irq::IrqLine;
use crate::pci::{PciConfigSpace, NUM_BARS};
use crate::virtio_queue::{Queue, NO_VECTOR};
use crate::GuestMemory;

pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Transitional devices: 0x1000 + (virtio device type - 1) (0x1000 is the network card).
pub const VIRTIO_PCI_TRANSITIONAL_BASE: u16 = 0x0fff;
/// Modern devices: 0x1040 + virtio device type.
pub const VIRTIO_PCI_MODERN_BASE: u16 = 0x1040;
/// Subsystem id of modern-only devices (anything at or above 0x40 works; QEMU's choice).
pub const VIRTIO_PCI_MODERN_SUBSYSTEM_ID: u16 = 0x1100;

// Device status bits.
pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

// Transport feature bits.
pub const VIRTIO_F_NOTIFY_ON_EMPTY: u64 = 1 << 24;
pub const VIRTIO_F_ANY_LAYOUT: u64 = 1 << 27;
pub const VIRTIO_F_RING_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

// ISR bits.
pub const ISR_QUEUE: u8 = 1;
pub const ISR_CONFIG: u8 = 2;

// BAR layout.
pub const BAR_LEGACY: usize = 0;
pub const LEGACY_BAR_SIZE: u64 = 0x40;
pub const BAR_MSIX: usize = 1;
pub const MSIX_BAR_SIZE: u64 = 0x1000;
pub const MSIX_TABLE_OFFSET: u64 = 0;
pub const MSIX_PBA_OFFSET: u64 = 0x800;
pub const BAR_MODERN: usize = 4;
pub const MODERN_BAR_SIZE: u64 = 0x4000;
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
pub const COMMON_CFG_SIZE: u64 = 0x38;
pub const ISR_CFG_OFFSET: u64 = 0x1000;
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
pub const DEVICE_CFG_SIZE: u64 = 0x1000;
pub const NOTIFY_CFG_OFFSET: u64 = 0x3000;
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;

// Configuration-space capabilities.
pub const CAP_MSIX: usize = 0x40;
pub const CAP_COMMON: usize = 0x50;
pub const CAP_ISR: usize = 0x60;
pub const CAP_DEVICE: usize = 0x70;
pub const CAP_NOTIFY: usize = 0x80;
pub const CAP_PCI_CFG: usize = 0x94;
const PCI_CAP_ID_VENDOR: u8 = 0x09;
const PCI_CAP_ID_MSIX: u8 = 0x11;
const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;
const MSIX_CONTROL_ENABLE: u16 = 1 << 15;
const MSIX_CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Most MSI-X vectors this transport offers.
pub const MAX_MSIX_VECTORS: u16 = 64;

/// Legacy header: device configuration starts here without / with MSI-X enabled.
pub const LEGACY_CONFIG_OFFSET: u64 = 20;
pub const LEGACY_CONFIG_OFFSET_MSIX: u64 = 24;

/// Where interrupts go when MSI-X is enabled: the engine implements it with
/// `KVM_SIGNAL_MSI`, tests with [`RecordingMsiSink`].
pub trait MsiSink: Send + Sync {
    fn send_msi(&self, address: u64, data: u32);
}

/// An MSI sink that drops every message (a machine without MSI support).
pub struct NoMsi;
impl MsiSink for NoMsi {
    fn send_msi(&self, _address: u64, _data: u32) {}
}

/// Keeps every message, for tests.
#[derive(Default)]
pub struct RecordingMsiSink {
    messages: Mutex<Vec<(u64, u32)>>,
}

impl RecordingMsiSink {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
    /// The messages sent so far, removing them.
    pub fn take(&self) -> Vec<(u64, u32)> {
        std::mem::take(&mut *self.messages.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl MsiSink for RecordingMsiSink {
    fn send_msi(&self, address: u64, data: u32) {
        self.messages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((address, data));
    }
}

/// Which interfaces the function offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VirtioPciMode {
    /// Device 0x1000 + type - 1: legacy BAR0 I/O header plus the modern BAR4 (QEMU's default).
    Transitional,
    /// Device 0x1040 + type: modern capabilities only, VERSION_1 required.
    Modern,
}

/// Something the device behind the transport must act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransportEvent {
    /// The driver notified queue `n` (the value is unchecked).
    QueueNotify(u16),
    /// The driver wrote 0 to the status: the transport state is already reset.
    Reset,
    /// The driver set DRIVER_OK.
    DriverOk,
    /// The driver wrote `data` at `offset` of the device configuration.
    DeviceConfigWrite { offset: u64, data: Vec<u8> },
}

/// One MSI-X table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntry {
    pub address: u64,
    pub data: u32,
    pub masked: bool,
}

impl Default for MsixEntry {
    fn default() -> Self {
        Self {
            address: 0,
            data: 0,
            masked: true,
        }
    }
}

/// Everything of the transport that survives save/restore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub config: PciConfigSpace,
    pub status: u8,
    /// Features the driver wrote (checked against the offer at FEATURES_OK).
    pub driver_features: u64,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub queue_select: u16,
    pub queues: Vec<Queue>,
    pub config_vector: u16,
    pub isr: u8,
    pub config_generation: u8,
    pub msix_table: Vec<MsixEntry>,
    pub msix_pending: Vec<bool>,
}

/// Errors of [`VirtioPciTransport::restore`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TransportError {
    #[error("saved virtio state has {found} {what}, expected {expected}; the snapshot is damaged or from another configuration")]
    BadLength {
        what: &'static str,
        found: usize,
        expected: usize,
    },
}

/// The PCI side of one virtio device.
pub struct VirtioPciTransport {
    state: TransportState,
    mode: VirtioPciMode,
    device_features: u64,
    device_config: Vec<u8>,
    memory: GuestMemory,
    irq: Arc<dyn IrqLine>,
    msi: Arc<dyn MsiSink>,
}

/// Which register (start, width) of a layout holds byte `offset`.
type Layout = fn(u64, bool) -> Option<(u64, u64)>;

fn legacy_layout(offset: u64, msix: bool) -> Option<(u64, u64)> {
    match offset {
        0..=3 => Some((0, 4)),
        4..=7 => Some((4, 4)),
        8..=11 => Some((8, 4)),
        12..=13 => Some((12, 2)),
        14..=15 => Some((14, 2)),
        16..=17 => Some((16, 2)),
        18 => Some((18, 1)),
        19 => Some((19, 1)),
        20..=21 if msix => Some((20, 2)),
        22..=23 if msix => Some((22, 2)),
        _ => None,
    }
}

fn common_layout(offset: u64, _msix: bool) -> Option<(u64, u64)> {
    match offset {
        0x00..=0x0f => Some((offset & !3, 4)),
        0x10..=0x13 => Some((offset & !1, 2)),
        0x14 | 0x15 => Some((offset, 1)),
        0x16..=0x1f => Some((offset & !1, 2)),
        0x20..=0x37 => Some((offset & !3, 4)),
        _ => None,
    }
}

fn msix_table_layout(offset: u64, _msix: bool) -> Option<(u64, u64)> {
    Some((offset & !3, 4))
}

/// Groups the bytes of an access at `offset` by register: (start, width, [(data index, byte
/// in register)]). Bytes outside every register are left out.
fn split_access(
    offset: u64,
    len: usize,
    layout: Layout,
    msix: bool,
) -> Vec<(u64, Vec<(usize, u64)>)> {
    let mut groups: Vec<(u64, Vec<(usize, u64)>)> = Vec::new();
    for i in 0..len {
        let Some(off) = offset.checked_add(i as u64) else {
            break;
        };
        let Some((start, _width)) = layout(off, msix) else {
            continue;
        };
        match groups.last_mut() {
            Some((s, bytes)) if *s == start => bytes.push((i, off - start)),
            _ => groups.push((start, vec![(i, off - start)])),
        }
    }
    groups
}

fn merge_bytes(old: u64, bytes: &[(usize, u64)], data: &[u8]) -> u64 {
    let mut value = old;
    for &(i, b) in bytes {
        if b < 8 {
            let shift = 8 * b;
            value = (value & !(0xff << shift)) | (u64::from(data[i]) << shift);
        }
    }
    value
}

fn virtio_cap(cfg_type: u8, bar: u8, offset: u32, length: u32, extra: &[u8]) -> Vec<u8> {
    let cap_len = 16 + extra.len() as u8;
    let mut body = vec![cap_len, cfg_type, bar, 0, 0, 0];
    body.extend_from_slice(&offset.to_le_bytes());
    body.extend_from_slice(&length.to_le_bytes());
    body.extend_from_slice(extra);
    body
}

impl VirtioPciTransport {
    /// A transport for virtio device type `device_type` (1 = network) offering
    /// `device_features` (VERSION_1 is added), with one queue per entry of
    /// `queue_max_sizes`, `device_config` as the initial device configuration bytes and
    /// `msix_vectors` MSI-X vectors (at most [`MAX_MSIX_VECTORS`]; 0 = no MSI-X).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        mode: VirtioPciMode,
        device_type: u16,
        class_code: u32,
        device_features: u64,
        queue_max_sizes: &[u16],
        msix_vectors: u16,
        device_config: Vec<u8>,
        memory: GuestMemory,
        irq: Arc<dyn IrqLine>,
        msi: Arc<dyn MsiSink>,
    ) -> Self {
        let msix_vectors = msix_vectors.min(MAX_MSIX_VECTORS);
        let mut config = PciConfigSpace::new();
        match mode {
            VirtioPciMode::Transitional => {
                config.set_ids(
                    VIRTIO_PCI_VENDOR_ID,
                    VIRTIO_PCI_TRANSITIONAL_BASE.wrapping_add(device_type),
                );
                config.set_revision(0);
                config.set_subsystem(VIRTIO_PCI_VENDOR_ID, device_type);
                config.add_io_bar(BAR_LEGACY, LEGACY_BAR_SIZE);
            }
            VirtioPciMode::Modern => {
                config.set_ids(
                    VIRTIO_PCI_VENDOR_ID,
                    VIRTIO_PCI_MODERN_BASE.wrapping_add(device_type),
                );
                config.set_revision(1);
                config.set_subsystem(VIRTIO_PCI_VENDOR_ID, VIRTIO_PCI_MODERN_SUBSYSTEM_ID);
            }
        }
        config.set_class(class_code);
        config.set_interrupt_pin(1);
        config.add_memory_bar(BAR_MODERN, MODERN_BAR_SIZE, true, true);
        if msix_vectors > 0 {
            config.add_memory_bar(BAR_MSIX, MSIX_BAR_SIZE, false, false);
            let mut body = Vec::new();
            body.extend_from_slice(&(msix_vectors - 1).to_le_bytes());
            body.extend_from_slice(&(MSIX_TABLE_OFFSET as u32 | BAR_MSIX as u32).to_le_bytes());
            body.extend_from_slice(&(MSIX_PBA_OFFSET as u32 | BAR_MSIX as u32).to_le_bytes());
            config.add_capability(CAP_MSIX, PCI_CAP_ID_MSIX, &body);
            config.set_writable(
                CAP_MSIX + 2,
                &(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK).to_le_bytes(),
            );
        }
        let bar = BAR_MODERN as u8;
        config.add_capability(
            CAP_COMMON,
            PCI_CAP_ID_VENDOR,
            &virtio_cap(
                VIRTIO_PCI_CAP_COMMON_CFG,
                bar,
                COMMON_CFG_OFFSET as u32,
                0x1000,
                &[],
            ),
        );
        config.add_capability(
            CAP_ISR,
            PCI_CAP_ID_VENDOR,
            &virtio_cap(
                VIRTIO_PCI_CAP_ISR_CFG,
                bar,
                ISR_CFG_OFFSET as u32,
                0x1000,
                &[],
            ),
        );
        config.add_capability(
            CAP_DEVICE,
            PCI_CAP_ID_VENDOR,
            &virtio_cap(
                VIRTIO_PCI_CAP_DEVICE_CFG,
                bar,
                DEVICE_CFG_OFFSET as u32,
                DEVICE_CFG_SIZE as u32,
                &[],
            ),
        );
        config.add_capability(
            CAP_NOTIFY,
            PCI_CAP_ID_VENDOR,
            &virtio_cap(
                VIRTIO_PCI_CAP_NOTIFY_CFG,
                bar,
                NOTIFY_CFG_OFFSET as u32,
                0x1000,
                &NOTIFY_OFF_MULTIPLIER.to_le_bytes(),
            ),
        );
        config.add_capability(
            CAP_PCI_CFG,
            PCI_CAP_ID_VENDOR,
            &virtio_cap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, 0, &[0; 4]),
        );
        // The driver programs bar, offset, length and data of the access window.
        config.set_writable(CAP_PCI_CFG + 4, &[0xff]);
        config.set_writable_range(CAP_PCI_CFG + 8, 12);

        let mut device_features = device_features | VIRTIO_F_VERSION_1;
        if mode == VirtioPciMode::Modern {
            device_features &= !VIRTIO_F_NOTIFY_ON_EMPTY;
        }
        Self {
            state: TransportState {
                config,
                status: 0,
                driver_features: 0,
                device_feature_select: 0,
                driver_feature_select: 0,
                queue_select: 0,
                queues: queue_max_sizes.iter().map(|&m| Queue::new(m)).collect(),
                config_vector: NO_VECTOR,
                isr: 0,
                config_generation: 0,
                msix_table: vec![MsixEntry::default(); usize::from(msix_vectors)],
                msix_pending: vec![false; usize::from(msix_vectors)],
            },
            mode,
            device_features,
            device_config,
            memory,
            irq,
            msi,
        }
    }

    pub fn config(&self) -> &PciConfigSpace {
        &self.state.config
    }

    pub fn config_mut(&mut self) -> &mut PciConfigSpace {
        &mut self.state.config
    }

    pub fn mode(&self) -> VirtioPciMode {
        self.mode
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    pub fn device_features(&self) -> u64 {
        self.device_features
    }

    /// The features in force: what the driver wrote, limited to what the device offers.
    pub fn features(&self) -> u64 {
        self.state.driver_features & self.device_features
    }

    pub fn has_feature(&self, feature: u64) -> bool {
        self.features() & feature == feature
    }

    pub fn status(&self) -> u8 {
        self.state.status
    }

    /// DRIVER_OK set and neither FAILED nor NEEDS_RESET: the device may use its queues.
    pub fn driver_ok(&self) -> bool {
        self.state.status & STATUS_DRIVER_OK != 0
            && self.state.status & (STATUS_FAILED | STATUS_NEEDS_RESET) == 0
    }

    /// Queues may be processed: not failed, not waiting for reset, bus mastering on.
    pub fn queues_usable(&self) -> bool {
        self.state.status & (STATUS_FAILED | STATUS_NEEDS_RESET) == 0
            && self.state.config.bus_master_enabled()
    }

    pub fn queue(&self, index: usize) -> Option<&Queue> {
        self.state.queues.get(index)
    }

    pub fn queue_mut(&mut self, index: usize) -> Option<&mut Queue> {
        self.state.queues.get_mut(index)
    }

    /// The queue and guest memory at once (for popping and filling chains).
    pub fn queue_and_memory(&mut self, index: usize) -> Option<(&mut Queue, &GuestMemory)> {
        let memory = &self.memory;
        self.state.queues.get_mut(index).map(|q| (q, memory))
    }

    pub fn device_config(&self) -> &[u8] {
        &self.device_config
    }

    pub fn device_config_mut(&mut self) -> &mut Vec<u8> {
        &mut self.device_config
    }

    pub fn isr(&self) -> u8 {
        self.state.isr
    }

    pub fn msix_enabled(&self) -> bool {
        !self.state.msix_table.is_empty()
            && self.state.config.read_u16(CAP_MSIX + 2) & MSIX_CONTROL_ENABLE != 0
    }

    fn msix_function_masked(&self) -> bool {
        self.state.config.read_u16(CAP_MSIX + 2) & MSIX_CONTROL_FUNCTION_MASK != 0
    }

    // ---- save / restore ----

    pub fn state(&self) -> TransportState {
        self.state.clone()
    }

    pub fn restore(&mut self, state: TransportState) -> Result<(), TransportError> {
        for (what, found, expected) in [
            ("queues", state.queues.len(), self.state.queues.len()),
            (
                "MSI-X entries",
                state.msix_table.len(),
                self.state.msix_table.len(),
            ),
            (
                "MSI-X pending bits",
                state.msix_pending.len(),
                self.state.msix_pending.len(),
            ),
        ] {
            if found != expected {
                return Err(TransportError::BadLength {
                    what,
                    found,
                    expected,
                });
            }
        }
        let mut state = state;
        // A damaged queue must not be trusted: re-validate enabled ones.
        for (queue, current) in state.queues.iter_mut().zip(self.state.queues.iter()) {
            queue.max_size = current.max_size;
            if queue.ready && queue.validate(&self.memory).is_err() {
                queue.ready = false;
            }
        }
        self.state = state;
        self.update_intx();
        Ok(())
    }

    // ---- interrupts ----

    fn update_intx(&mut self) {
        let asserted = self.state.isr != 0 && !self.msix_enabled();
        self.state.config.drive_intx(self.irq.as_ref(), asserted);
    }

    fn send_vector(&mut self, vector: u16) {
        let index = usize::from(vector);
        let function_masked = self.msix_function_masked();
        let Some(entry) = self.state.msix_table.get(index).copied() else {
            return;
        };
        if function_masked || entry.masked {
            if let Some(p) = self.state.msix_pending.get_mut(index) {
                *p = true;
            }
        } else {
            self.msi.send_msi(entry.address, entry.data);
        }
    }

    fn deliver_pending_msix(&mut self) {
        if !self.msix_enabled() || self.msix_function_masked() {
            return;
        }
        for index in 0..self.state.msix_pending.len() {
            let entry = self.state.msix_table[index];
            if self.state.msix_pending[index] && !entry.masked {
                self.state.msix_pending[index] = false;
                self.msi.send_msi(entry.address, entry.data);
            }
        }
    }

    /// Interrupts the driver for used buffers of queue `index` (its MSI-X vector, or ISR
    /// bit 0 and INTA#).
    pub fn signal_queue(&mut self, index: usize) {
        if self.msix_enabled() {
            if let Some(vector) = self.state.queues.get(index).map(|q| q.msix_vector) {
                self.send_vector(vector);
            }
        } else {
            self.state.isr |= ISR_QUEUE;
            self.update_intx();
        }
    }

    /// Interrupts for queue `index` if the driver asked for it (EVENT_IDX / NO_INTERRUPT).
    pub fn notify_used(&mut self, index: usize) {
        let memory = &self.memory;
        let wanted = self
            .state
            .queues
            .get_mut(index)
            .is_some_and(|q| q.needs_notification(memory));
        if wanted {
            self.signal_queue(index);
        }
    }

    /// The device configuration changed: new generation and a configuration interrupt.
    pub fn config_changed(&mut self) {
        self.state.config_generation = self.state.config_generation.wrapping_add(1);
        if self.msix_enabled() {
            self.send_vector(self.state.config_vector);
        } else {
            self.state.isr |= ISR_CONFIG;
            self.update_intx();
        }
    }

    /// The guest broke the protocol: DEVICE_NEEDS_RESET until it resets the device.
    pub fn set_needs_reset(&mut self, reason: &dyn std::fmt::Display) {
        if self.state.status & STATUS_NEEDS_RESET != 0 {
            return;
        }
        log::warn!("virtio: {reason}; the device needs a reset");
        self.state.status |= STATUS_NEEDS_RESET;
        if self.state.status & STATUS_DRIVER_OK != 0 {
            self.config_changed();
        }
    }

    // ---- status and features ----

    fn device_reset(&mut self) {
        self.state.status = 0;
        self.state.driver_features = 0;
        self.state.device_feature_select = 0;
        self.state.driver_feature_select = 0;
        self.state.queue_select = 0;
        for queue in &mut self.state.queues {
            queue.reset();
        }
        self.state.config_vector = NO_VECTOR;
        self.state.isr = 0;
        self.state.msix_pending.iter_mut().for_each(|p| *p = false);
        self.update_intx();
    }

    /// Machine reset: header, MSI-X table and device state back to power-on.
    pub fn pci_reset(&mut self) {
        self.state.config.reset_header();
        let control = self.state.config.read_u16(CAP_MSIX + 2)
            & !(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
        if !self.state.msix_table.is_empty() {
            self.state.config.set_u16(CAP_MSIX + 2, control);
        }
        for cap_byte in 0..16 {
            self.state.config.set_u8(CAP_PCI_CFG + 4 + cap_byte, 0);
        }
        self.state
            .msix_table
            .iter_mut()
            .for_each(|e| *e = MsixEntry::default());
        self.device_reset();
        self.state.config_generation = 0;
    }

    fn set_driver_features(&mut self, features: u64) {
        self.state.driver_features = features;
        let event_idx = self.has_feature(VIRTIO_F_RING_EVENT_IDX);
        for queue in &mut self.state.queues {
            queue.event_idx = event_idx;
        }
    }

    fn write_status(&mut self, value: u8, modern: bool) -> Option<TransportEvent> {
        if value == 0 {
            self.device_reset();
            return Some(TransportEvent::Reset);
        }
        let old = self.state.status;
        let mut new = value | (old & STATUS_NEEDS_RESET);
        if modern && new & STATUS_FEATURES_OK != 0 && old & STATUS_FEATURES_OK == 0 {
            let unknown = self.state.driver_features & !self.device_features;
            let ok = unknown == 0 && self.state.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                log::info!(
                    "virtio: driver features {:#x} refused (offered {:#x})",
                    self.state.driver_features,
                    self.device_features
                );
                new &= !STATUS_FEATURES_OK;
            }
        }
        self.state.status = new;
        if new & STATUS_DRIVER_OK != 0 && old & STATUS_DRIVER_OK == 0 {
            return Some(TransportEvent::DriverOk);
        }
        None
    }

    fn write_vector(&self, vector: u16) -> u16 {
        if usize::from(vector) < self.state.msix_table.len() {
            vector
        } else {
            NO_VECTOR
        }
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.state.queues.get(usize::from(self.state.queue_select))
    }

    fn enable_queue(&mut self, index: usize) {
        let memory = &self.memory;
        let Some(queue) = self.state.queues.get_mut(index) else {
            return;
        };
        match queue.validate(memory) {
            Ok(()) => queue.ready = true,
            Err(e) => {
                queue.ready = false;
                self.set_needs_reset(&e);
            }
        }
    }

    // ---- legacy header (BAR0) ----

    fn legacy_config_offset(&self) -> u64 {
        if self.msix_enabled() {
            LEGACY_CONFIG_OFFSET_MSIX
        } else {
            LEGACY_CONFIG_OFFSET
        }
    }

    fn legacy_read(&mut self, start: u64, side_effects: bool) -> u64 {
        let queue = self.selected_queue();
        match start {
            0 => self.device_features & 0xffff_ffff & !VIRTIO_F_VERSION_1,
            4 => self.state.driver_features & 0xffff_ffff,
            8 => queue.filter(|q| q.ready).map_or(0, |q| q.desc_table >> 12),
            12 => queue.map_or(0, |q| u64::from(q.size)),
            14 => u64::from(self.state.queue_select),
            18 => u64::from(self.state.status),
            19 => {
                let isr = self.state.isr;
                if side_effects {
                    self.state.isr = 0;
                    self.update_intx();
                }
                u64::from(isr)
            }
            20 => u64::from(self.state.config_vector),
            22 => queue.map_or(u64::from(NO_VECTOR), |q| u64::from(q.msix_vector)),
            _ => 0,
        }
    }

    fn legacy_write(&mut self, start: u64, value: u64) -> Option<TransportEvent> {
        let select = usize::from(self.state.queue_select);
        match start {
            4 => {
                let features = value & 0xffff_ffff & self.device_features;
                self.set_driver_features(features);
            }
            8 => {
                let pfn = value as u32;
                if let Some(queue) = self.state.queues.get_mut(select) {
                    if pfn == 0 {
                        queue.reset();
                    } else {
                        queue.set_legacy_rings(pfn);
                        self.enable_queue(select);
                    }
                }
            }
            14 => self.state.queue_select = value as u16,
            16 => return Some(TransportEvent::QueueNotify(value as u16)),
            18 => return self.write_status(value as u8, false),
            20 => self.state.config_vector = self.write_vector(value as u16),
            22 => {
                let vector = self.write_vector(value as u16);
                if let Some(queue) = self.state.queues.get_mut(select) {
                    queue.msix_vector = vector;
                }
            }
            _ => {}
        }
        None
    }

    // ---- modern common configuration ----

    fn common_read(&self, start: u64) -> u64 {
        let queue = self.selected_queue();
        let s = &self.state;
        match start {
            0x00 => u64::from(s.device_feature_select),
            0x04 => match s.device_feature_select {
                0 => self.device_features & 0xffff_ffff,
                1 => self.device_features >> 32,
                _ => 0,
            },
            0x08 => u64::from(s.driver_feature_select),
            0x0c => match s.driver_feature_select {
                0 => s.driver_features & 0xffff_ffff,
                1 => s.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(s.config_vector),
            0x12 => s.queues.len() as u64,
            0x14 => u64::from(s.status),
            0x15 => u64::from(s.config_generation),
            0x16 => u64::from(s.queue_select),
            0x18 => queue.map_or(0, |q| u64::from(q.size)),
            0x1a => queue.map_or(u64::from(NO_VECTOR), |q| u64::from(q.msix_vector)),
            0x1c => queue.map_or(0, |q| u64::from(q.ready)),
            0x1e => queue.map_or(0, |_| u64::from(s.queue_select)),
            0x20 => queue.map_or(0, |q| q.desc_table & 0xffff_ffff),
            0x24 => queue.map_or(0, |q| q.desc_table >> 32),
            0x28 => queue.map_or(0, |q| q.avail_ring & 0xffff_ffff),
            0x2c => queue.map_or(0, |q| q.avail_ring >> 32),
            0x30 => queue.map_or(0, |q| q.used_ring & 0xffff_ffff),
            0x34 => queue.map_or(0, |q| q.used_ring >> 32),
            _ => 0,
        }
    }

    fn common_write(&mut self, start: u64, value: u64) -> Option<TransportEvent> {
        let select = usize::from(self.state.queue_select);
        let features_locked = self.state.status & STATUS_FEATURES_OK != 0;
        match start {
            0x00 => self.state.device_feature_select = value as u32,
            0x08 => self.state.driver_feature_select = value as u32,
            0x0c if !features_locked => {
                let word = value & 0xffff_ffff;
                let features = match self.state.driver_feature_select {
                    0 => (self.state.driver_features & !0xffff_ffff) | word,
                    1 => (self.state.driver_features & 0xffff_ffff) | (word << 32),
                    _ => self.state.driver_features,
                };
                self.set_driver_features(features);
            }
            0x10 => self.state.config_vector = self.write_vector(value as u16),
            0x14 => return self.write_status(value as u8, true),
            0x16 => self.state.queue_select = value as u16,
            0x18 => {
                if let Some(queue) = self.state.queues.get_mut(select).filter(|q| !q.ready) {
                    if !queue.set_size(value as u16) {
                        log::debug!("virtio: invalid queue size {value} ignored");
                    }
                }
            }
            0x1a => {
                let vector = self.write_vector(value as u16);
                if let Some(queue) = self.state.queues.get_mut(select) {
                    queue.msix_vector = vector;
                }
            }
            0x1c if value & 1 == 1 && self.selected_queue().is_some_and(|q| !q.ready) => {
                self.enable_queue(select);
            }
            0x20..=0x34 => {
                if let Some(queue) = self.state.queues.get_mut(select).filter(|q| !q.ready) {
                    let field = match start & !7 {
                        0x20 => &mut queue.desc_table,
                        0x28 => &mut queue.avail_ring,
                        _ => &mut queue.used_ring,
                    };
                    *field = if start & 4 == 0 {
                        (*field & !0xffff_ffff) | (value & 0xffff_ffff)
                    } else {
                        (*field & 0xffff_ffff) | ((value & 0xffff_ffff) << 32)
                    };
                }
            }
            _ => {}
        }
        None
    }

    // ---- MSI-X table ----

    fn msix_read(&self, start: u64) -> u64 {
        let index = (start / 16) as usize;
        let Some(entry) = self.state.msix_table.get(index) else {
            return 0;
        };
        match start % 16 {
            0 => entry.address & 0xffff_ffff,
            4 => entry.address >> 32,
            8 => u64::from(entry.data),
            _ => u64::from(entry.masked),
        }
    }

    fn msix_write(&mut self, start: u64, value: u64) {
        let index = (start / 16) as usize;
        let Some(entry) = self.state.msix_table.get_mut(index) else {
            return;
        };
        let value = value & 0xffff_ffff;
        match start % 16 {
            0 => entry.address = (entry.address & !0xffff_ffff) | (value & !3),
            4 => entry.address = (entry.address & 0xffff_ffff) | (value << 32),
            8 => entry.data = value as u32,
            _ => {
                entry.masked = value & 1 != 0;
                self.deliver_pending_msix();
            }
        }
    }

    // ---- register access plumbing ----

    fn read_registers(
        &mut self,
        offset: u64,
        data: &mut [u8],
        layout: Layout,
        read: fn(&mut Self, u64) -> u64,
    ) {
        data.fill(0);
        let msix = self.msix_enabled();
        for (start, bytes) in split_access(offset, data.len(), layout, msix) {
            let value = read(self, start);
            for (i, b) in bytes {
                data[i] = (value >> (8 * b)) as u8;
            }
        }
    }

    fn write_registers(
        &mut self,
        offset: u64,
        data: &[u8],
        layout: Layout,
        peek: fn(&mut Self, u64) -> u64,
        write: fn(&mut Self, u64, u64) -> Option<TransportEvent>,
    ) -> Option<TransportEvent> {
        let msix = self.msix_enabled();
        let mut event = None;
        for (start, bytes) in split_access(offset, data.len(), layout, msix) {
            let old = peek(self, start);
            let value = merge_bytes(old, &bytes, data);
            if let Some(e) = write(self, start, value) {
                event = Some(e);
            }
        }
        event
    }

    fn read_device_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| self.device_config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn device_config_write(offset: u64, data: &[u8]) -> Option<TransportEvent> {
        Some(TransportEvent::DeviceConfigWrite {
            offset,
            data: data.to_vec(),
        })
    }

    fn read_isr(&mut self) -> u8 {
        let isr = self.state.isr;
        self.state.isr = 0;
        self.update_intx();
        isr
    }

    /// Guest read inside BAR `bar`.
    pub fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match bar {
            BAR_LEGACY if self.mode == VirtioPciMode::Transitional => {
                let config_offset = self.legacy_config_offset();
                if offset >= config_offset {
                    self.read_device_config(offset - config_offset, data);
                } else {
                    self.read_registers(offset, data, legacy_layout, |t, s| t.legacy_read(s, true));
                }
            }
            BAR_MSIX if !self.state.msix_table.is_empty() => {
                if offset >= MSIX_PBA_OFFSET {
                    for (i, byte) in data.iter_mut().enumerate() {
                        let byte_index = (offset - MSIX_PBA_OFFSET).saturating_add(i as u64);
                        let base = usize::try_from(byte_index)
                            .unwrap_or(usize::MAX)
                            .saturating_mul(8);
                        *byte = (0..8).fold(0u8, |acc, bit| {
                            let set = self
                                .state
                                .msix_pending
                                .get(base.saturating_add(bit))
                                .copied()
                                .unwrap_or(false);
                            acc | (u8::from(set) << bit)
                        });
                    }
                } else {
                    self.read_registers(offset, data, msix_table_layout, |t, s| t.msix_read(s));
                }
            }
            BAR_MODERN => match offset {
                o if o < COMMON_CFG_OFFSET + COMMON_CFG_SIZE => {
                    self.read_registers(o, data, common_layout, |t, s| t.common_read(s))
                }
                o if (ISR_CFG_OFFSET..ISR_CFG_OFFSET + 0x1000).contains(&o) => {
                    data.fill(0);
                    if o == ISR_CFG_OFFSET {
                        if let Some(first) = data.first_mut() {
                            *first = self.read_isr();
                        }
                    }
                }
                o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE).contains(&o) => {
                    self.read_device_config(o - DEVICE_CFG_OFFSET, data)
                }
                _ => data.fill(0),
            },
            _ => data.fill(0xff),
        }
    }

    /// Guest write inside BAR `bar`; what the device must do about it, if anything.
    pub fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) -> Option<TransportEvent> {
        match bar {
            BAR_LEGACY if self.mode == VirtioPciMode::Transitional => {
                let config_offset = self.legacy_config_offset();
                if offset >= config_offset {
                    Self::device_config_write(offset - config_offset, data)
                } else {
                    self.write_registers(
                        offset,
                        data,
                        legacy_layout,
                        |t, s| t.legacy_read(s, false),
                        |t, s, v| t.legacy_write(s, v),
                    )
                }
            }
            BAR_MSIX if !self.state.msix_table.is_empty() => {
                if offset < MSIX_PBA_OFFSET {
                    self.write_registers(
                        offset,
                        data,
                        msix_table_layout,
                        |t, s| t.msix_read(s),
                        |t, s, v| {
                            t.msix_write(s, v);
                            None
                        },
                    );
                }
                None
            }
            BAR_MODERN => match offset {
                o if o < COMMON_CFG_OFFSET + COMMON_CFG_SIZE => self.write_registers(
                    o,
                    data,
                    common_layout,
                    |t, s| t.common_read(s),
                    |t, s, v| t.common_write(s, v),
                ),
                o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE).contains(&o) => {
                    Self::device_config_write(o - DEVICE_CFG_OFFSET, data)
                }
                o if (NOTIFY_CFG_OFFSET..NOTIFY_CFG_OFFSET + 0x1000).contains(&o) => {
                    let queue = (o - NOTIFY_CFG_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER);
                    Some(TransportEvent::QueueNotify(queue as u16))
                }
                _ => None,
            },
            _ => None,
        }
    }

    // ---- configuration space ----

    /// The PCI configuration access window: (bar, offset, length) if valid.
    fn pci_cfg_window(&self) -> Option<(usize, u64, usize)> {
        let c = &self.state.config;
        let bar = usize::from(c.read_u8(CAP_PCI_CFG + 4));
        let offset = u64::from(c.read_u32(CAP_PCI_CFG + 8));
        let length = c.read_u32(CAP_PCI_CFG + 12) as usize;
        let size = if bar < NUM_BARS {
            c.bar_size(bar)?
        } else {
            return None;
        };
        let fits = matches!(length, 1 | 2 | 4)
            && offset.is_multiple_of(length as u64)
            && offset + length as u64 <= size;
        fits.then_some((bar, offset, length))
    }

    /// Configuration read of dword `reg`; the PCI configuration access window reads the BAR.
    pub fn config_read(&mut self, reg: usize) -> u32 {
        if reg == CAP_PCI_CFG + 16 {
            if let Some((bar, offset, length)) = self.pci_cfg_window() {
                let mut buf = [0u8; 4];
                self.bar_read(bar, offset, &mut buf[..length]);
                self.state
                    .config
                    .set_u32(CAP_PCI_CFG + 16, u32::from_le_bytes(buf));
            }
        }
        self.state.config.read_u32(reg)
    }

    /// Configuration write; MSI-X enable / mask changes and the access window take effect.
    pub fn config_write(
        &mut self,
        reg: usize,
        offset: usize,
        data: &[u8],
    ) -> Option<TransportEvent> {
        self.state.config.write(reg + offset, data);
        let mut event = None;
        if reg == CAP_PCI_CFG + 16 {
            if let Some((bar, bar_offset, length)) = self.pci_cfg_window() {
                let value = self.state.config.read_u32(CAP_PCI_CFG + 16).to_le_bytes();
                event = self.bar_write(bar, bar_offset, &value[..length]);
            }
        }
        self.deliver_pending_msix();
        self.update_intx();
        event
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::CountingIrq;
    use crate::pci::{COMMAND_BUS_MASTER, COMMAND_INTX_DISABLE, REG_CAPABILITIES, REG_COMMAND};
    use crate::test_support::TestRng;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    fn transport(
        mode: VirtioPciMode,
    ) -> (VirtioPciTransport, Arc<CountingIrq>, Arc<RecordingMsiSink>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let irq = CountingIrq::new();
        let msi = RecordingMsiSink::new();
        let mut t = VirtioPciTransport::new(
            mode,
            1,
            0x02_00_00,
            (1 << 5) | VIRTIO_F_RING_EVENT_IDX,
            &[256, 256],
            3,
            vec![1, 2, 3, 4, 5, 6, 7, 8],
            mem,
            irq.clone(),
            msi.clone(),
        );
        t.config_write(REG_COMMAND, 0, &COMMAND_BUS_MASTER.to_le_bytes());
        (t, irq, msi)
    }

    fn r32(t: &mut VirtioPciTransport, bar: usize, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.bar_read(bar, offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(t: &mut VirtioPciTransport, bar: usize, offset: u64, v: u32) -> Option<TransportEvent> {
        t.bar_write(bar, offset, &v.to_le_bytes())
    }

    /// Walks the capability list like Linux's virtio_pci_find_capability.
    fn virtio_caps(t: &mut VirtioPciTransport) -> Vec<(usize, u8, u8, u32, u32)> {
        let mut caps = Vec::new();
        let mut pos = (t.config_read(REG_CAPABILITIES) & 0xff) as usize;
        let mut guard = 0;
        while pos != 0 && guard < 48 {
            guard += 1;
            let head = t.config_read(pos);
            if head & 0xff == u32::from(PCI_CAP_ID_VENDOR) {
                let cfg_type = (head >> 24) as u8;
                let bar = t.config_read(pos + 4) as u8;
                let offset = t.config_read(pos + 8);
                let length = t.config_read(pos + 12);
                caps.push((pos, cfg_type, bar, offset, length));
            }
            pos = ((head >> 8) & 0xff) as usize;
        }
        caps
    }

    #[test]
    fn identity_bars_and_capabilities() {
        let (mut t, _, _) = transport(VirtioPciMode::Transitional);
        assert_eq!(t.config_read(0), 0x1000_1af4);
        assert_eq!(t.config_read(8) & 0xff, 0);
        assert_eq!(t.config_read(0x2c), 0x0001_1af4);
        assert_eq!(t.config().bar_size(BAR_LEGACY), Some(LEGACY_BAR_SIZE));
        assert_eq!(t.config().bar_size(BAR_MSIX), Some(MSIX_BAR_SIZE));
        assert_eq!(t.config().bar_size(BAR_MODERN), Some(MODERN_BAR_SIZE));
        assert_eq!(t.config_read(0x10 + 4 * BAR_MODERN) & 0xf, 0xc);
        let caps = virtio_caps(&mut t);
        let types: Vec<u8> = caps.iter().map(|c| c.1).collect();
        assert_eq!(types, vec![1, 3, 4, 2, 5]);
        for &(pos, cfg_type, bar, offset, length) in &caps {
            if cfg_type != VIRTIO_PCI_CAP_PCI_CFG {
                assert_eq!(bar, BAR_MODERN as u8);
                assert!(u64::from(offset) + u64::from(length) <= MODERN_BAR_SIZE);
            }
            if cfg_type == VIRTIO_PCI_CAP_NOTIFY_CFG {
                assert_eq!(t.config_read(pos + 16), NOTIFY_OFF_MULTIPLIER);
            }
        }
        // MSI-X capability: 3 vectors, table and PBA in BAR1.
        let head = t.config_read(CAP_MSIX);
        assert_eq!(head & 0xff, 0x11);
        assert_eq!(head >> 16, 2);
        assert_eq!(t.config_read(CAP_MSIX + 4), BAR_MSIX as u32);
        assert_eq!(t.config_read(CAP_MSIX + 8), 0x800 | BAR_MSIX as u32);

        let (mut m, _, _) = transport(VirtioPciMode::Modern);
        assert_eq!(m.config_read(0), 0x1041_1af4);
        assert_eq!(m.config_read(8) & 0xff, 1);
        assert_eq!(m.config_read(0x2c) >> 16, 0x1100);
        assert_eq!(m.config().bar_size(BAR_LEGACY), None);
        assert_eq!(r32(&mut m, BAR_LEGACY, 0), 0xffff_ffff);
    }

    #[test]
    fn features_ok_requires_version_1_and_offered_bits() {
        let (mut t, _, _) = transport(VirtioPciMode::Modern);
        w32(&mut t, BAR_MODERN, 0x00, 1);
        assert_eq!(r32(&mut t, BAR_MODERN, 0x04), 1); // VERSION_1 (bit 32)
                                                      // Without VERSION_1: refused.
        w32(&mut t, BAR_MODERN, 0x08, 0);
        w32(&mut t, BAR_MODERN, 0x0c, 1 << 5);
        t.bar_write(
            BAR_MODERN,
            0x14,
            &[STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK],
        );
        assert_eq!(t.status() & STATUS_FEATURES_OK, 0);
        // With a bit the device does not offer: refused.
        t.bar_write(BAR_MODERN, 0x14, &[0]);
        w32(&mut t, BAR_MODERN, 0x08, 0);
        w32(&mut t, BAR_MODERN, 0x0c, (1 << 5) | (1 << 6));
        w32(&mut t, BAR_MODERN, 0x08, 1);
        w32(&mut t, BAR_MODERN, 0x0c, 1);
        t.bar_write(BAR_MODERN, 0x14, &[STATUS_FEATURES_OK]);
        assert_eq!(t.status() & STATUS_FEATURES_OK, 0);
        // Correct set: accepted, then locked.
        t.bar_write(BAR_MODERN, 0x14, &[0]);
        w32(&mut t, BAR_MODERN, 0x08, 0);
        w32(&mut t, BAR_MODERN, 0x0c, 1 << 5);
        w32(&mut t, BAR_MODERN, 0x08, 1);
        w32(&mut t, BAR_MODERN, 0x0c, 1);
        t.bar_write(BAR_MODERN, 0x14, &[STATUS_FEATURES_OK]);
        assert_ne!(t.status() & STATUS_FEATURES_OK, 0);
        assert_eq!(t.features(), (1 << 5) | VIRTIO_F_VERSION_1);
        w32(&mut t, BAR_MODERN, 0x08, 0);
        w32(&mut t, BAR_MODERN, 0x0c, 0);
        assert_eq!(t.features(), (1 << 5) | VIRTIO_F_VERSION_1);
        assert_eq!(
            t.bar_write(BAR_MODERN, 0x14, &[STATUS_FEATURES_OK | STATUS_DRIVER_OK]),
            Some(TransportEvent::DriverOk)
        );
        assert!(t.driver_ok());
        assert_eq!(
            t.bar_write(BAR_MODERN, 0x14, &[0]),
            Some(TransportEvent::Reset)
        );
        assert_eq!((t.status(), t.features()), (0, 0));
    }

    #[test]
    fn legacy_header_layout_moves_config_with_msix() {
        let (mut t, _, _) = transport(VirtioPciMode::Transitional);
        assert_eq!(r32(&mut t, BAR_LEGACY, 0), (1 << 5) | (1 << 29));
        let mut b = [0u8; 4];
        t.bar_read(BAR_LEGACY, 20, &mut b);
        assert_eq!(b, [1, 2, 3, 4]);
        // Enable MSI-X: config moves to 24, vectors at 20/22.
        t.config_write(CAP_MSIX, 2, &MSIX_CONTROL_ENABLE.to_le_bytes());
        t.bar_read(BAR_LEGACY, 24, &mut b);
        assert_eq!(b, [1, 2, 3, 4]);
        t.bar_write(BAR_LEGACY, 20, &1u16.to_le_bytes());
        t.bar_write(BAR_LEGACY, 22, &7u16.to_le_bytes()); // beyond the table
        let mut v = [0u8; 2];
        t.bar_read(BAR_LEGACY, 20, &mut v);
        assert_eq!(u16::from_le_bytes(v), 1);
        t.bar_read(BAR_LEGACY, 22, &mut v);
        assert_eq!(u16::from_le_bytes(v), NO_VECTOR);
        // Queue size reads, PFN outside RAM is refused with NEEDS_RESET.
        t.bar_write(BAR_LEGACY, 14, &1u16.to_le_bytes());
        t.bar_read(BAR_LEGACY, 12, &mut v);
        assert_eq!(u16::from_le_bytes(v), 256);
        t.bar_write(BAR_LEGACY, 18, &[STATUS_ACKNOWLEDGE | STATUS_DRIVER]);
        w32(&mut t, BAR_LEGACY, 8, 0x10_0000);
        assert!(!t.queue(1).unwrap().ready);
        assert_ne!(t.status() & STATUS_NEEDS_RESET, 0);
        assert_eq!(r32(&mut t, BAR_LEGACY, 8), 0);
        // Guest features: only offered, only the low word.
        t.bar_write(BAR_LEGACY, 18, &[0]);
        w32(&mut t, BAR_LEGACY, 4, 0xffff_ffff);
        assert_eq!(t.features(), (1 << 5) | (1 << 29));
        // Notify.
        assert_eq!(
            t.bar_write(BAR_LEGACY, 16, &1u16.to_le_bytes()),
            Some(TransportEvent::QueueNotify(1))
        );
    }

    #[test]
    fn msix_masking_pending_bits_and_intx_fallback() {
        let (mut t, irq, msi) = transport(VirtioPciMode::Modern);
        // INTx: ISR bit, level, read clears.
        t.signal_queue(0);
        assert!(irq.level());
        let mut b = [0u8; 1];
        t.bar_read(BAR_MODERN, ISR_CFG_OFFSET, &mut b);
        assert_eq!(b[0], ISR_QUEUE);
        assert!(!irq.level());
        t.config_changed();
        assert!(irq.level());
        // INTx disable masks the line but keeps the status bit.
        t.config_write(
            REG_COMMAND,
            0,
            &(COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE).to_le_bytes(),
        );
        assert!(!irq.level());
        assert_ne!(t.config_read(4) & (1 << 19), 0);
        t.bar_read(BAR_MODERN, ISR_CFG_OFFSET, &mut b);
        assert_eq!(b[0], ISR_CONFIG);
        // MSI-X: program entry 1, queue 0 → vector 1.
        t.config_write(CAP_MSIX, 2, &MSIX_CONTROL_ENABLE.to_le_bytes());
        w32(&mut t, BAR_MSIX, 16, 0xfee0_0000);
        w32(&mut t, BAR_MSIX, 20, 0);
        w32(&mut t, BAR_MSIX, 24, 0x41);
        w32(&mut t, BAR_MODERN, 0x16, 0); // queue_select 0 (16-bit field via 32-bit write)
        t.bar_write(BAR_MODERN, 0x1a, &1u16.to_le_bytes());
        let mut v = [0u8; 2];
        t.bar_read(BAR_MODERN, 0x1a, &mut v);
        assert_eq!(u16::from_le_bytes(v), 1);
        // Masked (reset value): pending bit, no message.
        t.signal_queue(0);
        assert!(msi.take().is_empty());
        assert_eq!(r32(&mut t, BAR_MSIX, MSIX_PBA_OFFSET), 0b10);
        // Unmask: the pending message goes out.
        w32(&mut t, BAR_MSIX, 28, 0);
        assert_eq!(msi.take(), vec![(0xfee0_0000, 0x41)]);
        assert_eq!(r32(&mut t, BAR_MSIX, MSIX_PBA_OFFSET), 0);
        t.signal_queue(0);
        assert_eq!(msi.take(), vec![(0xfee0_0000, 0x41)]);
        // Function mask.
        t.config_write(
            CAP_MSIX,
            2,
            &(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK).to_le_bytes(),
        );
        t.signal_queue(0);
        assert!(msi.take().is_empty());
        t.config_write(CAP_MSIX, 2, &MSIX_CONTROL_ENABLE.to_le_bytes());
        assert_eq!(msi.take(), vec![(0xfee0_0000, 0x41)]);
        // NO_VECTOR: nothing at all, and no INTx either while MSI-X is on.
        t.bar_write(BAR_MODERN, 0x10, &NO_VECTOR.to_le_bytes());
        t.config_changed();
        assert!(msi.take().is_empty());
        assert!(!irq.level());
    }

    #[test]
    fn pci_cfg_access_window_reaches_common_config() {
        let (mut t, _, _) = transport(VirtioPciMode::Modern);
        t.config_write(CAP_PCI_CFG + 4, 0, &[BAR_MODERN as u8]);
        t.config_write(CAP_PCI_CFG + 8, 0, &0x12u32.to_le_bytes()); // num_queues
        t.config_write(CAP_PCI_CFG + 12, 0, &2u32.to_le_bytes());
        assert_eq!(t.config_read(CAP_PCI_CFG + 16) & 0xffff, 2);
        // Write the status through the window.
        t.config_write(CAP_PCI_CFG + 8, 0, &0x14u32.to_le_bytes());
        t.config_write(CAP_PCI_CFG + 12, 0, &1u32.to_le_bytes());
        t.config_write(CAP_PCI_CFG + 16, 0, &[STATUS_ACKNOWLEDGE]);
        assert_eq!(t.status(), STATUS_ACKNOWLEDGE);
        // Notify through the window comes back as an event.
        t.config_write(
            CAP_PCI_CFG + 8,
            0,
            &(NOTIFY_CFG_OFFSET as u32 + 4).to_le_bytes(),
        );
        t.config_write(CAP_PCI_CFG + 12, 0, &2u32.to_le_bytes());
        assert_eq!(
            t.config_write(CAP_PCI_CFG + 16, 0, &[1, 0]),
            Some(TransportEvent::QueueNotify(1))
        );
        // Bad windows do nothing.
        t.config_write(CAP_PCI_CFG + 8, 0, &(MODERN_BAR_SIZE as u32).to_le_bytes());
        t.config_write(CAP_PCI_CFG + 12, 0, &4u32.to_le_bytes());
        assert_eq!(t.config_write(CAP_PCI_CFG + 16, 0, &[1, 2, 3, 4]), None);
        t.config_write(CAP_PCI_CFG + 4, 0, &[9]);
        let _ = t.config_read(CAP_PCI_CFG + 16);
    }

    #[test]
    fn modern_queue_setup_validates_sizes_and_rings() {
        let (mut t, _, _) = transport(VirtioPciMode::Modern);
        t.bar_write(BAR_MODERN, 0x14, &[STATUS_ACKNOWLEDGE | STATUS_DRIVER]);
        t.bar_write(BAR_MODERN, 0x16, &0u16.to_le_bytes());
        for bad in [100u16, 0, 512, 65535, 32769] {
            t.bar_write(BAR_MODERN, 0x18, &bad.to_le_bytes());
            assert_eq!(t.queue(0).unwrap().size, 256, "size {bad}");
        }
        t.bar_write(BAR_MODERN, 0x18, &64u16.to_le_bytes());
        assert_eq!(t.queue(0).unwrap().size, 64);
        w32(&mut t, BAR_MODERN, 0x20, 0x1000);
        w32(&mut t, BAR_MODERN, 0x28, 0x2000);
        w32(&mut t, BAR_MODERN, 0x30, 0xf_fffc); // runs past RAM
        t.bar_write(BAR_MODERN, 0x1c, &1u16.to_le_bytes());
        assert!(!t.queue(0).unwrap().ready);
        assert_ne!(t.status() & STATUS_NEEDS_RESET, 0);
        // Reset clears NEEDS_RESET; a good layout enables, then addresses are locked.
        t.bar_write(BAR_MODERN, 0x14, &[0]);
        w32(&mut t, BAR_MODERN, 0x20, 0x1000);
        w32(&mut t, BAR_MODERN, 0x28, 0x2000);
        w32(&mut t, BAR_MODERN, 0x30, 0x3000);
        t.bar_write(BAR_MODERN, 0x1c, &1u16.to_le_bytes());
        assert!(t.queue(0).unwrap().ready);
        assert_eq!(t.status() & STATUS_NEEDS_RESET, 0);
        w32(&mut t, BAR_MODERN, 0x20, 0x5000);
        assert_eq!(r32(&mut t, BAR_MODERN, 0x20), 0x1000);
        // Selecting a queue that does not exist reads zeros and ignores writes.
        t.bar_write(BAR_MODERN, 0x16, &9u16.to_le_bytes());
        assert_eq!(r32(&mut t, BAR_MODERN, 0x18) & 0xffff, 0);
        t.bar_write(BAR_MODERN, 0x1c, &1u16.to_le_bytes());
    }

    #[test]
    fn random_register_garbage_never_panics() {
        for mode in [VirtioPciMode::Transitional, VirtioPciMode::Modern] {
            let (mut t, _, _) = transport(mode);
            let mut rng = TestRng(0x5eed);
            for _ in 0..20_000 {
                let r = rng.next();
                let bar = [0, 1, 4, 2, 6][(r % 5) as usize];
                let offset = (r >> 8) % 0x4100;
                let len = [1usize, 2, 4, 8][((r >> 40) % 4) as usize];
                let value = rng.next().to_le_bytes();
                if r & (1 << 50) != 0 {
                    let _ = t.bar_write(bar, offset, &value[..len]);
                } else {
                    let mut buf = [0u8; 8];
                    t.bar_read(bar, offset, &mut buf[..len]);
                }
                if r & (1 << 51) != 0 {
                    let reg = ((r >> 52) as usize % 64) * 4;
                    let _ = t.config_write(reg, 0, &value[..4]);
                    let _ = t.config_read(reg);
                }
                t.signal_queue((r % 4) as usize);
            }
            for bar in 0..7 {
                let mut buf = [0u8; 8];
                t.bar_read(bar, u64::MAX - 3, &mut buf);
                let _ = t.bar_write(bar, u64::MAX - 3, &buf);
            }
        }
    }
}
