"""The `velo-scale` CLI as a newcomer meets it: help and version, gin files
found by name (also from an installed wheel's copy), clear messages for
common mistakes, and what a run prints while it waits and when it ends."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from velo_scale import cli
from velo_scale.train import metrics as metrics_lib

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = [
    "--gin_file", "recipes/digits_mlp.gin",
    "--gin_file", "gin_configs/optimizers/adamw.gin",
    "--gin_param", "MLP.hidden=(16,)",
    "--gin_param", "train.num_steps=6",
    "--gin_param", "train.eval_every=3",
    "--gin_param", "train.mesh_shape=(1, 1)",
]  # fmt: skip


def _fails(capsys, argv, *fragments):
    """`velo-scale argv` exits 2 with one line naming each fragment, and no
    traceback."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err
    assert "Traceback" not in err
    return err


def test_version_and_help(capsys):
    from velo_scale import __version__

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"velo-scale {__version__}"
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert "embedded default recipe" in out  # a description
    assert "examples:" in out and "velo-scale train --gin_file recipes/" in out
    assert "quote strings" in out


def test_gin_files_are_found_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository
    root = cli.config_root()
    assert (root / "gin_configs" / "t5x" / "velo.gin").is_file()
    assert cli.resolve_gin_file("gin_configs/t5x/velo.gin") == (
        root / "gin_configs" / "t5x" / "velo.gin"
    )
    assert cli.resolve_gin_file("velo_scale:optimizers/adamw.gin") == (
        root / "gin_configs" / "optimizers" / "adamw.gin"
    )
    cli.parse_gin(["recipes/digits_mlp.gin"], [])  # its includes resolve too


