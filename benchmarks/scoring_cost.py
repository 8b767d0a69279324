"""What a JEST step costs, in FLOPs counted by ``torch.utils.flop_counter`` (never by hand).

Prints one JSON object. For each model -- open_clip ViT-B-16 at 224 px (random weights, built
from open_clip's bundled config: no download) and the demo's tiny SigLIP model -- it counts,
per example:

  - a uniform training step: forward + backward of open_clip's ``SigLipLoss`` (the step JEST
    yields batches to, at batch size b);
  - scoring forwards: image tower, text tower at the full context, and the text tower on
    captions trimmed exactly (``jeststream.text_trim``: causal tower, end-of-text pooling);
  - the image tower at half resolution (``jeststream.low_res``: resized images, positional
    embeddings resampled to the smaller grid; what ``JESTLoader(score_resolution=112)`` runs).

and reports the cost of one JEST step (training on b plus scoring the super-batch of b / ratio)
as a multiple of a uniform step, for: full scoring (learner + reference forwards), the cached
reference (learner forward only), cached + half-resolution learner, and each with text
trimming; and, from the same counted costs (arithmetic: the loader has no pre-filter yet), the
cached + half-resolution + trimmed step with a reference pre-filter keeping half the
super-batch for the learner's forward (issue 30). Counting runs the models on small batches (4 examples; FLOPs are linear in the batch
for these towers; the loss's b x b logits, quadratic, are < 0.1 % of a step at 4 and are left
at that) and divides by the examples counted.

Caption lengths: web alt-text is short. Trimming is counted on 256 captions whose token lengths
(start and end tokens included) follow a log-normal distribution with median 14 and sigma 0.6,
clipped to [3, 77] -- an assumption standing in for LAION/DataComp-style captions (most 8-25
tokens), stated here because the trimming saving depends on it. The demo's captions are its
real ones (<= 9 tokens of a 12-token context).

    python benchmarks/scoring_cost.py            # both models
    python benchmarks/scoring_cost.py --quick    # the demo models only (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from jeststream.low_res import encode_image_resampled
from jeststream.text_trim import encode_text_trimmed

_N = 4  # examples per counted forward


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _caption_lengths(n: int, context: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g)
    lengths = torch.exp(math.log(14.0) + 0.6 * z).round().clamp(3, context)
    return [int(v) for v in lengths]


def _tokens(lengths: list[int], context: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Token ids shaped like an open_clip tokenizer's: start, words, end (the largest id), pad."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(len(lengths), context, dtype=torch.long)
    for i, n in enumerate(lengths):
        out[i, 0] = vocab - 2
        out[i, 1 : n - 1] = torch.randint(1, vocab - 2, (max(0, n - 2),), generator=g)
        out[i, n - 1] = vocab - 1
    return out


def _tower_costs(model, image_size: int, captions: torch.Tensor) -> dict:
    """Per-example FLOPs of each piece for one model."""
    from open_clip.loss import SigLipLoss

    model.eval()
    context = captions.shape[1]
    images = torch.zeros(_N, 3, image_size, image_size)
    full_text = _tokens([context] * _N, context, model.vocab_size)
    with torch.inference_mode():
        image = _count(lambda: model.encode_image(images, normalize=True)) / _N
        text = _count(lambda: model.encode_text(full_text, normalize=True)) / _N
        trimmed = _count(lambda: encode_text_trimmed(model, captions)) / len(captions)
        untrimmed = _count(lambda: model.encode_text(captions, normalize=True)) / len(captions)
        small = torch.zeros(_N, 3, image_size // 2, image_size // 2)
        half = _count(lambda: encode_image_resampled(model, small)) / _N
    model.train()
    loss_fn = SigLipLoss()

    def step():
        img = model.encode_image(images, normalize=True)
        txt = model.encode_text(full_text, normalize=True)
        loss_fn(img, txt, model.logit_scale.exp(), model.logit_bias).backward()

    train = _count(step) / _N
    model.zero_grad(set_to_none=True)
    model.eval()
    return {
        "train_step_per_example": train,
        "image_forward": image,
        "image_forward_half_resolution": half,
        "text_forward_full_context": text,
        "text_forward_captions_untrimmed": untrimmed,
        "text_forward_captions_trimmed": trimmed,
    }


# The reference pre-filter's kept share in the row issue 30 names (JESTLoader's prefilter=q:
# the learner scores only the top q of the super-batch by the cached reference's score).
PREFILTER = 0.5


def _ratios(c: dict, ratio: float) -> dict:
    """JEST step FLOPs / uniform step FLOPs, per configuration (per yielded example).

    The ``..._prefilter`` row is arithmetic on the counted tower costs (the learner's scoring
    forward on PREFILTER of the super-batch), not a count of a loader run."""
    n = round(1 / ratio)
    train = c["train_step_per_example"]
    text_full, text_trim = c["text_forward_captions_untrimmed"], c["text_forward_captions_trimmed"]
    img, img_half = c["image_forward"], c["image_forward_half_resolution"]

    def step(learner_img, learner_txt, ref_img, ref_txt):
        return (train + n * (learner_img + learner_txt + ref_img + ref_txt)) / train

    out = {
        "full_scoring": step(img, text_full, img, text_full),
        "full_scoring_trimmed": step(img, text_trim, img, text_trim),
        "cached_reference": step(img, text_full, 0, 0),
        "cached_reference_trimmed": step(img, text_trim, 0, 0),
    }
    if img_half is not None:
        out["cached_reference_half_resolution"] = step(img_half, text_full, 0, 0)
        out["cached_reference_half_resolution_trimmed"] = step(img_half, text_trim, 0, 0)
        out[f"cached_reference_half_resolution_trimmed_prefilter{PREFILTER:g}"] = step(
            PREFILTER * img_half, PREFILTER * text_trim, 0, 0
        )
    scoring_full = 2 * (img + text_full)
    out["cached_scoring_share_of_full_scoring"] = (img + text_full) / scoring_full
    out["image_share_of_forward"] = img / (img + text_full)
    out["image_share_of_forward_trimmed"] = img / (img + text_trim)
    return out


PREFILTER_NOTE = (
    f"..._prefilter{PREFILTER:g}: computed from the counted tower costs, the learner's scoring "
    f"forward (half resolution, trimmed captions) on {PREFILTER:g} of the super-batch; the "
    "cached reference's scores that rank it cost nothing. Arithmetic on the counted towers: "
    "JESTLoader(prefilter=q)'s learner forward sees exactly ceil(q B) examples "
    "(tests/test_prefilter.py), so it differs from a loader run's count only by which "
    "captions (and so which trimmed lengths) are kept"
)


def vit_b16(ratio: float) -> dict:
    import open_clip

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None)
    context = model.context_length
    captions = _tokens(_caption_lengths(256, context), context, model.vocab_size)
    costs = _tower_costs(model, 224, captions)
    return {
        "model": "ViT-B-16 (open_clip config, random weights), 224 px, context 77",
        "caption_lengths": "log-normal, median 14 tokens, sigma 0.6, clipped to [3, 77]; 256 captions",
        "gflops_per_example": {k: None if v is None else v / 1e9 for k, v in costs.items()},
        "jest_step_vs_uniform_step": _ratios(costs, ratio),
        "count_seconds": time.perf_counter() - t0,
    }


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _demo_wall(model, cfg, captions: torch.Tensor, ratio: float, repeats: int) -> dict:
    """Wall time (one thread, median of ``repeats``) of a training step at b = 128 and of the
    scoring forwards of its super-batch, and the JEST-step ratios they give."""
    from open_clip.loss import SigLipLoss

    from jeststream.low_res import resize_images
    from jeststream.scoring import default_embed

    b = 128
    big = b * round(1 / ratio)
    s = cfg.image_size
    text_b = captions[torch.arange(b) % len(captions)]
    text_big = captions[torch.arange(big) % len(captions)]
    images_b, images_big = torch.rand(b, 3, s, s), torch.rand(big, 3, s, s)
    half = resize_images(images_big, s // 2)
    loss_fn = SigLipLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def train():
        model.train()
        opt.zero_grad(set_to_none=True)
        img = model.encode_image(images_b, normalize=True)
        txt = model.encode_text(text_b, normalize=True)
        loss_fn(img, txt, model.logit_scale.exp(), model.logit_bias).backward()
        opt.step()

    def untrimmed():
        with torch.inference_mode():
            model.encode_image(images_big, normalize=True)
            model.encode_text(text_big, normalize=True)

    def trimmed():
        with torch.inference_mode():
            default_embed(model, (images_big, text_big))

    def half_trimmed():
        with torch.inference_mode():
            default_embed(model, (half, text_big))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = _median_s(train, repeats)
        model.eval()
        full, trim, low = (_median_s(f, repeats) for f in (untrimmed, trimmed, half_trimmed))
    finally:
        torch.set_num_threads(threads)
    return {
        "train_step_s": t,
        "score_forward_super_batch_s": {"untrimmed": full, "trimmed": trim, "half_resolution_trimmed": low},
        "jest_step_vs_uniform_step": {
            "full_scoring": (t + 2 * full) / t,
            "full_scoring_trimmed": (t + 2 * trim) / t,
            "cached_reference": (t + full) / t,
            "cached_reference_trimmed": (t + trim) / t,
            "cached_reference_half_resolution_trimmed": (t + low) / t,
        },
        "note": "model compute only (no data loading or selection), one thread, median of "
        f"{repeats}; b = {b}, B = {big}",
    }


def _demo(cfg, ratio: float, repeats: int = 0) -> dict:
    from jeststream.demo.model import build_model

    t0 = time.perf_counter()
    vocab, captions = _demo_captions(cfg.context_length)
    model = build_model(cfg, vocab, seed=0)
    costs = _tower_costs(model, cfg.image_size, captions)
    wall = _demo_wall(model, cfg, captions, ratio, repeats) if repeats else None
    return {
        "model": f"demo SigLIP model ({cfg.image_size} px, patch {cfg.patch_size}, width {cfg.width}, "
        f"text width {cfg.text_width}, context {cfg.context_length})",
        "caption_lengths": "the demo pool's own captions (first 256)",
        "gflops_per_example": {k: None if v is None else v / 1e9 for k, v in costs.items()},
        "jest_step_vs_uniform_step": _ratios(costs, ratio),
        "wall": wall,
        "count_seconds": time.perf_counter() - t0,
    }


def _demo_captions(context: int) -> tuple[int, torch.Tensor]:
    from jeststream.demo import data as demo_data

    pool = demo_data.build_splits(demo_data.DataConfig())["pool"]
    tokenizer = demo_data.WordTokenizer(context)
    return tokenizer.vocab_size, tokenizer(pool["caption"][:256])


def main(argv: list[str] | None = None) -> int:
    from dataclasses import replace

    from jeststream.demo.model import ModelConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratio", type=float, default=0.2, help="JEST filtering ratio b/B")
    p.add_argument("--quick", action="store_true", help="the demo model only")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = {
        "ratio": args.ratio, "torch": torch.__version__, "prefilter_note": PREFILTER_NOTE,
        "models": {},
    }
    repeats = 5 if args.quick else 20
    out["models"]["demo"] = _demo(ModelConfig(), args.ratio, repeats)
    # the demo model before issue 30 rebalanced it: 2x2 patches of 8, text tower as wide
    old = replace(ModelConfig(), patch_size=8, text_width=64)
    out["models"]["demo_old_patch8"] = _demo(old, args.ratio, repeats)
    if not args.quick:
        out["models"]["vit_b16"] = vit_b16(args.ratio)
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
