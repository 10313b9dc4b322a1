//! Weighted, deterministic picking, built once per change and read without a lock.
//!
//! The schedule is computed up front by earliest-deadline-first over the weights (endpoint `i`
//! is due at `k / w_i` for its k-th pick), which spreads each endpoint's picks evenly across
//! the cycle. Over one full cycle of `sum(w)` picks, endpoint `i` is picked exactly `w_i` times.
//! A request then costs one atomic increment and an index.

use std::{
    cmp::Ordering as CmpOrdering,
    collections::BinaryHeap,
    sync::atomic::{AtomicUsize, Ordering},
};

/// The longest schedule kept; larger weight sums are scaled down to fit (each endpoint keeps
/// at least one slot), trading exactness for bounded memory.
pub const MAX_SCHEDULE: usize = 1 << 16;

/// A weighted round-robin over `items`.
#[derive(Debug)]
pub struct Picker<T> {
    items: Vec<T>,
    schedule: Vec<u32>,
    next: AtomicUsize,
}

impl<T> Picker<T> {
    /// Builds the schedule for `items` with `weights` (same length; zero weights never picked).
    /// `start` offsets the first pick, so that many clients do not all begin with one endpoint.
    pub fn new(items: Vec<T>, weights: &[u32], start: usize) -> Self {
        assert_eq!(items.len(), weights.len(), "one weight per item");
        let schedule = schedule(weights);
        let start = if schedule.is_empty() { 0 } else { start % schedule.len() };
        Self {
            items,
            schedule,
            next: AtomicUsize::new(start),
        }
    }

    /// The next item, or `None` when no item has a weight.
    pub fn pick(&self) -> Option<&T> {
        if self.schedule.is_empty() {
            return None;
        }
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % self.schedule.len();
        self.items.get(self.schedule[slot] as usize)
    }

    /// The next item for which `accept` holds, looking at most one cycle ahead.
    pub fn pick_where(&self, accept: impl Fn(&T) -> bool) -> Option<&T> {
        for _ in 0..self.schedule.len().min(self.items.len() * 2 + 1) {
            let item = self.pick()?;
            if accept(item) {
                return Some(item);
            }
        }
        // Unlucky so far: look through the whole cycle once.
        self.schedule
            .iter()
            .map(|index| &self.items[*index as usize])
            .find(|item| accept(item))
    }

    /// Every item, those of weight 0 included.
    pub fn items(&self) -> &[T] {
        &self.items
    }

    /// Whether nothing can be picked (no item has a weight).
    pub fn is_empty(&self) -> bool {
        self.schedule.is_empty()
    }

    /// Picks in one full cycle.
    pub fn cycle_len(&self) -> usize {
        self.schedule.len()
    }
}

/// The pick order for one cycle: EDF over `weights`, reduced by their gcd.
fn schedule(weights: &[u32]) -> Vec<u32> {
    let divisor = weights.iter().copied().filter(|w| *w > 0).fold(0, gcd);
    if divisor == 0 {
        return Vec::new();
    }
    let mut reduced: Vec<u64> = weights.iter().map(|w| u64::from(w / divisor)).collect();
    let total: u64 = reduced.iter().sum();
    if total > MAX_SCHEDULE as u64 {
        for w in reduced.iter_mut().filter(|w| **w > 0) {
            *w = ((u128::from(*w) * MAX_SCHEDULE as u128 / u128::from(total)) as u64).max(1);
        }
    }
    let total: u64 = reduced.iter().sum();

    let mut due: BinaryHeap<Due> = reduced
        .iter()
        .enumerate()
        .filter(|(_, w)| **w > 0)
        .map(|(index, w)| Due {
            picks: 1,
            weight: *w,
            index: index as u32,
        })
        .collect();
    let mut order = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let Some(mut first) = due.pop() else { break };
        order.push(first.index);
        first.picks += 1;
        due.push(first);
    }
    order
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// An endpoint's next deadline, `picks / weight`, compared exactly as fractions; ties go to
/// the lower index so that the schedule is deterministic.
#[derive(Debug, PartialEq, Eq)]
struct Due {
    picks: u64,
    weight: u64,
    index: u32,
}

