//! A PS/2 mouse with the IntelliMouse (wheel, ID 3) and IntelliMouse Explorer
//! (wheel + buttons 4/5, ID 4) extensions, as it sits behind the i8042 AUX port.
//!
//! Emulated: the command set (0xFF reset -> FA AA 00, 0xF6 defaults, 0xF5/0xF4 reporting,
//! 0xF3 sample rate with the 200,100,80 and 200,200,80 "knocks" that switch the ID,
//! 0xF2 get ID, 0xF0 remote mode, 0xEB read data, 0xEE/0xEC wrap (echo) mode, 0xEA stream
//! mode, 0xE9 status request, 0xE8 resolution, 0xE6/0xE7 scaling (2:1 is applied to
//! stream-mode packets), 0xFE resend, unknown commands -> 0xFE) and movement packets: 3
//! bytes, or 4 with the wheel/Explorer extensions. Each packet carries 9-bit signed X/Y
//! (-256..=255); bigger motions are split into several packets (at most a bounded number
//! per call; the rest is sent as the guest drains the queue). Host Y (positive = down) is
//! inverted to PS/2 Y (positive = up).
//!
//! Replies and movement data sit in two bounded queues; replies go out first. Packets are
//! queued whole or not at all.
//!
//! Not emulated: resolution scaling of the host deltas (the host delivers guest-sized
//! deltas), sample-rate timing (a packet is produced per host event), the overflow bits
//! (motions are split instead), touchpad/TrackPoint protocols.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Movement bytes the mouse buffers.
pub const MOUSE_QUEUE_CAPACITY: usize = 256;
/// Command reply bytes the mouse buffers.
pub const MOUSE_REPLY_CAPACITY: usize = 16;
/// Acknowledge.
pub const MOUSE_ACK: u8 = 0xFA;
/// Resend / invalid command.
pub const MOUSE_RESEND: u8 = 0xFE;
/// Largest number of packets one host event may produce at once.
const MAX_PACKETS_PER_EVENT: usize = 16;
/// Bound on the motion accumulated while it cannot be sent.
const MAX_PENDING_MOTION: i32 = 8192;

/// Buttons as passed to [`Ps2Mouse::motion`].
pub const BUTTON_LEFT: u8 = 0x01;
pub const BUTTON_RIGHT: u8 = 0x02;
pub const BUTTON_MIDDLE: u8 = 0x04;
pub const BUTTON_SIDE: u8 = 0x08;
pub const BUTTON_EXTRA: u8 = 0x10;

/// Device IDs reported by 0xF2.
pub const ID_STANDARD: u8 = 0x00;
pub const ID_INTELLIMOUSE: u8 = 0x03;
pub const ID_EXPLORER: u8 = 0x04;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
enum Expecting {
    #[default]
    Command,
    SampleRate,
    Resolution,
}

/// The mouse. Plain data: serialize it as is for save/restore.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ps2Mouse {
    replies: VecDeque<u8>,
    packets: VecDeque<u8>,
    expecting: Expecting,
    reporting: bool,
    remote: bool,
    wrap: bool,
    scaling_2to1: bool,
    sample_rate: u8,
    resolution: u8,
    device_id: u8,
    /// The last three sample rates set, oldest first, for the ID knocks.
    recent_rates: [u8; 3],
    buttons: u8,
    dx: i32,
    dy: i32,
    dz: i32,
    last_sent: u8,
}

impl Default for Ps2Mouse {
    fn default() -> Self {
        Self::new()
    }
}

impl Ps2Mouse {
    /// A mouse after power-on: standard ID, stream mode, reporting disabled.
    pub fn new() -> Self {
        Self {
            replies: VecDeque::with_capacity(MOUSE_REPLY_CAPACITY),
            packets: VecDeque::new(),
            expecting: Expecting::Command,
            reporting: false,
            remote: false,
            wrap: false,
            scaling_2to1: false,
            sample_rate: 100,
            resolution: 2,
            device_id: ID_STANDARD,
            recent_rates: [0; 3],
            buttons: 0,
            dx: 0,
            dy: 0,
            dz: 0,
            last_sent: 0,
        }
    }

