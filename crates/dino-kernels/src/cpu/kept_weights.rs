//! Weights rounded and packed for the bf16 products once, for every forward of a command whose
//! weights do not change (extract, eval, attention maps, the bench's inference), rather than once
//! per forward: 4 % of ViT-S/16's bf16 inference on Sapphire Rapids went to packing them.
//!
//! A packed copy is only used while its weight's buffer is provably unchanged. The flex ops
//! [`register`] each weight they are given, keeping a `Weak` reference to its shared storage;
//! while that reference can be upgraded, no one has written the buffer since:
//! - a write in place through `Arc::get_mut` (burn's `try_storage_mut`) is refused while a
//!   `Weak` exists, so the writer copies the buffer instead;
//! - `Arc::make_mut` (burn's `storage_mut`) on a sole owner drops the strong count to zero
//!   before it takes the buffer, so the `Weak` no longer upgrades, and the copy is dropped.
//!
//! Only while a [`KeepPackedWeights`] guard lives, and only in bf16: training keeps it off, where
//! every step changes the weights and a kept `Weak` would turn the optimizer's writes in place
//! into copies.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use burn::backend::flex::FlexTensor;

use super::matmul::Operand;
use crate::cpu_bf16::{self, MatmulPrecision, PackedRhs};

static ON: AtomicBool = AtomicBool::new(false);
static KEPT: Mutex<Registry> = Mutex::new(Registry(Vec::new()));

/// The registered weights.
struct Registry(Vec<Weight>);

/// A registered weight: its storage, the bytes its values span there, and its packed copies
/// (one per operand read from it: the weight, or its transpose).
struct Weight {
    owner: Weak<dyn std::any::Any + Send + Sync>,
    bytes: std::ops::Range<usize>,
    packed: Vec<(Operand, [usize; 2], Arc<PackedRhs>)>,
}

// SAFETY: an `Operand`'s pointer is only compared, never read, out of the packing.
unsafe impl Send for Weight {}

/// While alive, the bf16 products keep the weights they pack (see the module's documentation).
/// Dropping it drops the packed copies. For commands whose weights stay fixed; never while
/// training.
#[must_use = "the packed weights are kept only while the guard lives"]
pub struct KeepPackedWeights(());

/// Keeps packed weights until the returned guard is dropped.
pub fn keep_packed_weights() -> KeepPackedWeights {
    ON.store(true, Ordering::Relaxed);
    KeepPackedWeights(())
}

impl Drop for KeepPackedWeights {
    fn drop(&mut self) {
        ON.store(false, Ordering::Relaxed);
        kept().0.clear();
    }
}

fn kept() -> std::sync::MutexGuard<'static, Registry> {
    KEPT.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn keeping() -> bool {
    ON.load(Ordering::Relaxed) && cpu_bf16::matmul_precision() == MatmulPrecision::Bf16
}

/// Records `weight` (dense f32) as one whose packed copies may be kept, while keeping is on.
pub(super) fn register(weight: &FlexTensor) {
    if keeping() {
        kept().register(weight);
    }
}

/// The packed copy of `rhs` `[k, n]` when keeping is on and it lies in a registered weight
/// unchanged since (packed now if this is the first product to read it), else `None`.
///
/// # Safety
/// `rhs` must address the whole `[k, n]` matrix under its strides.
pub(super) unsafe fn packed(rhs: Operand, dims: [usize; 2], threads: usize) -> Option<Arc<PackedRhs>> {
    if !keeping() {
        return None;
    }
    if let Some(kept) = kept().find(rhs, dims)? {
        return Some(kept);
    }
    // Packed without the lock: the packing runs on rayon's pool, whose threads may meanwhile
    // take other tasks that multiply (and look here).
    // SAFETY: the caller's contract.
    let packed = Arc::new(unsafe { PackedRhs::new(rhs, dims, threads) });
    Some(kept().keep(rhs, dims, packed))
}

impl Registry {
    fn register(&mut self, weight: &FlexTensor) {
        let values = super::values(weight);
        let start = values.as_ptr() as usize;
        let bytes = start..start + std::mem::size_of_val(values);
        let owner: Arc<dyn std::any::Any + Send + Sync> = weight.data_arc();
        let owner = Arc::downgrade(&owner);
        // Weights dropped or written since go, with their copies.
        self.0.retain(|w| w.owner.strong_count() > 0);
        if !self.0.iter().any(|w| w.bytes == bytes && Weak::ptr_eq(&w.owner, &owner)) {
            self.0.push(Weight { owner, bytes, packed: Vec::new() });
        }
    }

