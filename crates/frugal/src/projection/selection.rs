//! Coordinate subspaces: a sorted set of entries of an m×n matrix (whole columns, whole rows or
//! single entries). The moment slot of a selected entry is its rank among the selected entries,
//! so moments are stored densely in row-major order of the selected entries.

/// Which structure the selected coordinates have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Axis {
    /// `idx` are column indices; every row keeps those columns.
    Columns,
    /// `idx` are row indices; those rows are kept whole.
    Rows,
    /// `idx` are flat row-major entry indices.
    Entries,
}

/// A sorted set of coordinates of an m×n matrix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    pub axis: Axis,
    /// Sorted, distinct indices (meaning depends on `axis`).
    pub idx: Vec<u32>,
    pub m: usize,
    pub n: usize,
}

impl Selection {
    /// Builds a selection; sorts and checks the indices.
    pub fn new(axis: Axis, mut idx: Vec<u32>, m: usize, n: usize) -> Self {
        idx.sort_unstable();
        idx.dedup();
        let bound = match axis {
            Axis::Columns => n,
            Axis::Rows => m,
            Axis::Entries => m * n,
        };
        assert!(idx.last().is_none_or(|&i| (i as usize) < bound));
        Selection { axis, idx, m, n }
    }

    /// Number of selected entries (= moment slots per moment buffer).
    pub fn count(&self) -> usize {
        match self.axis {
            Axis::Columns => self.idx.len() * self.m,
            Axis::Rows => self.idx.len() * self.n,
            Axis::Entries => self.idx.len(),
        }
    }

    /// Shape of the low-dimensional gradient down(G).
    pub fn low_shape(&self) -> (usize, usize) {
        match self.axis {
            Axis::Columns => (self.m, self.idx.len()),
            Axis::Rows => (self.idx.len(), self.n),
            Axis::Entries => (1, self.idx.len()),
        }
    }

    /// Number of selected entries at flat positions < `pos` (0 ≤ pos ≤ m·n).
    pub fn rank_before(&self, pos: usize) -> usize {
        let below = |x: usize| self.idx.partition_point(|&i| (i as usize) < x);
        match self.axis {
            Axis::Entries => below(pos),
            Axis::Columns => (pos / self.n) * self.idx.len() + below(pos % self.n),
            Axis::Rows => {
                let (row, col) = (pos / self.n, pos % self.n);
                let whole = below(row);
                let partial = if self.idx.get(whole) == Some(&(row as u32)) {
                    col
                } else {
                    0
                };
                whole * self.n + partial
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts and ranks agree with a brute-force enumeration for every axis.
    #[test]
    fn ranks_match_brute_force() {
        let (m, n) = (5, 7);
        for sel in [
            Selection::new(Axis::Columns, vec![6, 1, 3], m, n),
            Selection::new(Axis::Rows, vec![4, 0], m, n),
            Selection::new(Axis::Entries, vec![0, 9, 10, 34, 17], m, n),
        ] {
            let selected: Vec<usize> = (0..m * n)
                .filter(|&p| {
                    let (i, j) = (p / n, p % n);
                    match sel.axis {
                        Axis::Columns => sel.idx.contains(&(j as u32)),
                        Axis::Rows => sel.idx.contains(&(i as u32)),
                        Axis::Entries => sel.idx.contains(&(p as u32)),
                    }
                })
                .collect();
            assert_eq!(selected.len(), sel.count());
            for pos in 0..=m * n {
                let expect = selected.iter().filter(|&&p| p < pos).count();
                assert_eq!(sel.rank_before(pos), expect, "{:?} pos {pos}", sel.axis);
            }
        }
    }
}