    /// Machine reset: back to the power-on state.
    pub fn reset(&mut self) {
        *self = Self::new();
    }

    /// The ID the mouse reports (0, 3 or 4).
    pub fn device_id(&self) -> u8 {
        self.device_id
    }

    /// Whether movement reporting is on (0xF4).
    pub fn reporting_enabled(&self) -> bool {
        self.reporting
    }

    /// Whether the mouse is in remote (polled) mode.
    pub fn remote_mode(&self) -> bool {
        self.remote
    }

    /// Whether wrap (echo) mode is on.
    pub fn wrap_mode(&self) -> bool {
        self.wrap
    }

    pub fn sample_rate(&self) -> u8 {
        self.sample_rate
    }

    pub fn resolution(&self) -> u8 {
        self.resolution
    }

    /// Whether a byte waits to be sent to the controller.
    pub fn has_data(&self) -> bool {
        !self.replies.is_empty() || !self.packets.is_empty()
    }

    /// Bytes waiting to be sent.
    pub fn pending_len(&self) -> usize {
        self.replies.len() + self.packets.len()
    }

    /// The next byte for the controller: replies first, then movement data. When the
    /// movement queue runs dry, motion that did not fit before is packetized.
    pub fn read_byte(&mut self) -> Option<u8> {
        let byte = self
            .replies
            .pop_front()
            .or_else(|| self.packets.pop_front())?;
        self.last_sent = byte;
        if self.packets.is_empty() && self.streaming() && self.has_pending_motion() {
            self.send_packets(false);
        }
        Some(byte)
    }

