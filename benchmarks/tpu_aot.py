"""Ahead-of-time TPU compile of VeLO vs optax.adamw: per-chip cost, memory, collectives.

No TPU is needed: libtpu (`pip install "jax[tpu]==<installed jax version>"`, see
BENCHMARKS.md) compiles for a TPU topology on this host, as MaxText's
`train_compile.py` does. For each parameter tree and optimizer this lowers

    step(params, state, grads, loss) -> (optax.apply_updates(params, updates), state)

with params and state donated, from sharded `jax.ShapeDtypeStruct`s (params,
grads, `jax.eval_shape(tx.init, params)`, a scalar loss) on an FSDP x TP mesh
of the topology's devices, axes ('fsdp', 'tensor'). Params are sharded as a
T5X/MaxText user would: the embed dim on 'fsdp', mlp / heads / joined_kv /
vocab on 'tensor' (an axis that does not divide evenly is replicated, as
`velo_scale.mesh_param_specs(..., replicate_indivisible=True)` does); the
optimizer state takes `velo_scale.state_shardings` (AdamW's moments follow the
params). VeLO has the official architecture (LSTM 512, 256-MLP bank) with
random weights from `velo_scale.init_weights` (the values do not change the
compile figures).

Per chip (one device's SPMD program) it prints:

* bytes accessed / param and flops / param: `compiled.cost_analysis()`, divided
  by the number of parameter elements one chip holds (its shards);
* temp B/param: `compiled.memory_analysis().temp_size_in_bytes`, same divisor;
* lower s and compile s: wall time of `.lower()` and of `.compile()`, and the
  compile's process CPU time (all threads; on a loaded host the figure that
  repeats), VeLO and AdamW in the same process, one after the other;
* the largest collective of the compiled HLO (all-reduce, all-gather,
  reduce-scatter, all-to-all, collective-permute; element count of its
  largest buffer) and how many of each kind;
* the number of fusions (XLA kernels) and the passes they make over the
  parameters (element-weighted, see `analyse_hlo`), of which reductions:
  where the bytes go; `--kernels` lists the kernels over the largest tensor
  (`kernel_breakdown`), `--dump-hlo DIR` writes each compiled HLO.

GPU targets (`--topology h100`, `h200`, or `h200:8` for 8 GPUs of one host):
jax's CUDA plugin (`pip install "velo_scale[gpu-aot]"`, i.e. `jax[cuda12]`
of the installed jax; its own venv, ~6 GB) compiles for an NVIDIA GPU with
none present, from the target figures in `GPU_TARGETS`. XLA:GPU gives no
`cost_analysis()` there (bytes accessed and flops print n/a): the HBM bytes
read from the HLO, the kernel count and the compile seconds are the figures.
On a GPU VeLO's step is bound by its kernel launches, not by bandwidth (a
10.5M-parameter update moves ~2 GB, about 0.4 ms at 4.8 TB/s, and took 7.3
ms on an H200), so the number of fusions is the figure to watch.

Pallas (Mosaic) custom calls: `cost_analysis()` counts 0 bytes for them; their
operand and result bytes are read from the HLO and added to "bytes accessed"
(the output says so when any are present).

Trees (`--trees`, comma separated):
  10m             10 x [1024, 1024] + 10 biases (20 tensors, 10.5M params)
  transformer     update_step.py's transformer-like tree (196 tensors, 17.6M)
  transformer_L<n> the same with n blocks (16 tensors per block)
  depth           transformer_L6, transformer (12), transformer_L24, transformer_L48
                  (VeLO at 48 blocks needs ~30 GB of host memory to compile
                  with the code of 2026-12-01)
  t5_base         T5 v1.1 base-like, unscanned: 12 encoder + 12 decoder blocks,
                  d_model 768, gated d_ff 2048, 12 heads x 64, vocab 32128,
                  untied logits (282 tensors, 247.6M params)
  t5_base_scanned the same with each stack's layers stacked on a leading
                  'layers' axis (replicated), as flax nn.scan / MaxText do
                  (29 tensors)

Usage:
  python benchmarks/tpu_aot.py [--topology v5e:2x2] [--mesh 2x2]
      [--trees 10m,transformer,depth] [--optimizers velo,adamw]
      [--json out.json] [--fit] [--from-json a.json[,b.json]] [--dump-hlo DIR]
      [--kernels]

`--fit` fits the VeLO paper's App. B.7 cost model
`cost = c0 + c_tensor * n_tensors + c_param * n_params` (per chip) to bytes
accessed, flops, temp bytes and compile seconds, for each optimizer, over the
trees measured (or read with `--from-json`): least squares of the relative
residuals, since the trees span 1M to 250M parameters.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from update_step import SQUARE_TREES, transformer_shapes, tree_shapes  # noqa: E402

# libtpu's accelerator type per TPU generation (only quiets its start-up logs).
_ACCELERATOR_TYPES = {"v4": "v4-8", "v5e": "v5litepod-4", "v5p": "v5p-8", "v6e": "v6e-4"}

# NVIDIA GPUs XLA:GPU compiles for without one (`--topology h100[:N]` /
# `h200[:N]`: N GPUs of one host), from the vendors' datasheet figures:
# (SMs, HBM bytes, HBM bytes/s, L2 bytes, SM clock GHz). The figures feed
# XLA's cost model and fusion heuristics; compute capability 9.0.
GPU_TARGETS = {
    "h100": (
        132,
        85_520_809_984,
        3_352_320_000_000,
        52_428_800,
        1.98,
        "NVIDIA H100 80GB HBM3",
    ),
    "h200": (132, 150_754_820_096, 4_800_000_000_000, 52_428_800, 1.98, "NVIDIA H200"),
}


def gpu_target_config(name: str) -> str:
    """XLA's GpuTargetConfig (text proto) of a GPU in `GPU_TARGETS`."""
    sms, memory, bandwidth, l2, clock, description = GPU_TARGETS[name]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32
  shared_memory_per_block: 49152 shared_memory_per_core: 233472
  shared_memory_per_block_optin: 232448 threads_per_core_limit: 2048
  core_count: {sms} fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth} l2_cache_size: {l2} clock_rate_ghz: {clock}
  device_memory_size: {memory}
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{description}"
"""


def is_gpu_topology(topology: str) -> bool:
    return topology.split(":")[0] in GPU_TARGETS


def topology_devices(topology: str) -> list:
    """The devices of a TPU topology (`v5e:2x2`) or of N GPUs of one host
    (`h200:8`), none of which need be present."""
    from jax.experimental import topologies

    name, _, count = topology.partition(":")
    if name not in GPU_TARGETS:
        return list(topologies.get_topology_desc(topology, "tpu").devices)
    try:
        desc = topologies.get_topology_desc(
            platform="cuda",
            target_config=gpu_target_config(name),
            topology=f"1x1x{int(count or 1)}",
        )
    except Exception as e:  # noqa: BLE001 - no CUDA plugin, or an old one
        raise SystemExit(
            f"--topology {topology}: compiling for a GPU without one needs jax's CUDA "
            f'plugin (pip install "velo_scale[gpu-aot]", or "jax[cuda12]==<installed '
            f'jax>"): {e}'
        ) from e
    return list(desc.devices)


# Logical axis -> mesh axis, the usual T5X/MaxText 2-D (FSDP x TP) rules.
LOGICAL_RULES = {
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "joined_kv": "tensor",
    "vocab": "tensor",
    "kv": None,
    "length": None,
    "layers": None,
    "relpos_buckets": None,
}

COLLECTIVES = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
)
_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
}  # fmt: skip
_SHAPE_RE = re.compile(r"\b(pred|[suf]\d+|bf16|c64)\[([0-9,]*)\]")
# An array type with its layout, e.g. f32[512,512]{1,0:T(8,128)S(1)}: S(n),
# n > 0, places it in another memory space than HBM (S(1): VMEM).
_TYPED_RE = re.compile(r"\b(pred|[suf]\d+|bf16|c64)\[([0-9,]*)\](\{[^}]*\})?")

Tree = dict[str, tuple[tuple[int, ...], tuple[str | None, ...]]]


# --------------------------------------------------------------------------
# Parameter trees: name -> (shape, logical axes)


def _transformer_axes(name: str, shape: tuple[int, ...]) -> tuple[str | None, ...]:
    """Logical axes of update_step.py's transformer tree, by parameter name."""
    if name == "embed/tokens":
        return ("vocab", "embed")
    if name == "embed/positions":
        return ("length", "embed")
    leaf = name.split("/")
    if "attn" in leaf:
        proj, kind = leaf[-2], leaf[-1]
        if proj == "out":
            return ("heads", "kv", "embed") if kind == "kernel" else ("embed",)
        return ("embed", "heads", "kv") if kind == "kernel" else ("heads", "kv")
    if "mlp" in leaf:
        proj, kind = leaf[-2], leaf[-1]
        if proj == "wi":
            return ("embed", "mlp") if kind == "kernel" else ("mlp",)
        return ("mlp", "embed") if kind == "kernel" else ("embed",)
    if len(shape) == 1:  # layer norms
        return ("embed",)
    raise ValueError(f"no logical axes for {name} {shape}")


