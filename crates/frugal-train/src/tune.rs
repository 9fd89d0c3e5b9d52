//! Tuning grids for `frugal compare --tune`: the grid of optimizer settings each method is tried
//! with, and the budgets of successive halving (every candidate trains a short prefix of the
//! full schedule, the best 1/rate go on to a longer one, until one finishes the whole run).

use anyhow::{bail, Context, Result};

/// Optimizer settings and the values to try for each; every combination is a candidate.
/// Values given for one method (`lora:lr=...`) replace the shared ones for that method.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Grid {
    axes: Vec<(String, Vec<String>)>,
    /// (method name, setting, values).
    by_method: Vec<(String, String, Vec<String>)>,
}

impl Grid {
    /// Parses `key=v1,v2,...` flags, one per setting, or `method:key=v1,v2,...` for the
    /// methods of that name (the spec before its `:`).
    pub fn parse(flags: &[String]) -> Result<Self> {
        let mut grid = Grid::default();
        for flag in flags {
            let (key, values) = flag.split_once('=').with_context(|| {
                format!("--tune `{flag}`: expected key=v1,v2,... (e.g. lr=1e-3,3e-3,1e-2)")
            })?;
            let (method, key) = match key.split_once(':') {
                Some((m, k)) => (Some(m.trim().to_string()), k),
                None => (None, key),
            };
            let key = key.trim().replace('-', "_");
            let values: Vec<String> = values
                .split(',')
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .collect();
            if key.is_empty() || values.is_empty() || method.as_deref() == Some("") {
                bail!("--tune `{flag}`: name a setting and at least one value");
            }
            let twice = match &method {
                None => grid.axes.iter().any(|(k, _)| *k == key),
                Some(m) => grid.by_method.iter().any(|(bm, k, _)| bm == m && *k == key),
            };
            if twice {
                bail!("--tune names `{key}` twice; give all its values in one flag");
            }
            match method {
                None => grid.axes.push((key, values)),
                Some(m) => grid.by_method.push((m, key, values)),
            }
        }
        Ok(grid)
    }

    /// The grid of the method `spec` (its name is the part before `:`): the shared settings,
    /// with those given for that method in their place.
    pub fn for_method(&self, spec: &str) -> Grid {
        let name = spec.split(':').next().unwrap_or(spec).trim();
        let mut axes = self.axes.clone();
        for (_, key, values) in self.by_method.iter().filter(|(m, _, _)| m == name) {
            match axes.iter_mut().find(|(k, _)| k == key) {
                Some(axis) => axis.1 = values.clone(),
                None => axes.push((key.clone(), values.clone())),
            }
        }
        Grid {
            axes,
            by_method: Vec::new(),
        }
    }

    /// True if nothing is tuned.
    pub fn is_empty(&self) -> bool {
        self.axes.is_empty() && self.by_method.is_empty()
    }

    /// True if `key` is one of the tuned settings (of any method).
    pub fn tunes(&self, key: &str) -> bool {
        self.axes.iter().any(|(k, _)| k == key) || self.by_method.iter().any(|(_, k, _)| k == key)
    }

    /// Every combination of values as `(key, value)` pairs, the first setting varying slowest.
    pub fn points(&self) -> Vec<Vec<(String, String)>> {
        let mut points = vec![Vec::new()];
        for (key, values) in &self.axes {
            points = points
                .into_iter()
                .flat_map(|p| {
                    values.iter().map(move |v| {
                        let mut q = p.clone();
                        q.push((key.clone(), v.clone()));
                        q
                    })
                })
                .collect();
        }
        points
    }
}

/// One round of successive halving: how many candidates train up to which step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Rung {
    pub steps: usize,
    pub candidates: usize,
}

