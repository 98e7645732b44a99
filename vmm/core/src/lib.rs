//! DeskVM engine.
