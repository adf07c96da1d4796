//! Summaries of repeated runs: the median as the figure, min–max as the
//! spread. With 3 to 7 samples a median is robust to one slow outlier (a
//! noisy neighbour, a page-cache miss) where a mean is not, and min–max
//! shows the whole range honestly where an IQR of 3 samples would mean
//! little.

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

/// Median of `samples`; for an even count, the mean of the middle two.
/// `None` for no samples or any NaN, which no measurement may produce.
pub fn median(samples: &[f64]) -> Option<f64> {
    let sorted = sorted(samples)?;
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    })
}

pub fn summarize(samples: &[f64]) -> Option<Summary> {
    let sorted = sorted(samples)?;
    Some(Summary {
        median: median(&sorted)?,
        min: sorted[0],
        max: sorted[sorted.len() - 1],
        runs: sorted.len(),
    })
}

fn sorted(samples: &[f64]) -> Option<Vec<f64>> {
    if samples.is_empty() || samples.iter().any(|s| s.is_nan()) {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_count_is_the_middle_value() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[7.0]), Some(7.0));
        assert_eq!(median(&[5.0, 100.0, 4.0, 6.0, 1.0, 3.0, 2.0]), Some(4.0));
    }

    #[test]
    fn median_of_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn median_ignores_one_outlier() {
        assert_eq!(median(&[10.0, 11.0, 1000.0]), Some(11.0));
    }

    #[test]
    fn empty_or_nan_has_no_summary() {
        assert_eq!(median(&[]), None);
        assert_eq!(summarize(&[]), None);
        assert_eq!(summarize(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn summary_has_min_max_and_count() {
        let s = summarize(&[12.0, 10.0, 11.0, 15.0, 9.0]).unwrap();
        assert_eq!(
            s,
            Summary {
                median: 11.0,
                min: 9.0,
                max: 15.0,
                runs: 5
            }
        );
    }
}
