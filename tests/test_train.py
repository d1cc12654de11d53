"""The train step: accumulation, remat, bf16 masters, LoRA, NaN guard, and sharded == unsharded.

References are independent formulations: one big batch for accumulation, the plain forward for
remat, the explicitly merged weight W + (alpha/r) A B (autodiff through the merge) for LoRA, and
the single-device step for the sharded one. fp32 throughout except where bf16 is the subject.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from phi3_jax import sharding
from phi3_jax.config import Phi3Config
from phi3_jax.model import Phi3ForCausalLM
from phi3_jax.train.lora import LoRAConfig, merge_lora
from phi3_jax.train.loss import IGNORE
from phi3_jax.train.optim import OptimConfig, make_optimizer
from phi3_jax.train.step import (
    batch_sharding,
    build_model_spec,
    init_lora_params,
    init_train_state,
    make_loss_fn,
    make_train_step,
    state_shardings,
    train_state_shardings,
)

CONFIG = Phi3Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128,
                    eos_token_id=(2,))
OPTIM = OptimConfig(learning_rate=1e-2, total_steps=10, warmup_steps=2, weight_decay=0.1)


@functools.cache
def _base_params():
    make = jax.jit(lambda: nnx.split(Phi3ForCausalLM(CONFIG, rngs=nnx.Rngs(0)),
                                     nnx.Param)[1].to_pure_dict())
    return jax.device_get(make())


def base_params():
    return jax.tree.map(jnp.asarray, _base_params())


def make_batch(A, B, T, seed=0, vocab=96):
    rs = np.random.RandomState(seed)
    ids = rs.randint(0, vocab, (A * B, T)).astype(np.int32)
    lengths = rs.randint(T // 2, T + 1, A * B)
    pos = np.where(np.arange(T)[None] < lengths[:, None], np.arange(T)[None], -1)
    labels = np.where((pos >= 0) & (np.arange(T)[None] >= 3), ids, IGNORE)
    return {k: v.reshape(A, B, T).astype(np.int32)
            for k, v in {"input_ids": ids, "labels": labels, "positions": pos}.items()}


# SGD where parameters are compared: its update is linear in the gradient, so a tolerance on
# the weights is a tolerance on the gradient. Adam's first steps are ~lr * sign(g), which turns
# fp32 summation-order noise in near-zero gradients into O(lr * 1e-4) weight differences.
SGD = optax.sgd(0.5)


def run_steps(batches, *, lora=None, remat=False, dtype=jnp.float32, mesh=None, seed=0,
              optimizer=SGD):
    spec, abstract, abstract_frozen = build_model_spec(CONFIG, dtype, remat=remat, lora=lora)
    shardings = frozen = state_sh = None
    if lora is None:
        params = base_params()
    else:
        frozen = jax.tree.map(lambda p: p.astype(dtype), base_params())
    if mesh is not None:
        shardings = state_shardings(abstract, mesh)
        if lora is None:
            params = jax.device_put(params, shardings)
        else:
            frozen = jax.device_put(frozen, state_shardings(abstract_frozen, mesh))
        fp32 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32),
                            abstract.to_pure_dict())
        state_sh = train_state_shardings(optimizer, fp32, shardings, mesh)
    if lora is not None:
        params = init_lora_params(CONFIG, lora, seed, shardings)
    state = init_train_state(optimizer, params, seed, state_sh)
    step = make_train_step(spec, optimizer, None, state_sh)
    metrics = []
    for batch in batches:
        if mesh is not None:
            batch = jax.device_put(batch, batch_sharding(mesh))
        state, m = step(state, frozen, batch)
        metrics.append(jax.device_get(m))
    return state, frozen, metrics


def assert_trees_close(a, b, rtol, atol=0.0):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b),
                            strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


def test_gradient_accumulation_equals_the_full_batch():
    """Two micro-batches of 2 rows == one batch of 4 rows: same loss, same updated weights.

    The token-weighted mean is exact (sum, then one division), so only summation order differs.
    """
    big = [make_batch(1, 4, 16, seed=s) for s in range(2)]
    split = [{k: v.reshape(2, 2, 16) for k, v in b.items()} for b in big]
    s1, _, m1 = run_steps(big)
    s2, _, m2 = run_steps(split)
    for a, b in zip(m1, m2, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
        assert a["tokens"] == b["tokens"]
    assert_trees_close(s1.params, s2.params, rtol=1e-5, atol=1e-7)


def test_loss_decreases_and_remat_changes_nothing():
    batches = [make_batch(1, 4, 16, seed=0)] * 6
    state, _, metrics = run_steps(batches)
    losses = [float(m["loss"]) for m in metrics]
    assert losses[-1] < losses[0] - 0.1, losses  # a repeated batch: memorising
    remat_state, _, remat_metrics = run_steps(batches, remat=True)
    np.testing.assert_allclose([float(m["loss"]) for m in remat_metrics], losses, rtol=1e-6)
    assert_trees_close(remat_state.params, state.params, rtol=1e-5, atol=1e-7)


def test_bf16_compute_keeps_fp32_masters_and_optimizer_state():
    batches = [make_batch(1, 4, 16, seed=0)] * 3
    adamw = make_optimizer(OPTIM)
    state, _, metrics = run_steps(batches, dtype=jnp.bfloat16, optimizer=adamw)
    _, _, ref_metrics = run_steps(batches, optimizer=adamw)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.opt_state)
               if jnp.issubdtype(x.dtype, jnp.floating))
    # bf16 activations: ~3 significant digits on a loss of ~4.6
    np.testing.assert_allclose([m["loss"] for m in metrics], [m["loss"] for m in ref_metrics],
                               rtol=2e-2)


def _lora_forward_pieces(lora):
    """(spec, base params, lora params, batch) with non-zero B so the adapters matter."""
    spec, _, _ = build_model_spec(CONFIG, jnp.float32, lora=lora)
    base = base_params()
    adapters = init_lora_params(CONFIG, lora, seed=1)
    key = jax.random.key(7)
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: (0.05 * jax.random.normal(jax.random.fold_in(key, hash(str(p)) % 2**31),
                                               x.shape) if str(p[-1]) == "['lora_b']" else x),
        adapters)
    batch = {k: jnp.asarray(v[0]) for k, v in make_batch(1, 3, 16, seed=3).items()}
    return spec, base, adapters, batch


def test_lora_starts_at_the_base_and_merges_exactly():
    lora = LoRAConfig(rank=4, alpha=8.0, targets=("qkv_proj", "o_proj", "gate_up_proj",
                                                  "down_proj"))
    spec, base, adapters, batch = _lora_forward_pieces(lora)
    plain_spec, _, _ = build_model_spec(CONFIG, jnp.float32)
    fresh = init_lora_params(CONFIG, lora, seed=1)

    def logits(spec, trainable, frozen):
        forward = jax.jit(lambda t, f: spec.module(t, f)(batch["input_ids"],
                                                         batch["positions"])[0])
        return forward(trainable, frozen)

    # B = 0 at initialisation: the adapted model is the base model.
    np.testing.assert_array_equal(logits(spec, fresh, base), logits(plain_spec, base, None))
    # Merged W + (alpha/r) A B in the plain model == the adapters beside the frozen weights.
    merged = merge_lora(jax.device_get(base), jax.device_get(adapters), lora)
    unmerged = logits(spec, adapters, base)
    assert float(jnp.max(jnp.abs(unmerged - logits(plain_spec, base, None)))) > 1e-2
    np.testing.assert_allclose(logits(plain_spec, merged, None), unmerged, rtol=1e-5, atol=1e-5)


def test_lora_gradients_equal_autodiff_through_the_merged_weight():
    lora = LoRAConfig(rank=4, alpha=8.0, targets=("qkv_proj", "down_proj"))
    spec, base, adapters, batch = _lora_forward_pieces(lora)
    plain_spec, _, _ = build_model_spec(CONFIG, jnp.float32)
    loss_fn = make_loss_fn(spec)
    plain_loss = make_loss_fn(plain_spec)

    def merged_loss(adapters):
        # Independent formulation: fold (alpha/r) A B into W with jnp, then the plain model.
        params = jax.tree.map(lambda x: x, base)
        for layer, mods in adapters["model"]["layers"].items():
            for group, projs in mods.items():
                for name, ab in projs.items():
                    w = base["model"]["layers"][layer][group][name]["weight"]
                    delta = jnp.tensordot(ab["lora_a"], ab["lora_b"], axes=([-1], [0]))
                    params["model"]["layers"][layer][group][name] = {
                        "weight": w + lora.scale * delta}
        return plain_loss(params, None, batch)[0]

    ours = jax.jit(jax.grad(lambda a: loss_fn(a, base, batch)[0]))(adapters)
    ref = jax.jit(jax.grad(merged_loss))(adapters)
    assert_trees_close(ours, ref, rtol=1e-4, atol=1e-6)
    assert set(ours["model"]["layers"][0]["self_attn"]) == {"qkv_proj"}


def test_lora_trains_adapters_only():
    lora = LoRAConfig(rank=2, alpha=4.0)
    batches = [make_batch(1, 4, 16, seed=0)] * 3
    state, frozen, metrics = run_steps(batches, lora=lora, optimizer=make_optimizer(OPTIM))
    for x, y in zip(jax.tree.leaves(frozen), jax.tree.leaves(base_params()), strict=True):
        np.testing.assert_array_equal(x, y)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    b = state.params["model"]["layers"][0]["mlp"]["down_proj"]["lora_b"]
    assert float(jnp.max(jnp.abs(b))) > 0  # B moved away from its zero start


def test_non_finite_step_leaves_the_state_unchanged():
    batch = make_batch(1, 2, 16, seed=0)
    spec, _, _ = build_model_spec(CONFIG, jnp.float32)
    optimizer = make_optimizer(OPTIM)
    state = init_train_state(optimizer, base_params(), 0)
    step = make_train_step(spec, optimizer)
    state, _ = step(state, None, batch)
    before = jax.device_get(state)
    poisoned = dict(state.params)
    poisoned["model"] = dict(poisoned["model"])
    norm = dict(poisoned["model"]["norm"])
    norm["weight"] = norm["weight"].at[0].set(jnp.nan)  # NaN logits, NaN loss
    poisoned["model"]["norm"] = norm
    state = type(state)(step=state.step, params=poisoned, opt_state=state.opt_state,
                        rng=state.rng)
    state, metrics = step(state, None, batch)
    assert not metrics["finite"] and not np.isfinite(metrics["loss"])
    assert int(state.step) == int(before.step)  # not advanced, nothing applied
    np.testing.assert_array_equal(state.opt_state[1][0].mu["lm_head"]["weight"],
                                  before.opt_state[1][0].mu["lm_head"]["weight"])


@pytest.mark.parametrize("mesh_spec,lora", [
    ("data=2,model=4", None),
    ("data=4,model=2", LoRAConfig(rank=4, alpha=8.0)),
])
def test_sharded_step_equals_unsharded(mesh_spec, lora):
    """FSDP over data + tensor parallelism over model on 8 fake CPU devices."""
    mesh = sharding.make_mesh(mesh_spec)
    batches = [make_batch(2, 4, 16, seed=s) for s in range(3)]
    adamw = make_optimizer(OPTIM)
    ref, _, ref_metrics = run_steps(batches, lora=lora, optimizer=adamw)
    out, _, metrics = run_steps(batches, lora=lora, mesh=mesh, optimizer=adamw)
    for a, b in zip(metrics, ref_metrics, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
    # AdamW (the real optimizer, sharded state): weights to 1e-5 absolute = 1e-3 of the peak
    # learning rate, i.e. every update agrees in direction to 0.1% of a step (see SGD above).
    assert_trees_close(out.params, ref.params, rtol=1e-5, atol=1e-3 * OPTIM.learning_rate)
    # Really sharded: the embedding is split over both axes (vocab on model, D on data).
    if lora is None:
        emb = out.params["model"]["embed_tokens"]["weight"]
        assert emb.sharding.spec == jax.sharding.PartitionSpec("model", "data")
        mu = out.opt_state[1][0].mu["model"]["embed_tokens"]["weight"]
        assert mu.sharding.spec == emb.sharding.spec
        assert len({d for s in emb.addressable_shards for d in [s.device]}) == 8


def test_blocked_attention_steps_match_reference_sharded_and_rematerialised(force_blocked):
    """The step declares its right-padded rows, so long rows take the blocked attention and its
    flash backward pass (forced here with 4-token blocks, 4 per row). Steps with it, with remat
    (the custom VJP recomputed inside jax.checkpoint) and sharded over data=2,model=4 (the
    blocked loops partitioned), give the reference attention's losses and weights (SGD: a
    weight tolerance is a gradient tolerance; fp32 sums in another order)."""
    batches = [make_batch(2, 4, 16, seed=s) for s in range(2)]
    ref, _, ref_metrics = run_steps(batches)
    calls = force_blocked(4)
    remat, _, remat_metrics = run_steps(batches, remat=True)
    sharded, _, sharded_metrics = run_steps(batches, remat=True,
                                            mesh=sharding.make_mesh("data=2,model=4"))
    assert calls and set(calls) == {4}
    for state, metrics in ((remat, remat_metrics), (sharded, sharded_metrics)):
        for a, b in zip(metrics, ref_metrics, strict=True):
            np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
            np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
        assert_trees_close(state.params, ref.params, rtol=1e-5, atol=1e-6)


def _head_case(B=3, T=11, D=8, V=50, seed=0):
    rs = np.random.RandomState(seed)
    x = jnp.asarray(rs.normal(size=(B, T, D)), jnp.float32)
    w = jnp.asarray(rs.normal(size=(V, D)), jnp.float32)
    labels = rs.randint(0, V, (B, T))
    labels[rs.rand(B, T) < 0.3] = IGNORE
    return x, w, jnp.asarray(labels, jnp.int32)


@pytest.mark.parametrize("chunk_tokens", [1, 6, 9, 30, 4096])
def test_head_loss_sum_equals_the_full_logits_loss(chunk_tokens):
    """head_loss_sum (chunks of positions, each chunk's logits recomputed in the backward pass)
    against token_loss_sum on the full logits: loss, count and the gradients of x and of the
    head. Chunk sizes: one position per chunk, chunks that leave padding (10 positions of 3
    rows in chunks of 2 or 3), and one chunk for everything."""
    from phi3_jax.train.loss import head_loss_sum, token_loss_sum

    x, w, labels = _head_case()

    def full(x, w):
        return token_loss_sum(jnp.einsum("BTD,VD->BTV", x, w), labels)

    def chunked(x, w):
        return head_loss_sum(x, lambda h: jnp.einsum("BTD,VD->BTV", h, w), labels, chunk_tokens)

    (ref, ref_n), ref_grads = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(x, w)
    (got, n), grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True))(x, w)
    assert int(n) == int(ref_n) == int(np.sum(np.asarray(labels)[:, 1:] != IGNORE))
    # The same per-token losses summed in another order: fp32 rounding of the sum only.
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(grads[0][:, -1]).max()) == 0.0  # the last position predicts nothing


def test_head_loss_sum_keeps_no_full_logits():
    """Compiled scratch memory of loss + gradients at a large vocabulary: the chunked loss holds
    one chunk's logits, the plain one several [B, T, V] fp32 arrays."""
    from phi3_jax.train.loss import head_loss_sum, token_loss_sum

    B, T, D, V = 2, 512, 16, 32768
    x = jax.ShapeDtypeStruct((B, T, D), jnp.float32)
    w = jax.ShapeDtypeStruct((V, D), jnp.float32)
    labels = jax.ShapeDtypeStruct((B, T), jnp.int32)

    def scratch(loss):
        grad = jax.jit(jax.grad(lambda x, w, labels: loss(x, w, labels)[0], argnums=(0, 1)))
        return grad.lower(x, w, labels).compile().memory_analysis().temp_size_in_bytes

    full = scratch(lambda x, w, labels: token_loss_sum(jnp.einsum("BTD,VD->BTV", x, w), labels))
    chunked = scratch(lambda x, w, labels: head_loss_sum(
        x, lambda h: jnp.einsum("BTD,VD->BTV", h, w), labels, chunk_tokens=128))
    logits_bytes = B * T * V * 4  # 128 MiB of fp32 logits
    chunk_bytes = 128 * V * 4  # 16 MiB
    assert full >= 2 * logits_bytes, full  # logits, their softmax and gradient
    assert chunked <= 3 * chunk_bytes, (chunked, full)  # a chunk's worth (measured: 2.1)


def poisoned_optimizer_state() -> optax.GradientTransformation:
    """Leaves the updates alone but puts a NaN into its own state."""
    return optax.GradientTransformation(lambda params: jnp.zeros((), jnp.float32),
                                        lambda updates, state, params=None:
                                        (updates, jnp.array(jnp.nan, jnp.float32)))


def test_step_that_would_save_a_non_finite_optimizer_state_changes_nothing():
    # Loss, gradient and new parameters are finite; the optimizer state the step would keep is
    # not. The guard used to look at the loss and the gradient norm only. (An update that makes
    # the parameters non-finite: test_train_cli, end to end.)
    batch = make_batch(1, 2, 16, seed=0)
    spec, _, _ = build_model_spec(CONFIG, jnp.float32)
    optimizer = optax.chain(make_optimizer(OPTIM), poisoned_optimizer_state())
    state = init_train_state(optimizer, base_params(), 0)
    before = jax.device_get(state)
    state, metrics = make_train_step(spec, optimizer)(state, None, batch)
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
    assert not metrics["finite"] and not metrics["update_finite"]
    for x, y in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(before),
                    strict=True):
        np.testing.assert_array_equal(x, y)  # nothing applied, step not advanced
