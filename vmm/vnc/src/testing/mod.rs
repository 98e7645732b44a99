//! Test doubles: [`TestSource`], an XRGB8888 framebuffer that tests draw into (with damage and
//! copy tracking that can be switched off to simulate an unknown-damage source), and
//! [`RecordingInput`], an [`InputSink`] that records every event; and [`TestClient`], a
//! scripted RFB client that decodes what the server sends.

mod client;

pub use client::{
    connect_raw, decode_hextile, decode_tight, decode_zrle, ReceivedCursor, ServerInit, TestClient,
    TightInflaters, UpdateRect,
};

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::{CopyRect, Cursor, FrameRef, FrameSource, InputSink, Rect};

/// How many generations of damage [`TestSource`] remembers.
const DAMAGE_HISTORY: usize = 64;

struct Change {
    generation: u64,
    damage: Vec<Rect>,
    copies: Vec<CopyRect>,
}

struct SourceState {
    width: u32,
    height: u32,
    pixels: Vec<u8>,
    generation: u64,
    history: Vec<Change>,
    /// Generations up to this one have no damage information.
    unknown_before: u64,
    track_damage: bool,
    cursor: Option<(u64, Cursor)>,
}

/// A framebuffer for tests.
pub struct TestSource {
    state: Mutex<SourceState>,
    changed: Condvar,
}

impl TestSource {
    /// A black `width` x `height` frame at generation 1.
    pub fn new(width: u32, height: u32) -> TestSource {
        TestSource {
            state: Mutex::new(SourceState {
                width,
                height,
                pixels: vec![0; width as usize * height as usize * 4],
                generation: 1,
                history: Vec::new(),
                unknown_before: 1,
                track_damage: true,
                cursor: None,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SourceState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn commit(&self, state: &mut SourceState, damage: Vec<Rect>, copies: Vec<CopyRect>) {
        state.generation += 1;
        if state.track_damage {
            state.history.push(Change {
                generation: state.generation,
                damage,
                copies,
            });
            if state.history.len() > DAMAGE_HISTORY {
                state.history.remove(0);
            }
        } else {
            state.history.clear();
            state.unknown_before = state.generation;
        }
        self.changed.notify_all();
    }

    /// When false, `with_frame` reports unknown damage (None) from now on.
    pub fn set_damage_tracking(&self, enabled: bool) {
        let mut state = self.lock();
        state.track_damage = enabled;
        if enabled {
            state.unknown_before = state.generation;
        }
    }

    pub fn size(&self) -> (u32, u32) {
        let state = self.lock();
        (state.width, state.height)
    }

    /// The pixel at (x, y) as 0x00RRGGBB.
    pub fn pixel(&self, x: u32, y: u32) -> Option<u32> {
        let state = self.lock();
        FrameRef {
            width: state.width,
            height: state.height,
            stride: state.width as usize * 4,
            pixels: &state.pixels,
        }
        .pixel(x, y)
    }

    /// The whole frame as 0x00RRGGBB pixels.
    pub fn snapshot(&self) -> Vec<u32> {
        let state = self.lock();
        state
            .pixels
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], 0]))
            .collect()
    }

    fn fill_locked(state: &mut SourceState, rect: Rect, rgb: u32) -> Rect {
        let rect = rect.clip(state.width, state.height);
        let bytes = (rgb & 0x00ff_ffff).to_le_bytes();
        for y in rect.y..rect.y + rect.height {
            for x in rect.x..rect.x + rect.width {
                let at = (y as usize * state.width as usize + x as usize) * 4;
                state.pixels[at..at + 4].copy_from_slice(&bytes);
            }
        }
        rect
    }

    /// Fills `rect` (clipped) with 0x00RRGGBB and records it as damage.
    pub fn fill_rect(&self, rect: Rect, rgb: u32) {
        let mut state = self.lock();
        let clipped = Self::fill_locked(&mut state, rect, rgb);
        self.commit(&mut state, vec![clipped], Vec::new());
    }

    /// Sets every pixel from `f(x, y)` (0x00RRGGBB) and damages the whole frame.
    pub fn draw(&self, f: impl Fn(u32, u32) -> u32) {
        let mut state = self.lock();
        let width = state.width;
        for (index, chunk) in state.pixels.chunks_exact_mut(4).enumerate() {
            let x = index as u32 % width.max(1);
            let y = index as u32 / width.max(1);
            chunk.copy_from_slice(&(f(x, y) & 0x00ff_ffff).to_le_bytes());
        }
        let full = Rect::new(0, 0, state.width, state.height);
        self.commit(&mut state, vec![full], Vec::new());
    }

