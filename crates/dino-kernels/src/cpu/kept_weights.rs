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
    // SAFETY: the caller's contract.
    if keeping() { unsafe { kept().packed(rhs, dims, threads) } } else { None }
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

    /// # Safety
    /// As [`packed`]'s.
    unsafe fn packed(&mut self, rhs: Operand, [k, n]: [usize; 2], threads: usize) -> Option<Arc<PackedRhs>> {
        let (at, [rs, cs]) = rhs;
        if k == 0 || n == 0 {
            return None;
        }
        let start = at as usize;
        let end = start + 4 * ((k - 1) * rs + (n - 1) * cs + 1);
        // A live weight's buffer is unchanged since it was registered; two live buffers never
        // overlap, so the one that holds the operand is the operand's own.
        let weight =
            self.0.iter_mut().find(|w| w.owner.strong_count() > 0 && w.bytes.start <= start && end <= w.bytes.end)?;
        if let Some((.., packed)) = weight.packed.iter().find(|(operand, dims, _)| *operand == rhs && *dims == [k, n]) {
            return Some(packed.clone());
        }
        // SAFETY: the caller's contract.
        let packed = Arc::new(unsafe { PackedRhs::new(rhs, [k, n], threads) });
        weight.packed.push((rhs, [k, n], packed.clone()));
        Some(packed)
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Shape, TensorData};

    use super::*;

    fn packed(registry: &mut Registry, w: &FlexTensor) -> Option<Arc<PackedRhs>> {
        let values = super::super::values(w);
        // SAFETY: the operand is the whole [4, 8] weight.
        unsafe { registry.packed((values.as_ptr(), [8, 1]), [4, 8], 1) }
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