/// The rounds for `candidates` grid points over a run of `steps`: the last round trains one
/// candidate for all the steps, each earlier one trains `rate` times as many for 1/`rate` of the
/// steps (rounded up). `rate` 1 trains every candidate for the whole run.
pub fn rungs(candidates: usize, steps: usize, rate: usize) -> Result<Vec<Rung>> {
    if candidates == 0 || steps == 0 {
        bail!("a tuning grid needs at least one candidate and one step");
    }
    if rate == 0 {
        bail!("--halving-rate must be at least 1 (1: no halving, every candidate runs in full)");
    }
    if rate == 1 || candidates == 1 {
        return Ok(vec![Rung { steps, candidates }]);
    }
    let mut rounds = 0;
    let mut reach = 1usize;
    while reach < candidates {
        reach = reach.saturating_mul(rate);
        rounds += 1;
    }
    let mut out: Vec<Rung> = Vec::new();
    let mut alive = candidates;
    for j in 0..=rounds {
        let divisor = rate.saturating_pow((rounds - j) as u32);
        let budget = steps.div_ceil(divisor).max(1);
        match out.last_mut() {
            // Too few steps to separate the rounds: merge into the later one.
            Some(last) if last.steps == budget => last.candidates = last.candidates.max(alive),
            _ => out.push(Rung {
                steps: budget,
                candidates: alive,
            }),
        }
        alive = alive.div_ceil(rate);
    }
    Ok(out)
}

/// Indices of the `keep` best scores (lowest first; a missing score ranks last, ties keep grid
/// order).
pub fn best(scores: &[Option<f64>], keep: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| {
        let key = |i: usize| scores[i].filter(|x| x.is_finite()).unwrap_or(f64::INFINITY);
        key(a).total_cmp(&key(b)).then(a.cmp(&b))
    });
    order.truncate(keep);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grid_is_every_combination() {
        let g = Grid::parse(&["lr=1e-3,1e-2".into(), "proj-lr-scale=0.25, 1".into()]).unwrap();
        let names: Vec<String> = g
            .points()
            .iter()
            .map(|p| {
                p.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect();
        assert_eq!(
            names,
            [
                "lr=1e-3,proj_lr_scale=0.25",
                "lr=1e-3,proj_lr_scale=1",
                "lr=1e-2,proj_lr_scale=0.25",
                "lr=1e-2,proj_lr_scale=1"
            ]
        );
        assert!(g.tunes("proj_lr_scale") && !g.tunes("density"));
        for bad in ["lr", "lr=", "=1"] {
            assert!(Grid::parse(&[bad.into()]).is_err(), "{bad}");
        }
        let twice = Grid::parse(&["lr=1".into(), "lr=2".into()]).unwrap_err();
        assert!(twice.to_string().contains("twice"), "{twice}");
        // A method's own values replace the shared ones for that method only.
        let g = Grid::parse(&[
            "lr=1,2".into(),
            "lora:lr=5,6,7".into(),
            "lora:rank=4".into(),
        ])
        .unwrap();
        let lrs = |spec: &str| g.for_method(spec).points().len();
        assert_eq!((lrs("adamw"), lrs("lora:alpha=8"), lrs("lora")), (2, 3, 3));
        assert_eq!(
            g.for_method("lora").points()[0],
            [
                ("lr".to_string(), "5".to_string()),
                ("rank".to_string(), "4".to_string())
            ]
        );
        assert!(g.tunes("rank") && !g.for_method("adamw").tunes("rank"));
        assert!(Grid::parse(&[":lr=1".into()]).is_err());
    }

    #[test]
    fn halving_rounds_shrink_the_field_and_end_with_the_full_run() {
        let r = |c, s, k| rungs(c, s, k).unwrap();
        let pairs = |v: Vec<Rung>| {
            v.iter()
                .map(|r| (r.steps, r.candidates))
                .collect::<Vec<_>>()
        };
        assert_eq!(pairs(r(9, 900, 3)), [(100, 9), (300, 3), (900, 1)]);
        assert_eq!(pairs(r(6, 600, 3)), [(67, 6), (200, 2), (600, 1)]);
        assert_eq!(pairs(r(6, 600, 2)), [(75, 6), (150, 3), (300, 2), (600, 1)]);
        assert_eq!(pairs(r(6, 600, 1)), [(600, 6)]);
        assert_eq!(pairs(r(1, 600, 3)), [(600, 1)]);
        // Three steps cannot hold four rounds: equal budgets merge.
        assert_eq!(pairs(r(9, 3, 3)), [(1, 9), (3, 1)]);
        assert!(rungs(4, 10, 0).is_err());
    }

    #[test]
    fn the_best_scores_survive_and_failures_rank_last() {
        let s = [
            Some(3.0),
            None,
            Some(1.0),
            Some(f64::NAN),
            Some(2.0),
            Some(1.0),
        ];
        assert_eq!(best(&s, 3), [2, 5, 4]);
        assert_eq!(best(&s, 6)[3..], [0, 1, 3]);
    }
}
