//! The process's allocator: glibc's, except for one shape of block that tokio allocates for
//! every client, which comes from a free list of its own.
//!
//! tokio allocates each task and each socket's I/O registration as a 256-byte block aligned
//! to 128 bytes (both are cache-padded). glibc serves an aligned request by carving a larger
//! chunk and freeing the misaligned part in front: with its 16-byte chunk header, one such
//! block after another takes 384 bytes, and the 112-byte pieces in between are too small for
//! anything else a client keeps. An idle client had two of these blocks, so about 240 of its
//! bytes were those pieces (`malloc_stats`: 2.4 of 8.0 MB of the main arena free with 10 000
//! idle clients). Here such blocks are cut from 64 KiB runs mapped from the system, back to
//! back, and a freed one goes on its run's list for the next. A run whose blocks are all free
//! again is unmapped: parked idle clients (the proxy's `park`) give their task and their
//! socket's registration back, and the memory should leave with them.
//!
//! It must never allocate through itself while holding its lock, and must route every
//! pointer back to where it came from: a block is recognised by its layout, which the caller
//! gives again when it frees or reallocates it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr::{self, NonNull};
use std::sync::Mutex;

/// The one layout served from the runs.
const BLOCK_SIZE: usize = 256;
const BLOCK_ALIGN: usize = 128;
/// Blocks are cut from runs of this size, aligned to it: a block's run is its address with
/// the low bits cleared. The run's first block holds its header, the other 255 are handed out.
const RUN: usize = 64 * 1024;
const PER_RUN: u16 = (RUN / BLOCK_SIZE) as u16 - 1;

pub struct Allocator;

/// The runs with a free block, newest first; full runs are on no list.
struct Blocks {
    partial: Option<NonNull<Run>>,
    /// Runs that exist, empty or not.
    runs: usize,
}

/// The header in a run's first block.
struct Run {
    /// Freed blocks of this run, linked through their first word.
    free: Option<NonNull<FreeBlock>>,
    /// Blocks handed out and not given back.
    used: u16,
    /// Blocks ever cut (after the header): the rest of the run is untouched memory.
    cut: u16,
    prev: Option<NonNull<Run>>,
    next: Option<NonNull<Run>>,
    on_list: bool,
}

struct FreeBlock {
    next: Option<NonNull<FreeBlock>>,
}

// SAFETY: the pointers name memory only this allocator hands out, always under the lock.
unsafe impl Send for Blocks {}

static BLOCKS: Mutex<Blocks> = Mutex::new(Blocks {
    partial: None,
    runs: 0,
});

fn is_block(layout: Layout) -> bool {
    layout.size() == BLOCK_SIZE && layout.align() == BLOCK_ALIGN
}

/// A fresh run from the system, aligned to RUN: mapped twice its size, the ends unmapped.
/// Runs come straight from mmap, not glibc, so an empty one can go back (see `give_back`).
fn map_run() -> Option<NonNull<Run>> {
    // SAFETY: an anonymous private mapping, and munmap of parts of it that nothing uses.
    unsafe {
        let p = libc::mmap(
            ptr::null_mut(),
            2 * RUN,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return None;
        }
        let start = p as usize;
        let aligned = (start + RUN - 1) & !(RUN - 1);
        if aligned > start {
            libc::munmap(p, aligned - start);
        }
        let tail = start + 2 * RUN - (aligned + RUN);
        if tail > 0 {
            libc::munmap((aligned + RUN) as *mut libc::c_void, tail);
        }
        let run = aligned as *mut Run;
        run.write(Run {
            free: None,
            used: 0,
            cut: 0,
            prev: None,
            next: None,
            on_list: false,
        });
        NonNull::new(run)
    }
}

