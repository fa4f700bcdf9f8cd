"""Bad input on the command line, as a user types it: each case must exit with code 2, print one
paragraph (`error: ...`, no traceback) that names the culprit and the fix, and write nothing -- no
run directory in a fresh working directory, not a byte changed in an existing run directory.

The table runs in this process through the commands' real entry points (`python -m MODULE` and
`python SCRIPT` as runpy runs them, with their own sys.argv, working directory and environment);
a few cases also run as real subprocesses, so the two ways cannot drift apart."""

import contextlib
import io
import logging
import os
import runpy
import shutil
import subprocess
import sys
import traceback
from pathlib import Path
from unittest import mock

import datasets
import huggingface_hub
import pytest
from hydra.core.global_hydra import GlobalHydra

from attention_simulator.rundir import RunLock

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
TRAIN = [sys.executable, "-m", "attention_simulator.train"]
GENERATE = [sys.executable, "-m", "attention_simulator.generate"]
VIT = [*TRAIN, "+experiment=vit_sigmoid"]
LM = [*TRAIN, "+experiment=lm_sigmoid"]
ENV = {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}

# id: (command, fragments the message must contain); {run}, {corrupt}, {locked}, {ckpt} are filled in
CASES = {
    "misspelt key": ([*VIT, "model.dpeth=3"], ["model.dpeth", "Did you mean model.depth"]),
    "misspelt group option": ([*VIT, "attention=sigmod"], ["attention=sigmod", "Did you mean sigmoid"]),
    "misspelt experiment": ([*TRAIN, "+experiment=vit_sigmod"], ["experiment=vit_sigmod", "vit_sigmoid"]),
    "unknown section": ([*VIT, "+trainr.max_steps=3"], ["'trainr'", "Did you mean 'trainer'"]),
    "unparsable override": ([*VIT, "trainer.max_steps=[1"], ["could not be parsed", "'[1'"]),
    "wrong type": ([*VIT, "trainer.max_steps=abc"], ["'abc'", "trainer.max_steps", "an integer"]),
    "adam beta 1.0": ([*VIT, "optimizer.b2=1.0"], ["b2: 1.0", "[0, 1)", "optimizer."]),
    "warmup longer than the run": ([*VIT, "schedule.warmup_steps=5000"], ["warmup_steps=5000", "schedule"]),
    "language model on images": ([*VIT, "model=lm_tiny"], ["DecoderLM", "vocab_size", "model=vit_tiny"]),
    "task on other data": ([*TRAIN, "+experiment=lm_sigmoid", "task=classification"], ["images", "text", "data"]),
    "negative kv heads": ([*VIT, "attention.num_kv_heads=-2"], ["attention.num_kv_heads=-2", ">= 1"]),
    "backend cannot honour": (
        [*TRAIN, "+experiment=vit_softmax", "attention.sigmoid_bias=-2"],
        ["sigmoid_bias", "backends that can"],
    ),  # fmt: skip
    "position table shorter than evaluation": (
        [*LM, "attention.position=none", "model.pos_embed=learned", "model.max_seq_len=128"],
        ["model.max_seq_len=128", "512 tokens", "data.eval_seq_lens", "model.pos_embed=none"],
    ),
    "zero batch": ([*VIT, "data.batch_size=0"], ["data.batch_size=0", ">= 1"]),
    "negative clipping": ([*VIT, "trainer.grad_clip=-1"], ["trainer.grad_clip=-1", "null"]),
    "unknown precision": ([*VIT, "trainer.precision=fp8"], ["trainer.precision='fp8'", "fp32"]),
    "cuda without a GPU": ([*VIT, "trainer.device=cuda"], ["trainer.device=cuda", "cpu"]),
    "unknown parallelism": ([*VIT, "trainer.parallel=zero3"], ["trainer.parallel='zero3'", "ddp or fsdp"]),
    "fsdp without torchrun": ([*VIT, "trainer.parallel=fsdp"], ["trainer.parallel=fsdp", "torchrun", "ddp"]),
    "context parallel on images": ([*VIT, "trainer.context_parallel=2"], ["trainer.context_parallel=2", "lm_"]),
    "context parallel uneven length": ([*LM, "trainer.context_parallel=3"], ["context_parallel=3", "multiples of 6"]),
    "context parallel with a window": (
        [*LM, "trainer.context_parallel=2", "attention.window=16"],
        ["trainer.context_parallel", "attention.window"],
    ),  # fmt: skip
    "context parallel over one process": (
        [*LM, "trainer.context_parallel=2"],
        ["trainer.context_parallel=2", "divide the number of processes (1)"],
    ),  # fmt: skip
    "dataset offline": ([*VIT, "data=cifar10"], ["cifar10", "data.path"]),
    "missing data path": ([*TRAIN, "+experiment=lm_sigmoid", "data.path=/no/such/dir"], ["/no/such/dir", "exist"]),
    "missing checkpoint": ([*VIT, "trainer.resume=/no/such/step_0000001.pt"], ["/no/such/step_0000001.pt", "exist"]),
    "corrupt checkpoint": ([*VIT, "trainer.resume={corrupt}"], ["corrupt", "earlier checkpoint"]),
    "another optimizer's checkpoint": (
        [*VIT, "optimizer=sgd", "trainer.resume=auto", "hydra.run.dir={run}"],
        ["optimizer state does not fit", "the optimizer"],
    ),  # fmt: skip
    "fresh start over a run": ([*VIT, "hydra.run.dir={run}"], ["already holds checkpoints", "trainer.resume=auto"]),
    "run in use": (
        [*VIT, "trainer.resume=auto", "hydra.run.dir={locked}"],
        ["in use by another training process", f"PID {os.getpid()}", "another hydra.run.dir"],
    ),  # fmt: skip
    "generate without a checkpoint": ([*GENERATE], ["ckpt", "ckpt=..."]),
    "generate from a vision checkpoint": ([*GENERATE, "ckpt={ckpt}"], ["not a language-model checkpoint"]),
    "collect an empty sweep": ([sys.executable, str(SCRIPTS / "collect_sweep.py"), "."], ["no run directories"]),
    "evaluate a run without checkpoints": (
        [sys.executable, str(SCRIPTS / "eval_lengths.py"), "{empty}"],
        ["no complete checkpoint"],
    ),  # fmt: skip
    "sink metric of a run without checkpoints": (
        [sys.executable, str(SCRIPTS / "sink_metric.py"), "{empty}"],
        ["no complete checkpoint", ".hydra/config.yaml"],
    ),  # fmt: skip
    "sink metric of a vision run": (
        [sys.executable, str(SCRIPTS / "sink_metric.py"), "{run}"],
        ["is not a language model run", "task=language_modeling"],
    ),  # fmt: skip
}


