"""The report's plots, drawn here as inline SVG: no plotting library, no script.

:func:`hist_svg` draws the score histogram of selected against rejected examples (each as a
share of its group, exact counts on hover), :func:`lines_svg` series over training steps (a
NaN breaks a line). Axes get round ticks; numbers are formatted by :func:`fmt` (``—`` for
missing or non-finite values), which the page uses too.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["COLORS", "REJ_COLOR", "SEL_COLOR", "fmt", "hist_svg", "lines_svg"]

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939")
SEL_COLOR, REJ_COLOR = "#ff7f0e", "#1f77b4"  # selected, rejected examples


def fmt(x: float, digits: int = 4) -> str:
    """An int with thousands separators, a float to ``digits`` significant digits, else —."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    return f"{x:.{digits}g}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    out = []
    t = first
    while t <= hi + step * 1e-9:
        out.append(0.0 if abs(t) < step * 1e-9 else t)
        t += step
    return out


class _Plot:
    """An SVG plot area with axes (x and y in data units)."""

    W, H, L, R, T, B = 600, 230, 58, 14, 12, 40

    def __init__(self, xlo: float, xhi: float, ylo: float, yhi: float, xlabel: str,
                 ylabel: str, label: str) -> None:
        if xhi <= xlo:
            xlo, xhi = xlo - 0.5, xhi + 0.5
        if yhi <= ylo:
            ylo, yhi = ylo - 0.5, yhi + 0.5
        self.xlo, self.xhi, self.ylo, self.yhi = xlo, xhi, ylo, yhi
        self.parts: list[str] = []
        self.xlabel, self.ylabel, self.label = xlabel, ylabel, label

    def x(self, v: float) -> float:
        return self.L + (v - self.xlo) / (self.xhi - self.xlo) * (self.W - self.L - self.R)

    def y(self, v: float) -> float:
        return self.T + (self.yhi - v) / (self.yhi - self.ylo) * (self.H - self.T - self.B)

    def line(self, xs: np.ndarray, ys: np.ndarray, color: str, width: float = 1.8,
             dash: str | None = None) -> None:
        segs, cur = [], []
        for xv, yv in zip(xs.tolist(), ys.tolist()):
            if math.isfinite(yv):
                cur.append(f"{self.x(xv):.1f},{self.y(yv):.1f}")
            elif cur:
                segs.append(cur)
                cur = []
        if cur:
            segs.append(cur)
        extra = f' stroke-dasharray="{dash}"' if dash else ""
        for seg in segs:
            if len(seg) == 1:
                cx, cy = seg[0].split(",")
                self.parts.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{color}"/>')
            else:
                self.parts.append(
                    f'<polyline fill="none" stroke="{color}" stroke-width="{width}"{extra} '
                    f'points="{" ".join(seg)}"/>'
                )

    def rect(self, x0: float, x1: float, y0: float, y1: float, color: str, opacity: float,
             tip: str) -> None:
        px0, px1 = self.x(x0), self.x(x1)
        py0, py1 = self.y(y1), self.y(y0)
        self.parts.append(
            f'<rect x="{px0:.1f}" y="{py0:.1f}" width="{max(px1 - px0, 0.5):.1f}" '
            f'height="{max(py1 - py0, 0):.1f}" fill="{color}" fill-opacity="{opacity}">'
            f"<title>{html.escape(tip)}</title></rect>"
        )

    def svg(self, yfmt=fmt) -> str:
        ax = []
        x0, x1 = self.L, self.W - self.R
        y0, y1 = self.T, self.H - self.B
        for t in _ticks(self.ylo, self.yhi):
            py = self.y(t)
            ax.append(f'<line x1="{x0}" x2="{x1}" y1="{py:.1f}" y2="{py:.1f}" stroke="#e5e5e5"/>')
            ax.append(f'<text x="{x0 - 4}" y="{py + 3.5:.1f}" text-anchor="end">{yfmt(t)}</text>')
        for t in _ticks(self.xlo, self.xhi, 6):
            px = self.x(t)
            ax.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{y1}" y2="{y1 + 4}" stroke="#444"/>')
            ax.append(f'<text x="{px:.1f}" y="{y1 + 15}" text-anchor="middle">{fmt(t)}</text>')
        ax.append(f'<rect x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" fill="none" '
                  'stroke="#444"/>')
        ax.append(f'<text x="{(x0 + x1) / 2}" y="{self.H - 6}" text-anchor="middle">'
                  f"{html.escape(self.xlabel)}</text>")
        ax.append(f'<text transform="translate(13,{(y0 + y1) / 2}) rotate(-90)" '
                  f'text-anchor="middle">{html.escape(self.ylabel)}</text>')
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {self.W} {self.H}" '
            f'width="{self.W}" height="{self.H}" role="img" aria-label="{html.escape(self.label)}"'
            f' font-family="sans-serif" font-size="11">{"".join(self.parts)}{"".join(ax)}</svg>'
        )


def hist_svg(h: dict[str, Any]) -> str:
    edges = h["edges"]
    sel, rej = h["selected"], h["rejected"]
    ns, nr = sel.sum() + h["below"][1] + h["above"][1], rej.sum() + h["below"][0] + h["above"][0]
    fs = sel / ns if ns else sel * 0
    fr = rej / nr if nr else rej * 0
    p = _Plot(float(edges[0]), float(edges[-1]), 0.0, float(max(fs.max(), fr.max()) * 1.08),
              "score", "share of the group", "score histogram, selected vs rejected")
    for i in range(len(sel)):
        a, b = float(edges[i]), float(edges[i + 1])
        rng = f"[{fmt(a)}, {fmt(b)})"
        p.rect(a, b, 0, float(fr[i]), REJ_COLOR, 0.55, f"rejected {rng}: {int(rej[i]):,}")
        p.rect(a, b, 0, float(fs[i]), SEL_COLOR, 0.55, f"selected {rng}: {int(sel[i]):,}")
    return p.svg(lambda t: f"{100 * t:.0f}%")


def lines_svg(x: np.ndarray, series: Sequence[tuple[str, np.ndarray, str]], ylabel: str,
              label: str, share: bool = False) -> str:
    ys = np.concatenate([s[1][np.isfinite(s[1])] for s in series] or [np.zeros(0)])
    if share:
        ylo, yhi = 0.0, max(float(ys.max()) * 1.08 if len(ys) else 1.0, 1e-3)
    else:
        ylo, yhi = (float(ys.min()), float(ys.max())) if len(ys) else (0.0, 1.0)
        pad = (yhi - ylo) * 0.06 or abs(yhi) * 0.06 or 0.5
        ylo, yhi = ylo - pad, yhi + pad
    xlo, xhi = float(x[0]), float(x[-1])
    p = _Plot(xlo, xhi, ylo, yhi, "training step (super-batch)", ylabel, label)
    for _, y, color in series:
        p.line(x, y, color)
    return p.svg((lambda t: f"{100 * t:.0f}%") if share else fmt)
