//! Devices of the microVM.

pub mod i8042;
pub mod serial;
