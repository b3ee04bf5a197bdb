//! Output buffers that parallel tasks fill without a zeroing pass first.

use std::mem::MaybeUninit;

/// A raw pointer that tasks share; each task writes a disjoint set of elements through it.
#[derive(Clone, Copy)]
pub struct Shared(pub *mut f32);
// SAFETY: users write disjoint elements from each task and read nothing another task writes.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// # Safety
    /// `offset` must lie inside the buffer.
    pub unsafe fn at(self, offset: usize) -> *mut f32 {
        unsafe { self.0.add(offset) }
    }

    /// The `len` elements from `offset`, not yet initialised.
    ///
    /// # Safety
    /// They must lie inside the buffer's capacity and no other task may touch them meanwhile.
    pub unsafe fn uninit_slice<'a>(self, offset: usize, len: usize) -> &'a mut [MaybeUninit<f32>] {
        unsafe { std::slice::from_raw_parts_mut(self.at(offset).cast::<MaybeUninit<f32>>(), len) }
    }
}

/// A slice whose every element has been written.
///
/// # Safety
/// Every element of `s` must be initialised.
pub unsafe fn assume_init(s: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: MaybeUninit<f32> has f32's layout; the caller guarantees initialisation.
    unsafe { &mut *(s as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// A `len`-element vector filled by `fill` over the spare capacity in parallel chunks of
/// `chunk` elements (chunk index, chunk).
///
/// # Safety
/// `fill` must write every element it is given.
pub unsafe fn par_filled(
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync + Send,
) -> Vec<f32> {
    use rayon::prelude::*;
    let mut v = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len].par_chunks_mut(chunk.max(1)).enumerate().for_each(|(i, c)| fill(i, c));
    // SAFETY: `fill` wrote every element of every chunk, which together cover 0..len.
    unsafe { v.set_len(len) };
    v
}

/// Zeroes `s` and returns it as initialised floats (done by each task on its own chunk, while
/// it is in cache, rather than in one serial pass over a whole fresh buffer).
pub fn zeroed(s: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    s.fill(MaybeUninit::new(0.0));
    // SAFETY: every element was just written.
    unsafe { assume_init(s) }
}
