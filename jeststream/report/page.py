"""The report page: :func:`render_html` turns a :class:`.collect.ReportData` into one
self-contained HTML document.

Everything is inline: thumbnails as ``data:`` URIs, plots as SVG (:mod:`.svg`), CSS in the
page, no script; a Content-Security-Policy forbids any network access, so the page can be
mailed or archived as one file. Every text from the log or the shards (keys, captions, field
values, paths, notes) is HTML-escaped. Sections: the headline counts, notes, the run (per log
and its configuration), scores, per sample field, and the galleries.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence

import numpy as np

from jeststream.report.collect import ReportData
from jeststream.report.shards import THUMB_PX, Sample
from jeststream.report.svg import COLORS, REJ_COLOR, SEL_COLOR, fmt, hist_svg, lines_svg

__all__ = ["render_html"]


def _pct(x: float) -> str:
    return "—" if not math.isfinite(x) else f"{100 * x:.1f} %"


def _legend(items: Sequence[tuple[str, str]]) -> str:
    return '<div class="legend">' + "".join(
        f'<span><i style="background:{c}"></i>{html.escape(name)}</span>' for name, c in items
    ) + "</div>"


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1280px;
padding:0 16px;color:#222;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:3px 10px;border-bottom:1px solid #eee;
text-align:right;vertical-align:top}th{background:#f6f6f6}td.l,th.l{text-align:left}
.muted{color:#666;font-size:.92em}.notes li{margin:.2em 0}
.plots{display:flex;flex-wrap:wrap;gap:18px}.plots figure{margin:0}
figcaption{font-size:.9em;color:#444;max-width:600px}
.legend span{margin-right:14px;font-size:.9em}.legend i{display:inline-block;width:12px;
height:12px;margin-right:4px;vertical-align:-1px}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px}
.card{border:1px solid #ddd;border-radius:6px;padding:6px;font-size:.82em;background:#fafafa;
overflow-wrap:anywhere}
.card .thumb{width:96px;height:96px;display:flex;align-items:center;justify-content:center;
margin:0 auto 4px;background:#fff;border:1px solid #eee}
.card img{max-width:96px;max-height:96px}.card img.px{image-rendering:pixelated}
.card .missing{color:#a33;font-size:.9em;text-align:center;padding:4px}
.card .key{font-family:ui-monospace,monospace;font-size:.95em}.card .cap{font-style:italic}
"""


def _card(s: Sample) -> str:
    if s.image is not None:
        w, h = s.size or (THUMB_PX, THUMB_PX)
        scale = THUMB_PX / max(w, h)
        cls = ' class="px"' if scale > 1 else ""
        thumb = (f'<img{cls} src="{s.image}" width="{max(1, round(w * scale))}" '
                 f'height="{max(1, round(h * scale))}" alt="{html.escape(s.key)}">')
    else:
        thumb = f'<div class="missing">{html.escape(s.problem or "no image")}</div>'
    lines = [
        f'<div class="thumb">{thumb}</div>',
        f'<div class="key">{html.escape(s.key)}</div>',
    ]
    if s.caption is not None:
        lines.append(f'<div class="cap">“{html.escape(s.caption[:200])}”</div>')
    lines.append(
        f"<div>selected {s.selected} of {s.seen} · mean score "
        f"{html.escape(fmt(s.mean_score))}</div>"
    )
    for k, v in list(s.fields.items())[:6]:
        lines.append(f'<div class="muted">{html.escape(k)}: {html.escape(v[:60])}</div>')
    return '<div class="card">' + "".join(lines) + "</div>"


def _mode_text(counts: Mapping[int, int]) -> str:
    if not counts:
        return "—"
    mode = max(counts, key=lambda k: (counts[k], k))
    if len(counts) == 1:
        return f"{mode:,}"
    return f"{mode:,} ({min(counts):,}–{max(counts):,})"


