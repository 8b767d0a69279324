from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

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
        assert json.loads(path.read_text().splitlines()[0])["key"] == "k0_0"


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
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["key"] for r in recs] == keys
    assert [r["score"] for r in recs] == [pytest.approx(0.1), None, None, 2.5]
    assert [r["selected"] for r in recs] == [True, False, True, False]


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
