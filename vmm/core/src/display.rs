//! The frame pipeline: the display card's composed screen, published to any number of
//! consumers (the app's console, the VNC server, screenshots, thumbnails).
//!
//! The engine thread refreshes the card on a fixed tick while the VM runs. The card
//! recomposes only what the guest changed (KVM's dirty log of the linear framebuffer plus
//! its own writes) into one shared surface under a read-write lock, and the pipeline bumps a
//! generation counter and records the damage. Consumers are pulled, never pushed: they
//! compare generations and read the frame and the damage since the generation they last
//! saw. Nothing is copied unless a consumer copies it.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use vmm_devices::display::{DisplayDevice, Surface};
use vmm_devices::vram::DirtyPages;

pub use vmm_devices::display::{CopyRect, CursorImage, CursorState, Rect};

use crate::error::{Result, VmmError};
use crate::machine::lock;

/// How often a running VM's screen is refreshed (QEMU's GUI refresh is 30 ms too).
pub const REFRESH_INTERVAL: Duration = Duration::from_millis(30);
/// How many changes are remembered for consumers that fall behind.
const HISTORY: usize = 64;

/// The latest frame: XRGB8888, bytes B, G, R, X per pixel.
#[derive(Clone, Copy, Debug)]
pub struct Frame<'a> {
    pub width: u32,
    pub height: u32,
    /// Bytes per row.
    pub stride: usize,
    pub pixels: &'a [u8],
}

struct Change {
    generation: u64,
    resized: bool,
    damage: Vec<Rect>,
    copies: Vec<CopyRect>,
}

struct Published {
    surface: Surface,
    generation: u64,
    history: VecDeque<Change>,
}

pub(crate) struct DisplayShared {
    published: RwLock<Published>,
    generation: AtomicU64,
    wake: (Mutex<()>, Condvar),
    cursor: Mutex<(u64, Option<CursorState>)>,
    text: Mutex<Option<String>>,
    frames: AtomicU64,
}

impl DisplayShared {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            published: RwLock::new(Published {
                surface: Surface::new(640, 480),
                generation: 0,
                history: VecDeque::new(),
            }),
            generation: AtomicU64::new(0),
            wake: (Mutex::new(()), Condvar::new()),
            cursor: Mutex::new((0, None)),
            text: Mutex::new(None),
            frames: AtomicU64::new(0),
        })
    }

    /// Refreshes `device` into the published surface; returns whether anything changed.
    pub(crate) fn refresh(
        &self,
        device: &Mutex<dyn DisplayDevice>,
        guest_dirty: Option<&DirtyPages>,
    ) -> bool {
        let mut device = lock(device);
        let changed = {
            let mut published = self.published.write().unwrap_or_else(|e| e.into_inner());
            let outcome = device.refresh(guest_dirty, &mut published.surface);
            if outcome.is_empty() {
                false
            } else {
                let generation = published.generation + 1;
                published.generation = generation;
                let (width, height) = (published.surface.width, published.surface.height);
                let damage = outcome
                    .damage
                    .iter()
                    .map(|r| r.clip(width, height))
                    .filter(|r| !r.is_empty())
                    .collect();
                published.history.push_back(Change {
                    generation,
                    resized: outcome.resized,
                    damage,
                    copies: outcome.copies,
                });
                while published.history.len() > HISTORY {
                    published.history.pop_front();
                }
                self.generation.store(generation, Ordering::Release);
                true
            }
        };
        let cursor = device.cursor();
        let text = device.text_screen();
        drop(device);
        {
            let mut c = lock(&self.cursor);
            if c.1 != cursor {
                c.0 += 1;
                c.1 = cursor;
            }
        }
        *lock(&self.text) = text;
        if changed {
            self.frames.fetch_add(1, Ordering::Relaxed);
            let _guard = lock(&self.wake.0);
            self.wake.1.notify_all();
        }
        changed
    }
}

/// A consumer's view of a VM's screen. Cheap to clone; usable from any thread.
#[derive(Clone)]
pub struct DisplayHandle {
    pub(crate) shared: Arc<DisplayShared>,
}

