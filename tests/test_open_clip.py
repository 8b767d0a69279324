"""jeststream.adapters.open_clip: embed, jestify (counts, set_epoch) and reference loading."""

from __future__ import annotations

import json

import open_clip
import open_clip_train.data as ocdata
import pytest
import torch
import webdataset  # noqa: F401 -- dev extra: a missing one must fail, not skip
from conftest import TINY_CLIP_CFG, make_pair_batches, make_tiny_clip
from torch import nn

from jeststream.adapters.open_clip import (
    OpenCLIPJESTLoader,
    check_compatible,
    embed,
    jestify,
    load_reference,
    read_checkpoint_state_dict,
    write_local_dir,
)
from jeststream.loader import JESTLoader
from jeststream.scoring import default_embed

TINY = "jeststream-tiny-unit"


@pytest.fixture(scope="module")
def tiny_name(tmp_path_factory):
    folder = tmp_path_factory.mktemp("configs")
    (folder / f"{TINY}.json").write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(folder / f"{TINY}.json")
    return TINY


# -- embed -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("siglip", [False, True], ids=["clip", "siglip"])
def test_embed_matches_output_dict_forward(siglip):
    model = make_tiny_clip(0, siglip=siglip).eval()
    model.output_dict = True  # what open_clip_train builds
    images, texts = make_pair_batches(1, b=6)[0]
    e = embed(model, (images, texts))
    with torch.no_grad():
        out = model(images, texts)
    torch.testing.assert_close(e.image, out["image_features"])
    torch.testing.assert_close(e.text, out["text_features"])
    torch.testing.assert_close(e.logit_scale, out["logit_scale"])
    if siglip:
        torch.testing.assert_close(e.logit_bias, out["logit_bias"])
    else:
        assert e.logit_bias is None


def test_embed_custom_text_clip_and_wrappers():
    torch.manual_seed(0)
    model = open_clip.model.CustomTextCLIP(**TINY_CLIP_CFG, output_dict=True).eval()
    images, texts = make_pair_batches(1, b=4)[0]
    wrapped = nn.DataParallel(model)  # where CUDA exists this also moves the model to cuda:0
    device = next(model.parameters()).device
    images, texts = images.to(device), texts.to(device)
    with torch.no_grad():
        out = model(images, texts)
        e = embed(wrapped, (images, texts, ["k"] * 4))  # unwrapped, extras ignored
    torch.testing.assert_close(e.image, out["image_features"])
    torch.testing.assert_close(e.text, out["text_features"])
    assert embed.__module__ == "jeststream.adapters.open_clip"
    # same as the loader's default for a float32 model
    d = default_embed(model, (images, texts))
    torch.testing.assert_close(d.image, e.image)


def test_embed_casts_images_for_reduced_precision_models():
    # open_clip_train --precision pure_bf16 keeps float32 images in the loader
    model = make_tiny_clip(0).eval().to(torch.bfloat16)
    images, texts = make_pair_batches(1, b=4)[0]
    with torch.no_grad():
        e = embed(model, (images, texts))
        d = embed(model, {"image": images, "text": texts})
    assert e.image.shape == (4, 32) and torch.isfinite(e.image.float()).all()
    torch.testing.assert_close(e.image, d.image)


# -- jestify ---------------------------------------------------------------------------------------


class _Batches:
    """An open_clip-style training loader: iterable of (images, texts) with num_batches/samples."""

    def __init__(self, batches, world_size=1):
        self.batches = batches
        self.num_batches = len(batches)
        self.num_samples = len(batches) * len(batches[0][0]) * world_size

    def __iter__(self):
        return iter(self.batches)


def _data_info(n_batches=10, b=4, world_size=1):
    loader = _Batches(make_pair_batches(n_batches, b=b), world_size)
    return ocdata.DataInfo(dataloader=loader, shared_epoch=ocdata.SharedEpoch(0))


@pytest.mark.parametrize("world_size", [1, 2])
def test_jestify_counts_like_open_clip(world_size):
    learner, reference = make_tiny_clip(0), make_tiny_clip(1)
    info = _data_info(n_batches=10, b=4, world_size=world_size)
    base = info.dataloader
    wrapped = jestify(info, learner, reference, 0.25, loss="softmax", n_chunks=2,
                      async_scoring=False)
    try:
        loader = wrapped.dataloader
        assert isinstance(loader, JESTLoader) and isinstance(loader, OpenCLIPJESTLoader)
        assert type(wrapped) is ocdata.DataInfo and info.dataloader is base  # a copy
        assert loader.num_batches == 10 // 4
        assert loader.num_samples == loader.num_batches * 4 * world_size
        batches = list(loader)
        assert len(batches) == loader.num_batches
        assert all(imgs.shape[0] == 4 and txt.shape[0] == 4 for imgs, txt in batches)
        assert loader.num_samples == loader.num_batches * 4 * world_size  # unchanged once b known
    finally:
        wrapped.dataloader.close()


