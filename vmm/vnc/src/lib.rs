//! An RFB (VNC) server for a VM's screen.
#![forbid(unsafe_code)]
