"""The constructor's public options: ``scoring=`` (and its deprecated booleans), the selection
log as a path or a SelectionLog, ``last_info`` (and the deprecated ``return_info``), and a
docstring that documents every argument."""

from __future__ import annotations

import inspect
import json
import re
import threading
import warnings

import pytest
import torch

from jeststream import JESTLoader, SelectionLog
from jeststream.loader import SCORING, resolve_scoring
from jeststream.selection_log import read_selection_log, run_config_path

B = 8


def _selected(loader) -> list[list[int]]:
    out = []
    with loader:
        for _ in loader:
            out.append(loader.last_info.indices.tolist())
    return out


def _loader(tiny_clip, pair_batches, **kw):
    return JESTLoader(pair_batches(n_batches=20, b=B), tiny_clip(0), tiny_clip(1), ratio=0.25,
                      n_chunks=2, **kw)


def test_auto_scores_inline_on_the_cpu(tiny_clip, pair_batches):
    loader = _loader(tiny_clip, pair_batches)
    assert (loader.scoring, loader.async_scoring, loader.deterministic) == ("sync", False, False)
    before = {t.ident for t in threading.enumerate()}
    it = iter(loader)
    next(it)
    # synchronous: the caller's thread scores, no producer thread is started
    assert {t.ident for t in threading.enumerate()} <= before
    loader.close()


def test_auto_on_an_accelerator_is_lagged_with_prefetch_one():
    # the rule itself, on a device object (no accelerator is needed to resolve it)
    assert resolve_scoring("auto", None, None, None, torch.device("cuda", 0)) == (
        "lagged", True, True, 1
    )
    assert resolve_scoring("auto", None, None, None, torch.device("cpu")) == (
        "sync", False, False, 1
    )
    assert resolve_scoring("auto", None, None, 3, torch.device("cuda", 0))[3] == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_on_cuda_loader(tiny_clip, pair_batches):
    loader = JESTLoader(pair_batches(n_batches=8, b=B), tiny_clip(0).cuda(), tiny_clip(1).cuda(),
                        ratio=0.25, n_chunks=2)
    assert (loader.scoring, loader.prefetch) == ("lagged", 1)
    loader.close()


@pytest.mark.parametrize(
    "scoring, expected",
    [("sync", (False, False)), ("lagged", (True, True)), ("latest", (True, False))],
)
def test_each_scoring_name_sets_the_schedule(tiny_clip, pair_batches, scoring, expected):
    loader = _loader(tiny_clip, pair_batches, scoring=scoring)
    assert (loader.async_scoring, loader.deterministic) == expected
    assert loader.prefetch == 1 and loader.scoring == scoring
    assert loader._lag() == {"sync": 0, "lagged": 1, "latest": None}[scoring]
    loader.close()


def test_scoring_values_are_checked(tiny_clip, pair_batches):
    with pytest.raises(ValueError, match=r"scoring='async' is not one of \('auto', 'sync'"):
        _loader(tiny_clip, pair_batches, scoring="async")
    with pytest.raises(ValueError, match="pass scoring= alone"):
        _loader(tiny_clip, pair_batches, scoring="sync", async_scoring=False)
    assert SCORING == ("auto", "sync", "lagged", "latest")


@pytest.mark.parametrize(
    "old, new, prefetch",
    [
        ({"async_scoring": False}, "scoring='sync'", 2),
        ({"async_scoring": True}, "scoring='latest'", 2),
        ({"deterministic": True}, "scoring='lagged'", 2),
        ({"async_scoring": False, "deterministic": True}, "scoring='lagged'", 2),
    ],
)
def test_the_old_booleans_warn_and_keep_their_behaviour(tiny_clip, pair_batches, old, new,
                                                        prefetch):
    with pytest.warns(DeprecationWarning, match=re.escape(new)):
        loader = _loader(tiny_clip, pair_batches, **old)
    assert loader.prefetch == prefetch  # their default, as before
    assert loader.async_scoring == old.get("async_scoring", True)
    assert loader.deterministic == old.get("deterministic", False)
    loader.close()


def test_lagged_selects_what_the_old_deterministic_spelling_selected(tiny_clip, pair_batches):
    new = _selected(_loader(tiny_clip, pair_batches, scoring="lagged", prefetch=2))
    with pytest.warns(DeprecationWarning):
        old = _selected(_loader(tiny_clip, pair_batches, async_scoring=False, deterministic=True))
    assert new == old and len(new) == 5


