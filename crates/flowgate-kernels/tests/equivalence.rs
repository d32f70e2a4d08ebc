//! Every kernel at every level this CPU has equals the one-element-at-a-time reference:
//! exactly for min, max, counts and scale+offset; within rounding for sums.

use flowgate_kernels::{available_levels, count_where_with, reference, scale_offset_with, stats_with, Cmp};
use proptest::prelude::*;

fn values() -> impl Strategy<Value = Vec<f64>> {
    proptest::collection::vec(
        prop_oneof![
            -1e9f64..1e9,
            -1.0f64..1.0,
            Just(0.0),
            Just(-0.0),
            Just(1e300),
            Just(-1e300),
            (-5i32..5i32).prop_map(f64::from)
        ],
        0..2000,
    )
}

proptest! {
    #[test]
    fn stats_match_the_reference(x in values()) {
        let (sum, lo, hi) = reference::sum_min_max(&x);
        let abs: f64 = x.iter().map(|v| v.abs()).sum();
        for level in available_levels() {
            let s = stats_with(level, &x);
            prop_assert_eq!(s.count, x.len());
            if x.is_empty() {
                prop_assert_eq!(s.min, None);
                prop_assert_eq!(s.mean, None);
                prop_assert_eq!(s.sum, 0.0);
                continue;
            }
            // Exact up to the sign of zero, which min/max may pick either way.
            prop_assert!(s.min.unwrap() == lo, "{:?} min {:?} != {}", level, s.min, lo);
            prop_assert!(s.max.unwrap() == hi, "{:?} max {:?} != {}", level, s.max, hi);
            let tolerance = abs * f64::EPSILON * x.len() as f64;
            prop_assert!((s.sum - sum).abs() <= tolerance, "{:?} sum {} vs {} (tolerance {})", level, s.sum, sum, tolerance);
        }
    }

    #[test]
    fn counts_match_exactly(x in values(), t in -10.0f64..10.0) {
        for cmp in [Cmp::Gt, Cmp::Ge, Cmp::Lt, Cmp::Le, Cmp::Eq] {
            let expected = reference::count_where(&x, cmp, t.round());
            for level in available_levels() {
                prop_assert_eq!(count_where_with(level, &x, cmp, t.round()), expected, "{:?} {:?}", level, cmp);
            }
        }
    }

    #[test]
    fn scale_offset_matches_bit_for_bit(x in values(), s in -100.0f64..100.0, o in -100.0f64..100.0) {
        let expected: Vec<u64> = x.iter().map(|v| (v * s + o).to_bits()).collect();
        for level in available_levels() {
            let mut out = vec![7.0; 3];
            scale_offset_with(level, &x, s, o, &mut out);
            let got: Vec<u64> = out.iter().map(|v| v.to_bits()).collect();
            prop_assert_eq!(&got, &expected, "{:?}", level);
        }
    }
}