impl Ord for Due {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        // BinaryHeap pops the greatest: the earliest deadline must compare greatest.
        let mine = u128::from(self.picks) * u128::from(other.weight);
        let theirs = u128::from(other.picks) * u128::from(self.weight);
        theirs.cmp(&mine).then_with(|| other.index.cmp(&self.index))
    }
}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Picks `cycles` full cycles from an arbitrary start and counts per item.
    fn counts(weights: &[u32], cycles: usize, start: usize) -> Vec<usize> {
        let picker = Picker::new((0..weights.len()).collect(), weights, start);
        let mut counts = vec![0; weights.len()];
        for _ in 0..cycles * picker.cycle_len() {
            counts[*picker.pick().unwrap()] += 1;
        }
        counts
    }

    fn assert_exact(weights: &[u32], cycles: usize) {
        let divisor = weights.iter().copied().filter(|w| *w > 0).fold(0, gcd);
        for start in [0, 1, 7, 12345] {
            let counts = counts(weights, cycles, start);
            for (i, (count, weight)) in counts.iter().zip(weights).enumerate() {
                let expected = cycles * (*weight / divisor) as usize;
                assert!(
                    count.abs_diff(expected) <= 1,
                    "item {i} of weight {weight}: {count} picks, expected {expected}"
                );
            }
        }
    }

    #[test]
    fn equal_weights_are_picked_equally() {
        assert_exact(&[100, 100, 100], 50);
        let counts = counts(&[1, 1, 1], 1, 0);
        assert_eq!(counts, [1, 1, 1]);
    }

    #[test]
    fn weights_one_two_seven_are_picked_one_two_seven() {
        assert_exact(&[1, 2, 7], 100);
        assert_eq!(counts(&[10, 20, 70], 1, 3), [1, 2, 7]);
    }

    #[test]
    fn a_thousand_endpoints_of_mixed_weights_are_exact() {
        let weights: Vec<u32> = (0..1000).map(|i| 1 + (i * 7919 % 100) as u32).collect();
        assert_exact(&weights, 3);
    }

    #[test]
    fn zero_weight_is_never_picked() {
        let counts = counts(&[0, 3, 0, 1], 10, 0);
        assert_eq!(counts, [0, 30, 0, 10]);
        let none: Picker<u8> = Picker::new(vec![1, 2], &[0, 0], 0);
        assert!(none.pick().is_none() && none.is_empty());
    }

    #[test]
    fn picks_are_spread_not_bunched() {
        // 1:2:7 gives no run of the heavy endpoint longer than its fair share allows.
        let picker = Picker::new(vec![0, 1, 2], &[1, 2, 7], 0);
        let order: Vec<usize> = (0..10).map(|_| *picker.pick().unwrap()).collect();
        let longest_run = order.windows(4).filter(|w| w.iter().all(|i| *i == 2)).count();
        assert_eq!(longest_run, 0, "{order:?}");
    }

    #[test]
    fn huge_weight_sums_are_scaled_into_a_bounded_schedule() {
        let picker = Picker::new(vec![0, 1], &[u32::MAX, u32::MAX / 3 + 7], 0);
        assert!(picker.cycle_len() <= MAX_SCHEDULE + 2);
        let mut counts = [0usize; 2];
        for _ in 0..picker.cycle_len() {
            counts[*picker.pick().unwrap()] += 1;
        }
        let share = counts[1] as f64 / (counts[0] + counts[1]) as f64;
        assert!((share - 0.25).abs() < 0.001, "{share}");
    }

    #[test]
    fn pick_where_skips_refused_items() {
        let picker = Picker::new(vec![0, 1, 2], &[1, 1, 1], 0);
        for _ in 0..10 {
            assert_ne!(picker.pick_where(|i| *i != 1), Some(&1));
        }
        assert_eq!(picker.pick_where(|_| false), None);
    }

    #[test]
    fn shares_over_100_000_picks_are_within_one_percent_of_the_weights() {
        // Weights as the policies publish them: Static annotations 1:3, LoadReport weights
        // scaled to a mean of 100 (capacities 1:1:2, one endpoint without reports at the mean),
        // and a slow-start ramp's weight x percent.
        for weights in [
            vec![1, 3],
            vec![75, 75, 150, 100],
            vec![100 * 37, 100 * 100, 100 * 100],
            vec![7, 7919, 613],
        ] {
            let picker = Picker::new((0..weights.len()).collect(), &weights, 12345);
            let mut picks = vec![0u32; weights.len()];
            for _ in 0..100_000 {
                picks[*picker.pick().unwrap()] += 1;
            }
            let total: u32 = weights.iter().sum();
            for (count, weight) in picks.iter().zip(&weights) {
                let share = f64::from(*count) / 100_000.0;
                let expected = f64::from(*weight) / f64::from(total);
                assert!((share - expected).abs() < 0.01, "weights {weights:?}: picks {picks:?}");
            }
        }
    }
}