def _square_tree(name: str) -> Tree:
    return {
        n: (s, ("embed", "mlp") if len(s) == 2 else ("mlp",))
        for n, s in tree_shapes(name).items()
    }


def _transformer_tree(layers: int) -> Tree:
    return {n: (s, _transformer_axes(n, s)) for n, s in transformer_shapes(layers).items()}


def _t5_tree(scanned: bool, layers: int = 12) -> Tree:
    """T5 v1.1 base-like tree in T5X's minimal layout (no biases, 2-D attention
    kernels [embed, joined_kv], gated MLP wi_0/wi_1/wo, RMS-norm scales, one
    relative-position bias per stack, untied logits)."""
    d, d_ff, heads, head_dim, vocab, buckets = 768, 2048, 12, 64, 32128, 32
    kv = heads * head_dim

    def attention(prefix: str) -> Tree:
        out = {
            f"{prefix}/{p}/kernel": ((d, kv), ("embed", "joined_kv"))
            for p in ("query", "key", "value")
        }
        out[f"{prefix}/out/kernel"] = ((kv, d), ("joined_kv", "embed"))
        return out

    def block(decoder: bool) -> Tree:
        out: Tree = {}
        if decoder:
            out["pre_self_attention_layer_norm/scale"] = ((d,), ("embed",))
            out |= attention("self_attention")
            out["pre_cross_attention_layer_norm/scale"] = ((d,), ("embed",))
            out |= attention("encoder_decoder_attention")
        else:
            out["pre_attention_layer_norm/scale"] = ((d,), ("embed",))
            out |= attention("attention")
        out["pre_mlp_layer_norm/scale"] = ((d,), ("embed",))
        out["mlp/wi_0/kernel"] = ((d, d_ff), ("embed", "mlp"))
        out["mlp/wi_1/kernel"] = ((d, d_ff), ("embed", "mlp"))
        out["mlp/wo/kernel"] = ((d_ff, d), ("mlp", "embed"))
        return out

    tree: Tree = {"token_embedder/embedding": ((vocab, d), ("vocab", "embed"))}
    for stack, decoder in (("encoder", False), ("decoder", True)):
        tree[f"{stack}/relpos_bias/rel_embedding"] = (
            (heads, buckets),
            ("heads", "relpos_buckets"),
        )
        if scanned:
            for n, (s, a) in block(decoder).items():
                tree[f"{stack}/layers/{n}"] = ((layers, *s), ("layers", *a))
        else:
            for i in range(layers):
                for n, sa in block(decoder).items():
                    tree[f"{stack}/layers_{i}/{n}"] = sa
        norm = "encoder_norm" if stack == "encoder" else "decoder_norm"
        tree[f"{stack}/{norm}/scale"] = ((d,), ("embed",))
    tree["decoder/logits_dense/kernel"] = ((d, vocab), ("embed", "vocab"))
    return tree


