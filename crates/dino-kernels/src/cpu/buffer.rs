//! Output buffers that parallel tasks fill without a zeroing pass first.

use std::marker::PhantomData;
use std::mem::MaybeUninit;

/// A vector's capacity that parallel tasks fill: each task writes a disjoint range of elements
/// through it. It borrows the vector for `'a`, so neither the slices it hands out nor the
/// pointer can outlive the buffer, and every range is checked against the capacity.
#[derive(Clone, Copy)]
pub struct Shared<'a> {
    ptr: *mut f32,
    capacity: usize,
    _buffer: PhantomData<&'a mut [MaybeUninit<f32>]>,
}
// SAFETY: users write disjoint elements from each task and read nothing another task writes.
unsafe impl Send for Shared<'_> {}
unsafe impl Sync for Shared<'_> {}

impl<'a> Shared<'a> {
    /// The whole capacity of `v` (its length is left as it is; callers `set_len` once filled).
    pub fn capacity_of(v: &'a mut Vec<f32>) -> Self {
        Self { ptr: v.as_mut_ptr(), capacity: v.capacity(), _buffer: PhantomData }
    }

    /// A pointer to element `offset`, for strided writes (matrix products into columns).
    ///
    /// # Safety
    /// The caller writes only elements it owns, inside the capacity.
    pub unsafe fn at(self, offset: usize) -> *mut f32 {
        assert!(offset <= self.capacity, "offset {offset} past a buffer of {}", self.capacity);
        // SAFETY: within (or one past) the allocation, checked above.
        unsafe { self.ptr.add(offset) }
    }

    /// The `len` elements from `offset`, not yet initialised (checked to lie inside the capacity).
    ///
    /// # Safety
    /// No other task may touch them while the slice lives.
    pub unsafe fn uninit_slice(self, offset: usize, len: usize) -> &'a mut [MaybeUninit<f32>] {
        let end = offset.checked_add(len).filter(|&end| end <= self.capacity);
        assert!(end.is_some(), "elements {offset}..+{len} past a buffer of {}", self.capacity);
        // SAFETY: inside the allocation (checked), valid for `'a` (the borrow), exclusive by the
        // caller's promise; MaybeUninit<f32> has f32's layout.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(offset).cast::<MaybeUninit<f32>>(), len) }
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

/// `out` filled from `values` (one for each element), as initialised floats: for kernels whose
/// first pass over an output row writes every element, so that it needs no zeroing first.
#[inline(always)]
pub fn filled(out: &mut [MaybeUninit<f32>], values: impl ExactSizeIterator<Item = f32>) -> &mut [f32] {
    assert_eq!(values.len(), out.len(), "a row filled from as many values");
    // A `for` loop: `for_each` went through `Map::fold`, which was not inlined into the callers'
    // AVX-512 builds and ran as baseline (SSE) code (perf: 2 % of official_s16 inference's
    // samples; LayerNorm with it 5.7 %, without 4.0 %).
    for (o, v) in out.iter_mut().zip(values) {
        o.write(v);
    }
    // SAFETY: every element was just written (as many values as elements).
    unsafe { assume_init(out) }
}

/// Zeroes `s` and returns it as initialised floats (done by each task on its own chunk, while
/// it is in cache, rather than in one serial pass over a whole fresh buffer).
pub fn zeroed(s: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    s.fill(MaybeUninit::new(0.0));
    // SAFETY: every element was just written.
    unsafe { assume_init(s) }
}
