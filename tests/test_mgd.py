"""MGDLoss against hand computations, its mask, its gradients, and the feature taps."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from pipeline.config import ConfigError
from stages.mgd import FeatureTap, MGDHead, MGDLoss, probe_shapes


def _identity_generation(loss: MGDLoss) -> None:
    """Make G(x) = relu(x): both 3×3 convs pass each channel through unchanged."""
    with torch.no_grad():
        for conv in (loss.generation[0], loss.generation[2]):
            conv.weight.zero_()
            conv.bias.zero_()
            for c in range(conv.out_channels):
                conv.weight[c, c, 1, 1] = 1.0


def test_exact_value_against_hand_computation():
    loss = MGDLoss(2, 2, alpha=0.5, mask_ratio=0.5, mask="channel")
    _identity_generation(loss)
    s = torch.tensor([[[[1.0]], [[2.0]]], [[[3.0]], [[4.0]]]])  # N=2, C=2, H=W=1, all positive
    t = torch.tensor([[[[0.0]], [[1.0]]], [[[1.0]], [[1.0]]]])
    m = torch.tensor([[[[1.0]], [[0.0]]], [[[0.0]], [[1.0]]]])  # zero channel 1 of item 0, channel 0 of item 1
    # G = S ⊙ M = [[1, 0], [0, 4]]; (G - T)² = [[1, 1], [1, 9]]; sum 12; / N=2 → 6; × α=0.5 → 3.
    assert loss(s, t, mask=m).item() == pytest.approx(3.0)


def test_exact_value_with_align_and_pixel_mask():
    torch.manual_seed(0)
    loss = MGDLoss(3, 2, alpha=7e-5, mask_ratio=0.65, mask="pixel")
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 2, 4, 4)
    m = (torch.rand(2, 1, 4, 4) > 0.65).float()
    a = loss.align
    aligned = torch.einsum("oc,nchw->nohw", a.weight[:, :, 0, 0], s) + a.bias.view(1, -1, 1, 1)
    g1, g2 = loss.generation[0], loss.generation[2]
    gen = nn.functional.conv2d(torch.relu(nn.functional.conv2d(aligned * m, g1.weight, g1.bias, padding=1)), g2.weight, g2.bias, padding=1)
    expected = 7e-5 * ((gen - t) ** 2).sum() / 2
    assert loss(s, t, mask=m).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("kind, shape", [("channel", (64, 128, 1, 1)), ("pixel", (64, 1, 8, 8))])
def test_mask_shape_and_fraction(kind, shape):
    torch.manual_seed(0)
    loss = MGDLoss(128, 128, mask_ratio=0.15, mask=kind)
    m = loss.random_mask(64, 128, 8, 8, torch.device("cpu"))
    assert tuple(m.shape) == shape
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert (1 - m.mean().item()) == pytest.approx(0.15, abs=0.02)


def test_random_mask_is_used_when_none_given():
    torch.manual_seed(0)
    loss = MGDLoss(8, 8, mask_ratio=0.5)
    s, t = torch.randn(4, 8, 2, 2), torch.randn(4, 8, 2, 2)
    a, b = loss(s, t), loss(s, t)
    assert a.item() != b.item()  # a fresh mask each call
    ones = loss(s, t, mask=torch.ones(1, 1, 1, 1))
    assert ones.item() == pytest.approx(loss(s, t, mask=torch.ones(4, 8, 1, 1)).item())


def test_gradients_reach_student_and_mgd_block_never_teacher():
    loss = MGDLoss(4, 6)
    s = torch.randn(2, 4, 3, 3, requires_grad=True)
    t = torch.randn(2, 6, 3, 3, requires_grad=True)
    loss(s, t, mask=torch.ones(2, 6, 1, 1)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    for p in loss.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_align_only_when_channels_differ():
    assert MGDLoss(512, 512).align is None
    same = sum(p.numel() for p in MGDLoss(8, 8).parameters())
    assert same == 2 * (8 * 8 * 9 + 8)
    diff = MGDLoss(4, 8)
    assert isinstance(diff.align, nn.Conv2d) and diff.align.kernel_size == (1, 1)
    assert diff.align.in_channels == 4 and diff.align.out_channels == 8


@pytest.mark.parametrize("resample", ["student", "teacher"])
def test_maps_of_different_size_are_resampled_to_meet(resample):
    loss = MGDLoss(4, 4, alpha=0.5, resample=resample)
    _identity_generation(loss)
    s = torch.rand(2, 4, 2, 2, requires_grad=True)  # positive: relu(G) passes it through
    t = torch.randn(2, 4, 4, 4)
    ones = torch.ones(1, 1, 1, 1)
    if resample == "student":  # the student's map grows to the teacher's 4×4, bilinear
        g, target = nn.functional.interpolate(s, size=(4, 4), mode="bilinear", align_corners=False), t
    else:  # the teacher's map is area-averaged down to the student's 2×2
        g, target = s, nn.functional.adaptive_avg_pool2d(t, (2, 2))
    expected = 0.5 * ((torch.relu(g) - target) ** 2).sum() / 2
    value = loss(s, t, mask=ones)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    value.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_a_shrinking_student_map_is_area_averaged():
    loss = MGDLoss(3, 3)
    x = torch.randn(1, 3, 8, 8)
    from stages.mgd import resize_map

    assert torch.allclose(resize_map(x, (4, 4)), nn.functional.avg_pool2d(x, 2))
    assert resize_map(x, (8, 8)) is x
    assert loss.distance(torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)).dim() == 0


def test_feature_tap_unknown_layer_suggests():
    model = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(ConfigError, match=r"student_layers: 'layer5'.*did you mean layer.*"):
        FeatureTap(model, ["layer5"], role="student")


def test_probe_and_head_discover_channels():
    r18 = torchvision.models.resnet18(num_classes=10)
    r34 = torchvision.models.resnet34(num_classes=10)
    mb = torchvision.models.mobilenet_v3_small(num_classes=10)
    assert probe_shapes(r18, ["layer3", "layer4"], (3, 64, 64), role="student") == [(256, 4, 4), (512, 2, 2)]
    head = MGDHead(r18, r34, ["layer4"], ["layer4"], (3, 64, 64), alpha=7e-5, mask_ratio=0.15, mask="channel")
    assert head.losses[0].align is None and head.losses[0].teacher_channels == 512
    head = MGDHead(mb, r34, ["features"], ["layer4"], (3, 64, 64), alpha=7e-5, mask_ratio=0.15, mask="channel")
    assert head.losses[0].align.in_channels == 576 and head.losses[0].align.out_channels == 512
    assert not any(k.startswith("losses") for k in mb.state_dict())  # no hooks or blocks left in the model
    assert len(mb._forward_hooks) == 0 and len(dict(mb.named_modules())["features"]._forward_hooks) == 0


def test_head_pairs_taps_of_different_size_and_records_the_resampling():
    r18 = torchvision.models.resnet18(num_classes=10)
    r34 = torchvision.models.resnet34(num_classes=10)
    head = MGDHead(r18, r34, ["layer4"], ["layer3"], (3, 64, 64), alpha=7e-5, mask_ratio=0.15, mask="channel")
    (tap,) = head.describe()
    assert tap["student_shape"] == [512, 2, 2] and tap["teacher_shape"] == [256, 4, 4]
    assert tap["resample"] == "student 2×2 → 4×4" and tap["align"] and tap["alpha"] == pytest.approx(7e-5)
    pooled = MGDHead(r18, r34, ["layer4"], ["layer3"], (3, 64, 64), alpha=7e-5, mask_ratio=0.15, mask="channel",
                     resample="teacher")
    assert pooled.describe()[0]["resample"] == "teacher 4×4 → 2×2"


def test_head_refuses_sizes_too_far_apart_in_a_sentence_listing_both_models_stages():
    r18 = torchvision.models.resnet18(num_classes=10)
    r34 = torchvision.models.resnet34(num_classes=10)
    with pytest.raises(ConfigError) as err:
        MGDHead(r18, r34, ["layer4"], ["layer1"], (3, 64, 64), alpha=7e-5, mask_ratio=0.15, mask="channel")
    msg = str(err.value)
    assert "the student's layer4 map (512×2×2) and the teacher's layer1 map (64×16×16) differ 8-fold" in msg
    assert "student stages, C×H×W: " in msg and "layer3 256×4×4" in msg and "teacher stages: " in msg
    assert "layer1 64×16×16" in msg


def test_auto_alpha_makes_the_first_batch_mgd_loss_the_task_loss_and_survives_a_resume():
    r18 = torchvision.models.resnet18(num_classes=10)
    r34 = torchvision.models.resnet34(num_classes=10).eval()
    head = MGDHead(r18, r34, ["layer3", "layer4"], ["layer3", "layer4"], (3, 32, 32), alpha="auto",
                   mask_ratio=0.15, mask="channel", auto_ratio=2.0)
    st, tt = FeatureTap(r18, ["layer3", "layer4"], role="student"), FeatureTap(r34, ["layer3", "layer4"], role="teacher")
    x = torch.randn(4, 3, 32, 32)
    r18(x)
    with torch.no_grad():
        r34(x)
    sf, tf = st.take(), tt.take()
    assert head.pending
    alpha = head.calibrate(sf, tf, torch.tensor(1.5))
    assert not head.pending and alpha > 0
    assert [t["alpha"] for t in head.describe()] == [alpha, alpha]  # one α: the taps keep their relative weight
    unmasked = sum(loss(s, t, mask=torch.ones(())) for loss, s, t in zip(head.losses, sf, tf))
    assert unmasked.item() == pytest.approx(2.0 * 1.5, rel=1e-4)
    resumed = MGDHead(r18, r34, ["layer3", "layer4"], ["layer3", "layer4"], (3, 32, 32), alpha="auto",
                      mask_ratio=0.15, mask="channel")
    assert resumed.pending
    resumed.load_state_dict(head.state_dict())
    assert not resumed.pending and resumed.losses[1].alpha == pytest.approx(alpha)


def test_head_sums_pairs_and_taps_keep_graph():
    r18 = torchvision.models.resnet18(num_classes=10)
    r34 = torchvision.models.resnet34(num_classes=10).eval()
    head = MGDHead(r18, r34, ["layer3", "layer4"], ["layer3", "layer4"], (3, 64, 64), alpha=7e-5, mask_ratio=0.15, mask="channel")
    st, tt = FeatureTap(r18, ["layer3", "layer4"], role="student"), FeatureTap(r34, ["layer3", "layer4"], role="teacher")
    x = torch.randn(2, 3, 64, 64)
    logits = r18(x)
    with torch.no_grad():
        r34(x)
    sf, tf = st.take(), tt.take()
    rng = {k: v.clone() for k, v in head.state_dict().items() if k.endswith("mask_rng")}
    total = head(sf, tf)
    head.load_state_dict(rng, strict=False)  # the same masks again
    parts = head.losses[0](sf[0], tf[0]) + head.losses[1](sf[1], tf[1])
    assert total.item() == pytest.approx(parts.item())
    (total + logits.sum()).backward()
    assert r18.layer3[0].conv1.weight.grad is not None
    assert all(p.grad is None for p in r34.parameters())


def test_masks_leave_the_global_rng_alone_and_resume_from_the_state_dict():
    loss = MGDLoss(8, 8, mask_ratio=0.5, mask="channel", seed=3)
    saved = {k: v.clone() for k, v in loss.state_dict().items()}
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = [loss.random_mask(4, 8, 1, 1, torch.device("cpu")) for _ in range(3)]
    assert torch.equal(torch.get_rng_state(), before)  # augmentation draws stay the baseline's
    assert not all(torch.equal(first[0], m) for m in first[1:])  # a stream, not one mask
    again = MGDLoss(8, 8, mask_ratio=0.5, mask="channel", seed=99)
    again.load_state_dict(saved)  # as a resume checkpoint restores the blocks
    assert all(torch.equal(a, again.random_mask(4, 8, 1, 1, torch.device("cpu"))) for a in first)
    other = MGDLoss(8, 8, mask_ratio=0.5, mask="channel", seed=4)
    assert not all(torch.equal(a, other.random_mask(4, 8, 1, 1, torch.device("cpu"))) for a in first)
