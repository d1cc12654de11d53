"""Loss and gradients against transformers (fp32, eager): the training forward is the serving one.

The reference is transformers' own causal-LM loss (`labels=` with -100 masking) and torch's
autograd; each torch gradient is mapped into our layout through the checkpoint table's `to_jax`.
Tolerances: both sides are fp32 with O(1) logits (initializer_range 0.2), so the loss agrees to a
few ulps (1e-5 relative) and gradients, summed over a few hundred terms in different orders, to
~1e-6 relative L2; 1e-4 leaves a margin without hiding a layout or masking bug (those give O(1)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import FAMILY, hf_model, longrope

import phi3_jax
from phi3_jax.hf_weights import tensor_specs
from phi3_jax.train.loss import IGNORE, causal_lm_loss
from phi3_jax.train.step import build_model_spec, make_loss_fn


def _batch(seed: int, B: int, T: int, vocab: int, pad: bool):
    """Tokens, labels with a masked prompt (and right padding), HF attention mask, positions."""
    rs = np.random.RandomState(seed)
    # Ids start at 1: transformers' embedding has padding_idx = pad_token_id (0), which zeroes
    # that row's gradient (and its initial weights), a quirk our model rightly does not copy.
    ids = rs.randint(1, vocab, (B, T)).astype(np.int64)
    lengths = rs.randint(T // 2, T + 1, B) if pad else np.full(B, T)
    lengths[0] = T
    prompt = rs.randint(1, T // 3, B)
    mask = np.arange(T)[None] < lengths[:, None]
    labels = np.where(mask & (np.arange(T)[None] >= prompt[:, None]), ids, IGNORE)
    positions = np.where(mask, np.arange(T)[None], -1)
    return ids, labels, mask, positions


def _jax_loss_and_grads(path, ids, labels, positions):
    model = phi3_jax.load(path, dtype="float32")
    spec, _, _ = build_model_spec(model.config, jnp.float32)
    loss_fn = make_loss_fn(spec)
    batch = {"input_ids": jnp.asarray(ids, jnp.int32), "labels": jnp.asarray(labels, jnp.int32),
             "positions": jnp.asarray(positions, jnp.int32)}

    def mean_loss(params):
        total, count = loss_fn(params, None, batch)
        return total / count

    loss, grads = jax.jit(jax.value_and_grad(mean_loss))(model.params.to_pure_dict())
    return model.config, float(loss), grads


def _torch_loss_and_grads(path, ids, labels, mask):
    ref = hf_model(path)
    out = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)),
              labels=torch.tensor(labels))
    out.loss.backward()
    return out.loss.item(), {n: p.grad.numpy() for n, p in ref.named_parameters()}


CASES = {
    "mha-padded": (dict(FAMILY["mha"]), 48, True),
    "gqa-window": (dict(FAMILY["gqa"], sliding_window=7), 40, True),
    "phi4mini-tied": (dict(FAMILY["phi4mini"]), 40, True),
    # LongRoPE, long regime: every row is longer than original_max (16), so each row (ours) and
    # the batch (transformers) both pick the long factors; no padding so the rules coincide.
    "longrope-long": (dict(FAMILY["gqa"], **longrope(8, 16, seed=3)), 40, False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_and_gradients_match_transformers(hf_checkpoint, case):
    overrides, T, pad = CASES[case]
    path = hf_checkpoint(seed=11, **overrides)
    ids, labels, mask, positions = _batch(5, 3, T, 128, pad)
    config, loss, grads = _jax_loss_and_grads(path, ids, labels, positions)
    ref_loss, ref_grads = _torch_loss_and_grads(path, ids, labels, mask)

    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (loss, ref_loss)
    for spec in tensor_specs(config):
        ours = np.asarray(_get(grads, spec.path))
        theirs = spec.to_jax(ref_grads[spec.hf_name])
        assert ours.shape == theirs.shape, spec.hf_name
        err = np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
        assert err <= 1e-4, f"{spec.hf_name}: relative L2 error {err:.2e}"


@pytest.mark.parametrize("case", ["mha-padded", "gqa-window"])
def test_blocked_attention_gradients_match_transformers(hf_checkpoint, case, force_blocked):
    """Training declares its right-padded rows, so long rows take the blocked attention and its
    flash backward pass (forced here with 8-token blocks: 5-6 blocks per row, a window of 7
    inside a block and across block edges): loss and every gradient against torch's autograd,
    at the tolerances above."""
    calls = force_blocked(8)
    overrides, T, pad = CASES[case]
    path = hf_checkpoint(seed=11, **overrides)
    ids, labels, mask, positions = _batch(5, 3, T, 128, pad)
    config, loss, grads = _jax_loss_and_grads(path, ids, labels, positions)
    assert calls == [8]  # the layer is traced once, through the blocked path
    ref_loss, ref_grads = _torch_loss_and_grads(path, ids, labels, mask)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (loss, ref_loss)
    for spec in tensor_specs(config):
        theirs = spec.to_jax(ref_grads[spec.hf_name])
        err = np.linalg.norm(np.asarray(_get(grads, spec.path)) - theirs) / np.linalg.norm(theirs)
        assert err <= 1e-4, f"{spec.hf_name}: relative L2 error {err:.2e}"


def test_loss_masks_prompt_and_padding_by_hand():
    """Hand-checked: uniform logits give log(V) per target; masked tokens do not count."""
    V = 8
    logits = jnp.zeros((1, 5, V)).at[0, 1, 3].set(100.0)  # position 1 predicts token 3 surely
    labels = jnp.asarray([[IGNORE, IGNORE, 3, 5, IGNORE]])  # targets at t=2 (from 1) and t=3
    loss = float(causal_lm_loss(logits, labels))
    np.testing.assert_allclose(loss, (0.0 + np.log(V)) / 2, rtol=1e-6)
    assert float(causal_lm_loss(logits, jnp.full((1, 5), IGNORE))) == 0.0


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree
