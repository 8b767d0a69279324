"""Does deferred decoding cost the demo's JEST any learning? Issue 28's learning check.

    python benchmarks/deferred_learning.py run       [--seeds 0 1 2] [--steps N]
                                                     [--score-resolution R] [--quick]
    python benchmarks/deferred_learning.py summarise [--results DIR]

The demo's pool (jeststream.demo.data) written again as JPEG shards (quality 90, grey, from the
same uint8 pixels; the curated split that trains the reference and the held-out split stay as
the demo writes them). Per seed, three runs of the demo's training loop
(:func:`jeststream.demo.runs.run_method`, its default model and 2,000 steps, synchronous
current-learner scoring, the reference's embeddings of the JPEG pool from a reference cache):

- ``uniform``: the plain loader over the JPEG pool;
- ``jest-eager``: JEST whose base loader decodes every example in full; the learner scores them
  resized to R (JESTLoader's ``score_resolution``);
- ``jest-deferred``: JEST over ``webdataset_loader(deferred=True, score_resolution=R)``: the
  learner scores R-px views decoded at reduced scale (JPEG DCT scaling), and only the selected
  examples are decoded in full (bit-identical to the eager ones).

R defaults to 8, half the demo's 16-px side (a scale JPEG draft decoding serves, and the
pays-for-itself sweep's ``lowres`` group). At R = 16 the two scoring views are identical by
construction (tests/test_deferred_learning.py checks it). Both JEST runs of a seed see the same
super-batches and sampling draws, so their selections differ only through the views' scores and,
after the first difference, through the learners drifting apart: the per-step share of selected
examples that differ is read from the two runs' selection logs. The views' effect alone, without
the drift, is measured after the runs with one frozen trained model (:func:`view_agreement`).

Resumable: each run's result goes to its own JSON file under ``--results``/runs as soon as it
ends, with the git commit, its wall time and configuration; a later invocation skips runs whose
file exists (refusing one written with other settings). ``summarise`` writes summary.json and
summary.md beside them (:func:`jeststream.demo.report.summarise`: final accuracy, steps and
FLOPs to uniform's final accuracy).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import code_state, write_json  # noqa: E402

VARIANTS = ("uniform", "jest-eager", "jest-deferred")
RESULTS = Path("docs/experiments/deferred_learning")


def jpeg_shards(src: list[str], out_dir: Path, quality: int = 90) -> list[str]:
    """Copy webdataset shards with each sample's image re-encoded as JPEG (``jpg``, PIL,
    ``quality``, the image's own mode) beside its caption; the ``{split}-meta.json`` sidecar is
    copied too. Reused when written before (a ``.done`` marker)."""
    import webdataset as wds
    from PIL import Image

    from jeststream.adapters.webdataset import IMAGE_EXTS, decode_image, first_field

    split = Path(src[0]).name.rsplit("-", 1)[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    done = out_dir / f"{split}.done"
    if not done.exists():
        for old in out_dir.glob(f"{split}-*.tar"):
            old.unlink()
        n = 0
        with wds.ShardWriter(str(out_dir / f"{split}-%05d.tar"), maxcount=500, verbose=0,
                             mtime=0) as sink:
            for sample in wds.DataPipeline(wds.SimpleShardList(list(src)),
                                           wds.tarfile_to_samples()):
                ext, data = first_field(sample, IMAGE_EXTS)
                buf = io.BytesIO()
                with decode_image(data, ext) as im:
                    Image.frombytes(im.mode, im.size, im.tobytes()).save(
                        buf, format="JPEG", quality=quality
                    )
                sink.write({"__key__": sample["__key__"], "jpg": buf.getvalue(),
                            "txt": sample["txt"]})
                n += 1
        shutil.copyfile(Path(src[0]).parent / f"{split}-meta.json",
                        out_dir / f"{split}-meta.json")
        done.write_text(json.dumps({"samples": n, "quality": quality}))
    return sorted(str(p) for p in out_dir.glob(f"{split}-*.tar"))


class Setup:
    """The data, reference and FLOP counts every run of one configuration shares."""

    def __init__(self, cfg, work: Path, quality: int = 90) -> None:
        from jeststream.demo import report
        from jeststream.demo.data import WordTokenizer, prepare_shards
        from jeststream.demo.model import build_model
        from jeststream.demo.reference import reference_model_config
        from jeststream.demo.runs import measure_flops
        from jeststream.demo.shards import load_split

        self.cfg, self.work = cfg, work
        shards = prepare_shards(cfg.data, work / "data")
        self.shards = shards
        self.pool_shards = jpeg_shards(
            shards["pool"], work / f"jpeg-q{quality}-{cfg.data.fingerprint()}", quality
        )
        self.tokenizer = WordTokenizer(cfg.data.context_length, cfg.data.task)
        s = cfg.data.image_size
        self.pool = load_split(self.pool_shards, self.tokenizer, s)
        self.noise_of = dict(zip(self.pool["key"], self.pool["noise"]))
        self.heldout = load_split(shards["heldout"], self.tokenizer, s)
        self.flops = measure_flops(
            build_model(cfg.model, self.tokenizer.vocab_size, seed=0), cfg, self.tokenizer,
            self.pool["text"],
        )
        self.ref_tag = report.fingerprint({
            "data": cfg.data.identity(), "model": reference_model_config(cfg).identity(),
            "ref_steps": cfg.ref_steps, "lr": cfg.lr, "wd": cfg.weight_decay,
            "warmup": cfg.warmup, "b": cfg.batch_size,
        })
        self.references: dict[int, tuple] = {}

    def reference(self, seed: int) -> tuple:
        """(frozen reference, ReferenceCache of the JPEG pool, reference info) for ``seed``."""
        if seed not in self.references:
            from jeststream.demo.reference import (
                reference_embeddings,
                train_reference,
                write_reference_cache,
            )
            from jeststream.demo.shards import load_split
            from jeststream.reference_cache import ReferenceCache

            cfg = self.cfg
            path = self.work / "cache" / f"reference-{self.ref_tag}-seed{seed}.pt"
            curated = (
                None if path.exists()
                else load_split(self.shards["curated"], self.tokenizer, cfg.data.image_size)
            )
            model, ev = train_reference(cfg, curated, self.heldout, self.tokenizer, seed, path)
            cache_dir = self.work / "cache" / f"jpeg-pool-cache-{self.ref_tag}-seed{seed}"
            if cache_dir.exists():
                shutil.rmtree(cache_dir)
            write_reference_cache(model, reference_embeddings(model, self.pool),
                                  self.pool["key"], cache_dir, cfg)
            info = {
                **ev,
                "train_flops": cfg.ref_steps * self.flops["reference_train_step"],
                "pool_forward_flops": len(self.pool["key"]) * self.flops["per_example_forward"],
            }
            self.references[seed] = (model, ReferenceCache(cache_dir, reference=model), info)
        return self.references[seed]

    def run(self, variant: str, seed: int, selection_log: Path | None) -> dict:
        from jeststream.demo.runs import run_method

        reference, cache, _ = self.reference(seed)
        method = "uniform" if variant == "uniform" else "jest"
        return run_method(
            method, self.cfg, seed, self.pool_shards, self.heldout, self.noise_of,
            reference if method != "uniform" else None, self.tokenizer, self.flops,
            reference_cache=cache if method != "uniform" else None,
            selection_log=selection_log, deferred=variant == "jest-deferred",
        )


def view_agreement(setup: Setup, seed: int, resolution: int, steps: int = 50) -> dict:
    """The views' effect alone, at a trained model: JEST over the eager and the deferred base
    loader (the same super-batches and sampling draws) with one frozen learner snapshot -- the
    seed's reference, which has the learner's architecture and is trained (on the curated
    split) -- scoring at ``resolution``; per criterion, the share of the selected examples that
    differ, over ``steps`` steps. Learnability looks the reference's own term up in the cache
    (full-resolution pixels), so only the learner term sees the views; hard_learner scores the
    learner term alone."""
    import copy

    import numpy as np

    from jeststream.demo.shards import StreamLoader, model_input, view_model_input
    from jeststream.loader import JESTLoader

    reference, cache, _ = setup.reference(seed)
    learner = copy.deepcopy(reference)
    cfg = setup.cfg
    n = round(1 / cfg.ratio)
    out = {}
    for criterion in ("learnability", "hard_learner"):
        picks = {}
        for deferred in (False, True):
            view = {"deferred": True, "score_resolution": resolution} if deferred else {}
            base = StreamLoader(setup.pool_shards, cfg.batch_size, steps * n, setup.tokenizer,
                                seed=seed, **view)
            with JESTLoader(
                base, learner, cache if criterion == "learnability" else None, ratio=cfg.ratio,
                n_chunks=cfg.n_chunks, temperature=cfg.temperature, loss=cfg.model.loss,
                criterion=criterion, scoring="sync", seed=seed, score_resolution=resolution,
                score_transform=view_model_input if deferred else model_input,
            ) as jest:
                picks[deferred] = [set(keys) for _, _, keys in jest]
        diff = [len(b - a) / len(b) for a, b in zip(picks[False], picks[True])]
        out[criterion] = {"differ_share": float(np.mean(diff)), "steps": len(diff)}
    return out


def config(args):
    from jeststream.demo.runs import RunConfig

    cfg = RunConfig(score_resolution=args.score_resolution, steps=args.steps or 2000)
    if args.quick:  # the demo's --quick sizes, a few steps
        cfg = dataclasses.replace(
            cfg, steps=args.steps or 6, batch_size=16, ref_steps=6, eval_every=3,
            data=dataclasses.replace(cfg.data, pool_size=600, curated_size=64),
        )
    return cfg


def settings_key(cfg) -> dict:
    d = dataclasses.asdict(cfg)
    for k in ("methods", "seeds", "jobs", "threads", "preset"):
        d.pop(k)
    return json.loads(json.dumps(d))


def selected_per_step(log: Path) -> dict[int, set[str]]:
    """{step: keys selected at that step} from a run's selection log."""
    from jeststream.selection_log import read_selection_log

    cols = read_selection_log(log)
    out: dict[int, set[str]] = {}
    for key, step, sel in zip(cols["key"], cols["step"], cols["selected"]):
        if sel:
            out.setdefault(int(step), set()).add(str(key))
    return out


