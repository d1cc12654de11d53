"""The fine-tuned model's parameters for export: trained weights, or the base with LoRA merged.
phi3_jax.hf_weights.write_hf_folder writes them as a Hugging Face folder."""

from __future__ import annotations

from phi3_jax.train.lora import LoRAConfig, merge_lora


def final_params(trainable: dict, frozen: dict | None, lora: LoRAConfig | None) -> dict:
    """The model's parameters (pure dict, host arrays): trainable, or base + merged LoRA."""
    if lora is None:
        return trainable
    return merge_lora(frozen, trainable, lora)
