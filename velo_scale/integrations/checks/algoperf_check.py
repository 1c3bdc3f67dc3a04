"""Repeatable check of the AlgoPerf submission with AlgoPerf's own runner:
self-tuning, external-tuning and resumed runs of MNIST and OGBG on the
offline data.

Usage (Python >= 3.11, AlgoPerf's minimum; nothing of AlgoPerf is committed):

  python velo_scale/integrations/checks/algoperf_check.py /path/to/algorithmic-efficiency \
      [--workdir /tmp/velo_algoperf_check] [--venv DIR] [--rebuild]

Needs a checkout of github.com/mlcommons/algorithmic-efficiency (not on
PyPI), Debian's dataset-fashion-mnist, and PyPI's qc-B3DB + rdkit (installed
into the venv by the `molecules` extra).

What it does:

1. Environment: a venv (`--venv`, default <workdir>/venv; an existing one
   is reused if it imports algoperf and velo_scale, else the check stops and
   `--rebuild` makes a new one) with AlgoPerf's JAX CPU, PyTorch
   CPU (the runner imports torch) and OGBG extras
   (`-e CHECKOUT[jax_cpu,pytorch_cpu,ogbg]`: jax 0.7.0), velo_scale from this
   checkout (`-e .[molecules]`), `orbax-checkpoint==0.11.28` (newer ones
   break flax's save on jax 0.7.0; see the submission README) and
   `tensorflow-metadata==1.16.1` (newer ones need protobuf >= 5; AlgoPerf
   pins 4.25.5).
2. Data, built once under <workdir>/data with
   `velo_scale.integrations.algoperf.offline_data`: TFDS `mnist` from
   Fashion-MNIST's IDX files, TFDS `ogbg_molpcba` from B3DB molecules in OGB's
   raw layout (real molecules; their blood-brain-barrier label as task 0).
3. Runs `submission_runner.py --framework=jax` with
   `--submission_path=velo_scale/integrations/algoperf/submission.py`, 8 fake
   CPU devices, `FLAX_USE_ORBAX_CHECKPOINTING=false` (see the README), VeLO
   weights from $VELO_SCALE_WEIGHTS or else the project weights, seed 0:
   for each of mnist and ogbg a self-tuning run, an external-tuning run
   (tuning_search_space.json, 1 trial) and a run killed (SIGKILL) after its
   first checkpoint past step 1 and restarted with `--resume_last_run`.
   Runs go through a launcher that can change workload properties in memory
   (the checkout is not modified): MNIST's resumed run evaluates (and so
   checkpoints) every 4 s instead of 10, so that it is killed early in its
   450 steps (with the project weights MNIST's loss rises again after ~600
   steps), and OGBG's every 20 s; OGBG's runs use eval batch 256 instead of 32,768
   (which needs more than 24 GB), 1,024 graphs per evaluated split, an eval
   every 60 s, and unreachable mAP
   targets (the stand-in labels beat molpcba's 0.28098 at once, which would
   end the run at its first eval).
4. Asserts: every run exits 0 and reaches its step budget; the training loss
   (the runner's `train/loss` at its evals) decreased from the first eval to
   the last; the restarted run restored ("Restoring ... Flax checkpoint") the
   checkpoint the killed run left, and its evals continue past that step.
5. Prints a summary table (also written to <workdir>/summary.md).

Exit status: 0 when every assertion holds, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import re
import shutil
import sys
from collections.abc import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import _common as common
else:  # pragma: no cover - imported as velo_scale.integrations.checks
    from velo_scale.integrations.checks import _common as common

FASHION_MNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")
SUBMISSION = "velo_scale/integrations/algoperf/submission.py"
SEARCH_SPACE = (
    common.REPO
    / "velo_scale"
    / "integrations"
    / "algoperf"
    / "tuning_search_space.json"
)
NUM_DEVICES = 8
# Steps of each run: (self-tuning, external-tuning, resumed run's budget).
# With the project weights MNIST's training loss rises again after ~600 steps,
# so the runs stay short.
# An OGBG step (batch 512 graphs on 8 fake devices) takes ~20 s on this
# 2-core machine, and each eval ~1 min.
STEPS = {"mnist": (400, 200, 450), "ogbg": (8, 4, 8)}
OGBG_PATCH = {
    "algoperf.workloads.ogbg.workload.BaseOgbgWorkload": {
        "eval_batch_size": 256,
        "eval_period_time_sec": 60,
        "validation_target_value": 2.0,
        "test_target_value": 2.0,
        # Evaluate 1,024 graphs per split, not the whole split (minutes on CPU).
        "num_eval_train_examples": 1024,
        "num_validation_examples": 1024,
        "num_test_examples": 1024,
    }
}

# MNIST's resumed run: an eval (and so a checkpoint) every 4 s instead of 10,
# so that the run is killed early, well inside its step budget.
MNIST_RESUME_PATCH = {
    "algoperf.workloads.mnist.workload.BaseMnistWorkload": {"eval_period_time_sec": 4}
}

LAUNCHER = r"""
import importlib, json, runpy, sys
patches = json.loads(sys.argv[1])
for path, attrs in patches.items():
    module, name = path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    for attr, value in attrs.items():
        setattr(cls, attr, property(lambda self, value=value: value))
        print(f"check launcher: {name}.{attr} = {value!r}", flush=True)
