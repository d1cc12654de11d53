"""Fine-tuning with the serving modules: loss, optimizer, LoRA, data, train step, loop, CLI."""

from phi3_jax.train.data import Batches, DataError, load_dataset
from phi3_jax.train.lora import LoRAConfig, merge_lora
from phi3_jax.train.loss import IGNORE, causal_lm_loss, head_loss_sum, token_loss_sum
from phi3_jax.train.optim import OptimConfig, make_optimizer
from phi3_jax.train.step import TrainState, build_model_spec, make_train_step
from phi3_jax.train.trainer import FinetuneConfig, FinetuneResult, TrainingDiverged, finetune

__all__ = [
    "IGNORE", "Batches", "DataError", "FinetuneConfig", "FinetuneResult", "LoRAConfig",
    "OptimConfig", "TrainState", "TrainingDiverged", "build_model_spec", "causal_lm_loss",
    "finetune", "head_loss_sum", "load_dataset", "make_optimizer", "make_train_step",
    "merge_lora", "token_loss_sum",
]
