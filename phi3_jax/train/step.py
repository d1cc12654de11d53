"""The jitted train step: explicit state in, new state out (donated), on one device or a mesh.

The model is the serving model (`Phi3ForCausalLM`, optionally with LoRA projections and per-layer
rematerialisation), split once into a graphdef and parameter pytrees. Parameters come in two
groups:

- trainable: the whole model (full fine-tuning) or the LoRA factors, held as fp32 master
  weights; the optimizer state follows them, so it is fp32 too;
- frozen: nothing, or the LoRA base weights, held in the compute dtype and never updated.

Each step casts the trainable copy to the compute dtype (bf16 training with fp32 master weights,
or fp32 throughout), so the gradient flows back through the cast into fp32.

Sharding (FSDP + tensor parallelism): every parameter keeps its tensor-parallel layout from the
logical-axis rules over `model`, and its largest remaining dimension that `data` divides is also
split over `data`; optimizer moments mirror their parameter. The batch is split over `data`.
XLA inserts the all-gathers and reduce-scatters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from phi3_jax import sharding
from phi3_jax.attention import Kernels
from phi3_jax.config import Phi3Config
from phi3_jax.hooks import Hook
from phi3_jax.model import Phi3ForCausalLM
from phi3_jax.quantize import Quantization
from phi3_jax.train.lora import LoRAConfig, LoRAParam, add_lora
from phi3_jax.train.loss import head_loss_sum

Params = dict  # a pure dict of arrays, nnx.State.to_pure_dict() shaped


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # [] int32: optimizer steps taken
    params: Params  # trainable parameters, fp32 master weights
    opt_state: Any  # optax state, fp32
    rng: jax.Array  # [2] uint32 raw key; split every step (for stochastic extensions)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the train step needs to rebuild the model: its graph and how to feed it."""

    graphdef: nnx.GraphDef
    compute_dtype: jnp.dtype
    lora: LoRAConfig | None

    def module(self, trainable: Params, frozen: Params | None) -> Phi3ForCausalLM:
        if self.lora is None:
            return nnx.merge(self.graphdef, trainable)
        return nnx.merge(self.graphdef, trainable, frozen)


def build_model_spec(config: Phi3Config, compute_dtype: jnp.dtype, *, remat: bool = False,
                     lora: LoRAConfig | None = None, seed: int = 0,
                     kernels: Kernels | None = None,
                     quantization: Quantization | None = None,
                     ) -> tuple[ModelSpec, nnx.State, nnx.State | None]:
    """(spec, abstract trainable state, abstract frozen state or None); allocates nothing.

    The abstract states are nnx.State of Variables (with their logical_axes metadata).
    `kernels`: the attention computations (default: choose_kernels("auto", compute_dtype)).
    `quantization`: QLoRA, the frozen base's weights quantized (phi3_jax.quantize)."""
    graphdef, trainable, frozen = _split(nnx.eval_shape(_builder(
        config, compute_dtype, remat, lora, seed, kernels, quantization)), lora)
    return ModelSpec(graphdef, jnp.dtype(compute_dtype), lora), trainable, frozen


def init_lora_params(config: Phi3Config, lora: LoRAConfig, seed: int,
                     shardings: Params | None = None) -> Params:
    """Freshly initialised LoRA factors (fp32; B = 0), placed with `shardings` if given.

    The adapters are built on an abstract base model: only the small factors are allocated."""
    model = nnx.eval_shape(_builder(config, jnp.float32, False, None, seed, None))
    _, trainable, _ = _split(add_lora(model, lora, seed), lora)
    params = trainable.to_pure_dict()
    return jax.device_put(params, shardings) if shardings is not None else params


def _builder(config, dtype, remat, lora, seed, kernels,
             quantization=None) -> Callable[[], Phi3ForCausalLM]:
    def make():
        model = Phi3ForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(seed), remat=remat,
                                kernels=kernels, quantization=quantization)
        return add_lora(model, lora, seed) if lora is not None else model
    return make


def _split(model, lora):
    if lora is None:
        graphdef, params = nnx.split(model, nnx.Param)
        return graphdef, params, None
    return nnx.split(model, LoRAParam, nnx.Param)


# ---- sharding ----

