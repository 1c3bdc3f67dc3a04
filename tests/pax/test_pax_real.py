"""VeLO in real praxis 1.4.0 / paxml 1.4.0 (the Pax lane, .ci/pax_lane.sh).

One training run is shared by the tests (module fixture): a causal byte-level
praxis `TransformerLm` (repeated layers: variables with a `repeat_prefix`) on
Genesis, sharded by praxis' `set_sharding_params_v1` over a (1, 2, 4)
replica x data x mdl mesh of 8 fake CPU devices, trained by paxml's own
`trainer_lib.train_step_single_learner` with `VeLOLearner` + `VeLO` exactly as
`pax_experiments.lm_task` configures them (no glue in the step), the state
checkpointed half-way with paxml's own checkpointer (GDA / tensorstore).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from paxml import checkpoints, learners, trainer_lib
from paxml.checkpoint_types import CheckpointType
from praxis import base_hyperparams, base_layer, pax_fiddle

from velo_scale import VeLOState
from velo_scale.integrations import pax, pax_experiments, pax_learner

NUM_STEPS = 12
RESUME_AT = 6
BATCH = 8
SEQ_LEN = 32
MESH = (1, 2, 4)
AXES = ("replica", "data", "mdl")


def _is_spec(x):
    return isinstance(x, P)


def _task_p(**overrides):
    kwargs = dict(
        num_layers=2,
        model_dims=32,
        hidden_dims=64,
        num_heads=4,
        num_train_steps=NUM_STEPS,
        ici_mesh_shape=MESH,
        use_repeated_layer=True,
        weights="project",
    )
    kwargs.update(overrides)
    return pax_experiments.lm_task(**kwargs)


def _batches(n):
    inp_p = pax_fiddle.Config(
        pax_experiments.BibleBytesInput,
        name="train",
        books=("Gen",),
        seq_len=SEQ_LEN,
        batch_size=BATCH,
        input_random_seed=0,
    )
    inp = base_hyperparams.instantiate(inp_p)
    return [inp.get_next() for _ in range(n)]


class Run:
    """A VeLO training run through paxml's train step (built once)."""

    def __init__(self, tmp_dir):
        self.jax_task = base_hyperparams.instantiate(_task_p())
        self.batches = _batches(NUM_STEPS)
        shapes = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.batches[0]
        )
        self.meta = trainer_lib.create_train_state_metadata(self.jax_task, shapes)
        self.mesh = Mesh(np.array(jax.devices()[:8]).reshape(MESH), AXES)
        self.shardings = jax.tree_util.tree_map(
            lambda s: NamedSharding(self.mesh, s),
            self.meta.partition_specs,
            is_leaf=_is_spec,
        )
        state, _ = trainer_lib.initialize_model_state(
            self.jax_task,
            jax.random.PRNGKey(0),
            shapes,
            do_init_checkpoint_rules=False,
            var_weight_hparams=self.meta.var_weight_hparams,
        )
        self.init_state = jax.device_put(state, self.shardings)
        self.traces = 0

        def step(states, key, inputs):
            self.traces += 1
            return trainer_lib.train_step_single_learner(
                self.jax_task,
                states,
                key,
                inputs,
                var_weight_hparams=self.meta.var_weight_hparams,
            )

        self.step = jax.jit(
            step,
            in_shardings=(
                self.shardings,
                NamedSharding(self.mesh, P()),
                NamedSharding(self.mesh, P(("replica", "data"))),
            ),
            out_shardings=(self.shardings, NamedSharding(self.mesh, P())),
        )
        self.ckpt_dir = os.path.join(tmp_dir, "checkpoints")
        self.losses = []
        self.states = [self.init_state]
        state = self.init_state
        for i in range(NUM_STEPS):
            state, out = self.run_step(state, i)
            self.losses.append(float(out.loss))
            self.states.append(state)
            if i + 1 == RESUME_AT:
                checkpoints.save_checkpoint(
                    state,
                    self.ckpt_dir,
                    checkpoint_type=CheckpointType.GDA,
                    train_state_unpadded_shape_dtype_struct=(
                        self.meta.unpadded_global_shapes
                    ),
                )
        self.traces_after_training = self.traces

    def run_step(self, state, i):
        with self.mesh:
            return self.step(state, jax.random.PRNGKey(1), self.batches[i])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return Run(str(tmp_path_factory.mktemp("pax_run")))


def _velo_states(opt_states):
    """Every VeLOState in paxml's opt_states (one per repeat-prefix group)."""
    found = []

    def visit(x):
        if isinstance(x, VeLOState):
            found.append(x)
        return x

    jax.tree_util.tree_map(
        visit, opt_states, is_leaf=lambda x: isinstance(x, VeLOState)
    )
    return found


def test_loss_decreases(run):
    first, last = np.mean(run.losses[:3]), np.mean(run.losses[-3:])
    print(
        f"VeLO through paxml's Learner: loss {run.losses[0]:.3f} -> {run.losses[-1]:.3f}"
    )
    assert np.all(np.isfinite(run.losses))
    assert last < first - 0.5, run.losses


