//! What runv's fuzz targets share: the input format of a hostile virtio
//! driver ([`script`]), that driver ([`virtio`]), and the seeds of every
//! target ([`seeds`]). Each target in fuzz_targets/ is a thin harness over
//! production code; docs/fuzzing.md says which.

pub mod bus_access;
pub mod host;
pub mod scratch;
pub mod script;
pub mod seeds;
pub mod virtio;
