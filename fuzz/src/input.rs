//! The fuzz targets' input layout, and the small deterministic mutator that replays them on
//! stable (`cargo test`, see `replay`).
//!
//! Every target reads its input as length-prefixed chunks and fixed-width integers ([`Chunks`]):
//! a little-endian `u16` length, then that many bytes (fewer if the input ends first). Whatever
//! the fuzzer mutates, some layout is read: nothing here rejects an input, and a missing integer
//! reads as 0. [`Writer`] writes the layout for the seeds.

use std::{
    fmt::Write as _,
    panic::{AssertUnwindSafe, catch_unwind, resume_unwind},
    path::Path,
    time::Instant,
};

/// Reads an input: chunks and integers, in order.
pub struct Chunks<'a> {
    data: &'a [u8],
}

impl<'a> Chunks<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// The next `n` bytes, or fewer at the end.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (taken, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        taken
    }

    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    pub fn u16(&mut self) -> u16 {
        let mut le = [0; 2];
        let bytes = self.bytes(2);
        le[..bytes.len()].copy_from_slice(bytes);
        u16::from_le_bytes(le)
    }

    pub fn u32(&mut self) -> u32 {
        let mut le = [0; 4];
        let bytes = self.bytes(4);
        le[..bytes.len()].copy_from_slice(bytes);
        u32::from_le_bytes(le)
    }

    /// The next chunk (empty at the end).
    pub fn chunk(&mut self) -> &'a [u8] {
        let length = self.u16();
        self.bytes(usize::from(length))
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

impl<'a> Iterator for Chunks<'a> {
    type Item = &'a [u8];

    /// The chunks left, until the input ends.
    fn next(&mut self) -> Option<&'a [u8]> {
        (!self.is_empty()).then(|| self.chunk())
    }
}

/// Writes what [`Chunks`] reads.
#[derive(Default)]
pub struct Writer {
    pub data: Vec<u8>,
}

impl Writer {
    pub fn chunk(mut self, bytes: &[u8]) -> Self {
        let length = u16::try_from(bytes.len()).expect("a chunk under 64 KiB");
        self.data.extend_from_slice(&length.to_le_bytes());
        self.data.extend_from_slice(bytes);
        self
    }

    pub fn u8(mut self, value: u8) -> Self {
        self.data.push(value);
        self
    }

    pub fn u16(mut self, value: u16) -> Self {
        self.data.extend_from_slice(&value.to_le_bytes());
        self
    }

    pub fn u32(mut self, value: u32) -> Self {
        self.data.extend_from_slice(&value.to_le_bytes());
        self
    }

    pub fn bytes(mut self, bytes: &[u8]) -> Self {
        self.data.extend_from_slice(bytes);
        self
    }
}

/// A fuzz target for [`replay`]: its name (the folder of its corpus), its body and its seeds.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
    pub seeds: fn() -> Vec<(&'static str, Vec<u8>)>,
    /// The longest input, as `-max_len` for libFuzzer.
    pub max_len: usize,
}

/// What a replay ran.
#[derive(Debug)]
pub struct Replayed {
    pub corpus: usize,
    pub mutated: usize,
    pub seconds: f64,
}

/// Runs `target` on stable, without libFuzzer: every file of its committed corpus
/// (`corpus_root/NAME/`), its seeds, then `mutations` inputs made from them by a mutator seeded
/// with `seed` (the same inputs on every run with the same seed). An input that panics is
/// printed in hex before the panic goes on.
pub fn replay(target: &Target, corpus_root: &Path, mutations: usize, seed: u64) -> Replayed {
    let started = Instant::now();
    let mut inputs: Vec<Vec<u8>> = (target.seeds)().into_iter().map(|(_, data)| data).collect();
    let folder = corpus_root.join(target.name);
    let mut files: Vec<_> = std::fs::read_dir(&folder)
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    let corpus = files.len();
    inputs.extend(files.iter().filter_map(|path| std::fs::read(path).ok()));
    for input in &inputs {
        run_one(target, input);
    }
    let mut mutator = Mutator::new(seed);
    for _ in 0..mutations {
        let input = mutator.mutate(&inputs, target.max_len);
        run_one(target, &input);
    }
    Replayed {
        corpus,
        mutated: mutations,
        seconds: started.elapsed().as_secs_f64(),
    }
}

