//! The results chart: one PNG with two horizontal bar panels, throughput and p99 latency, one
//! bar per row of the summary table, both on log scales (the rows span several orders of
//! magnitude).
//!
//! Text uses DejaVu Sans, bundled in `fonts/` with its license and registered from bytes, so
//! that drawing needs no system font or font library.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::stats::{self, Row};

/// DejaVu Sans (Bitstream Vera license, `fonts/LICENSE`).
const FONT: &[u8] = include_bytes!("../fonts/DejaVuSans.ttf");
/// The family name the font is registered under.
const FAMILY: &str = "sans-serif";

/// Width of the image.
const WIDTH: u32 = 1600;
/// Width of the column of scenario names.
const LABELS_WIDTH: u32 = 560;
/// Height of one row's bar slot.
const ROW_HEIGHT: u32 = 30;
/// Height above and below the bars: title, captions and axes.
const FRAME_HEIGHT: u32 = 130;
/// Height of the x axis band under each panel.
const AXIS_HEIGHT: u32 = 40;

/// Draws `rows` into a PNG at `path`.
pub fn write_png(rows: &[Row], title: &str, path: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(!rows.is_empty(), "no results to chart");
    plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
        .map_err(|_| anyhow::anyhow!("the bundled font cannot be read"))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    }
    let n = u32::try_from(rows.len()).map_err(|_| anyhow::anyhow!("too many rows"))?;
    let height = FRAME_HEIGHT + n * ROW_HEIGHT;
    let root = BitMapBackend::new(path, (WIDTH, height)).into_drawing_area();
    draw(&root, rows, title).map_err(|e| anyhow::anyhow!("cannot draw the chart: {e}"))?;
    root.present()
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
}

/// A panel's values and how to print them.
struct Panel<'a> {
    caption: &'a str,
    values: Vec<f64>,
    fmt: fn(f64) -> String,
    color: RGBColor,
}

type DrawResult<T> =
    Result<T, DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>>;

fn draw(
    root: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    rows: &[Row],
    title: &str,
) -> Result<(), String> {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let body = root
        .titled(title, (FAMILY, 22).into_font())
        .map_err(|e| e.to_string())?;
    let (labels, panels) = body.split_horizontally(LABELS_WIDTH);
    let areas = panels.split_evenly((1, 2));
    let specs = [
        Panel {
            caption: "throughput (ops/s, log scale)",
            values: rows.iter().map(|r| r.throughput).collect(),
            fmt: |v| stats::fmt_rate(v),
            color: RGBColor(52, 101, 164),
        },
        Panel {
            caption: "p99 latency (log scale)",
            values: rows
                .iter()
                .map(|r| r.latencies.p99.as_secs_f64() * 1e6)
                .collect(),
            fmt: |us| stats::fmt_duration(std::time::Duration::from_secs_f64(us / 1e6)),
            color: RGBColor(204, 102, 0),
        },
    ];
    let n = rows.len();
    let label_style = TextStyle::from((FAMILY, 14).into_font())
        .pos(Pos::new(HPos::Right, VPos::Center))
        .color(&BLACK);
    let mut centers = Vec::new();
    for (area, spec) in areas.iter().zip(&specs) {
        centers = panel(area, spec, n).map_err(|e| e.to_string())?;
    }
    // The scenario names, right-aligned against the panels, at the rows' heights (pixels of
    // the whole image, as `root` has no offset).
    let (x0, _) = labels.get_base_pixel();
    let right = x0 + i32::try_from(LABELS_WIDTH).unwrap_or(i32::MAX) - 10;
    for (row, y) in rows.iter().zip(centers) {
        let text = shorten(&row.scenario.replace('`', ""), 75);
        root.draw(&Text::new(text, (right, y), label_style.clone()))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Draws one panel; answers the pixel heights of the rows' centres.
fn panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    spec: &Panel<'_>,
    n: usize,
) -> DrawResult<Vec<i32>> {
    let positive = spec.values.iter().copied().filter(|v| *v > 0.0);
    let lo = positive.clone().fold(f64::INFINITY, f64::min);
    let hi = positive.fold(0.0, f64::max);
    let (lo, hi) = if lo.is_finite() && hi > 0.0 {
        (lo / 3.0, hi * 3.0)
    } else {
        (1.0, 10.0)
    };
    // Row i occupies [n - i - 1, n - i] so that the first row is at the top.
    #[allow(clippy::cast_precision_loss)]
    let top = n as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(spec.caption, (FAMILY, 16).into_font())
        .margin_right(45)
        .margin_top(10)
        .set_label_area_size(LabelAreaPosition::Bottom, AXIS_HEIGHT)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..top)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .disable_y_axis()
        .x_labels(6)
        .x_label_formatter(&|v| (spec.fmt)(*v))
        .label_style((FAMILY, 12).into_font())
        .draw()?;
    let mut centers = Vec::with_capacity(n);
    for (i, &v) in spec.values.iter().enumerate() {
        #[allow(clippy::cast_precision_loss)]
        let y = top - i as f64;
        centers.push(chart.backend_coord(&(lo, y - 0.5)).1);
        if v <= 0.0 {
            continue;
        }
        chart.draw_series(std::iter::once(Rectangle::new(
            [(lo, y - 0.85), (v, y - 0.15)],
            spec.color.filled(),
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            format!(" {}", (spec.fmt)(v)),
            (v, y - 0.5),
            TextStyle::from((FAMILY, 12).into_font()).pos(Pos::new(HPos::Left, VPos::Center)),
        )))?;
    }
    Ok(centers)
}

/// `s` cut to `max` characters, with an ellipsis if cut.
fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::stats::Latencies;

    fn row(scenario: &str, throughput: f64, p99_us: u64) -> Row {
        let d = Duration::from_micros(p99_us);
        Row {
            scenario: scenario.into(),
            throughput,
            unit: "req/s",
            latencies: Latencies {
                p50: d / 2,
                p99: d,
                p999: d * 2,
                max: d * 3,
                mean: d / 2,
            },
            ratio: None,
        }
    }

    #[test]
    fn the_chart_is_a_png_of_some_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("chart.png");
        let rows = vec![
            row(
                "in-process `SessionService::verify`, 2 threads",
                1_259_185.0,
                3,
            ),
            row(
                "HTTP sessiond `POST /v1/sessions/verify`, 64 conns",
                54_862.0,
                2_980,
            ),
            row("HTTP durable create on PostgreSQL", 2_848.0, 44_370),
            row("a row that failed to measure anything", 0.0, 0),
        ];
        write_png(&rows, "sessiond-bench", &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.len() > 1000, "{} bytes", bytes.len());
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    }

    #[test]
    fn no_rows_no_chart() {
        let dir = tempfile::tempdir().unwrap();
        assert!(write_png(&[], "x", &dir.path().join("c.png")).is_err());
    }

    #[test]
    fn long_names_are_shortened() {
        assert_eq!(shorten("abc", 3), "abc");
        assert_eq!(shorten("abcdef", 4), "abc…");
    }
}
