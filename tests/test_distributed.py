"""JESTLoader under real torch.distributed (gloo, CPU processes), as torchrun would run it.

- webdataset shards split by node and a DDP-wrapped learner trained by the consumer, with
  global selection (the default under torch.distributed): the indices equal a single-process
  ``blocked_joint_sample`` replay of the logged embeddings; uneven shards end the pass on
  every rank together (DDP would hang otherwise); "local" keeps per-rank selection.
- the protocol with a tiny model: a rank's base ends early, raises at step 3, yields NaN
  scores; ``break`` and a new pass; resume (and a different world size refused); a killed rank
  makes the other raise within the group's timeout. No thread or process group is left.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch
import torch.distributed as dist
from conftest import TINY_CONTEXT, toy_tokenize
from helpers import N_SHARDS, PER_SHARD, init_gloo, run_ranks, write_wds_shards

# Every test here shares a module fixture that runs real gloo ranks (tens of seconds in all).
pytestmark = pytest.mark.slow

WORLD = 2
B = 4  # training batch size
CTX = TINY_CONTEXT
tokenize = toy_tokenize


# ---------------------------------------------------------------------------------------------
# DDP learner on webdataset shards
# ---------------------------------------------------------------------------------------------


def _ddp_rank(rank: int, world: int, init_file: str, out_dir: str, runs: list[dict]) -> None:
    from conftest import make_tiny_clip
    from open_clip.loss import SigLipLoss

    from jeststream.adapters.webdataset import webdataset_loader
    from jeststream.loader import JESTLoader
    from jeststream.scoring import default_embed

    init_gloo(rank, world, init_file)
    try:
        for run in runs:
            learner = make_tiny_clip(seed=0, siglip=True)  # same init on every rank, as DDP expects
            ddp = torch.nn.parallel.DistributedDataParallel(learner)
            reference = make_tiny_clip(seed=1, siglip=True)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
            loss_fn = SigLipLoss()  # world_size 1: the consumer's loss; DDP all-reduces the grads
            logged = {"learner": [], "reference": []}

            def embed(model, batch, reference=reference, logged=logged):
                # the embeddings the selection sees, in scoring order
                e = default_embed(model, batch)
                who = "reference" if model is reference else "learner"
                logged[who].append([None if t is None else t.detach().float().clone() for t in e])
                return e

            # split_by_node reads the rank
            base = webdataset_loader(run["urls"], B, tokenizer=tokenize,
                                     num_samples=run["num_samples"])
            seen, losses, steps = [], [], []
            jest = JESTLoader(base, ddp, reference, ratio=0.5, n_chunks=2, loss="sigmoid",
                              embed=embed, return_info=True, distributed=run["distributed"])
            with jest:
                generator = jest.state_dict()["generator"]
                for (images, texts, keys), info in jest:
                    assert images.shape[0] == B and texts.shape == (B, CTX)
                    image_features, text_features, logit_scale, logit_bias = ddp(images, texts)
                    loss = loss_fn(image_features, text_features, logit_scale, logit_bias)
                    opt.zero_grad()
                    loss.backward()  # a gloo all-reduce per step on the default group
                    opt.step()
                    seen.extend(keys)
                    losses.append(float(loss))
                    steps.append({"generator": generator, "indices": info.indices})
                    generator = jest.state_dict()["generator"]
                stats = jest.stats
            # DDP kept the replicas identical: the loader never touched the live weights
            flat = torch.cat([p.detach().reshape(-1) for p in learner.parameters()])
            gathered = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(gathered, flat)
            same = all(torch.equal(gathered[0], g) for g in gathered)
            name = run["name"]
            torch.save({"steps": steps, "logged": logged},
                       os.path.join(out_dir, f"{name}.rank{rank}.pt"))
            with open(os.path.join(out_dir, f"{name}.rank{rank}.json"), "w") as f:
                json.dump({"keys": seen, "losses": losses, "replicas_equal": same,
                           "stats": stats}, f)
    finally:
        dist.destroy_process_group()


def _ddp_results(out_dir, name: str) -> list[dict]:
    return [json.loads((out_dir / f"{name}.rank{r}.json").read_text()) for r in range(WORLD)]


def _own_keys(urls, keys_by_shard, rank):
    return {k for i, u in enumerate(urls) if i % WORLD == rank for k in keys_by_shard[u]}


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """One spawn of 2 ranks for every DDP run (the open_clip import dominates a rank's start)."""
    tmp = tmp_path_factory.mktemp("ddp")
    even = write_wds_shards(tmp / "even")
    uneven = write_wds_shards(tmp / "uneven", n_shards=5)
    runs = [
        {"name": "global", "urls": even[0], "num_samples": None, "distributed": "auto"},
        {"name": "uneven_global", "urls": uneven[0], "num_samples": None,
         "distributed": "global"},
        # 10 batches per rank
        {"name": "uneven_local", "urls": uneven[0], "num_samples": 80, "distributed": "local"},
    ]
    codes = run_ranks(_ddp_rank, WORLD, str(tmp / "init"), str(tmp), runs)
    assert codes == [0] * WORLD
    return {"out": tmp, "even": even, "uneven": uneven}


def test_global_selection_with_ddp_learner_replays_exactly(ddp_runs):
    from jeststream.losses import Embeddings
    from jeststream.selection import blocked_joint_sample

    urls, keys_by_shard = ddp_runs["even"]
    out_dir = ddp_runs["out"]
    results = _ddp_results(out_dir, "global")
    per_rank = [set(r["keys"]) for r in results]
    for r, res in enumerate(results):
        assert len(res["keys"]) == len(per_rank[r]), "a key was yielded twice on one rank"
        # each rank yields its own node's examples (split_by_node: shard i -> rank i % 2)
        assert per_rank[r] <= _own_keys(urls, keys_by_shard, r)
        # 2 shards x 12 samples per rank, super-batches of 2 x 4, one batch of 4 kept from each
        assert len(res["keys"]) == (N_SHARDS // WORLD) * PER_SHARD // 2
        assert all(torch.isfinite(torch.tensor(res["losses"])))
        assert res["replicas_equal"]
        assert res["stats"]["distributed"]["mode"] == "global"
        assert res["stats"]["distributed"]["world_size"] == WORLD
    assert not per_rank[0] & per_rank[1]
    # replay: blocked_joint_sample over both ranks' logged embeddings, each rank's generator
    # restored to its state before that step, gives the indices every rank yielded
    logs = [torch.load(out_dir / f"global.rank{r}.pt", weights_only=False) for r in range(WORLD)]
    n_steps = len(logs[0]["steps"])
    assert n_steps == len(logs[1]["steps"]) == 3
    assert not torch.equal(logs[0]["steps"][0]["generator"], logs[1]["steps"][0]["generator"])
    for t in range(n_steps):
        learners = [Embeddings(*log["logged"]["learner"][t]) for log in logs]
        references = [Embeddings(*log["logged"]["reference"][t]) for log in logs]
        gens = []
        for log in logs:
            g = torch.Generator()
            g.set_state(log["steps"][t]["generator"])
            gens.append(g)
        replay = blocked_joint_sample(learners, references, [B] * WORLD, loss="sigmoid",
                                      n_chunks=2, generators=gens)
        for r, log in enumerate(logs):
            assert torch.equal(replay[r], log["steps"][t]["indices"]), (t, r)


def test_uneven_shards_global_ends_together_local_needs_num_samples(ddp_runs):
    """5 shards over 2 ranks (36 vs 24 examples). Global selection ends the pass on both ranks
    when rank 1's base ends (3 DDP steps each; a 4th on rank 0 alone would hang the
    all-reduce) and counts rank 0's unread super-batch; local selection relies on num_samples=
    to give both ranks the same steps."""
    urls, keys_by_shard = ddp_runs["uneven"]
    out_dir = ddp_runs["out"]
    glob = _ddp_results(out_dir, "uneven_global")
    for r, res in enumerate(glob):
        assert len(res["losses"]) == 3  # rank 1: 24 examples = 3 super-batches of 2 x 4
        assert set(res["keys"]) <= _own_keys(urls, keys_by_shard, r)
        assert res["replicas_equal"]
        d = res["stats"]["distributed"]
        assert d["ended_by"] == [1] and d["stopped_by"] == [] and d["failed_by"] == []
        assert d["unread_examples"][1] == 0
        assert d["unread_examples"][0] >= 8  # the super-batch rank 0 drew for step 3
    local = _ddp_results(out_dir, "uneven_local")
    for r, res in enumerate(local):
        assert len(res["losses"]) == 80 // (2 * B * WORLD)  # same steps on every rank
        assert set(res["keys"]) <= _own_keys(urls, keys_by_shard, r)
        assert res["replicas_equal"]
        assert res["stats"]["distributed"]["mode"] == "local"
        assert res["stats"]["distributed"]["passes"] == 1
    # local selection too seeds each rank by (seed, rank, epoch): no shared random stream
    gens = [torch.load(out_dir / f"uneven_local.rank{r}.pt", weights_only=False)["steps"][0]
            ["generator"] for r in range(WORLD)]
    assert not torch.equal(gens[0], gens[1])


# ---------------------------------------------------------------------------------------------
# The protocol, with a tiny model
# ---------------------------------------------------------------------------------------------


class _Base:
    """A base loader of ``n`` batches of 4 that raises when asked for batch ``fail_at``."""

    def __init__(self, n: int, seed: int, fail_at: int | None = None) -> None:
        from conftest import make_vector_batches

        self.batches = make_vector_batches(n, 4, seed=seed)
        self.fail_at = fail_at
        self.batch_size = 4

    def __iter__(self):
        for i, b in enumerate(self.batches):
            if i == self.fail_at:
                raise ValueError(f"boom in base batch {i}")
            yield b


def _live_threads() -> list[str]:
    for _ in range(100):
        alive = [t.name for t in threading.enumerate() if t.name.startswith("jeststream")]
        if not alive:
            return []
        time.sleep(0.05)
    return alive


def _n_groups() -> int:
    return len(dist.distributed_c10d._world.pg_map)


def _protocol_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from conftest import ResumableList, TinyDual, make_vector_batches, tiny_dual_embed

    from jeststream.loader import JESTLoader

    init_gloo(rank, world, init_file)
    out: dict = {}
    groups = _n_groups()

    def loader(base, **kw):
        kw = {"ratio": 0.5, "n_chunks": 2, "embed": tiny_dual_embed, "timeout": 20,
              "return_info": True, **kw}
        return JESTLoader(base, TinyDual(seed=0), TinyDual(seed=1), **kw)

    def run(name, base, **kw):
        got = {"batches": 0, "fallbacks": []}
        jest = loader(base, **kw)
        got["generator0"] = jest.state_dict()["generator"].float().sum().item()
        try:
            for _batch, info in jest:
                got["batches"] += 1
                got["fallbacks"].append(info.fallback)
        except Exception as exc:  # noqa: BLE001 -- recorded for the parent's assertions
            got["error"] = f"{type(exc).__name__}: {exc}"
        got["stats"] = jest.stats
        jest.close()
        got["threads"] = _live_threads()
        got["groups_left"] = _n_groups() - groups
        out[name] = got

    try:
        for mode in ("async", "sync"):
            kw = {"async_scoring": mode == "async"}
            # rank 1's base ends after 3 super-batches, rank 0's after 5
            run(f"end_{mode}", _Base(10 if rank == 0 else 6, rank), **kw)
            # rank 1's base raises at step 3 (its 7th base batch)
            run(f"raise_{mode}", _Base(10, rank, fail_at=6 if rank == 1 else None), **kw)

        def nan_at_step_1(model, batch, calls=[0]):  # noqa: B006 -- a call counter
            e = tiny_dual_embed(model, batch)
            calls[0] += 1
            if rank == 1 and calls[0] in (3, 4):  # step 1's two forwards
                e = e._replace(image=torch.full_like(e.image, float("nan")))
            return e

        run("nan_raise", _Base(8, rank), embed=nan_at_step_1)
        nan_at_step_1.__defaults__[0][0] = 0
        run("nan_uniform", _Base(8, rank), embed=nan_at_step_1, on_bad_scores="uniform")

        # break after 2 batches on both ranks, then a whole new pass on the same loader
        jest = loader(make_vector_batches(8, 4, seed=rank))
        counts, pass_stats = [], []
        for _ in range(2):
            n = 0
            for _ in jest:
                n += 1
                if len(counts) == 0 and n == 2:
                    break
            counts.append(n)
            pass_stats.append(jest.stats["distributed"])
        jest.close()
        out["break"] = {"counts": counts, "threads": _live_threads(), "stats": pass_stats,
                        "groups_left": _n_groups() - groups}

        # an uneven pass (rank 1's base ends first), then an even one on the same loader
        class _Passes:
            def __init__(self):
                self.lengths = [10 if rank == 0 else 6, 8]
                self.batch_size = 4

            def __iter__(self):
                yield from make_vector_batches(self.lengths.pop(0), 4, seed=rank)

        jest = loader(_Passes())
        pass_stats = []
        for _ in range(2):
            for _ in jest:
                pass
            pass_stats.append(jest.stats["distributed"])
        jest.close()
        out["passes"] = pass_stats

        # resume in the middle of a pass under the same world size
        def indices(it, n):
            return [next(it)[1].indices.tolist() for _ in range(n)]

        a = loader(ResumableList(make_vector_batches(12, 4, seed=10 + rank)), seed=5)
        it = iter(a)
        first = indices(it, 2)
        state = a.state_dict()
        rest = indices(it, 2)
        a.close()
        b = loader(ResumableList(make_vector_batches(12, 4, seed=10 + rank)), seed=5)
        b.load_state_dict(state)
        resumed = indices(iter(b), 2)
        try:
            b.load_state_dict({**state, "world_size": 3})
            refused = ""
        except ValueError as exc:
            refused = str(exc)
        b.close()
        out["resume"] = {"first": first, "rest": rest, "resumed": resumed, "refused": refused,
                         "world_size": state["world_size"], "rank": state["rank"]}

        # the batch-learnability diagnostic measures one super-batch: refused in global mode
        try:
            JESTLoader(make_vector_batches(4, 4), TinyDual(seed=0), TinyDual(seed=1), ratio=0.5,
                       embed=tiny_dual_embed, batch_learnability=True)
            out["learnability"] = ""
        except ValueError as exc:
            out["learnability"] = str(exc)

        # FSDP2 learners are refused at construction
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        sharded = TinyDual(seed=0)  # (fully_shard refuses its scalar logit_scale: shard a tower)
        fully_shard(sharded.img, mesh=init_device_mesh("cpu", (world,)))
        try:
            JESTLoader(make_vector_batches(4, 4), sharded, TinyDual(seed=1), ratio=0.5,
                       embed=tiny_dual_embed)
            out["fsdp"] = ""
        except ValueError as exc:
            out["fsdp"] = str(exc)
        out["groups_left"] = _n_groups() - groups

        def scenario(name: str, on_rank1) -> None:
            jest = loader(make_vector_batches(40, 4, seed=rank), timeout=3, return_info=False)
            got: dict = {}
            t0 = None
            try:
                for n, _ in enumerate(jest):
                    if rank == 1 and n == 1:
                        on_rank1()
                        break
                    if n == 1:
                        t0 = time.monotonic()
                    time.sleep(0.2)  # training; the producer works ahead meanwhile
            except Exception as exc:  # noqa: BLE001
                got["error"] = f"{type(exc).__name__}: {exc}"
            got["seconds"] = None if t0 is None else time.monotonic() - t0
            jest.close()
            got["threads"] = _live_threads()
            out[name] = got

        # rank 0's training step raises while rank 1 waits for it in a collective of the
        # default group (as DDP's all-reduce would): rank 0's farewell record finds no taker,
        # and rank 0 leaves after the farewell timeout, not the group's (20 s here)
        import jeststream.distributed as jd

        saved, jd.FAREWELL_TIMEOUT_S = jd.FAREWELL_TIMEOUT_S, 2.0
        jest = loader(make_vector_batches(40, 4, seed=rank), timeout=20, return_info=False)
        got: dict = {}
        t0 = time.monotonic()
        try:
            with jest:
                for n, _ in enumerate(jest):
                    if n == 1:
                        time.sleep(0.5)  # both pipelines fill their queues meanwhile
                        if rank == 0:
                            t0 = time.monotonic()
                            raise ValueError("training step failed")
                        dist.barrier()  # waits for rank 0, which never trains again
                        break
        except ValueError as exc:
            got["error"] = str(exc)
        got["left_s"] = time.monotonic() - t0
        if rank == 0:
            dist.barrier()  # release rank 1
        got["threads"] = _live_threads()
        jd.FAREWELL_TIMEOUT_S = saved
        out["farewell"] = got
        dist.barrier()

        # rank 1 hangs (alive, not iterating): rank 0 raises after the group's timeout (3 s)
        scenario("hung", lambda: time.sleep(4))
        dist.barrier()  # the next loader's group is made collectively: wait for the sleeper
        # rank 1 dies without a word, mid-pass (it writes its results first)
        scenario("killed", lambda: (_write(out_dir, rank, out), os._exit(3)))
    except BaseException:  # noqa: BLE001 -- the parent asserts there is none
        import traceback

        out["crash"] = traceback.format_exc()
    _write(out_dir, rank, out)
    # run_ranks leaves with os._exit: the default group, whose peer is dead, is never torn down


def _write(out_dir: str, rank: int, out: dict) -> None:
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)


@pytest.fixture(scope="module")
def protocol(tmp_path_factory):
    """One spawn of 2 ranks runs every protocol scenario in turn (ending with rank 1 killed)."""
    tmp = tmp_path_factory.mktemp("protocol")
    codes = run_ranks(_protocol_rank, WORLD, str(tmp / "init"), str(tmp))
    results = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [r.get("crash") for r in results] == [None, None], results
    assert codes == [0, 3]
    return results


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_rank_whose_base_ends_early_ends_the_pass_on_every_rank(protocol, mode):
    for out in protocol:
        end = out[f"end_{mode}"]
        assert "error" not in end, end
        assert end["batches"] == 3  # both ranks end when rank 1's base does (3 super-batches)
        d = end["stats"]["distributed"]
        assert d["ended_by"] == [1] and d["unread_examples"][1] == 0
        assert d["unread_examples"][0] >= 8  # the super-batch rank 0 drew for step 3
        assert end["threads"] == [] and end["groups_left"] == 0
    # each rank's generator is seeded by (seed, rank, epoch)
    assert protocol[0][f"end_{mode}"]["generator0"] != protocol[1][f"end_{mode}"]["generator0"]


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_rank_that_raises_at_step_3_makes_every_rank_raise(protocol, mode):
    for r, out in enumerate(protocol):
        raised = out[f"raise_{mode}"]
        assert raised["batches"] == 3, raised
        if r == 1:  # its own error, with its own traceback
            assert raised["error"].startswith("ValueError: boom in base batch 6")
        else:  # names the failing rank, the step and the error
            assert raised["error"].startswith("RuntimeError")
            assert "rank 1 (failed at step 3): ValueError: boom in base batch 6" in raised[
                "error"]
        assert raised["stats"]["distributed"]["failed_by"] == [1]
        assert raised["threads"] == [] and raised["groups_left"] == 0


def test_non_finite_scores_on_one_rank_raise_or_fall_back_on_every_rank(protocol):
    for out in protocol:
        nan = out["nan_raise"]
        assert nan["batches"] == 1 and nan["error"].startswith("ValueError")
        assert "rank 1 (bad scores at step 1): 8 of 8 non-finite" in nan["error"]
        uniform = out["nan_uniform"]
        assert "error" not in uniform and uniform["fallbacks"] == [False, True, False, False]


def test_break_then_a_new_pass_leaves_nothing_behind(protocol):
    for out in protocol:
        assert out["break"]["counts"] == [2, 4]
        first, second = out["break"]["stats"]
        # which ranks the first pass records as stopped depends on timing (a selection thread
        # may already have contributed its next round); at least one did
        assert first["passes"] == 1 and first["stopped_by"] and set(first["stopped_by"]) <= {0, 1}
        assert (second["passes"], second["stopped_by"], second["ended_by"]) == (2, [], [0, 1])
        # stats describe the latest pass: the first pass's unread examples are not carried over
        uneven_first, even_second = out["passes"]
        assert uneven_first["ended_by"] == [1] and uneven_first["unread_examples"][0] >= 8
        assert even_second["ended_by"] == [0, 1] and even_second["unread_examples"] == [0, 0]
        assert out["break"]["threads"] == [] and out["break"]["groups_left"] == 0
        assert out["groups_left"] == 0


def test_a_rank_leaving_with_an_error_is_not_held_for_the_group_timeout(protocol):
    """Rank 0's training raises while rank 1 waits for it outside the loader: rank 0's error
    reaches its caller after the farewell timeout (2 s here), not the group's 20 s."""
    got = protocol[0]["farewell"]
    assert got["error"] == "training step failed"
    assert got["left_s"] < 10, got
    for out in protocol:
        assert out["farewell"]["threads"] == []


def test_resume_continues_the_same_selection_and_refuses_another_world_size(protocol):
    for r, out in enumerate(protocol):
        resume = out["resume"]
        assert resume["resumed"] == resume["rest"] and resume["rest"] != resume["first"]
        assert "world size 3" in resume["refused"] and "has world size 2" in resume["refused"]
        assert (resume["world_size"], resume["rank"]) == (WORLD, r)


def test_fsdp_learners_are_refused(protocol):
    for out in protocol:
        assert "fully_shard" in out["fsdp"]


def test_batch_learnability_is_refused_under_global_selection(protocol):
    for out in protocol:
        assert "distributed='local'" in out["learnability"]


def test_a_hung_or_killed_rank_makes_the_other_raise_within_the_timeout(protocol):
    out = protocol[0]
    for name in ("hung", "killed"):
        got = out[name]
        assert "error" in got and "a rank died, hung or left the loop" in got["error"], got
        assert got["seconds"] is not None and got["seconds"] < 3 + 10  # the timeout + slack
        assert got["threads"] == []