def contents(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def as_a_new_process(cwd: Path, argv: list[str]):
    """What a command may change in its process, put back afterwards: working directory, argv,
    environment, logging (Hydra configures it for a job), Hydra's global state; the Hub offline."""
    root, saved_argv, saved_cwd = logging.getLogger(), sys.argv[:], os.getcwd()
    saved = {name: (lg.level, lg.handlers[:]) for name, lg in [("", root), *logging.Logger.manager.loggerDict.items()]
             if isinstance(lg, logging.Logger) or name == ""}  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | ENV
    with (
        mock.patch.dict(os.environ, env, clear=True),
        mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True),
        mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True),
    ):
        os.chdir(cwd)
        sys.argv = argv
        try:
            yield
        finally:
            os.chdir(saved_cwd)
            sys.argv = saved_argv
            logging.captureWarnings(False)
            GlobalHydra.instance().clear()
            for name, (level, handlers) in saved.items():
                logger = logging.getLogger(name or None)
                for handler in set(logger.handlers) - set(handlers):
                    handler.close()
                logger.handlers[:] = handlers
                logger.setLevel(level)


def in_process(command: list[str], cwd: Path) -> tuple[int, str]:
    """`python -m MODULE ARGS` or `python SCRIPT ARGS`, run by runpy in this process: (exit code, stderr)."""
    module = command[2] if command[1] == "-m" else None
    argv = [module or command[1], *command[3 if module else 2 :]]
    err = io.StringIO()
    with as_a_new_process(cwd, argv), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            if module:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(command[1], run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except Exception:
            traceback.print_exc(file=err)
            code = 1
    return code, err.getvalue()


def as_subprocess(command: list[str], cwd: Path) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | ENV
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return result.returncode, result.stderr


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, trained):
    """The directories the cases point at: a finished 2-step run, a copy of it locked by this
    process, an empty run directory, a corrupt checkpoint."""
    base = tmp_path_factory.mktemp("bad_input")
    run, locked, empty = base / "run", base / "locked", base / "empty"
    shutil.copytree(trained("+experiment=vit_sigmoid", "trainer.max_steps=2", "data.batch_size=32").dir, run)
    for d in (run, locked, empty):
        d.mkdir(exist_ok=True)
        (d / "train.log").touch()  # as a command-line run has
    shutil.copytree(run / "checkpoints", locked / "checkpoints")
    ckpt = run / "checkpoints" / "step_0000002.pt"
    corrupt = base / "corrupt" / "step_0000002.pt"
    corrupt.parent.mkdir()
    for src in (ckpt, ckpt.with_name(ckpt.name + ".sha256")):
        shutil.copy(src, corrupt.parent / src.name)
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(data)
    lock = RunLock(locked)
    lock.acquire()  # this process is "the first run"
    yield {"base": base, "run": run, "locked": locked, "empty": empty, "ckpt": ckpt, "corrupt": corrupt}
    lock.release()


