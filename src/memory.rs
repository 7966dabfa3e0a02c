//! Handing memory the process freed back to the system.

/// Return what glibc's malloc holds freed to the system (`malloc_trim`):
/// called after a large transient, such as sled reading its snapshot at
/// open or the probe pass after a connect, so that RSS follows what is
/// live (docs/benchmarks.md, "Parked recipients"). A no-op elsewhere.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn release_freed() {
    let t = std::time::Instant::now();
    // SAFETY: malloc_trim only walks malloc's own state, under its locks.
    unsafe {
        libc::malloc_trim(0);
    }
    tracing::debug!(
        took_us = t.elapsed().as_micros() as u64,
        "freed memory returned to the system"
    );
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_freed() {}
