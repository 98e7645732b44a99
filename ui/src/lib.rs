//! GTK widgets for DeskVM that know nothing of KVM: the console view, rolling graphs, and
//! the pure arithmetic behind them (key maps, console geometry, rates).
#![forbid(unsafe_code)]

pub mod console_view;
pub mod geometry;
pub mod graphs;
pub mod keymap;
pub mod keysym;
pub mod rates;

pub use console_view::{ConsoleView, FrameError, PointerMode, ScaleFilter};
pub use geometry::ScaleMode;
pub use graphs::{LineGraph, Sparkline};