def add_fsdp(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """`spec` plus `data` on the largest dimension it leaves free and `data` divides."""
    out = list(spec) + [None] * (len(shape) - len(spec))
    n = sharding.axis_size(mesh, "data")
    if n > 1 and "data" not in out:
        free = [i for i, (s, size) in enumerate(zip(out, shape, strict=True))
                if s is None and size % n == 0]
        if free:
            out[max(free, key=lambda i: shape[i])] = "data"
    return PartitionSpec(*out)


def state_shardings(abstract: nnx.State, mesh: Mesh) -> Params:
    """A NamedSharding per parameter (pure dict): the tensor-parallel rules, plus FSDP."""
    tp = sharding.param_shardings(abstract, mesh)
    out: Params = {}
    for path, var in nnx.to_flat_state(abstract):
        node, spec = out, tp
        for key in path[:-1]:
            node = node.setdefault(key, {})
        for key in path:
            spec = spec[key]
        node[path[-1]] = NamedSharding(mesh, add_fsdp(spec.spec, var.shape, mesh))
    return out


def train_state_shardings(optimizer: optax.GradientTransformation, abstract_params: Params,
                          param_shardings: Params, mesh: Mesh) -> TrainState:
    """Shardings for a TrainState: optimizer moments mirror their parameter; scalars replicate."""
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    opt = optax.tree_utils.tree_map_params(
        optimizer, lambda _, s: s, abstract_opt, param_shardings,
        transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=param_shardings, opt_state=opt, rng=replicated)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are [A (micro-batches), B, T]: B is split over `data`."""
    return NamedSharding(mesh, PartitionSpec(None, "data", None))


# ---- state and step ----

def init_train_state(optimizer: optax.GradientTransformation, params: Params, seed: int,
                     shardings: TrainState | None = None, donate: bool = False) -> TrainState:
    """Step 0: fp32 master params, fresh optimizer state, the seed's key.

    With `donate`, `params` is consumed (its buffers may be reused for the fp32 copy)."""
    def init(params):
        params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params),
                          rng=jax.random.key_data(jax.random.key(seed)))

    return jax.jit(init, out_shardings=shardings, donate_argnums=0 if donate else ())(params)


def make_loss_fn(spec: ModelSpec) -> Callable:
    """(trainable, frozen, batch) -> (token-loss sum, target-token count).

    Rows are right-padded: row b holds positions 0..n_b-1 at its first n_b slots, then -1 (what
    phi3_jax.train.data makes). Declaring that layout (`prefill_lengths`) lets attention take
    the causal kernels the prompt prefill uses: cuDNN's fused attention on GPUs in bf16/fp16,
    the blocked attention with its flash backward pass elsewhere from 512 tokens, so no
    [B, N, T, T] scores are stored for the backward pass. The head and loss go a chunk of
    positions at a time (head_loss_sum), so no [B, T, V] logits are stored either.
    `hooks` (phi3_jax.hooks) act in the forward pass, and so in the gradient.
    """
    def loss_fn(trainable: Params, frozen: Params | None, batch: dict,
                hooks: dict[str, Hook] | None = None) -> tuple[jax.Array, Any]:
        cast = jax.tree.map(lambda p: p.astype(spec.compute_dtype), trainable)
        model = spec.module(cast, frozen)
        positions = batch["positions"]
        lengths = jnp.sum(positions >= 0, axis=1, dtype=jnp.int32)
        x, _ = model.hidden_states(batch["input_ids"], positions, prefill_lengths=lengths,
                                   hooks=hooks)  # [B, T, D]
        return head_loss_sum(x, model.head.attend, batch["labels"])

    return loss_fn


def all_finite(tree: Any) -> jax.Array:
    """[] bool: no NaN or inf in any floating-point leaf. One reduction per leaf, inside the
    caller's jit, where XLA fuses it with the computation of the leaf: no extra host pass."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(spec: ModelSpec, optimizer: optax.GradientTransformation,
                    lr_schedule: optax.Schedule | None = None,
                    shardings: TrainState | None = None) -> Callable:
    """The jitted step: (state, frozen, batch, hooks=None) -> (state, metrics). `state` is
    donated; `hooks` (phi3_jax.hooks, e.g. a steering vector held fixed while fine-tuning) are
    traced, so new values compile nothing.

    batch: input_ids, labels, positions, each [A, B, T] int32 (A micro-batches, accumulated).
    Rows are right-padded: positions 0..n-1 at a row's first n slots, then -1, as
    phi3_jax.train.data makes them; the causal attention kernels rely on that layout.
    metrics: loss (mean over the step's target tokens), tokens, grad_norm (before clipping),
    learning_rate, finite, update_finite. A step that is not finite changes nothing: the state
    comes back as it went in, and the caller decides to stop. Finite means the loss and the
    gradient norm, and also every value the step would save, the new parameters and optimizer
    state: a finite gradient times an infinite learning rate is not (update_finite tells the
    two cases apart).
    """
    grad_fn = jax.value_and_grad(make_loss_fn(spec), has_aux=True)

    def step(state: TrainState, frozen: Params | None, batch: dict,
             hooks: dict[str, Hook] | None = None):
        def micro(carry, mb):
            grads, total, count = carry
            (loss_sum, n), g = grad_fn(state.params, frozen, mb, hooks)
            grads = jax.tree.map(jnp.add, grads, g)
            return (grads, total + loss_sum, count + n), None

        if batch["input_ids"].shape[0] == 1:  # no accumulation: no fp32 gradient buffer
            (total, count), grads = grad_fn(state.params, frozen,
                                            jax.tree.map(lambda x: x[0], batch), hooks)
        else:
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
            (grads, total, count), _ = jax.lax.scan(micro, init, batch)
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = total / denom
        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state,
                         rng=jax.random.key_data(jax.random.split(
                             jax.random.wrap_key_data(state.rng))[0]))
        update_finite = all_finite((new.params, new.opt_state))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & update_finite
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        metrics = {"loss": loss, "tokens": count, "grad_norm": grad_norm, "finite": finite,
                   "update_finite": update_finite,
                   "learning_rate": (lr_schedule(state.step) if lr_schedule is not None
                                     else jnp.zeros((), jnp.float32))}
        return new, metrics

    if shardings is None:
        return jax.jit(step, donate_argnums=0)
    return jax.jit(step, donate_argnums=0, out_shardings=(shardings, None))
