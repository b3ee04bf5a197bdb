//! Per-iteration and per-epoch schedules, exactly as the official `utils.cosine_scheduler` and
//! `DINOLoss.teacher_temp_schedule`.

/// `utils.cosine_scheduler`: a linear warmup from `start_warmup_value` to `base` over
/// `warmup_epochs * iters_per_epoch` iterations (numpy `linspace`, both ends included), then a
/// cosine from `base` to `final_value` over the remaining iterations. One value per iteration.
pub fn cosine_schedule(
    base: f64,
    final_value: f64,
    epochs: usize,
    iters_per_epoch: usize,
    warmup_epochs: usize,
    start_warmup_value: f64,
) -> Vec<f64> {
    let total = epochs * iters_per_epoch;
    let warmup = (warmup_epochs * iters_per_epoch).min(total);
    let mut schedule = linspace(start_warmup_value, base, warmup);
    let decay = total - warmup;
    schedule.extend((0..decay).map(|i| {
        let t = std::f64::consts::PI * i as f64 / decay as f64;
        final_value + 0.5 * (base - final_value) * (1.0 + t.cos())
    }));
    schedule
}

/// `np.linspace(start, end, n)`: `n` values, both ends included (one value: `start`).
fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    match n {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (end - start) / (n - 1) as f64;
            // numpy computes start + i * step and pins the last value to `end`.
            (0..n).map(|i| if i == n - 1 { end } else { start + i as f64 * step }).collect()
        }
    }
}

/// The teacher temperature of each epoch: a linear warmup from `warmup_temp` to `temp` over
/// `warmup_epochs` epochs, then constant.
pub fn teacher_temp_schedule(warmup_temp: f64, temp: f64, warmup_epochs: usize, epochs: usize) -> Vec<f64> {
    let mut schedule = linspace(warmup_temp, temp, warmup_epochs.min(epochs));
    schedule.resize(epochs, temp);
    schedule
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = cosine_schedule(1.0, 0.0, 3, 2, 1, 0.0);
        assert_eq!(s.len(), 6);
        assert_eq!(&s[..2], &[0.0, 1.0]);
        assert_eq!(s[2], 1.0);
        assert!((s[4] - 0.5).abs() < 1e-12);
        assert!(s[5] > 0.0 && s[5] < 0.5);
    }

    #[test]
    fn teacher_temperature_warms_up_per_epoch() {
        assert_eq!(teacher_temp_schedule(0.04, 0.07, 0, 2), vec![0.07, 0.07]);
        let t = teacher_temp_schedule(0.04, 0.07, 4, 5);
        assert_eq!((t[0], t[3], t[4]), (0.04, 0.07, 0.07));
    }
}
