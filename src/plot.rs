//! `leverflow stats OUTPUT --plot out.svg`: mean VQA accuracy per
//! gen_method (bars, with candidate counts) and the reward histogram, as a
//! self-contained SVG. Hand-written (two simple panels) rather than pulling a
//! plotting library into the binary.

use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::path::Path;

use leverflow_operators::outputs::AtomicFile;

use leverflow_operators::outputs::Summary;

const W: f64 = 900.0;
const H: f64 = 380.0;
const PANEL_W: f64 = 380.0;
const PANEL_H: f64 = 260.0;
const TOP: f64 = 60.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Equal-width bins over the rewards' range: (lower edge, upper edge, count).
pub fn histogram(values: &[f64], bins: usize) -> Vec<(f64, f64, u64)> {
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.is_empty() || bins == 0 {
        return Vec::new();
    }
    let lo = finite.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let width = if hi > lo {
        (hi - lo) / bins as f64
    } else {
        1.0
    };
    let mut counts = vec![0u64; bins];
    for v in finite {
        let i = (((v - lo) / width) as usize).min(bins - 1);
        counts[i] += 1;
    }
    counts
        .into_iter()
        .enumerate()
        .map(|(i, c)| (lo + i as f64 * width, lo + (i + 1) as f64 * width, c))
        .collect()
}

/// Renders the two panels of `summary` as SVG text.
pub fn render_svg(summary: &Summary, title: &str) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(
        s,
        r#"<rect x="0" y="0" width="{W}" height="{H}" fill="white"/>"#
    );
    let _ = write!(
        s,
        r#"<text x="{}" y="24" font-size="16" text-anchor="middle">{}</text>"#,
        W / 2.0,
        esc(title)
    );
    // Panel 1: mean accuracy per gen_method.
    let x0 = 60.0;
    let base = TOP + PANEL_H;
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">mean VQA accuracy per gen_method</text>"#,
        x0 + PANEL_W / 2.0,
        TOP - 10.0
    );
    axes(&mut s, x0, base);
    for k in 0..=4 {
        let v = k as f64 / 4.0;
        let y = base - v * PANEL_H;
        let _ = write!(
            s,
            r##"<text x="{}" y="{}" text-anchor="end">{v:.2}</text><line x1="{x0}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/>"##,
            x0 - 6.0,
            y + 4.0,
            x0 + PANEL_W
        );
    }
    let n = summary.by_method.len().max(1) as f64;
    let slot = PANEL_W / n;
    for (i, (name, m)) in summary.by_method.iter().enumerate() {
        let acc = if m.candidates > 0 {
            m.acc_sum / m.candidates as f64
        } else {
            0.0
        };
        let h = acc.clamp(0.0, 1.0) * PANEL_H;
        let x = x0 + i as f64 * slot + slot * 0.15;
        let w = slot * 0.7;
        let _ = write!(
            s,
            r##"<rect x="{x:.1}" y="{:.1}" width="{w:.1}" height="{h:.1}" fill="#4c78a8"><title>{}: {acc:.3} ({} candidates)</title></rect>"##,
            base - h,
            esc(name),
            m.candidates
        );
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{acc:.3}</text>"#,
            x + w / 2.0,
            base - h - 4.0
        );
        let _ = write!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text><text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#666">n={}</text>"##,
            x + w / 2.0,
            base + 16.0,
            esc(name),
            x + w / 2.0,
            base + 30.0,
            m.candidates
        );
    }
    // Panel 2: reward histogram.
    let x1 = 500.0;
    let bins = histogram(&summary.rewards, 20);
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">reward histogram ({} candidates)</text>"#,
        x1 + PANEL_W / 2.0,
        TOP - 10.0,
        summary.rewards.len()
    );
    axes(&mut s, x1, base);
    let most = bins.iter().map(|b| b.2).max().unwrap_or(0).max(1) as f64;
    let bw = PANEL_W / bins.len().max(1) as f64;
    for (i, (lo, hi, c)) in bins.iter().enumerate() {
        let h = *c as f64 / most * PANEL_H;
        let _ = write!(
            s,
            r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="#f58518"><title>[{lo:.3}, {hi:.3}): {c}</title></rect>"##,
            x1 + i as f64 * bw + 1.0,
            base - h,
            (bw - 2.0).max(1.0)
        );
    }
    if let (Some(first), Some(last)) = (bins.first(), bins.last()) {
        let _ = write!(
            s,
            r#"<text x="{x1}" y="{}" text-anchor="start">{:.2}</text><text x="{}" y="{}" text-anchor="end">{:.2}</text><text x="{}" y="{}" text-anchor="end">{}</text>"#,
            base + 16.0,
            first.0,
            x1 + PANEL_W,
            base + 16.0,
            last.1,
            x1 - 6.0,
            TOP + 4.0,
            most as u64
        );
    }
    s.push_str("</svg>\n");
    s
}

fn axes(s: &mut String, x: f64, base: f64) {
    let _ = write!(
        s,
        r##"<line x1="{x}" y1="{TOP}" x2="{x}" y2="{base}" stroke="#333"/><line x1="{x}" y1="{base}" x2="{}" y2="{base}" stroke="#333"/>"##,
        x + PANEL_W
    );
}

/// Writes the plot of `summary` to `path` (atomically).
pub fn write_svg(summary: &Summary, title: &str, path: &Path) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    std::io::Write::write_all(&mut f, render_svg(summary, title).as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    f.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_bins_cover_the_range() {
        let h = histogram(&[0.0, 0.5, 1.0, 1.0, f64::NAN], 4);
        assert_eq!(h.len(), 4);
        assert_eq!(h.iter().map(|b| b.2).sum::<u64>(), 4);
        assert_eq!(h[3].2, 2);
        assert!(histogram(&[], 4).is_empty());
        assert_eq!(histogram(&[2.0, 2.0], 3)[0].2, 2);
    }
}
