//! Property and fuzz targets on stable Rust (`arbtest` over `arbitrary`): each target is a
//! function of random bytes that must never panic and must keep its invariant.
//!
//! `cargo test` runs every target on a fixed set of seeds (deterministic, a fraction of a
//! second each); `scripts/fuzz.sh MINUTES` sets `DISPATCH_FUZZ_MS` and runs each target for
//! that long on fresh random seeds. A failure names its seed; `DISPATCH_FUZZ_SEED=0x…`
//! replays exactly that case. Crashes found are kept as regression tests beside the target.

pub use arbitrary::{Arbitrary, Result, Unstructured};

/// Cases per target in a normal test run.
const CASES: u64 = 256;

/// Runs `prop` as fuzz target `name`; returns how many inputs it ran.
pub fn check(name: &str, mut prop: impl FnMut(&mut Unstructured<'_>) -> Result<()>) -> u64 {
    let mut runs = 0u64;
    let mut counted = |u: &mut Unstructured<'_>| {
        runs += 1;
        prop(u)
    };
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if let Some(seed) = env("DISPATCH_FUZZ_SEED") {
        let seed = u64::from_str_radix(seed.trim_start_matches("0x"), 16)
            .unwrap_or_else(|_| panic!("DISPATCH_FUZZ_SEED={seed} is not a hex number"));
        arbtest::arbtest(&mut counted).seed(seed).run();
    } else if let Some(ms) = env("DISPATCH_FUZZ_MS").and_then(|v| v.parse().ok()) {
        arbtest::arbtest(&mut counted).budget_ms(ms).run();
    } else {
        for i in 0..CASES {
            // An arbtest seed is (random << 32) | input length: lengths up to 8 KiB.
            let size = (i * 37) % 8192;
            let random = (i.wrapping_mul(0x9E37_79B9) ^ 0x5EED) & 0xFFFF_FFFF;
            arbtest::arbtest(&mut counted)
                .seed((random << 32) | size)
                .run();
        }
    }
    eprintln!("fuzz {name}: {runs} inputs");
    runs
}

/// A string made mostly of `alphabet`'s pieces (tokens of the grammar under test) and some
/// arbitrary text: random bytes alone rarely get past a parser's first character.
pub fn grammar_string(u: &mut Unstructured<'_>, alphabet: &[&str]) -> Result<String> {
    let mut s = String::new();
    let n = u.int_in_range(0..=40)?;
    for _ in 0..n {
        if u.ratio(1, 6)? {
            s.push_str(&String::arbitrary(u)?);
        } else {
            s.push_str(u.choose(alphabet)?);
        }
    }
    Ok(s)
}