def test_sync_selects_what_the_old_synchronous_spelling_selected(tiny_clip, pair_batches):
    new = _selected(_loader(tiny_clip, pair_batches))  # auto -> sync on the CPU
    with pytest.warns(DeprecationWarning):
        old = _selected(_loader(tiny_clip, pair_batches, async_scoring=False))
    assert new == old


def test_return_info_is_deprecated_for_last_info(tiny_clip, pair_batches):
    with pytest.warns(DeprecationWarning, match="loader.last_info"):
        loader = _loader(tiny_clip, pair_batches, return_info=True)
    with loader:
        batch, info = next(iter(loader))
        assert info is loader.last_info and batch[0].shape[0] == B
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default constructor warns about nothing
        _loader(tiny_clip, pair_batches).close()


def test_selection_log_object_carries_its_mode(tmp_path, tiny_clip, pair_batches):
    path = tmp_path / "sel.jsonl"
    _selected(_loader(tiny_clip, pair_batches, selection_log=path))
    first = len(read_selection_log(path)["step"])
    size = path.stat().st_size
    assert first == 5 * 4 * B
    # a fresh loader given the path again overwrites the log ...
    _selected(_loader(tiny_clip, pair_batches, selection_log=path))
    assert path.stat().st_size == size
    # ... given SelectionLog(path, mode="a") it appends, and closes the log when it closes
    log = SelectionLog(path, mode="a")
    _selected(_loader(tiny_clip, pair_batches, selection_log=log, seed=1))
    with pytest.raises(RuntimeError, match="is closed"):
        log.write(keys=None, epoch=0, step=0, scores=[0.0], selected=[True])
    assert path.stat().st_size > 1.9 * size
    assert len(read_selection_log(path)["step"]) == first  # the same steps: the latest kept
    config = json.loads(run_config_path(path).read_text())
    assert config["seed"] == 1 and config["scoring"] == "sync"


def test_selection_log_mode_is_deprecated_and_checked(tmp_path, tiny_clip, pair_batches):
    with pytest.warns(DeprecationWarning, match=r"SelectionLog\(path, mode='a'\)"):
        _loader(tiny_clip, pair_batches, selection_log=tmp_path / "a.jsonl",
                selection_log_mode="a").close()
    with pytest.raises(ValueError, match="must be 'auto', 'a' \\(append\\) or 'w'"):
        _loader(tiny_clip, pair_batches, selection_log=tmp_path / "a.jsonl",
                selection_log_mode="x")
    log = SelectionLog(tmp_path / "b.jsonl", mode="w")
    with pytest.raises(ValueError, match="carries its own mode \\('w'\\)"):
        _loader(tiny_clip, pair_batches, selection_log=log, selection_log_mode="a")
    log.close()
    with pytest.raises(TypeError, match="selection_log must be a path, a jeststream"):
        _loader(tiny_clip, pair_batches, selection_log=3)


def test_open_clip_append_log_is_deprecated(tmp_path, tiny_clip, pair_batches):
    from jeststream.adapters.open_clip import OpenCLIPJESTLoader

    path = tmp_path / "sel.jsonl"
    _selected(_loader(tiny_clip, pair_batches, selection_log=path))
    size = path.stat().st_size
    with pytest.warns(DeprecationWarning, match="SelectionLog\\(path, mode='a'\\)"):
        loader = OpenCLIPJESTLoader(pair_batches(n_batches=20, b=B), tiny_clip(0), tiny_clip(1),
                                    ratio=0.25, n_chunks=2, selection_log=str(path),
                                    append_log=True)
    _selected(loader)
    assert path.stat().st_size > 1.9 * size  # appended, not overwritten


def test_every_constructor_argument_is_documented():
    doc = JESTLoader.__doc__
    params = [p for p in inspect.signature(JESTLoader.__init__).parameters if p != "self"]
    documented = set()
    for line in doc.splitlines():
        m = re.match(r"\s{8}([a-z_, ]+):", line)
        if m:
            documented |= {name.strip() for name in m.group(1).split(",")}
    missing = [p for p in params if p not in documented]
    assert not missing, f"JESTLoader arguments without a docstring entry: {missing}"
