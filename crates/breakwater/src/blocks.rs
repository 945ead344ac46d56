//! The process's allocator: glibc's, except for one shape of block that tokio allocates for
//! every client, which comes from a free list of its own.
//!
//! tokio allocates each task and each socket's I/O registration as a 256-byte block aligned
//! to 128 bytes (both are cache-padded). glibc serves an aligned request by carving a larger
//! chunk and freeing the misaligned part in front: with its 16-byte chunk header, one such
//! block after another takes 384 bytes, and the 112-byte pieces in between are too small for
//! anything else a client keeps. An idle client has two of these blocks, so about 240 of its
//! bytes were those pieces (`malloc_stats`: 2.4 of 8.0 MB of the main arena free with 10 000
//! idle clients). Here such blocks are cut from 64 KiB runs, back to back, and a freed one
//! goes on a list for the next; runs are never given back (neither is most of glibc's heap).
//!
//! It must never allocate through itself while holding its lock, and must route every
//! pointer back to where it came from: a block is recognised by its layout, which the caller
//! gives again when it frees or reallocates it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr::{self, NonNull};
use std::sync::Mutex;

/// The one layout served from the free list.
const BLOCK_SIZE: usize = 256;
const BLOCK_ALIGN: usize = 128;
/// Blocks are cut from runs of this size (256 blocks each).
const RUN: usize = 64 * 1024;

pub struct Allocator;

/// Freed blocks, linked through their first word, and the unused end of the newest run.
struct Blocks {
    free: Option<NonNull<FreeBlock>>,
    next: usize,
    end: usize,
}

struct FreeBlock {
    next: Option<NonNull<FreeBlock>>,
}

// SAFETY: the pointers name memory only this allocator hands out, always under the lock.
unsafe impl Send for Blocks {}

static BLOCKS: Mutex<Blocks> = Mutex::new(Blocks {
    free: None,
    next: 0,
    end: 0,
});

fn is_block(layout: Layout) -> bool {
    layout.size() == BLOCK_SIZE && layout.align() == BLOCK_ALIGN
}

fn run_layout() -> Layout {
    // RUN and BLOCK_SIZE are powers of two: the layout is valid.
    Layout::from_size_align(RUN, BLOCK_SIZE).unwrap_or(Layout::new::<u8>())
}

impl Blocks {
    fn take(&mut self) -> *mut u8 {
        if let Some(block) = self.free {
            // SAFETY: a listed block is one this allocator handed out and got back; its first
            // word was written by `give_back`.
            self.free = unsafe { block.as_ref().next };
            return block.as_ptr().cast();
        }
        if self.next == self.end {
            // Through glibc directly, not the global allocator: nothing here may come back
            // through this lock.
            // SAFETY: a non-zero size.
            let run = unsafe { System.alloc(run_layout()) };
            if run.is_null() {
                return ptr::null_mut();
            }
            self.next = run as usize;
            self.end = run as usize + RUN;
        }
        let block = self.next as *mut u8;
        self.next += BLOCK_SIZE;
        block
    }

    /// # Safety
    /// `block` came from `take` and is not used any more.
    unsafe fn give_back(&mut self, block: *mut u8) {
        let block = block.cast::<FreeBlock>();
        // SAFETY: the block is ours, unused, large and aligned enough for a FreeBlock.
        unsafe { block.write(FreeBlock { next: self.free }) };
        self.free = NonNull::new(block);
    }
}

fn blocks() -> std::sync::MutexGuard<'static, Blocks> {
    // A panic under this lock cannot leave the list half-linked (each change is one store),
    // and an allocator must not panic.
    BLOCKS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

