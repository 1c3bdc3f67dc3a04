"""`velo-scale` command line (also `python -m velo_scale`).

  velo-scale train [--gin_file F ...] [--gin_param 'train.num_steps=100' ...]
                   [--workdir DIR]
  velo-scale meta-train --gin_file gin_configs/meta/digits_small.gin --workdir DIR
  velo-scale plot DIR [DIR ...] -o curves.png
  velo-scale compare DIR [DIR ...]
  velo-scale eval --gin_file gin_configs/eval/heldout.gin --weights auto --out EVAL.md
  velo-scale configs          # where the shipped gin_configs/ and recipes/ are
  velo-scale --version

This is the only module that reads flags and gin; it binds
`velo_scale.train.train` and the optimizer/model factories by name.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import inspect
import pathlib
import re
import sys
from collections.abc import Sequence
from importlib import resources


def _register_configurables():
    import gin

    from velo_scale import models
    from velo_scale._src.weights import Architecture
    from velo_scale.meta import distribution as meta_distribution
    from velo_scale.meta import tasks as meta_tasks
    from velo_scale.meta import train as meta_train_lib
    from velo_scale.train import optimizers, trainer

    registry = {
        "train": trainer.train,
        "MLP": models.MLP,
        "CNN": models.CNN,
        "ViT": models.ViT,
        "meta_train": meta_train_lib.meta_train,
        "Architecture": Architecture,
        "digits_mlp_task": meta_tasks.digits_mlp_task,
        "task_distribution": meta_distribution.task_distribution,
    }
    registry.update(optimizers.OPTIMIZERS)
    registry.update(_module_configurables())
    for name, fn in registry.items():
        if not gin.config._REGISTRY.get_match(name):  # noqa: SLF001
            gin.external_configurable(fn, name)
    return registry


def _module_configurables() -> dict:
    """`GIN_CONFIGURABLES` of every module in velo_scale.workloads and
    velo_scale.models (workloads, their models) and of the held-out
    evaluation suite."""
    import importlib
    import pkgutil

    from velo_scale import models, workloads

    found: dict = {}
    for package in (models, workloads):
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            found.update(getattr(module, "GIN_CONFIGURABLES", {}))
    from velo_scale.meta import evaluation  # the held-out suite (`eval`)

    found.update(evaluation.GIN_CONFIGURABLES)
    return found


def _explain_gin_error(error: Exception, registry: dict) -> str:
    """Adds the close names to gin's unknown-configurable/parameter errors."""
    msg = str(error)
    unknown = re.search(r"No configurable matching '([^']+)'", msg)
    if unknown:
        close = difflib.get_close_matches(unknown.group(1), list(registry), n=3)
        return f"{msg.splitlines()[0]} Known configurables: {sorted(registry)}" + (
            f"; did you mean {close}?" if close else "."
        )
    param = re.search(
        r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", msg
    )
    if param and param.group(1) in registry:
        names = list(inspect.signature(registry[param.group(1)]).parameters)
        if inspect.isclass(registry[param.group(1)]):
            import dataclasses

            names = [f.name for f in dataclasses.fields(registry[param.group(1)])]
        close = difflib.get_close_matches(param.group(2), names, n=3)
        return f"{msg.splitlines()[0]} Close names: {close or names}."
    return msg.splitlines()[0] if msg else repr(error)


CONFIG_PREFIX = "velo_scale:"
CONFIG_DIRS = ("gin_configs", "recipes")
SHARE_DIR = "share"  # velo_scale/share/{gin_configs,recipes} in a built wheel


def config_root() -> pathlib.Path | None:
    """The folder holding velo_scale's `gin_configs/` and `recipes/`.

    An installed wheel ships them as package data in `velo_scale/share/` (see
    setup.py); a source checkout (editable install) has them at the
    repository root. None when neither is there."""
    package = pathlib.Path(__file__).resolve().parent
    for root in (package / SHARE_DIR, package.parent):
        if all((root / d).is_dir() for d in CONFIG_DIRS):
            return root
    return None


