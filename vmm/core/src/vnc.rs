//! The VNC server of a VM: the frame pipeline and the input handle adapted to `vmm-vnc`.
//!
//! Pointer events from VNC are absolute. With a USB tablet they go to it unchanged; without
//! one they are turned into relative PS/2 motion from the last position (the pointer then
//! drifts as with any relative mouse, which is why new VMs get a tablet).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::VncConfig;
use crate::display::DisplayHandle;
use crate::error::{Result, VmmError};
use crate::machine::lock;
use crate::vm::InputHandle;

pub use vmm_vnc::VncServer;

struct DisplaySource(DisplayHandle);

fn to_vnc_rect(r: &crate::display::Rect) -> vmm_vnc::Rect {
    vmm_vnc::Rect {
        x: r.x,
        y: r.y,
        width: r.width,
        height: r.height,
    }
}

impl vmm_vnc::FrameSource for DisplaySource {
    fn generation(&self) -> u64 {
        self.0.generation()
    }

    fn wait_for_change(&self, since: u64, timeout: Duration) -> u64 {
        self.0.wait_for_change(since, timeout)
    }

    fn with_frame(
        &self,
        since: u64,
        f: &mut dyn FnMut(vmm_vnc::FrameRef<'_>, vmm_vnc::Changes<'_>),
    ) -> u64 {
        self.0
            .with_frame(since, |frame, change| {
                let frame = vmm_vnc::FrameRef {
                    width: frame.width,
                    height: frame.height,
                    stride: frame.stride,
                    pixels: frame.pixels,
                };
                match change {
                    None => f(frame, None),
                    Some((damage, copies)) => {
                        let damage: Vec<_> = damage.iter().map(to_vnc_rect).collect();
                        let copies: Vec<_> = copies
                            .iter()
                            .map(|c| vmm_vnc::CopyRect {
                                src_x: c.src_x,
                                src_y: c.src_y,
                                dst: to_vnc_rect(&c.dst),
                            })
                            .collect();
                        f(frame, Some((&damage, &copies)))
                    }
                }
            })
            .0
    }

    fn cursor(&self) -> Option<(u64, vmm_vnc::Cursor)> {
        let (generation, state) = self.0.cursor();
        let state = state.filter(|s| s.visible)?;
        let image = state.image?;
        Some((
            generation,
            vmm_vnc::Cursor {
                width: image.width,
                height: image.height,
                hot_x: image.hot_x,
                hot_y: image.hot_y,
                argb: image.pixels,
            },
        ))
    }
}

struct InputSink {
    input: InputHandle,
    display: DisplayHandle,
    /// Last absolute position, for PS/2 relative motion.
    last: Mutex<Option<(i32, i32)>>,
}

impl vmm_vnc::InputSink for InputSink {
    fn key(&self, evdev_code: u16, down: bool) {
        self.input.key(evdev_code, down);
    }

    fn pointer(&self, x: u16, y: u16, buttons: u8, wheel: i8) {
        // VNC: bit 0 left, 1 middle, 2 right; the engine: bit 0 left, 1 right, 2 middle.
        let buttons = (buttons & 1) | ((buttons & 2) << 1) | ((buttons & 4) >> 1);
        if self.input.has_absolute_pointer() {
            self.input.pointer_absolute_wheel(x, y, buttons, wheel);
            return;
        }
        let (width, height) = self.display.size();
        let px = (u32::from(x) * width.max(1) / 0x8000) as i32;
        let py = (u32::from(y) * height.max(1) / 0x8000) as i32;
        let mut last = lock(&self.last);
        let (dx, dy) = last.map(|(lx, ly)| (px - lx, py - ly)).unwrap_or((0, 0));
        *last = Some((px, py));
        self.input
            .pointer_relative(dx, dy, i32::from(-wheel), buttons);
    }
}

/// Starts the VNC server for a VM's display and input.
pub fn start(config: &VncConfig, display: DisplayHandle, input: InputHandle) -> Result<VncServer> {
    let ip: std::net::IpAddr = config
        .address
        .parse()
        .map_err(|_| VmmError::Vnc(format!("\"{}\" is not an IP address", config.address)))?;
    let listen = SocketAddr::new(ip, config.port());
    let source = Arc::new(DisplaySource(display.clone()));
    let sink = Arc::new(InputSink {
        input,
        display,
        last: Mutex::new(None),
    });
    VncServer::start(listen, config.password.clone(), source, sink).map_err(|e| {
        VmmError::Vnc(format!(
            "{e} (VNC display {} is port {}; choose another display number)",
            config.display,
            config.port()
        ))
    })
}
