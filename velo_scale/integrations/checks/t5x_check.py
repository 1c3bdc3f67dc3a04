"""Repeatable check of VeLO in real T5X: the Bible recipes trained, resumed,
microbatched and fine-tuned through `python -m t5x.train`.

Usage (any Python >= 3.10; nothing of T5X is committed here):

  python velo_scale/integrations/checks/t5x_check.py /path/to/t5x \
      [--airio /path/to/airio] [--jestimator /path/to/jestimator] \
      [--workdir /tmp/velo_t5x_check] [--venv DIR] [--rebuild]

Needs checkouts of github.com/google-research/t5x, github.com/google/airio
and github.com/google-research/jestimator (T5X imports both; neither is on
PyPI in a version that works with current JAX). By default airio and
jestimator are looked up next to the T5X checkout. The Debian Bible packages
(sword-text-kjv, sword-text-sparv) must be installed.

What it does:

1. Environment: a venv (`--venv`, default <workdir>/venv; an existing one
   is reused if it imports t5x, seqio and velo_scale, else the check stops
   and `--rebuild` makes a new one) with velo_scale
   from this checkout (`-e .[seqio,recipes]`), T5X's other PyPI dependencies,
   and airio, jestimator and T5X from the checkouts (`--no-deps`).
2. Runs the tiny CPU variant of the recipes (gin_configs/t5x/*.gin +
   tiny.gin) on 4 fake CPU devices, mesh data 2 x model 2, VeLO weights from
   $VELO_SCALE_WEIGHTS or else the project weights, fixed seeds:
   * `adafactor`: span-corruption pre-training, T5X's default Adafactor;
   * `velo`: the same with `gin_configs/t5x/velo.gin` added (the switch);
   * `velo_resume`: the `velo` run killed (SIGKILL) once its step-20
     checkpoint is written, then started again with the same command;
   * `velo_microbatch`: the `velo` run with
     `VeLOTrainer.num_microbatches = 2`, 10 steps;
   * `finetune_velo` / `finetune_adafactor`: translation fine-tuning from the
     `velo` run's last checkpoint (bible_finetune.gin, VeLO through
     `velo_finetune.gin`), with BLEU from seqio's evaluator at the end.
3. Asserts: every run exits 0; the training loss decreased (mean of the last
   3 logged steps below the mean of the first 3); the resumed run restored
   the checkpoint it was killed after, logged only later steps, and its
   losses equal the uninterrupted run's at the same steps (T5X checkpoints
   the dataset iterator here, so the batches match); the microbatched
   losses equal the unmicrobatched ones (VeLO gets the sum of the
   microbatch losses, like T5X's gradients); fine-tuning started at the
   pre-training step and reported a BLEU.
4. Prints a summary table (also written to <workdir>/summary.md).

Exit status: 0 when every assertion holds, 1 otherwise (the failing check
and its log are named), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
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

STEPS = 40
KILL_AFTER = 20
MICRO_STEPS = 10
FINETUNE_STEPS = 20
EXTEND_STEPS = 10
CHECKPOINT_PERIOD = 10
NUM_DEVICES = 4
NUM_PARTITIONS = 2
# The microbatched and resumed runs must match the reference run's losses
# to this relative tolerance.
MATCH_RTOL = 2e-3
# The loss the table shows and the checks compare: T5X's loss (which VeLO
# gets: summed over tokens, and over microbatches) per non-padding target
# token, comparable across batches whatever their packing.
LOSS = "loss_per_nonpadding_target_token"

T5X_DEPS = [
    "clu",
    "fiddle",
    "jaxtyping",
    "tensorstore",
    "cached_property",
    "grain",
    "tensorboard",
]

READ_EVENTS = r"""
import glob, json, sys
import tensorflow as tf
out = {}
skip = set(sys.argv[3:])
for path in sorted(glob.glob(sys.argv[1] + "/events.out.tfevents.*")):
    if path in skip:
        continue
    for event in tf.compat.v1.train.summary_iterator(path):
        for v in event.summary.value:
            if v.tag == sys.argv[2]:
                x = float(tf.make_ndarray(v.tensor)) if v.HasField("tensor") else v.simple_value
                out[str(event.step)] = x