def resolve_gin_file(name: str) -> pathlib.Path:
    """The gin file `name` names: a path (from the working directory), else
    the same relative path in velo_scale's own configs (`recipes/x.gin`,
    `gin_configs/t5x/velo.gin` work from any directory and from an installed
    package), or `velo_scale:<path>` (under gin_configs/, recipes/ or the
    root of `config_root()`)."""
    root = config_root()
    if name.startswith(CONFIG_PREFIX):
        rel = name[len(CONFIG_PREFIX) :].lstrip("/")
        candidates = [root / d / rel for d in CONFIG_DIRS] + [root / rel] if root else []
    else:
        path = pathlib.Path(name).expanduser()
        candidates = [path.absolute()]
        if root is not None and not path.is_absolute():
            candidates.append(root / path)
    for path in candidates:
        if path.is_dir():
            gins = sorted(p.name for p in path.glob("*.gin"))
            raise ValueError(
                f"--gin_file {name!r} is a directory; pass a .gin file"
                + (f", e.g. {name.rstrip('/')}/{gins[0]} (it has {len(gins)})" if gins else "")
                + "."
            )
        if path.is_file():
            return path
    where = f" or in velo_scale's configs ({root})" if root else ""
    raise ValueError(
        f"gin file {name!r} does not exist (looked in {pathlib.Path.cwd()}{where}). "
        "List the shipped ones with `velo-scale configs`."
    )


def _explain_include_error(error: OSError) -> str:
    """gin's "Unable to open file" for an `include`, with the fix."""
    msg = " ".join(str(error).split())
    return (
        f"{msg} An `include` path is looked up in the folders listed; write it "
        "relative to one of them (e.g. include 'gin_configs/models/mlp.gin'), "
        "or list the shipped files with `velo-scale configs`."
    )


QUOTE_STRINGS_MSG = (
    "quote strings in gin: x = 'value' (gin values are Python literals; on the "
    "command line: --gin_param \"train.data = 'fashion_mnist'\"; @name refers "
    "to a configurable, %NAME to a macro)."
)
_UNQUOTED = re.compile(r"^\s*([\w./]+)\s*=\s*([A-Za-z_][\w.]*)\s*(#.*)?$")


def _explain_unquoted(error: Exception, files: Sequence[str], params: Sequence[str]):
    """gin's `malformed node ... <ast.Name ...>`: a bare word where a value
    belongs, named with where it is."""
    found = []
    sources = [("--gin_param", p) for p in params]
    for f in files:
        try:
            text = pathlib.Path(f).read_text(encoding="utf-8")
        except OSError:
            continue
        sources += [(f"{f}:{i}", line) for i, line in enumerate(text.splitlines(), 1)]
    for where, line in sources:
        m = _UNQUOTED.match(line)
        if m and m.group(2) not in ("True", "False", "None"):
            found.append(f"{where}: {m.group(1)} = {m.group(2)}")
    what = f" Unquoted: {'; '.join(found[:3])}." if found else ""
    return f"{QUOTE_STRINGS_MSG}{what} (gin said: {str(error).split(':')[0]}.)"


class _DropPathNotFound:
    """A logging filter for gin's "Path not found: ..." lines: gin logs one
    for every search path an `include` is not in, found or not."""

    def filter(self, record) -> bool:
        return not str(record.getMessage()).startswith("Path not found:")


@contextlib.contextmanager
def _quiet_include_search():
    """gin's include search, quiet and robust.

    gin logs "Path not found" for every search path an include is not in, and
    its package-resource reader treats `gin_configs/runs/cpu.gin` as the module
    `gin_configs.runs`: where that is a namespace package (the checkout's
    folder on sys.path) it raises TypeError instead of trying the next search
    path. Both are undone here, for the parse only."""
    import logging

    from gin import resource_reader

    handlers = [logging.getLogger(), *logging.getLogger().handlers]
    quiet = _DropPathNotFound()
    parse_path = resource_reader._parse_config_path  # noqa: SLF001

    def safe_parse_path(config_path: str) -> str:
        try:
            return parse_path(config_path)
        except TypeError as e:  # a namespace package has no origin
            raise ValueError("Package not found", config_path) from e

    resource_reader._parse_config_path = safe_parse_path  # noqa: SLF001
    for h in handlers:
        h.addFilter(quiet)
    try:
        yield
    finally:
        resource_reader._parse_config_path = parse_path  # noqa: SLF001
        for h in handlers:
            h.removeFilter(quiet)


