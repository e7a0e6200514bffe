//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016, section 3.4), with weights. Pure: no I/O, so it is unit-tested and
//! benchmarked on its own; the controller pushes the slots that changed to the `lb_maglev` map.
//!
//! Each backend walks its own permutation of the table's slots (offset + j·skip mod M, with M
//! prime so every skip visits every slot) and claims the next free slot when its turn comes.
//! With equal weights every backend gets a turn per round, so shares differ by at most one
//! slot; with weights, a backend earns `weight` credits a round and takes a turn per
//! `max weight` credits, so its share is proportional to its weight.

/// The default table size: a prime, as the paper recommends (M ≫ 100·N).
pub const DEFAULT_SIZE: u32 = 65537;

/// A slot with no backend (there were no backends with weight > 0).
pub const EMPTY: u32 = u32::MAX;

/// Why a table cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    /// Maglev needs a prime table size for every permutation to cover the table.
    #[error("Maglev table size {0} is not a prime")]
    SizeNotPrime(u32),
    /// More backends with weight than slots.
    #[error("{backends} weighted backends do not fit a table of {size} slots")]
    TooManyBackends { backends: usize, size: u32 },
}

/// One backend as Maglev sees it: a stable name (its permutation derives from it) and a weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Weighted {
    /// Stable identity, e.g. "10.99.0.3:80": the same name yields the same permutation.
    pub name: String,
    /// Relative share of new flows; 0 keeps the backend out of the table (drain).
    pub weight: u32,
}

/// A built table: for each slot, the index of its backend in the input, or [`EMPTY`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    slots: Vec<u32>,
}

impl Table {
    /// Builds the table of `size` slots for `backends`.
    pub fn build(backends: &[Weighted], size: u32) -> Result<Self, MaglevError> {
        if !is_prime(size) {
            return Err(MaglevError::SizeNotPrime(size));
        }
        let m = u64::from(size);
        let active: Vec<usize> = (0..backends.len())
            .filter(|&i| backends[i].weight > 0)
            .collect();
        if active.len() > size as usize {
            return Err(MaglevError::TooManyBackends {
                backends: active.len(),
                size,
            });
        }
        let mut slots = vec![EMPTY; size as usize];
        if active.is_empty() {
            return Ok(Self { slots });
        }
        let max_weight = active
            .iter()
            .map(|&i| u64::from(backends[i].weight))
            .max()
            .unwrap_or(1);
        // (offset, skip, next j, credit) per active backend.
        let mut walk: Vec<(u64, u64, u64, u64)> = active
            .iter()
            .map(|&i| {
                let name = backends[i].name.as_bytes();
                let offset = hash(name, 0x5eed_0ff5) % m;
                let skip = hash(name, 0x5eed_5c1b) % (m - 1) + 1;
                (offset, skip, 0, 0)
            })
            .collect();
        let mut filled = 0u64;
        loop {
            for (k, &i) in active.iter().enumerate() {
                let w = &mut walk[k];
                w.3 += u64::from(backends[i].weight);
                if w.3 < max_weight {
                    continue;
                }
                w.3 -= max_weight;
                loop {
                    let slot = ((w.0 + w.2 * w.1) % m) as usize;
                    w.2 += 1;
                    if slots[slot] == EMPTY {
                        slots[slot] = i as u32;
                        filled += 1;
                        break;
                    }
                }
                if filled == m {
                    return Ok(Self { slots });
                }
            }
        }
    }

    /// The backend index of every slot.
    pub fn slots(&self) -> &[u32] {
        &self.slots
    }

    /// How many slots each of `backends` backends owns.
    pub fn shares(&self, backends: usize) -> Vec<usize> {
        let mut shares = vec![0; backends];
        for &slot in &self.slots {
            if let Some(share) = shares.get_mut(slot as usize) {
                *share += 1;
            }
        }
        shares
    }
}

/// The slots whose value differs between `old` and `new` (of equal length), as
/// (slot, new value): what to write to the datapath. A missing `old` means every slot.
pub fn changed_slots(old: Option<&[u32]>, new: &[u32]) -> Vec<(u32, u32)> {
    new.iter()
        .enumerate()
        .filter(|(i, v)| old.and_then(|o| o.get(*i)) != Some(v))
        .map(|(i, v)| (i as u32, *v))
        .collect()
}