def selection_difference(eager_log: Path, deferred_log: Path, window: int = 50) -> dict:
    """Per step, the share of the deferred run's selected examples the eager run did not select
    at that step (same super-batches and sampling draws): the first step's (the same learner
    weights: the views alone), the first ``window`` steps', the whole run's, and per window."""
    import numpy as np

    a, b = selected_per_step(eager_log), selected_per_step(deferred_log)
    steps = sorted(set(a) & set(b))
    if not steps or len(steps) != len(a) or len(steps) != len(b):
        raise ValueError(f"the selection logs cover different steps ({len(a)} and {len(b)})")
    diff = np.array([len(b[s] - a[s]) / len(b[s]) for s in steps])
    ends = list(range(window, len(diff), window)) + [len(diff)]
    return {
        "first_step": float(diff[0]),
        f"first_{window}_steps": float(diff[:window].mean()),
        "whole_run": float(diff.mean()),
        "steps": len(diff),
        "windows": {"end_step": ends,
                    "mean": [float(diff[e - window if e >= window else 0 : e].mean())
                             for e in ends]},
    }


def run_all(args) -> None:
    import torch

    torch.set_num_threads(1)
    cfg = config(args)
    key = settings_key(cfg)
    runs_dir = args.results / "runs"
    work = args.results / "work"
    todo = []
    for seed in args.seeds:  # seed-major: a sweep cut short has whole seeds
        for variant in VARIANTS:
            path = runs_dir / f"{variant}-seed{seed}.json"
            if path.exists():
                stored = json.loads(path.read_text())["settings"]
                if stored != key:
                    diff = sorted(k for k in set(stored) | set(key) if stored.get(k) != key.get(k))
                    raise SystemExit(f"{path} was written with other settings (differing: {diff}); "
                                     "pass the same options or a new --results directory")
                continue
            todo.append((seed, variant, path))
    agree = [s for s in args.seeds if not (runs_dir / f"agreement-seed{s}.json").exists()]
    print(f"{len(args.seeds) * len(VARIANTS) - len(todo)} finished, {len(todo)} to run; "
          f"view agreement to measure for seeds {agree}", file=sys.stderr)
    if not todo and not agree:
        return
    code = code_state()
    t0 = time.perf_counter()
    setup = Setup(cfg, work, args.quality)
    print(f"setup {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    for seed, variant, path in todo:
        log = None
        if variant != "uniform":
            log = work / "logs" / f"{variant}-seed{seed}.parquet"
            if log.exists():  # a run cut short: start its log again
                shutil.rmtree(log) if log.is_dir() else log.unlink()
        result = setup.run(variant, seed, log)
        out = {
            "id": path.stem, "variant": variant, "seed": seed,
            "score_resolution": cfg.score_resolution, "jpeg_quality": args.quality,
            "settings": key, "config": dataclasses.asdict(cfg), "flops": setup.flops,
            "reference": setup.reference(seed)[2], "result": result, "wall_s": result["wall_s"],
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            **code,
        }
        if variant == "jest-deferred":
            eager = work / "logs" / f"jest-eager-seed{seed}.parquet"
            if eager.exists():
                out["selection_difference"] = selection_difference(eager, log)
        write_json(path, out)
        acc = result["curve"][-1]["accuracy"]
        print(f"done {path.stem}: accuracy {acc:.3f}, {result['wall_s']:.0f}s", file=sys.stderr)
    for seed in agree:  # after the runs: they are the headline
        t1 = time.perf_counter()
        res = {r: view_agreement(setup, seed, r, args.agreement_steps)
               for r in sorted({cfg.score_resolution, cfg.data.image_size})}
        write_json(runs_dir / f"agreement-seed{seed}.json", {
            "seed": seed, "settings": key, "steps": args.agreement_steps,
            "by_resolution": {str(r): v for r, v in res.items()},
            "wall_s": time.perf_counter() - t1, **code,
        })
        print(f"done agreement-seed{seed}: {json.dumps(res)}", file=sys.stderr)


def _mean_std(values: list[float]) -> dict:
    import numpy as np

    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else None,
            "per_seed": [float(x) for x in v]}


