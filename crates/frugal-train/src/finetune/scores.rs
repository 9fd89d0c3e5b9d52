//! Classification scores: accuracy and macro-F1.

use serde::{Deserialize, Serialize};

/// How well predictions match the labels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    pub accuracy: f64,
    /// The mean F1 over the classes that occur in the labels or the predictions.
    pub macro_f1: f64,
}

impl Scores {
    /// The scores of `predicted` against `labels` over `classes` classes.
    pub fn of(predicted: &[u32], labels: &[u32], classes: usize) -> Self {
        let n = labels.len().max(1) as f64;
        let correct = predicted.iter().zip(labels).filter(|(p, l)| p == l).count();
        let (mut tp, mut fp, mut fneg) = (
            vec![0usize; classes],
            vec![0usize; classes],
            vec![0usize; classes],
        );
        for (&p, &l) in predicted.iter().zip(labels) {
            if p == l {
                tp[l as usize] += 1;
            } else {
                fp[p as usize] += 1;
                fneg[l as usize] += 1;
            }
        }
        let f1s: Vec<f64> = (0..classes)
            .filter(|&c| tp[c] + fp[c] + fneg[c] > 0)
            .map(|c| 2.0 * tp[c] as f64 / (2 * tp[c] + fp[c] + fneg[c]) as f64)
            .collect();
        Scores {
            accuracy: correct as f64 / n,
            macro_f1: f1s.iter().sum::<f64>() / f1s.len().max(1) as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn always_the_majority_class_scores_its_share_but_a_low_macro_f1() {
        // 78% negative (class 0), always answered negative.
        let labels: Vec<u32> = (0..100).map(|i| (i >= 78) as u32).collect();
        let s = Scores::of(&[0; 100], &labels, 2);
        assert!((s.accuracy - 0.78).abs() < 1e-12);
        // F1(neg) = 2·78 / (2·78 + 22) = 0.8764…, F1(pos) = 0.
        assert!(
            (s.macro_f1 - (156.0 / 178.0) / 2.0).abs() < 1e-12,
            "{}",
            s.macro_f1
        );
        let perfect = Scores::of(&labels, &labels, 2);
        assert_eq!((perfect.accuracy, perfect.macro_f1), (1.0, 1.0));
    }

    #[test]
    fn macro_f1_by_hand_over_three_classes() {
        let labels = [0, 0, 1, 1, 2, 2];
        let predicted = [0, 1, 1, 1, 0, 2];
        // class 0: tp 1, fp 1, fn 1 → 0.5; class 1: tp 2, fp 1, fn 0 → 0.8; class 2: tp 1, fn 1 → 2/3.
        let s = Scores::of(&predicted, &labels, 3);
        assert!((s.macro_f1 - (0.5 + 0.8 + 2.0 / 3.0) / 3.0).abs() < 1e-12);
        assert!((s.accuracy - 4.0 / 6.0).abs() < 1e-12);
    }
}