fn run_one(target: &Target, input: &[u8]) {
    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| (target.run)(input))) {
        let hex = input.iter().fold(String::new(), |mut hex, b| {
            let _ = write!(hex, "{b:02x}");
            hex
        });
        eprintln!(
            "fuzz target {} panicked on this input ({} bytes; `xxd -r -p` makes it a file for \
             `cargo fuzz run {} FILE`):\n{hex}",
            target.name,
            input.len(),
            target.name
        );
        resume_unwind(panic);
    }
}

/// A few of libFuzzer's mutations, driven by xorshift64*: enough to walk around the seeds on
/// stable; libFuzzer (`make fuzz`) explores with coverage feedback.
struct Mutator {
    state: u64,
}

impl Mutator {
    fn new(seed: u64) -> Self {
        Self { state: seed.max(1) }
    }

    fn next(&mut self) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next() % n as u64) as usize }
    }

    fn mutate(&mut self, inputs: &[Vec<u8>], max_len: usize) -> Vec<u8> {
        let mut data = if inputs.is_empty() {
            Vec::new()
        } else {
            inputs[self.below(inputs.len())].clone()
        };
        for _ in 0..=self.below(4) {
            let at = self.below(data.len() + 1);
            match self.below(8) {
                0 if !data.is_empty() => {
                    let i = self.below(data.len());
                    data[i] ^= 1 << self.below(8);
                }
                1 if !data.is_empty() => {
                    let i = self.below(data.len());
                    data[i] = [0x00, 0x01, 0x7f, 0x80, 0xff, self.next() as u8][self.below(6)];
                }
                2 => {
                    let n = 1 + self.below(8);
                    let fresh: Vec<u8> = (0..n).map(|_| self.next() as u8).collect();
                    data.splice(at..at, fresh);
                }
                3 if !data.is_empty() => {
                    let end = (at + 1 + self.below(16)).min(data.len());
                    data.drain(at.min(end)..end);
                }
                4 if !data.is_empty() => {
                    let start = self.below(data.len());
                    let end = (start + 1 + self.below(32)).min(data.len());
                    let copy = data[start..end].to_vec();
                    data.splice(at..at, copy);
                }
                5 if !inputs.is_empty() => {
                    // Splice: this input's head, another's tail.
                    let other = &inputs[self.below(inputs.len())];
                    let from = self.below(other.len() + 1);
                    data.truncate(at);
                    data.extend_from_slice(&other[from..]);
                }
                6 if data.len() >= 2 => {
                    // A length or integer field at a random place: a small, a boundary or any value.
                    let i = self.below(data.len() - 1);
                    let value = [0u16, 1, 0x7f, 0x80, 0xff, 0x100, 0xffff, self.next() as u16][self.below(8)];
                    data[i..i + 2].copy_from_slice(&value.to_le_bytes());
                }
                _ => data.truncate(at),
            }
        }
        data.truncate(max_len);
        data
    }
}

/// Writes `target`'s seeds into `corpus_root/NAME/seed-*` (missing or different ones only);
/// returns the names of those that were missing or different.
pub fn write_seeds(target: &Target, corpus_root: &Path) -> std::io::Result<Vec<String>> {
    let folder = corpus_root.join(target.name);
    std::fs::create_dir_all(&folder)?;
    let mut written = Vec::new();
    for (name, data) in (target.seeds)() {
        let path = folder.join(format!("seed-{name}"));
        if std::fs::read(&path).ok().as_deref() != Some(&data[..]) {
            std::fs::write(&path, &data)?;
            written.push(name.to_string());
        }
    }
    Ok(written)
}

/// The seeds of `target` that are not in `corpus_root/NAME/` as written by [`write_seeds`].
pub fn stale_seeds(target: &Target, corpus_root: &Path) -> Vec<String> {
    let folder = corpus_root.join(target.name);
    (target.seeds)()
        .into_iter()
        .filter(|(name, data)| std::fs::read(folder.join(format!("seed-{name}"))).ok().as_deref() != Some(&data[..]))
        .map(|(name, _)| name.to_string())
        .collect()
}
