//! MC146818 CMOS real-time clock and 128-byte CMOS RAM, as wired in a PC (ports 0x70/0x71,
//! IRQ 8). QEMU's `hw/rtc/mc146818rtc.c` is the behavioural reference.
//!
//! Emulated: the index register (bit 7, the NMI mask, is ignored), the time and date
//! registers (BCD or binary, 12 h or 24 h, century at 0x32) computed from the host's UTC
//! wall clock plus a guest-set offset, the alarm registers with "don't care" values, status
//! registers A to D (UIP during the last 244 µs of each second, divider reset, SET mode),
//! periodic / alarm / update-ended interrupts with their flags in register C, NVRAM bytes
//! 0x0E..0x7F with the memory-size and CPU-count bytes SeaBIOS reads.
//!
//! Interrupt flags are computed lazily from the clock: a timer callback is only requested
//! while an interrupt is enabled, so an idle RTC costs nothing. Missed periodic ticks
//! coalesce into one flag, as on real hardware when register C is not read.
//!
//! Not emulated: the square-wave output pin (SQWE is stored only), daylight-saving
//! switching (DSE is stored only), the oscillator test modes of the divider bits (treated as
//! "stopped"), and the 2 ms length of the real update cycle (the time changes atomically at
//! the second boundary).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::clock::{Clock, Timed};
use crate::irq::IrqLine;

/// Size of the CMOS RAM, clock registers included.
pub const CMOS_SIZE: usize = 128;
/// First byte of the battery-backed general-purpose RAM.
pub const NVRAM_START: usize = 0x0E;

const REG_SECONDS: usize = 0x00;
const REG_SECONDS_ALARM: usize = 0x01;
const REG_MINUTES: usize = 0x02;
const REG_MINUTES_ALARM: usize = 0x03;
const REG_HOURS: usize = 0x04;
const REG_HOURS_ALARM: usize = 0x05;
const REG_DAY_OF_WEEK: usize = 0x06;
const REG_DAY_OF_MONTH: usize = 0x07;
const REG_MONTH: usize = 0x08;
const REG_YEAR: usize = 0x09;
const REG_A: usize = 0x0A;
const REG_B: usize = 0x0B;
const REG_C: usize = 0x0C;
const REG_D: usize = 0x0D;
const REG_CENTURY: usize = 0x32;

const A_UIP: u8 = 0x80;
const A_DIVIDER_MASK: u8 = 0x70;
/// Divider value for the normal 32.768 kHz time base; values up to this one run the clock.
const A_DIVIDER_NORMAL: u8 = 0x20;
const A_DIVIDER_RESET: u8 = 0x60;
const A_RATE_MASK: u8 = 0x0F;

const B_SET: u8 = 0x80;
const B_PIE: u8 = 0x40;
const B_AIE: u8 = 0x20;
const B_UIE: u8 = 0x10;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;

const C_IRQF: u8 = 0x80;
const C_PF: u8 = 0x40;
const C_AF: u8 = 0x20;
const C_UF: u8 = 0x10;
const C_SOURCES: u8 = C_PF | C_AF | C_UF;

const D_VRT: u8 = 0x80;

const RESET_A: u8 = 0x26;
const RESET_B: u8 = B_24H;

const HOUR_PM: u8 = 0x80;
const ALARM_DONT_CARE: u8 = 0xC0;

const NS_PER_SEC: i128 = 1_000_000_000;
const SECS_PER_DAY: i128 = 86_400;
/// UIP is set for this long before each second boundary.
const UIP_WINDOW_NS: i128 = 244_000;
/// The divider chain input frequency; periodic rates are divisions of it.
const OSCILLATOR_HZ: i128 = 32_768;
/// After the divider reset is released the first update happens half a second later.
const DIVIDER_RELEASE_PHASE_NS: i128 = 500_000_000;
/// Guest times are clamped to this many seconds around the epoch (about 31 million years)
/// so the calendar arithmetic can never overflow.
const MAX_ABS_SECS: i128 = 1_000_000_000_000_000;

// CMOS bytes the firmware reads (QEMU `pc_cmos_init`, SeaBIOS `cmos.h`).
const CMOS_BASE_MEM_LOW: usize = 0x15;
const CMOS_BASE_MEM_HIGH: usize = 0x16;
const CMOS_EXT_MEM_LOW: usize = 0x17;
const CMOS_EXT_MEM_HIGH: usize = 0x18;
const CMOS_EXT_MEM_COPY_LOW: usize = 0x30;
const CMOS_EXT_MEM_COPY_HIGH: usize = 0x31;
const CMOS_MEM_ABOVE_16M_LOW: usize = 0x34;
const CMOS_MEM_ABOVE_16M_HIGH: usize = 0x35;
const CMOS_MEM_ABOVE_4G_LOW: usize = 0x5B;
const CMOS_MEM_ABOVE_4G_MID: usize = 0x5C;
const CMOS_MEM_ABOVE_4G_HIGH: usize = 0x5D;
const CMOS_CPU_COUNT_MINUS_ONE: usize = 0x5F;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Errors of the persistence and configuration helpers.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RtcError {
    #[error("CMOS image must be {expected} bytes, got {actual}")]
    WrongLength { expected: usize, actual: usize },
    #[error("CMOS index {0:#x} is a clock register, not NVRAM (0x0e..=0x7f)")]
    NotNvram(u8),
}

/// Everything that must survive a save/restore or a restart of the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RtcState {
    /// The 128 CMOS bytes (time registers as they read at save time).
    pub cmos: Vec<u8>,
    /// The index register (7 bits).
    pub index: u8,
    /// Guest time minus host UTC time: whole seconds (floor) ...
    pub time_offset_secs: i64,
    /// ... plus this many nanoseconds (0..1e9).
    pub time_offset_subsec_ns: u32,
}

/// The PC's CMOS RTC. Register at ports 0x70..0x72 (offset 0 index, offset 1 data).
pub struct Rtc {
    irq: Arc<dyn IrqLine>,
    clock: Arc<dyn Clock>,
    cmos: [u8; CMOS_SIZE],
    index: u8,
    /// Guest time = host UTC time + this, in nanoseconds.
    offset_ns: i128,
    /// Guest time up to which interrupt flags have been accounted for.
    last_eval_guest_ns: i128,
    /// Level we last drove on the IRQ line.
    line_high: bool,
    /// Bytes the engine owns for this run (memory sizes, CPU count): they override
    /// whatever a loaded NVRAM image or state holds.
    engine_bytes: [Option<u8>; CMOS_SIZE],
    deadline_changed: bool,
}

impl Rtc {
    /// A freshly powered RTC showing host UTC time, registers as QEMU resets them
    /// (A = 0x26, B = 0x02: BCD, 24 h, no interrupts).
    pub fn new(irq: Arc<dyn IrqLine>, clock: Arc<dyn Clock>) -> Self {
        let mut rtc = Self {
            irq,
            clock,
            cmos: [0; CMOS_SIZE],
            index: 0,
            offset_ns: 0,
            last_eval_guest_ns: 0,
            line_high: false,
            engine_bytes: [None; CMOS_SIZE],
            deadline_changed: false,
        };
        rtc.cmos[REG_A] = RESET_A;
        rtc.cmos[REG_B] = RESET_B;
        rtc.cmos[REG_D] = D_VRT;
        rtc.last_eval_guest_ns = rtc.guest_now_ns();
        rtc.refresh_time_registers();
        rtc
    }

