"""The command line end to end, as a user runs it.

- bad input: one line naming the cause, exit code 2, manifest untouched (in-process, fast);
- a real tiny run: teacher trained on digits, manifest valid, second run cached and fast,
  a tampered artifact re-run, a failing gate exits 3 (subprocess, `python -m pipeline`).
"""

from __future__ import annotations

import json
import time

import pytest
import torch
import torchvision

from pipeline import cli
from pipeline.manifest import Manifest, StageRecord

def _plant_manifest(workdir):
    """A valid manifest from an 'earlier run', to prove bad input never touches it."""
    m = Manifest(workdir)
    m.stages["teacher"] = StageRecord(status="ok", key="earlier")
    m.save()
    return m.path.read_bytes()


def _png_tree(root, split_classes):
    from PIL import Image

    for split, classes in split_classes.items():
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (10, 10), (i * 40, 0, 0)).save(d / f"{i}.png")


BAD_INPUTS = {
    "malformed_toml": ("[teacher\narch = 1\n", "malformed TOML"),
    "unknown_key": ("[teacher]\narchitecture = 'resnet18'\n", "teacher.architecture: unknown key (did you mean arch?"),
    "wrong_type": ("[teacher]\nepochs = 'many'\n", "teacher.epochs = 'many'"),
    "out_of_range": ("[distill.mgd]\nmask_ratio = 1.2\n", "distill.mgd.mask_ratio = 1.2"),
    "unknown_model": ("[teacher]\narch = 'resnet19'\n", "resnet18"),
    "unknown_student": ("[distill]\nstudent = 'mobilenet_v9'\n", "mobilenet_v9"),
    "unknown_dataset": ("[data]\nsource = 'torchvision'\nname = 'CIFAR1O'\n", "CIFAR10"),
    "missing_data_dir": ("[data]\nsource = 'imagefolder'\nroot = 'no/such/dir'\n", "no/such/dir"),
    "class_mismatch": ("[data]\nsource = 'imagefolder'\nroot = 'imgs'\n", "dog"),
    "missing_checkpoint": ("[teacher]\nweights = 'nope.pt'\n", "nope.pt"),
    "unreadable_checkpoint": ("[teacher]\nweights = 'garbage.pt'\n", "garbage.pt"),
    "mismatched_checkpoint": ("[teacher]\nweights = 'r34.pt'\n", "r34.pt"),
    "workdir_not_writable": ("[pipeline]\nworkdir = 'afile/run'\n", "pipeline.workdir"),
    "cuda_without_gpu": ("[pipeline]\ndevice = 'cuda:7'\n", "pipeline.device"),
    "bad_device": ("[pipeline]\ndevice = 'tpu'\n", "pipeline.device"),
    "negative_epochs": ("[teacher]\nepochs = -1\n", "teacher.epochs = -1"),
    "mask_ratio_one": ("[distill.mgd]\nmask_ratio = 1.0\n", "distill.mgd.mask_ratio = 1.0"),
    "prune_ratio_zero": ("[prune]\nratio = 0\n", "prune.ratio = 0"),
    "prune_ratio_one": ("[prune]\nratio = 1\n", "prune.ratio = 1"),
    "unknown_teacher_layer": ("[distill.mgd]\nteacher_layers = ['layer5']\n", "layer5"),
    "maps_too_far_apart": ("[distill.mgd]\nteacher_layers = ['layer1']\n", "differ 8-fold in size"),
    "layer_count_mismatch": ("[distill.mgd]\nteacher_layers = ['layer3', 'layer4']\n", "paired in order"),
    "unknown_prune_layer": ("[prune]\nenabled = true\nignore_layers = ['layer9']\n", "layer9"),
    "unknown_budget_artifact": ("[gates.latency_ms]\nopenvino_int4 = 1.0\n", "openvino_int4"),
    "bad_precision": ("[openvino]\nprecisions = ['int4']\n", "openvino.precisions"),
    "bad_calibration": ("[tensorrt]\ncalibration = 'kl'\n", "tensorrt.calibration"),
    "imagefolder_without_root": ("[data]\nsource = 'imagefolder'\n", "data.root"),
    "single_class_imagefolder": ("[data]\nsource = 'imagefolder'\nroot = 'one'\n", "at least 2"),
    "empty_class_folder": ("[data]\nsource = 'imagefolder'\nroot = 'hollow'\n", "no images"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_one_line_exit_2_manifest_untouched(case, tmp_path, tiny_config, capsys):
    if case == "cuda_without_gpu" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    extra, expected = BAD_INPUTS[case]
    _png_tree(tmp_path / "imgs", {"train": ["cat", "dog"], "val": ["cat", "bird"]})
    _png_tree(tmp_path / "one", {"train": ["cat"], "val": ["cat"]})
    _png_tree(tmp_path / "hollow", {"train": ["cat", "dog"], "val": ["cat", "dog"]})
    for f in (tmp_path / "hollow" / "val" / "dog").iterdir():
        f.unlink()
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    torch.save(torchvision.models.resnet34(num_classes=10).state_dict(), tmp_path / "r34.pt")
    (tmp_path / "afile").write_text("a file where a directory should be")
    text = None
    if case == "malformed_toml":
        text = extra
        extra = ""
    path = tiny_config(extra=extra, text=text)
    workdir = tmp_path / "run"
    workdir.mkdir()
    before = _plant_manifest(workdir)
    capsys.readouterr()

    code = cli.main(["run", str(path)])

    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert expected in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error:") and err.splitlines()[-1] == errors[0], err
    assert "Traceback" not in err
    assert (workdir / "manifest.json").read_bytes() == before


def test_validate_command(tiny_config, capsys):
    assert cli.main(["validate", str(tiny_config())]) == 0
    assert "valid" in capsys.readouterr().out
    assert cli.main(["validate", str(tiny_config(extra="[prune]\nratio = 0\n"))]) == 2


def test_validate_writes_nothing(tmp_path, tiny_config, capsys):
    path = tiny_config(extra="[pipeline]\nworkdir = 'deep/new/run'\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert cli.main(["validate", str(path)]) == 0
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    (tmp_path / "deep").write_text("a file where a folder should be")
    capsys.readouterr()
    assert cli.main(["validate", str(path)]) == 2
    assert "pipeline.workdir = 'deep/new/run' is not writable" in capsys.readouterr().err


def _planted_run(workdir):
    """A finished run's manifest: teacher ok, distill failed a gate, a ship choice."""
    from pipeline.manifest import GateResult

    m = Manifest(workdir)
    m.model.pipeline = {"name": "planted", "chain": ["teacher", "distill"], "task": {"name": "classification"}}
    m.stages["teacher"] = StageRecord(status="ok", key="k" * 64, metrics={"teacher": {"accuracy": 0.9}})
    m.stages["distill"] = StageRecord(
        status="gate_failed", key="d" * 64, metrics={"student": {"accuracy": 0.5}},
        gates=[GateResult(gate="max_accuracy_drop", artifact="student", metric="accuracy", value=0.4, budget=0.01,
                          passed=False, message="max_accuracy_drop FAILED on student")])
    m.model.ship = {"torch": {"artifact": None, "reason": "student fails max_accuracy_drop"}}
    m.save()


def test_status_prints_to_stdout_and_json(tmp_path, capsys):
    _planted_run(tmp_path)
    capsys.readouterr()
    assert cli.main(["status", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "teacher" in out and "gate_failed" in out and "ship torch: none" in out  # pipeable: `status | grep ship`
    assert err == ""
    assert cli.main(["status", str(tmp_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert list(summary["stages"]) == ["teacher", "distill"]
    assert summary["stages"]["teacher"]["metrics"]["teacher"]["accuracy"] == 0.9
    assert summary["stages"]["distill"]["gate_failures"][0]["value"] == 0.4
    assert summary["ship"]["torch"]["reason"] == "student fails max_accuracy_drop" and summary["name"] == "planted"


def test_version_and_the_console_scripts_own_name(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    versions = __import__("pipeline.runner", fromlist=["package_versions"]).package_versions()
    assert out.startswith(f"edge-mgd-pipeline {versions['edge-mgd-pipeline']} (torch {versions['torch']}, ")
    assert len(out.splitlines()) == 1
    monkeypatch.setattr("sys.argv", ["/venv/bin/mgd-pipeline", "--help"])
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: mgd-pipeline ")
    monkeypatch.setattr("sys.argv", ["/src/pipeline/__main__.py", "--help"])
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m pipeline ")


def test_run_given_a_run_directory_names_the_config_to_pass(tmp_path, capsys):
    (tmp_path / "runs" / "digits").mkdir(parents=True)
    m = Manifest(tmp_path / "runs" / "digits")
    m.model.pipeline = {"config_file": "../../pipeline.toml"}  # as the runner records it
    m.save()
    capsys.readouterr()
    assert cli.main(["run", str(tmp_path / "runs" / "digits")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"is a run directory, not a config file; pass the config that made it: python -m pipeline run " \
           f"{tmp_path / 'pipeline.toml'} (" in err.replace("\n", "")
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_from_on_an_empty_workdir_is_one_line_exit_2(tmp_path, tiny_config, capsys):
    path = tiny_config()
    capsys.readouterr()
    assert cli.main(["run", str(path), "--from", "distill"]) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0] and "Traceback" not in err, err
    assert "stage distill needs 'teacher' from stage teacher" in errors[0]
    assert not (tmp_path / "run" / "manifest.json").exists()


TEACHER_ONLY = "[onnx]\nenabled = false\n[openvino]\nenabled = false\n[tensorrt]\nenabled = false\n"


@pytest.mark.slow
def test_tiny_run_end_to_end(tmp_path, tiny_config, cli):
    path = tiny_config(TEACHER_ONLY)
    first = cli("run", str(path), "--until", "teacher")
    assert first.returncode == 0, first.stderr[-3000:]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    rec = manifest["stages"]["teacher"]
    assert rec["status"] == "ok"
    out = rec["outputs"]["teacher"]
    assert out["path"] == "teacher/teacher.pt" and len(out["sha256"]) == 64
    assert out["bytes"] == (tmp_path / "run" / "teacher" / "teacher.pt").stat().st_size
    m = rec["metrics"]["teacher"]
    for key in ("accuracy", "latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "throughput_ips", "params", "macs", "size_bytes"):
        assert key in m, key
    assert 0 <= m["accuracy"] <= 1 and m["params"] > 1e6 and m["macs"] > 0 and m["threads"] == 1
    assert len(rec["history"]["teacher"]) == 1
    assert manifest["pipeline"]["versions"]["torch"] == torch.__version__.split("+")[0] or manifest["pipeline"]["versions"]["torch"]
    sd = torch.load(tmp_path / "run" / "teacher" / "teacher.pt", weights_only=True)
    assert "fc.weight" in sd and sd["fc.weight"].shape[0] == 10
    assert "teacher" in first.stderr and "accuracy" in first.stderr  # the summary table
    # Resume checkpoints are gone once their stage is recorded; what is written, others can read.
    assert not list((tmp_path / "run").rglob("*checkpoint.pt")), sorted((tmp_path / "run").rglob("*.pt"))
    umask = __import__("pipeline.manifest", fromlist=["current_umask"]).current_umask()
    for f in (tmp_path / "run" / "teacher" / "teacher.pt", tmp_path / "run" / "manifest.json",
              tmp_path / "run" / "report.html"):
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
    status = cli("status", str(tmp_path / "run"), "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["stages"]["teacher"]["status"] == "ok"

    # Second run: everything cached, nothing re-trained.
    t0 = time.perf_counter()
    second = cli("run", str(path), "--until", "teacher")
    assert second.returncode == 0 and "cached" in second.stderr
    assert time.perf_counter() - t0 < 30
    rec2 = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["teacher"]
    assert rec2["started"] == rec["started"] and rec2["key"] == rec["key"]

    # A tampered artifact is detected and the stage re-runs.
    (tmp_path / "run" / "teacher" / "teacher.pt").write_bytes(b"tampered")
    third = cli("run", str(path), "--until", "teacher")
    assert third.returncode == 0
    rec3 = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["teacher"]
    assert "content changed" in third.stderr or "changed size" in third.stderr
    assert rec3["outputs"]["teacher"]["bytes"] > 1000

    # A gate that cannot pass: exit 3, the gate named with value and budget.
    gated = tiny_config(extra=TEACHER_ONLY + "[gates.latency_ms]\nteacher = 0.0001\n", name="gated.toml")
    fourth = cli("run", str(gated), "--until", "teacher")
    assert fourth.returncode == 3, fourth.stderr[-2000:]
    assert "latency_ms FAILED on teacher" in fourth.stderr and "budget <= 0.0001" in fourth.stderr


@pytest.mark.parametrize(
    "extra, expected",
    [
        ("[distill.mgd]\nstudent_layers = ['layer9']\n", "distill.mgd.student_layers: 'layer9'"),
        ("[distill.mgd]\nteacher_layers = ['layer1']\n",
         "the student's layer4 map (512×1×1) and the teacher's layer1 map (64×8×8) differ 8-fold in size"),
    ],
)
def test_mgd_layer_errors_before_anything_trains(extra, expected, tiny_config, tmp_path, capsys):
    path = tiny_config(extra=extra)
    code = cli.main(["run", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and expected in err, err
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_build_engine_without_a_qdq_model_is_one_clear_line(tmp_path, cli):
    (tmp_path / "manifest.json").write_text('{"format": 1, "stages": {}}')
    proc = cli("build-engine", str(tmp_path))
    assert proc.returncode == 2
    assert "no trt_qdq artifact" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_target_is_rejected(tiny_config, cli):
    proc = cli("run", str(tiny_config()), "--target", "jetson")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_bad_image_mid_run_is_one_line_exit_2_and_keeps_earlier_work(tmp_path, tiny_config, cli):
    """A corrupt file in an ImageFolder tree is only met when training reads it: the stage fails
    with the file named (exit 2), and the run can go on once it is replaced."""
    from PIL import Image

    _png_tree(tmp_path / "imgs", {"train": ["cat", "dog"], "val": ["cat", "dog"]})
    Image.new("L", (10, 10), 128).save(tmp_path / "imgs" / "train" / "dog" / "gray.png")  # grayscale among RGB: fine
    Image.new("RGBA", (10, 10), (0, 9, 0, 9)).save(tmp_path / "imgs" / "train" / "cat" / "alpha.png")
    bad = tmp_path / "imgs" / "train" / "cat" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    path = tiny_config("[data]\nsource = 'imagefolder'\nroot = 'imgs'\nimage_size = 8\ntrain_fraction = 1.0\n"
                       "calibration_size = 4\n" + TEACHER_ONLY)
    proc = cli("run", str(path))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cannot read image" in proc.stderr and "broken.png" in proc.stderr and "Traceback" not in proc.stderr
    bad.unlink()
    again = cli("run", str(path))
    assert again.returncode == 0, again.stderr[-2000:]


def test_disk_full_on_artifact_write_is_exit_2_and_loses_nothing(tmp_path, tiny_config, monkeypatch, capsys):
    import errno

    from stages import training as _train

    path = tiny_config(TEACHER_ONLY)
    assert cli.main(["run", str(path), "--until", "teacher"]) == 0
    manifest = tmp_path / "run" / "manifest.json"
    teacher = json.loads(manifest.read_text())["stages"]["teacher"]

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "distill" / "student.pt"))

    monkeypatch.setattr(_train, "atomic_write_bytes", full)
    capsys.readouterr()
    assert cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "disk full while writing" in err and "student.pt" in err and "Traceback" not in err
    after = json.loads(manifest.read_text())["stages"]
    assert after["teacher"] == teacher  # finished work untouched
    assert after["distill"]["status"] == "failed"


def test_disk_full_on_manifest_write_is_one_line_exit_2(tmp_path, tiny_config, monkeypatch, capsys):
    import errno

    from pipeline import manifest as mf

    real = mf.atomic_write_bytes

    def full(path, data, **kwargs):
        if path.name == "manifest.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data, **kwargs)

    monkeypatch.setattr(mf, "atomic_write_bytes", full)
    capsys.readouterr()
    assert cli.main(["run", str(tiny_config(TEACHER_ONLY)), "--until", "teacher"]) == 2
    err = capsys.readouterr().err
    assert "disk full" in err and "manifest.json" in err and "Traceback" not in err
