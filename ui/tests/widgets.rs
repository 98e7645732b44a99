//! The widgets on a real display (run under `xvfb-run -a`): frames in and out of the
//! console view, input callbacks, grab state, graphs' series and axes. Without a display
//! the test prints "SKIPPED: no display" and passes, unless DESKVM_REQUIRE_DISPLAY=1 or
//! CI=true (CI must not skip).
//! GTK must be used from one thread, so everything runs in one test.

use std::cell::RefCell;
use std::rc::Rc;

use deskvm_ui::geometry::xrgb_to_opaque;
use deskvm_ui::keymap::{combo_events, evdev};
use deskvm_ui::{ConsoleView, FrameError, LineGraph, ScaleMode, Sparkline};
use gtk::glib;
use gtk::prelude::*;

fn display_available() -> bool {
    let has_display =
        std::env::var_os("DISPLAY").is_some() || std::env::var_os("WAYLAND_DISPLAY").is_some();
    has_display && gtk::init().is_ok()
}

#[test]
fn widgets_on_a_display() {
    if !display_available() {
        if std::env::var("DESKVM_REQUIRE_DISPLAY").as_deref() == Ok("1")
            || std::env::var("CI").as_deref() == Ok("true")
        {
            panic!("no display: run under xvfb-run -a");
        }
        println!("SKIPPED: no display (run under xvfb-run -a)");
        return;
    }
    console_view_frames();
    console_view_input();
    graphs();
}

fn console_view_frames() {
    let view = ConsoleView::new();
    assert_eq!(view.frame_size(), None);
    assert!(view.texture().is_none());
    // A 4x2 guest frame with 8 bytes of padding per row.
    let guest = vec![0x40u8; 24 * 2];
    let pixels = xrgb_to_opaque(4, 2, 24, &guest).unwrap();
    view.set_frame(4, 2, 16, glib::Bytes::from_owned(pixels))
        .unwrap();
    assert_eq!(view.frame_size(), Some((4, 2)));
    let texture = view.texture().unwrap();
    assert_eq!((texture.width(), texture.height()), (4, 2));
    // Too few bytes for the sizes: refused, the old frame stays.
    let e = view
        .set_frame(4, 2, 16, glib::Bytes::from_owned(vec![0u8; 20]))
        .unwrap_err();
    assert!(matches!(e, FrameError::TooSmall { len: 20, .. }), "{e}");
    assert!(view
        .set_frame(0, 0, 0, glib::Bytes::from_owned(Vec::new()))
        .is_err());
    let huge = view.set_frame(
        u32::MAX,
        1,
        usize::MAX,
        glib::Bytes::from_owned(vec![0u8; 8]),
    );
    assert!(huge.is_err());
    assert_eq!(view.frame_size(), Some((4, 2)));
    view.set_scale_mode(ScaleMode::OneToOne);
    assert_eq!(view.scale_mode(), ScaleMode::OneToOne);
    view.clear_frame();
    assert_eq!(view.frame_size(), None);
}

fn console_view_input() {
    let view = ConsoleView::new();
    let keys = Rc::new(RefCell::new(Vec::new()));
    let k = keys.clone();
    view.connect_key(move |code, down| k.borrow_mut().push((code, down)));
    let grabs = Rc::new(RefCell::new(Vec::new()));
    let g = grabs.clone();
    view.connect_grab_changed(move |on| g.borrow_mut().push(on));

    let ctrl_alt_del = combo_events(&[evdev::KEY_LEFTCTRL, evdev::KEY_LEFTALT, evdev::KEY_DELETE]);
    view.send_keys(&ctrl_alt_del);
    assert_eq!(*keys.borrow(), ctrl_alt_del);

    // Keys still held when focus goes are released.
    keys.borrow_mut().clear();
    view.send_keys(&[(evdev::KEY_A, true), (evdev::KEY_LEFTSHIFT, true)]);
    view.release_all_keys();
    let released: Vec<_> = keys.borrow().iter().filter(|e| !e.1).copied().collect();
    assert_eq!(released.len(), 2);
    view.release_all_keys();
    assert_eq!(keys.borrow().len(), 4, "nothing left to release");

    // A grab without a window still reports its state.
    view.set_grabbed(true);
    assert!(view.is_grabbed());
    view.set_grabbed(true);
    view.set_grabbed(false);
    assert_eq!(*grabs.borrow(), vec![true, false]);
}

fn graphs() {
    let g = LineGraph::new("CPU", 3, 100.0);
    assert_eq!(g.series_count(), 0);
    let total = g.add_series("Total");
    g.ensure_series(3, |i| format!("vCPU {i}"));
    assert_eq!(g.series_count(), 3);
    g.push(total, 50.0);
    g.push(7, 1e9); // No such series: ignored.
    assert_eq!(g.axis_max(), 100.0);
    g.push(total, 150.0);
    assert_eq!(g.axis_max(), 200.0);
    // The legend is readable as text (tooltip, exposed to screen readers).
    let summary = g.accessible_summary();
    assert!(
        summary.starts_with("CPU: Total ") && summary.contains("vCPU 2"),
        "{summary}"
    );
    assert_eq!(
        g.widget().tooltip_text().map(|t| t.to_string()),
        Some(summary)
    );
    g.set_fixed_max(Some(100.0));
    assert_eq!(g.axis_max(), 100.0);
    g.set_fixed_max(None);
    g.clear();
    assert_eq!(g.axis_max(), 100.0);

    let s = Sparkline::new(2, 100.0);
    assert_eq!(s.latest(), None);
    s.push(10.0);
    s.push(20.0);
    s.push(30.0);
    assert_eq!(s.latest(), Some(30.0));
    s.clear();
    assert_eq!(s.latest(), None);

    // They draw without panicking in a window.
    let window = gtk::Window::new();
    let column = gtk::Box::new(gtk::Orientation::Vertical, 0);
    column.append(g.widget());
    column.append(s.widget());
    let view = ConsoleView::new();
    view.set_size_request(64, 32);
    let pixels = xrgb_to_opaque(2, 2, 8, &[0x80u8; 16]).unwrap();
    view.set_frame(2, 2, 8, glib::Bytes::from_owned(pixels))
        .unwrap();
    view.set_scale_filter(deskvm_ui::ScaleFilter::Sharp);
    column.append(&view);
    window.set_child(Some(&column));
    window.present();
    let context = glib::MainContext::default();
    for _ in 0..50 {
        context.iteration(false);
    }
    window.destroy();
}
