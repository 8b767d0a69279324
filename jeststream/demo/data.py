"""The embedded image-caption sets: sklearn's handwritten digits with web-like noise.

Two tasks are built from the same 1,797 scans (no download): ``digits`` (10 classes, one scan
per image) and ``pairs`` (100 classes: two scans side by side, a two-digit number captioned
"three eight", so that confusable classes share a digit and a random batch rarely holds two
examples of one class).

Three splits come from disjoint scans: a small clean *curated* split (trains the reference), a
large *pool* whose pairs carry injected noise (the training stream), and a clean *held-out*
split (evaluation). Every pool example records its noise type so the demo can report what each
method actually selects. The splits are written as webdataset shards and read back through the
same adapter a user's data would go through.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

SHARD_FORMAT = 4  # bump when the shards' layout changes, so old caches are not reused

NOISE_TYPES = ("clean", "mismatched", "wrong_class", "garbage", "duplicate")

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Several phrasings per class, as alt-text and captions vary on the web. Zero-shot evaluation
# averages the text embeddings over all of them (CLIP's prompt ensembling).
TEMPLATES = (
    "a handwritten {word}",
    "the digit {digit}",
    "a scan of the number {word}",
    "a photo of a handwritten {digit}",
    "the number {word} written by hand",
    "a small scan showing a {word}",
    "digit {digit} in black and white",
    "a drawing of the numeral {word}",
)

# Captions that say nothing about the image, the commonest web noise (filenames, shop text).
JUNK_CAPTIONS = (
    "click here to enlarge",
    "free shipping on all orders",
    "stock photo royalty free",
    "untitled image",
    "view full size",
    "logo design vector illustration",
    "best price guaranteed buy now",
    "thumbnail photo gallery",
    "my holiday pictures",
    "page not found",
    "share this on social media",
    "a red car parked on a street",
    "a cat sleeping on a sofa",
    "sunset over the sea",
    "download wallpaper in high resolution",
    "image may contain text",
)


# The pairs task's phrasings: {word} is "three eight", {digit} is "3 8" (left digit first).
PAIR_TEMPLATES = (
    "a handwritten {word}",
    "the number {digit}",
    "a scan of the number {word}",
    "a photo of a handwritten {digit}",
    "the number {word} written by hand",
    "a small scan showing {word}",
    "digits {digit} in black and white",
    "a drawing of the numerals {word}",
)

TASKS = ("digits", "pairs")


def pool_noise(cfg) -> list[str]:
    """The pool's noise type per example, in NOISE_TYPES order: each type's share of
    ``cfg.pool_size`` rounded, the rest clean."""
    n = cfg.pool_size
    counts = {t: round(getattr(cfg, t) * n) for t in NOISE_TYPES if t != "clean"}
    counts["clean"] = n - sum(counts.values())
    return [t for t in NOISE_TYPES for _ in range(counts[t])]


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not one of {TASKS}")
    return task


def n_classes(task: str = "digits") -> int:
    """Classes of `task`: 10 digits, or 100 two-digit numbers (label = 10 * left + right)."""
    return 10 if _check_task(task) == "digits" else 100


def templates(task: str = "digits") -> tuple[str, ...]:
    return TEMPLATES if _check_task(task) == "digits" else PAIR_TEMPLATES


def caption(label: int, template: int, task: str = "digits") -> str:
    """The caption of class `label` under template number `template` of `task`."""
    if _check_task(task) == "digits":
        return TEMPLATES[template].format(word=DIGIT_WORDS[label], digit=str(label))
    left, right = divmod(int(label), 10)
    return PAIR_TEMPLATES[template].format(
        word=f"{DIGIT_WORDS[left]} {DIGIT_WORDS[right]}", digit=f"{left} {right}"
    )


def class_captions(task: str = "digits") -> list[str]:
    """Every class's caption under every template, class-major: [n_classes * n_templates]."""
    n_t = len(templates(task))
    return [caption(c, t, task) for c in range(n_classes(task)) for t in range(n_t)]


def caption_tokens(task: str = "digits") -> int:
    """Tokens of the task's longest caption with its start and end tokens: the shortest context
    that truncates no caption (a shorter one is refused)."""
    return 2 + max(len(text.split()) for text in (*class_captions(task), *JUNK_CAPTIONS))


CAPTION_TOKENS = caption_tokens("digits")


