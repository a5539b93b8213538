"""Backbones over timm (random init), local weight files, the offline EfficientNet-Lite0, FPN."""

import pytest
import torch
from safetensors.torch import save_file

from vision.backbones import (
    BackboneWeightsError,
    build_fpn,
    create_backbone,
    efficientnet_lite0_classifier,
    list_backbones,
    register_backbone,
)
from vision.registry import RegistryError


@pytest.mark.parametrize(
    "name, strides",
    [("resnet18", [2, 4, 8, 16, 32]), ("mobilenetv3_small_050", [2, 4, 8, 16, 32]), ("convnext_atto", [4, 8, 16, 32])],
)
def test_timm_backbones_strides_channels_shapes(name, strides):
    bb = create_backbone(name)
    assert bb.strides == strides
    feats = bb(torch.rand(1, 3, 64, 96))
    assert [f.shape[1] for f in feats] == bb.out_channels
    for f, s in zip(feats, bb.strides, strict=True):
        assert f.shape[-2:] == (64 // s, 96 // s)
    assert len(bb.mean) == 3 and len(bb.std) == 3


@pytest.mark.parametrize("name, size_check", [("mambaout_femto", False), ("swin_tiny_patch4_window7_224", True)])
def test_channels_last_and_fixed_size_timm_models_give_nchw_maps_at_any_size(name, size_check):
    # MambaOut and Swin return [B, H, W, C] maps; Swin also checks the input against 224 px unless built with
    # strict_img_size=False, which create_backbone finds by itself
    bb = create_backbone(name, out_strides=(8, 16, 32))
    assert bb.channels_last_out
    if size_check:
        assert bb.body.patch_embed.strict_img_size is False
    for h, w in ((64, 96), (96, 160)):
        feats = bb(torch.rand(1, 3, h, w))
        assert [f.shape[1] for f in feats] == bb.out_channels
        assert [tuple(f.shape[-2:]) for f in feats] == [(h // s, w // s) for s in (8, 16, 32)]


def test_backbone_that_needs_one_input_size_is_a_clear_error():
    with pytest.raises(ValueError, match=r"backbone 'levit_128s' does not take images of any size \(a 64x96 input"):
        create_backbone("levit_128s")


def test_out_indices_and_out_strides():
    bb = create_backbone("resnet18", out_indices=(2, 3, 4))
    assert bb.strides == [8, 16, 32]
    bb = create_backbone("resnet18", out_strides=(8, 32))
    assert bb.strides == [8, 32] and len(bb(torch.rand(1, 3, 64, 64))) == 2
    with pytest.raises(ValueError, match="strides"):
        create_backbone("resnet18", out_strides=(64,))


def test_unknown_backbone_error_suggests():
    with pytest.raises(RegistryError, match="Did you mean"):
        create_backbone("resnet1888")


def test_local_weights_file_safetensors_and_pth(tmp_path):
    src = create_backbone("resnet18")
    sd = {f"model.{k}": v.clone() + 1 for k, v in src.body.state_dict().items()}
    st, pth = tmp_path / "w.safetensors", tmp_path / "w.pth"
    save_file(sd, str(st))
    torch.save({"state_dict": sd}, pth)
    for path in (st, pth):
        bb = create_backbone("resnet18", pretrained=str(path))
        w = bb.body.state_dict()["conv1.weight"]
        assert torch.equal(w, src.body.state_dict()["conv1.weight"] + 1)
    with pytest.raises(BackboneWeightsError, match="does not exist"):
        create_backbone("resnet18", pretrained=str(tmp_path / "missing.pth"))
    bad = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(3)}, str(bad))
    with pytest.raises(BackboneWeightsError, match="matches only"):
        create_backbone("resnet18", pretrained=str(bad))


def test_pretrained_true_offline_gives_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneWeightsError, match="weights/README.md"):
        create_backbone("resnet18", pretrained=True)


def test_register_backbone_and_list():
    @register_backbone("tiny_test_backbone", override=True)
    def _tiny(pretrained=False, out_indices=None):
        return create_backbone("resnet18", out_indices=out_indices)

    assert "tiny_test_backbone" in list_backbones()
    assert "efficientnet_lite0.offline" in list_backbones()
    assert create_backbone("tiny_test_backbone").strides == [2, 4, 8, 16, 32]
    assert "resnet18" in list_backbones("resnet1*", include_timm=True)


def test_efficientnet_lite0_offline_is_really_pretrained():
    """With its ImageNet head it calls skimage's chelsea a cat (classes 281-285)."""
    import skimage.data

    model = efficientnet_lite0_classifier()
    img = torch.tensor(skimage.data.chelsea()).permute(2, 0, 1).float() / 255
    x = torch.nn.functional.interpolate(img[None], size=(224, 224), mode="bilinear", antialias=True)
    x = (x - 0.5) / 0.5  # the offline weights expect inputs in [-1, 1]
    with torch.no_grad():
        top = model(x).softmax(-1).topk(3)
    assert int(top.indices[0, 0]) in range(281, 286)
    assert float(top.values[0, 0]) > 0.5
    bb = create_backbone("efficientnet_lite0.offline", pretrained=True, out_strides=(8, 16, 32))
    assert bb.mean == (0.5, 0.5, 0.5) and bb.std == (0.5, 0.5, 0.5)
    assert bb.out_channels == [40, 112, 320]
    # backbone weights are the classifier's; pretrained=False gives a random init as for every name
    assert not torch.equal(create_backbone("efficientnet_lite0.offline").body.state_dict()["conv_stem.weight"],
                           model.state_dict()["conv_stem.weight"])
    assert torch.equal(bb.body.state_dict()["conv_stem.weight"], model.state_dict()["conv_stem.weight"])


def test_fpn_p3_p7():
    bb = create_backbone("resnet18", out_strides=(8, 16, 32))
    fpn = build_fpn(bb, 64, extra="p6p7")
    feats = fpn(bb(torch.rand(2, 3, 128, 128)))
    assert fpn.strides == [8, 16, 32, 64, 128]
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2, 1]
    assert all(f.shape[1] == 64 for f in feats)
    assert len(build_fpn(bb, 64, extra=None)(bb(torch.rand(1, 3, 64, 64)))) == 3
    with pytest.raises(ValueError, match="unknown FPN"):
        build_fpn(bb, 64, extra="p9")


def test_out_strides_freeze_the_stages_no_kept_map_uses():
    from vision.backbones import create_backbone

    bb = create_backbone("resnet18", pretrained=False, out_strides=[8])
    frozen = {n for n, p in bb.named_parameters() if not p.requires_grad}
    assert frozen and all(".layer3." in n or ".layer4." in n for n in frozen)  # stride 16 and 32 stages only
    assert bb.training and all(p.grad is None for p in bb.parameters())  # the probe leaves no trace
    out = bb(torch.rand(2, 3, 64, 64))[0]
    out.sum().backward()
    assert all(p.grad is not None for p in bb.parameters() if p.requires_grad)  # what stays trainable is used
    full = create_backbone("resnet18", pretrained=False)
    assert all(p.requires_grad for p in full.parameters())


def test_truncated_backbone_weights_are_one_clear_error(tmp_path):
    bb = create_backbone("resnet18")
    f = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in bb.body.state_dict().items()}, str(f))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(BackboneWeightsError, match=r"r18\.safetensors: damaged checkpoint file \(truncated") as e:
        create_backbone("resnet18", pretrained=str(f))
    assert isinstance(e.value, ValueError)  # the commands report ValueErrors in one line
