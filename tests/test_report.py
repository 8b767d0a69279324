"""`jeststream report`: the HTML page of a real JEST run over webdataset shards (two per-rank
logs, JSON lines and Parquet), checked as HTML, image by image, against the log read
independently, and rendered in headless Chromium; problem inputs; a 10^6-row log in bounded
memory (measured in a fresh process)."""

from __future__ import annotations

import base64
import dataclasses
import html.parser
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import make_tiny_clip, toy_tokenize
from PIL import Image

from jeststream.adapters.webdataset import webdataset_loader
from jeststream.cli import main as cli_main
from jeststream.loader import JESTLoader
from jeststream.report import collect_report, write_report
from jeststream.selection_log import SelectionLog, read_selection_log

NOISE = ("clean", "mismatched", "garbage")
PER_SHARD = 12
EPOCHS = 3


def _image(i: int, fmt: str) -> bytes:
    arr = np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def write_shards(root: Path, n: int, *, prefix: str = "s", bad_image: set[int] = frozenset()):
    """Shards of PNG/JPEG pairs whose ``json`` member carries a noise type and a label."""
    root.mkdir(parents=True, exist_ok=True)
    pattern = str(root / "shard-%04d.tar")
    with wds.ShardWriter(pattern, maxcount=PER_SHARD, verbose=0) as sink:
        for i in range(n):
            ext, fmt = ("png", "PNG") if i % 2 else ("jpg", "JPEG")
            meta = {"noise": NOISE[i % 3], "label": i % 4}
            sink.write({
                "__key__": f"{prefix}{i:05d}",
                ext: b"not an image" if i in bad_image else _image(i, fmt),
                "txt": f"a photo {i}",
                "json": json.dumps(meta).encode(),
            })
    return sorted(str(p) for p in root.glob("shard-*.tar"))


def _run(urls: list[str], log: Path, seed: int) -> None:
    base = webdataset_loader(urls, batch_size=4, tokenizer=toy_tokenize)
    learner, reference = make_tiny_clip(seed=seed), make_tiny_clip(seed=seed + 1)
    with JESTLoader(base, learner, reference, ratio=0.5, n_chunks=2, selection_log=log,
                    seed=seed) as jest:
        for epoch in range(EPOCHS):
            jest.set_epoch(epoch)
            for _ in jest:
                pass


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """Two 'ranks' (each a JESTLoader over half of the shards, with its own log) and the report
    written by the `jeststream report` command."""
    root = tmp_path_factory.mktemp("report")
    urls = write_shards(root / "wds", 4 * PER_SHARD)
    logs = [root / "sel.rank0.jsonl", root / "sel.rank1.parquet"]
    _run(urls[:2], logs[0], seed=0)
    _run(urls[2:], logs[1], seed=2)
    config = root / "config.json"
    config.write_text(json.dumps({"ratio": 0.5, "n_chunks": 2, "criterion": "learnability",
                                  "loss": "sigmoid"}))
    out = root / "report.html"
    rc = cli_main(["report", *map(str, logs), "--shards", "::".join(urls), "--config",
                   str(config), "--out", str(out), "--top", "6"])
    assert rc == 0
    return {"root": root, "urls": urls, "logs": logs, "out": out}


