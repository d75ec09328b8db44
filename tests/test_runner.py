"""Runner: cache keys, stage selection, skip/re-run decisions, failure recording, exit codes.

Uses fake stages registered in a private registry so every decision is checked in
milliseconds; the real stages are exercised end to end in test_cli.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from export.runtimes import TorchRuntime
from pipeline import config, runner, stage
from pipeline.config import ConfigError
from pipeline.manifest import Artifact, ArtifactRole, Manifest, ManifestError
from pipeline.stage import Measure, StageResult, StageUnavailable


class FakeRuntime:
    name, device, threads = "fake", "cpu", 1

    def prepare(self, batch):
        return batch

    def infer(self, prepared):
        return prepared

    output_names = ("logits",)

    def outputs(self, batch):
        out = np.zeros((len(batch), 10), dtype=np.float32)
        out[:, 0] = 1
        return {"logits": out}


@pytest.fixture
def fake_stages(monkeypatch):
    """Replace the registry with three fake stages a → b → c; count their runs."""
    registry: dict[str, stage.Stage] = {}
    monkeypatch.setattr(stage, "REGISTRY", registry)
    monkeypatch.setattr(stage, "STAGE_PACKAGES", ())
    calls: dict[str, int] = {"teacher": 0, "distill": 0, "prune": 0}
    behaviour: dict[str, str] = {}

    def make(name, order, inputs, outputs, enabled=None):
        def run(ctx):
            calls[name] += 1
            ctx.resume_file(f"{name}.checkpoint.pt").write_bytes(b"resume state")  # as training writes each epoch
            what = behaviour.get(name, "ok")
            if what == "boom":
                raise RuntimeError("kaput")
            if what == "unavailable":
                raise StageUnavailable("TensorRT not installed")
            if what == "bad_input":
                raise ConfigError("data.root: corrupted image x.png")
            outs = {}
            for o in outputs:
                p = ctx.out_dir / f"{o}.bin"
                p.write_bytes(f"{o}:{ctx.key}".encode())
                outs[o] = p
            if what == "torch":
                import torch

                model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
                rt = TorchRuntime(model, "cpu", threads=1)
                return StageResult(outputs=outs, measure={o: Measure(rt, model=model, path=outs[o]) for o in outputs})
            return StageResult(outputs=outs, measure={o: Measure(FakeRuntime(), path=outs[o]) for o in outputs})

        roles = {o: ArtifactRole(model="teacher" if o == "teacher" else "student", runtime="torch", precision="fp32",
                                 target=None if o == "teacher" else "torch") for o in outputs}
        stage.register(name, order=order, inputs=inputs, artifacts=roles, reads=("data",), enabled=enabled)(run)

    make("teacher", 10, (), ("teacher",))
    make("distill", 20, ("teacher",), ("student",))
    make("prune", 30, ("student",), ("pruned",), enabled=lambda c: c.prune.enabled)
    monkeypatch.setattr(runner, "preflight", lambda cfg: None)
    return calls, behaviour


def _cfg(tmp_path, **tables):
    raw = {"pipeline": {"workdir": str(tmp_path / "run"), "device": "cpu"},
           "data": {"image_size": 8, "batch_size": 64, "val_fraction": 0.1},
           "bench": {"warmup": 0, "runs": 3, "batch_runs": 1, "threads": 1}, "prune": {"enabled": True}}
    for k, v in tables.items():
        raw.setdefault(k, {}).update(v)
    return config.from_dict(raw)


def _run(cfg, **opts):
    return runner.Runner(cfg, runner.RunOptions(**opts)).run()


def test_first_run_then_everything_cached(tmp_path, fake_stages):
    calls, _ = fake_stages
    out = _run(_cfg(tmp_path))
    assert out.code == 0 and calls == {"teacher": 1, "distill": 1, "prune": 1}
    rec = out.manifest.stages["distill"]
    assert rec.status == "ok" and rec.inputs["teacher"].sha256 and rec.outputs["student"].bytes > 0
    assert 0 <= rec.metrics["student"]["accuracy"] <= 1 and "latency_p90_ms" in rec.metrics["student"]
    out2 = _run(_cfg(tmp_path))
    assert out2.code == 0 and calls == {"teacher": 1, "distill": 1, "prune": 1}
    assert out2.manifest.stages["distill"].started == rec.started
    assert out.manifest.model.pipeline["last_run"]["cached"] == []
    assert out2.manifest.model.pipeline["last_run"] == {"visited": ["teacher", "distill", "prune"],
                                                       "cached": ["teacher", "distill", "prune"]}


def test_changing_a_later_table_reruns_only_from_there(tmp_path, fake_stages):
    calls, _ = fake_stages
    _run(_cfg(tmp_path))
    _run(_cfg(tmp_path, distill={"epochs": 3}))
    assert calls == {"teacher": 1, "distill": 2, "prune": 2}


def test_changing_data_reruns_everything(tmp_path, fake_stages):
    calls, _ = fake_stages
    _run(_cfg(tmp_path))
    _run(_cfg(tmp_path, data={"batch_size": 32}))
    assert calls == {"teacher": 2, "distill": 2, "prune": 2}


@pytest.mark.parametrize("rot", ["edit", "truncate", "delete"])
def test_tampered_output_reruns_that_stage_and_after(tmp_path, fake_stages, rot):
    calls, _ = fake_stages
    out = _run(_cfg(tmp_path))
    path = tmp_path / "run" / out.manifest.stages["distill"].outputs["student"].path
    if rot == "edit":
        path.write_bytes(b"evil")
    elif rot == "truncate":
        path.write_bytes(path.read_bytes()[:3])
    else:
        path.unlink()
    _run(_cfg(tmp_path))
    assert calls == {"teacher": 1, "distill": 2, "prune": 2}


def test_force_from_until_only(tmp_path, fake_stages):
    calls, _ = fake_stages
    cfg = _cfg(tmp_path)
    _run(cfg, until_stage="distill")
    assert calls == {"teacher": 1, "distill": 1, "prune": 0}
    _run(cfg, force={"teacher"})
    assert calls == {"teacher": 2, "distill": 2, "prune": 1}
    _run(cfg, only={"prune"}, force={"prune"})
    assert calls == {"teacher": 2, "distill": 2, "prune": 2}
    _run(cfg, from_stage="distill", force={"distill"})
    assert calls == {"teacher": 2, "distill": 3, "prune": 3}


def test_unknown_stage_option_is_bad_input(tmp_path, fake_stages):
    with pytest.raises(ConfigError, match="--force 'distil'.*teacher, distill, prune"):
        _run(_cfg(tmp_path), force={"distil"})
    with pytest.raises(ConfigError, match="comes after"):
        _run(_cfg(tmp_path), from_stage="prune", until_stage="teacher")


def test_from_without_earlier_artifacts_is_bad_input_before_anything_runs(tmp_path, fake_stages):
    calls, _ = fake_stages
    with pytest.raises(ConfigError, match=r"--from distill: stage distill needs 'teacher' from stage teacher, "
                                          r"which this run leaves out and .* has not finished"):
        _run(_cfg(tmp_path), from_stage="distill")
    assert calls == {"teacher": 0, "distill": 0, "prune": 0}
    assert not (tmp_path / "run" / "manifest.json").exists()
    with pytest.raises(ConfigError, match="--only prune: stage prune needs 'student' from stage distill"):
        _run(_cfg(tmp_path), only={"prune"})
    # Once the earlier stages are recorded, the same options run.
    _run(_cfg(tmp_path), until_stage="teacher")
    assert _run(_cfg(tmp_path), from_stage="distill").code == 0
    assert calls == {"teacher": 1, "distill": 1, "prune": 1}


def test_an_input_from_a_disabled_stage_is_bad_input_before_anything_runs(tmp_path, fake_stages):
    calls, _ = fake_stages
    stage.register("onnx", order=40, inputs=("pruned",), reads=("data",),
                   artifacts={"onnx": ArtifactRole(runtime="onnxruntime", precision="fp32")})(lambda ctx: None)
    with pytest.raises(ConfigError, match=r"onnx needs 'pruned' from stage prune, which is disabled \(\[prune\] "
                                          r"enabled = false\) and has not finished in .*; enable prune or disable onnx"):
        _run(_cfg(tmp_path, prune={"enabled": False}))
    assert calls == {"teacher": 0, "distill": 0, "prune": 0}


def test_resume_files_go_once_the_stage_is_recorded(tmp_path, fake_stages, monkeypatch):
    calls, behaviour = fake_stages
    seen = []  # at every manifest write: (distill's recorded status, its checkpoint still on disk)
    real_save = runner._save

    def save(manifest):
        real_save(manifest)
        rec = manifest.stages.get("distill")
        seen.append((rec.status if rec else None, (tmp_path / "run" / "distill" / "distill.checkpoint.pt").exists()))

    monkeypatch.setattr(runner, "_save", save)
    behaviour["prune"] = "boom"
    out = _run(_cfg(tmp_path))
    assert out.code == runner.EXIT_STAGE_FAILED
    # The checkpoint was still there when the write recording distill as ok finished; gone after.
    assert ("ok", True) in seen and seen[-1] == ("ok", False)
    assert not (tmp_path / "run" / "teacher" / "teacher.checkpoint.pt").exists()
    assert (tmp_path / "run" / "prune" / "prune.checkpoint.pt").exists()  # a failed stage keeps it, to resume
    behaviour["prune"] = "ok"
    assert _run(_cfg(tmp_path)).code == 0
    assert not list((tmp_path / "run").rglob("*.checkpoint.pt"))
    assert calls == {"teacher": 1, "distill": 1, "prune": 2}


def test_keep_checkpoints_keeps_them(tmp_path, fake_stages):
    assert _run(_cfg(tmp_path, pipeline={"keep_checkpoints": True})).code == 0
    assert len(list((tmp_path / "run").rglob("*.checkpoint.pt"))) == 3


def test_disabled_stage_is_recorded_skipped(tmp_path, fake_stages):
    calls, _ = fake_stages
    out = _run(_cfg(tmp_path, prune={"enabled": False}))
    assert out.code == 0 and calls["prune"] == 0
    assert out.manifest.stages["prune"].status == "skipped"
    assert "enabled = false" in out.manifest.stages["prune"].reason


def test_failed_stage_is_recorded_and_earlier_artifacts_stay_valid(tmp_path, fake_stages):
    calls, behaviour = fake_stages
    behaviour["distill"] = "boom"
    out = _run(_cfg(tmp_path))
    assert out.code == runner.EXIT_STAGE_FAILED
    saved = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert saved["stages"]["distill"]["status"] == "failed"
    assert "RuntimeError: kaput" in saved["stages"]["distill"]["reason"]
    assert saved["stages"]["teacher"]["status"] == "ok" and calls["prune"] == 0
    behaviour["distill"] = "ok"
    out = _run(_cfg(tmp_path))
    assert out.code == 0 and calls == {"teacher": 1, "distill": 2, "prune": 1}


def test_bad_input_inside_a_stage_exits_2(tmp_path, fake_stages):
    _, behaviour = fake_stages
    behaviour["teacher"] = "bad_input"
    out = _run(_cfg(tmp_path))
    assert out.code == runner.EXIT_BAD_INPUT


def test_unavailable_is_recorded_not_failed(tmp_path, fake_stages):
    calls, behaviour = fake_stages
    behaviour["prune"] = "unavailable"
    out = _run(_cfg(tmp_path))
    assert out.code == 0
    rec = out.manifest.stages["prune"]
    assert rec.status == "unavailable" and rec.reason == "TensorRT not installed" and rec.metrics == {}
    _run(_cfg(tmp_path))
    assert calls["prune"] == 1  # cached until versions or config change


def test_gate_failure_exits_3_and_is_recorded(tmp_path, fake_stages):
    calls, _ = fake_stages
    out = _run(_cfg(tmp_path, gates={"latency_ms": {"student": 1e-9}}))
    assert out.code == runner.EXIT_GATE_FAILED
    assert out.manifest.stages["distill"].status == "gate_failed"
    assert any("latency_ms FAILED on student" in m for m in out.messages)
    # Relaxing the budget re-checks the gate without re-running anything.
    out = _run(_cfg(tmp_path, gates={"latency_ms": {"student": 1e6}}))
    assert out.code == 0 and out.manifest.stages["distill"].status == "ok"
    assert calls == {"teacher": 1, "distill": 1, "prune": 1}


def test_cache_key_depends_on_config_inputs_versions(tmp_path, fake_stages):
    stages = stage.load_stages()
    distill = stages[1]
    cfg = _cfg(tmp_path)
    art = Artifact(path="t", sha256="a" * 64, bytes=1)
    base = runner.cache_key(distill, cfg, {"teacher": art}, {"torch": "1"})
    assert base == runner.cache_key(distill, _cfg(tmp_path), {"teacher": art}, {"torch": "1"})
    assert base != runner.cache_key(distill, _cfg(tmp_path, distill={"lr": 0.1}), {"teacher": art}, {"torch": "1"})
    assert base != runner.cache_key(distill, _cfg(tmp_path, pipeline={"seed": 1}), {"teacher": art}, {"torch": "1"})
    assert base != runner.cache_key(distill, cfg, {"teacher": art.model_copy(update={"sha256": "b" * 64})}, {"torch": "1"})
    assert base != runner.cache_key(distill, cfg, {"teacher": art}, {"torch": "2"})
    # Gates are checked, not cached: changing a budget never re-runs a stage.
    assert base == runner.cache_key(distill, _cfg(tmp_path, gates={"max_accuracy_drop": 0.1}), {"teacher": art}, {"torch": "1"})


def test_corrupt_manifest_is_bad_input_and_left_alone(tmp_path, fake_stages):
    cfg = _cfg(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="corrupt.*--rebuild-manifest"):
        _run(cfg)
    assert (tmp_path / "run" / "manifest.json").read_text() == "{not json"


def test_rebuild_manifest_sets_the_corrupt_one_aside_and_runs(tmp_path, fake_stages):
    calls, _ = fake_stages
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text("{not json")
    out = _run(_cfg(tmp_path), rebuild_manifest=True)
    assert out.code == 0 and calls == {"teacher": 1, "distill": 1, "prune": 1}
    [aside] = (tmp_path / "run").glob("manifest.json.corrupt-*")
    assert aside.read_text() == "{not json"  # kept for inspection
    assert Manifest.load(tmp_path / "run").stages["prune"].status == "ok"


def test_manifest_reload_matches(tmp_path, fake_stages):
    out = _run(_cfg(tmp_path))
    again = Manifest.load(tmp_path / "run")
    assert again.model.model_dump() == out.manifest.model.model_dump()


def test_bench_threads_do_not_leak_into_later_stages(tmp_path, fake_stages):
    import torch

    _, behaviour = fake_stages
    behaviour["teacher"] = "torch"
    torch.set_num_threads(2)
    out = _run(_cfg(tmp_path))
    assert out.code == 0 and out.manifest.stages["teacher"].metrics["teacher"]["threads"] == 1
    assert out.manifest.stages["teacher"].metrics["teacher"]["params"] == 3 * 8 * 8 * 10 + 10
    assert torch.get_num_threads() == 2


def test_select_by_target_leaves_out_the_other_targets_stages():
    stages = stage.load_stages()
    names = [s.name for s in stages]
    assert names == ["teacher", "distill", "prune", "onnx", "openvino", "tensorrt", "int8_fallback", "qad"]
    assert runner.select(stages, runner.RunOptions(target="torch")) == names[:3]
    # The INT8 recovery stages make alternative builds for the targets they ship to.
    assert runner.select(stages, runner.RunOptions(target="openvino")) == [*names[:5], "int8_fallback", "qad"]
    assert runner.select(stages, runner.RunOptions(target="onnxruntime")) == [*names[:4], "int8_fallback"]
    assert runner.select(stages, runner.RunOptions(target="tensorrt")) == [*names[:4], "tensorrt"]
    assert runner.select(stages, runner.RunOptions(target="tensorrt", from_stage="openvino")) == ["tensorrt"]
    with pytest.raises(ConfigError, match="--target 'jetson'"):
        runner.select(stages, runner.RunOptions(target="jetson"))


def test_optional_input_is_used_when_present_and_skipped_when_absent(tmp_path, fake_stages):
    seen = {}

    def run(ctx):
        seen.update(ctx.inputs)
        out = ctx.out_dir / "x.bin"
        out.write_bytes(b"x")
        return stage.StageResult(outputs={"onnx": out})

    # Registered in the fixture's throw-away registry.
    stage.register("onnx", order=40, inputs=("pruned|student", "teacher_onnx?"), artifacts={"onnx": ArtifactRole()})(run)
    out = _run(_cfg(tmp_path))
    assert out.code == 0, out.messages
    assert set(seen) == {"pruned"}  # pruned preferred over student; teacher_onnx absent, not an error


def test_an_artifact_outside_the_workdir_fails_the_stage(tmp_path, fake_stages):
    def run(ctx):
        out = tmp_path / "elsewhere.bin"  # e.g. a path built from user input with '..'
        out.write_bytes(b"x")
        return stage.StageResult(outputs={"onnx": ctx.out_dir / ".." / ".." / "elsewhere.bin"})

    stage.register("onnx", order=40, inputs=(), artifacts={"onnx": ArtifactRole()})(run)
    out = _run(_cfg(tmp_path))
    assert out.code == runner.EXIT_STAGE_FAILED
    assert "outside the workdir" in out.manifest.stages["onnx"].reason


# --- declarations ---------------------------------------------------------------------------

RUNTIMES = {"torch", "onnxruntime", "openvino", "tensorrt"}


def test_every_stage_declares_what_the_core_derives_from():
    stages = stage.load_stages()
    tables = set(config.Config.model_fields)
    made_before: set[str] = set()
    for st in stages:
        assert st.name in tables, f"{st.name}: a stage is named after its TOML table"
        assert set(st.reads) <= tables, f"{st.name} reads unknown tables {set(st.reads) - tables}"
        for spec in st.inputs:
            for name in spec.rstrip("?").split("|"):
                assert name in made_before, f"{st.name} needs {name!r}, which no earlier stage declares"
        for name, role in st.artifacts.items():
            assert name not in made_before, f"{name!r} declared twice"
            if role.model == "none":
                assert role.runtime is None and role.target is None
                continue
            assert role.runtime in RUNTIMES and role.precision in {"fp32", "int8"}, (name, role)
            assert not (role.reference and role.target), f"{name}: a reference build is never shipped"
            if role.fp32 is not None:
                fp32 = stage.roles(stages)[role.fp32]
                assert role.fp32 in made_before | set(st.artifacts), f"{name}: FP32 counterpart declared later"
                assert role.precision == "int8" and fp32.precision == "fp32", name
                assert fp32.runtime == role.runtime, f"{name}: FP32 counterpart on another runtime"
            if role.supersedes is not None:
                assert role.supersedes in made_before | set(st.artifacts), name
        made_before |= set(st.artifacts)
        assert st.preflight is None or callable(st.preflight)
    commands = [c.name for st in stages for c in st.commands]
    assert len(commands) == len(set(commands)) and "build-engine" in commands
    # Exactly one teacher build in torch eager: what every gate and speedup is measured against.
    teachers = [n for st in stages for n, r in st.artifacts.items() if r.model == "teacher" and r.runtime == "torch"]
    assert teachers == ["teacher"]
    assert stage.targets(stages) == ["torch", "onnxruntime", "openvino", "tensorrt"]


def test_nox_target_sessions_name_declared_targets():
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).parents[1] / "noxfile.py").read_text())
    [targets] = [ast.literal_eval(node.value) for node in ast.walk(tree)
                 if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "TARGETS"]
    assert {t[0] for t in targets.values()} <= set(stage.targets())


def test_a_teacher_edit_changes_the_onnx_key_not_the_openvino_key(tmp_path):
    stages = {s.name: s for s in stage.load_stages()}
    versions = runner.package_versions()
    base = config.from_dict({"pipeline": {"workdir": str(tmp_path)}})
    edited = config.from_dict({"pipeline": {"workdir": str(tmp_path)}, "teacher": {"epochs": 3}})

    def key(cfg, name):
        return runner.cache_key(stages[name], cfg, {}, versions)

    # onnx builds the teacher's reference export from [teacher]: its key must follow it.
    assert key(base, "onnx") != key(edited, "onnx")
    # openvino reads no [teacher] setting: the teacher reaches it only through its input artifacts.
    assert key(base, "openvino") == key(edited, "openvino")


def test_a_stage_reading_an_undeclared_table_fails_loudly(tmp_path, fake_stages):
    def run(ctx):
        _ = ctx.cfg.tensorrt.calibration  # not declared in reads
        return stage.StageResult(outputs={})

    stage.register("onnx", order=40, inputs=(), artifacts={"onnx": ArtifactRole()})(run)
    out = _run(_cfg(tmp_path))
    assert out.code == runner.EXIT_STAGE_FAILED
    assert "reads [tensorrt] but does not declare it" in out.manifest.stages["onnx"].reason
