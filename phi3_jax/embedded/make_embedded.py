"""Makes the embedded default model (phi3_jax/embedded/model) from nothing, deterministically.

    python -m phi3_jax.embedded.make_embedded    # 29 minutes on 2 CPU cores shared with other jobs

1. Trains a Llama-2-style SentencePiece BPE (byte fallback, split digits) on the task's text
   and adds the Phi-3 chat tokens after its pieces, in Phi-3's order, with Phi-3's
   tokenizer_config.json settings and chat template.
2. Writes a randomly initialised Phi-3 (GQA, RMSNorm, fused qkv / gate_up, RoPE) as a Hugging
   Face folder with that tokenizer and a generation_config.json.
3. Fine-tunes it with `phi3_jax.train.finetune` (the code behind `phi3-jax finetune`) on chat
   records of the linear-equation task (phi3_jax/embedded/task.py), the user turn masked.
4. Measures greedy exact-match on held-out problems with `model.generate`, and copies the
   exported folder (bf16 weights) into phi3_jax/embedded/model.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import tempfile
import time

import numpy as np

from phi3_jax import chat
from phi3_jax.config import Phi3Config
from phi3_jax.embedded import MODEL_DIR, task

SEED = 0
SP_VOCAB = 320
# (content, rstrip), in Phi-3 id order, right after the SentencePiece pieces (Phi-3: 32000+).
ADDED_TOKENS = (
    ("<|endoftext|>", False), ("<|assistant|>", True), ("<|placeholder1|>", True),
    ("<|placeholder2|>", True), ("<|placeholder3|>", True), ("<|placeholder4|>", True),
    ("<|system|>", True), ("<|end|>", True), ("<|placeholder5|>", True),
    ("<|placeholder6|>", True), ("<|user|>", True),
)
EOT, ASSISTANT, END = SP_VOCAB, SP_VOCAB + 1, SP_VOCAB + 7

CONFIG = Phi3Config(
    vocab_size=336,  # 320 pieces + 11 added tokens, padded (as Phi-3 pads 32011 to 32064)
    hidden_size=128, intermediate_size=512, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    bos_token_id=1, eos_token_id=(EOT,), pad_token_id=EOT,
)
TRAIN = dict(steps=3000, batch_size=64, seq_len=24, learning_rate=3e-3, warmup_steps=50,
             weight_decay=0.01, final_lr_fraction=0.02, overflow="error", seed=SEED)


def build_tokenizer(path: str, texts: list[str]) -> None:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe",
        vocab_size=SP_VOCAB, byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, allow_whitespace_only_pieces=True, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
        seed_sentencepiece_size=100000, input_sentence_size=0, shuffle_input_sentence=False)
    with open(os.path.join(path, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())

    def entry(content, rstrip=False, special=True):
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": rstrip,
                "single_word": False, "special": special}

    decoder = {"0": entry("<unk>"), "1": entry("<s>"), "2": entry("</s>", True, False)}
    decoder |= {str(SP_VOCAB + i): entry(c, r) for i, (c, r) in enumerate(ADDED_TOKENS)}
    config = {
        "add_bos_token": False, "add_eos_token": False, "added_tokens_decoder": decoder,
        "bos_token": "<s>", "chat_template": chat.PHI3.template,
        "clean_up_tokenization_spaces": False, "eos_token": "<|endoftext|>", "legacy": False,
        "model_max_length": CONFIG.max_position_embeddings, "pad_token": "<|endoftext|>",
        "padding_side": "left", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>", "use_default_system_prompt": False,
    }
    _write_json(os.path.join(path, "tokenizer_config.json"), config)


def generation_config() -> dict:
    # Phi-3-mini-4k's stop ids: <|endoftext|>, <|assistant|>, <|end|>.
    return {"bos_token_id": 1, "eos_token_id": [EOT, ASSISTANT, END], "pad_token_id": EOT,
            "do_sample": False}


def training_records(seed: int) -> list[dict]:
    """Every training triple in every phrasing, in a seeded order."""
    records = [{"messages": task.Problem(a, b, x, form).messages()}
               for a, b, x in task.split()[0] for form in range(len(task.FORMATS))]
    random.Random(seed).shuffle(records)
    return records


def accuracy(model_dir: str, problems: list[task.Problem], batch: int = 64) -> float:
    import phi3_jax

    model = phi3_jax.load(model_dir)
    correct = 0
    for i in range(0, len(problems), batch):
        chunk = problems[i:i + batch]
        outs = model.generate([p.messages(with_answer=False) for p in chunk], max_new_tokens=8)
        correct += sum(task.parse_answer(o.text) == p.x and o.text == p.answer
                       for o, p in zip(outs, chunk, strict=True))
    return correct / len(problems)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=TRAIN["steps"])
    parser.add_argument("--out", default=MODEL_DIR, help="where the model goes")
    parser.add_argument("--work", default=None, help="keep intermediate files here")
    args = parser.parse_args(argv)

    from phi3_jax.demo import save_random_checkpoint
    from phi3_jax.train import FinetuneConfig, finetune

    work = args.work or tempfile.mkdtemp(prefix="phi3-embedded-")
    base, data, trained = (os.path.join(work, n) for n in ("base", "train.jsonl", "trained"))
    records = training_records(SEED)
    os.makedirs(base, exist_ok=True)
    texts = [m["content"] for r in records for m in r["messages"]]
    build_tokenizer(base, texts)
    save_random_checkpoint(base, CONFIG, seed=SEED)
    _write_json(os.path.join(base, "generation_config.json"), generation_config())
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)

    t0 = time.perf_counter()
    result = finetune(base, data, trained,
                      FinetuneConfig(**{**TRAIN, "steps": args.steps, "save_dtype": "bfloat16"}))
    minutes = (time.perf_counter() - t0) / 60
    held_out = task.held_out_problems()
    acc = accuracy(trained, held_out)
    print(f"trained {args.steps} steps in {minutes:.1f} min, final loss "
          f"{result.losses[args.steps]:.4f}; held-out exact match {acc:.1%} "
          f"({len(held_out)} problems)")

    os.makedirs(args.out, exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
                 "generation_config.json"):
        shutil.copy2(os.path.join(trained, name), os.path.join(args.out, name))
    if args.work is None:
        shutil.rmtree(work)
    print(f"wrote {args.out}")
    return 0


def _write_json(path: str, value: dict) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    raise SystemExit(main())
