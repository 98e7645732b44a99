//! Intel 82371SB (PIIX3) PCI-to-ISA bridge, PCI 00:01.0, and the board's PCI INTx routing.
//!
//! Emulated: the bridge's identity (8086:7000, class 0x060100, multi-function header so that
//! firmware scans 00:01.1..7), the PIRQ route control registers 0x60..=0x63 (bit 7 disables,
//! bits 3:0 select the ISA IRQ; reset value 0x80), and the other device-specific registers
//! firmware and guests touch (0x4c IORT, 0x4e XBCS, 0x69 top of memory, 0x70 MBIRQ, 0x76/0x77
//! MBDMA, 0x78 PCSC, 0x80 APIC base, 0x82 DLC, 0xa0.. SMI/power management) as plain
//! writable storage with their power-on values. [`PciIrqRouter`] turns INTx levels of PCI
//! functions into ISA IRQ levels: sources on one PIRQ are wired-OR (level triggered, counted),
//! and PIRQs routed to the same ISA IRQ are ORed too.
//!
//! Not emulated: ELCR (0x4d0/0x4d1, KVM's in-kernel PIC has it), the reset control register
//! 0xcf9 (its own device, forwarded by the PCI root), ISA DMA, the motherboard IRQ / DMA
//! functions behind MBIRQ / MBDMA, SMI generation, the IDE / USB functions (own files).

use crate::irq::{IrqLine, NoIrq};
use crate::pci::{
    pirq_for_slot, PciConfigSpace, PciFunction, DEVICE_SPECIFIC_START, HEADER_TYPE_MULTI_FUNCTION,
};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub const VENDOR_INTEL: u16 = 0x8086;
pub const DEVICE_82371SB_ISA: u16 = 0x7000;
/// Bridge / ISA bridge.
pub const CLASS_ISA_BRIDGE: u32 = 0x06_01_00;
/// PIRQA route control; PIRQB..D follow.
pub const REG_PIRQ_ROUTE: usize = 0x60;
pub const PIRQ_COUNT: usize = 4;
/// Route control bit 7: the PIRQ is not routed to any ISA IRQ.
pub const PIRQ_ROUTE_DISABLED: u8 = 0x80;
/// Bits of a route control register that exist (6:4 are reserved).
const PIRQ_ROUTE_MASK: u8 = 0x8f;
const ISA_IRQS: usize = 16;

/// Device-specific register power-on values (82371SB datasheet), as (offset, value).
const REGISTER_DEFAULTS: &[(usize, u8)] = &[
    (0x4c, 0x4d), // IORT: ISA I/O recovery timer
    (0x4e, 0x03), // XBCS: BIOS chip select, RTC and keyboard controller enabled
    (0x69, 0x02), // TOM: top of memory 1 MiB
    (0x70, 0x80), // MBIRQ0: disabled
    (0x71, 0x80), // MBIRQ1: disabled
    (0x76, 0x0c), // MBDMA0
    (0x77, 0x0c), // MBDMA1
    (0x78, 0x02), // PCSC
    (0xa0, 0x08), // SMICNTL
    (0xa8, 0x0f), // SMIREQ / FERR
];

/// Whether the PIIX3 can steer a PIRQ to ISA IRQ `irq` (0, 1, 2, 8 and 13 are reserved).
pub fn is_valid_pci_irq(irq: u8) -> bool {
    matches!(irq, 3..=7 | 9..=12 | 14 | 15)
}

/// The ISA IRQ a route control value selects, None when disabled or reserved.
fn routed_irq(route: u8) -> Option<usize> {
    let irq = route & 0x0f;
    (route & PIRQ_ROUTE_DISABLED == 0 && is_valid_pci_irq(irq)).then_some(usize::from(irq))
}

/// Save/restore state of the router (source levels are restored by the devices).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciIrqRouterState {
    pub routes: [u8; PIRQ_COUNT],
}

impl Default for PciIrqRouterState {
    fn default() -> Self {
        Self {
            routes: [PIRQ_ROUTE_DISABLED; PIRQ_COUNT],
        }
    }
}

struct RouterInner {
    routes: [u8; PIRQ_COUNT],
    /// Number of sources asserting each PIRQ.
    asserted: [u32; PIRQ_COUNT],
    /// Number of board-level sources (not PIRQs, e.g. the ACPI SCI) asserting each ISA IRQ.
    isa_asserted: [u32; ISA_IRQS],
    /// Level last driven on each ISA IRQ.
    driven: [bool; ISA_IRQS],
}