def test_the_loss_reaches_velo(run):
    final = run.states[-1]
    velo_states = _velo_states(final.opt_states)
    # Two groups: variables without a repeat prefix, and the repeated layers.
    assert len(velo_states) == 2
    for s in velo_states:
        assert np.all(np.asarray(s.loss_buffer.iteration) == NUM_STEPS)
        # The loss buffer's running minimum has left its initial value: it saw
        # real losses (~3-5 nats per byte).
        assert np.all(np.isfinite(np.asarray(s.loss_buffer.means)))
        assert np.any(np.asarray(s.loss_buffer.means) != 0)


def test_a_plain_learner_does_not_give_velo_the_loss(run):
    """paxml's own Learner calls the optimizer chain without the loss."""
    learner_p = _task_p().train.learner
    plain_p = pax_fiddle.Config(
        learners.Learner, name="learner", loss_name="total_loss"
    )
    plain_p.optimizer = learner_p.optimizer
    plain = base_hyperparams.instantiate(plain_p)
    hparams = run.meta.var_weight_hparams["params"]["lm"]["final_ln"]
    variables = run.init_state.mdl_vars["params"]["lm"]["final_ln"]
    states = plain.get_grad_tx(hparams).init(variables)
    with base_layer.JaxContext.new_context():
        with pytest.raises(ValueError, match="VeLO needs the training loss"):
            jax.eval_shape(
                lambda g, s, v: plain.update_states(g, s, v, hparams),
                variables,
                states,
                variables,
            )


def test_train_step_compiles_once(run):
    assert run.traces_after_training == 1
    assert run.step._cache_size() == 1
    assert jax.tree_util.tree_structure(
        run.states[-1].opt_states
    ) == jax.tree_util.tree_structure(run.init_state.opt_states)
    # MaskedNode, never None, in VeLO's empty slots.
    for s in _velo_states(run.init_state.opt_states):
        assert isinstance(s.accumulation, optax.MaskedNode)


def test_state_specs_are_the_params_specs(run):
    specs = run.meta.partition_specs
    param_specs = {
        jax.tree_util.keystr(path): tuple(spec)
        for path, spec in jax.tree_util.tree_flatten_with_path(
            specs.mdl_vars, is_leaf=_is_spec
        )[0]
    }
    spec_states = _velo_states(specs.opt_states)
    array_states = _velo_states(run.states[-1].opt_states)
    assert len(spec_states) == len(array_states) == 2
    compared, differing = 0, []
    for spec_state, array_state in zip(spec_states, array_states):
        for field in ("momentum", "rms"):
            spec_tree = getattr(spec_state, field)
            array_tree = getattr(array_state, field)
            flat_specs = jax.tree_util.tree_flatten_with_path(
                spec_tree, is_leaf=_is_spec
            )[0]
            flat_arrays = jax.tree_util.tree_leaves(array_tree)
            assert len(flat_specs) == len(flat_arrays)
            for (path, spec), array in zip(flat_specs, flat_arrays):
                want = param_specs[jax.tree_util.keystr(path)]
                got = tuple(spec)
                padded = want + (None,) * (array.ndim - len(want))
                compared += 1
                # The accumulator's spec: its parameter's, the decay axis
                # replicated; the array on the device really is sharded so.
                if got != padded or array.sharding.spec != spec:
                    differing.append((field, jax.tree_util.keystr(path), got, want))
    print(
        f"{compared} state specs compared with their parameters'; {len(differing)} differ"
    )
    assert compared >= 2 * 20
    assert not differing, differing
    # Some parameters really are sharded over the mesh (not all replicated).
    assert any(any(e is not None for e in s) for s in param_specs.values())


def test_checkpoint_and_resume_bit_identically(run):
    restored = checkpoints.restore_checkpoint(
        run.meta.padded_global_shapes,
        run.ckpt_dir,
        global_mesh=run.mesh,
        checkpoint_type=CheckpointType.GDA,
        state_specs=run.meta.partition_specs,
        step=RESUME_AT,
        state_unpadded_shape_dtype_struct=run.meta.unpadded_global_shapes,
    )
    saved = run.states[RESUME_AT]
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(saved)
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, saved)
    state = restored
    for i in range(RESUME_AT, NUM_STEPS):
        state, out = run.run_step(state, i)
        assert float(out.loss) == run.losses[i]
    jax.tree_util.tree_map(np.testing.assert_array_equal, state, run.states[-1])
    # The restored state did not need another compile.
    assert run.step._cache_size() == 1


