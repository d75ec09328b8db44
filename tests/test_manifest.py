"""Manifest: atomic writes, artifact hashing, tamper detection, clear errors on corruption."""

from __future__ import annotations

import json
import os

import pytest

from pipeline import manifest as mf
from pipeline.manifest import Manifest, ManifestError, StageRecord


def test_round_trip(tmp_path):
    art = tmp_path / "teacher" / "teacher.pt"
    art.parent.mkdir()
    art.write_bytes(b"weights")
    m = Manifest(tmp_path)
    m.stages["teacher"] = StageRecord(status="ok", key="k", outputs={"teacher": mf.artifact_record(art, tmp_path)},
                                      metrics={"teacher": {"accuracy": 0.9}})
    m.save()
    loaded = Manifest.load(tmp_path)
    rec = loaded.stages["teacher"]
    assert rec.outputs["teacher"].path == os.path.join("teacher", "teacher.pt")
    assert rec.outputs["teacher"].bytes == 7
    assert rec.outputs["teacher"].sha256 == mf.sha256_file(art)
    assert rec.metrics["teacher"]["accuracy"] == 0.9
    assert json.loads(m.path.read_text())["metric_units"]["latency_p50_ms"]["better"] == "lower"


def test_atomic_write_keeps_old_file_when_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    target.write_text("old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(mf.os, "replace", boom)
    with pytest.raises(OSError):
        mf.atomic_write_bytes(target, b"new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temp file left behind


def test_atomic_write_keeps_old_file_when_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    target.write_text("old")
    monkeypatch.setattr(mf.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("io error")))
    with pytest.raises(OSError):
        mf.atomic_write_bytes(target, b"new")
    assert target.read_text() == "old"
    assert len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("change", ["edit", "truncate", "delete", "same_size_edit"])
def test_verify_detects_tampering(tmp_path, change):
    art = tmp_path / "a.bin"
    art.write_bytes(b"0123456789")
    rec = mf.artifact_record(art, tmp_path)
    assert mf.verify_artifact(rec, tmp_path) is None
    if change == "edit":
        art.write_bytes(b"0123456789x")
    elif change == "truncate":
        art.write_bytes(b"01234")
    elif change == "delete":
        art.unlink()
    else:
        art.write_bytes(b"0123456780")
    assert mf.verify_artifact(rec, tmp_path) is not None


def test_corrupt_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "manifest.json").write_text('{"stages": {')
    with pytest.raises(ManifestError, match="corrupt"):
        Manifest.load(tmp_path)


def test_hand_edited_manifest_with_bad_status(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"stages": {"teacher": {"status": "great"}}}))
    with pytest.raises(ManifestError, match="stages.teacher.status"):
        Manifest.load(tmp_path)


def test_missing_manifest_is_empty(tmp_path):
    assert Manifest.load(tmp_path).stages == {}


@pytest.mark.parametrize("change", ["edit_bin", "delete_bin"])
def test_openvino_ir_is_hashed_with_its_weights(tmp_path, change):
    xml, weights = tmp_path / "m.xml", tmp_path / "m.bin"
    xml.write_text("<net/>")
    weights.write_bytes(b"\x00" * 16)
    rec = mf.artifact_record(xml, tmp_path)
    assert rec.bytes == 6 + 16 and mf.verify_artifact(rec, tmp_path) is None
    if change == "edit_bin":
        weights.write_bytes(b"\x01" + b"\x00" * 15)  # same size, other weights
    else:
        weights.unlink()
    assert mf.verify_artifact(rec, tmp_path) is not None


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_get_the_usual_mode(tmp_path, umask):
    """Artifacts, the manifest and the report are readable as `open()` would make them
    (0666 less the umask), not mkstemp's 0600; a new folder gets 0777 less the umask."""
    old = os.umask(umask)
    try:
        mf.atomic_write_bytes(tmp_path / "stage" / "model.pt", b"weights")
        m = Manifest(tmp_path)
        m.save()
        assert mf.current_umask() == umask
    finally:
        os.umask(old)
    assert (tmp_path / "stage" / "model.pt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert m.path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "stage").stat().st_mode & 0o777 == 0o777 & ~umask
