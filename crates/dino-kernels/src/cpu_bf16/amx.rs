//! The AMX-BF16 microkernel (Intel Sapphire Rapids and later): a `ROWS x NR` block of sums made
//! by `tdpbf16ps` on tile registers, 2 x 2 tiles of 16 x 16 f32 sums.
//!
//! - A is packed as `[ROWS][stride]` k-pairs (each row of A contiguous along k, `stride` a whole
//!   number of `PAIRS`), B as the usual `[pairs][NR]` panel: a B tile is 16 of its pairs by 16
//!   columns, read with a 128-byte row stride, so one packed weight serves every path.
//! - Each step loads 2 A tiles and 2 B tiles (16 pairs of k) and runs 4 `tdpbf16ps`; the 4 sum
//!   tiles go through a stack buffer to the same epilogue as the AVX-512 kernel.
//! - The instructions are written as `asm!`: Rust's AMX intrinsics are unstable (`x86_amx_intrinsics`).
//!   The compiler never allocates tile registers, so the kernel owns `tmm0..tmm7`.
//! - Sums are f32, but `tdpbf16ps` adds a pair's two products in an order (and with internal
//!   rounding) that Intel does not specify: the bits differ from `vdpbf16ps`'s, the error stays
//!   within the same bound of a plain reference (tested).

use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::Cell;

use super::microkernel::{Epilogue, NR, Out, row_masks};

/// Rows of A (and of the sums) per call: two tiles of 16.
pub(crate) const ROWS: usize = 32;
/// k-pairs per step: a tile row is 64 bytes.
pub(crate) const PAIRS: usize = 16;

/// Whether this process can run the kernel: the CPU has AMX-BF16 (CPUID leaf 7: EDX bits 22 and
/// 24) and AVX-512 (the epilogue), and the OS grants the tile state. Linux hands it out per
/// process on request (`arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)`, kernel 5.16 and later);
/// without it the first tile instruction faults, so the request is the check.
pub(crate) fn usable() -> bool {
    in_cpu() && request_tile_state()
}

/// Whether the CPU has AMX-BF16 and AVX-512, whatever the OS grants.
pub(crate) fn in_cpu() -> bool {
    // CPUID leaf 7 exists on every x86-64 CPU that reports AVX-512 (checked first).
    std::arch::is_x86_feature_detected!("avx512f") && {
        let edx = __cpuid_count(7, 0).edx;
        edx & (1 << 22) != 0 && edx & (1 << 24) != 0
    }
}

#[cfg(target_os = "linux")]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: the request only changes which state this process's threads may use.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> bool {
    false
}