class WordTokenizer:
    """A tiny closed-vocabulary word tokenizer for the demo's captions.

    open_clip's BPE tokenizer would work too, but its 49k-row embedding table would dominate
    the tiny text tower's compute on CPU. The end-of-text token has the largest id so that
    open_clip's default `argmax` text pooling finds it, as with the real tokenizer.
    """

    PAD, SOT, UNK = 0, 1, 2

    def __init__(self, context_length: int = 16, task: str = "digits") -> None:
        if context_length < 4:
            raise ValueError(f"context_length={context_length} is too short; use at least 4")
        # The vocabulary is the task's own (the digits one is unchanged by the pairs task: its
        # size sets the text tower's embedding table, hence every later weight's init).
        words: set[str] = set()
        for text in (*class_captions(task), *JUNK_CAPTIONS):
            words.update(text.split())
        self.task = task
        self.vocab = {w: i + 3 for i, w in enumerate(sorted(words))}
        self.EOT = len(self.vocab) + 3
        self.vocab_size = self.EOT + 1
        self.context_length = context_length
        self._cache: dict[str, list[int]] = {}

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        # Captions repeat (templates, junk lines), so each distinct one is tokenized once; the
        # batch is then one tensor built from the cached rows (no per-row torch call).
        rows = [self._row(text) for text in texts]
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.context_length)

    def _row(self, text: str) -> list[int]:
        row = self._cache.get(text)
        if row is None:
            ids = [self.vocab.get(w, self.UNK) for w in text.lower().split()]
            ids = [self.SOT, *ids[: self.context_length - 2], self.EOT]
            row = ids + [self.PAD] * (self.context_length - len(ids))
            if len(self._cache) < 65536:  # bounded: arbitrary text must not grow it forever
                self._cache[text] = row
        return row


@dataclass
class DataConfig:
    """What the embedded data set looks like. Shares of the pool are fractions of its size."""

    image_size: int = 16
    pool_size: int = 16384
    curated_scans: int = 300
    curated_size: int = 4096
    heldout_scans: int = 500
    mismatched: float = 0.25
    wrong_class: float = 0.20
    garbage: float = 0.15
    duplicate: float = 0.10
    duplicate_sources: int = 16
    # 12, the context the README's learning-efficiency figures were measured with. The padding
    # past the end token changes no embedding (causal attention, pooled at the end token) and
    # CAPTION_TOKENS would be ~6 % faster, but the text tower draws its positional embedding
    # first: a shorter one initialises every later weight differently, a different experiment.
    context_length: int = 12
    shard_size: int = 500
    seed: int = 0
    # "digits" (10 classes) or "pairs" (100 two-digit numbers, two scans side by side)
    task: str = "digits"
    # held-out examples; None: one per held-out scan (digits), 2,000 (pairs: 20 per class)
    heldout_size: int | None = None

    def __post_init__(self) -> None:
        _check_task(self.task)
        if self.heldout_size is not None and self.heldout_size < 1:
            raise ValueError(f"heldout_size must be >= 1 or None, got {self.heldout_size}")
        if self.task == "pairs" and self.image_size % 2:
            raise ValueError(
                f"image_size={self.image_size} must be even for task='pairs' (two digits side "
                "by side, each half as wide)"
            )
        shares = (self.mismatched, self.wrong_class, self.garbage, self.duplicate)
        if any(s < 0 for s in shares) or sum(shares) >= 1:
            raise ValueError(
                f"noise shares {shares} must be non-negative and sum to less than 1 "
                "(the rest of the pool is clean)"
            )
        need = caption_tokens(self.task)
        if self.context_length < need:
            raise ValueError(
                f"context_length={self.context_length} would truncate captions of "
                f"{need - 2} words; use at least {need}"
            )
        if self.curated_scans + self.heldout_scans >= 1797 - 100:
            raise ValueError(
                f"curated_scans + heldout_scans = {self.curated_scans + self.heldout_scans} "
                "leaves fewer than 100 of the 1797 scans for the pool; lower them"
            )

    @property
    def clean_share(self) -> float:
        return 1.0 - (self.mismatched + self.wrong_class + self.garbage + self.duplicate)

    @property
    def n_heldout(self) -> int:
        if self.heldout_size is not None:
            return self.heldout_size
        return self.heldout_scans if self.task == "digits" else 2000

    def identity(self) -> dict:
        """The fields that define the data, for fingerprints. Fields added since the README's
        figures were measured are left out at their defaults, so that the shards and reference
        caches of a digits run written before them are still found."""
        out = asdict(self)
        for name, default in (("task", "digits"), ("heldout_size", None)):
            if out[name] == default:
                del out[name]
        return out

    def fingerprint(self) -> str:
        blob = json.dumps({**self.identity(), "format": SHARD_FORMAT}, sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:10]


def _load_scans() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # [1797, 8, 8] in [0, 1]
    return images, torch.tensor(digits.target, dtype=torch.long)


