//! The process's allocator: mimalloc, called the way its own aligned path would end up calling
//! it, without the detour.
//!
//! Why mimalloc: a request through the sidecars allocates and frees a few dozen small objects
//! (header maps, frames, futures); glibc spent ≈ 10 % of the inbound sidecar's instructions on
//! them (its per-thread cache holds 7 blocks per size, the rest go through the locked arena).
//! Measured in BENCHMARKS.md (ninth session): 4–6 % fewer instructions per request on the mesh
//! path, for ≈ 0.5 MiB more anonymous memory in a fresh sidecar. Built without transparent huge
//! pages (`no_thp`), which made 8 MiB of its arenas resident at start.
//!
//! Why not the `mimalloc` crate's `MiMalloc`: it passes every allocation to
//! `mi_malloc_aligned`, whose fast path serves only blocks of at most 1 KiB whose size class
//! has a free block at hand; everything else (every buffer, every boxed request future, every
//! first block of a fresh page) goes through its generic path, which for the alignments Rust
//! asks for (at most 16 and no more than the size) ends in plain `mi_malloc` after a few hundred
//! instructions. On the inbound path that was ≈ 30 allocations and ≈ 2,900 instructions per
//! request, ≈ 7 % of the sidecar's (callgrind; BENCHMARKS.md, thirteenth session). mimalloc
//! guarantees that alignment for such a block (`mi_malloc_is_naturally_aligned` in its
//! `alloc-aligned.c`, which its own generic path relies on), so those go to `mi_malloc`
//! directly; larger alignments still go to `mi_malloc_aligned`.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The largest alignment every mimalloc block of at least that size has (`MI_MAX_ALIGN_SIZE`).
const NATURAL_ALIGN: usize = 16;

/// mimalloc, see the module docs.
pub struct Mimalloc;

/// Whether a plain `mi_malloc(size)` block is aligned enough for `layout`.
#[inline(always)]
fn naturally_aligned(align: usize, size: usize) -> bool {
    align <= NATURAL_ALIGN && align <= size
}

/// Runs mimalloc's pending purges every `every`, for as long as the process lives.
///
/// Why: mimalloc gives freed pages back to the system (`madvise`) 10 ms after they empty, but
/// only when the allocator is next used after that delay. A sidecar whose connections went idle
/// (and parked, releasing their buffers) makes no further allocations, so what a burst of
/// connections freed stayed resident: 1,000 parked pooled connections still cost 10–14 KiB each
/// in RSS instead of 4.4 (BENCHMARKS.md, fifteenth session). Purging at once on every free
/// (`purge_delay` 0) would put `madvise` calls on the request path; one collection a second
/// costs nothing measurable and bounds how long freed memory stays resident.
pub async fn return_freed_memory(every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // SAFETY: `mi_collect` takes no pointers; it frees this thread's retired pages and
        // runs the expired purges of mimalloc's arenas, which any thread may do at any time.
        unsafe { mi::mi_collect(false) };
    }
}

// SAFETY: every method hands the request to mimalloc, which returns blocks of at least the
// requested size or null. Plain `mi_malloc`/`mi_zalloc`/`mi_realloc` are used only where
// `naturally_aligned` holds, for which mimalloc guarantees the alignment (see the module docs);
// otherwise the `_aligned` functions with the layout's alignment. `mi_free` frees blocks from
// both, and `mi_realloc` keeps a block's address only when the new size fits its size class,
// whose blocks are aligned as above, or moves it to a fresh `mi_malloc(new_size)` block.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: mimalloc accepts any size (the caller's layout is non-zero-sized).
        unsafe {
            if naturally_aligned(layout.align(), layout.size()) {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        unsafe {
            if naturally_aligned(layout.align(), layout.size()) {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator, so from mimalloc.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator with `layout`; `new_size` is non-zero.
        unsafe {
            if naturally_aligned(layout.align(), new_size) {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Alignments from 1 to a page, sizes around the size classes' edges (and smaller than the
    /// alignment): every block is aligned as asked, usable to its last byte, keeps its bytes as
    /// it grows and shrinks, and comes back zeroed from `alloc_zeroed`.
    #[test]
    fn blocks_are_aligned_as_asked_and_keep_their_bytes() {
        let a = Mimalloc;
        for align in (0..13).map(|s| 1usize << s) {
            for size in [
                1, 7, 8, 15, 16, 17, 24, 31, 48, 100, 1024, 1025, 4000, 70_000,
            ] {
                let mut layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: non-zero-sized layouts; each block is used within its size and freed
                // (or reallocated) once, with the layout it has.
                unsafe {
                    let mut p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "alloc {size} bytes, align {align}");
                    std::ptr::write_bytes(p, 0xa5, size);
                    for new_size in [size * 3 + 5, size / 2 + 1, 2 * size] {
                        p = a.realloc(p, layout, new_size);
                        assert!(!p.is_null());
                        assert_eq!(p as usize % align, 0, "realloc {layout:?} to {new_size}");
                        let kept = std::slice::from_raw_parts(p, layout.size().min(new_size));
                        assert!(kept.iter().all(|&b| b == 0xa5), "realloc lost bytes");
                        std::ptr::write_bytes(p, 0xa5, new_size);
                        layout = Layout::from_size_align(new_size, align).unwrap();
                    }
                    a.dealloc(p, layout);
                    let layout = Layout::from_size_align(size, align).unwrap();
                    let z = a.alloc_zeroed(layout);
                    assert_eq!(
                        z as usize % align,
                        0,
                        "alloc_zeroed {size} bytes, align {align}"
                    );
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
                    a.dealloc(z, layout);
                }
            }
        }
    }
}
