"""The fine-tuning loop: load, shard, resume, step, checkpoint, export.

`finetune(model_dir, data, out_dir, FinetuneConfig(...))` is what `phi3-jax finetune` runs. It
resumes from the latest checkpoint in OUT/checkpoints when there is one (same settings required),
and at the end writes OUT as a Hugging Face folder (LoRA merged). A step with a non-finite loss,
gradient, or new parameters or optimizer state leaves the state untouched (see step.py); the loop
then stops with TrainingDiverged and the last checkpoint on disk is the last good one (checked on
resume: see checkpoint.py).

OUT may not be, contain or lie inside --model. Settings are validated before anything is loaded.
SIGTERM stops the run like Ctrl-C; neither cuts a checkpoint or the final export short (a save in
flight completes first).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import numbers
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from phi3_jax import interrupts, sharding
from phi3_jax import quantize as quantize_lib
from phi3_jax.api import load
from phi3_jax.atomic import check_no_overlap
from phi3_jax.hf_weights import write_hf_folder
from phi3_jax.params import resolve_dtype
from phi3_jax.train import step as step_lib
from phi3_jax.train.checkpoint import Checkpointer, abstract_like
from phi3_jax.train.data import OVERFLOW_POLICIES, Batches, Dataset, load_dataset
from phi3_jax.train.export import final_params
from phi3_jax.train.lora import TARGETS, LoRAConfig
from phi3_jax.train.optim import OptimConfig, make_optimizer, schedule

log = logging.getLogger(__name__)

FLOAT32_MAX = float(np.finfo(np.float32).max)


class TrainingDiverged(RuntimeError):
    """The loss, gradient, or the updated parameters or optimizer state became NaN or
    infinite."""


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 100
    batch_size: int = 8  # examples per optimizer step
    grad_accum: int = 1  # micro-batches per step (batch_size / grad_accum rows each)
    seq_len: int = 512
    learning_rate: float = 1e-4
    warmup_steps: int | None = None  # default: 5% of the steps
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0  # None or 0: no clipping
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float | None = None  # default: 2 * rank
    lora_targets: tuple[str, ...] = TARGETS
    remat: bool = False
    dtype: str = "float32"  # compute dtype; trainable weights and optimizer state stay fp32
    save_dtype: str | None = None  # exported weights; default: dtype
    save_every: int = 0  # 0: checkpoint at the end only
    seed: int = 0
    mesh: str | None = None
    overflow: str = "truncate"
    allow_nonfinite: bool = False  # load a base model holding NaN or infinity (issue 15)
    quantize: str | None = None  # QLoRA: the frozen base quantized ("int8", "int4")
    group_size: int = 128
    quantize_embeddings: bool = False

    def __post_init__(self) -> None:
        """Refuses values that cannot be meant, naming the command-line flag: a negative LoRA
        rank would silently mean full fine-tuning, an infinite learning rate a NaN model."""
        for name, low in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("seq_len", 1),
                          ("lora_rank", 0), ("save_every", 0)):
            _integer(name, getattr(self, name), low)
        if self.warmup_steps is not None:
            _integer("warmup_steps", self.warmup_steps, 0)
            if self.warmup_steps > self.steps:
                raise ValueError(f"--warmup-steps ({self.warmup_steps}) must not exceed --steps "
                                 f"({self.steps})")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"--batch-size ({self.batch_size}) must be a multiple of "
                             f"--grad-accum ({self.grad_accum})")
        _number("learning_rate", self.learning_rate, positive=True)
        _number("weight_decay", self.weight_decay, positive=False)
        if self.clip_norm is not None:
            _number("clip_norm", self.clip_norm, positive=False)
        if self.lora_alpha is not None:
            _number("lora_alpha", self.lora_alpha, positive=True)
        _number("final_lr_fraction", self.final_lr_fraction, positive=False)
        if self.final_lr_fraction > 1:
            raise ValueError(f"final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}")
        if self.quantize is not None:
            quantize_lib.resolve(self.quantize, self.group_size, self.quantize_embeddings)
            if self.lora_rank <= 0:
                raise ValueError(f"--quantize {self.quantize} needs LoRA (--lora-rank R > 0): "
                                 f"quantized weights are frozen, so full fine-tuning "
                                 f"(--lora-rank 0) cannot train them")
        if self.overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"--overflow must be one of {', '.join(OVERFLOW_POLICIES)}, got "
                             f"{self.overflow!r}")

    @property
    def lora(self) -> LoRAConfig | None:
        if self.lora_rank <= 0:
            return None
        alpha = self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank
        return LoRAConfig(self.lora_rank, alpha, tuple(self.lora_targets))

    @property
    def optim(self) -> OptimConfig:
        warmup = self.warmup_steps if self.warmup_steps is not None else self.steps // 20
        return OptimConfig(learning_rate=self.learning_rate, total_steps=self.steps,
                           warmup_steps=warmup, final_lr_fraction=self.final_lr_fraction,
                           weight_decay=self.weight_decay, clip_norm=self.clip_norm or None)

    def fingerprint(self, model_dir: str, data: str, dataset: Dataset) -> dict[str, Any]:
        """The settings a resumed run must share (not the mesh: restoring reshards)."""
        lora = self.lora
        return {
            "model": os.path.abspath(model_dir), "data": os.path.abspath(data),
            "examples": len(dataset.examples), "tokens": dataset.num_tokens,
            "steps": self.steps, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
            "seq_len": self.seq_len, "optim": dataclasses.asdict(self.optim),
            "lora": None if lora is None else [lora.rank, lora.alpha, list(lora.targets)],
            "remat": self.remat, "dtype": self.dtype, "seed": self.seed,
            "overflow": self.overflow,
            "quantize": None if self.quantize is None else [
                self.quantize, self.group_size, self.quantize_embeddings],
        }


def _flag(name: str) -> str:
    return "--lr" if name == "learning_rate" else "--" + name.replace("_", "-")


def _integer(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{_flag(name)} must be an integer >= {low}, got {value!r}")


def _number(name: str, value: Any, positive: bool) -> None:
    # Finite in float32, where the optimizer computes: 1e39 is infinite there.
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value) and abs(value) <= FLOAT32_MAX
          and (value > 0 if positive else value >= 0))
    if not ok:
        raise ValueError(f"{_flag(name)} must be a finite number {'>' if positive else '>='} 0"
                         f", got {value!r}")


@dataclasses.dataclass
class FinetuneResult:
    out_dir: str
    losses: dict[int, float]  # step number (1-based) -> loss, for the steps this run took
    start_step: int
    final_step: int
    tokens_per_second: float
    state: step_lib.TrainState
    frozen: dict | None


def finetune(model_dir: str | os.PathLike, data: str | os.PathLike, out_dir: str | os.PathLike,
             config: FinetuneConfig, *, progress: bool = True,
             callback: Callable[[int, dict], None] | None = None) -> FinetuneResult:
    """Fine-tunes the model in `model_dir` on the JSONL file `data`; see the module docstring.

    `callback(step, metrics)` runs after every step (and its checkpoint, if any).
    """
    model_dir, data, out_dir = os.fspath(model_dir), os.fspath(data), os.fspath(out_dir)
    check_no_overlap(out_dir, model_dir, "--out", "--model")
    with interrupts.handled():  # SIGTERM stops the run as Ctrl-C does
        return _finetune(model_dir, data, out_dir, config, progress, callback)


def _finetune(model_dir: str, data: str, out_dir: str, config: FinetuneConfig, progress: bool,
              callback: Callable[[int, dict], None] | None) -> FinetuneResult:
    compute = resolve_dtype(config.dtype)
    save_dtype = config.save_dtype or config.dtype
    lora = config.lora
    mesh = sharding.make_mesh(config.mesh) if config.mesh else None
    if mesh is not None and config.batch_size // config.grad_accum % mesh.shape["data"]:
        raise ValueError(f"the micro-batch ({config.batch_size // config.grad_accum} rows) must "
                         f"be divisible by the mesh's data axis ({mesh.shape['data']})")

    # Full fine-tuning loads fp32 masters; LoRA keeps its frozen base in the compute dtype.
    base = load(model_dir, dtype=jnp.float32 if lora is None else compute, mesh=mesh,
                allow_nonfinite=config.allow_nonfinite, quantize=config.quantize,
                group_size=config.group_size, quantize_embeddings=config.quantize_embeddings)
    layouts = quantize_lib.layouts(base.graphdef, base.params)  # QLoRA's frozen base
    if layouts and lora is None:
        raise ValueError(f"{model_dir} is quantized: fine-tune it with LoRA (--lora-rank R > 0)")
    model_config = base.config
    if config.seq_len > model_config.max_position_embeddings:
        raise ValueError(f"--seq-len {config.seq_len} exceeds the model's "
                         f"max_position_embeddings ({model_config.max_position_embeddings})")
    dataset = load_dataset(data, base.tokenizer, model_config.vocab_size, config.seq_len,
                           config.overflow)
    if dataset.truncated:
        log.warning("%d of %d examples were longer than --seq-len %d and were truncated "
                    "(longest: %d tokens)", dataset.truncated, len(dataset.examples),
                    config.seq_len, dataset.longest)

    # A quantized base keeps the matmul its load chose (blocked on one CPU, XLA on a mesh).
    spec, abstract_trainable, abstract_frozen = step_lib.build_model_spec(
        model_config, compute, remat=config.remat, lora=lora, seed=config.seed,
        kernels=base.kernels if layouts else None, quantization=base.quantization)
    optim = config.optim
    optimizer = make_optimizer(optim)
    param_shardings = frozen_shardings = state_shardings = None
    if mesh is not None:
        param_shardings = step_lib.state_shardings(abstract_trainable, mesh)
        if abstract_frozen is not None:
            frozen_shardings = step_lib.state_shardings(abstract_frozen, mesh)

    if lora is None:
        trainable, frozen = base.params.to_pure_dict(), None
        if mesh is not None:
            trainable = jax.device_put(trainable, param_shardings)
    else:
        trainable = step_lib.init_lora_params(model_config, lora, config.seed, param_shardings)
        frozen = base.params.to_pure_dict()
        if mesh is not None:
            frozen = jax.device_put(frozen, frozen_shardings)
    del base
    if mesh is not None:
        state_shardings = step_lib.train_state_shardings(
            optimizer, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32),
                                    trainable), param_shardings, mesh)

    fingerprint = config.fingerprint(model_dir, data, dataset)
    checkpointer = Checkpointer(out_dir, writer=True)
    try:
        state = step_lib.init_train_state(optimizer, trainable, config.seed, state_shardings,
                                             donate=True)
        del trainable
        position = 0
        if checkpointer.latest_step() is not None:
            abstract = abstract_like(jax.eval_shape(lambda s: s, state), state_shardings)
            state, position = checkpointer.restore(abstract, fingerprint)
            log.info("resumed from step %d of %s", int(state.step), checkpointer.directory)
        batches = Batches(dataset.examples, config.batch_size, config.seq_len,
                          grad_accum=config.grad_accum, seed=config.seed, position=position)
        train_step = step_lib.make_train_step(spec, optimizer, schedule(optim), state_shardings)
        put = jax.device_put
        if mesh is not None:
            # Every process holds the same host batch (the iterator is deterministic) and
            # builds only its own devices' shards: multi-host safe.
            target = step_lib.batch_sharding(mesh)
            put = functools.partial(jax.tree.map, lambda a: jax.make_array_from_callback(
                a.shape, target, lambda index: a[index]))

        start = int(state.step)
        losses: dict[int, float] = {}
        # Throughput (real tokens, data loading and checkpoints included) is counted from the
        # end of the first step, which includes compilation.
        tokens_seen, t_first = 0, None
        bar = tqdm(total=config.steps, initial=start, desc="finetune", unit="step",
                   disable=not progress)
        for step_number in range(start + 1, config.steps + 1):
            batch = next(batches)
            real_tokens = int(np.sum(batch["positions"] >= 0))
            state, metrics = train_step(state, frozen, put(batch))
            metrics = jax.device_get(metrics)
            if t_first is None:
                t_first = time.perf_counter()
            else:
                tokens_seen += real_tokens
            if not metrics["finite"]:
                bar.close()
                checkpointer.wait()
                last = checkpointer.latest_step()
                kept = (f"the last good checkpoint is step {last} in {checkpointer.directory}"
                        if last is not None else "no checkpoint was written before it")
                if np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"]):
                    what = (f"the update (learning rate {float(metrics['learning_rate']):.3g}) "
                            f"makes the parameters or optimizer state non-finite")
                else:
                    what = (f"loss {metrics['loss']} / gradient norm {metrics['grad_norm']} is "
                            f"not finite")
                raise TrainingDiverged(f"step {step_number}: {what}; stopped without applying "
                                       f"it ({kept}; try a lower --lr)")
            loss = float(metrics["loss"])
            losses[step_number] = loss
            elapsed = time.perf_counter() - t_first
            rate = tokens_seen / elapsed if tokens_seen else 0.0
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}",
                            lr=f"{float(metrics['learning_rate']):.2e}")
            bar.update(1)
            if ((config.save_every and step_number % config.save_every == 0)
                    or step_number == config.steps):
                with interrupts.deferred():  # a signal waits until the save is under way
                    checkpointer.save(state, batches.position, fingerprint)
            if callback is not None:
                callback(step_number, {k: np.asarray(v) for k, v in metrics.items()})
        bar.close()
        checkpointer.wait()
    finally:
        with interrupts.deferred():  # the save in flight completes; a signal now waits for it
            checkpointer.close()

    host = functools.partial(jax.tree.map, sharding.to_host)  # gathers across processes
    base_params = None if frozen is None else host(frozen)
    if layouts:  # the LoRA merge reads the base dense (dequantized, fp32)
        base_params = quantize_lib.dequantize_params(base_params, layouts)
    params = final_params(host(state.params), base_params, lora)
    if jax.process_index() == 0:
        with interrupts.deferred():
            write_hf_folder(out_dir, model_config, params, save_dtype, source_dir=model_dir,
                            generation_config=_generation_config(model_dir))
    rate = tokens_seen / (time.perf_counter() - t_first) if tokens_seen else 0.0
    return FinetuneResult(out_dir, losses, start, config.steps, rate, state, frozen)


def _generation_config(model_dir: str) -> dict | None:
    from phi3_jax.config import read_generation_config

    return read_generation_config(model_dir) or None
