//! Line charts as PNG (plotters with an embedded font, so no system fonts are needed).

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;
use std::sync::Once;

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../assets/DejaVuSans.ttf");
        for style in [FontStyle::Normal, FontStyle::Bold] {
            // The font is embedded and known to be valid.
            let _ = plotters::style::register_font("sans-serif", style, bytes);
        }
    });
}

/// One named line (a single point is drawn as a dot).
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One panel of a figure.
pub struct Panel<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub series: &'a [Series],
    pub log_y: bool,
}

fn range(values: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let lo = values.clone().fold(f64::INFINITY, f64::min);
    let hi = values.fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi)
    }
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    panel: &Panel,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("plot: {e:?}");
    let points = panel
        .series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(_, y)| y.is_finite());
    let (x0, x1) = range(points.clone().map(|p| p.0));
    let xpad = (x1 - x0) * 0.03;
    let (x0, x1) = (x0 - xpad, x1 + xpad);
    let (y0, y1) = range(points.map(|p| p.1));
    let mut chart = ChartBuilder::on(area);
    chart
        .caption(panel.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60);
    let colors = [
        BLUE,
        RED,
        GREEN,
        MAGENTA,
        CYAN,
        BLACK,
        RGBColor(255, 140, 0),
        RGBColor(128, 0, 128),
    ];
    macro_rules! body {
        ($chart:expr, $map:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(panel.x_label)
                .y_desc(panel.y_label)
                .label_style(("sans-serif", 13))
                .draw()
                .map_err(err)?;
            for (i, s) in panel.series.iter().enumerate() {
                let color = colors[i % colors.len()];
                let pts: Vec<(f64, f64)> = s
                    .points
                    .iter()
                    .copied()
                    .filter(|(_, y)| y.is_finite())
                    .map($map)
                    .collect();
                if let [p] = pts[..] {
                    // A single point is a labelled dot (no legend entry).
                    chart
                        .draw_series([Circle::new(p, 6, color.filled())])
                        .map_err(err)?;
                    // Labels of points in the right half go to their left, so they stay inside.
                    let right_half = p.0 > (x0 + x1) / 2.0;
                    let (text, hpos) = if right_half {
                        (format!("{}   ", s.name), HPos::Right)
                    } else {
                        (format!("   {}", s.name), HPos::Left)
                    };
                    let style = ("sans-serif", 13)
                        .into_text_style(area)
                        .pos(Pos::new(hpos, VPos::Center));
                    chart
                        .draw_series([Text::new(text, p, style)])
                        .map_err(err)?;
                    continue;
                }
                chart
                    .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                    .map_err(err)?
                    .label(s.name.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                    });
            }
            if panel.series.iter().any(|s| s.points.len() > 1) {
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::UpperRight)
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .label_font(("sans-serif", 13))
                    .draw()
                    .map_err(err)?;
            }
        }};
    }
    if panel.log_y && y0 > 0.0 && y1 / y0 > 10.0 {
        body!(
            chart
                .build_cartesian_2d(x0..x1, (y0 * 0.95..y1 * 1.05).log_scale())
                .map_err(err)?,
            |p| p
        );
    } else {
        let pad = (y1 - y0) * 0.05;
        body!(
            chart
                .build_cartesian_2d(x0..x1, y0 - pad..y1 + pad)
                .map_err(err)?,
            |p| p
        );
    }
    Ok(())
}

/// Writes a PNG with the panels side by side.
pub fn write_png(path: &Path, panels: &[Panel]) -> Result<()> {
    register_font();
    let width = 760 * panels.len() as u32;
    let root = BitMapBackend::new(path, (width, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("plot: {e:?}"))?;
    let areas = root.split_evenly((1, panels.len()));
    for (area, panel) in areas.iter().zip(panels) {
        draw_panel(area, panel)?;
    }
    root.present()
        .map_err(|e| anyhow!("cannot write {}: {e:?}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png_with_lines_and_dots() {
        let path = std::env::temp_dir().join(format!("frugal-plot-{}.png", std::process::id()));
        let lines = [Series {
            name: "a".into(),
            points: vec![(0.0, 3.0), (1.0, 2.0), (2.0, 1.5)],
        }];
        let dots = [
            Series {
                name: "p".into(),
                points: vec![(20.5, 3557.0)],
            },
            Series {
                name: "q".into(),
                points: vec![(28.0, 3675.0)],
            },
        ];
        write_png(
            &path,
            &[
                Panel {
                    title: "lines",
                    x_label: "x",
                    y_label: "y",
                    series: &lines,
                    log_y: true,
                },
                Panel {
                    title: "dots",
                    x_label: "x",
                    y_label: "y",
                    series: &dots,
                    log_y: false,
                },
            ],
        )
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(bytes.len() > 10_000, "suspiciously small image");
        std::fs::remove_file(&path).ok();
    }
}