impl DisplayHandle {
    /// Changes whenever the frame changes.
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Acquire)
    }

    /// Width and height of the current frame.
    pub fn size(&self) -> (u32, u32) {
        let p = self.read();
        (p.surface.width, p.surface.height)
    }

    /// Frames composed since the VM was created (a frame = a refresh that changed pixels).
    pub fn frames(&self) -> u64 {
        self.shared.frames.load(Ordering::Relaxed)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Published> {
        self.shared
            .published
            .read()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Calls `f` with the latest frame and what changed since generation `since` (damage
    /// rectangles and screen-to-screen copies; None when unknown, after a resize or for a
    /// consumer too far behind: take the whole frame). Returns the frame's generation.
    pub fn with_frame<R>(
        &self,
        since: u64,
        f: impl FnOnce(Frame<'_>, Option<(&[Rect], &[CopyRect])>) -> R,
    ) -> (u64, R) {
        let p = self.read();
        let frame = Frame {
            width: p.surface.width,
            height: p.surface.height,
            stride: p.surface.stride,
            pixels: &p.surface.pixels,
        };
        let known = since > 0
            && since <= p.generation
            && p.history.front().is_some_and(|c| c.generation <= since + 1)
            && !p.history.iter().any(|c| c.generation > since && c.resized);
        if !known {
            return (p.generation, f(frame, None));
        }
        let mut damage = Vec::new();
        let mut copies = Vec::new();
        for c in p.history.iter().filter(|c| c.generation > since) {
            damage.extend_from_slice(&c.damage);
            copies.extend_from_slice(&c.copies);
        }
        (p.generation, f(frame, Some((&damage, &copies))))
    }

    /// Calls `f` only when the frame changed since `since`, with the damage (None = all).
    /// Returns the new generation, or None when nothing changed.
    pub fn frame_since(
        &self,
        since: u64,
        f: impl FnOnce(Frame<'_>, Option<&[Rect]>),
    ) -> Option<u64> {
        if self.generation() == since {
            return None;
        }
        Some(
            self.with_frame(since, |frame, change| f(frame, change.map(|(d, _)| d)))
                .0,
        )
    }

    /// Blocks until the generation differs from `since` or `timeout` passes.
    pub fn wait_for_change(&self, since: u64, timeout: Duration) -> u64 {
        let guard = lock(&self.shared.wake.0);
        if self.generation() != since {
            return self.generation();
        }
        let _ = self
            .shared
            .wake
            .1
            .wait_timeout_while(guard, timeout, |_| self.generation() == since);
        self.generation()
    }

    /// The hardware cursor and a counter that changes when it does.
    pub fn cursor(&self) -> (u64, Option<CursorState>) {
        lock(&self.shared.cursor).clone()
    }

    /// The characters on screen while the card is in a text mode.
    pub fn text_screen(&self) -> Option<String> {
        lock(&self.shared.text).clone()
    }

    /// A copy of the frame as packed 0x00RRGGBB pixels (for tests and thumbnails).
    pub fn snapshot_rgb(&self) -> (u32, u32, Vec<u32>) {
        self.with_frame(0, |frame, _| {
            let mut out = Vec::with_capacity(frame.width as usize * frame.height as usize);
            for y in 0..frame.height as usize {
                let row = &frame.pixels[y * frame.stride..];
                for x in 0..frame.width as usize {
                    let p = &row[x * 4..x * 4 + 4];
                    out.push(u32::from_le_bytes([p[0], p[1], p[2], 0]));
                }
            }
            (frame.width, frame.height, out)
        })
        .1
    }

    /// Writes the current frame as a PNG file (RGB, 8 bits per channel).
    pub fn screenshot_png(&self, path: &Path) -> Result<()> {
        let err = |e: std::io::Error| VmmError::Screenshot {
            path: path.to_path_buf(),
            source: e,
        };
        let (width, height, pixels) = self.snapshot_rgb();
        let rgb: Vec<u8> = pixels
            .iter()
            .flat_map(|p| [(p >> 16) as u8, (p >> 8) as u8, *p as u8])
            .collect();
        let file = std::fs::File::create(path).map_err(err)?;
        let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder
            .write_header()
            .map_err(|e| err(std::io::Error::other(e)))?;
        writer
            .write_image_data(&rgb)
            .map_err(|e| err(std::io::Error::other(e)))?;
        writer.finish().map_err(|e| err(std::io::Error::other(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_devices::display::RefreshOutcome;

    /// A card whose screen the test sets directly.
    struct FakeCard {
        width: u32,
        height: u32,
        pending: Vec<(Rect, u32)>,
    }

    impl DisplayDevice for FakeCard {
        fn refresh(
            &mut self,
            _guest_dirty: Option<&DirtyPages>,
            surface: &mut Surface,
        ) -> RefreshOutcome {
            let resized = surface.resize(self.width, self.height);
            let mut damage = Vec::new();
            for (r, colour) in self.pending.drain(..) {
                for y in r.y..r.y + r.height {
                    let row = surface.row_mut(y);
                    for x in r.x..r.x + r.width {
                        row[x as usize * 4..x as usize * 4 + 4]
                            .copy_from_slice(&colour.to_le_bytes());
                    }
                }
                damage.push(r);
            }
            RefreshOutcome {
                resized,
                damage,
                copies: vec![],
            }
        }
        fn text_screen(&self) -> Option<String> {
            Some("HELLO".into())
        }
    }

    #[test]
    fn generations_damage_and_history() {
        let shared = DisplayShared::new();
        let handle = DisplayHandle {
            shared: shared.clone(),
        };
        let card: Arc<Mutex<FakeCard>> = Arc::new(Mutex::new(FakeCard {
            width: 64,
            height: 32,
            pending: vec![],
        }));
        let dyn_card: Arc<Mutex<dyn DisplayDevice>> = card.clone();
        assert!(shared.refresh(&dyn_card, None), "resize is a change");
        let g1 = handle.generation();
        assert_eq!(handle.size(), (64, 32));
        assert!(!shared.refresh(&dyn_card, None), "nothing changed");
        assert_eq!(handle.generation(), g1);
        assert!(handle.frame_since(g1, |_, _| panic!("unchanged")).is_none());

        lock(&card)
            .pending
            .push((Rect::new(1, 2, 3, 4), 0x00ff_0000));
        assert!(shared.refresh(&dyn_card, None));
        lock(&card)
            .pending
            .push((Rect::new(10, 10, 2, 2), 0x0000_ff00));
        assert!(shared.refresh(&dyn_card, None));
        let mut seen = None;
        let g3 = handle
            .frame_since(g1, |frame, damage| {
                seen = damage.map(|d| d.to_vec());
                assert_eq!(frame.width, 64);
            })
            .unwrap();
        assert_eq!(g3, g1 + 2);
        assert_eq!(
            seen,
            Some(vec![Rect::new(1, 2, 3, 4), Rect::new(10, 10, 2, 2)])
        );
        // A consumer that never saw a frame gets everything.
        handle.with_frame(0, |_, change| assert!(change.is_none()));
        let (_, _, rgb) = handle.snapshot_rgb();
        assert_eq!(rgb[2 * 64 + 1], 0xff0000);
        assert_eq!(rgb[10 * 64 + 11], 0x00ff00);
        assert_eq!(handle.text_screen().as_deref(), Some("HELLO"));
        assert_eq!(handle.frames(), 3);

        // Falling out of the history means a full update.
        for _ in 0..HISTORY + 2 {
            lock(&card).pending.push((Rect::new(0, 0, 1, 1), 1));
            shared.refresh(&dyn_card, None);
        }
        handle.with_frame(g3, |_, change| assert!(change.is_none()));
        // A resize is a full update for everyone.
        let g = handle.generation();
        lock(&card).width = 80;
        shared.refresh(&dyn_card, None);
        handle.with_frame(g, |f, change| {
            assert!(change.is_none());
            assert_eq!(f.width, 80);
        });
    }

    #[test]
    fn wait_for_change_wakes_and_times_out() {
        let shared = DisplayShared::new();
        let handle = DisplayHandle {
            shared: shared.clone(),
        };
        assert_eq!(handle.wait_for_change(0, Duration::from_millis(10)), 0);
        let card: Arc<Mutex<dyn DisplayDevice>> = Arc::new(Mutex::new(FakeCard {
            width: 8,
            height: 8,
            pending: vec![],
        }));
        let waiter = {
            let h = handle.clone();
            std::thread::spawn(move || h.wait_for_change(0, Duration::from_secs(10)))
        };
        std::thread::sleep(Duration::from_millis(20));
        shared.refresh(&card, None);
        assert_eq!(waiter.join().unwrap(), 1);
    }

    #[test]
    fn screenshot_is_a_png_and_unwritable_path_is_an_error() {
        let shared = DisplayShared::new();
        let handle = DisplayHandle {
            shared: shared.clone(),
        };
        let card: Arc<Mutex<dyn DisplayDevice>> = Arc::new(Mutex::new(FakeCard {
            width: 16,
            height: 8,
            pending: vec![(Rect::new(0, 0, 1, 1), 0x00123456)],
        }));
        shared.refresh(&card, None);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shot.png");
        handle.screenshot_png(&path).unwrap();
        let decoder =
            png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (16, 8));
        assert_eq!(&buf[..3], &[0x12, 0x34, 0x56]);
        let e = handle
            .screenshot_png(&dir.path().join("no/such/dir.png"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("screenshot") && e.contains("dir.png"), "{e}");
    }
}
