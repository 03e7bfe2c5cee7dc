import numpy as np
import pytest
import torch
from PIL import Image

from adreg.backbones import build_backbone
from adreg.errors import BackboneError, ConfigError


def _images(n=2, size=(96, 80), seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def test_efficientnet_lite0_real_weights_layers(bottle_dir):
    bb = build_backbone("efficientnet-lite0", image_size=320)
    img = Image.open(next((bottle_dir / "train" / "good").iterdir()))
    feats = bb.extract([img.convert("RGB")])
    assert [tuple(p.shape) for p in feats.patches] == [(1, 40, 40, 40), (1, 112, 40, 40)]
    assert [tuple(g.shape) for g in feats.globals] == [(1, 40), (1, 112)]
    assert feats.combined("concat").shape == (1, 152, 40, 40)
    # pretrained, not random: activations of a real image are far from a fresh network's
    from efficientnet_lite_pytorch import EfficientNet

    assert not torch.allclose(bb.stem[0].weight, EfficientNet.from_name("efficientnet-lite0")._conv_stem.weight)
    with pytest.raises(ConfigError, match="equal width"):
        feats.combined("mean")


def test_efficientnet_lite2_and_bad_layers():
    bb = build_backbone("efficientnet-lite2", image_size=256)
    feats = bb.extract(_images(1))
    assert feats.grid == (32, 32)
    with pytest.raises(ConfigError, match="blocks"):
        build_backbone("efficientnet-lite0", layers=[4, 99])
    with pytest.raises(ConfigError, match="unknown backbone"):
        build_backbone("resnet50")


def _save_tiny_vit(path, registers=0):
    """A tiny randomly initialised DINOv2 saved like a downloaded checkpoint."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    kw = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
              patch_size=14, image_size=56)
    torch.manual_seed(0)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **kw))
    else:
        model = Dinov2Model(Dinov2Config(**kw))
    model.save_pretrained(path)
    return model.eval()


@pytest.mark.parametrize("registers", [0, 4])
def test_hf_vit_from_local_dir_drops_cls_and_registers(tmp_path, registers):
    model = _save_tiny_vit(tmp_path / "vit", registers)
    bb = build_backbone(f"hf:{tmp_path / 'vit'}", layers=[-1, -2], image_size=56)
    imgs = _images(2)
    feats = bb.extract(imgs)
    assert [tuple(p.shape) for p in feats.patches] == [(2, 32, 4, 4)] * 2
    with torch.no_grad():
        hs = model(pixel_values=bb.preprocess(imgs), output_hidden_states=True).hidden_states
    prefix = 1 + registers
    expected = hs[-1][:, prefix:, :].transpose(1, 2).reshape(2, 32, 4, 4)
    torch.testing.assert_close(feats.patches[0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats.globals[1], hs[-2][:, 0, :], atol=1e-5, rtol=1e-5)
    assert feats.combined("mean").shape == (2, 32, 4, 4)
    assert feats.combined("concat").shape == (2, 64, 4, 4)


def test_hf_layer_and_size_errors(tmp_path):
    _save_tiny_vit(tmp_path / "vit")
    with pytest.raises(ConfigError, match="hidden_states"):
        build_backbone(f"hf:{tmp_path / 'vit'}", layers=[-9], image_size=56)
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        build_backbone(f"hf:{tmp_path / 'vit'}", layers=[-1], image_size=60)


def test_hf_unreachable_hub_id_says_how_to_work_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match="local-dir"):
        build_backbone("hf:facebook/dinov2-small")


def test_preprocess_is_exactly_resize_then_normalise(bottle_dir):
    """The batch normalisation and the parallel resize give bit-identical inputs to the plain
    (x / 255 - mean) / std of each resized image, in any mode and any batch grouping."""
    bb = build_backbone("efficientnet-lite0", image_size=96)
    paths = sorted((bottle_dir / "test").rglob("*.png"))[:: 17][:4]
    imgs = [Image.open(p).convert("RGB") for p in paths] + [Image.open(paths[0]).convert("L")] + _images(2)

    def reference(img):
        arr = np.asarray(img.resize((96, 96), Image.BILINEAR).convert("RGB"), dtype=np.float32)
        x = torch.from_numpy(arr).permute(2, 0, 1).div(255.0)
        return (x - torch.tensor(bb.mean).view(3, 1, 1)) / torch.tensor(bb.std).view(3, 1, 1)

    want = torch.stack([reference(img) for img in imgs])
    assert torch.equal(bb.preprocess(imgs), want)
    assert torch.equal(torch.cat([bb.preprocess([img]) for img in imgs]), want)
    one, three = bb.extract(imgs, 1), bb.extract(imgs, 3)
    singles = [bb.forward_features(want[i:i + 1]) for i in range(len(imgs))]
    for layer in range(len(one.patches)):
        assert torch.equal(one.patches[layer], torch.cat([s.patches[layer] for s in singles]))
        assert torch.allclose(three.patches[layer], one.patches[layer], atol=1e-4)


def test_thread_map_keeps_order_raises_and_nests():
    from adreg.images import thread_map

    assert thread_map(lambda x: x * x, range(20)) == [x * x for x in range(20)]
    # a call made from a pool thread runs inline, so nesting cannot exhaust the pool and deadlock
    assert thread_map(lambda x: thread_map(lambda y: (x, y), [1, 2]), [7, 8, 9]) == [
        [(x, 1), (x, 2)] for x in (7, 8, 9)]
    with pytest.raises(ZeroDivisionError):
        thread_map(lambda x: 1 / x, [1, 0, 2])