def _augment(scans: torch.Tensor, size: int, gen: torch.Generator, strength: float = 1.0):
    """Upsample 8x8 scans to size x size with a small random affine jitter and pixel noise."""
    n = scans.shape[0]
    x = F.interpolate(scans[:, None], size=(size, size), mode="bilinear", align_corners=False)
    angle = (torch.rand(n, generator=gen) - 0.5) * 2 * math.radians(12) * strength
    scale = 1 + (torch.rand(n, generator=gen) - 0.5) * 0.2 * strength
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.16 * strength
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    contrast = 0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=gen)
    x = x * contrast + 0.06 * strength * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1)[:, 0]


def _garbage_images(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Blank pages, pure noise and random strokes: images that show no digit at all."""
    kind = torch.randint(0, 3, (n,), generator=gen)
    out = torch.zeros(n, size, size)
    level = torch.rand(n, 1, 1, generator=gen)
    out = torch.where((kind == 0)[:, None, None], level * 0.3, out)
    noise = torch.rand(n, size, size, generator=gen)
    out = torch.where((kind == 1)[:, None, None], noise, out)
    ys = torch.arange(size).float()[:, None]
    xs = torch.arange(size).float()[None, :]
    for i in torch.nonzero(kind == 2).flatten().tolist():
        img = torch.zeros(size, size)
        for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
            a, b, c = torch.randn(3, generator=gen)
            dist = (a * xs + b * ys - c * size / 2 - (a + b) * size / 4).abs()
            img = torch.maximum(img, (1 - dist / (a.abs() + b.abs() + 1e-3)).clamp(0, 1))
        out[i] = img
    return out


def build_splits(cfg: DataConfig) -> dict[str, dict[str, list | torch.Tensor]]:
    """Generate the three splits in memory.

    Returns {split: {"image": uint8 [N,S,S], "label": [N], "caption": list[str],
    "noise": list[str], "scan": [N] (pairs: [N, 2], left and right)}}. `label` is the class
    actually shown (-1 for garbage).
    """
    if cfg.task == "pairs":
        return _build_pair_splits(cfg)
    scans, targets = _load_scans()
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(scans), generator=gen)
    curated_ids = order[: cfg.curated_scans]
    heldout_ids = order[cfg.curated_scans : cfg.curated_scans + cfg.heldout_scans]
    pool_ids = order[cfg.curated_scans + cfg.heldout_scans :]
    n_t = len(TEMPLATES)

    def clean_split(ids: torch.Tensor, n: int, cycle: bool) -> dict:
        pick = (
            ids.repeat(math.ceil(n / len(ids)))[:n]
            if cycle
            else ids[torch.randint(0, len(ids), (n,), generator=gen)]
        )
        labels = targets[pick]
        temps = torch.randint(0, n_t, (n,), generator=gen)
        return {
            "image": _augment(scans[pick], cfg.image_size, gen),
            "label": labels,
            "caption": [caption(int(c), int(t)) for c, t in zip(labels, temps)],
            "noise": ["clean"] * n,
            "scan": pick,
        }

    curated = clean_split(curated_ids, cfg.curated_size, cycle=False)
    heldout = clean_split(heldout_ids, cfg.n_heldout, cycle=True)

    n = cfg.pool_size
    noise = pool_noise(cfg)
    pick = pool_ids[torch.randint(0, len(pool_ids), (n,), generator=gen)]
    labels = targets[pick].clone()
    temps = torch.randint(0, n_t, (n,), generator=gen)
    noise_t = torch.tensor([NOISE_TYPES.index(t) for t in noise])
    # Near-duplicates: a handful of source scans copied many times with only a faint jitter.
    dup = noise_t == NOISE_TYPES.index("duplicate")
    sources = pool_ids[torch.randperm(len(pool_ids), generator=gen)[: cfg.duplicate_sources]]
    pick[dup] = sources[torch.randint(0, len(sources), (int(dup.sum()),), generator=gen)]
    labels[dup] = targets[pick[dup]]
    images = _augment(scans[pick], cfg.image_size, gen)
    if dup.any():
        images[dup] = _augment(scans[pick[dup]], cfg.image_size, gen, strength=0.15)
    garbage = noise_t == NOISE_TYPES.index("garbage")
    if garbage.any():
        images[garbage] = _garbage_images(int(garbage.sum()), cfg.image_size, gen)
    caption_class = _caption_classes(labels, noise_t, garbage, 10, gen)
    junk = torch.randint(0, len(JUNK_CAPTIONS), (n,), generator=gen)
    captions = [
        JUNK_CAPTIONS[int(j)] if t == "mismatched" else caption(int(c), int(tp))
        for t, c, tp, j in zip(noise, caption_class, temps, junk)
    ]
    return _shuffled_splits(curated, heldout, images, labels, captions, noise, pick, gen)


def _caption_classes(
    labels: torch.Tensor, noise_t: torch.Tensor, garbage: torch.Tensor, n_c: int, gen
) -> torch.Tensor:
    """The class each caption names: the shown one, except wrong-class pairs (another class)
    and garbage images (alt text that claims some class the image does not show). Marks the
    garbage images' own labels -1, in place."""
    caption_class = labels.clone()
    wrong = noise_t == NOISE_TYPES.index("wrong_class")
    caption_class[wrong] = (
        labels[wrong] + torch.randint(1, n_c, (int(wrong.sum()),), generator=gen)
    ) % n_c
    caption_class[garbage] = torch.randint(0, n_c, (int(garbage.sum()),), generator=gen)
    labels[garbage] = -1
    return caption_class


def _shuffled_splits(curated, heldout, images, labels, captions, noise, scan, gen) -> dict:
    """The pool in a random order beside the curated and held-out splits; images as uint8."""
    perm = torch.randperm(len(captions), generator=gen)
    pool = {
        "image": images[perm],
        "label": labels[perm],
        "caption": [captions[i] for i in perm.tolist()],
        "noise": [noise[i] for i in perm.tolist()],
        "scan": scan[perm],
    }
    splits = {"curated": curated, "pool": pool, "heldout": heldout}
    for split in splits.values():
        split["image"] = (split["image"] * 255).round().to(torch.uint8)
    return splits


def _pair_images(
    scans: torch.Tensor, left: torch.Tensor, right: torch.Tensor, size: int,
    gen: torch.Generator, strength: float = 1.0,
) -> torch.Tensor:
    """Two scans side by side in one size x size image: each jittered as a digit image is, then
    squeezed to half the width (the 8x8 scans lose no column: 8 columns at size 16)."""
    half = []
    for ids in (left, right):
        x = _augment(scans[ids], size, gen, strength)
        half.append(F.interpolate(x[:, None], size=(size, size // 2), mode="area")[:, 0])
    return torch.cat(half, dim=2)


def _build_pair_splits(cfg: DataConfig) -> dict[str, dict[str, list | torch.Tensor]]:
    """The pairs task's splits: class c = 10 * left + right shows a scan of digit c // 10 next
    to one of c % 10, both from the split's own scans (so the splits stay scan-disjoint). The
    pool carries the digits task's noise types, with captions and classes of this task."""
    scans, targets = _load_scans()
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(scans), generator=gen)
    curated_ids = order[: cfg.curated_scans]
    heldout_ids = order[cfg.curated_scans : cfg.curated_scans + cfg.heldout_scans]
    pool_ids = order[cfg.curated_scans + cfg.heldout_scans :]
    n_t, n_c = len(PAIR_TEMPLATES), n_classes("pairs")

    def scans_of(ids: torch.Tensor, digits: torch.Tensor) -> torch.Tensor:
        """For each entry of `digits`, a random scan among `ids` that shows that digit."""
        out = torch.empty(len(digits), dtype=torch.long)
        for d in range(10):
            where = torch.nonzero(digits == d).flatten()
            have = ids[targets[ids] == d]
            if len(have) == 0:
                raise ValueError(
                    f"no scan of digit {d} in a split of {len(ids)} scans; raise its scan count"
                )
            out[where] = have[torch.randint(0, len(have), (len(where),), generator=gen)]
        return out

    def draw(ids: torch.Tensor, labels: torch.Tensor, strength: float = 1.0):
        left, right = scans_of(ids, labels // 10), scans_of(ids, labels % 10)
        return _pair_images(scans, left, right, cfg.image_size, gen, strength), left, right

    def clean_split(ids: torch.Tensor, labels: torch.Tensor) -> dict:
        images, left, right = draw(ids, labels)
        temps = torch.randint(0, n_t, (len(labels),), generator=gen)
        return {
            "image": images,
            "label": labels,
            "caption": [caption(int(c), int(t), "pairs") for c, t in zip(labels, temps)],
            "noise": ["clean"] * len(labels),
            "scan": torch.stack([left, right], 1),
        }

    curated = clean_split(curated_ids, torch.randint(0, n_c, (cfg.curated_size,), generator=gen))
    # balanced: every class equally often (the remainder to the lowest classes)
    held = torch.arange(cfg.n_heldout) % n_c
    heldout = clean_split(heldout_ids, held[torch.randperm(len(held), generator=gen)])

    n = cfg.pool_size
    noise = pool_noise(cfg)
    noise_t = torch.tensor([NOISE_TYPES.index(t) for t in noise])
    labels = torch.randint(0, n_c, (n,), generator=gen)
    images, left, right = draw(pool_ids, labels)
    # Near-duplicates: a handful of source pairs copied many times with only a faint jitter.
    dup = noise_t == NOISE_TYPES.index("duplicate")
    if dup.any():
        src = torch.randint(0, n_c, (cfg.duplicate_sources,), generator=gen)
        src_left, src_right = scans_of(pool_ids, src // 10), scans_of(pool_ids, src % 10)
        which = torch.randint(0, cfg.duplicate_sources, (int(dup.sum()),), generator=gen)
        left[dup], right[dup], labels[dup] = src_left[which], src_right[which], src[which]
        images[dup] = _pair_images(scans, left[dup], right[dup], cfg.image_size, gen, 0.15)
    garbage = noise_t == NOISE_TYPES.index("garbage")
    if garbage.any():
        images[garbage] = _garbage_images(int(garbage.sum()), cfg.image_size, gen)
    caption_class = _caption_classes(labels, noise_t, garbage, n_c, gen)
    temps = torch.randint(0, n_t, (n,), generator=gen)
    junk = torch.randint(0, len(JUNK_CAPTIONS), (n,), generator=gen)
    captions = [
        JUNK_CAPTIONS[int(j)] if t == "mismatched" else caption(int(c), int(tp), "pairs")
        for t, c, tp, j in zip(noise, caption_class, temps, junk)
    ]
    scan = torch.stack([left, right], 1)
    return _shuffled_splits(curated, heldout, images, labels, captions, noise, scan, gen)


def write_shards(splits: dict, out_dir: Path, cfg: DataConfig) -> dict[str, list[str]]:
    """Write each split as webdataset shards (pgm + txt per sample).

    Binary PGM, not PNG: for the pool's 16x16 grey-level images it is about as small (269
    bytes, against 301 on average for PNG: deflate gains little on 256 noisy bytes) and decodes
    without PIL's per-file parsing (:func:`jeststream.adapters.webdataset.decode_image`). With
    PNG, decoding a JEST step's 1/ratio base batches cost about as much CPU as its training
    step and scoring forward together.

    The per-example metadata (digit shown, injected noise type, source scan) goes to a sidecar
    ``{split}-meta.json`` keyed by ``__key__``, as DataComp ships its metadata next to the
    shards: the training stream does not parse what only the evaluation needs.
    """
    import webdataset as wds
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[str]] = {}
    for name, split in splits.items():
        pattern = str(out_dir / f"{name}-%05d.tar")
        meta: dict[str, dict] = {}
        # mtime=0: an integer mtime needs no PAX header, which halves the tar headers to parse.
        with wds.ShardWriter(pattern, maxcount=cfg.shard_size, verbose=0, mtime=0) as sink:
            for i in range(len(split["caption"])):
                key = f"{name}-{i:06d}"
                buf = io.BytesIO()
                Image.fromarray(split["image"][i].numpy(), mode="L").save(buf, format="PPM")
                meta[key] = {
                    "label": int(split["label"][i]),
                    "noise": split["noise"][i],
                    "scan": split["scan"][i].tolist(),  # pairs: [left, right]
                }
                sink.write({"__key__": key, "pgm": buf.getvalue(), "txt": split["caption"][i]})
        (out_dir / f"{name}-meta.json").write_text(json.dumps(meta))
        written[name] = sorted(str(p) for p in out_dir.glob(f"{name}-*.tar"))
    (out_dir / "config.json").write_text(json.dumps(asdict(cfg), sort_keys=True))
    return written


def prepare_shards(cfg: DataConfig, out_dir: Path) -> dict[str, list[str]]:
    """Build the splits and write them, or reuse shards written earlier with the same config."""
    out_dir = Path(out_dir) / f"data-{cfg.fingerprint()}"
    done = out_dir / "config.json"
    if done.exists():
        return {
            name: sorted(str(p) for p in out_dir.glob(f"{name}-*.tar"))
            for name in ("curated", "pool", "heldout")
        }
    logger.info("writing the demo's shards to %s", out_dir)
    return write_shards(build_splits(cfg), out_dir, cfg)


def to_model_input(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [N,S,S] -> float [N,3,S,S] normalised to [-1, 1] (open_clip ViTs take 3 channels)."""
    x = images_u8.float().div_(127.5).sub_(1.0)
    return x[:, None].expand(-1, 3, -1, -1).contiguous()