def build_tree(name: str) -> Tree:
    if name in SQUARE_TREES:
        return _square_tree(name)
    if name == "transformer":
        return _transformer_tree(12)
    if m := re.fullmatch(r"transformer_L(\d+)", name):
        return _transformer_tree(int(m.group(1)))
    if name == "t5_base":
        return _t5_tree(scanned=False)
    if name == "t5_base_scanned":
        return _t5_tree(scanned=True)
    raise ValueError(
        f"unknown tree {name!r}; choose from {', '.join(SQUARE_TREES)}, transformer, "
        "transformer_L<n>, depth, t5_base, t5_base_scanned"
    )


def expand_trees(spec: str) -> list[str]:
    out = []
    for name in (t.strip() for t in spec.split(",")):
        if name == "depth":
            out += ["transformer_L6", "transformer", "transformer_L24", "transformer_L48"]
        elif name:
            build_tree(name)  # validates
            out.append(name)
    return list(dict.fromkeys(out))  # each tree once, in the order given


def tree_layers(name: str) -> int | None:
    if name == "transformer":
        return 12
    if m := re.fullmatch(r"transformer_L(\d+)", name):
        return int(m.group(1))
    return 12 if name.startswith("t5_base") else None


# --------------------------------------------------------------------------
# Mesh, shardings and the compiled step


