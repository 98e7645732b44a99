//! `Sparkline` and `LineGraph`: Cairo-drawn rolling graphs on a `gtk::DrawingArea`.
//!
//! A sparkline is one small series without axes (the library's CPU column). A line graph
//! has several coloured series, a legend with each series' latest value, grid lines and a
//! "nice" axis maximum that grows with the data (at least a floor, e.g. 100 for percent).
//! Not done: hover tooltips, logarithmic axes.

use std::cell::RefCell;
use std::rc::Rc;

use gtk::prelude::*;
use gtk::{cairo, gdk};

use crate::rates::{nice_axis_max, History};

/// Formats axis and legend values ("42 %", "1.5 KiB/s").
pub type ValueFormatter = Rc<dyn Fn(f64) -> String>;

struct Series {
    label: String,
    color: gdk::RGBA,
    history: History,
}

struct GraphState {
    series: Vec<Series>,
    capacity: usize,
    axis_floor: f64,
    fixed_max: Option<f64>,
    format: ValueFormatter,
    title: String,
}

impl GraphState {
    fn axis_max(&self) -> f64 {
        if let Some(m) = self.fixed_max {
            return m;
        }
        let data_max = self
            .series
            .iter()
            .map(|s| s.history.max())
            .fold(0.0, f64::max);
        nice_axis_max(data_max, self.axis_floor)
    }
}

/// Colours for series, readable on light and dark backgrounds.
pub const PALETTE: [(f32, f32, f32); 6] = [
    (0.21, 0.52, 0.89),
    (0.90, 0.38, 0.00),
    (0.18, 0.76, 0.49),
    (0.57, 0.25, 0.67),
    (0.88, 0.11, 0.14),
    (0.60, 0.52, 0.00),
];

/// The palette colour for series `i`.
pub fn palette_color(i: usize) -> gdk::RGBA {
    let (r, g, b) = PALETTE[i % PALETTE.len()];
    gdk::RGBA::new(r, g, b, 1.0)
}

fn foreground(area: &gtk::DrawingArea) -> gdk::RGBA {
    #[allow(deprecated)]
    area.style_context().color()
}

fn trace(cr: &cairo::Context, history: &History, capacity: usize, w: f64, h: f64, max: f64) {
    let n = history.len();
    if n == 0 || max <= 0.0 {
        return;
    }
    let step = if capacity > 1 {
        w / (capacity - 1) as f64
    } else {
        w
    };
    let x0 = w - step * (n.saturating_sub(1)) as f64;
    for (i, v) in history.samples().enumerate() {
        let x = x0 + step * i as f64;
        let y = h - (v / max).clamp(0.0, 1.0) * h;
        if i == 0 {
            cr.move_to(x, y);
        } else {
            cr.line_to(x, y);
        }
    }
}

/// A small one-series graph with no axes.
#[derive(Clone)]
pub struct Sparkline {
    area: gtk::DrawingArea,
    state: Rc<RefCell<GraphState>>,
}

impl Sparkline {
    /// A sparkline of the last `capacity` samples, scaled to at least `axis_floor`.
    pub fn new(capacity: usize, axis_floor: f64) -> Self {
        let state = Rc::new(RefCell::new(GraphState {
            series: vec![Series {
                label: String::new(),
                color: palette_color(0),
                history: History::new(capacity),
            }],
            capacity: capacity.max(1),
            axis_floor,
            fixed_max: None,
            format: Rc::new(|v| format!("{v:.0}")),
            title: String::new(),
        }));
        let area = gtk::DrawingArea::new();
        area.set_content_width(80);
        area.set_content_height(24);
        area.add_css_class("sparkline");
        let s = state.clone();
        area.set_draw_func(move |_, cr, w, h| {
            let st = s.borrow();
            let (w, h) = (f64::from(w), f64::from(h));
            let max = st.axis_max();
            let Some(series) = st.series.first() else {
                return;
            };
            let c = series.color;
            trace(cr, &series.history, st.capacity, w, h - 1.0, max);
            let _ = cr.save();
            cr.line_to(w, h);
            cr.line_to(
                w - (w / (st.capacity.max(2) - 1) as f64)
                    * (series.history.len().saturating_sub(1)) as f64,
                h,
            );
            cr.close_path();
            cr.set_source_rgba(c.red().into(), c.green().into(), c.blue().into(), 0.25);
            let _ = cr.fill();
            let _ = cr.restore();
            trace(cr, &series.history, st.capacity, w, h - 1.0, max);
            cr.set_source_rgba(c.red().into(), c.green().into(), c.blue().into(), 1.0);
            cr.set_line_width(1.5);
            let _ = cr.stroke();
        });
        Self { area, state }
    }

