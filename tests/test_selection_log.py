from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import SELECTION_LOG_V1, write_selection_log_v2

from jeststream.cli import main as cli_main
from jeststream.selection_log import COLUMNS, SelectionLog, inspect_main, read_selection_log

FORMATS = ["log.parquet", "log.jsonl"]


def _write_steps(log: SelectionLog, steps, size=6, epoch=0, offset=0.0):
    for step in steps:
        scores = torch.arange(size, dtype=torch.float32) + step * 10 + offset
        selected = torch.zeros(size, dtype=torch.bool)
        selected[: size // 3] = True
        keys = [f"k{step}_{i}" for i in range(size)]
        log.write(keys=keys, epoch=epoch, step=step, scores=scores, selected=selected)


@pytest.mark.parametrize("name", FORMATS)
def test_roundtrip_and_bounded_flush(tmp_path, name):
    path = tmp_path / name
    with SelectionLog(path, flush_every=7) as log:
        _write_steps(log, range(5))
        # bounded memory: never more than flush_every buffered rows
        assert log._n_buf < 7
        log.flush()
        assert log.rows_written == 30
    cols = read_selection_log(path)
    assert len(cols["key"]) == 30
    assert cols["key"][:3] == ["k0_0", "k0_1", "k0_2"]
    assert cols["step"].tolist() == [s for s in range(5) for _ in range(6)]
    assert cols["pos"].tolist() == list(range(6)) * 5
    assert cols["selected"].sum() == 10
    np.testing.assert_allclose(cols["score"][6:12], np.arange(6) + 10)
    if name.endswith(".parquet"):
        # a directory of segments, one per flush: steps 0-1, 2-3 (flush_every) and 4 (flush())
        names = sorted(p.name for p in path.iterdir())
        assert names == [f"part-{i:06d}.parquet" for i in range(3)]
        assert all((path / n).read_bytes()[:4] == b"PAR1" for n in names)
    else:
        header, first = map(json.loads, path.read_text().splitlines()[:2])
        assert header == {"jeststream_selection_log": 2, "columns": list(COLUMNS)}
        assert first == ["k0_0", 0, 0, 0, 0.0, True]  # one example: its per-example fields


@pytest.mark.parametrize("name", FORMATS)
def test_append_across_resume_keeps_last_records(tmp_path, name):
    path = tmp_path / name
    with SelectionLog(path) as log:
        _write_steps(log, range(4))  # interrupted run logged steps 0..3
    with SelectionLog(path) as log:  # resumed from the checkpoint at step 2
        _write_steps(log, range(2, 6), offset=0.5)
    cols = read_selection_log(path)
    assert cols["step"].tolist() == [s for s in range(6) for _ in range(6)]
    # steps 2, 3 come from the resumed run
    assert cols["score"][12] == pytest.approx(20.5)
    assert cols["score"][0] == pytest.approx(0.0)
    raw = read_selection_log(path, dedupe=False)
    assert len(raw["step"]) == 48
    # mode="w" starts afresh
    with SelectionLog(path, mode="w") as log:
        _write_steps(log, [9])
    assert read_selection_log(path)["step"].tolist() == [9] * 6


def test_no_keys_and_nan_scores(tmp_path):
    path = tmp_path / "log.jsonl"
    with SelectionLog(path) as log:
        log.write(
            keys=None,
            epoch=1,
            step=0,
            scores=torch.tensor([math.nan, 1.0]),
            selected=torch.tensor([True, False]),
        )
    cols = read_selection_log(path)
    assert cols["key"] == [None, None]
    assert math.isnan(cols["score"][0]) and cols["epoch"].tolist() == [1, 1]


def test_write_validates(tmp_path):
    with SelectionLog(tmp_path / "l.jsonl") as log:
        with pytest.raises(ValueError, match="selected has 2"):
            log.write(keys=None, epoch=0, step=0, scores=torch.zeros(3), selected=torch.zeros(2))
        with pytest.raises(ValueError, match="got 1 keys"):
            log.write(keys=["a"], epoch=0, step=0, scores=torch.zeros(3), selected=torch.zeros(3))
    with pytest.raises(ValueError, match="flush_every"):
        SelectionLog(tmp_path / "x.jsonl", flush_every=0)
    with pytest.raises(RuntimeError, match="closed"):
        log.write(keys=None, epoch=0, step=0, scores=torch.zeros(1), selected=torch.zeros(1))


@pytest.mark.parametrize("name", FORMATS)
def test_inspect_summary_and_export(tmp_path, name, capsys):
    path = tmp_path / name
    with SelectionLog(path) as log:
        _write_steps(log, range(3))
    out_txt = tmp_path / "curated.txt"
    rc = cli_main(["inspect", str(path), "--top", "2", "--export-selected", str(out_txt)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "examples seen: 18" in text
    assert "selected: 6 (33.3%)" in text
    assert "q50=" in text
    top_line = text.split("top keys by score")[1].splitlines()[1]
    assert "k2_5" in top_line  # highest score
    bottom_line = text.split("bottom keys by score")[1].splitlines()[1]
    assert "k0_0" in bottom_line
    assert out_txt.read_text().split() == ["k0_0", "k0_1", "k1_0", "k1_1", "k2_0", "k2_1"]

    assert inspect_main([str(path), "--json", "--top", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["examples_seen"] == 18 and summary["unique_keys"] == 18
    assert summary["score_quantiles"]["q00"] == 0.0 and summary["score_quantiles"]["q100"] == 25.0
    assert summary["top_keys"] == [{"key": "k2_5", "score": 25.0, "seen": 1, "selected": 0}]


def test_inspect_missing_file(tmp_path, capsys):
    assert inspect_main([str(tmp_path / "nope.parquet")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_old_single_file_parquet_is_read_but_refused_by_the_writer(tmp_path):
    """Logs of older versions are one Parquet file: still readable, never touched by a writer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "old.parquet"
    table = pa.table(
        {"key": ["a", "b"], "epoch": [0, 0], "step": [3, 3], "pos": pa.array([0, 1], pa.int32()),
         "score": pa.array([0.5, 1.5], pa.float32()), "selected": [True, False]}
    )
    pq.write_table(table, str(path))
    before = path.read_bytes()
    cols = read_selection_log(path)
    assert cols["key"] == ["a", "b"] and cols["step"].tolist() == [3, 3]
    for mode in ("a", "w"):
        with pytest.raises(ValueError, match=r"old\.parquet.*single Parquet file.*Move it aside"):
            SelectionLog(path, mode=mode)
    assert path.read_bytes() == before


def test_mode_w_replaces_the_segments_and_refuses_foreign_files(tmp_path, caplog):
    path = tmp_path / "log.parquet"
    with SelectionLog(path, flush_every=6) as log:
        _write_steps(log, range(3))
    (path / ".part-000003.parquet.tmp").write_bytes(b"PAR1 torn")  # a killed writer's leftover
    with SelectionLog(path, mode="w") as log:
        _write_steps(log, [7])
    assert sorted(p.name for p in path.iterdir()) == ["part-000000.parquet"]
    assert read_selection_log(path)["step"].tolist() == [7] * 6

    (path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"mode='w'.*'notes\.txt'.*new path"):
        SelectionLog(path, mode="w")
    assert sorted(p.name for p in path.iterdir()) == ["notes.txt", "part-000000.parquet"]
    with caplog.at_level("WARNING", logger="jeststream.selection_log"):
        with SelectionLog(path) as log:  # appending leaves them alone, and says so
            _write_steps(log, [8])
    assert "notes.txt" in caplog.text
    assert read_selection_log(path)["step"].tolist() == [7] * 6 + [8] * 6


def test_empty_segment_directory_reads_as_an_empty_log(tmp_path, capsys):
    path = tmp_path / "log.parquet"
    with SelectionLog(path):
        pass  # opened, no rows yet (e.g. killed before the first flush)
    assert path.is_dir() and list(path.iterdir()) == []
    cols = read_selection_log(path)
    assert cols["key"] == [] and cols["step"].dtype == np.int64 and len(cols["selected"]) == 0
    assert inspect_main([str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["examples_seen"] == 0


def test_segment_directory_reads_as_one_table_everywhere(tmp_path, capsys):
    """pyarrow.dataset, pandas, read_selection_log and `jeststream inspect` all see one table;
    a killed writer's temp file is skipped by all of them."""
    import pyarrow.dataset as ds

    path = tmp_path / "log.parquet"
    with SelectionLog(path, flush_every=12) as log:
        _write_steps(log, range(5))  # segments of steps 0-1, 2-3 and (at close) 4
    (path / ".part-000003.parquet.tmp").write_bytes(b"not parquet")
    assert path.is_dir() and len(list(path.glob("part-*.parquet"))) == 3

    table = ds.dataset(str(path), format="parquet").to_table()
    assert table.num_rows == 30 and table.column_names == list(COLUMNS)
    assert sorted(table.column("step").to_pylist()) == [s for s in range(5) for _ in range(6)]
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover -- pandas comes with the dev extras
        pytest.skip("pandas is not installed: pandas.read_parquet not checked")
    df = pd.read_parquet(path)
    assert len(df) == 30 and sorted(df["key"])[:2] == ["k0_0", "k0_1"]
    cols = read_selection_log(path)
    assert cols["step"].tolist() == [s for s in range(5) for _ in range(6)]
    assert inspect_main([str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["examples_seen"] == 30 and summary["super_batches"] == 5


def test_resume_after_a_crash_that_cut_a_jsonl_record(tmp_path):
    path = tmp_path / "log.jsonl"
    with SelectionLog(path) as log:
        _write_steps(log, range(2))
    text = path.read_text()
    path.write_text(text[: len(text) - 10])  # the last record is cut
    with SelectionLog(path) as log:
        _write_steps(log, range(2, 3))
    cols = read_selection_log(path)
    # only the cut record is lost; every record of the resumed run is readable
    assert cols["step"].tolist() == [0] * 6 + [1] * 5 + [2] * 6


def test_inspect_merges_per_rank_logs(tmp_path, capsys):
    """openclip-train writes sel.rank{R}.jsonl under torchrun; ranks share step numbers, so
    the logs are summarised together without one rank's records replacing another's."""
    paths = []
    for rank in range(2):
        path = tmp_path / f"sel.rank{rank}.jsonl"
        with SelectionLog(path) as log:
            for step in range(3):
                log.write(keys=[f"r{rank}s{step}_{i}" for i in range(4)], epoch=0, step=step,
                          scores=torch.arange(4.0), selected=torch.tensor([1, 0, 0, 0]).bool())
        paths.append(str(path))
    out_txt = tmp_path / "curated.txt"
    assert inspect_main([*paths, "--json", "--export-selected", str(out_txt)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["examples_seen"] == 24 and summary["super_batches"] == 6
    assert summary["unique_keys"] == 24 and summary["selected"] == 6
    assert len(out_txt.read_text().split()) == 6
    assert inspect_main(paths) == 0
    assert "2 logs" in capsys.readouterr().out


@pytest.mark.parametrize("name", FORMATS)
def test_log_left_open_is_closed_at_exit(tmp_path, name):
    """A loader that is never closed (an exception ends the script) must still leave a
    readable log: a Parquet file without its footer is lost entirely."""
    import subprocess
    import sys

    path = tmp_path / name
    code = (
        "import numpy as np\n"  # not torch: a child that starts in well under a second
        "from jeststream.selection_log import SelectionLog\n"
        f"log = SelectionLog({str(path)!r})\n"
        "log.write(keys=['a', 'b'], epoch=0, step=0, scores=np.zeros(2),"
        " selected=np.array([True, False]))\n"
        "log.cycle = [log]  # e.g. held by a loader in a reference cycle\n"
        "raise SystemExit('training crashed')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1 and "training crashed" in proc.stderr
    assert "could not close" not in proc.stderr, proc.stderr
    assert read_selection_log(path)["key"] == ["a", "b"]


def test_jsonl_records_are_standard_json_with_odd_keys(tmp_path):
    path = tmp_path / "log.jsonl"
    keys = ['a"b\\c', "ü→é", "k\n2", "plain"]
    scores = torch.tensor([0.1, math.nan, -math.inf, 2.5])
    with SelectionLog(path) as log:
        log.write(keys=keys, epoch=1, step=3, scores=scores, selected=torch.tensor([1, 0, 1, 0]))
        scores.zero_()  # the caller reusing its tensor must not change what was logged
    recs = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    rows = [dict(zip(COLUMNS, r)) for r in recs]
    assert [r["key"] for r in rows] == keys
    assert [r["score"] for r in rows] == [pytest.approx(0.1), None, None, 2.5]
    assert [r["selected"] for r in rows] == [True, False, True, False]
    assert read_selection_log(path)["key"] == keys


@pytest.mark.parametrize("name", FORMATS)
def test_batch_learnability_columns_roundtrip_and_summary(tmp_path, name, capsys):
    """The optional per-super-batch columns: written on every row of a step, NaN for steps
    logged without them (a log that gained them mid-way), summarised by `jeststream inspect`."""
    from jeststream.diagnostics import BatchLearnability
    from jeststream.selection_log import LEARNABILITY_COLUMNS

    path = tmp_path / name
    with SelectionLog(path, flush_every=6) as log:
        _write_steps(log, [0])  # no learnability: a segment / lines without the columns
        for step, (sel, ind, uni) in enumerate([(3.0, 1.0, 0.5), (5.0, 6.0, 1.5)], start=1):
            log.write(
                keys=[f"k{step}_{i}" for i in range(6)], epoch=0, step=step,
                scores=torch.zeros(6), selected=torch.arange(6) < 2,
                batch_learnability=BatchLearnability(sel, ind, uni, 0.5),
            )
        with pytest.raises(ValueError, match="selected, independent, uniform"):
            log.write(keys=None, epoch=0, step=9, scores=torch.zeros(2),
                      selected=torch.zeros(2), batch_learnability=(1.0,))
    cols = read_selection_log(path)
    assert set(LEARNABILITY_COLUMNS) <= set(cols)
    assert np.isnan(cols["batch_learnability"][:6]).all()
    assert cols["batch_learnability"][6:].tolist() == [3.0] * 6 + [5.0] * 6
    assert cols["batch_learnability_independent"][12:].tolist() == [6.0] * 6
    assert cols["batch_learnability_uniform"][6:12].tolist() == [0.5] * 6
    assert inspect_main([str(path), "--json"]) == 0
    bl = json.loads(capsys.readouterr().out)["batch_learnability"]
    assert bl["super_batches"] == 2  # step 0 has none
    assert bl["selected"]["mean"] == pytest.approx(4.0)
    assert bl["uniform"]["mean"] == pytest.approx(1.0)
    assert bl["selected_minus_independent"]["mean"] == pytest.approx(0.5)
    assert bl["selected_above_independent_share"] == pytest.approx(0.5)
    assert inspect_main([str(path)]) == 0
    text = capsys.readouterr().out
    assert "batch learnability over 2 super-batches" in text and "selected 4 ±" in text


def test_logs_without_learnability_read_as_before(tmp_path):
    path = tmp_path / "log.parquet"
    with SelectionLog(path) as log:
        _write_steps(log, range(2))
    assert set(read_selection_log(path)) == set(COLUMNS)
    assert "batch_learnability" not in cli_summary(path)


def cli_summary(path):
    from jeststream.selection_log import summarize

    return summarize(read_selection_log(path))


# -- format 2: batch-level values once per step; format 1 logs still read ------------------------

def _expected(cols):
    from jeststream.selection_log import LEARNABILITY_COLUMNS

    assert cols["key"] == [f"k{s}_{i}" for s in range(3) for i in range(6)]
    assert cols["epoch"].tolist() == [s // 2 for s in range(3) for _ in range(6)]
    assert cols["pos"].tolist() == list(range(6)) * 3
    assert np.isnan(cols["score"][11]) and cols["score"][12] == 20.25
    assert cols["selected"].tolist() == [i < 2 for i in range(6)] * 3
    learn = np.stack([cols[c] for c in LEARNABILITY_COLUMNS])
    assert np.isnan(learn[:, :6]).all()  # step 0 has none
    assert learn[:, 6:12].tolist() == [[1.5] * 6, [0.5] * 6, [0.125] * 6]
    assert learn[:, 12:].tolist() == [[2.5] * 6, [1.5] * 6, [0.125] * 6]


@pytest.mark.parametrize("name", FORMATS)
def test_format_2_example_rows_hold_per_example_fields_only(tmp_path, name):
    from jeststream.selection_log import STEP_COLUMNS

    path = tmp_path / name
    write_selection_log_v2(path, flush_every=12)  # segments of steps 0-1 and 2
    _expected(read_selection_log(path))
    if name.endswith(".parquet"):
        import pyarrow.dataset as ds
        import pyarrow.parquet as pq

        assert sorted(p.name for p in path.iterdir()) == [
            "_steps-000000.parquet", "_steps-000001.parquet",
            "part-000000.parquet", "part-000001.parquet",
        ]
        assert pq.read_schema(path / "part-000000.parquet").names == list(COLUMNS)
        steps = pq.read_table(path / "_steps-000000.parquet")
        assert steps.column_names == list(STEP_COLUMNS) and steps.num_rows == 1  # step 1 only
        table = ds.dataset(str(path), format="parquet").to_table()  # "_" files are skipped
        assert table.column_names == list(COLUMNS) and table.num_rows == 18
    else:
        recs = [json.loads(line) for line in path.read_text().splitlines()]
        assert recs[0] == {"jeststream_selection_log": 2, "columns": list(COLUMNS)}
        objects = [r for r in recs[1:] if isinstance(r, dict)]
        assert objects == [
            {"epoch": 0, "step": 1, "batch_learnability": 1.5,
             "batch_learnability_independent": 0.5, "batch_learnability_uniform": 0.125},
            {"epoch": 1, "step": 2, "batch_learnability": 2.5,
             "batch_learnability_independent": 1.5, "batch_learnability_uniform": 0.125},
        ]
        rows = [r for r in recs[1:] if isinstance(r, list)]
        assert len(rows) == 18 and all(len(r) == len(COLUMNS) for r in rows)
        assert rows[11] == ["k1_5", 0, 1, 5, None, False]  # NaN score: null


@pytest.mark.parametrize("name", FORMATS)
def test_format_1_logs_are_read_and_resumed(tmp_path, name, capsys):
    """Logs written by the previous format read as before, by read_selection_log and
    `jeststream inspect`, also once a resumed run has appended format-2 records to them."""
    import shutil

    fixture = SELECTION_LOG_V1 / name
    _expected(read_selection_log(fixture))
    assert inspect_main([str(fixture), "--json"]) == 0
    old = json.loads(capsys.readouterr().out)
    new_path = tmp_path / "new" / name
    write_selection_log_v2(new_path)
    assert inspect_main([str(new_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == old  # the same summary from either format
    assert old["batch_learnability"]["super_batches"] == 2
    assert old["batch_learnability"]["selected"]["mean"] == pytest.approx(2.0)

    path = tmp_path / name
    (shutil.copytree if fixture.is_dir() else shutil.copy)(fixture, path)
    write_selection_log_v2(path, steps=[2, 3], offset=0.5)  # resumed at step 2, in format 2
    cols = read_selection_log(path)
    assert cols["step"].tolist() == [s for s in range(4) for _ in range(6)]
    assert cols["score"][12] == 20.5  # step 2 from the resumed run
    assert cols["batch_learnability"][[0, 6, 12, 18]].tolist()[1:] == [1.5, 2.5, 3.5]
    assert inspect_main([str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["batch_learnability"]["super_batches"] == 3


def _v1_line(rec: dict) -> int:
    # format 1's lines were json.dumps(record, separators=(",", ":")) with float32 values
    # widened to float64 (so repr'd with up to 17 digits), batch-level values on every row
    return len(json.dumps(rec, separators=(",", ":"))) + 1


def test_bytes_per_example_row_at_the_demos_scale(tmp_path):
    """The demo's super-batch (b=128, n=5: 640 rows a step), its key shape and batch
    learnability: JSON lines at most a third of format 1's bytes, Parquet under 16 per row."""
    rng = np.random.default_rng(0)
    steps, size = 12, 640
    v1_bytes = 0
    paths = {name: tmp_path / name for name in FORMATS}
    logs = {name: SelectionLog(p) for name, p in paths.items()}
    for step in range(steps):
        keys = [f"pool-{i:06d}" for i in rng.permutation(16384)[:size]]
        scores = rng.normal(2.0, 3.0, size).astype(np.float32)
        selected = np.zeros(size, bool)
        selected[rng.choice(size, size // 5, replace=False)] = True
        learn = tuple(float(np.float32(v)) for v in rng.normal(900.0, 50.0, 3))
        for log in logs.values():
            log.write(keys=keys, epoch=0, step=step, scores=scores, selected=selected,
                      batch_learnability=learn)
        for pos, (k, sc, sel) in enumerate(zip(keys, scores.tolist(), selected.tolist())):
            v1_bytes += _v1_line({"key": k, "epoch": 0, "step": step, "pos": pos, "score": sc,
                                  "selected": sel, "batch_learnability": learn[0],
                                  "batch_learnability_independent": learn[1],
                                  "batch_learnability_uniform": learn[2]})
    for log in logs.values():
        log.close()
    rows = steps * size
    jsonl = paths["log.jsonl"].stat().st_size / rows
    parquet = sum(f.stat().st_size for f in paths["log.parquet"].iterdir()) / rows
    assert jsonl <= v1_bytes / rows / 3, (jsonl, v1_bytes / rows)
    assert parquet <= 16, parquet
    for p in paths.values():
        assert len(read_selection_log(p)["key"]) == rows
