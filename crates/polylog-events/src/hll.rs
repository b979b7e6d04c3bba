//! HyperLogLog for distinct users: 4,096 registers (standard error 1.04/√4096 ≈ 1.6%), kept
//! sparse (only the registers in use) while few users are in it, which is what most per-minute
//! buckets hold. Sketches merge by taking the larger register, so minutes add up to hours,
//! days and reports without double counting a user.
//!
//! Stored form (a Postgres `bytea`): `0x01` then (register u16 BE, rank u8) per used register in
//! register order, or `0x02` then the 4,096 registers.

const P: u32 = 12;
const M: usize = 1 << P;
/// Sparse sketches become dense above this many registers (3 bytes each against 4,096).
const SPARSE_MAX: usize = 1024;

/// The relative standard error of an estimate.
pub const STANDARD_ERROR: f64 = 1.04 / 64.0;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hll {
    /// (register, rank), sorted by register, each register once.
    Sparse(Vec<(u16, u8)>),
    Dense(Box<[u8; M]>),
}

impl Default for Hll {
    fn default() -> Self {
        Hll::Sparse(Vec::new())
    }
}

/// A 64-bit hash that never changes between versions (sketches are stored): FNV-1a, then
/// MurmurHash3's finalizer to spread the bits.
pub fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

impl Hll {
    pub fn add(&mut self, value: &[u8]) {
        let h = hash(value);
        let register = (h >> (64 - P)) as u16;
        let rank = ((h << P) | (1 << (P - 1))).leading_zeros() as u8 + 1;
        self.set(register, rank);
    }

    fn set(&mut self, register: u16, rank: u8) {
        match self {
            Hll::Dense(r) => {
                let slot = &mut r[register as usize];
                *slot = (*slot).max(rank);
            }
            Hll::Sparse(v) => {
                match v.binary_search_by_key(&register, |&(r, _)| r) {
                    Ok(i) => v[i].1 = v[i].1.max(rank),
                    Err(i) => v.insert(i, (register, rank)),
                }
                if v.len() > SPARSE_MAX {
                    self.densify();
                }
            }
        }
    }

    fn densify(&mut self) {
        if let Hll::Sparse(v) = self {
            let mut r = Box::new([0u8; M]);
            for &(i, rank) in v.iter() {
                r[i as usize] = rank;
            }
            *self = Hll::Dense(r);
        }
    }

    pub fn merge(&mut self, other: &Hll) {
        match other {
            Hll::Sparse(v) => {
                if let Hll::Sparse(mine) = self {
                    if mine.len() + v.len() > SPARSE_MAX {
                        self.densify();
                    }
                }
                match self {
                    Hll::Dense(r) => {
                        for &(i, rank) in v {
                            r[i as usize] = r[i as usize].max(rank);
                        }
                    }
                    Hll::Sparse(mine) => {
                        // Both sorted: merge them.
                        let mut out = Vec::with_capacity(mine.len() + v.len());
                        let (mut a, mut b) = (0, 0);
                        while a < mine.len() && b < v.len() {
                            match mine[a].0.cmp(&v[b].0) {
                                std::cmp::Ordering::Less => {
                                    out.push(mine[a]);
                                    a += 1;
                                }
                                std::cmp::Ordering::Greater => {
                                    out.push(v[b]);
                                    b += 1;
                                }
                                std::cmp::Ordering::Equal => {
                                    out.push((mine[a].0, mine[a].1.max(v[b].1)));
                                    a += 1;
                                    b += 1;
                                }
                            }
                        }
                        out.extend_from_slice(&mine[a..]);
                        out.extend_from_slice(&v[b..]);
                        *mine = out;
                    }
                }
            }
            Hll::Dense(o) => {
                self.densify();
                if let Hll::Dense(r) = self {
                    for (x, y) in r.iter_mut().zip(o.iter()) {
                        *x = (*x).max(*y);
                    }
                }
            }
        }
    }