// SAFETY: blocks are BLOCK_SIZE bytes at BLOCK_ALIGN (runs are aligned to BLOCK_SIZE and cut
// in BLOCK_SIZE steps), handed out once until given back; everything else is glibc's, and a
// pointer is freed or resized by whoever made it, told apart by its layout.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if is_block(layout) {
            blocks().take()
        } else {
            // SAFETY: forwarded as given.
            unsafe { System.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if is_block(layout) {
            let p = blocks().take();
            if !p.is_null() {
                // SAFETY: a block of BLOCK_SIZE bytes, ours.
                unsafe { ptr::write_bytes(p, 0, BLOCK_SIZE) };
            }
            p
        } else {
            // SAFETY: forwarded as given.
            unsafe { System.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if is_block(layout) {
            // SAFETY: the caller frees what `alloc` gave for this layout: a block.
            unsafe { blocks().give_back(ptr) }
        } else {
            // SAFETY: forwarded as given.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY (both branches): the caller's contract, forwarded. When a block is involved
        // on either side, a new allocation, a copy and a free, each routed by its layout.
        unsafe {
            let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
            if !is_block(layout) && !is_block(new_layout) {
                return System.realloc(ptr, layout, new_size);
            }
            let new = self.alloc(new_layout);
            if !new.is_null() {
                ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block() -> Layout {
        Layout::from_size_align(BLOCK_SIZE, BLOCK_ALIGN).unwrap()
    }

    /// A list of its own, so tests running at once do not take each other's blocks.
    fn list() -> Blocks {
        Blocks {
            free: None,
            next: 0,
            end: 0,
        }
    }

    #[test]
    fn blocks_are_aligned_apart_and_the_last_freed_is_handed_out_next() {
        let mut b = list();
        unsafe {
            let p = b.take();
            let q = b.take();
            assert_eq!(p as usize % BLOCK_ALIGN, 0);
            assert_eq!(q as usize % BLOCK_ALIGN, 0);
            assert_eq!(q as usize - p as usize, BLOCK_SIZE, "back to back");
            p.write_bytes(0xAA, BLOCK_SIZE);
            q.write_bytes(0xBB, BLOCK_SIZE);
            assert_eq!(*p.add(BLOCK_SIZE - 1), 0xAA, "blocks do not overlap");
            b.give_back(p);
            b.give_back(q);
            assert_eq!(b.take(), q);
            assert_eq!(b.take(), p);
            assert_ne!(b.take(), p, "a fresh block once the list is empty");
        }
    }

    #[test]
    fn a_run_is_cut_into_whole_blocks_and_the_next_run_starts_fresh() {
        let mut b = list();
        let held: Vec<*mut u8> = (0..RUN / BLOCK_SIZE * 2 + 3).map(|_| b.take()).collect();
        let mut sorted = held.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), held.len(), "no block handed out twice");
        assert!(held
            .iter()
            .all(|p| !p.is_null() && (*p as usize).is_multiple_of(BLOCK_ALIGN)));
        for w in sorted.windows(2) {
            assert!(w[1] as usize - w[0] as usize >= BLOCK_SIZE);
        }
    }

    #[test]
    fn other_layouts_and_resizes_across_the_block_shape_keep_their_bytes() {
        let a = Allocator;
        unsafe {
            let z = a.alloc_zeroed(block());
            assert!((0..BLOCK_SIZE).all(|i| *z.add(i) == 0));
            a.dealloc(z, block());

            let small = Layout::from_size_align(100, BLOCK_ALIGN).unwrap();
            let p = a.alloc(small);
            p.write_bytes(7, 100);
            // Grows into the block shape: the block list serves it from now on.
            let q = a.realloc(p, small, BLOCK_SIZE);
            assert_eq!(q as usize % BLOCK_ALIGN, 0);
            assert!((0..100).all(|i| *q.add(i) == 7));
            // And out of it again.
            let r = a.realloc(q, block(), 1000);
            assert!((0..100).all(|i| *r.add(i) == 7));
            a.dealloc(r, Layout::from_size_align(1000, BLOCK_ALIGN).unwrap());

            let plain = Layout::from_size_align(24, 8).unwrap();
            let s = a.alloc(plain);
            s.write_bytes(3, 24);
            let t = a.realloc(s, plain, 48);
            assert!((0..24).all(|i| *t.add(i) == 3));
            a.dealloc(t, Layout::from_size_align(48, 8).unwrap());
        }
    }
}
