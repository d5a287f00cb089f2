//! The matrix-sdk-crypto test peer (hsm-config/sdk-peer): a Matrix device run by the real
//! `OlmMachine`, the other side of mxhsm's interactive verification in tests. Built
//! (debug, the crate's own profile) into ~/.cache/mxhsm-dev/sdk-peer-<SDK version>, outside
//! the clone, so a fresh checkout reuses it; cargo rebuilds it when its source changes.

use std::path::{Path, PathBuf};

use crate::{Result, cargo, root, run};

/// The matrix-sdk-crypto minor version the peer is built against (its cache directory).
const SDK_VERSION: &str = "0.18";

/// Builds the peer and returns the path of its binary.
pub fn build(cache: &Path) -> Result<PathBuf> {
    let dir = cache.join(format!("sdk-peer-{SDK_VERSION}"));
    run(cargo()
        .args(["build", "--locked", "--manifest-path"])
        .arg(root().join("hsm-config/sdk-peer/Cargo.toml"))
        .arg("--target-dir")
        .arg(&dir)
        .args(["--bin", "mxhsm-sdk-peer"])
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS"))?;
    Ok(dir.join("debug/mxhsm-sdk-peer"))
}