def _config_section(d: ReportData) -> str:
    out = ["<h2>The run</h2>"]
    head = ("log", "examples seen", "selected", "super-batches", "steps", "epochs",
            "B (examples per super-batch)", "b (selected per super-batch)", "b/B")
    out.append("<table><tr>" + "".join(
        f'<th class="{"l" if i == 0 else ""}">{h}</th>' for i, h in enumerate(head)) + "</tr>")
    for s in d.logs:
        mode_b = max(s.super_batch, key=lambda k: (s.super_batch[k], k)) if s.super_batch else 0
        mode_k = max(s.sub_batch, key=lambda k: (s.sub_batch[k], k)) if s.sub_batch else 0
        ratio = fmt(mode_k / mode_b, 3) if mode_b else "—"
        epochs = (f"{min(s.epochs)}–{max(s.epochs)}" if len(s.epochs) > 1
                  else ", ".join(map(str, s.epochs)) or "—")
        steps = "—" if s.first_step is None else f"{s.first_step:,}–{s.last_step:,}"
        out.append(
            f'<tr><td class="l">{html.escape(s.name)}<br><span class="muted">'
            f"{html.escape(s.path)}</span></td><td>{s.rows:,}</td><td>{s.selected:,}</td>"
            f"<td>{s.steps:,}</td><td>{steps}</td><td>{epochs}</td>"
            f"<td>{_mode_text(s.super_batch)}</td><td>{_mode_text(s.sub_batch)}</td>"
            f"<td>{ratio}</td></tr>"
        )
    if len(d.logs) > 1:
        out.append(
            f'<tr><th class="l">all</th><th>{d.rows:,}</th><th>{d.selected:,}</th>'
            f"<th>{sum(s.steps for s in d.logs):,}</th><th></th><th></th><th></th><th></th>"
            "<th></th></tr>"
        )
    out.append("</table>")
    out.append('<p class="muted">B and b are the most common values over the super-batches '
               "(the range in brackets when they vary); b/B is the filtering ratio they imply.</p>")
    known = ("ratio", "n_chunks", "criterion", "loss")
    rows = [(k, d.config[k]) for k in known if k in d.config]
    rows += [(k, v) for k, v in d.config.items() if k not in known]
    if rows:
        out.append('<table><tr><th class="l">configuration</th><th class="l">value</th></tr>')
        for k, v in rows:
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            out.append(f'<tr><td class="l">{html.escape(str(k))}</td>'
                       f'<td class="l">{html.escape(str(text))}</td></tr>')
        out.append("</table>")
        missing = [k for k in known if k not in d.config]
        if missing:
            out.append(f'<p class="muted">Not given: {", ".join(missing)}.</p>')
    else:
        out.append('<p class="muted">Configuration: no run configuration was recorded beside '
                   "the log (LOG.run.json, which JESTLoader writes) and none was given; pass "
                   "--config FILE.json (or write_report(config=...)) to show it here.</p>")
    return "".join(out)


def _scores_section(d: ReportData) -> str:
    out = ["<h2>Scores</h2>", '<p class="muted">A score is the example\'s own score under the '
           "run's criterion, as logged (learnability, the default: learner loss minus reference "
           "loss, higher is more learnable). JEST draws sub-batches jointly, so selected "
           "examples need not be the top scores.</p>"]
    if d.hist is None:
        out.append("<p>No finite scores in the log.</p>")
        return "".join(out)
    sc = d.score
    out.append('<table><tr><th class="l"></th><th>examples</th><th>mean score</th><th>min</th>'
               "<th>max</th></tr>")
    for g in ("selected", "rejected"):
        s = sc[g]
        out.append(f'<tr><td class="l">{g}</td><td>{s["n"]:,}</td><td>{fmt(s["mean"])}</td>'
                   f'<td>{fmt(s["min"])}</td><td>{fmt(s["max"])}</td></tr>')
    out.append("</table>")
    h = d.hist
    below, above = h["below"].sum(), h["above"].sum()
    tail = ""
    if below or above:
        tail = (f" {int(below):,} scores below {fmt(float(h['edges'][0]))} and {int(above):,} "
                f"above {fmt(float(h['edges'][-1]))} are outside the plot.")
    out.append(
        '<div class="plots"><figure>' + hist_svg(h)
        + _legend([("selected", SEL_COLOR), ("rejected", REJ_COLOR)])
        + "<figcaption>Distribution of the logged scores of selected and rejected examples, "
        "each as a share of its group (exact counts on hover)." + tail + "</figcaption></figure>"
    )
    st = d.steps
    if st is not None and len(st["x"]):
        per = int(st["group"])
        note = f" Each point sums {per:,} steps." if per > 1 else ""
        share = st["share"][np.isfinite(st["share"])]
        fixed = (f" The selected share itself stays at {float(share.mean()):.1%} of the examples "
                 "seen (the ratio)." if len(share) else "")
        out.append(
            "<figure>" + lines_svg(
                st["x"], [("score margin", st["mean_selected"] - st["mean_rejected"],
                           SEL_COLOR)],
                "selected − rejected mean score", "score margin over training")
            + "<figcaption>Mean score of the selected minus that of the rejected examples: how "
            "far the selection pulls away from what it leaves." + fixed + note
            + "</figcaption></figure>"
        )
        out.append(
            "<figure>" + lines_svg(
                st["x"],
                [("selected", st["mean_selected"], SEL_COLOR),
                 ("rejected", st["mean_rejected"], REJ_COLOR),
                 ("all", st["mean_all"], "#555")],
                "mean score", "mean score over training")
            + _legend([("selected", SEL_COLOR), ("rejected", REJ_COLOR), ("all", "#555")])
            + "<figcaption>Mean score of the selected, rejected and all examples seen."
            + note + "</figcaption></figure>"
        )
        learn = st["learnability"]
        if np.isfinite(learn).any():
            names = [("selected", SEL_COLOR), ("independent draw", "#2ca02c"),
                     ("uniform draw", REJ_COLOR)]
            out.append(
                "<figure>" + lines_svg(
                    st["x"], [(n, learn[j], c) for j, (n, c) in enumerate(names)],
                    "batch learnability", "batch learnability over training")
                + _legend(names)
                + "<figcaption>Learnability of the selected sub-batch as a whole (pairwise "
                "terms included) against an independent and a uniform draw of its size from "
                "the same super-batch, as logged with batch_learnability=True." + note
                + "</figcaption></figure>"
            )
    out.append("</div>")
    return "".join(out)


