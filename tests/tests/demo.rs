//! `make demo` runs to completion non-interactively, and what it prints holds together: for
//! each backend the client's count equals the backend's own count of requests served, every
//! serving backend got requests, and the flipped one none after its flip.

use std::process::Command;

use anyhow::{Context, Result};
use kubegrpc_tests::{backends::built_binary, netns::assert_private_network};

#[test]
fn the_demo_runs_to_completion_and_its_counts_agree() -> Result<()> {
    assert_private_network();
    let output = Command::new(built_binary("demo")?)
        .output()
        .context("cannot run the demo")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "the demo failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("demo OK"));

    // Rows of the two comparison tables: address, client counted, backend served [, note].
    let rows: Vec<(String, u64, u64, bool)> = stdout
        .lines()
        .filter(|line| line.starts_with("10.250."))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let counted = fields.get(1)?.parse().ok()?;
            let served = fields.get(2)?.parse().ok()?;
            Some((fields[0].to_string(), counted, served, line.contains("NOT_SERVING")))
        })
        .collect();
    assert_eq!(rows.len(), 3 + 4, "two tables, of 3 and 4 backends:\n{stdout}");
    for (address, counted, served, flipped) in &rows {
        assert_eq!(
            counted, served,
            "{address}: the client's count differs from the backend's"
        );
        if *flipped {
            assert_eq!(*served, 0, "{address} served requests after its flip");
        } else {
            assert!(*served > 0, "{address} serves but got no request");
        }
    }
    assert_eq!(rows.iter().filter(|r| r.3).count(), 1);
    Ok(())
}