sys.argv = ["submission_runner.py"] + sys.argv[2:]
runpy.run_path("submission_runner.py", run_name="__main__")
"""


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("algoperf", type=pathlib.Path, help="an AlgoPerf checkout")
    parser.add_argument(
        "--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/velo_algoperf_check")
    )
    parser.add_argument(
        "--venv", type=pathlib.Path, default=None, help="default: <workdir>/venv"
    )
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter for the venv"
    )
    parser.add_argument("--rebuild", action="store_true", help="make a new venv")
    parser.add_argument("--workloads", default="mnist,ogbg")
    args = parser.parse_args(argv)
    args.algoperf = args.algoperf.expanduser().resolve()
    if (
        not (args.algoperf / "submission_runner.py").is_file()
        or not (args.algoperf / "algoperf").is_dir()
    ):
        parser.error(
            f"{args.algoperf} is not an AlgoPerf checkout (no submission_runner.py "
            "and algoperf/); get one with "
            "`git clone https://github.com/mlcommons/algorithmic-efficiency`."
        )
    args.workloads = [w for w in args.workloads.split(",") if w]
    unknown = set(args.workloads) - set(STEPS)
    if unknown:
        parser.error(f"--workloads: unknown {sorted(unknown)}; known: {sorted(STEPS)}")
    if not common.python_version_ok(args.python, (3, 11)):
        parser.error(
            f"--python {args.python} must be Python >= 3.11 (AlgoPerf's minimum)"
        )
    return args


def build_env(args: argparse.Namespace) -> pathlib.Path:
    venv = (args.venv or args.workdir / "venv").expanduser().absolute()
    python = venv / "bin" / "python"
    logs = args.workdir / "logs"
    modules = [
        "algoperf.spec",
        "velo_scale.integrations.algoperf.submission",
        "rdkit",
        "B3DB",
        "tensorflow_datasets.core.download",  # fails with a mismatched protobuf
    ]
    python, fresh = common.reuse_or_make_venv(
        venv, args.python, modules, logs, rebuild=args.rebuild
    )
    if not fresh:
        return python
    # The runner imports torch whatever the framework (pytorch_cpu: torch 2.5.1).
    common.pip_install(
        python,
        ["-e", f"{args.algoperf}[jax_cpu,pytorch_cpu,ogbg]"],
        logs / "pip-algoperf.log",
    )
    # After AlgoPerf's pins (optax 0.2.2 < velo_scale's minimum: pip moves
    # optax up and reports the conflict; the runner works with it). The
    # newest tensorflow-metadata needs protobuf >= 5, AlgoPerf pins 4.25.5.
    common.pip_install(
        python,
        [
            "-e",
            f"{common.REPO}[molecules]",
            "orbax-checkpoint==0.11.28",
            "tensorflow-metadata==1.16.1",
            "importlib_resources",  # TFDS 4.9.9's builders need it
        ],
        logs / "pip-velo.log",
    )
    error = common.import_error(python, modules)
    common.ensure(
        error is None, f"the new venv cannot import {modules}; see {logs}:\n{error}"
    )
    return python


def build_data(
    args: argparse.Namespace, python: pathlib.Path
) -> dict[str, pathlib.Path]:
    data = args.workdir / "data"
    logs = args.workdir / "logs"
    module = [str(python), "-m", "velo_scale.integrations.algoperf.offline_data"]
    dirs = {"mnist": data / "mnist", "ogbg": data / "ogbg"}
    done = {"mnist": dirs["mnist"] / "mnist", "ogbg": dirs["ogbg"] / "ogbg_molpcba"}
    steps = {
        "mnist": [module + ["tfds", "mnist", str(FASHION_MNIST), str(dirs["mnist"])]],
        "ogbg": [
            module + ["ogbg-raw", str(data / "ogbg_raw")],
            module
            + ["tfds", "ogbg_molpcba", str(data / "ogbg_raw"), str(dirs["ogbg"])],
        ],
    }
    for name in args.workloads:
        if done[name].is_dir():
            common.log(f"data {name}: reusing {dirs[name]}")
            continue
        common.log(f"data {name}: building {dirs[name]}")
        for i, cmd in enumerate(steps[name]):
            log_path = logs / f"data-{name}-{i}.log"
            code, seconds, _ = common.run_logged(
                cmd, log_path, env=_env(args.workdir), cwd=args.workdir
            )
            common.ensure(
                code == 0,
                f"building {name} data failed; see {log_path}:\n{common.tail(log_path)}",
            )
            common.log(f"  {' '.join(cmd[3:5])}: {seconds:.0f} s")
    return dirs


def _env(workdir: pathlib.Path) -> dict[str, str]:
    env = dict(os.environ)
    # The runs of a workload compile the same programs: compile them once.
    env["JAX_COMPILATION_CACHE_DIR"] = str(workdir / "jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={NUM_DEVICES}"
    env["FLAX_USE_ORBAX_CHECKPOINTING"] = "false"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def eval_rows(trial_dir: pathlib.Path) -> list[dict[str, str]]:
    path = trial_dir / "eval_measurements.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def checkpoint_steps(trial_dir: pathlib.Path) -> list[int]:
    steps = []
    for path in trial_dir.glob("checkpoint_*"):
        match = re.fullmatch(r"checkpoint_(\d+)", path.name)
        if match:
            steps.append(int(match.group(1)))
    return sorted(steps)


def main(argv: Sequence[str] | None) -> int:
    args = _parse(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    python = build_env(args)
    data_dirs = build_data(args, python)
    env = _env(args.workdir)
    weights = common.weights_env(env)
    experiments = args.workdir / "experiments"
    logs = args.workdir / "logs"
    rows, failures = [], []

    def runner_cmd(workload, ruleset, name, steps, extra=(), resume=False):
        patch = OGBG_PATCH if workload == "ogbg" else {}
        if resume and workload == "mnist":
            patch = MNIST_RESUME_PATCH
        if resume and workload == "ogbg":  # an eval (checkpoint) every 20 s
            patch = {
                k: {**v, "eval_period_time_sec": 20} for k, v in OGBG_PATCH.items()
            }
        cmd = [str(python), "-c", LAUNCHER, json.dumps(patch)]
        cmd += [
            "--framework=jax",
            f"--workload={workload}",
            f"--data_dir={data_dirs[workload]}",
            f"--submission_path={SUBMISSION}",
            f"--tuning_ruleset={ruleset}",
            f"--experiment_dir={experiments}",
            f"--experiment_name={name}",
            f"--max_global_steps={steps}",
            "--rng_seed=0",
        ]
        if ruleset == "external":
            cmd += [f"--tuning_search_space={SEARCH_SPACE}", "--num_tuning_trials=1"]
        return cmd + list(extra)

    def run(label, cmd, kill_when=None):
        log_path = logs / f"{label}.log"
        common.log(f"run {label}")
        code, seconds, killed = common.run_logged(
            cmd, log_path, env=env, cwd=args.algoperf, timeout=3600, kill_when=kill_when
        )
        common.log(f"  {'killed' if killed else f'exit {code}'} after {seconds:.0f} s")
        return code, seconds, killed, log_path

    def loss_checks(evals, steps):
        losses = [
            (int(r["global_step"]), float(r["train/loss"]))
            for r in evals
            if r.get("train/loss")
        ]
        last_step = max((s for s, _ in losses), default=0)
        decreased = len(losses) >= 2 and losses[-1][1] < losses[0][1]
        text = (
            " -> ".join(f"{v:.4f}@{s}" for s, v in (losses[:1] + losses[-1:]))
            if losses
            else "-"
        )
        return losses, last_step, decreased, text

    for workload in args.workloads:
        self_steps, external_steps, resume_steps = STEPS[workload]
        for ruleset, steps in (("self", self_steps), ("external", external_steps)):
            name = f"{workload}_{ruleset}"
            shutil.rmtree(experiments / name, ignore_errors=True)
            code, seconds, _, log_path = run(
                name, runner_cmd(workload, ruleset, name, steps)
            )
            trial = experiments / name / f"{workload}_jax" / "trial_1"
            losses, last_step, decreased, text = loss_checks(eval_rows(trial), steps)
            checks = [
                ("exit 0", code == 0),
                (f"reached step {steps}", last_step == steps),
                ("loss decreased", decreased),
            ]
            if ruleset == "external":
                checks.append(
                    (
                        "trial 1/1 ran",
                        "Tuning trial 1/1" in log_path.read_text(errors="replace"),
                    )
                )
            rows.append([name, ruleset, last_step, text, checks, f"{seconds:.0f} s"])

        # Resume: kill after the first checkpoint past step 1, then restart.
        name = f"{workload}_resume"
        shutil.rmtree(experiments / name, ignore_errors=True)
        trial = experiments / name / f"{workload}_jax" / "trial_1"
        cmd = runner_cmd(workload, "self", name, resume_steps, resume=True)
        code1, seconds1, killed, _ = run(
            f"{name}-killed",
            cmd,
            kill_when=lambda: any(s > 1 for s in checkpoint_steps(trial)),
        )
        saved = checkpoint_steps(trial)
        killed_at = max(saved) if saved else 0
        code, seconds, _, log_path = run(
            f"{name}-restarted", cmd + ["--resume_last_run"]
        )
        text_log = log_path.read_text(errors="replace")
        loaded = re.search(
            r"Restoring \w* ?Flax checkpoint from \S*checkpoint_(\d+)", text_log
        )
        evals = eval_rows(trial)
        after = [
            int(r["global_step"])
            for r in evals
            if int(r.get("preemption_count") or 0) >= 1
        ]
        losses, last_step, decreased, text = loss_checks(evals, resume_steps)
        rows.append(
            [
                name,
                "self, resumed",
                last_step,
                text,
                [
                    (f"killed after checkpoint_{killed_at}", killed and killed_at > 1),
                    (
                        "restart loaded it",
                        bool(loaded) and int(loaded.group(1)) == killed_at,
                    ),
                    (
                        f"evals continue past {killed_at}",
                        bool(after) and min(after) > killed_at,
                    ),
                    ("exit 0", code == 0),
                    (f"reached step {resume_steps}", last_step == resume_steps),
                    ("loss decreased", decreased),
                ],
                f"{seconds1 + seconds:.0f} s",
            ]
        )

    table_rows = []
    for name, ruleset, last_step, text, checks, seconds in rows:
        ok = all(passed for _, passed in checks)
        failures += [f"{name}: {what}" for what, passed in checks if not passed]
        table_rows.append(
            [
                name,
                ruleset,
                last_step,
                text,
                "; ".join(
                    f"{what}: {'ok' if passed else 'FAILED'}" for what, passed in checks
                ),
                seconds,
                "PASS" if ok else "FAIL",
            ]
        )
    header = [
        "run",
        "ruleset",
        "last step",
        "train/loss first -> last eval",
        "checks",
        "time",
        "result",
    ]
    summary = "\n".join(
        [
            "AlgoPerf check: "
            + common.git_head(args.algoperf)
            + f" ({args.algoperf}); velo_scale "
            + common.git_head(common.REPO),
            f"weights: {weights}; {NUM_DEVICES} CPU devices; data: Fashion-MNIST as mnist, B3DB as ogbg_molpcba"
            " (ogbg: eval batch 256, 1,024 graphs per split, eval every 60 s, unreachable targets; mnist resume: eval"
            " every 4 s; set by the check's launcher)",
            "",
            common.table(table_rows, header),
        ]
    )
    (args.workdir / "summary.md").write_text(summary + "\n")
    print("\n" + summary, flush=True)
    if failures:
        raise common.CheckFailed("; ".join(failures))
    print("\nALL ALGOPERF CHECKS PASSED")
    return 0


if __name__ == "__main__":
    common.main_guard(main)
