//! GTK widgets for DeskVM that know nothing of KVM.
#![forbid(unsafe_code)]
