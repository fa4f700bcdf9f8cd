"""The documented code blocks, run as written in one fresh working directory, in the order a
reader meets them: README.md, then the documentation pages in mkdocs.yml's nav order -- two at
a time, a command waiting for the earlier ones that make or read its run folders.

Every `python -m ...`, `torchrun ...` and `python scripts/...` command of their bash blocks
runs with step caps (a command's own value of a capped key is replaced, never duplicated) and
must exit 0; placeholders (`outputs/NAME/RUN`, a dated multirun folder, `step_0002000.pt`) are
the newest runs the earlier commands made. What needs hardware or data this machine lacks (a
GPU cluster, /data/..., SLURM, the network) is composed instead (`--cfg job`): the command's
config must still be valid; `gpu_check.sh` is syntax-checked, `inspect_kernels.py`, whose
compilations test_kernel_cost.py runs and asserts on, prints its help, and `stress_tests.sh`
makes one run of one file. Every Python
block runs as a script. Set-up and the test suite itself (the two commands of the first
block's second line and the Tests section) are skipped; a command shown on several pages (the
quick start) runs once, where it first appears.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
# the Lipschitz estimate runs, with fewer power iterations; the report's figures are drawn by the
# first command (and checked below): the others' would be the same code
CAPS = {"trainer.max_steps": "2", "trainer.eval_every": "0", "trainer.progress": "false",
        "++diagnostics.lipschitz_iters": "2", "trainer.report": "false"}  # fmt: skip
CAPS_BY_FAMILY = {"lm": {"data.eval_max_tokens": "4096", "task.sample_tokens": "8"},
                  "asr": {"data.eval_splits": "[test]", "data.eval_max_utterances": "16"}}  # fmt: skip
COMPOSE_ONLY = {  # what the command needs that this machine lacks
    "torchrun": "several GPUs or machines",
    "/data/": "a dataset at /data",
    "hydra/launcher=slurm": "a SLURM cluster",
}


def nav_pages(nav) -> list[str]:
    """mkdocs.yml's nav flattened in order: `- page.md`, `- Title: page.md`, nested sections."""
    if isinstance(nav, str):
        return [nav] if nav.endswith(".md") else []  # not an external link
    items = nav.values() if isinstance(nav, dict) else nav
    return [page for item in items for page in nav_pages(item)]


def documentation() -> str:
    """README.md, then every page of the documentation site in nav order."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    docs = ROOT / config.get("docs_dir", "docs")
    return "\n".join(path.read_text() for path in [README, *(docs / page for page in nav_pages(config["nav"]))])


def shell_commands() -> list[str]:
    """The bash commands: continuation lines joined, comments dropped, `a && b` split, repeats dropped."""
    text = documentation()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if not line or line.startswith("#"):
                continue
            commands += [part.strip() for part in line.split("&&")]
    return list(dict.fromkeys(c for c in commands if c != "bash setup.bash" and "pytest" not in c))


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", documentation(), re.S)


def newest(pattern: str, cwd: Path) -> str:
    found = sorted(cwd.glob(pattern), key=os.path.getmtime)
    assert found, f"no {pattern} in {cwd}: an earlier documented command should have made it"
    return str(found[-1].relative_to(cwd))


def resolve(command: str, cwd: Path) -> str:
    """Placeholders -> what earlier commands made."""
    for name in set(re.findall(r"outputs/(\w+)/RUN", command)):
        command = command.replace(f"outputs/{name}/RUN", newest(f"outputs/{name}/*", cwd))
    if "step_0002000.pt" in command:
        run = re.search(r"ckpt=(\S+)/checkpoints/", command).group(1)
        command = command.replace("step_0002000.pt", Path(newest(f"{run}/checkpoints/step_*.pt", cwd)).name)
    for name in set(re.findall(r"multirun/(\w+)/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", command)):
        command = re.sub(rf"multirun/{name}/[\d_-]+", newest(f"multirun/{name}/*", cwd), command)
    return command


def capped(args: list[str]) -> list[str]:
    """Training commands with the step caps: replace the command's own value, or append."""
    experiment = next((a.split("=", 1)[1] for a in args if a.startswith("+experiment=")), "")
    caps = CAPS | CAPS_BY_FAMILY.get(experiment.split("_")[0], {})
    if any("run_steps" in a for a in args):
        caps = caps | {"trainer.max_steps": "4", "trainer.run_steps": "2"}
    if "hydra/launcher=submitit_local" in args and "+sweep=layerscale" not in args:
        args = [a for a in args if a != "hydra/launcher=submitit_local" and "max_batch_size" not in a]  # 2-step
        # runs are quicker in one process than each in its own; the layerscale sweep still runs through submitit
    if "hydra/launcher=submitit_local" in args:
        caps = caps | {"hydra.sweeper.max_batch_size": "2"}  # two cores: two runs at a time
    sweep = "-m" in args[args.index("attention_simulator.train") + 1 :] or any(a.startswith("+sweep=") for a in args)
    if sweep:  # every swept value, at one seed (more seeds
        caps = caps | {"trainer.seed": "0"}  # repeat the runs); a study's evaluation splits kept: its table reads them
        caps.pop("data.eval_splits", None)
        caps["hydra.sweep.subdir"] = "${hydra.job.num}"  # the caps' overrides would make too long a folder name
    if "+sweep=stability" in args:  # its softmax and sigmoid runs at one learning rate (not 48 runs), the curves logged
        caps = caps | {"optimizer.learning_rate": "0.3", "attention.qk_norm": "null", "diagnostics.every_n_steps": "1"}
    if args == shlex.split(COMMANDS[0])[1:]:
        caps.pop("trainer.report")
    kept = [a for a in args if a.split("=", 1)[0] not in caps]
    return kept + [f"{k}={v}" for k, v in caps.items()]