def test_jestify_set_epoch_reaches_open_clip_and_the_loader():
    info = _data_info()
    wrapped = jestify(info, make_tiny_clip(0), make_tiny_clip(1), 0.5, n_chunks=2)
    try:
        wrapped.set_epoch(3)
        assert wrapped.shared_epoch.get_value() == 3
        assert wrapped.dataloader.epoch == 3
        assert info.shared_epoch is wrapped.shared_epoch
    finally:
        wrapped.dataloader.close()


def test_jestify_on_yield_sees_each_batch_info():
    seen = []
    wrapped = jestify(_data_info(n_batches=8), make_tiny_clip(0), make_tiny_clip(1), 0.5,
                      n_chunks=2, on_yield=lambda i, ld: seen.append((i, ld.last_info.step)))
    try:
        n = sum(1 for _ in wrapped.dataloader)
    finally:
        wrapped.dataloader.close()
    assert n == 4 and seen == [(0, 0), (1, 1), (2, 2), (3, 3)]


def test_jestify_num_samples_of_a_map_style_loader():
    # open_clip's csv/synthetic loaders: num_samples = len(dataset), num_batches = len(loader)
    from torch.utils.data import DataLoader, TensorDataset

    images, texts = make_pair_batches(1, b=42)[0]
    base = DataLoader(TensorDataset(images, texts), batch_size=4, drop_last=True)
    base.num_samples, base.num_batches = 42, len(base)  # 10 batches
    info = ocdata.DataInfo(dataloader=base, shared_epoch=ocdata.SharedEpoch(0))
    wrapped = jestify(info, make_tiny_clip(0), make_tiny_clip(1), 0.5, n_chunks=2)
    try:
        assert wrapped.dataloader.num_batches == 5
        assert wrapped.dataloader.num_samples == 5 * 4  # not 5 * (42 // 10)
    finally:
        wrapped.dataloader.close()


def test_jestify_resumed_from_an_epoch_checkpoint_continues_the_selection_log(tmp_path):
    """open_clip_train --resume builds a fresh loader at epoch e: its steps and selection-log
    records must continue the interrupted run's (not restart at 0, not overwrite the log)."""
    from jeststream.selection_log import read_selection_log

    log = tmp_path / "sel.jsonl"

    def run(epochs, **kw):
        wrapped = jestify(_data_info(n_batches=8), make_tiny_clip(0), make_tiny_clip(1), 0.5,
                          n_chunks=2, selection_log=log, **kw)
        try:
            for epoch in epochs:
                wrapped.set_epoch(epoch)
                steps = [wrapped.dataloader.last_info.step for _ in wrapped.dataloader]
        finally:
            wrapped.dataloader.close()
        return steps

    run([0, 1])  # crashed after epoch 1's records were written, checkpoint epoch_1.pt
    assert run([1, 2], append_log=True) == [8, 9, 10, 11]  # open_clip's step axis
    cols = read_selection_log(log)
    assert cols["step"].tolist() == [s for s in range(12) for _ in range(8)]
    assert cols["epoch"].tolist() == [e for e in range(3) for _ in range(32)]
    assert len(read_selection_log(log, dedupe=False)["step"]) == 4 * 32  # epoch 1 rewritten


def test_jestify_errors():
    learner, reference = make_tiny_clip(0), make_tiny_clip(1)
    with pytest.raises(ValueError, match="fewer than the n=4 base batches"):
        jestify(_data_info(n_batches=3), learner, reference, 0.25)
    with pytest.raises(TypeError, match="DataInfo"):
        jestify(object(), learner, reference, 0.25)
    wrapped = jestify(_data_info(), learner, reference, 0.25, n_chunks=2)
    try:
        with pytest.raises(ValueError, match="already a JESTLoader"):
            jestify(wrapped, learner, reference, 0.25)
    finally:
        wrapped.dataloader.close()


