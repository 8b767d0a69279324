#!/usr/bin/env bash
# JEST's two-stage recipe with open_clip_train, end to end on a tiny model and shards written here.
#
#   stage 1: plain open_clip_train on small *curated* shards  -> the reference model
#   stage 2: `jeststream openclip-train` on large *noisy* shards, selecting each batch of
#            --batch-size from a super-batch of --batch-size / --jest-ratio by learnability
#            against the stage-1 reference (--jest-reference points at its checkpoint)
#
# Runs on CPU in about a minute; nothing is downloaded. For real data, replace the shards,
# --model and the sizes; with a released reference use
#   --jest-reference ViT-B-32 --jest-reference-pretrained <tag>   (or local-dir:PATH).
#
# Environment: OUT (work folder, default runs/openclip_two_stage), PYTHON (default: the
# project's .venv/bin/python when it exists, else python3),
# DEVICE (default cpu), EPOCHS (stage 2, default 2), STAGE1_EPOCHS (default 4),
# CURATED_PER_SHARD (2 shards, default 128), NOISY_PER_SHARD (4 shards, default 256).
set -euo pipefail

OUT=${OUT:-runs/openclip_two_stage}
HERE=$(cd "$(dirname "$0")/.." && pwd)
if [[ -z "${PYTHON:-}" && -x "$HERE/.venv/bin/python" ]]; then PYTHON="$HERE/.venv/bin/python"; fi
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cpu}
EPOCHS=${EPOCHS:-2}
STAGE1_EPOCHS=${STAGE1_EPOCHS:-4}
CURATED_PER_SHARD=${CURATED_PER_SHARD:-128}
NOISY_PER_SHARD=${NOISY_PER_SHARD:-256}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# -- data and model: a tiny open_clip config as a local-dir: model, webdataset shards with
#    sizes.json; curated captions all match their image, noisy ones match half the time.
"$PY" - "$OUT" "$CURATED_PER_SHARD" "$NOISY_PER_SHARD" <<'EOF'
import io, json, random, sys, tarfile
from pathlib import Path
from PIL import Image

out = Path(sys.argv[1])
cfg = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
(out / "tiny").mkdir(exist_ok=True)
(out / "tiny" / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}, indent=2))

colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220),
           "yellow": (230, 230, 20), "purple": (140, 20, 160), "orange": (250, 140, 0),
           "black": (5, 5, 5), "white": (250, 250, 250)}
shapes = ["square", "block", "tile", "patch"]

def png(rgb, rng):
    img = Image.new("RGB", (32, 32), rgb)
    x, y = rng.randrange(24), rng.randrange(24)  # a small grey mark so images differ
    img.paste((128, 128, 128), (x, y, x + 8, y + 8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()

def write(folder, n_shards, per_shard, noise, seed):
    rng = random.Random(seed)
    folder.mkdir(exist_ok=True)
    sizes = {}
    for s in range(n_shards):
        name = f"shard-{s:06d}.tar"
        with tarfile.open(folder / name, "w") as tar:
            for j in range(per_shard):
                colour = rng.choice(list(colours))
                said = rng.choice(list(colours)) if rng.random() < noise else colour
                caption = f"a photo of a {said} {rng.choice(shapes)}"
                for ext, data in (("png", png(colours[colour], rng)), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{s:03d}{j:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        sizes[name] = per_shard
    (folder / "sizes.json").write_text(json.dumps(sizes))

write(out / "curated", 2, int(sys.argv[2]), noise=0.0, seed=1)
write(out / "noisy", 4, int(sys.argv[3]), noise=0.5, seed=2)
EOF

COMMON=(--model "local-dir:$OUT/tiny" --dataset-type webdataset --device "$DEVICE"
        --precision fp32 --workers 1 --batch-size 16 --lr 1e-3 --warmup 4 --seed 0
        --log-every-n-steps 4 --logs "$OUT/logs" --report-to "")

# -- stage 1: the reference, trained by open_clip_train itself on the curated shards.
rm -rf "$OUT/logs/stage1" "$OUT/logs/stage2"
"$PY" -m open_clip_train.main "${COMMON[@]}" --name stage1 --siglip --epochs "$STAGE1_EPOCHS" \
    --train-data "$OUT/curated/shard-{000000..000001}.tar"
REFERENCE="$OUT/logs/stage1/checkpoints/epoch_$STAGE1_EPOCHS.pt"
test -f "$REFERENCE"

# -- stage 2: JEST on the noisy shards, scoring against the stage-1 checkpoint.
"$PY" -m jeststream.cli openclip-train "${COMMON[@]}" --name stage2 --siglip --epochs "$EPOCHS" \
    --train-data "$OUT/noisy/shard-{000000..000003}.tar" \
    --jest-ratio 0.25 --jest-reference "$REFERENCE" --jest-reference-model "local-dir:$OUT/tiny" \
    --jest-n-chunks 4 --jest-selection-log "$OUT/stage2_selection.jsonl"

"$PY" -m jeststream.cli inspect "$OUT/stage2_selection.jsonl"
echo "JEST statistics (open_clip log):"
grep "JEST Epoch" "$OUT/logs/stage2/out.log" | tail -n 3
echo "done: $OUT/logs/stage2/checkpoints/epoch_$EPOCHS.pt"
