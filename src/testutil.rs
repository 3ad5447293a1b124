//! Where tests find `../shared/fixtures` (override with `INTERNVL_FIXTURES`).
//!
//! Missing fixtures are a loud failure, never a silent pass.
use std::path::PathBuf;

/// Where the fixtures should be: `$INTERNVL_FIXTURES`, else `../shared/fixtures` beside the
/// project root (not checked).
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("INTERNVL_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"),
    }
}

/// The fixtures folder, asserted to exist.
pub fn fixtures() -> PathBuf {
    let dir = fixtures_dir();
    assert!(
        dir.join("README.md").is_file(),
        "fixtures not found at {} (set INTERNVL_FIXTURES or put shared/ beside the project)",
        dir.display()
    );
    dir
}

/// A fixture path below the fixtures folder, asserted to exist.
pub fn fixture(rel: &str) -> PathBuf {
    let p = fixtures().join(rel);
    assert!(p.exists(), "fixture missing: {}", p.display());
    p
}