def summarise(results: Path) -> dict:
    """:func:`jeststream.demo.report.summarise` over the runs (the JEST variants as methods
    ``jest-eager`` and ``jest-deferred``), the selection differences and walls."""
    from jeststream.demo import report
    from jeststream.demo.data import DataConfig
    from jeststream.demo.model import ModelConfig
    from jeststream.demo.runs import RunConfig

    paths = sorted((results / "runs").glob("*.json"))
    files = [json.loads(p.read_text()) for p in paths if not p.name.startswith("agreement-")]
    agreement = {json.loads(p.read_text())["seed"]: json.loads(p.read_text())
                 for p in paths if p.name.startswith("agreement-")}
    if not files:
        raise SystemExit(f"no runs under {results / 'runs'}")
    d = files[0]["config"]
    seeds = sorted({f["seed"] for f in files})
    cfg = RunConfig(**{**d, "seeds": tuple(seeds), "methods": VARIANTS,
                       "data": DataConfig(**d["data"]), "model": ModelConfig(**d["model"])})
    runs = [{**f["result"], "method": f["variant"]} for f in files]
    refs = {f["seed"]: f["reference"] for f in files if f["variant"] != "uniform"}
    s = report.summarise(cfg, runs, refs, files[0]["flops"])
    s.pop("runs", None)
    diffs = {f["seed"]: f["selection_difference"] for f in files if "selection_difference" in f}
    return {
        "score_resolution": d["score_resolution"],
        "image_size": d["data"]["image_size"],
        "jpeg_quality": files[0]["jpeg_quality"],
        "steps": d["steps"],
        "seeds": seeds,
        "methods": s["methods"],
        "selection_difference": {
            k: _mean_std([diffs[x][k] for x in sorted(diffs)])
            for k in ("first_step", "first_50_steps", "whole_run")
        } if diffs else {},
        "selection_difference_per_seed": diffs,
        # the views alone, at one frozen trained model (view_agreement)
        "view_agreement": {
            f"{crit} at {res} px": _mean_std(
                [agreement[x]["by_resolution"][res][crit]["differ_share"] for x in sorted(agreement)]
            )
            for res in (next(iter(agreement.values()))["by_resolution"] if agreement else {})
            for crit in ("learnability", "hard_learner")
        },
        "wall_s": {f["id"]: f["wall_s"] for f in files},
        "commits": sorted({f.get("commit") or "?" for f in files}),
    }


