"""Sharded (DCP) checkpoints: saved by 2 processes, they load into 2 (DTensors), into 1 (plain
tensors, no process group) and from a single file; every value of a trainer's state comes back as
it was. Half-written directories are never resumed from; the converter round-trips both formats."""

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from attention_simulator import checkpoint as ckpt
from attention_simulator.errors import CheckpointError

from ..helpers import spawn

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import convert_checkpoint  # noqa: E402


def model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    # dim 0 uneven over 2 processes: 5 = 3 + 2, 3 = 2 + 1, 1 = 1 + 0 (an empty shard)
    return nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(3, 1))


def sharded_params(seed: int, mesh) -> dict:
    net = model(seed)
    for layer in net:
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return dict(net.state_dict())


def rng_state(seed: int) -> dict:
    return {"torch": torch.Generator().manual_seed(seed).get_state(), "cuda": [],
            "python": random.Random(seed).getstate()}  # fmt: skip


def make_state(params: dict, step: int, loss_scale: dict | None = None) -> dict:
    """A trainer's state around `params` (plain tensors or DTensors), its optimizer state shaped as
    optorch.state_dict(chain(clip_by_global_norm, adamw)) makes it, empty states included."""
    adam = {"count": {k: torch.tensor(step, dtype=torch.int64) for k in params},
            "exp_avg": {k: p * 2 for k, p in params.items()},
            "exp_avg_sq": {k: p * p for k, p in params.items()}, "max_exp_avg_sq": {}}  # fmt: skip
    return {
        "step": step,
        "model": params,
        "optimizer": [{"global_norm": torch.tensor(step / 7)}, [adam, {}, {}]],
        "loss_scale": loss_scale,
        "skipped_steps": 3,
        "data_position": 4 * step,
        "data": {"tokenizer": '{"vocab": ["a", "b"]}', "epoch": (2, None)},
        "world_size": 2,
        "rng": [rng_state(step + rank) for rank in range(2)],
    }


def expected(seed: int, step: int, loss_scale: dict | None = None) -> dict:
    return make_state(dict(model(seed).state_dict()), step, loss_scale)


