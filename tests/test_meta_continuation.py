"""The continuation study (paper Sec. 6): shared first H steps, each
method's horizon, the counting, the report."""

import json
import math
import pathlib

import numpy as np
import pytest

from velo_scale.meta import continuation as cont
from velo_scale.meta import evaluation as ev

H = 3  # the tiny run's first horizon; continued to 2H


def _tiny_workload():
    from velo_scale.models.small import MLP
    from velo_scale.workloads.classification import Classification

    return Classification(
        model=MLP(hidden=(16,), num_classes=10), image_shape=(8, 8, 1)
    )


TINY = ev.EvalTask("tiny_digits", _tiny_workload, "digits", H, 16, eval_examples=64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The study on a 1-hidden-layer digits MLP, H=3, two AdamW lrs (about
    20-50 s on two busy cores; the persistent compilation cache lets the VeLO
    runs share one compiled step)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    old = (
        jax.config.jax_compilation_cache_dir,
        jax.config.jax_persistent_cache_min_compile_time_secs,
    )
    ev.enable_compilation_cache(tmp_path_factory.mktemp("jax_cache"))
    cache = tmp_path_factory.mktemp("continuation")
    try:
        study = cont.study_task(
            TINY, horizon=H, learning_rates=[1e-3, 1e-2], smoothing_window=2,
            cache_dir=cache,
        )  # fmt: skip
    finally:
        jax.config.update("jax_compilation_cache_dir", old[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
        compilation_cache.reset_cache()
    return study, cache


def _workdirs(cache: pathlib.Path) -> tuple[pathlib.Path, dict[str, pathlib.Path]]:
    """The H-step run's workdir and each method's continued one."""
    (base,) = (cache / "workdirs" / f"tiny_digits_{H}x16").iterdir()
    full = cache / "workdirs" / f"tiny_digits_{2 * H}x16"
    return base, {m: full / f"{base.name}_{m}_from{H}" for m in cont.METHODS}


def _restore(workdir: pathlib.Path, step: int) -> dict:
    """The raw train state of a checkpoint (a dict of arrays)."""
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(
        workdir / "checkpoints" / str(step) / "default"
    )


def test_study_runs_share_the_first_h_steps(tiny):
    import jax

    study, cache = tiny
    base_dir, dirs = _workdirs(cache)
    assert study.base.steps == list(range(1, H + 1))
    base_params = _restore(base_dir, H)["params"]
    base_manifest = (
        base_dir / "checkpoints" / str(H) / "velo_scale_manifest.json"
    ).read_text()
    next_losses = set()
    for method, run in study.continued.items():
        assert run.error is None and run.steps == list(range(1, 2 * H + 1))
        # The first H steps are the base run's, from the same checkpoint.
        assert run.losses[:H] == study.base.losses
        ckpt = dirs[method] / "checkpoints" / str(H)
        assert (ckpt / "velo_scale_manifest.json").read_text() == base_manifest
        jax.tree_util.tree_map(
            np.testing.assert_array_equal,
            _restore(dirs[method], H)["params"],
            base_params,
        )
        # Step H+1's loss is taken at step H's params on the same next batch.
        next_losses.add(run.losses[H])
    assert len(next_losses) == 1
    # Every run starts from the same init on the same first batch.
    firsts = {r.losses[0] for r in [study.single, *study.adamw, study.base]}
    assert len(firsts) == 1
    assert study.single.steps == list(range(1, 2 * H + 1))
    assert [r.learning_rate for r in study.adamw] == [1e-3, 1e-2]
    assert all(len(r.steps) == 2 * H for r in study.adamw)


def test_each_method_changes_the_horizon_as_the_paper_says(tiny):
    from velo_scale.train import run_config

    _, cache = tiny
    base_dir, dirs = _workdirs(cache)
    base = _restore(base_dir, H)["opt_state"]
    assert (int(base["iteration"]), int(base["num_steps"])) == (H, H)
    assert not (base_dir / run_config.CONTINUATIONS_FILE).exists()
    # (iteration, horizon) of VeLO's state at step 2H, per method.
    expected = {"naive": (2 * H, H), "increase": (2 * H, 2 * H), "reset": (H, H)}
    for method, workdir in dirs.items():
        assert run_config.read_continuations(workdir) == [
            {"at_step": H, "num_steps": 2 * H, "method": method}
        ]
        state = _restore(workdir, 2 * H)
        assert int(state["step"]) == 2 * H
        velo = state["opt_state"]
        assert (int(velo["iteration"]), int(velo["num_steps"])) == expected[method]
    # Increase keeps the loss averages, with the decays of the new horizon.
    increased = _restore(dirs["increase"], 2 * H)["opt_state"]["loss_buffer"]
    assert not np.allclose(increased["decays"], base["loss_buffer"]["decays"])


def test_rerun_reuses_every_cached_record(tiny, monkeypatch):
    study, cache = tiny

    def no_training(*args, **kwargs):
        raise AssertionError("a cached run was trained again")

    monkeypatch.setattr(cont, "run_one", no_training)
    again = cont.study_task(
        TINY, horizon=H, learning_rates=[1e-3, 1e-2], smoothing_window=2,
        cache_dir=cache, log=lambda line: None,
    )  # fmt: skip
    assert again.runs() == study.runs() and again.base == study.base


# --- counting on hand-made records --------------------------------------------


def _hand_made(name: str, finals: dict[str, float]) -> cont.TaskStudy:
    """A study whose every run has the constant loss `finals[run]` (inf: a
    diverged run)."""

    def run(key: str) -> ev.RunRecord:
        x = finals[key]
        losses = [x] * 4 if math.isfinite(x) else [1.0, math.nan]
        error = None if math.isfinite(x) else "diverged"
        return ev.RunRecord(key, 1e-3 if key == "adamw" else None,
                            list(range(1, len(losses) + 1)), losses, {}, 0.0, error)  # fmt: skip

    task = ev.EvalTask(name, _tiny_workload, "digits", 4, 16)
    return cont.TaskStudy(
        task, 2, run("base"), {m: run(m) for m in cont.METHODS}, run("single"),
        [run("adamw")], window=1,
    )  # fmt: skip


HAND_MADE = [
    # increase and reset tie (within 1%); the single run beats all three.
    _hand_made("a", dict(base=4.0, naive=3.0, increase=2.0, reset=2.01, single=1.5, adamw=1.8)),
    # reset diverged (ranks last); the single run ties naive, so does not beat it.
    _hand_made("b", dict(base=4.0, naive=1.0, increase=2.0, reset=math.inf, single=1.005, adamw=0.9)),
    # all three tie: each is best and worst.
    _hand_made("c", dict(base=4.0, naive=1.0, increase=1.0, reset=1.0, single=2.0, adamw=1.2)),
]  # fmt: skip


def test_ranking_and_relative_differences():
    a, b, c = (s.outcome(0.01) for s in HAND_MADE)
    assert a.ranking == [("increase", "reset"), ("naive",)]
    assert a.best == ("increase", "reset") and a.worst == ("naive",)
    assert a.best_vs_single == pytest.approx((2.0 - 1.5) / 1.5)
    assert a.best_vs_adamw == pytest.approx((2.0 - 1.8) / 1.8)
    assert a.single_beats_all
    assert b.ranking == [("naive",), ("increase",), ("reset",)]
    assert not b.single_beats_all and b.best_vs_single == pytest.approx(-0.005 / 1.005)
    assert c.ranking == [("naive", "increase", "reset")] and c.best == c.worst
    # Without a tolerance increase beats reset on task a.
    assert HAND_MADE[0].outcome(0.0).ranking == [("increase",), ("reset",), ("naive",)]
    assert math.isnan(cont.relative_difference(math.inf, 1.0))
    assert cont.relative_difference(1.0, 2.0) == -0.5


def test_summary_counts_wins_worsts_and_ties():
    summary = cont.summarize([s.outcome(0.01) for s in HAND_MADE], 0.01)
    assert summary.tasks == 3
    assert summary.best == {"naive": 2, "increase": 2, "reset": 2}
    assert summary.worst == {"naive": 2, "increase": 1, "reset": 2}
    assert summary.ties == 2
    assert summary.single_beats_all == 1
    assert summary.best_beats_single == 1  # task c; b's 1.0 vs 1.005 is a tie
    assert summary.best_beats_adamw == 1  # task c: 1.0 < 1.2
    assert summary.single_beats_adamw == 1  # task a: 1.5 < 1.8
    strict = cont.summarize([s.outcome(0.0) for s in HAND_MADE], 0.0)
    assert strict.best == {"naive": 2, "increase": 2, "reset": 1}
    assert strict.ties == 1 and strict.single_beats_all == 1
    assert strict.best_beats_single == 2


def test_failed_task_is_reported_not_counted(tmp_path):
    failed = cont.TaskStudy(
        ev.EvalTask("broken", _tiny_workload, "digits", 4, 16), 2, None, {}, None,
        [], window=1, error="ValueError: boom",
    )  # fmt: skip
    assert not failed.complete() and failed.problem() == "ValueError: boom"
    out = tmp_path / "C.md"
    cont.write_report([*HAND_MADE, failed], out, weights_desc="hand-made",
                      settings={"seed": 0}, tie_rtol=0.01)  # fmt: skip
    numbers = json.loads((tmp_path / "C_results.json").read_text())
    assert numbers["summary"]["tasks"] == 3
    text = out.read_text()
    assert "| broken | 2+2 x 16 | failed: ValueError: boom" in text
    # Spreads (worst - best) / best: a 50%, b diverged (left out), c 0%.
    assert "median +25.0%; all three tie (within 0.01) on 1/3 tasks" in text
    # A diverged run shows as such in the table, not in the percentages.
    assert "above the best: a: `naive` +50.0%; b: `increase` +100.0%." in text
    assert "| b | 2+2 x 16 | 1.0000 | 2.0000 | diverged |" in text
    # The single runs' loss at H (1.5 / 1.005 / 2.0) vs the base's (4.0).
    assert "a -62.5%, b -74.9%, c -50.0%" in text
    assert (
        "By raw final loss: best of the three: `naive` 2/3, `increase` 2/3, `reset` 1/3"
        in text
    )
    assert (
        "| a | 2+2 x 16 | 3.0000 | 2.0000 | 2.0100 | 1.5000 | 1.8000 (1.0e-03)" in text
    )


# --- the report on the tiny real run ---------------------------------------------


def test_report_on_a_tiny_real_run(tiny, tmp_path):
    study, _ = tiny
    out = tmp_path / "CONTINUATION.md"
    png = cont.write_report([study], out, weights_desc=ev.describe_weights("auto"),
                            settings={"H": H}, tie_rtol=0.01)  # fmt: skip
    text = out.read_text()
    o = study.outcome(0.01)
    finals = " | ".join(f"{o.finals[m]:.4f}" for m in (*cont.METHODS, cont.SINGLE))
    assert f"| tiny_digits | {H}+{H} x 16 | {finals} |" in text
    assert " < ".join(" = ".join(g) for g in o.ranking) in text
    assert "NOT the paper's weights" in text or "official VeLO weights" in text
    assert "## Reading the results" in text and f"![curves]({png.name})" in text
    assert "Summary over 1 tasks" in text
    assert png.stat().st_size > 0
    numbers = json.loads((tmp_path / "CONTINUATION_results.json").read_text())
    assert numbers["summary"] == json.loads(
        json.dumps(cont.summarize([o], 0.01)._asdict())
    )
    raw = cont.summarize([study.outcome(0.0)], 0.0)
    assert numbers["summary_raw"] == json.loads(json.dumps(raw._asdict()))
    assert sum(raw.best.values()) >= 1 and sum(raw.worst.values()) >= 1
    # The eval-split counts rank the runs' eval losses at 2H.
    eval_losses = {m: study.continued[m].eval_metrics["loss"] for m in cont.METHODS}
    lowest = min(eval_losses.values())
    best_on_eval = {m: int(v == lowest) for m, v in eval_losses.items()}
    assert numbers["summary_eval_raw"]["best"] == best_on_eval
    (row,) = numbers["tasks"]
    assert row["finals"] == pytest.approx(o.finals)
    assert set(row["eval"]) == {*cont.METHODS, cont.SINGLE, cont.ADAMW}
    assert all("accuracy" in m for m in row["eval"].values())
    assert row["loss_at_horizon"] == pytest.approx(study.base.final(2))
    assert row["single_at_horizon"] == pytest.approx(
        ev.final_loss(range(H), study.single.losses[:H], 2)
    )
    assert all(0 <= e < 1 for e in row["standard_errors"].values())


def test_main_parses_the_suite_defaults(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(
        cont, "run_study", lambda tasks, **kw: seen.update(tasks=tasks, **kw)
    )
    assert cont.main(["--workdir", str(tmp_path), "--lr-grid-size", "5"]) == 0
    gin_text = pathlib.Path(cont.SUITE_GIN).read_text()
    assert len(seen["tasks"]) == 8 and all(f"'{t}'" in gin_text for t in seen["tasks"])
    assert f"run_suite.num_steps = {seen['horizon']}" in gin_text
    assert seen["lr_num"] == 5 and seen["velo_weights"] == "auto"
    assert seen["out"] == "CONTINUATION.md"