def markdown(s: dict) -> str:
    seeds = s["seeds"]

    def row(label: str, st: dict, scale: float = 1.0, digits: int = 3) -> str:
        per = st.get("per_seed", {})
        per = dict(zip(seeds, per)) if isinstance(per, list) else per
        cells = ["—" if per.get(x, per.get(str(x))) is None
                 else f"{per.get(x, per.get(str(x))) * scale:.{digits}f}" for x in seeds]
        mean = "—" if st.get("mean") is None else (
            f"{st['mean'] * scale:.{digits}f} ± {(st.get('std') or 0) * scale:.{digits}f}")
        return f"| {label} | {mean} | " + " | ".join(cells) + " |"

    lines = [
        f"# Deferred vs eager decoding on the demo (JPEG q{s['jpeg_quality']}, scoring at "
        f"{s['score_resolution']} px of {s['image_size']}, {s['steps']} steps)",
        "",
        "Written by `python benchmarks/deferred_learning.py summarise`; commits "
        + ", ".join(c[:8] for c in s["commits"]) + ".",
        "",
        "| measure | mean ± std | " + " | ".join(f"seed {x}" for x in seeds) + " |",
        "|---|---|" + "---|" * len(seeds),
    ]
    for method, m in s["methods"].items():
        lines.append(row(f"{method}: final accuracy (%)", m["final_accuracy"], 100.0, 1))
        for k, label in (("steps_ratio_vs_uniform_budget", "steps to uniform's final ÷ budget"),
                         ("flops_ratio_vs_uniform", "FLOPs to uniform's final ÷ uniform's")):
            if k in m:
                lines.append(row(f"{method}: {label}", m[k]))
    for k, st in s["selection_difference"].items():
        lines.append(row(f"selected examples that differ, {k.replace('_', ' ')} (%)", st,
                         100.0, 1))
    for k, st in s.get("view_agreement", {}).items():
        lines.append(row(f"selected examples that differ, frozen trained model, {k} (%)", st,
                         100.0, 1))
    lines += ["", "training wall per run (s, shared 2-core machine, one run at a time): "
              + ", ".join(f"{k} {v:.0f}" for k, v in s["wall_s"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("run", "summarise"))
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="learner steps (default 2000)")
    p.add_argument("--score-resolution", type=int, default=8,
                   help="side of the learner's scoring view (default 8: half the demo's 16)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the pool")
    p.add_argument("--agreement-steps", type=int, default=50,
                   help="steps of the frozen-model view agreement per seed")
    p.add_argument("--quick", action="store_true", help="smoke test: a tiny pool, a few steps")
    args = p.parse_args(argv)
    if args.command == "summarise":
        s = summarise(args.results)
        write_json(args.results / "summary.json", s)
        (args.results / "summary.md").write_text(markdown(s))
        print(markdown(s))
        return 0
    run_all(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
