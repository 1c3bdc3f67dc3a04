"""Model definitions: published parameter counts (no allocation) and a tiny
ViT training through the trainer on a 2x4 mesh."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from tests.reference_data import CHECKPOINT
from velo_scale.models import ViT
from velo_scale.train import optimizers, train


def _count(module, shape):
    boxed = jax.eval_shape(
        module.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct(shape, jnp.float32)
    )
    return sum(x.size for x in jax.tree_util.tree_leaves(nn.meta.unbox(boxed)))


@pytest.mark.parametrize(
    "sizes,expected",
    [(ViT.B16, 86_567_656), (ViT.S16, 22_050_664), (ViT.S16_ALGOPERF, 22_122_472)],
    ids=["ViT-B/16", "ViT-S/16", "ViT-S/16-AlgoPerf"],
)
def test_vit_parameter_counts(sizes, expected):
    assert _count(ViT(**sizes, num_classes=1000), (1, 224, 224, 3)) == expected


@pytest.mark.slow  # CI trains a ViT in test_workload_imagenet; shardings in test_sharding
def test_tiny_vit_trains_sharded():
    result = train(
        model=ViT(**ViT.TINY, num_classes=10),
        optimizer=lambda num_steps: optimizers.velo(num_steps, weights=str(CHECKPOINT)),
        num_steps=3,
        data="fashion_mnist",
        batch_size=32,
        eval_batch_size=2000,
        mesh_shape=(2, 4),
        progress=False,
    )
    assert int(result.state.step) == 3
    qkv = result.state.params["block00"]["query"]["kernel"]
    assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, "model", None)  # heads
    momentum = result.state.opt_state.momentum["block00"]["query"]["kernel"]
    assert momentum.sharding.spec == jax.sharding.PartitionSpec(
        None, "model", None, None
    )