    pub fn widget(&self) -> &gtk::DrawingArea {
        &self.area
    }

    pub fn push(&self, value: f64) {
        if let Some(s) = self.state.borrow_mut().series.first_mut() {
            s.history.push(value);
        }
        self.area.queue_draw();
    }

    pub fn clear(&self) {
        if let Some(s) = self.state.borrow_mut().series.first_mut() {
            s.history.clear();
        }
        self.area.queue_draw();
    }

    pub fn latest(&self) -> Option<f64> {
        self.state
            .borrow()
            .series
            .first()
            .and_then(|s| s.history.latest())
    }
}

/// A graph of several series with legend, grid and axis maximum.
#[derive(Clone)]
pub struct LineGraph {
    area: gtk::DrawingArea,
    state: Rc<RefCell<GraphState>>,
}

impl LineGraph {
    /// A graph titled `title` keeping `capacity` samples per series.
    pub fn new(title: &str, capacity: usize, axis_floor: f64) -> Self {
        let state = Rc::new(RefCell::new(GraphState {
            series: Vec::new(),
            capacity: capacity.max(1),
            axis_floor,
            fixed_max: None,
            format: Rc::new(|v| format!("{v:.0}")),
            title: title.to_string(),
        }));
        let area = gtk::DrawingArea::new();
        area.set_content_height(140);
        area.set_hexpand(true);
        area.add_css_class("line-graph");
        let s = state.clone();
        area.set_draw_func(move |area, cr, w, h| {
            draw_line_graph(area, cr, &s.borrow(), f64::from(w), f64::from(h));
        });
        Self { area, state }
    }

    pub fn widget(&self) -> &gtk::DrawingArea {
        &self.area
    }

    /// Adds a series; returns its index.
    pub fn add_series(&self, label: &str) -> usize {
        let mut st = self.state.borrow_mut();
        let i = st.series.len();
        let capacity = st.capacity;
        st.series.push(Series {
            label: label.to_string(),
            color: palette_color(i),
            history: History::new(capacity),
        });
        i
    }

    /// Makes sure there are `n` series, naming new ones with `label(i)`.
    pub fn ensure_series(&self, n: usize, label: impl Fn(usize) -> String) {
        while self.series_count() < n {
            let i = self.series_count();
            self.add_series(&label(i));
        }
    }

    pub fn series_count(&self) -> usize {
        self.state.borrow().series.len()
    }

    /// Appends a sample to series `index` (ignored when there is no such series).
    pub fn push(&self, index: usize, value: f64) {
        if let Some(s) = self.state.borrow_mut().series.get_mut(index) {
            s.history.push(value);
        }
        // Screen readers (and window tests) get the legend as text through the tooltip (the
        // GTK 4.8 bindings have no accessible-label API): the drawing itself has none.
        let label = self.accessible_summary();
        self.area.set_tooltip_text(Some(&label));
        self.area.queue_draw();
    }

    /// "Title: series value, series value", as the legend shows it.
    pub fn accessible_summary(&self) -> String {
        let st = self.state.borrow();
        let values: Vec<String> = st
            .series
            .iter()
            .map(|s| {
                format!(
                    "{} {}",
                    s.label,
                    (st.format)(s.history.latest().unwrap_or(0.0))
                )
            })
            .collect();
        format!("{}: {}", st.title, values.join(", "))
    }

    pub fn set_formatter(&self, format: ValueFormatter) {
        self.state.borrow_mut().format = format;
        self.area.queue_draw();
    }

