//! Host-side files the targets' devices use: made once per fuzzer
//! process, in its TMPDIR (scripts/fuzz points that into its work dir).

use std::{path::Path, sync::OnceLock};

use tempfile::TempDir;

/// A directory that lives as long as the process.
pub fn dir() -> &'static Path {
    static DIR: OnceLock<TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("a scratch directory"))
        .path()
}