    fn reply(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            if self.replies.len() < MOUSE_REPLY_CAPACITY {
                self.replies.push_back(byte);
            }
        }
    }

    fn streaming(&self) -> bool {
        self.reporting && !self.remote && !self.wrap
    }

    fn has_pending_motion(&self) -> bool {
        self.dx != 0 || self.dy != 0 || self.dz != 0
    }

    fn load_defaults(&mut self) {
        self.sample_rate = 100;
        self.resolution = 2;
        self.scaling_2to1 = false;
        self.reporting = false;
        self.remote = false;
        self.expecting = Expecting::Command;
        self.packets.clear();
        self.dx = 0;
        self.dy = 0;
        self.dz = 0;
    }

    /// The status bytes of 0xE9.
    fn status_bytes(&self) -> [u8; 3] {
        let mut status = 0;
        if self.remote {
            status |= 0x40;
        }
        if self.reporting {
            status |= 0x20;
        }
        if self.scaling_2to1 {
            status |= 0x10;
        }
        if self.buttons & BUTTON_LEFT != 0 {
            status |= 0x04;
        }
        if self.buttons & BUTTON_MIDDLE != 0 {
            status |= 0x02;
        }
        if self.buttons & BUTTON_RIGHT != 0 {
            status |= 0x01;
        }
        [status, self.resolution, self.sample_rate]
    }

    /// A byte from the host (sent with the controller's 0xD4 command).
    pub fn write(&mut self, byte: u8) {
        if self.wrap && byte != 0xFF && byte != 0xEC {
            // Wrap mode echoes everything but "reset" and "reset wrap mode".
            self.reply(&[byte]);
            return;
        }
        let expecting = std::mem::take(&mut self.expecting);
        // No valid argument is >= 0xE6: such a byte is a new command (real mice abort
        // the pending one), so a confused driver can always get out with 0xFF.
        let expecting = if byte >= 0xE6 {
            Expecting::Command
        } else {
            expecting
        };
        match expecting {
            Expecting::SampleRate => {
                self.sample_rate = byte;
                self.recent_rates = [self.recent_rates[1], self.recent_rates[2], byte];
                match self.recent_rates {
                    [200, 100, 80] => self.device_id = ID_INTELLIMOUSE,
                    [200, 200, 80] => self.device_id = ID_EXPLORER,
                    _ => {}
                }
                self.reply(&[MOUSE_ACK]);
                return;
            }
            Expecting::Resolution => {
                self.resolution = byte & 0x03;
                self.reply(&[MOUSE_ACK]);
                return;
            }
            Expecting::Command => {}
        }
        match byte {
            0xE6 => {
                self.scaling_2to1 = false;
                self.reply(&[MOUSE_ACK]);
            }
            0xE7 => {
                self.scaling_2to1 = true;
                self.reply(&[MOUSE_ACK]);
            }
            0xE8 => {
                self.expecting = Expecting::Resolution;
                self.reply(&[MOUSE_ACK]);
            }
            0xE9 => {
                let status = self.status_bytes();
                self.reply(&[MOUSE_ACK]);
                self.reply(&status);
            }
            0xEA => {
                self.remote = false;
                self.reset_motion();
                self.reply(&[MOUSE_ACK]);
            }
            0xEB => {
                self.reply(&[MOUSE_ACK]);
                // Read data: one packet with the accumulated motion, as a reply.
                let packet = self.build_packet(false);
                self.reply(&packet);
            }
            0xEC => {
                self.wrap = false;
                self.reply(&[MOUSE_ACK]);
            }
            0xEE => {
                self.wrap = true;
                self.reset_motion();
                self.reply(&[MOUSE_ACK]);
            }
            0xF0 => {
                self.remote = true;
                self.reset_motion();
                self.reply(&[MOUSE_ACK]);
            }
            0xF2 => {
                let id = self.device_id;
                self.reset_motion();
                self.reply(&[MOUSE_ACK, id]);
            }
            0xF3 => {
                self.expecting = Expecting::SampleRate;
                self.reply(&[MOUSE_ACK]);
            }
            0xF4 => {
                self.reporting = true;
                self.reset_motion();
                self.reply(&[MOUSE_ACK]);
            }
            0xF5 => {
                self.reporting = false;
                self.packets.clear();
                self.reset_motion();
                self.reply(&[MOUSE_ACK]);
            }
            0xF6 => {
                self.load_defaults();
                self.reply(&[MOUSE_ACK]);
            }
            0xFE => {
                let last = self.last_sent;
                self.reply(&[last]);
            }
            0xFF => {
                self.load_defaults();
                self.wrap = false;
                self.device_id = ID_STANDARD;
                self.recent_rates = [0; 3];
                self.replies.clear();
                self.reply(&[MOUSE_ACK, 0xAA, ID_STANDARD]);
            }
            _ => self.reply(&[MOUSE_RESEND]),
        }
    }

    fn reset_motion(&mut self) {
        self.dx = 0;
        self.dy = 0;
        self.dz = 0;
    }

    /// Host pointer movement. `dx` positive = right, `dy` positive = down (screen
    /// coordinates, as the host delivers them), `dz` positive = wheel turned towards the
    /// user (scroll down). `buttons`: bit 0 left, 1 right, 2 middle, 3 side, 4 extra.
    /// Produces packets only when reporting is enabled in stream mode; in remote mode the
    /// motion is accumulated for 0xEB.
    pub fn motion(&mut self, dx: i32, dy: i32, dz: i32, buttons: u8) {
        self.buttons = buttons & 0x1f;
        if self.wrap || (!self.remote && !self.reporting) {
            return;
        }
        let bound = |value: i32| value.clamp(-MAX_PENDING_MOTION, MAX_PENDING_MOTION);
        self.dx = bound(self.dx.saturating_add(dx));
        // PS/2 Y grows upwards.
        self.dy = bound(self.dy.saturating_sub(dy));
        self.dz = if self.device_id == ID_STANDARD {
            0
        } else {
            bound(self.dz.saturating_add(dz))
        };
        if !self.remote {
            self.send_packets(true);
        }
    }

    fn packet_len(&self) -> usize {
        if self.device_id == ID_STANDARD {
            3
        } else {
            4
        }
    }

    /// Queues packets until the motion is sent, the queue is full or the per-event bound
    /// is reached. `always` sends one packet even without motion (a button change).
    fn send_packets(&mut self, always: bool) {
        let len = self.packet_len();
        for index in 0..MAX_PACKETS_PER_EVENT {
            if (index > 0 || !always) && !self.has_pending_motion() {
                break;
            }
            if self.packets.len() + len > MOUSE_QUEUE_CAPACITY {
                break;
            }
            let packet = self.build_packet(self.scaling_2to1);
            self.packets.extend(packet);
        }
    }

    /// One packet with as much of the accumulated motion as fits; the rest stays.
    fn build_packet(&mut self, scale: bool) -> Vec<u8> {
        let dx = self.dx.clamp(-256, 255);
        let dy = self.dy.clamp(-256, 255);
        self.dx -= dx;
        self.dy -= dy;
        let (report_x, report_y) = if scale {
            (scale_2to1(dx), scale_2to1(dy))
        } else {
            (dx, dy)
        };
        let mut first = 0x08 | (self.buttons & 0x07);
        if report_x < 0 {
            first |= 0x10;
        }
        if report_y < 0 {
            first |= 0x20;
        }
        let mut packet = vec![first, report_x as u8, report_y as u8];
        match self.device_id {
            ID_INTELLIMOUSE => {
                let dz = self.dz.clamp(-127, 127);
                self.dz -= dz;
                packet.push(dz as u8);
            }
            ID_EXPLORER => {
                let dz = self.dz.clamp(-8, 7);
                self.dz -= dz;
                packet.push((dz as u8 & 0x0f) | ((self.buttons & 0x18) << 1));
            }
            _ => self.dz = 0,
        }
        packet
    }
}