    /// A machine reset (the RESET pin): disables the interrupts and clears their flags.
    /// Time, format and NVRAM are kept.
    pub fn reset(&mut self) {
        self.catch_up();
        self.cmos[REG_B] &= !(B_PIE | B_AIE | B_UIE | 0x08);
        self.cmos[REG_C] = 0;
        self.sync_irq();
        self.deadline_changed = true;
    }

    /// Fills the memory-size bytes SeaBIOS and older BIOSes read, as QEMU does.
    pub fn set_memory_sizes(&mut self, ram_below_4g: u64, ram_above_4g: u64) {
        let base_kib: u64 = 640;
        self.set_engine_byte(CMOS_BASE_MEM_LOW, base_kib as u8);
        self.set_engine_byte(CMOS_BASE_MEM_HIGH, (base_kib >> 8) as u8);

        let ext_kib = (ram_below_4g / KIB).saturating_sub(1024).min(0xFFFF);
        self.set_engine_byte(CMOS_EXT_MEM_LOW, ext_kib as u8);
        self.set_engine_byte(CMOS_EXT_MEM_HIGH, (ext_kib >> 8) as u8);
        self.set_engine_byte(CMOS_EXT_MEM_COPY_LOW, ext_kib as u8);
        self.set_engine_byte(CMOS_EXT_MEM_COPY_HIGH, (ext_kib >> 8) as u8);

        let above_16m = (ram_below_4g.saturating_sub(16 * MIB) / (64 * KIB)).min(0xFFFF);
        self.set_engine_byte(CMOS_MEM_ABOVE_16M_LOW, above_16m as u8);
        self.set_engine_byte(CMOS_MEM_ABOVE_16M_HIGH, (above_16m >> 8) as u8);

        let above_4g = (ram_above_4g / (64 * KIB)).min(0xFF_FFFF);
        self.set_engine_byte(CMOS_MEM_ABOVE_4G_LOW, above_4g as u8);
        self.set_engine_byte(CMOS_MEM_ABOVE_4G_MID, (above_4g >> 8) as u8);
        self.set_engine_byte(CMOS_MEM_ABOVE_4G_HIGH, (above_4g >> 16) as u8);
    }

    /// Writes the CPU count byte SeaBIOS reads (0x5F = count - 1).
    pub fn set_cpu_count(&mut self, count: u32) {
        let value = count.saturating_sub(1).min(0xFF) as u8;
        self.set_engine_byte(CMOS_CPU_COUNT_MINUS_ONE, value);
    }

    /// Sets an NVRAM byte (0x0E..=0x7F) on behalf of the engine; it overrides loaded images.
    pub fn set_cmos_byte(&mut self, index: u8, value: u8) -> Result<(), RtcError> {
        let index = usize::from(index);
        if !(NVRAM_START..CMOS_SIZE).contains(&index) {
            return Err(RtcError::NotNvram(index as u8));
        }
        self.set_engine_byte(index, value);
        Ok(())
    }

    /// The 128 CMOS bytes with the time registers as they read now.
    pub fn nvram(&self) -> Vec<u8> {
        self.snapshot_cmos().to_vec()
    }

    /// Loads a saved CMOS image: NVRAM bytes 0x0E..0x7F and the alarm registers. Clock
    /// and status registers keep their current values (the time comes from the host clock
    /// plus the offset in [`RtcState`]); bytes set by the engine are kept.
    pub fn load_nvram(&mut self, bytes: &[u8]) -> Result<(), RtcError> {
        if bytes.len() != CMOS_SIZE {
            return Err(RtcError::WrongLength {
                expected: CMOS_SIZE,
                actual: bytes.len(),
            });
        }
        self.cmos[NVRAM_START..].copy_from_slice(&bytes[NVRAM_START..]);
        for alarm in [REG_SECONDS_ALARM, REG_MINUTES_ALARM, REG_HOURS_ALARM] {
            self.cmos[alarm] = bytes[alarm];
        }
        self.apply_engine_bytes();
        self.deadline_changed = true;
        Ok(())
    }

    /// The state to save (CMOS bytes, index, guest time offset).
    pub fn state(&self) -> RtcState {
        let offset_secs = self.offset_ns.div_euclid(NS_PER_SEC);
        let offset_subsec = self.offset_ns.rem_euclid(NS_PER_SEC);
        RtcState {
            cmos: self.snapshot_cmos().to_vec(),
            index: self.index,
            time_offset_secs: offset_secs.clamp(i64::MIN as i128, i64::MAX as i128) as i64,
            time_offset_subsec_ns: offset_subsec as u32,
        }
    }

    /// Restores a saved state. Bytes set by the engine for this run win over saved ones.
    pub fn restore(&mut self, state: &RtcState) -> Result<(), RtcError> {
        if state.cmos.len() != CMOS_SIZE {
            return Err(RtcError::WrongLength {
                expected: CMOS_SIZE,
                actual: state.cmos.len(),
            });
        }
        self.cmos.copy_from_slice(&state.cmos);
        self.cmos[REG_A] &= !A_UIP;
        self.cmos[REG_D] = D_VRT;
        self.index = state.index & 0x7F;
        let subsec = i128::from(state.time_offset_subsec_ns).rem_euclid(NS_PER_SEC);
        self.offset_ns = i128::from(state.time_offset_secs) * NS_PER_SEC + subsec;
        self.apply_engine_bytes();
        self.last_eval_guest_ns = self.guest_now_ns();
        // Drive the line from the restored flags whatever we drove before.
        let want = self.cmos[REG_C] & self.cmos[REG_B] & C_SOURCES != 0;
        if want {
            self.cmos[REG_C] |= C_IRQF;
        } else {
            self.cmos[REG_C] &= !C_IRQF;
        }
        self.irq.set_level(want);
        self.line_high = want;
        self.deadline_changed = true;
        Ok(())
    }

    /// Guest time minus host UTC time, in nanoseconds.
    pub fn time_offset_ns(&self) -> i128 {
        self.offset_ns
    }

    /// True once after any guest access that may have changed `next_deadline_ns`
    /// (interrupt enables, rate, time set): the engine re-arms its timer then.
    pub fn take_deadline_changed(&mut self) -> bool {
        std::mem::take(&mut self.deadline_changed)
    }

    // ---- time base -------------------------------------------------------------------

    fn guest_now_ns(&self) -> i128 {
        self.clock.unix_time_ns().saturating_add(self.offset_ns)
    }

    /// The time registers advance (no SET, divider not held in reset or test mode).
    fn running(&self) -> bool {
        self.cmos[REG_B] & B_SET == 0 && self.divider_running()
    }

    fn divider_running(&self) -> bool {
        self.cmos[REG_A] & A_DIVIDER_MASK <= A_DIVIDER_NORMAL
    }

    /// Oscillator cycles per periodic tick, or None when the periodic source is off.
    fn periodic_divisor(&self) -> Option<i128> {
        if !self.divider_running() {
            return None;
        }
        match self.cmos[REG_A] & A_RATE_MASK {
            0 => None,
            // Rates 1 and 2 repeat rates 8 and 9 (256 Hz and 128 Hz), per the datasheet.
            1 => Some(1 << 7),
            2 => Some(1 << 8),
            rate => Some(1 << (rate - 1)),
        }
    }