print(json.dumps(out))
"""


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("t5x", type=pathlib.Path, help="a T5X checkout")
    parser.add_argument("--airio", type=pathlib.Path, default=None)
    parser.add_argument("--jestimator", type=pathlib.Path, default=None)
    parser.add_argument(
        "--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/velo_t5x_check")
    )
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter for the venv"
    )
    parser.add_argument(
        "--venv", type=pathlib.Path, default=None, help="default: <workdir>/venv"
    )
    parser.add_argument("--rebuild", action="store_true", help="make a new venv")
    args = parser.parse_args(argv)
    args.t5x = args.t5x.expanduser().resolve()
    if not (args.t5x / "t5x" / "train.py").is_file():
        parser.error(
            f"{args.t5x} is not a T5X checkout (no t5x/train.py); get one with "
            "`git clone https://github.com/google-research/t5x`."
        )
    for name, url in (
        ("airio", "https://github.com/google/airio"),
        ("jestimator", "https://github.com/google-research/jestimator"),
    ):
        path = getattr(args, name) or args.t5x.parent / name
        path = path.expanduser().resolve()
        if not (path / name).is_dir():
            parser.error(
                f"no {name} checkout at {path} (T5X imports {name}, which is not on "
                f"PyPI in a working version): `git clone {url} {path}` or pass --{name}."
            )
        setattr(args, name, path)
    if not common.python_version_ok(args.python, (3, 10)):
        parser.error(f"--python {args.python} must be Python >= 3.10")
    return args


def build_env(args: argparse.Namespace) -> pathlib.Path:
    venv = (args.venv or args.workdir / "venv").expanduser().absolute()
    python = venv / "bin" / "python"
    logs = args.workdir / "logs"
    modules = ["t5x.train", "seqio", "velo_scale.data.seqio_tasks", "jestimator.amos"]
    python, fresh = common.reuse_or_make_venv(
        venv, args.python, modules, logs, rebuild=args.rebuild
    )
    if not fresh:
        return python
    common.pip_install(
        python, ["-e", f"{common.REPO}[seqio,recipes]"], logs / "pip-velo.log"
    )
    common.pip_install(python, T5X_DEPS, logs / "pip-t5x-deps.log")
    common.pip_install(
        python,
        ["--no-deps", str(args.airio), str(args.jestimator), str(args.t5x)],
        logs / "pip-t5x.log",
    )
    error = common.import_error(python, modules)
    common.ensure(
        error is None, f"the new venv cannot import {modules}; see {logs}:\n{error}"
    )
    return python


class Runner:
    """Runs the recipes with `python -m t5x.train` in the check's venv."""

    def __init__(self, args: argparse.Namespace, python: pathlib.Path):
        self.args, self.python = args, python
        self.runs = args.workdir / "runs"
        self.logs = args.workdir / "logs"
        self.env = dict(os.environ)
        self.env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={NUM_DEVICES}"
        self.env["TF_CPP_MIN_LOG_LEVEL"] = "2"
        self.env["CUDA_VISIBLE_DEVICES"] = ""
        # Runs of the same program (velo, velo_resume) compile once.
        self.env["JAX_COMPILATION_CACHE_DIR"] = str(args.workdir / "jax_cache")
        self.env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        self.weights = common.weights_env(self.env)

    def command(
        self, model_dir: pathlib.Path, gin_files: Sequence[str], bindings: Sequence[str]
    ):
        cmd = [
            str(self.python),
            "-m",
            "t5x.train",
            f"--gin_search_paths={common.REPO},{self.args.t5x}",
        ]
        cmd += [f"--gin_file=gin_configs/t5x/{f}" for f in gin_files]
        cmd += [
            f"--gin.MODEL_DIR='{model_dir}'",
            "--gin.RANDOM_SEED=0",
            "--gin.train/utils.DatasetConfig.seed=0",
            f"--gin.partitioning.PjitPartitioner.num_partitions={NUM_PARTITIONS}",
            "--gin.train.stats_period=1",
            f"--gin.utils.SaveCheckpointConfig.period={CHECKPOINT_PERIOD}",
        ]
        return cmd + [f"--gin.{b}" for b in bindings]

    def run(
        self, name, gin_files, bindings, *, kill_when=None, fresh=True,
        expect_failure=False,
    ):  # fmt: skip
        model_dir = self.runs / name
        if fresh and model_dir.exists():
            shutil.rmtree(model_dir)
        log_path = self.logs / f"{name}.log"
        if not fresh:
            log_path = self.logs / f"{name}-restart.log"
        common.log(f"run {log_path.stem}: {' '.join(gin_files)} {' '.join(bindings)}")
        code, seconds, killed = common.run_logged(
            self.command(model_dir, gin_files, bindings),
            log_path,
            env=self.env,
            cwd=common.REPO,
            timeout=1800,
            kill_when=kill_when,
        )
        if expect_failure:
            common.ensure(code != 0, f"run {log_path.stem} should have failed")
        elif not killed:
            common.ensure(
                code == 0,
                f"run {log_path.stem} exited {code}; see {log_path}:\n{common.tail(log_path)}",
            )
        common.log(f"  {'killed' if killed else f'exit {code}'} after {seconds:.0f} s")
        return model_dir, log_path, seconds

    def scalars(
        self, model_dir: pathlib.Path, tag: str, sub: str = "train", skip=()
    ) -> dict[int, float]:
        """`{step: value}` of `tag` in the run's event files (the last value
        of each step), leaving out the files in `skip`."""
        import subprocess

        out = subprocess.run(
            [str(self.python), "-c", READ_EVENTS, str(model_dir / sub), tag, *skip],
            capture_output=True,
            text=True,
            env=self.env,
        )
        common.ensure(
            out.returncode == 0,
            f"reading {model_dir / sub} failed:\n{out.stderr[-2000:]}",
        )
        return {
            int(k): v
            for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()
        }


