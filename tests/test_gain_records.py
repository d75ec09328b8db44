"""Paired-seed benchmark records: one setting for every compared method, found by the run that
shares it, shown in its report beside the single run's gain."""

from __future__ import annotations

import json

from pipeline import gain_records
from pipeline.report import measured
from pipeline.report.rows import RecordedTask


def _stage(method: str = "mgd+kd", unlabeled: str = "rest", **distill) -> dict:
    return {"data": {"source": "digits", "image_size": 16, "num_workers": "auto"},
            "teacher": {"arch": "resnet34", "epochs": 8, "amp": True},
            "distill": {"student": "resnet18", "method": method, "unlabeled": unlabeled, "baseline": True,
                        "train_fraction": 0.15, "epochs": 20, **distill}}


def _record(folder, stage: dict, **methods) -> None:
    gain_records.write(folder / "demo.json", {
        "setting_id": gain_records.setting_id("classification", stage), "setting": {}, "seeds": list(range(10)),
        "methods": methods, "command": "python benchmarks/mgd_gain.py --seeds 0 1", "measured": "2026-12-04",
        "machine": "x86_64, 2 CPU cores"})


def test_the_compared_methods_share_one_setting_and_the_budget_does_not():
    sid = gain_records.setting_id("classification", _stage())
    assert gain_records.setting_id("classification", _stage("none", "")) == sid  # method, stream, baseline
    assert gain_records.setting_id("classification", {**_stage(), "data": {"source": "digits", "image_size": 16,
                                                                           "num_workers": 0}}) == sid
    assert gain_records.setting_id("classification", _stage(epochs=30)) != sid
    assert gain_records.setting_id("segmentation", _stage()) != sid
    assert gain_records.method_label("mgd+kd", "rest") == "mgd+kd+u"
    assert gain_records.method_label("mgd", "", init_student=True) == "mgd+init"


def test_a_run_finds_the_record_of_its_own_setting_and_method(tmp_path):
    entry = {"mean": 0.97, "gain": 0.034, "gain_std": 0.011, "se": 0.0036, "up": 10, "detectable": 0.011,
             "unlabeled": "rest"}
    _record(tmp_path, _stage(), none={"mean": 0.94}, **{"mgd+kd+u": entry})
    rec, found = gain_records.find("classification", _stage(), tmp_path)
    assert found == entry and rec["file"] == "demo.json"
    assert gain_records.find("classification", _stage(unlabeled=""), tmp_path) is None  # mgd+kd: not measured
    assert gain_records.find("classification", _stage(epochs=30), tmp_path) is None  # another setting
    (tmp_path / "broken.json").write_text("{not json")
    assert gain_records.find("classification", _stage(), tmp_path) is not None  # a bad file is skipped


def test_the_report_shows_the_paired_figure_or_the_command_that_measures_it(tmp_path, monkeypatch):
    task = RecordedTask("classification", "accuracy", ("accuracy",))
    monkeypatch.setattr(gain_records, "RESULTS", tmp_path)
    text = measured._paired(task, _stage(), "rest").text
    assert "No paired-seed benchmark is recorded for this setting" in text
    assert "mgd_gain.py --config CONFIG --unlabeled 'rest'" in text

    _record(tmp_path, _stage(), none={"mean": 0.9394}, **{"mgd+kd+u": {
        "mean": 0.9739, "gain": 0.0344, "gain_std": 0.0114, "se": 0.0036, "up": 10, "detectable": 0.0114,
        "unlabeled": "rest"}})
    text = measured._paired(task, _stage(), "rest").text
    assert "Paired benchmark for this setting, 10 seeds (2026-12-04, x86_64, 2 CPU cores)" in text
    assert "accuracy 97.39% against the baseline's 93.94%, a paired gain of +3.44 pt" in text
    assert "std 1.14 pt, standard error 0.36 pt, 10/10 seeds up" in text and "could detect: 1.14 pt" in text
    assert text.endswith("Measured by: python benchmarks/mgd_gain.py --seeds 0 1")



def test_the_demo_record_matches_the_demo_config():
    """The committed record of the demo was measured on pipeline.toml as it is now."""
    from pipeline import config
    from tests.conftest import ROOT

    cfg = config.load(ROOT / "pipeline.toml").model_dump(mode="json")
    rec = json.loads((gain_records.RESULTS / "demo-classification.json").read_text())
    assert rec["setting_id"] == gain_records.setting_id("classification", cfg)
    found = gain_records.find("classification", cfg)
    assert found is not None and len(found[0]["seeds"]) >= 10