    fn uip_active(&self) -> bool {
        self.running() && self.guest_now_ns().rem_euclid(NS_PER_SEC) >= NS_PER_SEC - UIP_WINDOW_NS
    }

    // ---- register formats ------------------------------------------------------------

    fn binary_mode(&self) -> bool {
        self.cmos[REG_B] & B_BINARY != 0
    }

    fn encode(&self, value: u8) -> u8 {
        if self.binary_mode() {
            value
        } else {
            ((value / 10) << 4) | (value % 10)
        }
    }

    fn decode(&self, reg: u8) -> i128 {
        if self.binary_mode() {
            i128::from(reg)
        } else {
            i128::from(reg >> 4) * 10 + i128::from(reg & 0x0F)
        }
    }

    fn encode_hour(&self, hour: u8) -> u8 {
        if self.cmos[REG_B] & B_24H != 0 {
            return self.encode(hour);
        }
        let pm = if hour >= 12 { HOUR_PM } else { 0 };
        let hour12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(hour12) | pm
    }

    fn decode_hour(&self, reg: u8) -> i128 {
        if self.cmos[REG_B] & B_24H != 0 {
            return self.decode(reg);
        }
        let hour = match self.decode(reg & !HOUR_PM) {
            12 => 0,
            h => h,
        };
        if reg & HOUR_PM != 0 {
            hour + 12
        } else {
            hour
        }
    }

    /// Writes the clock registers for guest second `secs` (since the Unix epoch) into `regs`.
    fn encode_time_into(&self, secs: i128, regs: &mut [u8; CMOS_SIZE]) {
        let secs = secs.clamp(-MAX_ABS_SECS, MAX_ABS_SECS);
        let days = secs.div_euclid(SECS_PER_DAY);
        let second_of_day = secs.rem_euclid(SECS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        // 1970-01-01 was a Thursday; the register counts Sunday = 1.
        let day_of_week = (days + 4).rem_euclid(7) + 1;
        let year = year.rem_euclid(10_000);
        regs[REG_SECONDS] = self.encode((second_of_day % 60) as u8);
        regs[REG_MINUTES] = self.encode((second_of_day / 60 % 60) as u8);
        regs[REG_HOURS] = self.encode_hour((second_of_day / 3600) as u8);
        regs[REG_DAY_OF_WEEK] = self.encode(day_of_week as u8);
        regs[REG_DAY_OF_MONTH] = self.encode(day as u8);
        regs[REG_MONTH] = self.encode(month as u8);
        regs[REG_YEAR] = self.encode((year % 100) as u8);
        regs[REG_CENTURY] = self.encode((year / 100) as u8);
    }

    /// The guest second the clock registers describe (out-of-range fields normalise).
    fn time_registers_to_secs(&self) -> i128 {
        let second = self.decode(self.cmos[REG_SECONDS]);
        let minute = self.decode(self.cmos[REG_MINUTES]);
        let hour = self.decode_hour(self.cmos[REG_HOURS]);
        let day = self.decode(self.cmos[REG_DAY_OF_MONTH]);
        let month = self.decode(self.cmos[REG_MONTH]);
        let year = self.decode(self.cmos[REG_CENTURY]) * 100 + self.decode(self.cmos[REG_YEAR]);
        let days = days_from_civil(year, month, 1) + day - 1;
        days * SECS_PER_DAY + hour * 3600 + minute * 60 + second
    }

    fn refresh_time_registers(&mut self) {
        let secs = self.guest_now_ns().div_euclid(NS_PER_SEC);
        let mut regs = self.cmos;
        self.encode_time_into(secs, &mut regs);
        self.cmos = regs;
    }

    /// Makes the guest clock show the time in the registers, `subsec_ns` into that second.
    fn set_time_from_registers(&mut self, subsec_ns: i128) {
        let target_ns = self.time_registers_to_secs() * NS_PER_SEC + subsec_ns;
        self.offset_ns = target_ns - self.clock.unix_time_ns();
        self.last_eval_guest_ns = self.guest_now_ns();
        self.deadline_changed = true;
    }

    fn snapshot_cmos(&self) -> [u8; CMOS_SIZE] {
        let mut regs = self.cmos;
        if self.running() {
            let secs = self.guest_now_ns().div_euclid(NS_PER_SEC);
            self.encode_time_into(secs, &mut regs);
        }
        regs[REG_C] |= self.pending_flags(self.guest_now_ns());
        if regs[REG_C] & regs[REG_B] & C_SOURCES != 0 {
            regs[REG_C] |= C_IRQF;
        }
        regs[REG_A] &= !A_UIP;
        regs[REG_D] = D_VRT;
        regs
    }

    fn set_engine_byte(&mut self, index: usize, value: u8) {
        if let (Some(slot), Some(byte)) =
            (self.engine_bytes.get_mut(index), self.cmos.get_mut(index))
        {
            *slot = Some(value);
            *byte = value;
        }
    }

    fn apply_engine_bytes(&mut self) {
        for (byte, engine) in self.cmos.iter_mut().zip(self.engine_bytes.iter()) {
            if let Some(value) = engine {
                *byte = *value;
            }
        }
    }

    // ---- interrupts ------------------------------------------------------------------

    fn alarm_field_matches(alarm: u8, value: u8) -> bool {
        alarm >= ALARM_DONT_CARE || alarm == value
    }

    fn alarm_matches_second_of_day(&self, second_of_day: i128) -> bool {
        let second = (second_of_day % 60) as u8;
        let minute = (second_of_day / 60 % 60) as u8;
        let hour = (second_of_day / 3600 % 24) as u8;
        Self::alarm_field_matches(self.cmos[REG_SECONDS_ALARM], self.encode(second))
            && Self::alarm_field_matches(self.cmos[REG_MINUTES_ALARM], self.encode(minute))
            && Self::alarm_field_matches(self.cmos[REG_HOURS_ALARM], self.encode_hour(hour))
    }

    /// Whether the alarm matches at some second of a day (fields are independent).
    fn alarm_can_ever_match(&self) -> bool {
        let seconds = (0..60)
            .any(|s| Self::alarm_field_matches(self.cmos[REG_SECONDS_ALARM], self.encode(s)));
        let minutes = (0..60)
            .any(|m| Self::alarm_field_matches(self.cmos[REG_MINUTES_ALARM], self.encode(m)));
        let hours = (0..24)
            .any(|h| Self::alarm_field_matches(self.cmos[REG_HOURS_ALARM], self.encode_hour(h)));
        seconds && minutes && hours
    }

    /// Whether an update in (`from_sec`, `to_sec`] produced a time matching the alarm.
    /// At most one day of seconds is examined.
    fn alarm_crossed(&self, from_sec: i128, to_sec: i128) -> bool {
        if to_sec - from_sec >= SECS_PER_DAY {
            return self.alarm_can_ever_match();
        }
        ((from_sec + 1)..=to_sec)
            .any(|sec| self.alarm_matches_second_of_day(sec.rem_euclid(SECS_PER_DAY)))
    }

    /// Flags (PF/AF/UF) that events between the last evaluation and `now` would have set.
    fn pending_flags(&self, now: i128) -> u8 {
        let last = self.last_eval_guest_ns;
        if now <= last {
            return 0;
        }
        let mut flags = 0;
        if let Some(divisor) = self.periodic_divisor() {
            if periodic_tick_index(now, divisor) > periodic_tick_index(last, divisor) {
                flags |= C_PF;
            }
        }
        if self.running() {
            let last_sec = last.div_euclid(NS_PER_SEC);
            let now_sec = now.div_euclid(NS_PER_SEC);
            if now_sec > last_sec {
                flags |= C_UF;
                if self.cmos[REG_C] & C_AF == 0 && self.alarm_crossed(last_sec, now_sec) {
                    flags |= C_AF;
                }
            }
        }
        flags
    }

    /// Accounts for all events up to now in register C and updates the IRQ line.
    fn catch_up(&mut self) {
        let now = self.guest_now_ns();
        self.cmos[REG_C] |= self.pending_flags(now);
        // Also taken when the host clock went backwards: start over from now.
        self.last_eval_guest_ns = now;
        self.sync_irq();
    }

    /// IRQF follows the enabled pending flags; the line is raised when it becomes set.
    fn sync_irq(&mut self) {
        let want = self.cmos[REG_C] & self.cmos[REG_B] & C_SOURCES != 0;
        if want {
            self.cmos[REG_C] |= C_IRQF;
        } else {
            self.cmos[REG_C] &= !C_IRQF;
        }
        if want != self.line_high {
            self.line_high = want;
            self.irq.set_level(want);
        }
    }

    // ---- guest accesses --------------------------------------------------------------

    fn read_data(&mut self) -> u8 {
        let index = usize::from(self.index & 0x7F);
        match index {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_DAY_OF_WEEK | REG_DAY_OF_MONTH
            | REG_MONTH | REG_YEAR | REG_CENTURY => {
                if self.running() {
                    self.refresh_time_registers();
                }
                self.cmos[index]
            }
            REG_A => {
                let uip = if self.uip_active() { A_UIP } else { 0 };
                (self.cmos[REG_A] & !A_UIP) | uip
            }
            REG_C => {
                self.catch_up();
                let value = self.cmos[REG_C];
                self.cmos[REG_C] = 0;
                self.sync_irq();
                value
            }
            REG_D => D_VRT,
            _ => self.cmos.get(index).copied().unwrap_or(0xFF),
        }
    }

    fn write_data(&mut self, value: u8) {
        let index = usize::from(self.index & 0x7F);
        match index {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_DAY_OF_WEEK | REG_DAY_OF_MONTH
            | REG_MONTH | REG_YEAR | REG_CENTURY => {
                if self.running() {
                    // A write while the clock runs takes effect at once, keeping the phase.
                    self.catch_up();
                    self.refresh_time_registers();
                    self.cmos[index] = value;
                    let subsec = self.guest_now_ns().rem_euclid(NS_PER_SEC);
                    self.set_time_from_registers(subsec);
                } else {
                    self.cmos[index] = value;
                }
            }
            REG_A => {
                self.catch_up();
                let was_running = self.running();
                let divider_was_reset = self.cmos[REG_A] & A_DIVIDER_RESET == A_DIVIDER_RESET;
                if was_running {
                    self.refresh_time_registers();
                }
                self.cmos[REG_A] = value & !A_UIP;
                if !was_running && self.running() {
                    // Releasing the divider reset starts the first update half a second later.
                    let phase = if divider_was_reset {
                        DIVIDER_RELEASE_PHASE_NS
                    } else {
                        0
                    };
                    self.set_time_from_registers(phase);
                }
                self.sync_irq();
                self.deadline_changed = true;
            }
            REG_B => {
                self.catch_up();
                let was_running = self.running();
                if was_running {
                    self.refresh_time_registers();
                }
                // Setting SET clears UIE, as the datasheet says.
                let value = if value & B_SET != 0 {
                    value & !B_UIE
                } else {
                    value
                };
                self.cmos[REG_B] = value;
                if !was_running && self.running() {
                    self.set_time_from_registers(0);
                }
                self.sync_irq();
                self.deadline_changed = true;
            }
            REG_C | REG_D => {}
            _ => {
                if let Some(byte) = self.cmos.get_mut(index) {
                    *byte = value;
                }
            }
        }
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = match offset.checked_add(i as u64) {
                // The index register is write-only on a PC.
                Some(1) => self.read_data(),
                _ => 0xFF,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &value) in data.iter().enumerate() {
            match offset.checked_add(i as u64) {
                // Bit 7 is the NMI mask, which lives elsewhere.
                Some(0) => self.index = value & 0x7F,
                Some(1) => self.write_data(value),
                _ => {}
            }
        }
    }
}

impl Timed for Rtc {
    /// The first event after the last evaluation of the flags: it is in the past when the
    /// engine is late (then `on_timer` is due at once), never again after `on_timer`.
    fn next_deadline_ns(&self) -> Option<u64> {
        let now = self.guest_now_ns();
        // If the host clock stepped back, count from now rather than from the future.
        let base = self.last_eval_guest_ns.min(now);
        let enables = self.cmos[REG_B];
        let mut event: Option<i128> = None;
        if enables & B_PIE != 0 {
            if let Some(divisor) = self.periodic_divisor() {
                let next_tick = periodic_tick_index(base, divisor) + 1;
                event = Some(ceil_div(next_tick * divisor * NS_PER_SEC, OSCILLATOR_HZ));
            }
        }
        if enables & (B_UIE | B_AIE) != 0 && self.running() {
            let boundary = (base.div_euclid(NS_PER_SEC) + 1) * NS_PER_SEC;
            event = Some(event.map_or(boundary, |e| e.min(boundary)));
        }
        let deadline = i128::from(self.clock.monotonic_ns()) + (event? - now);
        Some(deadline.clamp(0, i128::from(u64::MAX)) as u64)
    }

