"""Tests of the metrics writer (JSONL + TensorBoard) and the run reports."""

from __future__ import annotations

import json
import math
import pathlib
import struct
import sys
import types
import warnings

import numpy as np
import pytest

from velo_scale.train import metrics as metrics_lib
from velo_scale.train import reports

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class FakeClock:
    """Stands in for `time.time`: starts at `start`, advances `tick` per call."""

    def __init__(self, start: float = 1_000.0, tick: float = 0.5):
        self.now, self.tick = start, tick

    def time(self) -> float:
        self.now += self.tick
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(metrics_lib, "time", types.SimpleNamespace(time=fake.time))
    return fake


def _train_loss(step: int, scale: float) -> float:
    return scale * math.exp(-step / 40) + 0.1


def _write_run(
    workdir: pathlib.Path,
    *,
    num_steps: int,
    scale: float,
    optimizer: str | None,
    accuracy: bool,
    tensorboard: bool = False,
) -> None:
    """A fake run: train loss every step, eval every 25 steps (synthetic values)."""
    with metrics_lib.MetricsWriter(workdir, tensorboard=tensorboard) as writer:
        for step in range(1, num_steps + 1):
            writer.write(step, {"loss": _train_loss(step, scale), "lr": 1e-3})
            if step % 25 == 0:
                row = {"loss": 1.5 * _train_loss(step, scale)}
                if accuracy:
                    row["accuracy"] = step / (step + 50)
                writer.write(step, row, split="eval")
    if optimizer is not None:
        config = {"optimizer": optimizer, "num_steps": num_steps}
        (workdir / "config.json").write_text(json.dumps(config))


@pytest.fixture
def two_runs(tmp_path: pathlib.Path, clock: FakeClock) -> list[pathlib.Path]:
    velo, adam = tmp_path / "run_velo", tmp_path / "run_adam"
    _write_run(velo, num_steps=100, scale=2.0, optimizer="velo", accuracy=True)
    _write_run(adam, num_steps=50, scale=3.0, optimizer=None, accuracy=False)
    return [velo, adam]


def _strict_json(line: str) -> dict:
    def reject(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name} in {line!r}")

    return json.loads(line, parse_constant=reject)


# --- MetricsWriter -----------------------------------------------------------


def test_write_appends_one_json_line_per_call(tmp_path, clock):
    with metrics_lib.MetricsWriter(tmp_path / "run", tensorboard=False) as writer:
        writer.write(np.int64(1), {"loss": np.float32(2.5), "lr": 1e-3})
        writer.write(2, {"loss": 2.0, "accuracy": 0.25}, split="eval")
        # Flushed per write: readable before close.
        assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [_strict_json(line) for line in lines]
    assert rows == [
        {"step": 1, "split": "train", "time": 1000.5, "loss": 2.5, "lr": 1e-3},
        {"step": 2, "split": "eval", "time": 1001.0, "loss": 2.0, "accuracy": 0.25},
    ]
    assert type(rows[0]["step"]) is int and type(rows[0]["loss"]) is float
    assert metrics_lib.read_metrics(tmp_path / "run") == rows


def test_reopening_appends(tmp_path, clock):
    for step in (1, 2):
        with metrics_lib.MetricsWriter(tmp_path, tensorboard=False) as writer:
            writer.write(step, {"loss": 1.0})
    assert [r["step"] for r in metrics_lib.read_metrics(tmp_path)] == [1, 2]


def test_nonfinite_values_become_null_with_marker(tmp_path, clock):
    with metrics_lib.MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write(3, {"loss": float("nan"), "a": np.inf, "b": -np.inf, "c": 1.0})
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    row = _strict_json(line)
    assert row == {
        "step": 3,
        "split": "train",
        "time": 1000.5,
        "loss": None,
        "loss_nonfinite": True,
        "a": None,
        "a_nonfinite": True,
        "b": None,
        "b_nonfinite": True,
        "c": 1.0,
    }


@pytest.mark.parametrize(
    ("step", "metrics", "error", "match"),
    [
        (1, {"step": 1.0}, ValueError, "'step' is reserved"),
        (1, {"loss_nonfinite": 1.0}, ValueError, "reserved"),
        (
            1,
            {"loss": np.ones(3)},
            TypeError,
            r"'loss' must be a real scalar.*shape=\(3,\)",
        ),
        (1, {"loss": "high"}, TypeError, "'loss' must be a real scalar"),
        (1.5, {"loss": 1.0}, TypeError, "step must be an integer"),
    ],
)
def test_write_rejects_bad_input(tmp_path, step, metrics, error, match):
    with metrics_lib.MetricsWriter(tmp_path, tensorboard=False) as writer:
        with pytest.raises(error, match=match):
            writer.write(step, metrics)