class _Checker(html.parser.HTMLParser):
    """Well-formedness: every element closed in order; collects img sources and text."""

    VOID = {"meta", "img", "br", "hr", "link", "input", "source", "wbr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.imgs: list[dict[str, str]] = []
        self.tags: Counter = Counter()
        self.text: list[str] = []
        self.doctype = False
        self.page_titles = 0  # <title> in <head> (SVG elements have titles too: tooltips)

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl.lower() == "doctype html"

    def handle_starttag(self, tag, attrs):
        self.tags[tag] += 1
        self.page_titles += tag == "title" and self.stack[-1:] == ["head"]
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        for name, value in attrs:
            if name in ("src", "href", "srcset") and value and not value.startswith("data:"):
                self.errors.append(f"<{tag} {name}={value[:40]!r}>: not inline")
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags[tag] += 1
        if tag == "img":
            self.imgs.append(dict(attrs))

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _check_html(page: str) -> _Checker:
    c = _Checker()
    c.feed(page)
    c.close()
    assert c.doctype, "no <!DOCTYPE html>"
    assert not c.errors, c.errors[:5]
    assert not c.stack, f"unclosed elements: {c.stack}"
    assert c.tags["html"] == c.tags["head"] == c.tags["body"] == c.page_titles == 1
    assert c.tags["script"] == 0 and c.tags["link"] == 0  # nothing to run, nothing to fetch
    return c


def _decode(src: str) -> Image.Image:
    head, data = src.split(",", 1)
    assert head in ("data:image/png;base64", "data:image/jpeg;base64"), head
    im = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
    im.load()
    return im


def _shown_keys(data) -> list[str]:
    return [s.key for _, _, samples in data.galleries for s in samples]


def test_report_of_a_real_run_is_valid_html_and_matches_the_log(real_run):
    page = real_run["out"].read_text(encoding="utf-8")
    c = _check_html(page)
    assert len(c.imgs) > 0
    for img in c.imgs:
        im = _decode(img["src"])
        assert im.size == (32, 32)  # the shards' images, at their own size
        assert img["alt"].startswith("s")

    # the same page, collected in-process: compare it with the log read independently
    urls, logs = real_run["urls"], real_run["logs"]
    data = collect_report(logs, urls, top=6)
    parts = [read_selection_log(p) for p in logs]
    assert [s.rows for s in data.logs] == [len(p["key"]) for p in parts]
    assert data.rows == sum(len(p["key"]) for p in parts) == EPOCHS * 4 * PER_SHARD
    assert [s.name for s in data.logs] == ["rank 0", "rank 1"]
    for s in data.logs:  # super-batch 8 (2 base batches of 4), 4 selected, 3 steps per epoch
        assert s.super_batch == {8: 3 * EPOCHS} and s.sub_batch == {4: 3 * EPOCHS}
        assert s.epochs == {e: 24 for e in range(EPOCHS)}
    seen, sel, ssum = Counter(), Counter(), Counter()
    for p in parts:
        for k, s, x in zip(p["key"], p["selected"].tolist(), p["score"].tolist()):
            seen[k] += 1
            sel[k] += s
            ssum[k] += x
    assert data.unique_keys == len(seen) == 4 * PER_SHARD
    assert data.selected == sum(sel.values())

    # the galleries: the keys the naive ranking gives, with the log's own counts
    titles = [t for t, _, _ in data.galleries]
    assert titles == ["Most selected", "Least selected", "Selected often", "Never selected"]
    g = {t: samples for t, _, samples in data.galleries}
    for samples in g.values():
        for s in samples:
            assert (s.seen, s.selected) == (seen[s.key], sel[s.key])
            assert s.mean_score == pytest.approx(ssum[s.key] / seen[s.key], rel=1e-5)
            assert s.caption == f"a photo {int(s.key[1:])}"
            assert s.fields["noise"] == NOISE[int(s.key[1:]) % 3]
            assert s.image is not None and s.problem is None
    mean = {k: ssum[k] / seen[k] for k in seen}
    most = sorted((k for k in seen if sel[k]),
                  key=lambda k: (-sel[k], -sel[k] / seen[k], -mean[k], k))[:6]
    least = sorted(seen, key=lambda k: (sel[k] / seen[k], -seen[k], mean[k], k))[:6]
    assert [s.key for s in g["Most selected"]] == most
    assert [s.key for s in g["Least selected"]] == least
    assert all(s.selected >= s.seen / 2 for s in g["Selected often"])
    assert all(s.selected == 0 for s in g["Never selected"])
    for key in _shown_keys(data):
        assert key in page

    # per field: selection counts per noise type, as the log and the shards' json say
    noise = data.fields["noise"]
    assert list(data.fields) == ["noise", "label"]  # the fewest values first
    assert noise["values"] == sorted(NOISE)  # by examples seen (all equal here), then name
    for j, value in enumerate(noise["values"]):
        keys = [k for k in seen if NOISE[int(k[1:]) % 3] == value]
        assert noise["seen"][:, j].sum() == sum(seen[k] for k in keys)
        assert noise["selected"][:, j].sum() == sum(sel[k] for k in keys)
    assert data.fields["label"]["values"] == ["0", "1", "2", "3"]

    # the run as recorded and as configured
    for text in ("rank 0", "rank 1", "learnability", "sigmoid", "n_chunks", "By sample field"):
        assert text in page
    assert data.notes == []
    svgs = page.count("<svg")
    assert svgs == 3 + 2 * 2  # histogram, share, mean score; 2 plots per field


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    # `make browser` (run by `make test`) installs Debian's chromium, or says why it could not
    unavailable = Path(__file__).resolve().parent.parent / "build" / "browser-unavailable"
    if unavailable.is_file():
        pytest.skip(f"no chromium: {unavailable.read_text().strip()} (make browser)")
    if shutil.which("apt-get"):
        pytest.fail("no chromium although apt-get is there: `make test` installs it "
                    "(apt-get install -y chromium)")
    pytest.skip("no chromium and no apt-get to install it (make test installs Debian's "
                "chromium where apt is available)")


def _browser(page: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr", "--v=0", *args, page.resolve().as_uri(),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


def _console(proc: subprocess.CompletedProcess) -> list[str]:
    # every console message (an error, a blocked resource, a CSP violation) is logged as
    # "...:CONSOLE..." on stderr with --enable-logging=stderr; the page runs no script at all
    return [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


def test_report_renders_in_headless_chromium(real_run, tmp_path):
    out = real_run["out"]
    shot = tmp_path / "report.png"
    proc = _browser(out, tmp_path, f"--screenshot={shot}", "--window-size=1280,2400")
    assert _console(proc) == []
    with Image.open(shot) as im:
        im.load()
        assert im.size == (1280, 2400)
        colors = im.convert("RGB").getcolors(1 << 20)
        assert colors is not None and len(colors) > 1000  # plots and thumbnails, not a blank

    dom = _browser(out, tmp_path, "--dump-dom")
    assert _console(dom) == []
    data = collect_report(real_run["logs"], real_run["urls"], top=6)
    text = _Checker()
    text.feed(dom.stdout)
    rendered = " ".join(text.text)
    shown = _shown_keys(data)
    assert len(shown) >= 18
    for key in shown:
        assert key in rendered

    # the console check itself catches what it must: a script error and a blocked fetch
    bad = tmp_path / "bad.html"
    bad.write_text(out.read_text().replace(
        "</body>", '<img src="http://127.0.0.1:9/x.png"><script>console.error("x")</script>'
        "</body>"))
    assert len(_console(_browser(bad, tmp_path, "--dump-dom"))) >= 2


def test_missing_keys_unreadable_images_and_empty_logs(tmp_path, capsys):
    urls = write_shards(tmp_path / "wds", PER_SHARD, bad_image={3})
    log = tmp_path / "sel.jsonl"
    keys = [f"s{i:05d}" for i in range(PER_SHARD)] + ["gone-1", "gone-2", "<b>odd&key</b>"]
    with SelectionLog(log) as w:
        for step in range(3):
            w.write(keys=keys, epoch=0, step=step, scores=torch.arange(len(keys)) * 0.1,
                    selected=torch.arange(len(keys)) >= len(keys) - 5)
        w.write(keys=None, epoch=0, step=3, scores=torch.full((4,), float("nan")),
                selected=torch.tensor([True, False, False, False]))
    # fields from sidecars: NAME-meta.json beside NAME-0000.tar (found), JSON lines (--meta)
    (tmp_path / "wds" / "shard-meta.json").write_text(json.dumps(
        {f"s{i:05d}": {"source": "web" if i % 2 else "book"} for i in range(PER_SHARD)}))
    lines = tmp_path / "quality.jsonl"
    lines.write_text("".join(json.dumps({"key": k, "quality": "hi" if k.startswith("s") else "lo"})
                             + "\n" for k in keys))
    out = write_report(log, urls, tmp_path / "r.html", top=4, meta=[lines])
    page = out.read_text(encoding="utf-8")
    c = _check_html(page)
    for img in c.imgs:
        _decode(img["src"])
    data = collect_report([log], urls, top=4, meta=[lines])
    assert sorted(data.fields) == ["label", "noise", "quality", "source"]
    assert data.fields["quality"]["values"] == ["hi", "lo"]
    assert data.fields["quality"]["seen"].sum(0).tolist() == [36, 9]
    assert data.fields["source"]["seen"].sum(0).tolist() == [18, 18, 9]  # book, web, unknown
    assert data.fields["source"]["values"][-1] == "(unknown)"
    notes = "\n".join(data.notes)
    assert "3 of the" in notes and "shown keys are not in the shards" in notes
    assert "gone-1" in notes and "3 of the log's 15 keys are not in the shards" in notes
    assert "4 of 49 records have no sample key" in notes
    assert "4 records have no finite score" in notes
    assert "sample s00003: image unreadable" in notes
    assert "&lt;b&gt;odd&amp;key&lt;/b&gt;" in page and "<b>odd" not in page
    by_key = {s.key: s for s in data.galleries[0][2] + data.galleries[1][2]}
    assert by_key["gone-2"].problem == "key not in the shards" and by_key["gone-2"].image is None
    assert by_key["s00003"].problem.startswith("image unreadable")

    # empty logs, both formats: a clear line, no crash
    empty = [tmp_path / "empty.jsonl", tmp_path / "empty.parquet"]
    for p in empty:
        SelectionLog(p).close()
    assert cli_main(["report", *map(str, empty), "--shards", urls[0],
                     "--out", str(tmp_path / "e.html")]) == 0
    page = (tmp_path / "e.html").read_text()
    _check_html(page)
    assert "The selection log is empty" in page and "the log is empty (no records)" in page
    assert "report:" in capsys.readouterr().out

    # a log that is not there: exit status 2 and the path named
    assert cli_main(["report", str(tmp_path / "nope.jsonl"), "--out", str(out)]) == 2
    assert "nope.jsonl does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["log.jsonl", "log.parquet"])
def test_resumed_log_counts_the_last_record_of_each_step(tmp_path, name):
    path = tmp_path / name
    for steps, offset in ((range(5), 0.0), (range(3, 7), 0.5)):  # resumed at step 3
        with SelectionLog(path) as w:
            for step in steps:
                w.write(keys=[f"k{(step * 6 + i) % 10}" for i in range(6)], epoch=0, step=step,
                        scores=torch.arange(6.0) + offset, selected=torch.arange(6) < 2)
    cols = read_selection_log(path)
    data = collect_report([path], None)
    (stats,) = data.logs
    assert stats.rows == len(cols["key"]) == 7 * 6 and stats.runs == 2
    assert stats.rewritten == 2 * 6 and stats.steps == 7
    seen = Counter(cols["key"])
    shown = {s.key: s.seen for _, _, ss in data.galleries for s in ss}
    assert shown and all(seen[k] == n for k, n in shown.items())
    assert data.score["selected"]["mean"] == pytest.approx(
        float(cols["score"][cols["selected"]].mean()))
    assert "no shards given" in "\n".join(data.notes)
    if name.endswith(".jsonl"):  # a record cut by a crash is skipped, as the reader does
        with open(path, "a") as f:
            f.write('{"key":"k1","epoch":0,"st')
        assert collect_report([path], None).rows == len(read_selection_log(path)["key"]) == 42


BIG_ROWS = 1_000_000

_MEASURE = textwrap.dedent("""
    import json, os, sys, threading, time, tracemalloc
    from jeststream.report import collect_report, render_html

    def rss_mb():  # resident now (Linux); ru_maxrss would keep the imports' peak
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    log, shards, small = sys.argv[1:4]
    collect_report([small], shards)  # warm-up: the lazy imports (pyarrow, pandas, PIL, torch)
    base, peak_rss, stop = rss_mb(), [0.0], threading.Event()

    def sample():
        while not stop.is_set():
            peak_rss[0] = max(peak_rss[0], rss_mb())
            stop.wait(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    tracemalloc.start()
    t = time.perf_counter()
    data = collect_report([log], shards)
    page = render_html(data)
    wall = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    stop.set()
    sampler.join()
    print(json.dumps({"rows": data.rows, "keys": data.unique_keys, "wall_s": round(wall, 2),
                      "tracemalloc_peak_mb": round(peak, 1),
                      "rss_peak_growth_mb": round(max(peak_rss[0], rss_mb()) - base, 1),
                      "key_table_mb": round(data.key_table_bytes / 2**20, 1),
                      "fields": sorted(data.fields), "page_bytes": len(page)}))
""")


def _write_big_log(path: Path, n_keys: int, epochs: int, super_batch: int, sub_batch: int):
    """A JEST-shaped log of n_keys * epochs rows, written as the log's own Parquet segments."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jeststream.selection_log.format import schema as _schema

    rng = np.random.default_rng(0)
    path.mkdir()
    ids = np.concatenate([rng.permutation(n_keys) for _ in range(epochs)])
    n = len(ids)
    steps = n // super_batch
    score = (rng.normal(size=n_keys)[ids] + rng.normal(scale=0.5, size=n)).astype(np.float32)
    noisy = score.reshape(steps, super_batch) + rng.gumbel(size=(steps, super_batch))
    selected = (np.argsort(np.argsort(-noisy, 1), 1) < sub_batch).reshape(-1)
    digits = (ids[:, None] // 10 ** np.arange(6, -1, -1)) % 10 + ord("0")
    keys = np.concatenate([np.full((n, 1), ord("k")), digits], 1).astype(np.uint8)
    keys = keys.view("S8").reshape(-1)
    step = np.repeat(np.arange(steps), super_batch)
    pos = np.tile(np.arange(super_batch, dtype=np.int32), steps)
    epoch = np.repeat(np.arange(epochs), n_keys)
    seg = 100_000
    for s, lo in enumerate(range(0, n, seg)):
        sl = slice(lo, lo + seg)
        table = pa.table(
            {"key": pa.array(keys[sl], pa.binary()).cast(pa.string()), "epoch": epoch[sl],
             "step": step[sl], "pos": pos[sl], "score": score[sl], "selected": selected[sl]},
            schema=_schema(),
        )
        pq.write_table(table, str(path / f"part-{s:06d}.parquet"))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="measures RSS via /proc")
def test_million_row_log_is_reported_in_bounded_memory(tmp_path):
    log = tmp_path / "big.parquet"
    _write_big_log(log, n_keys=BIG_ROWS // 4, epochs=4, super_batch=500, sub_batch=100)
    # shards holding a few of the log's keys (with fields): the field pass runs over 10^6 rows
    urls = write_shards(tmp_path / "wds", PER_SHARD, prefix="k00")
    small = tmp_path / "small.parquet"  # the warm-up reads Parquet too
    with SelectionLog(small) as w:
        w.write(keys=["k0000001"], epoch=0, step=0, scores=[0.0], selected=[True])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(log), "::".join(urls), str(small)],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print("10^6-row report:", json.dumps(result))
    assert result["rows"] == BIG_ROWS and result["keys"] == BIG_ROWS // 4
    assert result["fields"] == ["label", "noise"]
    # per key 28 bytes (8-byte key, 20 of counts and sums), and no per-row memory: holding the
    # rows as read_selection_log does takes ~130 MB of Python and numpy objects for this log
    assert result["key_table_mb"] < 8
    assert result["tracemalloc_peak_mb"] < 48
    assert result["rss_peak_growth_mb"] < 96


def test_batch_learnability_columns_are_plotted(tmp_path):
    """A log written with batch_learnability=True (three per-super-batch columns, written here
    line by line in the JSON-lines format) gets a plot of them over training."""
    path = tmp_path / "sel.jsonl"
    lines = []
    for step in range(4):
        for pos in range(4):
            lines.append(json.dumps({
                "key": f"k{step}{pos}", "epoch": 0, "step": step, "pos": pos,
                "score": float(pos), "selected": pos < 2, "batch_learnability": 1.0 + step,
                "batch_learnability_independent": 0.5 + step,
                "batch_learnability_uniform": None if step == 0 else 0.1,
            }))
    path.write_text("\n".join(lines) + "\n")
    data = collect_report([path], None)
    learn = data.steps["learnability"]
    np.testing.assert_allclose(learn[0], [1, 2, 3, 4])
    np.testing.assert_allclose(learn[1], [0.5, 1.5, 2.5, 3.5])
    np.testing.assert_allclose(learn[2], [np.nan, 0.1, 0.1, 0.1])
    from jeststream.report import render_html

    page = render_html(data)
    _check_html(page)
    assert 'aria-label="batch learnability over training"' in page
    # without the columns: no such plot
    assert "batch learnability" not in render_html(collect_report([_plain_log(tmp_path)], None))


@pytest.mark.parametrize("name", ["log.jsonl", "log.parquet"])
def test_report_reads_format_1_and_format_2_logs_alike(tmp_path, name):
    """A log of the previous format (batch-level values on every example row; the fixture was
    written by jeststream's selection_log.py at commit ed8ed12) and the same records written
    now (one step row per step) give the same report data."""
    from conftest import SELECTION_LOG_V1, write_selection_log_v2

    old = collect_report([SELECTION_LOG_V1 / name], None)
    write_selection_log_v2(tmp_path / name)
    new = collect_report([tmp_path / name], None)
    learn = old.steps["learnability"]
    np.testing.assert_allclose(learn[0], [np.nan, 1.5, 2.5])
    np.testing.assert_allclose(learn[1], [np.nan, 0.5, 1.5])
    np.testing.assert_allclose(learn[2], [np.nan, 0.125, 0.125])
    assert new.steps.keys() == old.steps.keys()
    for k in old.steps:
        np.testing.assert_array_equal(new.steps[k], old.steps[k])
    assert [dataclasses.asdict(s) | {"path": ""} for s in new.logs] == [
        dataclasses.asdict(s) | {"path": ""} for s in old.logs
    ]
    assert old.logs[0].rows == 18 and old.logs[0].non_finite == 1


def _plain_log(tmp_path: Path) -> Path:
    path = tmp_path / "plain.jsonl"
    with SelectionLog(path) as w:
        w.write(keys=["a", "b"], epoch=0, step=0, scores=[0.0, 1.0], selected=[True, False])
    return path


def test_mds_shards_give_thumbnails_and_fields(tmp_path):
    """MDS columns other than the image, caption and key are fields; the image decodes."""
    from streaming import MDSWriter

    out = tmp_path / "mds"
    columns = {"key": "str", "image": "png", "text": "str", "noise": "str", "label": "int"}
    with MDSWriter(out=str(out), columns=columns, size_limit=2_000) as writer:
        for i in range(30):
            img = Image.fromarray(np.full((24, 24, 3), i * 8, np.uint8))
            writer.write({"key": f"m{i:04d}", "image": img, "text": f"caption {i}",
                          "noise": NOISE[i % 3], "label": i % 2})
    assert len(list(out.glob("shard.*.mds"))) >= 2
    log = tmp_path / "sel.jsonl"
    with SelectionLog(log) as w:
        for step in range(3):
            w.write(keys=[f"m{step * 10 + i:04d}" for i in range(10)], epoch=0, step=step,
                    scores=torch.arange(10.0), selected=torch.arange(10) >= 7)
    data = collect_report([log], None, mds=out, top=3)
    assert data.notes == [] and data.shards == f"MDS {out}"
    assert sorted(data.fields) == ["label", "noise"]
    assert data.fields["noise"]["selected"].sum() == 9
    shown = [s for _, _, ss in data.galleries for s in ss]
    assert shown
    for s in shown:
        assert s.caption == f"caption {int(s.key[1:])}" and s.size == (24, 24)
        assert s.fields["noise"] == NOISE[int(s.key[1:]) % 3]
        assert _decode(s.image).getpixel((0, 0))[0] == int(s.key[1:]) * 8


def test_the_loader_records_its_configuration_beside_the_log(real_run, tmp_path):
    from jeststream.report import collect_report
    from jeststream.selection_log import read_run_config, run_config_path

    for log in real_run["logs"]:
        # beside the log, never inside a Parquet log's directory of segments
        assert run_config_path(log).is_file() and run_config_path(log).parent == log.parent
        config = read_run_config(log)
        assert config["ratio"] == 0.5 and config["n_chunks"] == 2 and config["n"] == 2
        # loss not given: the model's, softmax for open_clip's CLIP (no logit bias)
        assert config["criterion"] == "learnability" and config["loss"] == "softmax"
    # without --config the report shows what the loader recorded
    data = collect_report(real_run["logs"], real_run["urls"])
    assert data.config["ratio"] == 0.5 and data.config["loss"] == "softmax"
    # seeds differ between the two 'ranks': shown per log, not silently the first
    assert data.config["seed"] == "sel.rank0.jsonl: 0, sel.rank1.parquet: 2"
    out = tmp_path / "r.html"
    assert cli_main(["report", *map(str, real_run["logs"]), "--shards",
                     "::".join(real_run["urls"]), "--out", str(out)]) == 0
    page = out.read_text()
    assert "learnability" in page and "no run configuration was recorded" not in page