    /// The estimated number of distinct values added.
    pub fn count(&self) -> u64 {
        let (sum, zeros) = match self {
            Hll::Sparse(v) => {
                let sum: f64 = v.iter().map(|&(_, r)| 2f64.powi(-(r as i32))).sum();
                (sum + (M - v.len()) as f64, M - v.len())
            }
            Hll::Dense(r) => {
                let sum: f64 = r.iter().map(|&x| 2f64.powi(-(x as i32))).sum();
                (sum, r.iter().filter(|&&x| x == 0).count())
            }
        };
        let m = M as f64;
        let alpha = 0.7213 / (1.0 + 1.079 / m);
        let raw = alpha * m * m / sum;
        let estimate = if raw <= 2.5 * m && zeros > 0 {
            // Linear counting: exact-ish while most registers are empty.
            m * (m / zeros as f64).ln()
        } else {
            raw
        };
        estimate.round() as u64
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Hll::Sparse(v) => {
                let mut out = Vec::with_capacity(1 + 3 * v.len());
                out.push(1);
                for &(i, r) in v {
                    out.extend_from_slice(&i.to_be_bytes());
                    out.push(r);
                }
                out
            }
            Hll::Dense(r) => {
                let mut out = Vec::with_capacity(1 + M);
                out.push(2);
                out.extend_from_slice(&r[..]);
                out
            }
        }
    }

    pub fn from_bytes(b: &[u8]) -> Result<Hll, String> {
        match b.split_first() {
            Some((1, rest)) if rest.len() % 3 == 0 => {
                let mut v: Vec<(u16, u8)> = rest
                    .chunks_exact(3)
                    .map(|c| (u16::from_be_bytes([c[0], c[1]]), c[2]))
                    .collect();
                if v.iter().any(|&(i, r)| i as usize >= M || r == 0 || r > 64 - P as u8 + 1) {
                    return Err("a sparse sketch has a register out of range".into());
                }
                if !v.windows(2).all(|w| w[0].0 < w[1].0) {
                    // Each register once, with its highest rank.
                    v.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
                    v.dedup_by_key(|e| e.0);
                }
                let mut h = Hll::Sparse(v);
                if let Hll::Sparse(v) = &h {
                    if v.len() > SPARSE_MAX {
                        h.densify();
                    }
                }
                Ok(h)
            }
            Some((2, rest)) if rest.len() == M => {
                let mut r = Box::new([0u8; M]);
                r.copy_from_slice(rest);
                Ok(Hll::Dense(r))
            }
            Some((0, [])) | None => Ok(Hll::default()),
            _ => Err(format!("not a sketch ({} bytes)", b.len())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_within_the_error_and_merges() {
        for n in [0u64, 1, 10, 100, 1_000, 10_000, 100_000, 1_000_000] {
            let mut a = Hll::default();
            let mut b = Hll::default();
            for i in 0..n {
                let v = format!("user-{i}");
                if i % 2 == 0 {
                    a.add(v.as_bytes());
                } else {
                    b.add(v.as_bytes());
                }
                // Adding again changes nothing.
                a.add(b"user-0");
            }
            let mut m = a.clone();
            m.merge(&b);
            let est = m.count() as f64;
            let err = if n == 0 { est } else { (est - n as f64).abs() / n as f64 };
            assert!(err <= 4.0 * STANDARD_ERROR, "n={n} estimate {est}");
            let back = Hll::from_bytes(&m.to_bytes()).expect("decodes");
            assert_eq!(back.count(), m.count());
            // Merging in the other order and in the stored form gives the same sketch.
            let mut m2 = b.clone();
            m2.merge(&Hll::from_bytes(&a.to_bytes()).expect("parses"));
            assert_eq!(m2.count(), m.count());
        }
        assert!(Hll::from_bytes(&[3, 1]).is_err());
        assert!(Hll::from_bytes(&[1, 0xff, 0xff, 1]).is_err());
    }
}