impl Blocks {
    /// # Safety
    /// `run` is a live run not on the list.
    unsafe fn push(&mut self, mut run: NonNull<Run>) {
        // SAFETY: runs on the list and `run` are live headers, touched only under the lock.
        unsafe {
            let r = run.as_mut();
            r.prev = None;
            r.next = self.partial;
            r.on_list = true;
            if let Some(mut head) = self.partial {
                head.as_mut().prev = Some(run);
            }
        }
        self.partial = Some(run);
    }

    /// # Safety
    /// `run` is a live run on the list.
    unsafe fn unlink(&mut self, mut run: NonNull<Run>) {
        // SAFETY: as in `push`.
        unsafe {
            let r = run.as_mut();
            match r.prev {
                Some(mut p) => p.as_mut().next = r.next,
                None => self.partial = r.next,
            }
            if let Some(mut n) = r.next {
                n.as_mut().prev = r.prev;
            }
            r.prev = None;
            r.next = None;
            r.on_list = false;
        }
    }

    fn take(&mut self) -> *mut u8 {
        let mut run = match self.partial {
            Some(run) => run,
            None => {
                let Some(run) = map_run() else {
                    return ptr::null_mut();
                };
                self.runs += 1;
                // SAFETY: a fresh run, on no list.
                unsafe { self.push(run) };
                run
            }
        };
        // SAFETY: a run on the list is live and has a free or uncut block; a listed free
        // block is one of its blocks, given back, whose first word `give_back` wrote.
        unsafe {
            let r = run.as_mut();
            let block = match r.free {
                Some(b) => {
                    r.free = b.as_ref().next;
                    b.as_ptr().cast::<u8>()
                }
                None => {
                    r.cut += 1;
                    run.as_ptr()
                        .cast::<u8>()
                        .add(usize::from(r.cut) * BLOCK_SIZE)
                }
            };
            r.used += 1;
            if r.used == PER_RUN {
                self.unlink(run);
            }
            block
        }
    }

    /// # Safety
    /// `block` came from `take` and is not used any more.
    unsafe fn give_back(&mut self, block: *mut u8) {
        let run = (block as usize & !(RUN - 1)) as *mut Run;
        // SAFETY: the block's run is live (it has this block out); the block is unused and
        // large and aligned enough for a FreeBlock.
        unsafe {
            let Some(mut run) = NonNull::new(run) else {
                return;
            };
            let r = run.as_mut();
            let b = block.cast::<FreeBlock>();
            b.write(FreeBlock { next: r.free });
            r.free = NonNull::new(b);
            r.used -= 1;
            if !r.on_list {
                self.push(run);
            }
            // An empty run goes back to the system, unless it is the only one (a client
            // coming and going must not map and unmap a run each time).
            if r.used == 0 && self.runs > 1 {
                self.unlink(run);
                self.runs -= 1;
                libc::munmap(run.as_ptr().cast(), RUN);
            }
        }
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

    /// Runs of its own, so tests running at once do not take each other's blocks.
    fn list() -> Blocks {
        Blocks {
            partial: None,
            runs: 0,
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
    fn a_run_whose_blocks_all_come_back_is_unmapped_but_the_last_is_kept() {
        let mut b = list();
        let n = usize::from(PER_RUN) * 3;
        let held: Vec<*mut u8> = (0..n).map(|_| b.take()).collect();
        assert_eq!(b.runs, 3);
        // Every run but one block of the first back: two runs are empty and go.
        for p in held.iter().skip(1) {
            unsafe { b.give_back(*p) };
        }
        assert_eq!(b.runs, 1, "empty runs are unmapped");
        // The kept run serves the next blocks, the last freed first.
        let again = b.take();
        assert_eq!(again, held[usize::from(PER_RUN) - 1]);
        unsafe {
            b.give_back(again);
            b.give_back(held[0]);
        }
        assert_eq!(b.runs, 1, "the last run stays, empty");
        let first = b.take();
        assert_eq!(first as usize & !(RUN - 1), held[0] as usize & !(RUN - 1));
        unsafe { b.give_back(first) };
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