def _fields_section(d: ReportData) -> str:
    if not d.fields:
        return ""
    out = ["<h2>By sample field</h2>"]
    st = d.steps
    for name, f in d.fields.items():
        seen, sel = f["seen"], f["selected"]
        tot_seen, tot_sel = seen.sum(0), sel.sum(0)
        all_sel = tot_sel.sum()
        out.append(f"<h3>{html.escape(name)}</h3>")
        out.append(f'<table><tr><th class="l">{html.escape(name)}</th><th>seen</th>'
                   "<th>selected</th><th>selection rate</th><th>share of seen</th>"
                   "<th>share of selected</th></tr>")
        for j, v in enumerate(f["values"]):
            rate = tot_sel[j] / tot_seen[j] if tot_seen[j] else math.nan
            out.append(
                f'<tr><td class="l">{html.escape(v)}</td><td>{int(tot_seen[j]):,}</td>'
                f"<td>{int(tot_sel[j]):,}</td><td>{_pct(rate)}</td>"
                f"<td>{_pct(tot_seen[j] / tot_seen.sum())}</td>"
                f"<td>{_pct(tot_sel[j] / all_sel if all_sel else math.nan)}</td></tr>"
            )
        out.append("</table>")
        if st is None:
            continue
        lo, hi, group = int(st["lo"]), int(st["hi"]), int(st["bin_group"])
        # coarser than the score plots, as each value gets a share of a bin's examples: at most
        # 40 points, and about 200 examples per value and point on average
        per_bin = seen.sum() / max(1, hi - lo)
        group = max(group, math.ceil((hi - lo) / 40),
                    math.ceil(200 * len(f["values"]) / max(per_bin, 1e-9)))
        group = min(group, max(1, hi - lo))
        starts = np.arange(lo, hi, group)
        s_seen = np.add.reduceat(seen[lo:hi], starts - lo, axis=0)
        s_sel = np.add.reduceat(sel[lo:hi], starts - lo, axis=0)
        x = (int(st["i0"]) + starts) * float(st["width"])
        with np.errstate(invalid="ignore", divide="ignore"):
            rate = s_sel / s_seen
            comp = s_sel / s_sel.sum(1, keepdims=True)
        colors = [COLORS[j % len(COLORS)] for j in range(len(f["values"]))]
        rate_series = [(v, rate[:, j], colors[j]) for j, v in enumerate(f["values"])]
        comp_series = [(v, comp[:, j], colors[j]) for j, v in enumerate(f["values"])]
        per = group * int(float(st["width"]))
        out.append(
            '<div class="plots"><figure>'
            + lines_svg(x, rate_series, "selection rate", f"selection rate per {name}", True)
            + f"<figcaption>Share of the examples of each {html.escape(name)} that were selected"
            f" (each point sums {per:,} steps).</figcaption></figure><figure>"
            + lines_svg(x, comp_series, "share of selected", f"selected batch by {name}", True)
            + f"<figcaption>Composition of the selected examples by {html.escape(name)}."
            "</figcaption></figure></div>"
            + _legend([(v, colors[j]) for j, v in enumerate(f["values"])])
        )
    return "".join(out)


def render_html(d: ReportData) -> str:
    """The page for ``d``: one self-contained HTML document (no script, no network)."""
    share = d.selected / d.rows if d.rows else math.nan
    head = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "img-src data:; style-src 'unsafe-inline'\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(d.title)}</title><style>{_CSS}</style></head><body>"
    )
    body = [f"<h1>{html.escape(d.title)}</h1>"]
    logs = ", ".join(s.path for s in d.logs)
    body.append(f'<p class="muted">Logs: {html.escape(logs)}<br>Samples: '
                f"{html.escape(d.shards)}</p>")
    if d.rows:
        body.append(
            f"<p><b>{d.rows:,}</b> examples seen ({d.unique_keys:,} distinct keys), "
            f"<b>{d.selected:,}</b> selected ({_pct(share)}).</p>"
        )
    else:
        body.append("<p><b>The selection log is empty</b>: no example was recorded.</p>")
    if d.notes:
        body.append('<h2>Notes</h2><ul class="notes">' + "".join(
            f"<li>{html.escape(n)}</li>" for n in d.notes[:200]) + "</ul>")
        if len(d.notes) > 200:
            body.append(f'<p class="muted">... and {len(d.notes) - 200} more notes.</p>')
    body.append(_config_section(d))
    if d.rows:
        body.append(_scores_section(d))
        body.append(_fields_section(d))
    for title, why, samples in d.galleries:
        body.append(f"<h2>{html.escape(title)}</h2><p class=\"muted\">{html.escape(why)}; "
                    "score: the key's mean logged score.</p>")
        if samples:
            body.append('<div class="gallery">' + "".join(_card(s) for s in samples) + "</div>")
        else:
            body.append("<p>No sample in this group.</p>")
    return head + "".join(body) + "</body></html>\n"