def parse_gin(gin_files: Sequence[str], gin_params: Sequence[str]) -> dict:
    """Parses gin files (the embedded default when none) and bindings.

    Returns the registry of configurables. Raises `ValueError` with close names
    for unknown configurables or parameters.
    """
    import gin

    registry = _register_configurables()
    gin.clear_config()
    files = [str(resolve_gin_file(f)) for f in gin_files]
    if not files:
        files = [str(resources.files("velo_scale.recipes") / "default.gin")]
    roots = [pathlib.Path.cwd()]
    for f in files:
        path = pathlib.Path(f)
        # Includes resolve from the working directory, the file's folder and
        # the folder above it (recipes/ -> repository root), then velo_scale's
        # own gin_configs/ and recipes/ (an installed package has them too).
        roots += [path.parent, path.parent.parent]
    if (shipped := config_root()) is not None:
        roots.append(shipped)
    for root in dict.fromkeys(roots):
        gin.add_config_file_search_path(str(root))
    try:
        with _quiet_include_search():
            gin.parse_config_files_and_bindings(
                files, gin_params, finalize_config=False
            )
    except (ValueError, KeyError, SyntaxError) as e:
        if "malformed node" in str(e):
            raise ValueError(_explain_unquoted(e, files, gin_params)) from None
        raise ValueError(_explain_gin_error(e, registry)) from None
    except OSError as e:  # a bad `include`
        raise ValueError(_explain_include_error(e)) from None
    return registry


def configured_value(binding: str):
    """The value the parsed gin config binds to `binding` (e.g.
    "train.workload"), with `@configurable()` references called. Lets tests
    build a recipe's workload without training (`parse_gin` first)."""
    import gin

    value = gin.query_parameter(binding)
    if hasattr(value, "scoped_configurable_fn"):
        return value.scoped_configurable_fn()
    return value


def _maybe_initialize_distributed(multihost: bool) -> None:
    """Multi-host start: `jax.distributed.initialize()` with `--multihost`
    (auto-detected cluster: TPU pod, SLURM, ...) or when
    $JAX_COORDINATOR_ADDRESS is set (with $JAX_NUM_PROCESSES, $JAX_PROCESS_ID).
    Every process runs the same command and reads the same global batches."""
    import os

    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not (multihost or address):
        return
    import jax

    if address:
        missing = [
            v for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if v not in os.environ
        ]
        if missing:
            raise ValueError(
                f"JAX_COORDINATOR_ADDRESS is set but {missing} are not; set all three "
                "(or unset it and pass --multihost on a TPU pod / SLURM cluster)."
            )
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()


def _is_primary() -> bool:
    """Process 0 of a multi-host run (or the only process) writes reports."""
    import jax

    return jax.process_index() == 0


DEFAULT_RECIPE = "default.gin (embedded)"
NO_WORKDIR_MSG = (
    "velo-scale: no --workdir: nothing will be saved (no metrics, checkpoints "
    "or curves.png; the run cannot be resumed). Pass --workdir DIR to keep them."
)


def run_train(args: argparse.Namespace) -> int:
    import gin

    _maybe_initialize_distributed(args.multihost)
    registry = parse_gin(args.gin_file, args.gin_param)
    train_fn = gin.get_configurable("train")
    kwargs = {"config": {"gin": gin.config_str(), "gin_files": list(args.gin_file) or [DEFAULT_RECIPE]}}
    if args.workdir:
        kwargs["workdir"] = args.workdir
    elif "train.workdir" not in gin.config_str() and _is_primary():
        print(NO_WORKDIR_MSG, file=sys.stderr, flush=True)
    try:
        result = train_fn(**kwargs)
    except (TypeError, ValueError) as e:
        if "gin" in str(e).lower() or "missing" in str(e).lower():
            raise ValueError(_explain_gin_error(e, registry)) from None
        raise
    if result.workdir and _is_primary():
        from velo_scale.train import reports

        out = pathlib.Path(result.workdir) / "curves.png"
        reports.plot_runs([result.workdir], str(out))
        print(f"metrics: {result.workdir}/metrics.jsonl, curves: {out}", flush=True)
    return 0