def test_a_model_made_only_of_repeated_layers(run):
    """Specs, init and update when every variable has a repeat_prefix."""
    hparams = run.meta.var_weight_hparams["params"]["lm"]["transformer"]
    variables = run.init_state.mdl_vars["params"]["lm"]["transformer"]
    leaves = jax.tree_util.tree_leaves(
        hparams, is_leaf=lambda x: isinstance(x, base_layer.WeightHParams)
    )
    assert leaves and all(v.repeat_prefix for v in leaves)
    learner = run.jax_task.learners[0]
    tx = learner.get_grad_tx(hparams)
    state_hparams = tx.init_partition_spec(hparams)  # AttributeError before
    state = tx.init(variables)
    specs = base_layer.var_partition_specs(
        state_hparams, mesh_shape=MESH, device_axis_names=AXES
    )
    # sharded_chain wraps its specs in an optax.MaskedState; paxml's
    # create_state_partition_specs unwraps it the same way.
    specs = jax.tree_util.tree_map(
        lambda x: x.inner_state if isinstance(x, optax.MaskedState) else x,
        specs,
        is_leaf=lambda x: isinstance(x, optax.MaskedState),
    )
    traces = []

    @jax.jit
    def update(grads, state, variables):
        traces.append(1)
        with pax.training_loss(2.0):
            return tx.update(grads, state, variables)

    grads = jax.tree_util.tree_map(lambda x: 0.01 * np.ones_like(x), variables)
    with run.mesh:
        for _ in range(2):
            updates, state = update(grads, state, variables)
    assert len(traces) == 1
    assert jax.tree_util.tree_structure(specs, is_leaf=_is_spec) == (
        jax.tree_util.tree_structure(state)
    )
    assert all(
        np.all(np.isfinite(np.asarray(u))) for u in jax.tree_util.tree_leaves(updates)
    )


def test_init_partition_spec_without_vectorization(run):
    """`vectorize_on_repeat_prefix=False`: a repeated variable is one tensor."""
    hparams = run.meta.var_weight_hparams
    learner = run.jax_task.learners[0]
    tx = learner.optimizer.get_grad_transformation(hparams)
    state_hparams = tx.init_partition_spec(hparams)
    velo_hparams = _velo_states(state_hparams)
    assert len(velo_hparams) == 1
    w = hparams["params"]["lm"]["transformer"]["repeat"]["sub"]["x_layers_0"][
        "ff_layer"
    ]["ffn_layer1"]["linear"]["w"]
    m = velo_hparams[0].momentum["params"]["lm"]["transformer"]["repeat"]["sub"][
        "x_layers_0"
    ]["ff_layer"]["ffn_layer1"]["linear"]["w"]
    assert tuple(m.shape) == tuple(w.repeat_prefix) + tuple(w.shape) + (3,)
    assert m.repeat_prefix is None


def test_configure_velo_keeps_the_learner_settings():
    task_p = pax_fiddle.Config(
        pax_experiments.tasks_lib.SingleTask, name="t", model=None
    )
    task_p.train.num_train_steps = 77
    task_p.train.learner = pax_fiddle.Config(
        learners.Learner, name="my_learner", loss_name="loss", grad_norm_summary=False
    )
    pax_learner.configure_velo(task_p, weights="project", decoupled_weight_decay=1e-4)
    learner_p = task_p.train.learner
    assert pax_fiddle.get_callable(learner_p) is pax_learner.VeLOLearner
    assert (learner_p.name, learner_p.loss_name, learner_p.grad_norm_summary) == (
        "my_learner",
        "loss",
        False,
    )
    assert learner_p.optimizer.num_steps == 77
    optimizer = base_hyperparams.instantiate(learner_p.optimizer)
    assert float(optimizer.get_learning_rate(5)) == 1.0
    with pytest.raises(ValueError, match="no learning rate"):
        base_hyperparams.instantiate(
            pax_fiddle.Config(pax_learner.VeLO, num_steps=10, learning_rate=1e-3)
        )
    with pytest.raises(ValueError, match="num_steps"):
        base_hyperparams.instantiate(pax_fiddle.Config(pax_learner.VeLO))


def test_paxml_trainer_runs_the_example_experiment(tmp_path):
    """paxml's own trainer (`paxml.main`) on `BibleLmVeLOTiny`, 1 device."""
    env = dict(os.environ)
    # One CPU device, as on a laptop (the fast-compile flag kept).
    env["XLA_FLAGS"] = re.sub(
        r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")
    ).strip()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    cmd = [
        sys.executable,
        "-m",
        "paxml.main",
        "--exp=velo_scale.integrations.pax_experiments.BibleLmVeLOTiny",
        f"--job_log_dir={tmp_path}",
        "--mode=train",
        "--alsologtostderr",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    losses = [
        (int(s), float(v))
        for s, v in re.findall(r"step_i: (\d+), training loss: ([0-9.eE+-]+)", log)
    ]
    print("paxml.main BibleLmVeLOTiny (step, loss):", losses)
    assert len(losses) >= 3, log[-6000:]
    assert losses[-1][0] >= pax_experiments.BibleLmVeLOTiny.NUM_TRAIN_STEPS - 5
    assert losses[-1][1] < losses[0][1] - 0.5
    assert (tmp_path / "checkpoints").exists()