def default_mesh_shape(n: int) -> tuple[int, int]:
    """(fsdp, tensor): tensor the largest power of two <= sqrt(n)."""
    tp = 2 ** int(math.log2(n) // 2)
    return n // tp, tp


def make_mesh(
    topology: str, mesh_shape: tuple[int, int] | None, n_devices: int | None = None
):
    from jax.experimental import mesh_utils
    from jax.sharding import Mesh

    devices = topology_devices(topology)
    if n_devices:
        devices = devices[:n_devices]
    shape = mesh_shape or default_mesh_shape(len(devices))
    if shape[0] * shape[1] != len(devices):
        raise ValueError(
            f"--mesh {shape[0]}x{shape[1]} needs {shape[0] * shape[1]} devices; "
            f"topology {topology} has {len(devices)}."
        )
    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # noqa: BLE001 - any layout the helper refuses
        grid = np.array(devices).reshape(shape)
    return Mesh(grid, ("fsdp", "tensor"))


def _param_specs(tree: Tree, mesh):
    import jax
    import velo_scale
    from jax.sharding import PartitionSpec as P

    shapes = {n: jax.ShapeDtypeStruct(s, np.float32) for n, (s, _) in tree.items()}
    wanted = {n: P(*(LOGICAL_RULES[a] if a else None for a in ax)) for n, (_, ax) in tree.items()}
    return shapes, velo_scale.mesh_param_specs(shapes, wanted, mesh, True)


def make_optimizer(
    name: str,
    implementation: str = "xla",
    skip_nonfinite: bool = True,
    mesh=None,
    param_specs=None,
):
    import optax

    if name == "adamw":
        return optax.adamw(1e-3)
    import jax
    import velo_scale

    theta = velo_scale.init_weights(jax.random.PRNGKey(0), velo_scale.Architecture())
    return velo_scale.velo(
        num_steps=10_000,
        weights=theta,
        implementation=implementation,
        pallas_interpret=False,  # compile the Mosaic kernels for the TPU
        skip_nonfinite=skip_nonfinite,
        # The Mosaic kernels run per device inside shard_map on a mesh.
        mesh=mesh if implementation == "pallas" else None,
        param_specs=param_specs if implementation == "pallas" else None,
    )


def compile_step(
    opt_name: str,
    tree: Tree,
    mesh,
    dump_hlo: Path | None = None,
    tree_name: str = "",
    implementation: str = "xla",
    skip_nonfinite: bool = True,
) -> dict[str, Any]:
    import jax
    import optax
    import velo_scale
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    shapes, specs = _param_specs(tree, mesh)
    tx = make_optimizer(opt_name, implementation, skip_nonfinite, mesh, specs)
    param_sh = {n: NamedSharding(mesh, specs[n]) for n in shapes}
    state_sh = velo_scale.state_shardings(tx, shapes, mesh, specs)
    state = jax.eval_shape(tx.init, shapes)

    def sds(x, sharding):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    params = {n: sds(shapes[n], param_sh[n]) for n in shapes}
    grads = dict(params)
    state = jax.tree_util.tree_map(sds, state, state_sh)
    loss = jax.ShapeDtypeStruct((), np.float32, sharding=NamedSharding(mesh, P()))

    def step(params, state, grads, loss):
        if opt_name == "velo":
            updates, state = tx.update(grads, state, params, loss=loss)
        else:
            updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    jitted = jax.jit(step, donate_argnums=(0, 1), out_shardings=(param_sh, state_sh))
    start = time.perf_counter()
    lowered = jitted.lower(params, state, grads, loss)
    lower_s = time.perf_counter() - start
    start, cpu_start = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    compile_cpu_s = time.process_time() - cpu_start

    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    cost = dict(cost or {})
    memory = compiled.memory_analysis()
    hlo = compiled.as_text()
    if dump_hlo is not None:
        dump_hlo.mkdir(parents=True, exist_ok=True)
        (dump_hlo / f"{tree_name or 'tree'}_{opt_name}.hlo.txt").write_text(hlo)
    shard_sizes = [int(np.prod(param_sh[n].shard_shape(x.shape))) for n, x in shapes.items()]
    local = sum(shard_sizes)  # parameter elements held by one chip
    largest_shard = max(shard_sizes)
    n_params = sum(int(np.prod(s.shape)) for s in shapes.values())
    analysis = analyse_hlo(hlo, local)
    bytes_accessed = float(cost.get("bytes accessed", float("nan")))
    bytes_accessed += analysis["pallas_bytes"]
    return {
        "optimizer": opt_name,
        "host_load": os.getloadavg()[0],  # 1-min load average after compiling
        "params": n_params,
        "tensors": len(shapes),
        "local_params": local,
        "lower_s": lower_s,
        "compile_s": compile_s,
        "compile_cpu_s": compile_cpu_s,  # all threads: less sensitive to host load
        "bytes_accessed": bytes_accessed,
        "flops": float(cost.get("flops", float("nan"))),
        "transcendentals": float(cost.get("transcendentals", float("nan"))),
        "temp_bytes": None if memory is None else int(memory.temp_size_in_bytes),
        "argument_bytes": None if memory is None else int(memory.argument_size_in_bytes),
        "output_bytes": None if memory is None else int(memory.output_size_in_bytes),
        "alias_bytes": None if memory is None else int(memory.alias_size_in_bytes),
        **analysis,
        "kernels": kernel_breakdown(hlo, largest_shard),
    }


# --------------------------------------------------------------------------
# Reading the compiled HLO


def _shape_elems(text: str) -> list[tuple[int, int]]:
    """(elements, bytes) of every array shape in an HLO type string."""
    out = []
    for dtype, dims in _SHAPE_RE.findall(text):
        n = _elements(dims)
        out.append((n, n * _DTYPE_BYTES.get(dtype, 4)))
    return out


def _elements(dims: str) -> int:
    """Elements of an HLO array type from its dims text ("512,512")."""
    return int(np.prod([int(d) for d in dims.split(",") if d] or [1]))


def _hbm_bytes(text: str) -> int:
    """Bytes of the arrays in an HLO type string that live in HBM."""
    total = 0
    for dtype, dims, lay in _TYPED_RE.findall(text):
        if lay and re.search(r"S\([1-9]\d*\)", lay):
            continue
        total += _elements(dims) * _DTYPE_BYTES.get(dtype, 4)
    return total


# `velo_pallas.LATE_COMMIT_SCOPE` (not imported: this module loads without
# velo_scale's kernels).
LATE_COMMIT_SCOPE = "velo_late_commit"


def hbm_traffic(
    hlo: str,
    parsed: tuple[list[tuple], dict[str, str]] | None = None,
    conditional: str = "min",
) -> int:
    """HBM bytes read and written by the entry computation's instructions.

    Each top-level instruction (fusion, Pallas kernel, copy, slice,
    collective...) counts its operands and results that live in HBM; arrays
    that XLA's memory-space assignment placed in VMEM (`S(1)`) do not count,
    and an async copy or slice counts its HBM side once (the source at its
    start, the destination at its done). Unlike `cost_analysis()`'s
    'bytes accessed', this neither counts the VMEM side of the staging copies
    nor is blind to Pallas custom calls; applied alike to both optimizers.
    Data-dependent work counts as the usual step (`conditional="min"`) or
    the worst one (`"max"`): a `conditional` as its cheapest or dearest
    branch, and VeLO's Pallas late-commit kernel (found by its named scope,
    `velo_pallas.LATE_COMMIT_SCOPE`), which copies its blocks in and out by
    hand only when its flag is set (the fast commit not taken, the step
    finite), as nothing or as its operands and results.
    `parsed`: `_instructions(hlo)`, when the caller has it already.
    """
    entry = re.search(r"^ENTRY\s+%?([\w.\-]+)", hlo, re.M)
    if entry is None:
        return 0
    instructions, types = parsed or _instructions(hlo)
    by_comp: dict[str, list[tuple]] = {}
    for ins in instructions:
        by_comp.setdefault(ins[0], []).append(ins)
    pick = {"min": min, "max": max}[conditional]
    free = {"parameter", "bitcast", "tuple", "get-tuple-element", "constant", "after-all"}

    def traffic(comp: str) -> int:
        total = 0
        for _, _, rtype, opcode, operands, attrs in by_comp.get(comp, []):
            if opcode in free:
                continue
            if opcode == "conditional":
                branches = re.search(r"branch_computations=\{([^}]*)\}", attrs)
                names = re.findall(r"%?([\w.\-]+)", branches.group(1)) if branches else []
                names += re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", attrs)
                total += pick(traffic(n) for n in names) if names else 0
                continue
            if opcode == "custom-call" and LATE_COMMIT_SCOPE in attrs:
                if conditional == "min":
                    continue
            if opcode.endswith("-done"):
                total += _hbm_bytes(rtype)
                continue
            if not opcode.endswith("-start"):
                total += _hbm_bytes(rtype)
            total += sum(_hbm_bytes(types.get(o, "")) for o in operands)
        return total

    return traffic(entry.group(1))


def _balanced(text: str) -> int:
    """Index just past the bracket group that opens text[0]."""
    depth = 0
    for i, ch in enumerate(text):
        depth += ch in "({["
        depth -= ch in ")}]"
        if depth == 0:
            return i + 1
    return len(text)


def _parse_instruction(line: str) -> tuple[str, str, str, list[str], str] | None:
    """(name, result type, opcode, operand names, attributes) of an HLO line."""
    m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*", line)
    if not m:
        return None
    rest = line[m.end() :]
    if rest.startswith("("):  # tuple result type
        end = _balanced(rest)
        rtype, rest = rest[:end], rest[end:].lstrip()
    else:
        rtype, _, rest = rest.partition(" ")
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    args_end = op.end() - 1 + _balanced(rest[op.end() - 1 :])
    args = rest[op.end() : args_end - 1]
    names = re.findall(r"%([\w.\-]+)", args)
    return m.group(1), rtype, op.group(1), names, rest[args_end:]


def _instructions(hlo: str) -> tuple[list[tuple], dict[str, str]]:
    """[(computation, name, result type, opcode, operand names, attributes)]
    and {name: result type} of HLO text."""
    instructions = []
    computation = None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+) .*\{\s*$", line)
        if head and " = " not in line.split("{")[0]:
            computation = head.group(1)
            continue
        parsed = _parse_instruction(line)
        if parsed is not None:
            instructions.append((computation, *parsed))
    return instructions, {name: rtype for _, name, rtype, *_ in instructions}


def kernel_breakdown(hlo: str, min_elements: int, top: int = 12) -> str:
    """The fusions that read or write an array of >= `min_elements` (e.g. the
    largest parameter's shard), grouped by result type and whether they reduce
    such an array: count, operands, and their operand + result bytes (an
    estimate of the kernel's HBM traffic; cost_analysis counts differently)."""
    instructions, types = _instructions(hlo)
    big_reduce: set[str] = set()
    for comp, _, _, opcode, operands, _ in instructions:
        if opcode == "reduce" and operands:
            if max([n for n, _ in _shape_elems(types.get(operands[0], ""))] or [0]) >= min_elements:
                big_reduce.add(comp)
    groups: dict[tuple, list[int]] = {}
    for _, _, rtype, opcode, operands, attrs in instructions:
        if opcode != "fusion":
            continue
        arrays = [rtype] + [types.get(o, "") for o in operands]
        shapes = [x for a in arrays for x in _shape_elems(a)]
        if max([n for n, _ in shapes] or [0]) < min_elements:
            continue
        calls = re.search(r"calls=%?([\w.\-]+)", attrs)
        kind = "reduction" if calls and calls.group(1) in big_reduce else "elementwise"
        result = re.sub(r"\{[^}]*\}|/\*index=\d+\*/", "", rtype)
        key = (kind, result if len(result) < 70 else result[:67] + "...")
        entry = groups.setdefault(key, [0, 0, 0])
        entry[0] += 1
        entry[1] += len(operands)
        entry[2] += sum(b for _, b in shapes)
    lines = [
        f"Kernels touching >= {min_elements:,} elements (largest parameter shard):",
        "",
        "| kernels | kind | result | operands each | operand + result MB |",
        "|---|---|---|---|---|",
    ]
    for (kind, result), (count, n_ops, nbytes) in sorted(
        groups.items(), key=lambda kv: -kv[1][2]
    )[:top]:
        lines.append(
            f"| {count} | {kind} | `{result}` | {n_ops / count:.0f} | {nbytes / 1e6:.1f} |"
        )
    total = sum(v[2] for v in groups.values())
    lines.append(f"| {sum(v[0] for v in groups.values())} | all | | | {total / 1e6:.1f} |")
    return "\n".join(lines)


def analyse_hlo(hlo: str, local_params: int) -> dict[str, Any]:
    """Collectives, fusions, passes over the parameters and Pallas calls.

    Passes are element-weighted: each fusion (an XLA kernel) counts the
    elements of the largest array it reads or writes, and the sum is divided
    by `local_params` (the parameter elements on one chip); so one elementwise
    kernel per parameter tensor is 1.0 pass, whether tensors are separate or
    stacked. Reduction passes count, the same way, the largest operand of the
    reduces inside each fusion.
    """
    instructions, types = _instructions(hlo)

    def elems(rtype: str) -> list[int]:
        return [n for n, _ in _shape_elems(rtype)]

    def nbytes(rtype: str) -> int:
        return sum(b for _, b in _shape_elems(rtype))

    collectives: dict[str, list[int]] = {k: [] for k in COLLECTIVES}
    fusion_kinds: dict[str, int] = {}
    reduce_elems: dict[str, int] = {}  # fused computation -> largest reduce input
    fusion_calls: list[tuple[str, int]] = []  # (called computation, largest array)
    pallas_calls = pallas_bytes = whiles = 0
    for comp, _, rtype, opcode, operands, attrs in instructions:
        base = opcode.removesuffix("-start")
        if base in COLLECTIVES:
            sizes = elems(rtype)
            if opcode.endswith("-start") and base != "all-reduce" and len(sizes) > 1:
                sizes = sizes[len(sizes) // 2 :]  # (operands..., results...)
            collectives[base].append(max(sizes or [0]))
        elif opcode == "reduce" and comp is not None and operands:
            n = max(elems(types.get(operands[0], "")) or [0])
            reduce_elems[comp] = max(reduce_elems.get(comp, 0), n)
        elif opcode == "fusion":
            kind = re.search(r"kind=(k\w+)", attrs)
            key = kind.group(1) if kind else "?"
            fusion_kinds[key] = fusion_kinds.get(key, 0) + 1
            calls = re.search(r"calls=%?([\w.\-]+)", attrs)
            sizes = elems(rtype) + [n for o in operands for n in elems(types.get(o, ""))]
            fusion_calls.append((calls.group(1) if calls else "", max(sizes or [0])))
        elif opcode == "while":
            whiles += 1
        elif opcode == "custom-call" and "tpu_custom_call" in attrs:
            pallas_calls += 1
            pallas_bytes += nbytes(rtype) + sum(nbytes(types.get(o, "")) for o in operands)
    passes = sum(n for _, n in fusion_calls) / max(local_params, 1)
    reductions = sum(reduce_elems.get(c, 0) for c, _ in fusion_calls) / max(local_params, 1)
    largest = max(
        ((k, n) for k, sizes in collectives.items() for n in sizes),
        key=lambda kn: kn[1],
        default=(None, 0),
    )
    return {
        "collectives": {k: len(v) for k, v in collectives.items()},
        "collective_sizes": {k: sorted(v, reverse=True)[:8] for k, v in collectives.items()},
        "largest_collective": {"kind": largest[0], "elements": largest[1]},
        "fusions": len(fusion_calls),
        "fusion_kinds": fusion_kinds,
        "param_passes": passes,
        "reduction_passes": reductions,
        "while_loops": whiles,
        "pallas_calls": pallas_calls,
        "pallas_bytes": pallas_bytes,
        "hbm_bytes": hbm_traffic(hlo, (instructions, types)),
        "hbm_bytes_worst": hbm_traffic(hlo, (instructions, types), "max"),
    }


# --------------------------------------------------------------------------
# Output


def versions() -> dict[str, str]:
    import jax

    from importlib.metadata import PackageNotFoundError, version

    out = {"jax": jax.__version__, "python": platform.python_version()}
    try:
        out["libtpu"] = version("libtpu")
    except PackageNotFoundError:
        out["libtpu"] = "?"
    try:
        out["jax_cuda12_plugin"] = version("jax-cuda12-plugin")
    except PackageNotFoundError:
        pass
    try:
        import optax

        out["optax"] = optax.__version__
    except Exception:  # noqa: BLE001
        pass
    import velo_scale

    root = Path(velo_scale.__file__).resolve().parent.parent
    try:
        out["velo_scale_commit"] = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "velo_scale"],
            capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        if dirty:
            out["velo_scale_commit"] += "+dirty"
    except Exception:  # noqa: BLE001
        out["velo_scale_commit"] = f"(not a git checkout: {root})"
    return out


def _per(x: float | None, n: int) -> float | None:
    return None if x is None or n == 0 else x / n


def _f(x: float | None, spec: str = ".1f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return "n/a"
    return f"{a / b:.1f}x"


def _collective(r: dict) -> str:
    c = r["largest_collective"]
    if not c["kind"]:
        return "none"
    return f"{c['kind']} {c['elements']:,} ({r['collectives'][c['kind']]} ops)"


def markdown_tables(rows: list[dict[str, dict]]) -> str:
    lines = [
        "| tree | params | tensors | bytes acc./param VeLO vs AdamW | HBM "
        "bytes/param VeLO vs AdamW | flops/param "
        "VeLO vs AdamW | temp B/param VeLO / AdamW | compile s VeLO vs AdamW "
        "(CPU s) | largest collective VeLO / AdamW |",
        "|" + "---|" * 9,
    ]
    for row in rows:
        v, a = row.get("velo"), row.get("adamw")
        any_ = v or a
        n = any_["local_params"]

        def pp(r, key):
            return None if r is None else _per(r.get(key), n)

        def cell(key, spec=".1f"):
            vv, aa = pp(v, key), pp(a, key)
            return f"{_f(vv, spec)} vs {_f(aa, spec)} = {_ratio(vv, aa)}"

        hbm_cell = cell("hbm_bytes")
        worst = pp(v, "hbm_bytes_worst")
        if worst is not None and worst != pp(v, "hbm_bytes"):
            hbm_cell += f" (worst step {_f(worst)})"
        compile_cell = (
            f"{_f(v and v['compile_s'])} vs {_f(a and a['compile_s'])} = "
            f"{_ratio(v and v['compile_s'], a and a['compile_s'])} "
            f"({_f(v and v.get('compile_cpu_s'))} vs {_f(a and a.get('compile_cpu_s'))}"
            f" = {_ratio(v and v.get('compile_cpu_s'), a and a.get('compile_cpu_s'))})"
        )
        lines.append(
            f"| {any_['tree']} | {any_['params']:,} | {any_['tensors']} "
            f"| {cell('bytes_accessed')} | {hbm_cell} | {cell('flops')} "
            f"| {_f(pp(v, 'temp_bytes'))} / {_f(pp(a, 'temp_bytes'))} "
            f"| {compile_cell} "
            f"| {_collective(v) if v else 'n/a'} / {_collective(a) if a else 'n/a'} |"
        )
    lines += [
        "",
        "| tree | optimizer | lower s | fusions (kinds) | passes over the params "
        "(of which reductions) | while loops "
        "| all-reduces (largest 8, elements) | all-gather / reduce-scatter / "
        "all-to-all / permute | Pallas calls |",
        "|" + "---|" * 9,
    ]
    for row in rows:
        for opt in ("velo", "adamw"):
            r = row.get(opt)
            if r is None:
                continue
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(r["fusion_kinds"].items()))
            others = " / ".join(
                str(r["collectives"][k]) for k in COLLECTIVES if k != "all-reduce"
            )
            lines.append(
                f"| {r['tree']} | {opt} | {r['lower_s']:.1f} | {r['fusions']} ({kinds}) "
                f"| {r['param_passes']:.1f} ({r['reduction_passes']:.1f}) "
                f"| {r['while_loops']} "
                f"| {r['collectives']['all-reduce']} "
                f"({', '.join(map(str, r['collective_sizes']['all-reduce']))}) "
                f"| {others} | {r['pallas_calls']} |"
            )
    return "\n".join(lines)


def depth_table(rows: list[dict[str, dict]]) -> str | None:
    sweep = [r for r in rows if tree_layers((r.get("velo") or r["adamw"])["tree"])
             and (r.get("velo") or r["adamw"])["tree"].startswith("transformer")]  # fmt: skip
    if len(sweep) < 2:
        return None
    sweep.sort(key=lambda r: tree_layers((r.get("velo") or r["adamw"])["tree"]))
    lines = [
        "| blocks | tensors | params | VeLO compile s (CPU s) | AdamW compile s "
        "(CPU s) | ratio (CPU) | VeLO lower s | VeLO bytes acc./param "
        "| VeLO temp B/param | host load |",
        "|" + "---|" * 10,
    ]
    for row in sweep:
        v, a = row.get("velo"), row.get("adamw")
        r = v or a
        n = r["local_params"]
        lines.append(
            f"| {tree_layers(r['tree'])} | {r['tensors']} | {r['params']:,} "
            f"| {_f(v and v['compile_s'])} ({_f(v and v.get('compile_cpu_s'))}) "
            f"| {_f(a and a['compile_s'])} ({_f(a and a.get('compile_cpu_s'))}) "
            f"| {_ratio(v and v['compile_s'], a and a['compile_s'])} "
            f"({_ratio(v and v.get('compile_cpu_s'), a and a.get('compile_cpu_s'))}) "
            f"| {_f(v and v['lower_s'])} | {_f(v and _per(v['bytes_accessed'], n))} "
            f"| {_f(v and _per(v['temp_bytes'], n))} | {_f(r.get('host_load'))} |"
        )
    return "\n".join(lines)


def fit_cost_model(rows: list[dict[str, dict]]) -> str:
    """Least squares: cost = c0 + c_tensor * n_tensors + c_param * n_local_params."""
    lines = [
        "App. B.7 cost model, per chip: cost = c0 + c_tensor * n_tensors + "
        "c_param * n_params (n_params: parameter elements on one chip); "
        "least squares of the relative residuals over the trees above.",
        "",
        "| optimizer | quantity | c0 | c_tensor | c_param | points | max rel. residual |",
        "|" + "---|" * 7,
    ]
    for opt in ("velo", "adamw"):
        runs = [row[opt] for row in rows if opt in row]
        if len(runs) < 3:
            lines.append(f"| {opt} | (needs >= 3 trees, have {len(runs)}) | | | | | |")
            continue
        x = np.array([[1.0, r["tensors"], r["local_params"]] for r in runs])
        for key, unit in (
            ("bytes_accessed", "bytes"),
            ("hbm_bytes", "bytes"),
            ("flops", "flops"),
            ("temp_bytes", "bytes"),
            ("compile_s", "s"),
            ("compile_cpu_s", "CPU s"),
        ):
            if any(r.get(key) is None for r in runs):
                continue
            y = np.array([float(r[key]) for r in runs])
            if not y.any():
                coef = np.zeros(3)
            else:  # relative residuals: the trees span 1M to 250M params
                w = 1.0 / np.maximum(np.abs(y), 1e-12)
                coef, *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
            resid = np.abs(x @ coef - y) / np.maximum(np.abs(y), 1e-12)
            lines.append(
                f"| {opt} | {key} ({unit}) | {coef[0]:.4g} | {coef[1]:.4g} "
                f"| {coef[2]:.4g} | {len(runs)} | {resid.max():.0%} |"
            )
    return "\n".join(lines)


def targets_table(rows: list[dict[str, dict]]) -> str | None:
    """Issue 13's TPU targets, for the trees measured with both optimizers."""
    both = {r["velo"]["tree"]: r for r in rows if "velo" in r and "adamw" in r}
    if not both:
        return None
    lines = ["| target | tree | measured | status |", "|---|---|---|---|"]

    def add(target, tree, value, limit, unit="x"):
        if math.isnan(value):  # no cost_analysis (GPU targets)
            return
        ok = value <= limit
        lines.append(
            f"| {target} | {tree} | {value:.1f}{unit} | {'met' if ok else '**missed**'} |"
        )

    for tree in ("10m", "transformer"):
        if tree not in both:
            continue
        v, a = both[tree]["velo"], both[tree]["adamw"]
        add("bytes accessed <= 2.5x AdamW", tree, v["bytes_accessed"] / a["bytes_accessed"], 2.5)
        if v.get("hbm_bytes") and a.get("hbm_bytes"):
            add("(HBM bytes <= 2.5x AdamW)", tree, v["hbm_bytes"] / a["hbm_bytes"], 2.5)
        add("temp <= 4 B/param", tree, v["temp_bytes"] / v["local_params"], 4.0, " B/param")
    for tree, row in both.items():
        v, a = row["velo"], row["adamw"]
        if tree in ("10m", "transformer") or tree.startswith("transformer_L"):
            add("compile <= 5x AdamW (wall)", tree, v["compile_s"] / a["compile_s"], 5.0)
            if v.get("compile_cpu_s") and a.get("compile_cpu_s"):
                add(
                    "compile <= 5x AdamW (CPU s)",
                    tree,
                    v["compile_cpu_s"] / a["compile_cpu_s"],
                    5.0,
                )
    sweep = sorted(
        (tree_layers(t), r["velo"]) for t, r in both.items() if t.startswith("transformer")
    )
    if len(sweep) >= 2 and sweep[0][1].get("compile_cpu_s"):
        (d0, v0), (d1, v1) = sweep[0], sweep[-1]
        lines.append(
            f"| compile flat in depth | {d0} -> {d1} blocks | VeLO CPU s x"
            f"{v1['compile_cpu_s'] / v0['compile_cpu_s']:.1f} for x{d1 / d0:.0f} "
            "depth | see the sweep |"
        )
    return "\n".join(lines)


def print_report(payload: dict, fit: bool, kernels: bool = False) -> None:
    rows = payload["results"]
    meta = payload["meta"]
    gpu = is_gpu_topology(meta["topology"])
    backend = (
        f"jax-cuda12-plugin {meta['versions'].get('jax_cuda12_plugin', '?')}"
        if gpu
        else f"libtpu {meta['versions']['libtpu']}"
    )
    print(
        f"{'GPU' if gpu else 'TPU'} AOT: topology {meta['topology']} ({meta['devices']} "
        f"{'GPUs' if gpu else 'chips'}, mesh "
        f"fsdp x tensor = {meta['mesh']}), VeLO {meta.get('implementation', 'xla')}, "
        f"jax {meta['versions']['jax']}, "
        f"{backend}, velo_scale "
        f"{meta['versions'].get('velo_scale_commit')}, {meta['date']}, host "
        f"{meta['host']}. Per chip; /param = per parameter element held by one chip."
    )
    if any((r.get(o) or {}).get("pallas_calls") for r in rows for o in ("velo", "adamw")):
        print(
            "Pallas custom calls present: cost_analysis() counts 0 bytes for them; "
            "their operand + result bytes from the HLO are added to bytes accessed."
        )
    print()
    print(markdown_tables(rows))
    depth = depth_table(rows)
    if depth:
        print("\nDepth sweep (transformer-like tree, unscanned):\n")
        print(depth)
    if kernels:
        for row in rows:
            for opt, r in row.items():
                if r.get("kernels"):
                    print(f"\n{r['tree']}, {opt}. {r['kernels']}")
    targets = targets_table(rows)
    if targets:
        print(f"\nIssue 13 targets ({'GPU compile' if gpu else 'TPU'}):\n")
        print(targets)
    if fit:
        print()
        print(fit_cost_model(rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5e:2x2")
    parser.add_argument(
        "--implementation",
        default="xla",
        help="VeLO's per-parameter passes: xla (XLA fusions) or pallas (Pallas TPU "
        "kernels, in shard_map on a mesh); a list (pallas,xla) compiles each in the "
        "same process against the same AdamW compile and reports each",
    )
    parser.add_argument(
        "--no-skip-nonfinite",
        action="store_true",
        help="compile VeLO with skip_nonfinite=False",
    )
    parser.add_argument(
        "--devices", type=int, default=None, help="use only the first N devices"
    )
    parser.add_argument("--mesh", default=None, help="FSDPxTP, e.g. 2x2 (default: near-square)")
    parser.add_argument("--trees", default="10m,transformer,depth")
    parser.add_argument("--optimizers", default="velo,adamw")
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--fit", action="store_true", help="fit the App. B.7 cost model")
    parser.add_argument("--from-json", default=None, help="report (and fit) saved runs")
    parser.add_argument("--dump-hlo", default=None, help="write each compiled HLO here")
    parser.add_argument(
        "--kernels", action="store_true", help="print the kernels over the largest tensor"
    )
    args = parser.parse_args(argv)

    if args.from_json:
        payloads = [json.loads(Path(p).read_text()) for p in args.from_json.split(",")]
        payload = payloads[0]
        seen = {}
        for p in payloads:
            for row in p["results"]:
                seen[(row.get("velo") or row["adamw"])["tree"]] = row
        payload["results"] = list(seen.values())
        print_report(payload, args.fit, args.kernels)
        return

    generation = args.topology.split(":")[0]
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", _ACCELERATOR_TYPES.get(generation, "v5litepod-4"))
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # Any jax process of this venv that starts the TPU backend holds libtpu's
    # machine-wide lockfile; compiling ahead of time does not need it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    mesh_shape = None
    if is_gpu_topology(args.topology):
        # The CUDA plugin compiles without a GPU when jax runs on the CPU
        # backend and skips its check of the (absent) driver.
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    if args.mesh:
        try:
            mesh_shape = tuple(int(x) for x in args.mesh.lower().split("x"))
            assert len(mesh_shape) == 2
        except (ValueError, AssertionError):
            parser.error(f"--mesh must look like 2x2 (fsdp x tensor); got {args.mesh!r}")
    try:
        trees = expand_trees(args.trees)
    except ValueError as e:
        parser.error(str(e))
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    for o in optimizers:
        if o not in ("velo", "adamw"):
            parser.error(f"--optimizers: unknown {o!r}; choose from velo, adamw")

    implementations = [i.strip() for i in args.implementation.split(",") if i.strip()]
    for i in implementations:
        if i not in ("xla", "pallas"):
            parser.error(f"--implementation: unknown {i!r}; choose from xla, pallas")

    mesh = make_mesh(args.topology, mesh_shape, args.devices)
    meta = {
        "topology": args.topology,
        "devices": int(mesh.devices.size),
        "mesh": "x".join(str(s) for s in mesh.devices.shape),
        "implementation": args.implementation,
        "skip_nonfinite": not args.no_skip_nonfinite,
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.1f} at start",
    }
    payloads = {
        impl: {"meta": {**meta, "implementation": impl}, "results": []}
        for impl in implementations
    }

    def json_path(impl):
        path = Path(args.json_path)
        if len(implementations) == 1:
            return path
        return path.with_suffix(f".{impl}{path.suffix}")

    for tree_name in trees:
        tree = build_tree(tree_name)
        rows = {impl: {} for impl in implementations}
        for opt in optimizers:
            # AdamW once per tree; VeLO once per implementation.
            for impl in implementations if opt == "velo" else implementations[:1]:
                dump = Path(args.dump_hlo) / impl if args.dump_hlo else None
                result = compile_step(
                    opt, tree, mesh, dump, tree_name, impl, not args.no_skip_nonfinite
                )
                result["tree"] = tree_name
                result["implementation"] = impl if opt == "velo" else None
                for target in implementations if opt == "adamw" else [impl]:
                    rows[target][opt] = result
                label = f"{opt} [{impl}]" if opt == "velo" else opt
                print(
                    f"  {tree_name} {label}: compile {result['compile_s']:.1f} s "
                    f"(CPU {result['compile_cpu_s']:.1f} s, lower "
                    f"{result['lower_s']:.1f} s, load {result['host_load']:.1f})",
                    file=sys.stderr,
                    flush=True,
                )
        for impl in implementations:
            payloads[impl]["results"].append(rows[impl])
            if args.json_path:  # partial results survive an interrupted sweep
                json_path(impl).write_text(json.dumps(payloads[impl], indent=1) + "\n")
    for k, impl in enumerate(implementations):
        if k:
            print()
        if len(implementations) > 1:
            print(f"## VeLO implementation: {impl}\n")
        print_report(payloads[impl], args.fit, args.kernels)


if __name__ == "__main__":
    main()
