"""The per-parameter MLP's backend forms (`_src/param_net.py`): the GPU form
of the first layer computes the same products summed in the same order."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_reductions import _phase_a_inputs
from velo_scale._src import param_net


@pytest.mark.parametrize("shape", [(48, 80), (6, 5, 16), (200,), (1,)])
def test_first_layer_on_a_last_axis_is_bitwise_the_channel_form(shape):
    p, g, acc = _phase_a_inputs(shape)
    chans = param_net.feature_channels(p, g, acc)
    rng = np.random.RandomState(1)
    w = jnp.asarray(rng.randn(len(chans), 4), jnp.float32)
    b = jnp.asarray(rng.randn(4), jnp.float32)
    lists = jax.jit(param_net._dense)(chans, w, b)
    last = jax.jit(param_net._dense_last_axis)(chans, w, b)
    assert len(lists) == len(last) == 4
    for want, got in zip(lists, last):
        assert got.shape == want.shape == p.shape
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