/// PCI INTx to ISA IRQ routing through the PIIX3 PIRQ registers.
pub struct PciIrqRouter {
    isa_irqs: Vec<Arc<dyn IrqLine>>,
    inner: Mutex<RouterInner>,
}

impl PciIrqRouter {
    /// `isa_irqs[n]` is ISA IRQ n (missing entries are treated as unconnected).
    pub fn new(isa_irqs: Vec<Arc<dyn IrqLine>>) -> Arc<Self> {
        Arc::new(Self {
            isa_irqs,
            inner: Mutex::new(RouterInner {
                routes: [PIRQ_ROUTE_DISABLED; PIRQ_COUNT],
                asserted: [0; PIRQ_COUNT],
                isa_asserted: [0; ISA_IRQS],
                driven: [false; ISA_IRQS],
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RouterInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The INTx line of a function in slot `device` with interrupt pin `pin` (the
    /// config-space value, 1 = INTA#); the board swizzle picks the PIRQ. A pin of 0 or
    /// above 4 gives a line that goes nowhere.
    pub fn intx_line(self: &Arc<Self>, device: u8, pin: u8) -> Arc<dyn IrqLine> {
        match pirq_for_slot(device, pin) {
            Some(pirq) => self.pirq_line(pirq),
            None => Arc::new(NoIrq),
        }
    }

    /// A new source on PIRQ `pirq` (0 = PIRQA); out-of-range PIRQs go nowhere.
    pub fn pirq_line(self: &Arc<Self>, pirq: usize) -> Arc<dyn IrqLine> {
        if pirq >= PIRQ_COUNT {
            return Arc::new(NoIrq);
        }
        Arc::new(PirqSource {
            router: self.clone(),
            pirq,
            high: AtomicBool::new(false),
        })
    }

    /// A level-triggered board source wired straight to ISA IRQ `irq` (the PIIX4's ACPI
    /// SCI on IRQ 9), wired-OR with any PIRQ the guest routes to the same IRQ so that
    /// neither clobbers the other's level. Out-of-range IRQs go nowhere.
    pub fn isa_line(self: &Arc<Self>, irq: usize) -> Arc<dyn IrqLine> {
        if irq >= ISA_IRQS {
            return Arc::new(NoIrq);
        }
        Arc::new(IsaSource {
            router: self.clone(),
            irq,
            high: AtomicBool::new(false),
        })
    }

    /// Route control register of `pirq` (0x80 for an out-of-range index).
    pub fn route(&self, pirq: usize) -> u8 {
        self.lock()
            .routes
            .get(pirq)
            .copied()
            .unwrap_or(PIRQ_ROUTE_DISABLED)
    }

    pub fn routes(&self) -> [u8; PIRQ_COUNT] {
        self.lock().routes
    }

    /// The ISA IRQ PIRQ `pirq` drives now, None when disabled or reserved.
    pub fn isa_irq(&self, pirq: usize) -> Option<u8> {
        self.lock()
            .routes
            .get(pirq)
            .and_then(|&r| routed_irq(r))
            .map(|irq| irq as u8)
    }

    /// Reprograms PIRQ `pirq`; an asserted PIRQ moves from its old ISA IRQ to the new one.
    pub fn set_route(&self, pirq: usize, value: u8) {
        let mut inner = self.lock();
        if let Some(route) = inner.routes.get_mut(pirq) {
            *route = value & PIRQ_ROUTE_MASK;
            self.drive(&mut inner);
        }
    }

    pub fn state(&self) -> PciIrqRouterState {
        PciIrqRouterState {
            routes: self.routes(),
        }
    }

    pub fn restore_state(&self, state: &PciIrqRouterState) {
        let mut inner = self.lock();
        for (route, &value) in inner.routes.iter_mut().zip(state.routes.iter()) {
            *route = value & PIRQ_ROUTE_MASK;
        }
        self.drive(&mut inner);
    }

    /// Recomputes every ISA IRQ level and drives the ones that changed.
    fn drive(&self, inner: &mut RouterInner) {
        let mut wanted = [false; ISA_IRQS];
        for (want, &count) in wanted.iter_mut().zip(inner.isa_asserted.iter()) {
            *want = count > 0;
        }
        for (route, &count) in inner.routes.iter().zip(inner.asserted.iter()) {
            if count > 0 {
                if let Some(irq) = routed_irq(*route) {
                    wanted[irq] = true;
                }
            }
        }
        for (irq, (&want, driven)) in wanted.iter().zip(inner.driven.iter_mut()).enumerate() {
            if want != *driven {
                *driven = want;
                if let Some(line) = self.isa_irqs.get(irq) {
                    line.set_level(want);
                }
            }
        }
    }

    fn source_changed(&self, source: &PirqSource, high: bool) {
        let mut inner = self.lock();
        // Swap under the router lock so counts and levels never disagree.
        if source.high.swap(high, Ordering::SeqCst) == high {
            return;
        }
        if let Some(count) = inner.asserted.get_mut(source.pirq) {
            *count = if high {
                count.saturating_add(1)
            } else {
                count.saturating_sub(1)
            };
        }
        self.drive(&mut inner);
    }

    fn isa_source_changed(&self, source: &IsaSource, high: bool) {
        let mut inner = self.lock();
        if source.high.swap(high, Ordering::SeqCst) == high {
            return;
        }
        if let Some(count) = inner.isa_asserted.get_mut(source.irq) {
            *count = if high {
                count.saturating_add(1)
            } else {
                count.saturating_sub(1)
            };
        }
        self.drive(&mut inner);
    }
}

/// A board-level source on one ISA IRQ (see [`PciIrqRouter::isa_line`]).
struct IsaSource {
    router: Arc<PciIrqRouter>,
    irq: usize,
    high: AtomicBool,
}

impl IrqLine for IsaSource {
    fn set_level(&self, high: bool) {
        self.router.isa_source_changed(self, high);
    }
}

/// One INTx source (a PCI function's interrupt pin) on a PIRQ.
struct PirqSource {
    router: Arc<PciIrqRouter>,
    pirq: usize,
    high: AtomicBool,
}

impl IrqLine for PirqSource {
    fn set_level(&self, high: bool) {
        self.router.source_changed(self, high);
    }
}

/// The PIIX3 ISA bridge function (00:01.0). Its configuration space is its state; the PIRQ
/// registers live in the shared [`PciIrqRouter`] (save it with [`PciIrqRouter::state`]).
pub struct Piix3IsaBridge {
    config: PciConfigSpace,
    router: Arc<PciIrqRouter>,
}

impl Piix3IsaBridge {
    pub fn new(router: Arc<PciIrqRouter>) -> Self {
        let mut config = PciConfigSpace::new();
        config.set_ids(VENDOR_INTEL, DEVICE_82371SB_ISA);
        config.set_class(CLASS_ISA_BRIDGE);
        config.set_header_type(HEADER_TYPE_MULTI_FUNCTION);
        config.set_writable_range(DEVICE_SPECIFIC_START, 0x100 - DEVICE_SPECIFIC_START);
        config.set_writable(REG_PIRQ_ROUTE, &[PIRQ_ROUTE_MASK; PIRQ_COUNT]);
        let mut bridge = Self { config, router };
        bridge.power_on_registers();
        bridge
    }

    fn power_on_registers(&mut self) {
        // I/O, memory and bus master always on; DEVSEL medium.
        self.config.set_u16(crate::pci::REG_COMMAND, 0x0007);
        self.config.set_u16(crate::pci::REG_STATUS, 0x0200);
        for offset in DEVICE_SPECIFIC_START..0x100 {
            self.config.set_u8(offset, 0);
        }
        for &(offset, value) in REGISTER_DEFAULTS {
            self.config.set_u8(offset, value);
        }
        for pirq in 0..PIRQ_COUNT {
            self.router.set_route(pirq, PIRQ_ROUTE_DISABLED);
        }
        self.sync_routes();
    }

    /// Copies the router's registers into the configuration space image.
    fn sync_routes(&mut self) {
        for (i, route) in self.router.routes().iter().enumerate() {
            self.config.set_u8(REG_PIRQ_ROUTE + i, *route);
        }
    }
}

impl PciFunction for Piix3IsaBridge {
    fn config(&self) -> &PciConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfigSpace {
        &mut self.config
    }

    fn config_read(&mut self, reg: usize) -> u32 {
        if reg == REG_PIRQ_ROUTE {
            self.sync_routes();
        }
        self.config.read_u32(reg)
    }

    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        let start = reg + offset;
        self.config.write(start, data);
        let end = start.saturating_add(data.len());
        for pirq in 0..PIRQ_COUNT {
            let register = REG_PIRQ_ROUTE + pirq;
            if (start..end).contains(&register) {
                self.router.set_route(pirq, self.config.read_u8(register));
            }
        }
    }

    fn reset(&mut self) {
        self.config.reset_header();
        self.power_on_registers();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Bus;
    use crate::irq::CountingIrq;
    use crate::pci::{PciRoot, RecordingBarMapper};

    struct Machine {
        ports: Bus,
        root: Arc<Mutex<PciRoot>>,
        router: Arc<PciIrqRouter>,
        irqs: Vec<Arc<CountingIrq>>,
    }

    impl Machine {
        fn new() -> Self {
            let irqs: Vec<Arc<CountingIrq>> = (0..16).map(|_| CountingIrq::new()).collect();
            let lines: Vec<Arc<dyn IrqLine>> =
                irqs.iter().map(|i| i.clone() as Arc<dyn IrqLine>).collect();
            let router = PciIrqRouter::new(lines);
            let bridge = Arc::new(Mutex::new(Piix3IsaBridge::new(router.clone())));
            let root = Arc::new(Mutex::new(PciRoot::new(RecordingBarMapper::new())));
            root.lock().unwrap().add(1, 0, bridge).unwrap();
            let ports = Bus::new();
            ports.insert(0xcf8, 8, root.clone()).unwrap();
            Self {
                ports,
                root,
                router,
                irqs,
            }
        }
        fn select(&self, reg: u32) {
            // 00:01.0
            self.ports
                .write(0xcf8, &(0x8000_0800 | (reg & 0xfc)).to_le_bytes());
        }
        fn readl(&self, reg: u32) -> u32 {
            self.select(reg);
            let mut b = [0u8; 4];
            self.ports.read(0xcfc, &mut b);
            u32::from_le_bytes(b)
        }
        fn readb(&self, reg: u32) -> u8 {
            self.select(reg);
            let mut b = [0u8; 1];
            self.ports.read(0xcfc + u64::from(reg & 3), &mut b);
            b[0]
        }
        fn writeb(&self, reg: u32, v: u8) {
            self.select(reg);
            self.ports.write(0xcfc + u64::from(reg & 3), &[v]);
        }
        /// SeaBIOS piix_isa_bridge_setup: PIRQA..D = 10, 10, 11, 11 with byte writes.
        fn seabios_setup(&self) {
            for (i, irq) in [10u8, 10, 11, 11].iter().enumerate() {
                self.writeb(0x60 + i as u32, *irq);
            }
        }
        /// (level, rising edges) of every ISA IRQ that is high or was ever raised.
        fn activity(&self) -> Vec<(usize, bool, u64)> {
            self.irqs
                .iter()
                .enumerate()
                .filter(|(_, l)| l.level() || l.count() > 0)
                .map(|(n, l)| (n, l.level(), l.count()))
                .collect()
        }
    }

    #[test]
    fn identity_and_power_on_registers() {
        let m = Machine::new();
        assert_eq!(m.readl(0x00), 0x7000_8086);
        assert_eq!(m.readl(0x08), 0x0601_0000);
        assert_eq!(
            m.readb(0x0e),
            0x80,
            "multi-function: firmware scans 00:01.1..7"
        );
        assert_eq!(m.readl(0x04), 0x0200_0007);
        assert_eq!(m.readl(0x60), 0x8080_8080);
        assert_eq!(m.readb(0x4c), 0x4d);
        assert_eq!(m.readb(0x4e), 0x03);
        assert_eq!(m.readb(0x69), 0x02);
        assert_eq!(m.readb(0x70), 0x80);
        // Other registers are stored.
        m.writeb(0x69, 0x30);
        m.writeb(0x80, 0x01);
        assert_eq!(m.readb(0x69), 0x30);
        assert_eq!(m.readb(0x80), 0x01);
    }

    #[test]
    fn seabios_setup_routes_and_swizzled_intx_reaches_isa_irq() {
        let m = Machine::new();
        m.seabios_setup();
        assert_eq!(m.readl(0x60), 0x0b0b_0a0a);
        assert_eq!(m.router.isa_irq(2), Some(11));
        // NIC in slot 3, INTA# -> PIRQC -> IRQ 11.
        let nic = m.router.intx_line(3, 1);
        nic.set_level(true);
        assert_eq!(m.activity(), vec![(11, true, 1)]);
        nic.set_level(true);
        assert_eq!(m.irqs[11].count(), 1, "repeating a level is not a new edge");
        nic.set_level(false);
        assert_eq!(m.activity(), vec![(11, false, 1)]);
        // VGA in slot 2, INTA# -> PIRQB -> IRQ 10.
        let vga = m.router.intx_line(2, 1);
        vga.pulse();
        assert_eq!(m.activity(), vec![(10, false, 1), (11, false, 1)]);
        // Pin 0: no interrupt.
        m.router.intx_line(2, 0).set_level(true);
        assert!(m.irqs.iter().all(|l| !l.level()));
    }

    #[test]
    fn sources_sharing_a_pirq_are_wired_or() {
        let m = Machine::new();
        m.seabios_setup();
        // Slot 3 INTA# and slot 4 INTD# both land on PIRQC.
        let a = m.router.intx_line(3, 1);
        let b = m.router.intx_line(4, 4);
        a.set_level(true);
        b.set_level(true);
        assert_eq!(m.activity(), vec![(11, true, 1)]);
        a.set_level(false);
        assert_eq!(m.activity(), vec![(11, true, 1)], "b still asserts");
        a.set_level(false);
        assert!(
            m.irqs[11].level(),
            "a second deassert of a does not cancel b"
        );
        b.set_level(false);
        assert_eq!(m.activity(), vec![(11, false, 1)]);
        // PIRQA and PIRQB both route to IRQ 10: ORed across PIRQs as well.
        let c = m.router.intx_line(1, 1); // PIRQA
        let d = m.router.intx_line(2, 1); // PIRQB
        c.set_level(true);
        d.set_level(true);
        c.set_level(false);
        assert!(m.irqs[10].level());
        d.set_level(false);
        assert_eq!(m.activity(), vec![(10, false, 1), (11, false, 1)]);
    }

    #[test]
    fn board_source_and_a_pirq_on_the_same_isa_irq_do_not_clobber_each_other() {
        let m = Machine::new();
        m.seabios_setup();
        // A guest routes PIRQA to IRQ 9, where the ACPI SCI also sits.
        m.router.set_route(0, 9);
        let sci = m.router.isa_line(9);
        let nic = m.router.intx_line(1, 1); // PIRQA
        sci.set_level(true);
        nic.set_level(true);
        sci.set_level(false);
        assert!(m.irqs[9].level(), "the PCI function still asserts IRQ 9");
        sci.set_level(true);
        nic.set_level(false);
        assert!(m.irqs[9].level(), "the SCI still asserts IRQ 9");
        sci.set_level(false);
        sci.set_level(false);
        assert!(!m.irqs[9].level());
        // Out-of-range board IRQs go nowhere (no panic).
        m.router.isa_line(16).set_level(true);
        m.router.isa_line(usize::MAX).set_level(true);
    }

    #[test]
    fn rerouting_disabling_and_reserved_targets_while_asserted() {
        let m = Machine::new();
        m.seabios_setup();
        let nic = m.router.intx_line(3, 1); // PIRQC
        nic.set_level(true);
        m.writeb(0x62, 5);
        assert_eq!(m.activity(), vec![(5, true, 1), (11, false, 1)]);
        m.writeb(0x62, 0x85);
        assert_eq!(m.readb(0x62), 0x85);
        assert_eq!(m.activity(), vec![(5, false, 1), (11, false, 1)]);
        for reserved in [0u8, 1, 2, 8, 13] {
            m.writeb(0x62, reserved);
            assert!(
                m.irqs.iter().all(|l| !l.level()),
                "IRQ {reserved} is not a PCI target"
            );
        }
        // Reserved bits 6:4 do not stick.
        m.writeb(0x62, 0x79);
        assert_eq!(m.readb(0x62), 0x09);
        assert_eq!(
            m.activity(),
            vec![(5, false, 1), (9, true, 1), (11, false, 1)]
        );
        // A word write spanning PIRQB/PIRQC reroutes both.
        m.select(0x60);
        m.ports.write(0xcfd, &[0x0e, 0x0f]);
        assert_eq!(m.router.routes(), [10, 14, 15, 11]);
        assert_eq!(
            m.activity(),
            vec![(5, false, 1), (9, false, 1), (11, false, 1), (15, true, 1)]
        );
        nic.set_level(false);
        assert!(m.irqs.iter().all(|l| !l.level()));
        // Enabling a PIRQ while its source is high raises the line.
        m.writeb(0x63, 0x80);
        let other = m.router.intx_line(4, 1); // PIRQD
        other.set_level(true);
        assert!(m.irqs.iter().all(|l| !l.level()));
        m.writeb(0x63, 0x07);
        assert!(m.irqs[7].level());
    }

    #[test]
    fn reset_disables_routing_and_lowers_lines() {
        let m = Machine::new();
        m.seabios_setup();
        m.writeb(0x69, 0x40);
        let nic = m.router.intx_line(3, 1);
        nic.set_level(true);
        assert!(m.irqs[11].level());
        m.root.lock().unwrap().reset();
        assert!(!m.irqs[11].level());
        assert_eq!(m.readl(0x60), 0x8080_8080);
        assert_eq!(m.readb(0x69), 0x02);
        assert_eq!(m.readl(0x04), 0x0200_0007);
        // The source is still asserted: routing it again raises the line.
        m.seabios_setup();
        assert!(m.irqs[11].level());
        assert_eq!(m.irqs[11].count(), 2);
        // Router state round trip.
        let state = m.router.state();
        m.writeb(0x62, 0x80);
        assert!(!m.irqs[11].level());
        m.router.restore_state(&state);
        assert!(m.irqs[11].level());
        assert_eq!(m.readb(0x62), 11);
    }

    use crate::test_support::TestRng as Rng;

    #[test]
    fn hostile_config_writes_and_levels_match_a_model() {
        let m = Machine::new();
        let mut rng = Rng(0x0ddc_0ffe_e15e_a5e5);
        // Sources: (device, pin) pairs covering every PIRQ, some sharing.
        let slots = [(1u8, 1u8), (2, 1), (3, 1), (4, 1), (7, 1), (3, 2), (5, 3)];
        let sources: Vec<Arc<dyn IrqLine>> = slots
            .iter()
            .map(|&(d, p)| m.router.intx_line(d, p))
            .collect();
        let mut levels = [false; 7];
        for step in 0..40_000 {
            let r = rng.next();
            if r & 1 == 0 {
                let i = ((r >> 8) % 7) as usize;
                levels[i] = r & 2 != 0;
                sources[i].set_level(levels[i]);
            } else {
                let offset = ((r >> 8) % 256) as usize;
                let len = [1usize, 2, 4][((r >> 16) % 3) as usize];
                let data = rng.next().to_le_bytes();
                m.root
                    .lock()
                    .unwrap()
                    .config_write(1, 0, offset, &data[..len]);
            }
            // Model: ISA IRQ n is high iff some asserted source's PIRQ routes to n.
            let routes = m.router.routes();
            let mut expected = [false; 16];
            for (i, &(d, p)) in slots.iter().enumerate() {
                let pirq = pirq_for_slot(d, p).unwrap();
                if levels[i] {
                    if let Some(irq) = routed_irq(routes[pirq]) {
                        expected[irq] = true;
                    }
                }
            }
            for (n, line) in m.irqs.iter().enumerate() {
                assert_eq!(line.level(), expected[n], "step {step}: IRQ {n}");
            }
            for irq in [0, 1, 2, 8, 13] {
                assert_eq!(m.irqs[irq].count(), 0, "reserved IRQ {irq} raised");
            }
        }
        assert_eq!(m.readl(0x00), 0x7000_8086);
        assert_eq!(m.readl(0x08), 0x0601_0000);
        assert_eq!(m.readb(0x0e), 0x80);
        assert!(m.router.routes().iter().all(|r| r & 0x70 == 0));
        // A router with fewer than 16 lines, and out-of-range indices, do not panic.
        let short = PciIrqRouter::new(vec![CountingIrq::new() as Arc<dyn IrqLine>]);
        short.set_route(0, 11);
        short.set_route(9, 11);
        short.pirq_line(0).set_level(true);
        short.pirq_line(17).set_level(true);
        assert_eq!(short.route(9), PIRQ_ROUTE_DISABLED);
        assert_eq!(short.isa_irq(0), Some(11));
    }
}