def assert_same(actual, want, path="state"):
    """The same python structure and types; tensors equal as wholes, in dtype too."""
    if isinstance(want, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{path}: {type(actual).__name__}"
        whole = actual.full_tensor() if isinstance(actual, DTensor) else actual
        assert whole.dtype == want.dtype and torch.equal(whole, want), path
        return
    assert type(actual) is type(want), f"{path}: {type(actual).__name__}, expected {type(want).__name__}"
    if isinstance(want, dict):
        assert list(actual) == list(want), path
        for key in want:
            assert_same(actual[key], want[key], f"{path}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(actual) == len(want), path
        for i, (a, w) in enumerate(zip(actual, want)):
            assert_same(a, w, f"{path}[{i}]")
    else:
        assert actual == want, path


def leaves(tree, path=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from leaves(value, f"{path}/{key}")
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from leaves(value, f"{path}/{i}")
    else:
        yield path, tree


def assert_placed_as(state: dict, template: dict):
    """Every DTensor of the template comes back as a DTensor of the same mesh, placements and local shape."""
    loaded = dict(leaves(state))
    for path, like in leaves(template):
        if isinstance(like, DTensor):
            got = loaded[path]
            assert isinstance(got, DTensor) and got.placements == like.placements, path
            assert got.device_mesh == like.device_mesh and got.to_local().shape == like.to_local().shape, path


def _two_processes(rank: int, tmp: Path):
    mesh = init_device_mesh("cpu", (2,))
    template = make_state(sharded_params(1, mesh), 0)  # other values everywhere: loading must replace them
    step = ckpt.checkpoint_path(tmp / "checkpoints", 100, sharded=True)
    ckpt.save_sharded(step, make_state(sharded_params(0, mesh), 100))
    for source in (step, tmp / "one.dcp", tmp / "whole.pt"):  # saved by 2 processes, by 1, a single file
        state = ckpt.load_into(source, template)
        assert_same(state, expected(0, 100))
        assert_placed_as(state, template)

    # the same step again, replaced whole; a loss scale the template lacks comes as saved
    ckpt.save_sharded(step, make_state(sharded_params(2, mesh), 100, {"scale": torch.tensor(2.0**16)}))
    state = ckpt.load_into(step, template)
    assert_same(state, expected(2, 100, {"scale": torch.tensor(2.0**16)}))
    assert_placed_as(state, template)
    assert sorted(p.name for p in step.parent.iterdir()) == ["step_0000100.dcp"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sharded_checkpoints_load_at_any_process_count(tmp_path):
    ckpt.save_sharded(tmp_path / "one.dcp", expected(0, 100))  # one process, no process group
    ckpt.save_checkpoint(tmp_path / "whole.pt", expected(0, 100))
    spawn(_two_processes, tmp_path, tmp_path)

    # the 2-process checkpoint in this process, without a process group: into plain tensors, or as saved
    step = ckpt.checkpoint_path(tmp_path / "checkpoints", 100, sharded=True)
    scale = {"scale": torch.tensor(2.0**16)}
    template = {k: v for k, v in expected(1, 0).items() if k in ("model", "optimizer")}
    assert_same(ckpt.load_into(step, template), expected(2, 100, scale))
    assert_same(ckpt.load_checkpoint(step), expected(2, 100, scale))


def test_a_template_that_does_not_fit_is_refused_by_name(tmp_path):
    for path in (tmp_path / "step_0000001.dcp", tmp_path / "step_0000001.pt"):
        (ckpt.save_sharded if ckpt.is_sharded(path) else ckpt.save_checkpoint)(path, expected(0, 1))
        wider = expected(0, 1) | {"model": dict(nn.Sequential(nn.Linear(4, 6)).state_dict())}
        with pytest.raises(
            CheckpointError, match=r"'model/0.weight' with shape \(5, 4\); this run's has shape \(6, 4\)"
        ):
            ckpt.load_into(path, wider)
        more = expected(0, 1) | {"ema": {"w": torch.zeros(2)}}
        with pytest.raises(CheckpointError, match="has no 'ema/w', which this run's state has. Resume with"):
            ckpt.load_into(path, more)


def test_half_written_sharded_checkpoints_are_never_resumed_from(tmp_path, caplog):
    directory = tmp_path / "checkpoints"
    complete = ckpt.checkpoint_path(directory, 100, sharded=True)
    ckpt.save_sharded(complete, expected(0, 100))
    ckpt.save_checkpoint(ckpt.checkpoint_path(directory, 150), expected(0, 150))
    # a save killed before its rename: some shards under the temporary name
    killed = directory / "step_0000200.dcp.tmp"
    shutil.copytree(complete, killed)
    (killed / ".metadata").unlink()
    # and a directory under a final name without .metadata (e.g. copied in part)
    partial = shutil.copytree(killed, directory / "step_0000300.dcp")

    single = directory / "step_0000150.pt"
    assert ckpt.list_checkpoints(directory) == [complete, single, partial]
    with pytest.warns(UserWarning) as skipped:
        assert ckpt.resolve_resume("auto", tmp_path) == single
    assert [str(w.message) for w in skipped] == [f"skipping step_0000300.dcp: Checkpoint {str(partial)!r} has no "
        ".metadata file: it was not completely written (or is not a DCP checkpoint). Resume from an earlier "
        "checkpoints/step_* instead."]  # fmt: skip
    with pytest.raises(CheckpointError, match="no .metadata file"):
        ckpt.load_into(partial, {})
    for resume in (complete, single):
        assert ckpt.resolve_resume(str(resume), tmp_path / "elsewhere") == resume

    (directory / "step_0000150.pt.sha256").unlink()  # now the newest complete one is the directory
    with pytest.warns(UserWarning) as skipped:
        assert ckpt.resolve_resume(str(tmp_path), tmp_path / "elsewhere") == complete
    assert [str(w.message).split(":")[0] for w in skipped] == ["skipping step_0000300.dcp", "skipping step_0000150.pt"]

    ckpt.save_sharded(ckpt.checkpoint_path(directory, 400, sharded=True), expected(0, 400))
    assert not killed.exists()  # the next save removes what the killed one left, and says so
    assert "removing step_0000200.dcp.tmp: left by a checkpoint save that did not finish" in caplog.text
    ckpt.prune(directory, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(directory)] == ["step_0000300.dcp", "step_0000400.dcp"]


def test_convert_checkpoint_round_trips_and_refuses_bad_input(tmp_path, capsys):
    source = ckpt.checkpoint_path(tmp_path / "checkpoints", 100, sharded=True)
    ckpt.save_sharded(source, expected(0, 100))
    single = tmp_path / "checkpoints" / "step_0000100.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPTS / "convert_checkpoint.py"), str(source), str(single)],
                            env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "step 100" in result.stdout and "model: 47 parameters in 6 tensors" in result.stdout
    ckpt.verify(single)  # with its .sha256 marker, as trainer.resume=FILE and generate.py want it
    assert_same(ckpt.load_checkpoint(single), expected(0, 100))

    back = tmp_path / "back.dcp"
    convert_checkpoint.main([str(single), str(back)])
    assert_same(ckpt.load_checkpoint(back), expected(0, 100))

    bad = {
        "missing": ([str(tmp_path / "nowhere.dcp"), str(tmp_path / "x.pt")], "does not exist"),
        "not a checkpoint": ([str(tmp_path), str(tmp_path / "x.pt")], "is not a checkpoint"),
        "same kind": ([str(single), str(tmp_path / "x.pt")], "must end in .dcp"),
        "exists": ([str(single), str(back)], "exists; nothing was written. Pass --force"),
    }
    for case, (argv, message) in bad.items():
        with pytest.raises(SystemExit) as exit_info:
            convert_checkpoint.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error: ") and message in err, case
    other = tmp_path / "other.pt"
    ckpt.save_checkpoint(other, expected(2, 7))
    convert_checkpoint.main([str(other), str(back), "--force"])
    assert_same(ckpt.load_checkpoint(back), expected(2, 7))
    assert f"wrote {back}: step 7, keys step, model, optimizer" in capsys.readouterr().out