def test_write_after_close_raises(tmp_path):
    writer = metrics_lib.MetricsWriter(tmp_path, tensorboard=False)
    writer.close()
    writer.close()  # Idempotent.
    with pytest.raises(ValueError, match="closed"):
        writer.write(1, {"loss": 1.0})


def test_truncated_last_line_is_skipped_and_cut_on_reopen(tmp_path, clock):
    with metrics_lib.MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write(1, {"loss": 1.0})
        writer.write(2, {"loss": 0.5})
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 3, "split": "train", "ti')  # A crash mid-write.
    assert [r["step"] for r in metrics_lib.read_metrics(tmp_path)] == [1, 2]

    # A resumed run must not glue its first line onto the fragment.
    with pytest.warns(RuntimeWarning, match="unfinished last line"):
        writer = metrics_lib.MetricsWriter(tmp_path, tensorboard=False)
    with writer:
        writer.write(3, {"loss": 0.25})
    assert [r["step"] for r in metrics_lib.read_metrics(tmp_path)] == [1, 2, 3]


def test_complete_last_line_without_newline_is_kept(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train", "time": 1.0, "loss": 2.0}')
    assert metrics_lib.read_metrics(tmp_path)[0]["loss"] == 2.0
    with metrics_lib.MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write(2, {"loss": 1.0})
    assert [r["step"] for r in metrics_lib.read_metrics(tmp_path)] == [1, 2]


def test_corrupt_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 1, "split": "train", "time": 1.0, "loss": 2.0}\n'
        '{"step": 2, "split": "tr\n'
        '{"step": 3, "split": "train", "time": 3.0, "loss": 1.0}\n'
    )
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: not valid JSON"):
        metrics_lib.read_metrics(tmp_path)
    path.write_text('[1, 2]\n{"step": 3, "split": "train", "time": 3.0}\n')
    with pytest.raises(ValueError, match=r"line 1: expected a JSON object"):
        metrics_lib.read_metrics(tmp_path)


def test_read_metrics_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no metrics\.jsonl in"):
        metrics_lib.read_metrics(tmp_path / "nowhere")


def _read_tfrecords(path: pathlib.Path) -> list[bytes]:
    """Records of a TFRecord file: u64 length, u32 crc, data, u32 crc."""
    data, records, pos = path.read_bytes(), [], 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        records.append(data[pos + 12 : pos + 12 + length])
        pos += 12 + length + 4
    return records


def test_tensorboard_event_file_has_split_tags(tmp_path):
    pytest.importorskip("tensorboardX")
    from tensorboardX.proto import event_pb2

    with metrics_lib.MetricsWriter(tmp_path) as writer:
        writer.write(1, {"loss": 2.0})
        writer.write(1, {"loss": 3.0, "accuracy": 0.5}, split="eval")
        writer.write(2, {"loss": float("nan")})
    (events,) = list(tmp_path.rglob("events.out.tfevents.*"))
    scalars = []
    for record in _read_tfrecords(events):
        event = event_pb2.Event.FromString(record)
        for value in event.summary.value:
            scalars.append((event.step, value.tag, value.simple_value))
    assert scalars[:3] == [
        (1, "train/loss", 2.0),
        (1, "eval/loss", 3.0),
        (1, "eval/accuracy", 0.5),
    ]
    assert scalars[3][:2] == (2, "train/loss") and math.isnan(scalars[3][2])


def test_tensorboard_off_writes_no_event_file(tmp_path):
    with metrics_lib.MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write(1, {"loss": 2.0})
    assert not list(tmp_path.rglob("events.out.tfevents.*"))