    /// Copies the `dst`-sized area at (src_x, src_y) to `dst` and records a screen copy.
    /// Both areas must lie inside the frame (tests only).
    pub fn copy_rect(&self, src_x: u32, src_y: u32, dst: Rect) {
        let mut state = self.lock();
        let width = state.width as usize;
        let old = state.pixels.clone();
        for row in 0..dst.height as usize {
            let from = ((src_y as usize + row) * width + src_x as usize) * 4;
            let to = ((dst.y as usize + row) * width + dst.x as usize) * 4;
            let length = dst.width as usize * 4;
            state.pixels[to..to + length].copy_from_slice(&old[from..from + length]);
        }
        self.commit(&mut state, Vec::new(), vec![CopyRect { src_x, src_y, dst }]);
    }

    /// Changes the frame size (contents become black); damage becomes unknown.
    pub fn resize(&self, width: u32, height: u32) {
        let mut state = self.lock();
        state.width = width;
        state.height = height;
        state.pixels = vec![0; width as usize * height as usize * 4];
        state.history.clear();
        state.generation += 1;
        state.unknown_before = state.generation;
        self.changed.notify_all();
    }

    pub fn set_cursor(&self, cursor: Option<Cursor>) {
        let mut state = self.lock();
        let next = state
            .cursor
            .as_ref()
            .map_or(1, |(generation, _)| generation + 1);
        state.cursor = cursor.map(|cursor| (next, cursor));
    }
}

impl FrameSource for TestSource {
    fn generation(&self) -> u64 {
        self.lock().generation
    }

    fn wait_for_change(&self, since: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        while state.generation == since {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            state = match self.changed.wait_timeout(state, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        state.generation
    }

    fn with_frame(&self, since: u64, f: &mut dyn FnMut(FrameRef<'_>, crate::Changes<'_>)) -> u64 {
        let state = self.lock();
        let frame = FrameRef {
            width: state.width,
            height: state.height,
            stride: state.width as usize * 4,
            pixels: &state.pixels,
        };
        let known = since >= state.unknown_before
            && since <= state.generation
            && state
                .history
                .first()
                .is_none_or(|first| first.generation <= since + 1);
        if known {
            let mut damage = Vec::new();
            let mut copies = Vec::new();
            for change in state.history.iter().filter(|c| c.generation > since) {
                damage.extend_from_slice(&change.damage);
                copies.extend_from_slice(&change.copies);
            }
            f(frame, Some((&damage, &copies)));
        } else {
            f(frame, None);
        }
        state.generation
    }

    fn cursor(&self) -> Option<(u64, Cursor)> {
        self.lock().cursor.clone()
    }
}

/// One recorded input event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputEvent {
    Key {
        code: u16,
        down: bool,
    },
    Pointer {
        x: u16,
        y: u16,
        buttons: u8,
        wheel: i8,
    },
}

/// An [`InputSink`] that records events.
#[derive(Default)]
pub struct RecordingInput {
    events: Mutex<Vec<InputEvent>>,
    arrived: Condvar,
}

impl RecordingInput {
    pub fn new() -> RecordingInput {
        RecordingInput::default()
    }

    pub fn events(&self) -> Vec<InputEvent> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits (up to `timeout`) until at least `count` events arrived; returns them all.
    pub fn wait_for(&self, count: usize, timeout: Duration) -> Vec<InputEvent> {
        let deadline = Instant::now() + timeout;
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        while events.len() < count {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            events = match self.arrived.wait_timeout(events, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        events.clone()
    }

    fn push(&self, event: InputEvent) {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event);
        self.arrived.notify_all();
    }
}

impl InputSink for RecordingInput {
    fn key(&self, evdev_code: u16, down: bool) {
        self.push(InputEvent::Key {
            code: evdev_code,
            down,
        });
    }

    fn pointer(&self, x: u16, y: u16, buttons: u8, wheel: i8) {
        self.push(InputEvent::Pointer {
            x,
            y,
            buttons,
            wheel,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn damage_is_reported_since_a_generation() {
        let source = TestSource::new(8, 8);
        let start = source.generation();
        source.fill_rect(Rect::new(0, 0, 2, 2), 0xff0000);
        source.fill_rect(Rect::new(4, 4, 9, 9), 0x00ff00);
        let mut seen = Vec::new();
        let generation = source.with_frame(start, &mut |frame, damage| {
            assert_eq!(frame.pixel(5, 5), Some(0x00ff00));
            seen = damage.unwrap().0.to_vec();
        });
        assert_eq!(generation, start + 2);
        assert_eq!(seen, vec![Rect::new(0, 0, 2, 2), Rect::new(4, 4, 4, 4)]);
        let mut unknown = false;
        source.set_damage_tracking(false);
        source.fill_rect(Rect::new(0, 0, 1, 1), 1);
        source.with_frame(start, &mut |_, damage| unknown = damage.is_none());
        assert!(unknown);
    }

    #[test]
    fn wait_for_change_returns_on_timeout() {
        let source = TestSource::new(1, 1);
        let generation = source.generation();
        assert_eq!(
            source.wait_for_change(generation, Duration::from_millis(1)),
            generation
        );
        assert_eq!(
            source.wait_for_change(0, Duration::from_secs(5)),
            generation
        );
    }
}
