"""phi3-jax as an lm-evaluation-harness model: `lm_eval --model phi3-jax`.

    pip install "phi3-jax[eval]"
    lm_eval --model phi3-jax --model_args pretrained=DIR,dtype=bfloat16 --tasks hellaswag

model_args: pretrained (a folder, Orbax checkpoint or GGUF file, as phi3_jax.load; default the
embedded model), dtype, mesh ("data=2,model=4"), attention, max_length (default the model's
context), max_gen_toks (256). batch_size comes from lm-eval's --batch_size ("auto": 16).
From Python, `Phi3JaxLM(model=loaded, hooks={...})` evaluates a model you hold, with
interventions (phi3_jax.hooks) in every request; pass it to lm_eval.simple_evaluate.

Requests are tokenized and post-processed as lm-eval's `hf` backend does (phi3_jax.scoring for
loglikelihoods; lm-eval's own stop-sequence handling for generations), so its numbers compare
with published `hf` ones. The class registers itself under "phi3-jax" with lm-eval's
`register_model` when this module is imported; `phi3_jax_lm_eval` (a .pth start-up hook
installed with the package) registers the name lazily, so the `lm_eval` command finds it
without importing JAX until the model is asked for.
"""

from __future__ import annotations

from typing import Any

# lm-eval fills its registry of built-in models (hf, vllm, ...) only when it finds the registry
# empty at the first lookup; registering first would hide them ("Unknown model 'hf'"), so they
# are registered before this class is.
import lm_eval.models  # noqa: F401
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm.auto import tqdm

from phi3_jax import scoring

NAME = "phi3-jax"
DEFAULT_BATCH = 16


@register_model(NAME)
class Phi3JaxLM(LM):
    """loglikelihood, loglikelihood_rolling and generate_until on a phi3_jax model, batched."""

    def __init__(self, pretrained: str | None = None, dtype: str = "float32",
                 mesh: str | None = None, attention: str = "auto",
                 max_length: int | None = None, max_gen_toks: int = 256,
                 batch_size: int | str | None = None, model: Any = None,
                 hooks: dict | None = None, **ignored: Any) -> None:
        # `ignored`: what lm-eval passes every backend (device, max_batch_size); JAX places
        # the model by its mesh.
        super().__init__()
        import phi3_jax

        if model is None:
            from phi3_jax.embedded import MODEL_DIR

            model = phi3_jax.load(pretrained or MODEL_DIR, dtype=dtype, mesh=mesh,
                                  attention=attention)
        if model.tokenizer is None:
            raise ValueError("lm-eval needs the model's tokenizer files")
        self.model = model
        self.hooks = hooks
        self.max_length = int(max_length or model.config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self.batch_size = (DEFAULT_BATCH if batch_size in (None, "auto") or
                           str(batch_size).startswith("auto") else int(batch_size))
        self._name = pretrained or "phi3-jax-embedded"

    # ---- what lm-eval asks of a model ----------------------------------------------------

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False,
                      ) -> list[tuple[float, bool]]:
        pairs = [scoring.encode_pair(self.model, *r.args) for r in requests]
        scores = scoring.score_tokens(self.model, pairs, window=self.max_length,
                                      batch_size=self.batch_size, progress=not disable_tqdm,
                                      hooks=self.hooks)
        out = []
        for request, s in zip(requests, scores, strict=True):
            answer = (s.total, s.is_greedy)
            self.cache_hook.add_partial("loglikelihood", request.args, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False,
                              ) -> list[float]:
        texts = [r.args[0] for r in requests]
        totals = scoring.loglikelihood_rolling(self.model, texts, window=self.max_length,
                                               batch_size=self.batch_size,
                                               progress=not disable_tqdm, hooks=self.hooks)
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        tok = self.model.tokenizer
        eos = tok.decode([tok.eos_id]) if tok.eos_id is not None else None
        out = []
        bar = tqdm(total=len(requests), desc="Running generate_until requests",
                   disable=disable_tqdm)
        # Requests with the same settings go to the engine together.
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start:start + self.batch_size]
            groups: dict[str, list[int]] = {}
            prepared = []
            for i, request in enumerate(batch):
                context, gen_kwargs = request.args
                kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                max_new = kwargs.pop("max_gen_toks")
                ids = tok.encode(context)[-(self.max_length - max_new):]
                settings = dict(max_new_tokens=max_new, stop=[u for u in until if u],
                                temperature=kwargs.get("temperature", 0.0)
                                if kwargs.get("do_sample") else 0.0)
                prepared.append((ids, settings, until))
                groups.setdefault(repr(sorted(settings.items())), []).append(i)
            texts: list[str | None] = [None] * len(batch)
            for members in groups.values():
                settings = prepared[members[0]][1]
                done = self.model.generate([prepared[i][0] for i in members], **settings,
                                           hooks=self.hooks)
                for i, completion in zip(members, done, strict=True):
                    # As the hf backend: the new tokens decoded without special tokens, cut at
                    # the first stop sequence.
                    text = tok.decode(completion.token_ids, skip_special_tokens=True)
                    texts[i] = postprocess_generated_text(text, prepared[i][2], None)
            for request, text in zip(batch, texts, strict=True):
                self.cache_hook.add_partial("generate_until", request.args, text)
                out.append(text)
            bar.update(len(batch))
        bar.close()
        return out

    # ---- chat templates (lm_eval --apply_chat_template) -----------------------------------

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        return self.model.tokenizer.apply_chat_template(
            chat_history, add_generation_prompt=add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return str(self._name).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        fmt = self.model.tokenizer.chat_format
        return None if fmt is None else getattr(fmt, "template", None)
