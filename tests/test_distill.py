"""Distill stage through the runner: methods, baseline pairing, saved student, warnings."""

from __future__ import annotations

import pytest
import torch
import torchvision

from pipeline import config
from pipeline.runner import Runner, RunOptions
from pipeline.config import KDConfig
from pipeline.tasks import get_task

TASK = get_task("classification")


def kd_loss(student, teacher, temperature):
    return TASK.kd_loss(student, teacher, KDConfig(temperature=temperature))


def test_kd_loss_values():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    assert kd_loss(logits, logits, 4.0).item() == pytest.approx(0.0, abs=1e-7)
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    # T=2: p_t = softmax([0, 1]) ; p_s = [0.5, 0.5]; KL = Σ p_t log(p_t / p_s); × T².
    p = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    expected = (p * (p / 0.5).log()).sum().item() * 4
    assert kd_loss(s, t, 2.0).item() == pytest.approx(expected, rel=1e-5)


def _cfg(tmp_path, tiny_config, extra=""):
    return config.load(tiny_config(extra=extra))


def _run(cfg):
    return Runner(cfg, RunOptions(until_stage="distill")).run()


def test_mgd_student_and_paired_baseline(tmp_path, tiny_config):
    # epochs = 0: both students stay at their initial weights, which must be identical
    # (same seed, same build) so the baseline comparison is paired.
    cfg = _cfg(tmp_path, tiny_config, "[distill]\nstudent = 'resnet18'\nepochs = 0\n")
    out = _run(cfg)
    assert out.code == 0, out.messages
    rec = out.manifest.stages["distill"]
    assert set(rec.outputs) == {"student", "student_baseline"} and rec.reference == ["student_baseline"]
    a = torch.load(tmp_path / "run" / rec.outputs["student"].path, weights_only=True)
    b = torch.load(tmp_path / "run" / rec.outputs["student_baseline"].path, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mgd_training_saves_a_plain_student(tmp_path, tiny_config):
    cfg = _cfg(tmp_path, tiny_config, "[teacher]\nepochs = 0\n[distill]\nepochs = 4\n")
    out = _run(cfg)
    assert out.code == 0, out.messages
    rec = out.manifest.stages["distill"]
    sd = torch.load(tmp_path / "run" / rec.outputs["student"].path, weights_only=True)
    plain = torchvision.models.resnet18(num_classes=10).state_dict()
    assert set(sd) == set(plain)  # no align/generation weights, no wrappers
    base = torch.load(tmp_path / "run" / rec.outputs["student_baseline"].path, weights_only=True)
    assert any(not torch.equal(sd[k], base[k]) for k in sd)  # distillation changed the training
    assert len(rec.history["student"]) == 4 and len(rec.history["student_baseline"]) == 4
    for art in ("student", "student_baseline"):
        assert {"accuracy", "latency_p90_ms", "params", "macs", "size_bytes"} <= set(rec.metrics[art])
    # The warning fires exactly when the teacher does not beat the baseline student.
    t_acc = out.manifest.stages["teacher"].metrics["teacher"]["accuracy"]
    b_acc = rec.history["student_baseline"][-1]["val_acc"]
    warned = any("does not beat the student trained alone" in w for w in rec.warnings)
    assert warned == (t_acc <= b_acc)
    assert warned, (t_acc, b_acc)  # an untrained teacher (epochs = 0) is at chance level


@pytest.mark.parametrize("method", ["kd", "mgd+kd", "none"])
def test_other_methods(method, tmp_path, tiny_config):
    cfg = _cfg(tmp_path, tiny_config, f"[distill]\nmethod = '{method}'\nbaseline = false\nepochs = 1\n")
    out = _run(cfg)
    assert out.code == 0, out.messages
    rec = out.manifest.stages["distill"]
    assert set(rec.outputs) == {"student"} and rec.status == "ok"


def test_a_resnet_teacher_and_a_mobilenet_student_pair_with_the_default_taps_at_an_odd_size(tmp_path, tiny_config):
    # The user's case: no [distill.mgd] layers, 20 px: ResNet-18's layer4 and MobileNetV3's last
    # stage differ in width and in H×W; the align conv and the resampling meet them.
    cfg = _cfg(tmp_path, tiny_config, "[data]\nimage_size = 20\n[teacher]\nepochs = 0\n"
               "[distill]\nstudent = 'mobilenet_v3_small'\nbaseline = false\nepochs = 2\n")
    out = _run(cfg)
    assert out.code == 0, out.messages
    metrics = out.manifest.stages["distill"].metrics["student"]
    assert metrics["params"] < 2_000_000
    (tap,) = metrics["mgd_taps"]
    assert tap["student"] == "features" and tap["teacher"] == "layer4" and tap["align"]
    assert tap["student_shape"][1:] != tap["teacher_shape"][1:]
    assert tap["resample"] == f"student {tap['student_shape'][1]}×{tap['student_shape'][2]} → " \
                              f"{tap['teacher_shape'][1]}×{tap['teacher_shape'][2]}"
    assert metrics["mgd_alpha_rule"] == "auto" and tap["alpha"] == metrics["mgd_alpha"] > 0
    # Every loss term is recorded per epoch, apart from the total.
    for epoch in out.manifest.stages["distill"].history["student"]:
        assert epoch["loss_task"] > 0 and epoch["loss_mgd"] > 0
        assert epoch["loss"] == pytest.approx(epoch["loss_task"] + epoch["loss_mgd"], rel=1e-4)