def test_missing_tensorboardx_warns_once(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # Import fails.
    monkeypatch.setattr(metrics_lib, "_warned_no_tensorboardx", False)
    with pytest.warns(RuntimeWarning, match="tensorboardX") as record:
        for name in ("a", "b"):
            with metrics_lib.MetricsWriter(tmp_path / name) as writer:
                writer.write(1, {"loss": 2.0})
    assert len([w for w in record if "tensorboardX" in str(w.message)]) == 1
    assert len(metrics_lib.read_metrics(tmp_path / "b")) == 1
    assert not list(tmp_path.rglob("events.out.tfevents.*"))


# --- reports -----------------------------------------------------------------


def test_plot_runs_writes_png(two_runs, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plots" / "compare.png"
    reports.plot_runs(two_runs, str(out))
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 10_000


def test_plot_runs_with_labels_and_other_metric(two_runs, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "lr.png"
    reports.plot_runs(two_runs, out, labels=["VeLO", "Adam"], metric="lr")
    assert out.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="one label per workdir"):
        reports.plot_runs(two_runs, out, labels=["VeLO"])


def test_default_labels_use_config_optimizer(two_runs, monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    seen = []
    monkeypatch.setattr(
        Figure, "savefig", lambda fig, *a, **k: seen.append(fig.axes[0].get_legend())
    )
    reports.plot_runs(two_runs, tmp_path / "x.png")
    texts = [t.get_text() for t in seen[0].get_texts()]
    assert texts == ["run_velo (velo)", "run_adam"]


def _capture_figure(monkeypatch):
    from matplotlib.figure import Figure

    seen = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: seen.append(fig))
    return seen


def test_plot_has_one_labelled_panel_per_metric_and_a_title(
    two_runs, monkeypatch, tmp_path
):
    pytest.importorskip("matplotlib")
    config = json.loads((two_runs[0] / "config.json").read_text())
    config.update(
        data="fashion_mnist",
        config={"gin": "velo.weights = 'auto'\n", "gin_files": ["recipes/x.gin"]},
    )
    (two_runs[0] / "config.json").write_text(json.dumps(config))
    seen = _capture_figure(monkeypatch)
    reports.plot_runs(two_runs[:1], tmp_path / "x.png")
    (fig,) = seen
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [
        "train loss (raw and smoothed)",
        "eval loss (lower is better)",
        "eval accuracy (higher is better)",
    ]
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss", "loss", "accuracy"]
    # No twin axes: accuracy is linear, on its own panel.
    assert fig.axes[2].get_yscale() == "linear"
    assert fig.get_suptitle() == (
        "recipe x.gin | data fashion_mnist | optimizer velo | weights 'auto'"
    )


def test_plot_single_evaluation_is_a_labelled_marker(tmp_path, clock, monkeypatch):
    pytest.importorskip("matplotlib")
    with metrics_lib.MetricsWriter(tmp_path / "one", tensorboard=False) as w:
        for step in range(1, 11):
            w.write(step, {"loss": 1.0 / step})
        w.write(10, {"loss": 0.5, "accuracy": 0.8125}, split="eval")
    seen = _capture_figure(monkeypatch)
    reports.plot_runs([tmp_path / "one"], tmp_path / "one.png")
    (fig,) = seen
    accuracy = fig.axes[2]
    assert [t.get_text() for t in accuracy.texts] == ["0.8125"]
    (line,) = accuracy.get_lines()
    assert line.get_marker() == "o" and line.get_linestyle() == "None"
    assert fig.axes[0].get_yscale() == "log"  # train loss spans 1 .. 0.1


def test_plot_runs_tolerates_nonfinite_and_missing_eval(tmp_path, clock):
    pytest.importorskip("matplotlib")
    with metrics_lib.MetricsWriter(tmp_path / "diverged", tensorboard=False) as w:
        for step, loss in enumerate([2.0, 1.0, float("nan"), float("inf")]):
            w.write(step, {"loss": loss})
    reports.plot_runs([tmp_path / "diverged"], tmp_path / "d.png")
    assert (tmp_path / "d.png").read_bytes().startswith(PNG_MAGIC)


def test_missing_metrics_file_names_the_directory(two_runs, tmp_path):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty_run.*has no metrics.jsonl"):
        reports.plot_runs([two_runs[0], empty], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(FileNotFoundError, match="empty_run.*has no metrics.jsonl"):
        reports.compare_runs([two_runs[0], empty])
    with pytest.raises(TypeError, match="sequence of run directories"):
        reports.compare_runs(str(two_runs[0]))


def _parse_table(table: str) -> list[dict[str, str]]:
    lines = table.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1].replace("|", "").split()) == {"---"}
    return [
        dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        for line in lines[2:]
    ]


LOSS_COLUMN = metrics_lib.FINAL_LOSS_LABEL
RATE_COLUMN = metrics_lib.RATE_LABEL


def test_compare_runs_table(two_runs):
    rows = _parse_table(reports.compare_runs(two_runs))
    assert list(rows[0]) == [
        "run", "optimizer", "steps", LOSS_COLUMN, "best eval loss",
        "final eval loss", "final eval accuracy",
        "wall time (s)", "first step (s, compilation)", RATE_COLUMN,
    ]  # fmt: skip
    assert list(rows[0]) == reports.compare_columns(two_runs)
    velo, adam = rows

    # velo: 100 train rows, 4 evals; the clock ticks 0.5 s per written row.
    final_train = np.mean([_train_loss(s, 2.0) for s in range(91, 101)])
    eval_losses = [1.5 * _train_loss(s, 2.0) for s in (25, 50, 75, 100)]
    assert velo == {
        "run": "run_velo",
        "optimizer": "velo",
        "steps": "100",
        LOSS_COLUMN: f"{final_train:.4g}",
        "best eval loss": f"{min(eval_losses):.4g}",
        "final eval loss": f"{eval_losses[-1]:.4g}",
        "final eval accuracy": f"{100 / 150:.4g}",
        "wall time (s)": f"{(104 - 1) * 0.5:.1f}",
        "first step (s, compilation)": "-",  # not written by this fake run
        # 99 steps between the first and last train row, 102 rows apart.
        RATE_COLUMN: f"{99 / (102 * 0.5):.3g}",
    }
    # adam: no config.json and no eval accuracy.
    assert adam["optimizer"] == "-"
    assert adam["steps"] == "50"
    assert adam["final eval accuracy"] == "-"
    final_adam = np.mean([_train_loss(s, 3.0) for s in range(46, 51)])
    assert adam[LOSS_COLUMN] == f"{final_adam:.4g}"
    assert adam["final eval loss"] == f"{1.5 * _train_loss(50, 3.0):.4g}"


def test_compare_shows_the_workloads_own_metrics(tmp_path, clock):
    gnn, mt = tmp_path / "gnn", tmp_path / "translation"
    with metrics_lib.MetricsWriter(gnn, tensorboard=False) as w:
        for step in (1, 2):
            w.write(step, {"loss": 1.0})
        w.write(2, {"loss": 0.5, "mAP": 0.25, "AUC": 0.75}, split="eval")
    with metrics_lib.MetricsWriter(mt, tensorboard=False) as w:
        w.write(1, {"loss": 3.0})
        w.write(1, {"loss": 2.5, "bleu": 12.5}, split="eval")
    gnn_row, mt_row = _parse_table(reports.compare_runs([gnn, mt]))
    assert gnn_row["final eval mAP"] == "0.25"
    assert gnn_row["final eval AUC"] == "0.75"
    assert gnn_row["final eval bleu"] == "-"
    assert mt_row["final eval bleu"] == "12.5"
    assert mt_row["final eval mAP"] == "-"


def test_compare_rate_excludes_first_steps_and_skipped_losses(tmp_path, clock):
    run = tmp_path / "run"
    with metrics_lib.MetricsWriter(run, tensorboard=False) as w:
        # Start 1: the first step took 30 s (compilation), then 0.5 s per row.
        w.write(1, {"loss": 9.0, metrics_lib.COMPILE_KEY: 30.0, "skipped": 0})
        for step in range(2, 11):
            w.write(step, {"loss": 1.0, "skipped": 0})
        clock.now += 1_000  # down for a while, then resumed at step 11
        w.write(11, {"loss": 1.0, metrics_lib.COMPILE_KEY: 20.0, "skipped": 0})
        for step in range(12, 20):
            w.write(step, {"loss": 1.0, "skipped": 0})
        w.write(20, {"loss": float("nan"), "skipped": 1})  # skipped by the trainer
    (row,) = _parse_table(reports.compare_runs([run]))
    assert row["first step (s, compilation)"] == "50.0"
    assert row[RATE_COLUMN] == "2"  # 18 steps in 9 s: the gap is not counted
    assert row[LOSS_COLUMN] == "1"  # the skipped step's nan is left out


def test_compare_runs_diverged_and_restarted(tmp_path, clock):
    run = tmp_path / "restarted"
    with metrics_lib.MetricsWriter(run, tensorboard=False) as w:
        for step in range(1, 21):
            w.write(step, {"loss": 1.0})
    with metrics_lib.MetricsWriter(run, tensorboard=False) as w:
        for step in range(11, 21):  # Resumed from a step-10 checkpoint.
            w.write(step, {"loss": 2.0})
        w.write(21, {"loss": float("nan")})
    (row,) = _parse_table(reports.compare_runs([run]))
    assert row["steps"] == "21"
    assert row[LOSS_COLUMN] == "nan"  # Divergence is not averaged away.
    assert row["best eval loss"] == "-"
    assert "final eval loss" not in row  # no run wrote eval rows
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (run / "config.json").write_text(json.dumps({"optimizer": {"name": "adam"}}))
        assert _parse_table(reports.compare_runs([run]))[0]["optimizer"] == "adam"