def run_meta_train(args: argparse.Namespace) -> int:
    import gin

    if not args.gin_file:
        raise ValueError(
            "meta-train needs --gin_file (e.g. gin_configs/meta/digits_small.gin)."
        )
    _maybe_initialize_distributed(args.multihost)
    parse_gin(args.gin_file, args.gin_param)
    kwargs = {"workdir": args.workdir} if args.workdir else {}
    gin.get_configurable("meta_train")(**kwargs)
    if args.workdir and _is_primary():
        from velo_scale.train import reports

        out = pathlib.Path(args.workdir) / "meta_curves.png"
        reports.plot_runs([args.workdir], str(out), metric="meta_loss")
        print(f"meta-loss curve: {out}; weights: {args.workdir}/params", flush=True)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """The held-out (VeLOdrome-style) suite of `velo_scale.meta.evaluation`."""
    import gin

    from velo_scale.meta import evaluation

    if not args.gin_file:
        raise ValueError(
            "eval needs --gin_file (e.g. gin_configs/eval/heldout.gin or "
            "gin_configs/eval/quick.gin)."
        )
    parse_gin(args.gin_file, args.gin_param)
    kwargs = {"velo_weights": args.weights, "out": args.out}
    if args.workdir:
        kwargs["cache_dir"] = args.workdir
    results = gin.get_configurable("run_suite")(**kwargs)
    print(evaluation.markdown_table(results), flush=True)
    print(evaluation.summary_line(results), flush=True)
    return 0


MAIN_EPILOG = """\
examples:
  velo-scale train --workdir runs/default        # the embedded default recipe
  velo-scale train --gin_file recipes/digits_mlp.gin --workdir runs/digits
  velo-scale compare runs/default runs/digits
  velo-scale train --help                        # more on training
"""
TRAIN_DESCRIPTION = """\
Trains one run from gin files (velo_scale.train.train bound by gin). Without
--gin_file it runs the embedded default recipe: an MLP on Fashion-MNIST with
VeLO. --gin_file takes a path, or a path inside velo_scale's own configs from
any directory (recipes/x.gin, gin_configs/optimizers/adamw.gin, or
velo_scale:optimizers/adamw.gin); `velo-scale configs` lists them. With
--workdir the run writes metrics.jsonl, TensorBoard events, checkpoints,
config.json and curves.png there, and the same command resumes it."""
TRAIN_EPILOG = """\
examples:
  velo-scale train --workdir runs/default
  velo-scale train --gin_file recipes/digits_mlp.gin --workdir runs/digits
  velo-scale train --gin_file recipes/digits_mlp.gin \\
      --gin_file gin_configs/optimizers/adamw.gin --workdir runs/digits_adamw
  velo-scale train --gin_file recipes/digits_mlp.gin \\
      --gin_param 'train.num_steps = 100' --gin_param "train.data = 'digits'"

gin values are Python literals: quote strings (x = 'value').
"""