    /// The live registered weight whose values hold `rhs` `[k, n]`. A live weight's buffer is
    /// unchanged since it was registered, and two live buffers never overlap, so the one that
    /// holds the operand is the operand's own.
    fn weight_of(&mut self, (at, [rs, cs]): Operand, [k, n]: [usize; 2]) -> Option<&mut Weight> {
        if k == 0 || n == 0 {
            return None;
        }
        let start = at as usize;
        let end = start + 4 * ((k - 1) * rs + (n - 1) * cs + 1);
        self.0.iter_mut().find(|w| w.owner.strong_count() > 0 && w.bytes.start <= start && end <= w.bytes.end)
    }

    /// `None` when `rhs` is not in a kept weight; else its packed copy, if made yet.
    fn find(&mut self, rhs: Operand, dims: [usize; 2]) -> Option<Option<Arc<PackedRhs>>> {
        let weight = self.weight_of(rhs, dims)?;
        Some(weight.packed.iter().find(|(operand, d, _)| *operand == rhs && *d == dims).map(|(.., p)| p.clone()))
    }

    /// Keeps `packed`, the copy of `rhs`, if its weight is still registered; returns the copy
    /// kept (another thread's, if it kept one first).
    fn keep(&mut self, rhs: Operand, dims: [usize; 2], packed: Arc<PackedRhs>) -> Arc<PackedRhs> {
        let Some(weight) = self.weight_of(rhs, dims) else { return packed };
        if let Some((.., first)) = weight.packed.iter().find(|(operand, d, _)| *operand == rhs && *d == dims) {
            return first.clone();
        }
        weight.packed.push((rhs, dims, packed.clone()));
        packed
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Shape, TensorData};

    use super::*;

    /// [`super::packed`] on `registry`: `w`'s kept copy, packed on first use.
    fn packed(registry: &mut Registry, w: &FlexTensor) -> Option<Arc<PackedRhs>> {
        let rhs = (super::super::values(w).as_ptr(), [8, 1]);
        let kept = registry.find(rhs, [4, 8])?;
        // SAFETY: the operand is the whole [4, 8] weight.
        Some(kept.unwrap_or_else(|| registry.keep(rhs, [4, 8], Arc::new(unsafe { PackedRhs::new(rhs, [4, 8], 1) }))))
    }

    /// A copy is shared while its weight lives unchanged, and dropped from use when the weight
    /// is written in place in its own buffer (`storage_mut` on its sole owner) or dropped.
    #[test]
    fn copies_last_while_their_weight_is_unchanged() {
        let mut registry = Registry(Vec::new());
        let new = || {
            FlexTensor::from_data(TensorData::new((0..32).map(|i| i as f32).collect::<Vec<_>>(), Shape::new([4, 8])))
        };
        let mut w = new();
        assert!(packed(&mut registry, &w).is_none(), "an unregistered weight");
        registry.register(&w);
        registry.register(&w);
        assert_eq!(registry.0.len(), 1, "registered once");
        let first = packed(&mut registry, &w).expect("a registered weight");
        assert!(Arc::ptr_eq(&first, &packed(&mut registry, &w).unwrap()), "packed once");

        // Written in place: the same buffer, other values, and no copy.
        let at = super::super::values(&w).as_ptr();
        w.storage_mut::<f32>()[0] = 100.0;
        assert_eq!(super::super::values(&w).as_ptr(), at, "storage_mut wrote in place");
        assert!(packed(&mut registry, &w).is_none(), "the copy of the old values");
        registry.register(&w);
        assert_eq!(registry.0.len(), 1, "the old registration went");
        assert!(!Arc::ptr_eq(&first, &packed(&mut registry, &w).unwrap()), "packed again");

        // A view that shares the buffer is the same weight; a dropped weight is not.
        let shared = w.clone();
        assert!(packed(&mut registry, &shared).is_some());
        drop((w, shared));
        let other = new();
        registry.register(&other);
        assert_eq!(registry.0.len(), 1, "the dropped weight went");
    }
}