def test_an_installed_package_ships_the_gin_files(tmp_path):
    """setup.py's build step copies gin_configs/ and recipes/ into the wheel's
    velo_scale/share/; an installed copy finds and parses them by name."""
    import runpy

    site = tmp_path / "site"
    shutil.copytree(
        REPO / "velo_scale", site / "velo_scale",
        ignore=shutil.ignore_patterns("__pycache__"),
    )  # fmt: skip
    runpy.run_path(str(REPO / "setup.py"), run_name="not_main")["copy_configs"](site)
    code = (
        "from velo_scale import cli; import gin\n"
        "print(cli.config_root())\n"
        "print(cli.resolve_gin_file('gin_configs/t5x/velo.gin'))\n"
        "cli.parse_gin(['recipes/digits_mlp.gin'], [])\n"
        "print(gin.query_parameter('train.num_steps'))\n"
    )
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=elsewhere,
        env=dict(os.environ, PYTHONPATH=str(site)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    share = site / "velo_scale" / "share"
    assert out.stdout.split() == [
        str(share), str(share / "gin_configs" / "t5x" / "velo.gin"), "300"
    ]  # fmt: skip


def test_configs_lists_the_shipped_files(capsys):
    assert cli.main(["configs"]) == 0
    out = capsys.readouterr().out
    assert "recipes/digits_mlp.gin" in out and "gin_configs/t5x/velo.gin" in out


def test_gin_mistakes_have_clear_messages(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    train = ["train", "--gin_param", "train.num_steps=1"]
    _fails(capsys, [*train, "--gin_file", "recipes"], "is a directory", ".gin file")
    _fails(capsys, [*train, "--gin_file", "recipes/nope.gin"], "does not exist")
    bad_include = tmp_path / "bad_include.gin"
    bad_include.write_text("include 'gin_configs/nope.gin'\n")
    _fails(
        capsys, [*train, "--gin_file", str(bad_include)],
        "Unable to open file: gin_configs/nope.gin", "`include` path",
    )  # fmt: skip
    unquoted = tmp_path / "unquoted.gin"
    unquoted.write_text("train.data = fashion_mnist\n")
    err = _fails(
        capsys, [*train, "--gin_file", str(unquoted)],
        "quote strings in gin: x = 'value'", "unquoted.gin:1: train.data = fashion_mnist",
    )  # fmt: skip
    assert "ast.Name" not in err
    _fails(
        capsys, [*train, "--gin_param", "train.data = digits"],
        "quote strings in gin", "--gin_param: train.data = digits",
    )  # fmt: skip


def test_no_workdir_says_nothing_is_saved(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    # num_steps=0 fails in train(), after the notice: nothing is compiled.
    assert cli.main(["train", *TINY, "--gin_param", "train.num_steps=0"]) == 2
    err = capsys.readouterr().err
    assert "no --workdir: nothing will be saved" in err


def test_a_run_says_what_it_waits_for_and_one_final_loss(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    workdir = tmp_path / "run"
    assert cli.main(["train", *TINY, "--workdir", str(workdir)]) == 0
    captured = capsys.readouterr()
    err, out = captured.err, captured.out
    # stderr is not a TTY here: plain lines, no carriage-return updates.
    assert "\r" not in err
    assert "compiling the train step... (step 1 of 6)" in err
    assert "first step done in" in err and "rates and ETAs below exclude it" in err
    assert "eval at step 3/6: loss" in err and "eval at step 6/6: loss" in err
    assert "step 6/6, loss(last 1)" in err
    assert metrics_lib.FINAL_LOSS_LABEL in out and metrics_lib.RATE_LABEL in out
    assert "(compilation included)" in out
    rows = metrics_lib.read_metrics(workdir)
    first = [r for r in rows if r["split"] == "train"][0]
    assert first[metrics_lib.COMPILE_KEY] > 0
    # The summary's train loss is the one compare shows.
    summary = out.split(metrics_lib.FINAL_LOSS_LABEL + " ")[1].split(",")[0]
    assert cli.main(["compare", str(workdir)]) == 0
    table = capsys.readouterr().out
    assert f"| {float(summary):.4g} |" in table
    assert "final eval accuracy" in table

    # Re-running the finished run says so, without a nan loss or a 0 rate.
    assert cli.main(["train", *TINY, "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert "is complete (step 6 of 6)" in out
    assert "nan" not in out and "steps/s" not in out

    # The same workdir with another optimizer: the config check, not orbax.
    err = _fails(
        capsys,
        ["train", *TINY, "--gin_file", "gin_configs/optimizers/sgd_momentum.gin",
         "--workdir", str(workdir)],
        "the optimizer",
    )  # fmt: skip
    assert "partial_restore" not in err


def test_digits_without_scikit_learn_names_the_data_extra(monkeypatch):
    from velo_scale.data import load_dataset

    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"\[data\]") as error:
        load_dataset("digits", "train")
    assert "[test]" not in str(error.value)


def test_first_use_preparation_is_announced(capsys):
    from velo_scale.data import cache

    with cache.preparing("B3DB molecules", "~1 min"):
        pass
    err = capsys.readouterr().err
    assert "preparing B3DB molecules (first use, ~1 min; cached in" in err
    assert "prepared B3DB molecules in" in err


def test_progress_lines_for_logs_and_bar_for_terminals():
    import io

    from velo_scale.train.progress import ProgressBar

    log = io.StringIO()  # not a TTY: plain lines
    bar = ProgressBar(True, 0, 100, first_message="compiling the train step...",
                      stream=log)  # fmt: skip
    bar.update(loss=9.0)  # the first step, compilation included
    for _ in range(99):
        bar.update(loss=1.0)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert lines[0] == "compiling the train step... (step 1 of 100)"
    assert lines[1].startswith("first step done in")
    assert lines[-1].startswith("step 100/100, loss 1.0000")
    assert 15 <= len(lines) <= 25  # every 5% of the run, not every step
    assert all("h " not in line for line in lines)  # no hours-long ETA

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty = Terminal()
    bar = ProgressBar(True, 0, 10, stream=tty)
    for _ in range(10):
        bar.update(loss=1.0)
    bar.close()
    assert "10/10" in tty.getvalue() and "\r" in tty.getvalue()  # tqdm
