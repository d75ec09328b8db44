"""One writer per workdir: a held lock refuses a second run; a stale lock is replaced."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from pipeline.config import ConfigError
from pipeline.lock import LOCK_NAME, WorkdirLock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # finished and reaped: no such process any more


def test_second_holder_is_refused_with_the_pid(tmp_path):
    with WorkdirLock(tmp_path):
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(ConfigError, match=rf"in use by another run \(PID {os.getpid()}"):
            WorkdirLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists()  # released


def test_stale_lock_is_replaced(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": "x"}))
    with WorkdirLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_lock_from_another_host_is_not_guessed_stale(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "x"}))
    with pytest.raises(ConfigError, match="on host elsewhere"):
        WorkdirLock(tmp_path).acquire()


def test_cli_refuses_a_locked_workdir_and_leaves_it_alone(tiny_config, cli):
    cfg = tiny_config()
    workdir = cfg.parent / "run"
    workdir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (workdir / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": "t"}))
        proc = cli("run", str(cfg))
        assert proc.returncode == 2
        assert f"PID {holder.pid}" in proc.stderr and "in use by another run" in proc.stderr
        assert not (workdir / "manifest.json").exists()
        assert json.loads((workdir / LOCK_NAME).read_text())["pid"] == holder.pid  # not stolen
    finally:
        holder.kill()
        holder.wait()