def how_to_run(command: str) -> tuple[list[str], str]:
    """(argv, what is done): run with caps, compose only, or --help for the networked script."""
    args = shlex.split(command)
    python = [sys.executable] if args[0] == "python" else []
    reason = next((why for marker, why in COMPOSE_ONLY.items() if marker in command), None)
    if reason:
        module_args = args[args.index("attention_simulator.train") + 1 :]
        return [sys.executable, "-m", "attention_simulator.train", *module_args, "--cfg", "job"], f"composed ({reason})"
    if "wandb_dashboard.py" in command:
        return [*python, str(ROOT / args[1]), "--help"], "--help (it needs the network)"
    if "inspect_kernels.py" in command:  # the same compilations, asserted on
        return [*python, str(ROOT / args[1]), "--help"], "--help (test_kernel_cost.py runs it)"
    if "gpu_check.sh" in command:
        return ["bash", "-n", str(ROOT / args[1])], "syntax (it needs a GPU)"
    if "stress_tests.sh" in command:  # the whole loop is an hour: one run of the quickest such file
        return ["bash", str(ROOT / args[1]), "1", "tests/attention_simulator/test_teardown.py"], "one run of one file"
    if "bench_data.py" in command:  # the whole benchmark on a 2 MB corpus, not 100 MB
        return [*python, str(ROOT / args[1]), *args[2:], "--mb", "2"], "run on a 2 MB corpus"
    if "attention_simulator.train" in args:
        return [*python, *capped(args[1:])], "run, capped"
    if args[1].startswith("scripts/"):  # the documented scripts are the checkout's
        return [*python, str(ROOT / args[1]), *args[2:]], "run"
    return [*python, *args[1:]], "run"


def run_one(command: str, cwd: Path, env: dict, ran: dict[tuple, tuple]) -> tuple:
    """(exit code, stdout, stderr, what was done, seconds). A command the caps made identical to
    one already run (e.g. its only other override was capped) is not run twice: it gets that
    run's result."""
    argv, how = how_to_run(resolve(command, cwd))
    if tuple(argv) in ran:
        returncode, stdout, stderr, earlier_how, _ = ran[tuple(argv)]
        return returncode, stdout, stderr, f"{earlier_how}, as an earlier command", 0.0
    start = time.perf_counter()
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    ran[tuple(argv)] = result.returncode, result.stdout, result.stderr, how, time.perf_counter() - start
    return ran[tuple(argv)]


def touches(command: str) -> set[str]:
    """The run folders a command makes or reads: outputs/NAME, multirun/NAME, runs, ..."""
    made = made_by(command)
    return set(re.findall(r"(?:outputs|multirun)/\w+", command)) | ({made} if made else set())


def run_all(commands: list[str], cwd: Path, env: dict, workers: int = 2) -> dict[str, tuple]:
    """Every command, `workers` at a time, each started once every earlier command that touches one
    of its run folders has finished -- so a placeholder means the run a reader would have made
    before it -- and otherwise in the documentation's order."""
    after = {c: {d for d in commands[:i] if touches(d) & touches(c)} for i, c in enumerate(commands)}
    started, done, results, ran = set(), set(), {}, {}
    changed = threading.Condition()

    def next_command() -> str | None:
        with changed:
            while len(started) < len(commands):
                ready = [c for c in commands if c not in started and after[c] <= done]
                if ready:
                    started.add(ready[0])
                    return ready[0]
                changed.wait()
            return None

    def work():
        while (command := next_command()) is not None:
            results[command] = run_one(command, cwd, env, ran)
            with changed:
                done.add(command)
                changed.notify_all()

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


