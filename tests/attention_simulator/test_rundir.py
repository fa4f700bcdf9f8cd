"""One writer per run directory; the configs a run writes; one W&B run across resumed jobs."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from attention_simulator.rundir import RunLock, RunLockedError

from ..helpers import train

HOLD = """
import sys, time
from attention_simulator.rundir import RunLock
lock = RunLock(sys.argv[1])  # the lock lives as long as this object
lock.acquire()
print("locked", flush=True)
time.sleep(600)
"""


def hold_lock(run_dir):
    """A second process that takes the run directory's lock and keeps it until killed."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_second_writer_is_refused_with_the_holders_name_and_a_dead_holders_lock_is_taken_over(tmp_path):
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(
            RunLockedError, match=rf"PID {holder.pid} on {socket.gethostname()}.*another hydra\.run\.dir"
        ):
            RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # dies without releasing: the lock file stays behind
        holder.wait()
    assert (tmp_path / ".lock").exists()
    lock = RunLock(tmp_path)
    message = lock.acquire()
    assert message and f"PID {holder.pid}" in message and "no longer running" in message
    lock.release()
    assert not (tmp_path / ".lock").exists()
    again = RunLock(tmp_path)
    assert again.acquire() is None  # released cleanly: nothing to take over
    again.release()


def test_training_refuses_a_locked_run_directory_and_touches_nothing(tmp_path, trained):
    shutil.copytree(trained("+experiment=vit_sigmoid", "trainer.max_steps=2", "data.batch_size=32").dir, tmp_path,
                    dirs_exist_ok=True)  # fmt: skip
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(RunLockedError, match=f"PID {holder.pid}"):
            train(tmp_path, "+experiment=vit_sigmoid", "trainer.max_steps=4", "trainer.resume=auto")
    finally:
        holder.kill()
        holder.wait()
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == {p: b for p, b in before.items()}


def test_configs_as_composed_and_resolved(tmp_path):
    train(tmp_path, "+experiment=lm_sigmoid", "trainer.max_steps=1", "data.batch_size=4", "trainer.eval_every=0",
          "data.eval_max_tokens=1024")  # fmt: skip
    composed = (tmp_path / ".hydra" / "config.yaml").read_text()
    resolved = yaml.safe_load((tmp_path / ".hydra" / "config_resolved.yaml").read_text())
    assert "${" in composed and "${" not in (tmp_path / ".hydra" / "config_resolved.yaml").read_text()
    assert resolved["schedule"]["total_steps"] == 1 and resolved["attention"]["sigmoid_bias"] == pytest.approx(
        -4.852030263919617  # −log 128: ${neg_log:${data.seq_len}}
    )


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    common = ["+experiment=vit_sigmoid", "trainer.max_steps=4", "data.batch_size=32", "logger.wandb=true"]
    train(tmp_path, *common, "trainer.run_steps=2")
    time.sleep(1.1)  # offline run folders are named to the second
    train(tmp_path, *common, "trainer.resume=auto")
    run_id = (tmp_path / "wandb" / "run_id").read_text().strip()
    folders = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(name.endswith(f"-{run_id}") for name in folders), folders
    assert os.path.getsize(next((tmp_path / "wandb" / folders[1]).glob("run-*.wandb"))) > 0