    /// A fixed axis maximum (e.g. 100 for a percentage), or `None` to follow the data.
    pub fn set_fixed_max(&self, max: Option<f64>) {
        self.state.borrow_mut().fixed_max = max;
        self.area.queue_draw();
    }

    /// Changes how many samples each series keeps.
    pub fn set_capacity(&self, capacity: usize) {
        let mut st = self.state.borrow_mut();
        st.capacity = capacity.max(1);
        for s in &mut st.series {
            s.history.set_capacity(capacity);
        }
    }

    pub fn clear(&self) {
        for s in &mut self.state.borrow_mut().series {
            s.history.clear();
        }
        self.area.queue_draw();
    }

    pub fn axis_max(&self) -> f64 {
        self.state.borrow().axis_max()
    }
}

fn draw_line_graph(area: &gtk::DrawingArea, cr: &cairo::Context, st: &GraphState, w: f64, h: f64) {
    let fg = foreground(area);
    let (fr, fgc, fb) = (
        f64::from(fg.red()),
        f64::from(fg.green()),
        f64::from(fg.blue()),
    );
    let max = st.axis_max();
    let top = 34.0;
    let left = 4.0;
    cr.set_font_size(11.0);
    let label_width = [0.0, 0.5, 1.0]
        .iter()
        .map(|f| {
            cr.text_extents(&(st.format)(max * f))
                .map(|e| e.x_advance())
                .unwrap_or(50.0)
        })
        .fold(40.0, f64::max);
    let right_pad = label_width + 10.0;
    let plot_w = (w - left - right_pad).max(1.0);
    let plot_h = (h - top - 6.0).max(1.0);

    cr.select_font_face("Sans", cairo::FontSlant::Normal, cairo::FontWeight::Bold);
    cr.set_font_size(12.0);
    cr.set_source_rgba(fr, fgc, fb, 0.9);
    cr.move_to(left, 13.0);
    let _ = cr.show_text(&st.title);

    // Legend: coloured square, label and latest value.
    cr.select_font_face("Sans", cairo::FontSlant::Normal, cairo::FontWeight::Normal);
    cr.set_font_size(11.0);
    let mut x = left;
    for s in &st.series {
        let text = format!(
            "{} {}",
            s.label,
            (st.format)(s.history.latest().unwrap_or(0.0))
        );
        let extent = cr
            .text_extents(&text)
            .map(|e| e.x_advance())
            .unwrap_or(60.0);
        if x + extent + 16.0 > w {
            break;
        }
        let c = s.color;
        cr.set_source_rgba(c.red().into(), c.green().into(), c.blue().into(), 1.0);
        cr.rectangle(x, 19.0, 9.0, 9.0);
        let _ = cr.fill();
        cr.set_source_rgba(fr, fgc, fb, 0.8);
        cr.move_to(x + 12.0, 28.0);
        let _ = cr.show_text(&text);
        x += extent + 24.0;
    }

    // Grid at 0, 1/2 and max, with axis labels on the right.
    cr.set_line_width(1.0);
    for frac in [0.0, 0.5, 1.0] {
        let y = (top + plot_h - frac * plot_h).round() + 0.5;
        cr.set_source_rgba(fr, fgc, fb, 0.15);
        cr.move_to(left, y);
        cr.line_to(left + plot_w, y);
        let _ = cr.stroke();
        cr.set_source_rgba(fr, fgc, fb, 0.6);
        cr.move_to(left + plot_w + 4.0, y + 4.0);
        let _ = cr.show_text(&(st.format)(max * frac));
    }

    let _ = cr.save();
    cr.translate(left, top);
    cr.rectangle(0.0, 0.0, plot_w, plot_h);
    cr.clip();
    for s in &st.series {
        trace(cr, &s.history, st.capacity, plot_w, plot_h, max);
        let c = s.color;
        cr.set_source_rgba(c.red().into(), c.green().into(), c.blue().into(), 1.0);
        cr.set_line_width(1.5);
        let _ = cr.stroke();
    }
    let _ = cr.restore();
}