/// 2:1 scaling as the PS/2 mouse applies it, kept inside the 9-bit range.
fn scale_2to1(value: i32) -> i32 {
    let magnitude = match value.abs() {
        0 => 0,
        1 | 2 => 1,
        3 => 3,
        4 => 6,
        5 => 9,
        other => other * 2,
    };
    (magnitude * value.signum()).clamp(-256, 255)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(mouse: &mut Ps2Mouse) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(byte) = mouse.read_byte() {
            out.push(byte);
            assert!(out.len() < 100_000, "mouse output never ends");
        }
        out
    }

    fn send(mouse: &mut Ps2Mouse, bytes: &[u8]) -> Vec<u8> {
        for &byte in bytes {
            mouse.write(byte);
        }
        drain(mouse)
    }

    fn set_rates(mouse: &mut Ps2Mouse, rates: &[u8]) {
        for &rate in rates {
            assert_eq!(send(mouse, &[0xF3, rate]), vec![MOUSE_ACK, MOUSE_ACK]);
        }
    }

    #[test]
    fn reset_id_and_knocks() {
        let mut mouse = Ps2Mouse::new();
        assert_eq!(send(&mut mouse, &[0xFF]), vec![MOUSE_ACK, 0xAA, 0x00]);
        assert_eq!(send(&mut mouse, &[0xF2]), vec![MOUSE_ACK, 0x00]);
        set_rates(&mut mouse, &[200, 100, 80]);
        assert_eq!(send(&mut mouse, &[0xF2]), vec![MOUSE_ACK, ID_INTELLIMOUSE]);
        set_rates(&mut mouse, &[200, 200, 80]);
        assert_eq!(send(&mut mouse, &[0xF2]), vec![MOUSE_ACK, ID_EXPLORER]);
        // Linux's "horizontal scrolling" knock afterwards does not change the ID.
        set_rates(&mut mouse, &[200, 80, 40]);
        assert_eq!(mouse.device_id(), ID_EXPLORER);
        assert_eq!(send(&mut mouse, &[0xFF]), vec![MOUSE_ACK, 0xAA, 0x00]);
        assert_eq!(mouse.device_id(), ID_STANDARD);
        // An incomplete knock does nothing.
        set_rates(&mut mouse, &[200, 100, 60]);
        assert_eq!(mouse.device_id(), ID_STANDARD);
    }

    #[test]
    fn status_request_reports_mode_resolution_and_rate() {
        let mut mouse = Ps2Mouse::new();
        assert_eq!(send(&mut mouse, &[0xE9]), vec![MOUSE_ACK, 0x00, 2, 100]);
        assert_eq!(
            send(&mut mouse, &[0xE8, 3, 0xE7, 0xF3, 40, 0xF4]),
            vec![MOUSE_ACK; 6]
        );
        mouse.motion(0, 0, 0, BUTTON_LEFT | BUTTON_RIGHT);
        drain(&mut mouse);
        assert_eq!(
            send(&mut mouse, &[0xE9]),
            vec![MOUSE_ACK, 0x20 | 0x10 | 0x05, 3, 40]
        );
        assert_eq!(
            send(&mut mouse, &[0xF0, 0xE6, 0xE9]),
            vec![MOUSE_ACK, MOUSE_ACK, MOUSE_ACK, 0x60 | 0x05, 3, 40]
        );
        assert_eq!(
            send(&mut mouse, &[0xF6, 0xE9]),
            vec![MOUSE_ACK, MOUSE_ACK, 0x05, 2, 100]
        );
    }

    #[test]
    fn stream_packets_with_sign_bits_and_inverted_y() {
        let mut mouse = Ps2Mouse::new();
        mouse.motion(5, 5, 0, 0);
        assert!(!mouse.has_data(), "reporting is off after power-on");
        assert_eq!(send(&mut mouse, &[0xF4]), vec![MOUSE_ACK]);
        mouse.motion(5, 3, 0, BUTTON_LEFT);
        // Host down = PS/2 negative Y.
        assert_eq!(drain(&mut mouse), vec![0x08 | 0x20 | 0x01, 5, (-3i8) as u8]);
        mouse.motion(-1, -2, 0, BUTTON_MIDDLE);
        assert_eq!(drain(&mut mouse), vec![0x08 | 0x10 | 0x04, 0xFF, 2]);
        // A button change alone still produces a packet.
        mouse.motion(0, 0, 0, 0);
        assert_eq!(drain(&mut mouse), vec![0x08, 0, 0]);
        // 9-bit range: -256..=255 in one packet.
        mouse.motion(255, 256, 0, 0);
        assert_eq!(drain(&mut mouse), vec![0x08 | 0x20, 0xFF, 0x00]);
    }

    #[test]
    fn wheel_and_explorer_packets() {
        let mut mouse = Ps2Mouse::new();
        set_rates(&mut mouse, &[200, 100, 80]);
        send(&mut mouse, &[0xF4]);
        mouse.motion(1, 0, -2, 0);
        assert_eq!(drain(&mut mouse), vec![0x08, 1, 0, 0xFE]);
        set_rates(&mut mouse, &[200, 200, 80]);
        send(&mut mouse, &[0xF4]);
        mouse.motion(0, 0, 3, BUTTON_SIDE | BUTTON_EXTRA);
        assert_eq!(drain(&mut mouse), vec![0x08, 0, 0, 0x03 | 0x10 | 0x20]);
        // Big wheel motion is split into -8..=7 steps.
        mouse.motion(0, 0, -20, 0);
        let bytes = drain(&mut mouse);
        let steps: Vec<i32> = bytes
            .chunks(4)
            .map(|p| i32::from(((p[3] << 4) as i8) >> 4))
            .collect();
        assert_eq!(steps, vec![-8, -8, -4]);
    }

    #[test]
    fn large_motion_is_split_and_bounded() {
        let mut mouse = Ps2Mouse::new();
        send(&mut mouse, &[0xF4]);
        mouse.motion(1000, -600, 0, 0);
        let bytes = drain(&mut mouse);
        let (mut x, mut y) = (0i32, 0i32);
        for packet in bytes.chunks(3) {
            assert_eq!(packet[0] & 0xC8, 0x08, "no overflow bits, bit 3 set");
            let sx = if packet[0] & 0x10 != 0 {
                i32::from(packet[1]) - 256
            } else {
                i32::from(packet[1])
            };
            let sy = if packet[0] & 0x20 != 0 {
                i32::from(packet[2]) - 256
            } else {
                i32::from(packet[2])
            };
            x += sx;
            y += sy;
        }
        assert_eq!((x, y), (1000, 600));
        // Hostile magnitudes: bounded output, no overflow.
        mouse.motion(i32::MAX, i32::MIN, i32::MAX, 0xff);
        mouse.motion(i32::MAX, i32::MIN, i32::MIN, 0xff);
        assert!(mouse.pending_len() <= MOUSE_QUEUE_CAPACITY);
        let bytes = drain(&mut mouse);
        assert!(bytes.len() <= 3 * (2 * MAX_PENDING_MOTION as usize / 255 + 4));
    }

    #[test]
    fn remote_mode_and_read_data() {
        let mut mouse = Ps2Mouse::new();
        assert_eq!(send(&mut mouse, &[0xF0]), vec![MOUSE_ACK]);
        mouse.motion(10, 10, 0, BUTTON_RIGHT);
        assert!(!mouse.has_data(), "remote mode does not stream");
        assert_eq!(
            send(&mut mouse, &[0xEB]),
            vec![MOUSE_ACK, 0x08 | 0x20 | 0x02, 10, (-10i8) as u8]
        );
        assert_eq!(
            send(&mut mouse, &[0xEB]),
            vec![MOUSE_ACK, 0x08 | 0x02, 0, 0]
        );
        assert_eq!(send(&mut mouse, &[0xEA, 0xF4]), vec![MOUSE_ACK, MOUSE_ACK]);
        mouse.motion(1, 0, 0, 0);
        assert_eq!(drain(&mut mouse), vec![0x08, 1, 0]);
    }

    #[test]
    fn wrap_mode_echoes_and_unknown_commands_resend() {
        let mut mouse = Ps2Mouse::new();
        assert_eq!(send(&mut mouse, &[0xEE]), vec![MOUSE_ACK]);
        assert_eq!(
            send(&mut mouse, &[0x12, 0xF2, 0xE9]),
            vec![0x12, 0xF2, 0xE9]
        );
        assert_eq!(send(&mut mouse, &[0xEC]), vec![MOUSE_ACK]);
        assert!(!mouse.wrap_mode());
        assert_eq!(send(&mut mouse, &[0xEE]), vec![MOUSE_ACK]);
        assert_eq!(send(&mut mouse, &[0xFF]), vec![MOUSE_ACK, 0xAA, 0x00]);
        assert!(!mouse.wrap_mode(), "reset leaves wrap mode");
        assert_eq!(
            send(&mut mouse, &[0xE1]),
            vec![MOUSE_RESEND],
            "TrackPoint probe is refused"
        );
        assert_eq!(send(&mut mouse, &[0xF2]), vec![MOUSE_ACK, 0x00]);
        assert_eq!(
            send(&mut mouse, &[0xFE]),
            vec![0x00],
            "resend repeats the last byte"
        );
        // 0xFF while a sample rate is expected is a reset, not a rate.
        assert_eq!(send(&mut mouse, &[0xF3]), vec![MOUSE_ACK]);
        assert_eq!(send(&mut mouse, &[0xFF]), vec![MOUSE_ACK, 0xAA, 0x00]);
        assert_eq!(mouse.sample_rate(), 100);
    }

    #[test]
    fn disable_discards_queued_packets() {
        let mut mouse = Ps2Mouse::new();
        send(&mut mouse, &[0xF4]);
        mouse.motion(3, 0, 0, 0);
        mouse.write(0xF5);
        assert_eq!(drain(&mut mouse), vec![MOUSE_ACK]);
        mouse.motion(3, 0, 0, 0);
        assert!(!mouse.has_data());
    }

    #[test]
    fn hostile_sequences_keep_the_mouse_sane() {
        let mut mouse = Ps2Mouse::new();
        let mut seed = 0xdead_beefu32;
        for _ in 0..30_000 {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            match seed % 4 {
                0 | 1 => mouse.write((seed >> 8) as u8),
                2 => mouse.motion(
                    (seed as i32) >> 12,
                    (seed as i32) >> 3,
                    (seed >> 20) as i32 - 2048,
                    (seed >> 24) as u8,
                ),
                _ => {
                    mouse.read_byte();
                }
            }
            assert!(mouse.replies.len() <= MOUSE_REPLY_CAPACITY);
            assert!(mouse.packets.len() <= MOUSE_QUEUE_CAPACITY);
            assert!([ID_STANDARD, ID_INTELLIMOUSE, ID_EXPLORER].contains(&mouse.device_id()));
            assert!(mouse.dx.abs() <= MAX_PENDING_MOTION && mouse.dy.abs() <= MAX_PENDING_MOTION);
        }
        drain(&mut mouse);
        if mouse.wrap_mode() {
            send(&mut mouse, &[0xEC]);
        }
        assert_eq!(send(&mut mouse, &[0xFF]), vec![MOUSE_ACK, 0xAA, 0x00]);
    }
}