def checkpoints(model_dir: pathlib.Path) -> list[int]:
    steps = []
    for path in model_dir.glob("checkpoint_*"):
        match = re.fullmatch(r"checkpoint_(\d+)", path.name)
        if match and path.is_dir():
            steps.append(int(match.group(1)))
    return sorted(steps)


def inference_metric(model_dir: pathlib.Path, name: str) -> dict[int, float]:
    """`{step: value}` of a metric of seqio's evaluator (its JSON logger's
    `inference_eval/<task>-metrics.jsonl`)."""
    path = model_dir / "inference_eval" / "bible_en_es_translate-metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {int(r["step"]): float(r[name]) for r in rows if name in r}


def loss_decreased(losses: dict[int, float]) -> tuple[float, float, bool]:
    steps = sorted(losses)
    first = sum(losses[s] for s in steps[:3]) / 3
    last = sum(losses[s] for s in steps[-3:]) / 3
    return first, last, last < first


def close(a: float, b: float, rtol: float = MATCH_RTOL) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b))


def main(argv: Sequence[str] | None) -> int:
    args = _parse(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    python = build_env(args)
    runner = Runner(args, python)
    pretrain = ["bible_pretrain.gin"]
    velo = pretrain + ["velo.gin"]
    # Pre-training checkpoints hold the dataset iterator too, so that a
    # resumed run sees the batches the uninterrupted one saw. (Not for
    # fine-tuning: T5X would then restore the pre-training run's iterator.)
    steps = [f"TRAIN_STEPS={STEPS}", "utils.SaveCheckpointConfig.save_dataset=True"]
    rows, failures = [], []

    def record(name, optimizer, losses, seconds, checks):
        first, last, _ = (
            loss_decreased(losses)
            if len(losses) >= 3
            else (float("nan"),) * 2 + (False,)
        )
        ok = all(passed for _, passed in checks)
        rows.append(
            [
                name,
                optimizer,
                f"{min(losses)}-{max(losses)}" if losses else "-",
                f"{first:.3f} -> {last:.3f}",
                "; ".join(
                    f"{what}: {'ok' if passed else 'FAILED'}" for what, passed in checks
                ),
                f"{seconds:.0f} s",
                "PASS" if ok else "FAIL",
            ]
        )
        failures.extend(f"{name}: {what}" for what, passed in checks if not passed)

    # 1. Adafactor (T5X's default) and VeLO (one include), same data and seed.
    model_dir, _, seconds = runner.run("adafactor", pretrain + ["tiny.gin"], steps)
    ada = runner.scalars(model_dir, LOSS)
    record(
        "adafactor",
        "Adafactor",
        ada,
        seconds,
        [
            (f"{STEPS} steps logged", sorted(ada) == list(range(1, STEPS + 1))),
            ("loss decreased", loss_decreased(ada)[2]),
        ],
    )
    velo_dir, velo_log, seconds = runner.run("velo", velo + ["tiny.gin"], steps)
    ref = runner.scalars(velo_dir, LOSS)
    # VeLO's schedule in T5X's summaries (velo_t5x.schedule_summaries).
    lr_mult = runner.scalars(velo_dir, "velo/lr_mult/kernel")
    step_size = runner.scalars(velo_dir, "velo/step_size/kernel")
    velo_text = velo_log.read_text(errors="replace")
    record(
        "velo",
        "VeLO",
        ref,
        seconds,
        [
            (f"{STEPS} steps logged", sorted(ref) == list(range(1, STEPS + 1))),
            ("loss decreased", loss_decreased(ref)[2]),
            (
                "VeLOTrainer used",
                "VeLOTrainer" in velo_text
                or "velo_t5x.VeLOTrainer" in (velo_dir / "config.gin").read_text(),
            ),
            (
                "lr_mult and step size logged",
                bool(lr_mult)
                and sorted(step_size) == sorted(lr_mult)
                and all(v > 0 for v in step_size.values()),
            ),
        ],
    )

    # 2. Resume: kill once checkpoint_20 is complete, start again.
    resume_dir = runner.runs / "velo_resume"
    model_dir, _, first_seconds = runner.run(
        "velo_resume",
        velo + ["tiny.gin"],
        steps,
        kill_when=lambda: any(s >= KILL_AFTER for s in checkpoints(resume_dir)),
    )
    killed_at = max(checkpoints(model_dir))
    before = runner.scalars(model_dir, LOSS)
    old_events = [str(p) for p in (model_dir / "train").glob("events.out.tfevents.*")]
    _, restart_log, seconds = runner.run(
        "velo_resume", velo + ["tiny.gin"], steps, fresh=False
    )
    after_all = runner.scalars(model_dir, LOSS)
    # What the restarted process logged (its own event file).
    resumed = runner.scalars(model_dir, LOSS, skip=old_events)
    restart_text = restart_log.read_text(errors="replace")
    restored = re.search(r"[Rr]estor\w* .*checkpoint_(\d+)", restart_text)
    same = all(close(resumed[s], ref[s]) for s in resumed)
    record(
        "velo_resume",
        "VeLO",
        after_all,
        first_seconds + seconds,
        [
            (f"killed after checkpoint_{killed_at}", KILL_AFTER <= killed_at < STEPS),
            ("restored it", bool(restored) and int(restored.group(1)) == killed_at),
            (
                f"continued at step {killed_at + 1}",
                sorted(resumed) == list(range(killed_at + 1, STEPS + 1)),
            ),
            ("losses = uninterrupted run's", same and len(resumed) > 0),
            (f"checkpoint_{STEPS} written", STEPS in checkpoints(model_dir)),
        ],
    )
    resume_detail = [
        (s, before.get(s), resumed.get(s), ref.get(s))
        for s in (killed_at - 1, killed_at, killed_at + 1, killed_at + 2, STEPS)
    ]

    # 3. Microbatches: 2 per step, compared with the unmicrobatched run.
    model_dir, micro_log, seconds = runner.run(
        "velo_microbatch",
        velo + ["tiny.gin"],
        [
            f"TRAIN_STEPS={MICRO_STEPS}",
            "VeLOTrainer.num_microbatches=2",
        ],
    )
    micro = runner.scalars(model_dir, LOSS)
    micro_text = micro_log.read_text(errors="replace")
    worst = (
        max(abs(micro[s] - ref[s]) / abs(ref[s]) for s in micro)
        if micro
        else float("nan")
    )
    record(
        "velo_microbatch",
        "VeLO, 2 microbatches",
        micro,
        seconds,
        [
            (
                "T5X used 2 microbatches",
                "using microbatches" in micro_text.lower()
                or "2 microbatches" in micro_text,
            ),
            (
                f"losses = unmicrobatched (max rel diff {worst:.1e})",
                all(close(micro[s], ref[s]) for s in micro)
                and len(micro) == MICRO_STEPS,
            ),
            ("loss decreased", loss_decreased(micro)[2]),
        ],
    )

    # 4. Fine-tuning on translation from the VeLO pre-training checkpoint.
    init = velo_dir / f"checkpoint_{STEPS}"
    total = STEPS + FINETUNE_STEPS
    finetune_bindings = [
        f"INITIAL_CHECKPOINT_PATH='{init}'",
        f"TRAIN_STEPS={total}",
        f"EVAL_PERIOD={FINETUNE_STEPS}",
        "DROPOUT_RATE=0.0",
    ]
    bleus = {}
    for name, files, extra, optimizer in (
        (
            "finetune_velo",
            ["bible_finetune.gin", "velo_finetune.gin", "tiny.gin"],
            [f"VELO_NUM_STEPS={FINETUNE_STEPS}"],
            "VeLO",
        ),
        ("finetune_adafactor", ["bible_finetune.gin", "tiny.gin"], [], "Adafactor"),
    ):
        model_dir, ft_log, seconds = runner.run(name, files, finetune_bindings + extra)
        losses = runner.scalars(model_dir, LOSS)
        bleu = inference_metric(model_dir, "bleu")
        bleus[name] = bleu
        record(
            name,
            optimizer,
            losses,
            seconds,
            [
                (
                    f"started at step {STEPS + 1}",
                    bool(losses) and min(losses) == STEPS + 1 and max(losses) == total,
                ),
                ("loss decreased", len(losses) >= 3 and loss_decreased(losses)[2]),
                (
                    "BLEU at step {} ({})".format(
                        total, ", ".join(f"{v:.3f}" for v in bleu.values()) or "none"
                    ),
                    total in bleu,
                ),
            ],
        )

    # 5. Past the horizon: the finished VeLO run restarted with a larger
    # TRAIN_STEPS is refused, then continued with continuation='increase'.
    longer = STEPS + EXTEND_STEPS
    extend = ["velo_resume", velo + ["tiny.gin"]]
    _, refused_log, seconds = runner.run(
        *extend, [f"TRAIN_STEPS={longer}"], fresh=False, expect_failure=True
    )
    refused = "silently keep the old horizon" in refused_log.read_text(errors="replace")
    model_dir, _, more_seconds = runner.run(
        *extend,
        [f"TRAIN_STEPS={longer}", "velo_t5x.velo_optimizer.continuation='increase'"],
        fresh=False,
    )
    extended = runner.scalars(model_dir, LOSS)
    record(
        "velo_extend",
        "VeLO",
        extended,
        seconds + more_seconds,
        [
            ("larger TRAIN_STEPS refused", refused),
            (
                f"continued ('increase') to step {longer}",
                sorted(s for s in extended if s > STEPS)
                == list(range(STEPS + 1, longer + 1)),
            ),
        ],
    )

    header = [
        "run",
        "optimizer",
        "steps",
        "loss first3 -> last3",
        "checks",
        "time",
        "result",
    ]
    lines = [
        "T5X check: "
        + common.git_head(args.t5x)
        + f" ({args.t5x}); velo_scale "
        + common.git_head(common.REPO),
        f"weights: {runner.weights}; {NUM_DEVICES} CPU devices, mesh data "
        f"{NUM_DEVICES // NUM_PARTITIONS} x model {NUM_PARTITIONS}; tiny T5.1.1, batch 16, "
        "span corruption 128/32 tokens, translation 128/128; loss = T5X's loss per non-padding target token",
        "",
        common.table(rows, header),
        "",
        "resume, loss by step: killed run, restarted run, uninterrupted run:",
        *(f"  {s}: {b}, {a}, {r}" for s, b, a, r in resume_detail),
    ]
    summary = "\n".join(lines)
    (args.workdir / "summary.md").write_text(summary + "\n")
    print("\n" + summary, flush=True)
    if failures:
        raise common.CheckFailed("; ".join(failures))
    print("\nALL T5X CHECKS PASSED")
    return 0


if __name__ == "__main__":
    common.main_guard(main)