def attempt(case: str, prepared: dict, runner) -> tuple[int, str, list[str]]:
    """Run one case in a fresh working directory against its own copy of the run: (exit code,
    stderr, what it wrote or changed)."""
    name = case.replace(" ", "_").replace("'", "")
    cwd = prepared["base"] / runner.__name__ / name
    cwd.mkdir(parents=True)
    own_run = prepared["base"] / f"run_{runner.__name__}_{name}"
    shutil.copytree(prepared["run"], own_run)
    command = [arg.format(**(prepared | {"run": own_run})) for arg in CASES[case][0]]
    watched = [prepared[k] for k in ("run", "locked", "empty")] + [prepared["corrupt"].parent, own_run]
    before = {d: contents(d) for d in watched}
    returncode, stderr = runner(command, cwd)
    changed = [str(d) for d in watched if contents(d) != before[d]] + [p.name for p in cwd.iterdir()]
    return returncode, stderr, changed


def assert_one_paragraph_exit_2_nothing_written(case: str, returncode: int, stderr: str, changed: list[str]):
    assert "Traceback" not in stderr, stderr[-3000:]
    assert returncode == 2, stderr[-3000:]
    paragraphs = [p for p in stderr.strip().split("\n\n") if p.strip()]
    message = paragraphs[-1]
    assert message.startswith("error: ") and "\n" not in message.strip(), stderr
    for fragment in CASES[case][1]:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert not changed, f"written or changed: {changed}"


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_paragraph_exit_2_and_writes_nothing(prepared, case):
    assert_one_paragraph_exit_2_nothing_written(case, *attempt(case, prepared, in_process))


@pytest.mark.parametrize("case", ["misspelt key", "corrupt checkpoint", "collect an empty sweep"])
def test_as_a_real_process_too(prepared, case):
    """A Hydra composition error, an error inside the job and a script's, through a real process."""
    assert_one_paragraph_exit_2_nothing_written(case, *attempt(case, prepared, as_subprocess))