# -- reference loading -----------------------------------------------------------------------------


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("siglip", [False, True], ids=["clip", "siglip"])
def test_load_reference_from_open_clip_train_checkpoint(tmp_path, tiny_name, siglip):
    model = make_tiny_clip(3, siglip=siglip)
    if siglip:
        with torch.no_grad():
            model.logit_bias.fill_(-7.5)
    run = tmp_path / "logs" / "stage1"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "epoch_2.pt"
    # what open_clip_train saves under DDP: module.-prefixed keys, plus optimizer state
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 2, "name": "stage1", "state_dict": sd, "optimizer": {}}, ckpt)
    ref = load_reference(ckpt, model=tiny_name)
    assert _same_weights(ref, model)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    # the architecture is read from the run's params.txt when not given
    (run / "params.txt").write_text(f"lr: 0.001\nmodel: {tiny_name}\nsiglip: {siglip}\n")
    assert _same_weights(load_reference(str(ckpt)), model)
    assert set(read_checkpoint_state_dict(ckpt)) == set(model.state_dict())


def test_load_reference_local_dir_and_dtype(tmp_path):
    model = make_tiny_clip(4, siglip=True)
    spec = write_local_dir(model, TINY_CLIP_CFG, tmp_path / "ref")
    assert spec == f"local-dir:{tmp_path / 'ref'}"
    ref = load_reference(spec)
    assert _same_weights(ref, model)
    ref16 = load_reference(spec, dtype=torch.bfloat16)
    assert next(ref16.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_load_reference_local_dir_siglip_config_without_logit_bias(tmp_path, fmt):
    """A model trained with --siglip, saved with its architecture's config (which has no
    init_logit_bias, as open_clip's own config files don't): open_clip builds it without the
    parameter and fails on the weights; load_reference reads the bias from the weights, as it
    does for checkpoint files."""
    from safetensors.torch import save_file

    model = make_tiny_clip(6, siglip=True)
    with torch.no_grad():
        model.logit_bias.fill_(-6.25)
    folder = tmp_path / "ref"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CFG}))
    if fmt == "bin":
        torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    else:
        save_file(model.state_dict(), str(folder / "open_clip_model.safetensors"))
    spec = f"local-dir:{folder}"
    with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'ndim'"):
        open_clip.create_model(spec)  # what open_clip does on its own
    ref = load_reference(spec)
    assert _same_weights(ref, model) and float(ref.logit_bias) == -6.25
    # a plain CLIP local dir is untouched: no logit_bias appears
    clip = make_tiny_clip(7)
    plain = write_local_dir(clip, TINY_CLIP_CFG, tmp_path / "clip")
    assert load_reference(plain).logit_bias is None


@pytest.mark.parametrize("by", ["tag", "file"])
def test_load_reference_released_name_and_pretrained(tmp_path, tiny_name, monkeypatch, by):
    """Route (a): a model name with a pretrained tag from open_clip's registry (here a tag whose
    weights are a local file, as open_clip's registry allows, so nothing is downloaded), or
    with a weights file."""
    import open_clip.pretrained

    model = make_tiny_clip(5)
    weights = tmp_path / "released.bin"
    torch.save(model.state_dict(), weights)
    tag = str(weights)
    if by == "tag":
        monkeypatch.setitem(open_clip.pretrained._PRETRAINED, tiny_name, {"curated_s1m": {"file": str(weights)}})
        tag = "curated_s1m"
    ref = load_reference(tiny_name, pretrained=tag)
    assert _same_weights(ref, model)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())


def test_load_reference_errors(tmp_path, tiny_name):
    with pytest.raises(ValueError, match="without weights"):
        load_reference(tiny_name)
    with pytest.raises(ValueError, match="does not exist"):
        load_reference(str(tmp_path / "missing" / "epoch_1.pt"))
    with pytest.raises(ValueError, match="open_clip_config.json"):
        load_reference(f"local-dir:{tmp_path}")
    ckpt = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": make_tiny_clip(0).state_dict()}, ckpt)
    with pytest.raises(ValueError, match="name its architecture"):
        load_reference(ckpt)
    other = dict(TINY_CLIP_CFG, embed_dim=16)
    (tmp_path / "other.json").write_text(json.dumps(other))
    open_clip.add_model_config(tmp_path / "other.json")
    with pytest.raises(ValueError, match="does not fit the architecture"):
        load_reference(ckpt, model="other")


def test_check_compatible_rejects_other_tokenizer_or_image_size():
    learner = make_tiny_clip(0)
    check_compatible(learner, make_tiny_clip(1))
    cfg = json.loads(json.dumps(TINY_CLIP_CFG))
    cfg["text_cfg"]["context_length"] = 8
    cfg["vision_cfg"]["image_size"] = 16
    with pytest.raises(ValueError, match="context_length 16 .* vs 8.*image size"):
        check_compatible(learner, open_clip.model.CLIP(**cfg))
