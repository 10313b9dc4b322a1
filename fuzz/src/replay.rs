// The body of the `fuzz_targets` tests of the operator and client crates (included by path
// after their `TARGETS`): each fuzz target replayed on stable over the committed corpus, its
// seeds and fixed-seed mutations of them.
//
// KUBEGRPC_FUZZ_MUTATIONS (default 2,000) sets the mutated inputs per target, KUBEGRPC_FUZZ_SEED
// (default 18) the mutator's seed; KUBEGRPC_FUZZ_WRITE_SEEDS=1 rewrites the committed seeds
// (fuzz/corpus/NAME/seed-*) after a change of a target's layout.

fn corpus_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus")
}

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn replay(name: &str) {
    let target = TARGETS.iter().find(|t| t.name == name).expect("a target of this crate");
    let mutations = setting("KUBEGRPC_FUZZ_MUTATIONS", 2_000) as usize;
    let seed = setting("KUBEGRPC_FUZZ_SEED", 18);
    let replayed = input::replay(target, &corpus_root(), mutations, seed);
    println!(
        "fuzz target {name}: {} corpus files, {} mutated inputs (seed {seed}), {:.1} s, no panic",
        replayed.corpus, replayed.mutated, replayed.seconds
    );
}

#[test]
fn fuzz_target_seeds_are_committed() {
    for target in &TARGETS {
        if std::env::var_os("KUBEGRPC_FUZZ_WRITE_SEEDS").is_some() {
            input::write_seeds(target, &corpus_root()).expect("seeds written");
        }
        let stale = input::stale_seeds(target, &corpus_root());
        assert!(
            stale.is_empty(),
            "fuzz/corpus/{}: seeds {stale:?} missing or out of date; write them with \
             KUBEGRPC_FUZZ_WRITE_SEEDS=1 cargo test --test fuzz_targets",
            target.name
        );
    }
}
