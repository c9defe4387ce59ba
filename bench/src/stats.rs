//! Percentiles and medians over sorted vectors (no histogram library).

/// The p-th percentile (0..=100) of `v` by nearest rank; `v` sorted.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v
}

/// Median of `v` (NaN when empty).
pub fn median(v: &[f64]) -> f64 {
    let s = sorted(v.to_vec());
    if s.is_empty() {
        return f64::NAN;
    }
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

/// Jain's fairness index of the shares `x`: (sum x)^2 / (n * sum x^2);
/// 1 when all are equal, 1/n when one takes everything (NaN when empty or
/// all zero).
pub fn jain(x: &[f64]) -> f64 {
    let sum: f64 = x.iter().sum();
    let sum_sq: f64 = x.iter().map(|v| v * v).sum();
    sum * sum / (x.len() as f64 * sum_sq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jain_is_one_for_equal_shares_and_one_over_n_for_a_hog() {
        assert_eq!(jain(&[5.0; 8]), 1.0);
        let mut hog = [0.0; 8];
        hog[3] = 40.0;
        assert_eq!(jain(&hog), 1.0 / 8.0);
        // Half the streams at twice the others' rate: 36 / (4 * 20) = 0.9.
        assert!((jain(&[2.0, 2.0, 1.0, 1.0]) - 0.9).abs() < 1e-12);
        assert!(jain(&[]).is_nan());
    }
}
