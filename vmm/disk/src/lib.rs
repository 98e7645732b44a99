//! Disk images for DeskVM: raw and qcow2.
#![forbid(unsafe_code)]