/// The tile configuration (palette 1): tiles 0-3 hold 16 x 16 sums, 4-5 A (16 rows x 16
/// pairs), 6-7 B (16 pairs x 16 columns); every tile 16 rows of 64 bytes.
#[repr(C, align(64))]
struct Config {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: Config = {
    let (mut bytes_per_row, mut rows) = ([0; 16], [0; 16]);
    let mut t = 0;
    while t < 8 {
        (bytes_per_row[t], rows[t]) = (64, 16);
        t += 1;
    }
    Config { palette: 1, start_row: 0, reserved: [0; 14], bytes_per_row, rows }
};

thread_local! {
    /// Whether this thread has loaded [`CONFIG`]. Nothing else in the process uses tiles, and
    /// the OS keeps a thread's configuration across context switches, so each thread loads it
    /// once rather than once per product (attention makes thousands of small ones a step).
    static CONFIGURED: Cell<bool> = const { Cell::new(false) };
}

/// 32 rows by 32 columns of f32, 64-byte aligned for the tile loads and stores.
#[repr(C, align(64))]
struct Block([[f32; NR]; ROWS]);

/// A bias row, 64-byte aligned, zeros past the tile's columns.
#[repr(C, align(64))]
struct Row([f32; NR]);

/// `out (+)= scale · A · B (+ bias)` for `steps` steps of `PAIRS` k-pairs: `a` is `[ROWS][a_rs]`
/// packed pairs, `b` a `[steps · PAIRS][NR]` panel.
///
/// With `scale` 1 and not both `add` and a bias (every product but attention's scores), the sum
/// tiles start from what is added (`dst`, or the bias loaded into all 16 rows with a zero
/// stride) and are stored straight into `dst`: no pass over the sums (that pass and the stack
/// buffer were a third of the kernel's time). A tile at the matrix's edge goes through a
/// staging block in the same way, so every tile of a product adds in the same order.
/// Otherwise the sums start from zero and go through [`Epilogue`].
///
/// # Safety
/// [`usable`] must have returned true; `a` and `b` must hold what they are said to, and `out`
/// address its rows (at most `ROWS`) and columns (at most `NR`).
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn tile(steps: usize, a: *const u32, a_rs: usize, b: *const u32, out: Out) {
    if !CONFIGURED.get() {
        // SAFETY: a valid palette-1 configuration; `usable` granted the state.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly)) };
        CONFIGURED.set(true);
    }
    let direct = out.scale == 1.0 && (!out.add || out.bias.is_null());
    // The sums go straight to `dst` when it holds the whole 32 x 32 block and its rows start
    // on cache lines: a tile row that straddles two lines is 5 times slower to load or store
    // than the staging block and a vector copy (glibc's large blocks start 16 bytes into a page).
    let in_place = direct
        && out.rows == ROWS
        && out.cols == NR
        && (out.ptr as usize).is_multiple_of(64)
        && out.rs.is_multiple_of(16);
    // Not zeroed (4 KiB a call): the tile stores write all of it, and a tile that adds has its
    // rows copied in first.
    let mut stage = std::mem::MaybeUninit::<Block>::uninit();
    let staged = stage.as_mut_ptr() as *mut f32;
    // Where the sum tiles are loaded from and stored to.
    let (c, c_rs) = if in_place { (out.ptr, out.rs) } else { (staged, NR) };
    let masks = row_masks(out.cols);
    // A tile of 16 rows or fewer (a product's last, such as ViT-S/16's 197 tokens = 6 x 32 + 5)
    // runs the top two sum tiles only: half the products of a full one.
    let half = out.rows <= ROWS / 2;
    // SAFETY (all): the caller's contract bounds the rows and columns of `out` (and its bias)
    // that are read and written; the tiles read 16 rows of 64 bytes inside `a`, `b`, `c` or
    // `bias`, and write 16 rows of 64 bytes inside `c`.
    unsafe {
        if direct && out.add {
            if !in_place {
                for i in 0..ROWS {
                    let (from, to) = (out.ptr.add(i * out.rs), staged.add(i * NR));
                    let (m0, m1) = if i < out.rows { masks } else { (0, 0) };
                    _mm512_store_ps(to, _mm512_maskz_loadu_ps(m0, from));
                    _mm512_store_ps(to.add(16), _mm512_maskz_loadu_ps(m1, from.add(16)));
                }
            }
            load_sums(c, c_rs, half);
        } else if direct && !out.bias.is_null() {
            // A whole panel's bias on a cache line (as `gemm_bf16_packed` passes it) is loaded
            // where it lies. A row copied just before the load stalled it (a tile load waits
            // for the copy's stores to reach L1): 9 % of the kernel's samples in ViT-S/16's
            // inference (perf), and the stall went with the copy.
            let mut bias = Row([0.0; NR]);
            let row = if out.cols == NR && (out.bias as usize).is_multiple_of(64) {
                out.bias
            } else {
                bias.0[..out.cols].copy_from_slice(std::slice::from_raw_parts(out.bias, out.cols));
                bias.0.as_ptr()
            };
            // A zero stride loads the bias into every row.
            asm!(
                "tileloadd tmm0, [{left} + {zero}]",
                "tileloadd tmm1, [{right} + {zero}]",
                "tileloadd tmm2, [{left} + {zero}]",
                "tileloadd tmm3, [{right} + {zero}]",
                left = in(reg) row,
                right = in(reg) row.add(16),
                zero = in(reg) 0usize,
                options(nostack, readonly),
            );
        } else {
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
        }
        if half {
            top_steps(steps, a, a_rs, b);
        } else {
            steps_2x2(steps, a, a_rs, b);
        }
        asm!(
            "tilestored [{top} + {stride}], tmm0",
            "tilestored [{top_right} + {stride}], tmm1",
            top = in(reg) c,
            top_right = in(reg) c.add(16),
            stride = in(reg) c_rs * 4,
            options(nostack),
        );
        if !half {
            asm!(
                "tilestored [{bottom} + {stride}], tmm2",
                "tilestored [{bottom_right} + {stride}], tmm3",
                bottom = in(reg) c.add(16 * c_rs),
                bottom_right = in(reg) c.add(16 * c_rs + 16),
                stride = in(reg) c_rs * 4,
                options(nostack),
            );
        }
        if direct && !in_place {
            for i in 0..out.rows {
                let (from, to) = (staged.add(i * NR), out.ptr.add(i * out.rs));
                _mm512_mask_storeu_ps(to, masks.0, _mm512_load_ps(from));
                _mm512_mask_storeu_ps(to.add(16), masks.1, _mm512_load_ps(from.add(16)));
            }
        } else if !direct {
            let epilogue = Epilogue::new(out);
            for (i, row) in stage.assume_init_ref().0.iter().enumerate().take(out.rows) {
                epilogue.store(out, i, _mm512_load_ps(row.as_ptr()), _mm512_load_ps(row.as_ptr().add(16)));
            }
        }
    }
}

/// A closure `|a, b|` running `instructions` on one k-step's tiles: A's top tile at `{a0}` (and
/// with `bottom`, the bottom one that many values on, at `{a1}`), B's left and right tiles at
/// `{b0}` and `{b1}`; the row strides in bytes are `{a_stride}` (A's rows of `a_rs` values) and
/// `{b_stride}`.
macro_rules! on_step {
    ($a_rs:expr $(, bottom = $bottom:expr)?; $($instruction:literal),+) => {
        |a: *const u32, b: *const u32| unsafe {
            asm!(
                $($instruction),+,
                a0 = in(reg) a,
                $(a1 = in(reg) a.add($bottom),)?
                b0 = in(reg) b,
                b1 = in(reg) b.add(16),
                a_stride = in(reg) $a_rs * 4,
                b_stride = in(reg) NR * 4,
                options(nostack, readonly),
            )
        }
    };
}

/// `steps` steps of 32 rows: 2 A tiles by 2 B tiles into the sums in `tmm0..tmm3`.
///
/// # Safety
/// As [`tile`]'s, with the tile state configured.
#[inline(always)]
unsafe fn steps_2x2(steps: usize, a: *const u32, a_rs: usize, b: *const u32) {
    // Tile registers are not renamed: a load waits for the products that read the register
    // before. So each step's products go in the order that frees a register soonest, and the
    // next step's tile is loaded into it right then, while the other products run (in the plain
    // order every load waited for the whole step).
    // SAFETY (all): `pipeline` passes the step's tiles, inside A and B by the caller's contract.
    let load = on_step!(a_rs, bottom = 16 * a_rs;
        "tileloadd tmm4, [{a0} + {a_stride}]",
        "tileloadd tmm6, [{b0} + {b_stride}]",
        "tileloadd tmm7, [{b1} + {b_stride}]",
        "tileloadd tmm5, [{a1} + {a_stride}]"
    );
    let multiply_and_load = on_step!(a_rs, bottom = 16 * a_rs;
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tileloadd tmm4, [{a0} + {a_stride}]",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tileloadd tmm6, [{b0} + {b_stride}]",
        "tdpbf16ps tmm3, tmm5, tmm7",
        "tileloadd tmm7, [{b1} + {b_stride}]",
        "tileloadd tmm5, [{a1} + {a_stride}]"
    );
    let multiply = || unsafe {
        asm!(
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            options(nostack, nomem),
        )
    };
    unsafe { pipeline(steps, a, b, load, multiply_and_load, multiply) }
}

/// `steps` steps of the top 16 rows only: 1 A tile by 2 B tiles into `tmm0` and `tmm1`, in
/// [`steps_2x2`]'s order.
///
/// # Safety
/// As [`tile`]'s, with the tile state configured.
#[inline(always)]
unsafe fn top_steps(steps: usize, a: *const u32, a_rs: usize, b: *const u32) {
    // SAFETY (all): as in `steps_2x2`.
    let load = on_step!(a_rs;
        "tileloadd tmm4, [{a0} + {a_stride}]",
        "tileloadd tmm6, [{b0} + {b_stride}]",
        "tileloadd tmm7, [{b1} + {b_stride}]"
    );
    let multiply_and_load = on_step!(a_rs;
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tileloadd tmm6, [{b0} + {b_stride}]",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tileloadd tmm4, [{a0} + {a_stride}]",
        "tileloadd tmm7, [{b1} + {b_stride}]"
    );
    let multiply =
        || unsafe { asm!("tdpbf16ps tmm0, tmm4, tmm6", "tdpbf16ps tmm1, tmm4, tmm7", options(nostack, nomem)) };
    unsafe { pipeline(steps, a, b, load, multiply_and_load, multiply) }
}

/// The loop of [`steps_2x2`] and [`top_steps`] over `steps` k-steps of A (`PAIRS` pairs each,
/// along a row) and B (`PAIRS` rows of `NR`): `load` takes step 0's tiles, `multiply_and_load`
/// each later step's while the step before is multiplied, `multiply` the last step's; the next
/// panel of B (it follows this one) goes into L1 meanwhile.
///
/// # Safety
/// As [`tile`]'s, with the tile state configured.
#[inline(always)]
unsafe fn pipeline(
    steps: usize,
    a: *const u32,
    b: *const u32,
    load: impl Fn(*const u32, *const u32),
    multiply_and_load: impl Fn(*const u32, *const u32),
    multiply: impl Fn(),
) {
    if steps == 0 {
        return;
    }
    // SAFETY: the caller's contract: A's steps, B's and the panel after it lie in the operands.
    unsafe {
        load(a, b);
        for s in 1..steps {
            let next = b.add((steps + s - 1) * PAIRS * NR) as *const i8;
            for line in (0..PAIRS * NR * 4).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(next.add(line));
            }
            multiply_and_load(a.add(s * PAIRS), b.add(s * PAIRS * NR));
        }
    }
    multiply();
}

/// Loads the sum tiles from the 32 x 32 block at `c` (row stride `c_rs` values): the top two
/// only when `top` (16 rows).
///
/// # Safety
/// The tile state must be configured, and `c` address the block (its top half when `top`).
#[inline(always)]
unsafe fn load_sums(c: *const f32, c_rs: usize, top: bool) {
    unsafe {
        asm!(
            "tileloadd tmm0, [{left} + {stride}]",
            "tileloadd tmm1, [{right} + {stride}]",
            left = in(reg) c,
            right = in(reg) c.add(16),
            stride = in(reg) c_rs * 4,
            options(nostack, readonly),
        );
        if !top {
            asm!(
                "tileloadd tmm2, [{left} + {stride}]",
                "tileloadd tmm3, [{right} + {stride}]",
                left = in(reg) c.add(16 * c_rs),
                right = in(reg) c.add(16 * c_rs + 16),
                stride = in(reg) c_rs * 4,
                options(nostack, readonly),
            );
        }
    }
}