    fn on_timer(&mut self, _now_ns: u64) {
        self.catch_up();
    }
}

/// Index of the last periodic tick at or before guest time `ns`.
fn periodic_tick_index(ns: i128, divisor: i128) -> i128 {
    (ns * OSCILLATOR_HZ).div_euclid(NS_PER_SEC * divisor)
}

fn ceil_div(numerator: i128, denominator: i128) -> i128 {
    let quotient = numerator.div_euclid(denominator);
    if quotient * denominator == numerator {
        quotient
    } else {
        quotient + 1
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (month may be out of 1..=12 and
/// is normalised into the year). Howard Hinnant's days-from-civil algorithm.
fn days_from_civil(year: i128, month: i128, day: i128) -> i128 {
    let year = year + (month - 1).div_euclid(12);
    let month = (month - 1).rem_euclid(12) + 1;
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let shifted_month = (month + 9) % 12; // March = 0
    let day_of_year = (153 * shifted_month + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// (year, month 1..=12, day 1..=31) of a day count since 1970-01-01.
fn civil_from_days(days: i128) -> (i128, i128, i128) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + if month <= 2 { 1 } else { 0 };
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::irq::CountingIrq;

    /// 2024-02-29 23:59:58 UTC, a Thursday on a leap day.
    const LEAP_DAY_EVENING: i64 = 1_709_251_198;
    /// 2024-03-01 12:00:00 UTC: far from midnight, where the reset alarm (00:00:00) matches.
    const NOON_MARCH_1: i64 = LEAP_DAY_EVENING + 2 + 12 * 3600;
    const MS: u64 = 1_000_000;
    const SEC: u64 = 1_000_000_000;

    fn rtc_at(unix_seconds: i64) -> (Rtc, Arc<CountingIrq>, Arc<ManualClock>) {
        let irq = CountingIrq::new();
        let clock = ManualClock::new(unix_seconds);
        let rtc = Rtc::new(irq.clone(), clock.clone());
        (rtc, irq, clock)
    }

    fn read_reg(rtc: &mut Rtc, index: u8) -> u8 {
        rtc.write(0, &[index]);
        let mut b = [0u8];
        rtc.read(1, &mut b);
        b[0]
    }

    fn write_reg(rtc: &mut Rtc, index: u8, value: u8) {
        rtc.write(0, &[index]);
        rtc.write(1, &[value]);
    }

    /// (sec, min, hour, dow, day, month, year, century) as raw register bytes.
    fn read_time(rtc: &mut Rtc) -> [u8; 8] {
        [0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32].map(|i| read_reg(rtc, i))
    }

    /// Runs the timer as the engine would until `until_ns` of monotonic time; when
    /// `ack` is true, reads register C after each timer call as a driver's handler does.
    fn run_timers(rtc: &mut Rtc, clock: &ManualClock, until_ns: u64, ack: bool) -> usize {
        let mut calls = 0;
        while let Some(deadline) = rtc.next_deadline_ns() {
            if deadline > until_ns {
                break;
            }
            let now = clock.monotonic_ns();
            assert!(deadline > now, "deadline {deadline} not after now {now}");
            clock.advance_ns(deadline - now);
            rtc.on_timer(deadline);
            if ack {
                read_reg(rtc, 0x0C);
            }
            calls += 1;
            assert!(calls < 100_000, "runaway timer");
        }
        let now = clock.monotonic_ns();
        if until_ns > now {
            clock.advance_ns(until_ns - now);
        }
        calls
    }

    #[test]
    fn calendar_algorithms_round_trip() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        for days in (-800_000..800_000).step_by(97) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        // Month 13 normalises into January of the next year.
        assert_eq!(days_from_civil(2023, 13, 1), days_from_civil(2024, 1, 1));
    }

    #[test]
    fn reset_values_match_qemu() {
        let (mut rtc, irq, _clock) = rtc_at(LEAP_DAY_EVENING);
        assert_eq!(read_reg(&mut rtc, 0x0A), 0x26);
        assert_eq!(read_reg(&mut rtc, 0x0B), 0x02);
        assert_eq!(read_reg(&mut rtc, 0x0C), 0x00);
        assert_eq!(read_reg(&mut rtc, 0x0D), 0x80);
        assert_eq!(rtc.next_deadline_ns(), None, "idle RTC asks for no timer");
        assert_eq!(irq.count(), 0);
        // Index register reads float; NMI bit is masked off the index.
        let mut b = [0u8];
        rtc.read(0, &mut b);
        assert_eq!(b[0], 0xFF);
        rtc.write(0, &[0x8D]);
        rtc.read(1, &mut b);
        assert_eq!(b[0], 0x80);
    }

    #[test]
    fn leap_day_in_bcd_rolls_into_march() {
        let (mut rtc, _irq, clock) = rtc_at(LEAP_DAY_EVENING);
        assert_eq!(
            read_time(&mut rtc),
            [0x58, 0x59, 0x23, 0x05, 0x29, 0x02, 0x24, 0x20]
        );
        clock.advance_ns(SEC);
        assert_eq!(read_reg(&mut rtc, 0x00), 0x59);
        clock.advance_ns(SEC);
        // Friday 2024-03-01 00:00:00.
        assert_eq!(
            read_time(&mut rtc),
            [0x00, 0x00, 0x00, 0x06, 0x01, 0x03, 0x24, 0x20]
        );
    }

    #[test]
    fn binary_and_twelve_hour_modes() {
        let (mut rtc, _irq, clock) = rtc_at(LEAP_DAY_EVENING);
        write_reg(&mut rtc, 0x0B, B_24H | B_BINARY);
        assert_eq!(read_time(&mut rtc), [58, 59, 23, 5, 29, 2, 24, 20]);
        // 12-hour BCD: 11 PM.
        write_reg(&mut rtc, 0x0B, 0x00);
        assert_eq!(read_reg(&mut rtc, 0x04), 0x80 | 0x11);
        clock.advance_ns(2 * SEC);
        assert_eq!(read_reg(&mut rtc, 0x04), 0x12, "midnight is 12 AM");
        clock.advance_ns(12 * 3600 * SEC);
        assert_eq!(read_reg(&mut rtc, 0x04), 0x80 | 0x12, "noon is 12 PM");
        clock.advance_ns(3600 * SEC);
        write_reg(&mut rtc, 0x0B, B_BINARY);
        assert_eq!(read_reg(&mut rtc, 0x04), 0x80 | 1, "1 PM in binary 12 h");
    }

    #[test]
    fn linux_style_time_set_ticks_from_the_new_time() {
        let (mut rtc, _irq, clock) = rtc_at(LEAP_DAY_EVENING);
        // Linux mc146818_set_time: SET, divider reset, registers, restore B, then A.
        write_reg(&mut rtc, 0x0B, 0x02 | B_SET);
        write_reg(&mut rtc, 0x0A, 0x70 | 0x06);
        for (index, value) in [
            (0x00, 0x00),
            (0x02, 0x30),
            (0x04, 0x08),
            (0x07, 0x15),
            (0x08, 0x06),
            (0x09, 0x30),
            (0x32, 0x20),
        ] {
            write_reg(&mut rtc, index, value);
        }
        write_reg(&mut rtc, 0x0B, 0x02);
        clock.advance_ns(300 * MS);
        assert_eq!(
            read_reg(&mut rtc, 0x00),
            0x00,
            "clock held while the divider is in reset"
        );
        write_reg(&mut rtc, 0x0A, 0x26);
        // 2030-06-15 was a Saturday.
        assert_eq!(
            read_time(&mut rtc),
            [0x00, 0x30, 0x08, 0x07, 0x15, 0x06, 0x30, 0x20]
        );
        clock.advance_ns(400 * MS);
        assert_eq!(read_reg(&mut rtc, 0x00), 0x00);
        clock.advance_ns(200 * MS);
        assert_eq!(
            read_reg(&mut rtc, 0x00),
            0x01,
            "first update half a second after release"
        );
        clock.advance_ns(59 * SEC);
        assert_eq!(read_reg(&mut rtc, 0x00), 0x00);
        assert_eq!(read_reg(&mut rtc, 0x02), 0x31);

        // The offset survives a save and a restart at a later host time.
        let state = rtc.state();
        let later = ManualClock::new(LEAP_DAY_EVENING + 1000);
        let mut rtc2 = Rtc::new(CountingIrq::new(), later.clone());
        rtc2.restore(&state).unwrap();
        clock.advance_ns(1000 * SEC - clock.monotonic_ns());
        assert_eq!(read_time(&mut rtc2), read_time(&mut rtc));
        assert_eq!(
            read_time(&mut rtc2),
            [0x40, 0x46, 0x08, 0x07, 0x15, 0x06, 0x30, 0x20]
        );
        later.advance_ns(SEC);
        assert_eq!(read_reg(&mut rtc2, 0x00), 0x41);
    }

    #[test]
    fn seabios_style_set_and_direct_register_write() {
        let (mut rtc, _irq, clock) = rtc_at(0);
        write_reg(&mut rtc, 0x0B, 0x02 | B_SET);
        clock.advance_ns(5 * SEC);
        assert_eq!(read_reg(&mut rtc, 0x00), 0x00, "time frozen while SET");
        write_reg(&mut rtc, 0x09, 0x99);
        write_reg(&mut rtc, 0x32, 0x19);
        write_reg(&mut rtc, 0x0B, 0x02);
        assert_eq!(read_reg(&mut rtc, 0x09), 0x99);
        assert_eq!(read_reg(&mut rtc, 0x06), 0x06, "1999-01-01 was a Friday");
        clock.advance_ns(SEC);
        assert_eq!(read_reg(&mut rtc, 0x00), 0x01);
        // Writing a register while running takes effect immediately.
        write_reg(&mut rtc, 0x04, 0x17);
        assert_eq!(read_reg(&mut rtc, 0x04), 0x17);
        assert_eq!(read_reg(&mut rtc, 0x00), 0x01);
        clock.advance_ns(SEC);
        assert_eq!(read_reg(&mut rtc, 0x00), 0x02);
        assert_eq!(
            rtc.time_offset_ns(),
            (days_from_civil(1999, 1, 1) * 86_400 + 17 * 3600 - 5) * NS_PER_SEC,
            "1999-01-01 00:00:00 was set at host time 5 s"
        );
    }

    #[test]
    fn uip_window_and_wait_loops_terminate() {
        let (mut rtc, _irq, clock) = rtc_at(1_000);
        clock.advance_ns(500 * MS);
        assert_eq!(read_reg(&mut rtc, 0x0A), 0x26);
        clock.advance_ns(500 * MS - 200_000);
        assert_eq!(read_reg(&mut rtc, 0x0A), 0xA6);
        clock.advance_ns(200_001);
        assert_eq!(read_reg(&mut rtc, 0x0A), 0x26);

        // Wait for UIP to rise then fall, 10 µs per poll, as SeaBIOS and Linux loop.
        let mut polls = 0;
        while read_reg(&mut rtc, 0x0A) & A_UIP == 0 {
            clock.advance_ns(10_000);
            polls += 1;
            assert!(polls < 200_000);
        }
        let rose_in_second = read_reg(&mut rtc, 0x00);
        while read_reg(&mut rtc, 0x0A) & A_UIP != 0 {
            clock.advance_ns(10_000);
            polls += 1;
            assert!(polls < 200_000);
        }
        assert_eq!(
            read_reg(&mut rtc, 0x00),
            rose_in_second + 1,
            "UIP fell at the update"
        );

        // Never set in SET mode or with the divider in reset.
        clock.advance_ns(SEC - 100_000 - clock.monotonic_ns() % SEC);
        assert_eq!(read_reg(&mut rtc, 0x0A), 0xA6);
        write_reg(&mut rtc, 0x0B, 0x82);
        assert_eq!(read_reg(&mut rtc, 0x0A), 0x26);
        write_reg(&mut rtc, 0x0B, 0x02);
        write_reg(&mut rtc, 0x0A, 0x66);
        clock.advance_ns(SEC - 100_000 - clock.monotonic_ns() % SEC);
        assert_eq!(read_reg(&mut rtc, 0x0A), 0x66);
    }

    #[test]
    fn periodic_interrupt_rate_over_one_second() {
        let (mut rtc, irq, clock) = rtc_at(LEAP_DAY_EVENING);
        write_reg(&mut rtc, 0x0A, 0x26); // rate 6 = 1024 Hz
        write_reg(&mut rtc, 0x0B, 0x02 | B_PIE);
        let calls = run_timers(&mut rtc, &clock, SEC, true);
        assert!(
            (1023..=1025).contains(&irq.count()),
            "edges {}",
            irq.count()
        );
        assert!((1023..=1026).contains(&calls), "calls {calls}");
        assert!(!irq.level(), "handler read C, line low");

        // Rates 1 and 2 are 256 and 128 Hz; rate 15 is 2 Hz.
        for (rate, hz) in [(1u8, 256u64), (2, 128), (15, 2), (3, 8192)] {
            let start = irq.count();
            write_reg(&mut rtc, 0x0A, 0x20 | rate);
            let end = clock.monotonic_ns() + SEC;
            run_timers(&mut rtc, &clock, end, true);
            let edges = irq.count() - start;
            assert!(
                edges + 1 >= hz && edges <= hz + 1,
                "rate {rate}: {edges} edges"
            );
        }
    }

    #[test]
    fn unacknowledged_periodic_ticks_coalesce() {
        let (mut rtc, irq, clock) = rtc_at(LEAP_DAY_EVENING);
        write_reg(&mut rtc, 0x0A, 0x23); // 8192 Hz
        write_reg(&mut rtc, 0x0B, 0x02 | B_PIE);
        run_timers(&mut rtc, &clock, SEC, false);
        assert_eq!(irq.count(), 1, "no new edge until C is read");
        assert!(irq.level());
        // A very late timer call coalesces too. The hour crossed midnight, which matches
        // the reset alarm (00:00:00), so AF is set as well, without an interrupt.
        clock.advance_ns(3600 * SEC);
        let now = clock.monotonic_ns();
        rtc.on_timer(now);
        assert!(rtc.next_deadline_ns().unwrap() > now);
        assert_eq!(read_reg(&mut rtc, 0x0C), C_IRQF | C_PF | C_AF | C_UF);
        assert!(!irq.level());
        assert_eq!(read_reg(&mut rtc, 0x0C), 0);
    }

    #[test]
    fn flags_without_enables_raise_nothing() {
        let (mut rtc, irq, clock) = rtc_at(LEAP_DAY_EVENING);
        write_reg(&mut rtc, 0x0A, 0x26);
        assert_eq!(rtc.next_deadline_ns(), None);
        clock.advance_ns(5 * MS);
        assert_eq!(
            read_reg(&mut rtc, 0x0C),
            C_PF,
            "PF set without PIE, no IRQF"
        );
        clock.advance_ns(2 * SEC);
        assert_eq!(
            read_reg(&mut rtc, 0x0C),
            C_PF | C_AF | C_UF,
            "midnight matched the reset alarm 00:00:00"
        );
        assert_eq!(irq.count(), 0);
        // Enabling a source whose flag is pending raises at once, as QEMU does.
        clock.advance_ns(5 * MS);
        write_reg(&mut rtc, 0x0B, 0x02 | B_PIE);
        assert_eq!(irq.count(), 1);
        assert!(irq.level());
        // Disabling it again drops IRQF and the line.
        write_reg(&mut rtc, 0x0B, 0x02);
        assert!(!irq.level());
        assert_eq!(read_reg(&mut rtc, 0x0C), C_PF);
    }

    #[test]
    fn update_interrupt_once_per_second() {
        let (mut rtc, irq, clock) = rtc_at(NOON_MARCH_1);
        write_reg(&mut rtc, 0x0A, 0x20); // periodic rate 0: no PF
        clock.advance_ns(300 * MS);
        write_reg(&mut rtc, 0x0B, 0x02 | B_UIE);
        let deadline = rtc.next_deadline_ns().unwrap();
        assert_eq!(deadline, SEC, "next second boundary");
        let mut seen = Vec::new();
        for _ in 0..5 {
            let deadline = rtc.next_deadline_ns().unwrap();
            clock.advance_ns(deadline - clock.monotonic_ns());
            rtc.on_timer(deadline);
            assert!(irq.level());
            seen.push(read_reg(&mut rtc, 0x0C));
            assert!(!irq.level());
        }
        assert_eq!(seen, vec![C_IRQF | C_UF; 5]);
        assert_eq!(irq.count(), 5);
        // A late engine sees the missed deadline as due, once; then it moves ahead.
        let missed = rtc.next_deadline_ns().unwrap();
        clock.advance_ns(5 * SEC + 300 * MS);
        let now = clock.monotonic_ns();
        assert_eq!(rtc.next_deadline_ns(), Some(missed));
        assert!(missed <= now);
        rtc.on_timer(now);
        assert_eq!(rtc.next_deadline_ns(), Some(missed + 5 * SEC));
        assert_eq!(
            read_reg(&mut rtc, 0x0C),
            C_IRQF | C_UF,
            "five updates, one flag"
        );
        assert_eq!(irq.count(), 6);
        // Setting SET clears UIE and stops updates.
        write_reg(&mut rtc, 0x0B, 0x02 | B_SET | B_UIE);
        assert_eq!(read_reg(&mut rtc, 0x0B), 0x82);
        assert_eq!(rtc.next_deadline_ns(), None);
    }

    #[test]
    fn alarm_exact_and_dont_care() {
        let (mut rtc, irq, clock) = rtc_at(NOON_MARCH_1);
        write_reg(&mut rtc, 0x0A, 0x20); // periodic rate 0: no PF
        write_reg(&mut rtc, 0x01, 0x05);
        write_reg(&mut rtc, 0x03, 0x00);
        write_reg(&mut rtc, 0x05, 0x12);
        write_reg(&mut rtc, 0x0B, 0x02 | B_AIE);
        let mut alarm_at = Vec::new();
        for _ in 0..10 {
            let deadline = rtc.next_deadline_ns().unwrap();
            clock.advance_ns(deadline - clock.monotonic_ns());
            rtc.on_timer(deadline);
            let c = read_reg(&mut rtc, 0x0C);
            assert_eq!(c & C_UF, C_UF, "UF set even though UIE is off");
            if c & C_IRQF != 0 {
                assert_eq!(c & C_AF, C_AF);
                alarm_at.push(read_reg(&mut rtc, 0x00));
            }
        }
        assert_eq!(alarm_at, vec![0x05]);
        assert_eq!(irq.count(), 1);

        // Hours and minutes don't care: fires at :30 of every minute.
        write_reg(&mut rtc, 0x01, 0x30);
        write_reg(&mut rtc, 0x03, 0xFF);
        write_reg(&mut rtc, 0x05, 0xC0);
        let end = clock.monotonic_ns() + 180 * SEC;
        run_timers(&mut rtc, &clock, end, true);
        assert_eq!(irq.count(), 4);

        // All don't care: every second. Late timer: one flag for many seconds.
        write_reg(&mut rtc, 0x01, 0xC0);
        let start = irq.count();
        let end = clock.monotonic_ns() + 10 * SEC;
        run_timers(&mut rtc, &clock, end, true);
        assert_eq!(irq.count() - start, 10);

        // An impossible alarm never fires, even after days.
        write_reg(&mut rtc, 0x01, 0x61);
        read_reg(&mut rtc, 0x0C);
        clock.advance_ns(3 * 86_400 * SEC);
        rtc.on_timer(clock.monotonic_ns());
        assert_eq!(read_reg(&mut rtc, 0x0C), C_UF);
    }

    #[test]
    fn alarm_in_twelve_hour_binary_mode() {
        // 2024-03-01 14:59:59: the alarm at 3 PM matches "0x83" in binary 12 h.
        let (mut rtc, irq, clock) = rtc_at(NOON_MARCH_1 + 3 * 3600 - 1);
        write_reg(&mut rtc, 0x0A, 0x20);
        write_reg(&mut rtc, 0x0B, B_BINARY | B_AIE);
        write_reg(&mut rtc, 0x01, 0);
        write_reg(&mut rtc, 0x03, 0);
        write_reg(&mut rtc, 0x05, 0x80 | 3);
        run_timers(&mut rtc, &clock, 2 * SEC, false);
        assert_eq!(irq.count(), 1);
        assert_eq!(read_reg(&mut rtc, 0x0C), C_IRQF | C_AF | C_UF);
    }

    #[test]
    fn memory_size_bytes() {
        let (mut rtc, _irq, _clock) = rtc_at(0);
        rtc.set_memory_sizes(128 * MIB, 0);
        let nv = rtc.nvram();
        assert_eq!((nv[0x15], nv[0x16]), (0x80, 0x02));
        assert_eq!(
            (nv[0x17], nv[0x18]),
            (0xFF, 0xFF),
            "127 MiB of extended memory caps"
        );
        assert_eq!((nv[0x30], nv[0x31]), (0xFF, 0xFF));
        assert_eq!(
            (nv[0x34], nv[0x35]),
            (0x00, 0x07),
            "112 MiB / 64 KiB = 0x700"
        );
        assert_eq!((nv[0x5B], nv[0x5C], nv[0x5D]), (0, 0, 0));

        rtc.set_memory_sizes(15 * MIB, 0);
        assert_eq!(
            (read_reg(&mut rtc, 0x17), read_reg(&mut rtc, 0x18)),
            (0x00, 0x38),
            "14 MiB"
        );
        assert_eq!((read_reg(&mut rtc, 0x34), read_reg(&mut rtc, 0x35)), (0, 0));

        rtc.set_memory_sizes(3584 * MIB, 2048 * MIB);
        let nv = rtc.nvram();
        assert_eq!((nv[0x17], nv[0x18]), (0xFF, 0xFF));
        assert_eq!(
            (nv[0x34], nv[0x35]),
            (0x00, 0xDF),
            "3568 MiB / 64 KiB = 0xDF00"
        );
        assert_eq!(
            (nv[0x5B], nv[0x5C], nv[0x5D]),
            (0x00, 0x80, 0x00),
            "2 GiB / 64 KiB"
        );

        rtc.set_cpu_count(4);
        assert_eq!(read_reg(&mut rtc, 0x5F), 3);
        rtc.set_cpu_count(0);
        assert_eq!(read_reg(&mut rtc, 0x5F), 0);
        assert_eq!(rtc.set_cmos_byte(0x3D, 0x21), Ok(()));
        assert_eq!(read_reg(&mut rtc, 0x3D), 0x21);
        assert_eq!(rtc.set_cmos_byte(0x0B, 0xFF), Err(RtcError::NotNvram(0x0B)));
        assert_eq!(rtc.set_cmos_byte(0x80, 0xFF), Err(RtcError::NotNvram(0x80)));
        assert_eq!(read_reg(&mut rtc, 0x0B), 0x02);
    }

    #[test]
    fn nvram_round_trip_and_engine_bytes_win() {
        let (mut rtc, _irq, _clock) = rtc_at(LEAP_DAY_EVENING);
        rtc.set_memory_sizes(128 * MIB, 0);
        write_reg(&mut rtc, 0x40, 0xAB);
        write_reg(&mut rtc, 0x7F, 0xCD);
        write_reg(&mut rtc, 0x01, 0x42);
        write_reg(&mut rtc, 0x34, 0x11); // the guest scribbles over a memory byte
        let image = rtc.nvram();
        assert_eq!(image.len(), 128);
        assert_eq!(image[0x00], 0x58);
        assert_eq!(image[0x09], 0x24);
        assert_eq!(image[0x0D], 0x80);

        let (mut fresh, _irq2, _clock2) = rtc_at(LEAP_DAY_EVENING);
        fresh.set_memory_sizes(512 * MIB, 0);
        fresh.load_nvram(&image).unwrap();
        assert_eq!(read_reg(&mut fresh, 0x40), 0xAB);
        assert_eq!(read_reg(&mut fresh, 0x7F), 0xCD);
        assert_eq!(read_reg(&mut fresh, 0x01), 0x42);
        assert_eq!(
            read_reg(&mut fresh, 0x35),
            0x1F,
            "engine's 512 MiB, not the image's"
        );
        assert_eq!(read_reg(&mut fresh, 0x34), 0x00);
        assert_eq!(
            fresh.nvram()[0x0E..],
            image[0x0E..0x34]
                .iter()
                .chain([0x00, 0x1F].iter())
                .chain(image[0x36..].iter())
                .copied()
                .collect::<Vec<_>>()[..]
        );

        // State round trip keeps the engine's bytes too.
        let state = rtc.state();
        fresh.restore(&state).unwrap();
        assert_eq!(read_reg(&mut fresh, 0x35), 0x1F);
        assert_eq!(read_reg(&mut fresh, 0x40), 0xAB);

        assert_eq!(
            fresh.load_nvram(&[0u8; 64]),
            Err(RtcError::WrongLength {
                expected: 128,
                actual: 64
            })
        );
        let bad = RtcState {
            cmos: vec![0; 129],
            ..state
        };
        assert!(matches!(
            fresh.restore(&bad),
            Err(RtcError::WrongLength { actual: 129, .. })
        ));
        assert_eq!(
            read_reg(&mut fresh, 0x40),
            0xAB,
            "failed load changes nothing"
        );
    }

    #[test]
    fn restore_drives_line_from_flags() {
        let (mut rtc, _irq, clock) = rtc_at(NOON_MARCH_1);
        write_reg(&mut rtc, 0x0A, 0x20);
        write_reg(&mut rtc, 0x0B, 0x02 | B_UIE);
        clock.advance_ns(SEC);
        let state = rtc.state();
        assert_eq!(state.cmos[0x0C], C_IRQF | C_UF);
        let (mut other, irq, _c) = rtc_at(LEAP_DAY_EVENING);
        other.restore(&state).unwrap();
        assert!(irq.level());
        assert_eq!(read_reg(&mut other, 0x0C), C_IRQF | C_UF);
        assert!(!irq.level());
    }

    #[test]
    fn reset_disables_interrupts() {
        let (mut rtc, irq, clock) = rtc_at(LEAP_DAY_EVENING);
        write_reg(&mut rtc, 0x0B, 0x02 | B_UIE | B_PIE | B_BINARY);
        clock.advance_ns(SEC);
        rtc.on_timer(SEC);
        assert!(irq.level());
        rtc.reset();
        assert!(!irq.level());
        assert_eq!(read_reg(&mut rtc, 0x0B), 0x02 | B_BINARY);
        assert_eq!(rtc.next_deadline_ns(), None);
    }

    use crate::test_support::TestRng as XorShift;

    #[test]
    fn hostile_register_sequences_never_panic() {
        let (mut rtc, irq, clock) = rtc_at(LEAP_DAY_EVENING);
        let mut rng = XorShift(0x1234_5678_9ABC_DEF1);
        let started = std::time::Instant::now();
        let mut timer_calls = 0;
        let mut irq_high_seen = 0;
        for _ in 0..200_000 {
            let r = rng.next();
            match r % 10 {
                // Favour the clock registers, but also hit NVRAM and the NMI bit.
                0..=2 if r & 0x100 != 0 => rtc.write(0, &[((r >> 16) % 14) as u8]),
                0..=2 => rtc.write(0, &[(r >> 16) as u8]),
                3..=5 => rtc.write(1, &[(r >> 8) as u8]),
                6 => {
                    let mut b = [0u8; 1];
                    rtc.read(1, &mut b);
                }
                7 => {
                    let mut b = [0u8; 4];
                    let offset = (r >> 8) % 6;
                    rtc.read(offset, &mut b[..((r >> 16) % 5) as usize]);
                    rtc.write(offset, &b[..((r >> 24) % 5) as usize]);
                }
                8 => {
                    let step = match (r >> 8) % 8 {
                        0 => (r >> 16) % (400 * 86_400 * SEC),
                        1..=3 => (r >> 16) % (2 * SEC),
                        _ => (r >> 16) % 2_000_000,
                    };
                    clock.advance_ns(step);
                }
                _ => {
                    let now = clock.monotonic_ns();
                    if rtc.next_deadline_ns().is_some_and(|d| d <= now) {
                        rtc.on_timer(now);
                        timer_calls += 1;
                    }
                    if let Some(deadline) = rtc.next_deadline_ns() {
                        assert!(deadline > now, "deadline in the past after on_timer");
                    }
                }
            }
            // Check invariants without disturbing the guest's index register.
            let guest_index = rtc.index;
            assert_eq!(read_reg(&mut rtc, 0x0D), 0x80);
            let b = read_reg(&mut rtc, 0x0B);
            let a = read_reg(&mut rtc, 0x0A);
            if b & B_SET != 0 || a & 0x70 > 0x20 {
                assert_eq!(a & A_UIP, 0);
            }
            assert_eq!(irq.level(), rtc.cmos[REG_C] & C_IRQF != 0);
            irq_high_seen += usize::from(irq.level());
            rtc.index = guest_index;
        }
        assert!(started.elapsed().as_secs() < 60);
        assert!(
            timer_calls > 100,
            "the sequence exercised the timer ({timer_calls})"
        );
        assert!(irq_high_seen > 100, "and raised the line ({irq_high_seen})");
        assert_eq!(rtc.nvram().len(), 128);
        let state = rtc.state();
        rtc.restore(&state).unwrap();
    }

    #[test]
    fn time_register_garbage_normalises() {
        let (mut rtc, _irq, clock) = rtc_at(LEAP_DAY_EVENING);
        write_reg(&mut rtc, 0x0B, 0x82);
        for index in [0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32] {
            write_reg(&mut rtc, index, 0xFF);
        }
        write_reg(&mut rtc, 0x0B, 0x02);
        clock.advance_ns(SEC);
        let time = read_time(&mut rtc);
        for (value, max) in time
            .iter()
            .zip([0x59, 0x59, 0x23, 0x07, 0x31, 0x12, 0x99, 0x99])
        {
            assert!(*value <= max && value & 0x0F <= 9, "{time:x?}");
        }
        // A hostile late timer with everything enabled still returns promptly.
        write_reg(&mut rtc, 0x0B, 0x02 | B_PIE | B_AIE | B_UIE);
        write_reg(&mut rtc, 0x01, 0xC0);
        clock.advance_ns(100 * 365 * 86_400 * SEC);
        let now = clock.monotonic_ns();
        rtc.on_timer(now);
        assert!(rtc.next_deadline_ns().unwrap() > now);
        assert_eq!(read_reg(&mut rtc, 0x0C), C_IRQF | C_PF | C_AF | C_UF);
    }
}
