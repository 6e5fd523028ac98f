//! The files `all` writes: the results table in markdown and the chart, side by side.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use crate::stats::{self, Row};
use crate::{chart, scale};

/// Where `all` writes its results.
#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Directory of the results: `results.md` (the tables) and `sessiond-bench.png` (the chart).
    #[arg(long, value_name = "DIR", default_value = "target/bench")]
    pub out_dir: PathBuf,
    /// Write the chart here instead of DIR/sessiond-bench.png.
    #[arg(long, value_name = "PATH")]
    pub chart: Option<PathBuf>,
}

impl OutputArgs {
    /// The chart's path.
    pub fn chart_path(&self) -> PathBuf {
        self.chart
            .clone()
            .unwrap_or_else(|| self.out_dir.join("sessiond-bench.png"))
    }

    /// The markdown file's path.
    pub fn results_path(&self) -> PathBuf {
        self.out_dir.join("results.md")
    }
}

/// The results in markdown: the summary table, the peers' ratio table if they ran, then the
/// scale table if it ran.
pub fn markdown(rows: &[Row], ratios: Option<&str>, scale: Option<&scale::Report>) -> String {
    let mut out = String::from("### Summary\n\n");
    out.push_str(&stats::table(rows));
    if let Some(r) = ratios {
        out.push_str("\n### sessiond over the peers, measured in the same run\n\n");
        out.push_str(r);
    }
    if let Some(s) = scale {
        out.push_str("\n### Scale: verify and memory by stored sessions\n\n");
        out.push_str(&s.table());
    }
    out
}

/// Writes the markdown results and the chart; prints where.
pub fn write(
    args: &OutputArgs,
    rows: &[Row],
    ratios: Option<&str>,
    scale: Option<&scale::Report>,
) -> anyhow::Result<()> {
    let md = args.results_path();
    write_file(&md, &markdown(rows, ratios, scale))?;
    let png = args.chart_path();
    chart::write_png(rows, "sessiond-bench: throughput and p99 by scenario", &png)?;
    println!("\nresults: {}\nchart: {}", md.display(), png.display());
    Ok(())
}

fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}