def run_configs() -> int:
    """Prints where the shipped gin files are, and their names."""
    root = config_root()
    if root is None:
        print("velo_scale's gin_configs/ and recipes/ are not installed.")
        return 1
    print(f"velo_scale configs: {root} (pass --gin_search_paths={root} to T5X)")
    for d in CONFIG_DIRS:
        for path in sorted((root / d).rglob("*.gin")):
            print(f"  {path.relative_to(root)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from velo_scale import __version__

    parser = argparse.ArgumentParser(
        prog="velo-scale",
        description="VeLO training tools: train with gin recipes, meta-train "
        "VeLO weights, evaluate, plot and compare runs.",
        epilog=MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"velo-scale {__version__}"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser(
        "train",
        help="train from gin files (default: embedded recipe)",
        description=TRAIN_DESCRIPTION,
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tr.add_argument(
        "--gin_file", action="append", default=[], help="gin file (repeatable)"
    )
    tr.add_argument(
        "--gin_param", action="append", default=[], help="gin binding (repeatable)"
    )
    tr.add_argument(
        "--workdir",
        default=None,
        help="metrics, checkpoints, curves.png; resumes a run (none: nothing saved)",
    )
    tr.add_argument(
        "--multihost",
        action="store_true",
        help="call jax.distributed.initialize() first (TPU pod / SLURM)",
    )
    mt = sub.add_parser("meta-train", help="meta-train VeLO weights with ES")
    mt.add_argument(
        "--gin_file", action="append", default=[], help="gin file (repeatable)"
    )
    mt.add_argument(
        "--gin_param", action="append", default=[], help="gin binding (repeatable)"
    )
    mt.add_argument(
        "--workdir", default=None, help="checkpoints, metrics, exported params"
    )
    mt.add_argument(
        "--multihost",
        action="store_true",
        help="call jax.distributed.initialize() first (TPU pod / SLURM)",
    )
    pl = sub.add_parser("plot", help="loss/eval curves of runs on one figure")
    pl.add_argument("workdirs", nargs="+")
    pl.add_argument(
        "-o", "--output", default=None,
        help="PNG to write (default curves.png, or schedule.png with --schedule)",
    )  # fmt: skip
    pl.add_argument(
        "--schedule",
        action="store_true",
        help="plot the per-tensor step sizes (VeLO's lr_mult, rms(update)/rms(param)) "
        "from each workdir's schedule.jsonl instead of the loss curves",
    )
    pl.add_argument("--labels", default=None, help="comma-separated run labels")
    cp = sub.add_parser("compare", help="table of final metrics of runs")
    cp.add_argument("workdirs", nargs="+")
    sub.add_parser(
        "configs",
        help="where velo_scale's gin_configs/ and recipes/ are, and their files",
    )
    ev = sub.add_parser(
        "eval", help="held-out suite: VeLO vs tuned AdamW / NAdamW (EVAL.md)"
    )
    ev.add_argument(
        "--gin_file", action="append", default=[], help="gin file (repeatable)"
    )
    ev.add_argument(
        "--gin_param", action="append", default=[], help="gin binding (repeatable)"
    )
    ev.add_argument(
        "--weights", default="auto", help="VeLO weights: auto, official or a path"
    )
    ev.add_argument("--out", default="EVAL.md", help="markdown report (+ _curves.png)")
    ev.add_argument(
        "--workdir", default=None, help="keep per-run records here; reruns resume"
    )
    args = parser.parse_args(argv)

    from velo_scale._src.weights import WeightsError
    from velo_scale.train.checkpoint import CheckpointError
    from velo_scale.train.lock import WorkdirLockedError
    from velo_scale.train.signals import TrainingInterrupted
    from velo_scale.train.trainer import NonFiniteLossError

    try:
        if args.command == "train":
            return run_train(args)
        if args.command == "meta-train":
            return run_meta_train(args)
        if args.command == "eval":
            return run_eval(args)
        if args.command == "configs":
            return run_configs()
        from velo_scale.train import reports

        if args.command == "plot":
            labels = args.labels.split(",") if args.labels else None
            plot = reports.plot_schedule if args.schedule else reports.plot_runs
            output = args.output or ("schedule.png" if args.schedule else "curves.png")
            plot(args.workdirs, output, labels=labels)
            print(f"wrote {output}")
        else:
            print(reports.compare_runs(args.workdirs))
    except (
        WeightsError,
        FileNotFoundError,
        CheckpointError,
        NonFiniteLossError,
        WorkdirLockedError,
        ValueError,
        ImportError,
    ) as e:
        print(f"velo-scale: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:  # SIGTERM/SIGINT: checkpointed, clean exit
        print(f"velo-scale: {e}", file=sys.stderr)
        return 128 + e.signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
