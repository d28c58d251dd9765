//! Writes every target's seeds into fuzz/corpus/<target>/ (the seeds are
//! kept in the repository; rerun after changing src/seeds.rs).

use std::{fs, path::Path};

fn main() -> std::io::Result<()> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, seeds) in runv_fuzz::seeds::all() {
        let dir = corpus.join(target);
        fs::create_dir_all(&dir)?;
        for (name, bytes) in seeds {
            fs::write(dir.join(format!("seed-{name}")), bytes)?;
        }
        println!("{}", dir.display());
    }
    Ok(())
}