/// FNV-1a over the seed and the name, then the splitmix64 finaliser to spread the bits.
fn hash(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Trial division: table sizes are at most a few million.
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while u64::from(d) * u64::from(d) <= u64::from(n) {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: usize) -> Vec<Weighted> {
        (0..n)
            .map(|i| Weighted {
                name: format!("10.{}.{}.{}:80", i / 65536, (i / 256) % 256, i % 256),
                weight: 1,
            })
            .collect()
    }

    #[test]
    fn rejects_a_size_that_is_not_prime() {
        assert_eq!(
            Table::build(&backends(3), 65536),
            Err(MaglevError::SizeNotPrime(65536))
        );
        assert!(is_prime(65537) && is_prime(251) && !is_prime(1) && !is_prime(65535));
    }

    #[test]
    fn no_backends_means_every_slot_empty() {
        let table = Table::build(&[], DEFAULT_SIZE).expect("table");
        assert!(table.slots().iter().all(|s| *s == EMPTY));
        let drained = vec![Weighted {
            name: "a".into(),
            weight: 0,
        }];
        let table = Table::build(&drained, 251).expect("table");
        assert!(table.slots().iter().all(|s| *s == EMPTY));
    }

    /// Each backend within 1% of M/N for M > 100·N.
    #[test]
    fn equal_weights_balance_within_one_percent() {
        for n in [3usize, 10, 100, 650] {
            let m = DEFAULT_SIZE;
            assert!(m as usize > 100 * n);
            let table = Table::build(&backends(n), m).expect("table");
            let ideal = f64::from(m) / n as f64;
            for (i, share) in table.shares(n).into_iter().enumerate() {
                let off = (share as f64 - ideal).abs() / ideal;
                assert!(off <= 0.01, "n={n}: backend {i} has {share}, ideal {ideal}");
            }
            assert!(table.slots().iter().all(|s| (*s as usize) < n));
        }
    }

    /// Removing 1 of N remaps no more than the removed backend's slots plus 1% of M.
    #[test]
    fn removing_a_backend_disrupts_little() {
        for (n, removed) in [(3usize, 1usize), (10, 4), (100, 0), (100, 57)] {
            let m = DEFAULT_SIZE;
            let all = backends(n);
            let before = Table::build(&all, m).expect("table");
            let mut rest = all.clone();
            rest.remove(removed);
            let after = Table::build(&rest, m).expect("table");
            let owned = before.shares(n)[removed];
            let mut moved = 0;
            for (old, new) in before.slots().iter().zip(after.slots()) {
                let old_name = &all[*old as usize].name;
                let new_name = &rest[*new as usize].name;
                if old_name != new_name {
                    moved += 1;
                }
            }
            let limit = owned + m as usize / 100;
            assert!(
                moved <= limit,
                "n={n}: {moved} slots moved, limit {limit} ({owned} owned)"
            );
            assert!(moved >= owned, "the removed backend's slots all moved");
        }
    }

    /// Adding a backend takes slots almost only for itself.
    #[test]
    fn adding_a_backend_disrupts_little() {
        let m = DEFAULT_SIZE;
        let all = backends(11);
        let before = Table::build(&all[..10], m).expect("table");
        let after = Table::build(&all, m).expect("table");
        let gained = after.shares(11)[10];
        let moved = before
            .slots()
            .iter()
            .zip(after.slots())
            .filter(|(o, n)| o != n)
            .count();
        assert!(
            moved <= gained + m as usize / 100,
            "{moved} moved, {gained} gained"
        );
    }

    #[test]
    fn weights_give_proportional_shares() {
        let m = DEFAULT_SIZE;
        let mut weighted = backends(4);
        for (b, w) in weighted.iter_mut().zip([1u32, 2, 3, 0]) {
            b.weight = w;
        }
        let table = Table::build(&weighted, m).expect("table");
        let shares = table.shares(4);
        assert_eq!(shares[3], 0, "weight 0 gets no slot");
        for (i, w) in [1.0f64, 2.0, 3.0].into_iter().enumerate() {
            let ideal = f64::from(m) * w / 6.0;
            let off = (shares[i] as f64 - ideal).abs() / ideal;
            assert!(
                off <= 0.01,
                "backend {i}: {} slots, ideal {ideal}",
                shares[i]
            );
        }
    }

    #[test]
    fn the_table_is_deterministic() {
        let a = Table::build(&backends(5), 251).expect("table");
        let b = Table::build(&backends(5), 251).expect("table");
        assert_eq!(a, b);
    }

    #[test]
    fn changed_slots_lists_only_differences() {
        assert_eq!(changed_slots(Some(&[1, 2, 3]), &[1, 5, 3]), vec![(1, 5)]);
        assert_eq!(changed_slots(None, &[7, 8]), vec![(0, 7), (1, 8)]);
    }
}