COMMANDS = shell_commands()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every command, two at a time (one thread each), in one working directory."""
    cwd = tmp_path_factory.mktemp("readme")
    # W&B off (its offline runs are tested elsewhere): it costs seconds per run and changes nothing here
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    done = run_all(COMMANDS, cwd, env)
    for command, (_, _, _, how, seconds) in done.items():
        print(f"{seconds:6.1f} s  {how:34s} {command}")  # shown with -s: where the time goes
    return done, cwd


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command(results, command):
    returncode, stdout, stderr, how, seconds = results[0][command]
    assert returncode == 0, f"{how} ({seconds:.0f} s): {command}\n{stdout[-2000:]}\n{stderr[-3000:]}"


def test_readme_covers_the_documented_workflows():
    """The parser sees the commands a reader sees, README's and the pages' (a guard against an edit
    or a nav change that hides them)."""
    joined = "\n".join(COMMANDS)
    for expected in ("+experiment=vit_sigmoid", "attention_simulator.generate", "scripts/eval_lengths.py",
                     "+sweep=softmax_vs_sigmoid", "hydra/launcher=submitit_local", "scripts/collect_sweep.py",
                     "scripts/compare_runs.py", "torchrun"):  # fmt: skip
        assert expected in joined
    assert len(python_blocks()) == 2  # flash_sigmoid's and optorch's


def made_by(command: str) -> str | None:
    """Where a training command that really runs puts its run: outputs/NAME, multirun/NAME, ..."""
    args = shlex.split(command)
    if "attention_simulator.train" not in args or any(marker in command for marker in COMPOSE_ONLY):
        return None
    overrides = dict(a.split("=", 1) for a in args if "=" in a)
    if "-m" in args[args.index("attention_simulator.train") + 1 :] or "+sweep" in overrides:
        return f"multirun/{overrides.get('name', overrides['+experiment'])}"
    run_dir = overrides.get("hydra.run.dir")
    return str(Path(run_dir).parent) if run_dir else f"outputs/{overrides['+experiment']}"


def test_placeholders_refer_to_runs_made_earlier():
    """Pages are read in nav order, so moving a section can reorder commands: every run a command
    refers to (`outputs/NAME/RUN`, `multirun/NAME/<date>`) must be made by a command before it."""
    for i, command in enumerate(COMMANDS):
        for folder in re.findall(r"((?:outputs|multirun)/\w+)/(?:RUN|\d{4}-)", command):
            assert folder in {made_by(c) for c in COMMANDS[:i]}, f"nothing before it makes {folder}: {command}"


@pytest.mark.slow
def test_the_first_command_writes_a_complete_run_directory(results):
    _, cwd = results
    run = min(cwd.glob("outputs/vit_sigmoid/*"), key=os.path.getmtime)  # the first command's: the oldest
    assert {p.name for p in run.iterdir()} >= {".hydra", "checkpoints", "metrics.parquet", "report", "train.log",
                                               "wandb"}  # fmt: skip
    assert {p.name for p in (run / ".hydra").iterdir()} == {"config.yaml", "config_resolved.yaml", "overrides.yaml",
                                                            "hydra.yaml"}  # fmt: skip
    metrics = pd.read_parquet(run / "metrics.parquet")
    assert metrics["step"].max() == 2 and metrics["eval/accuracy"].notna().any()
    assert "run dir:" in (run / "train.log").read_text()  # the console, time-stamped
    assert (run / "report" / "curves.png").stat().st_size > 10_000


@pytest.mark.slow
def test_a_split_run_says_how_to_continue(results):
    command = next(c for c in COMMANDS if "run_steps" in c)
    stdout = results[0][command][1]
    assert "stopped at step 2 of 4" in stdout and "trainer.resume=auto" in stdout


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block(results, index):
    _, cwd = results
    script = cwd / f"readme_block_{index}.py"
    script.write_text(python_blocks()[index])
    result = subprocess.run([sys.executable, str(script)], cwd=cwd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_the_sweep_table_is_the_runs_metrics(results):
    """collect_sweep on README's submitit_local sweep: one row per run, values from each run."""
    _, cwd = results
    sweep = next(p for p in sorted((cwd / "multirun" / "vit_sigmoid").iterdir())
                 if "model.layer_scale" in (p / "0" / ".hydra" / "overrides.yaml").read_text())  # fmt: skip
    table = pd.read_csv(sweep / "sweep.csv")
    runs = sorted(p.parent for p in sweep.glob("*/metrics.parquet"))
    assert len(table) == len(runs) == 4  # 4 LayerScale values (at one seed: the cap)
    for run in runs:
        final = pd.read_parquet(run / "metrics.parquet")["eval/accuracy"].dropna().iloc[-1]
        assert final in set(table["eval/accuracy"])
        assert (run / "train.log").stat().st_size > 0  # each run's output, in its own directory


@pytest.mark.slow
def test_eval_lengths_lists_lengths_in_order(results):
    command = next(c for c in COMMANDS if "eval_lengths.py" in c)
    keys = [line.split()[0] for line in results[0][command][1].splitlines() if line.startswith("eval/loss")]
    assert keys == ["eval/loss", "eval/loss@256", "eval/loss@512", "eval/loss@1024"]  # 128 is the training length
