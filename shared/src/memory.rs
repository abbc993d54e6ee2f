//! Giving freed heap memory back to the operating system.
//!
//! Loading a large config (10,000 schedules) parses megabytes of TOML that
//! are freed right after, but glibc's allocator keeps freed pages inside the
//! heap, so the process would carry its parse-time peak for life. Parsing
//! inside [`isolated`] keeps the temporary nodes in an arena of their own,
//! and [`release_free`] after the burst returns the pages.

/// Returns free heap pages to the OS (glibc `malloc_trim`; a no-op on other
/// allocators). Cheap enough for startup, reloads and leadership changes,
/// not for a hot path.
pub fn release_free() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: `malloc_trim` only releases memory glibc's allocator already
    // holds as free; it takes no pointers and is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Runs `f` on a short-lived thread and returns its result. glibc gives the
/// thread its own malloc arena, so the temporary allocations of a big parse
/// do not interleave with the long-lived data of the calling thread; once
/// the result is dropped the arena is empty and [`release_free`] returns it
/// whole. A panic in `f` is resumed on the caller.
pub fn isolated<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| match s.spawn(f).join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}
