"""OpenAI's response bodies: completions and chat completions, whole or as SSE chunks, with
usage and logprobs in each endpoint's format."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

from phi3_jax.engine import TokenLogprob

DONE = b"data: [DONE]\n\n"


def sse(body: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Envelope:
    """The id, time and model every body and chunk of one response share."""

    def __init__(self, chat: bool, model: str):
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model

    def body(self, choices: list[dict], *, chunk: bool = False,
             usage: dict | None = None) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat \
            else "text_completion"
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model,
               "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    def choice(self, index: int, text: str, *, logprobs: Any = None,
               finish_reason: str | None = None, chunk: bool = False,
               first: bool = False) -> dict[str, Any]:
        """One choice: completions carry `text`; chat a `message`, or a `delta` in a chunk
        (the first chunk of a choice names the role)."""
        out: dict[str, Any] = {"index": index}
        if not self.chat:
            out["text"] = text
        elif chunk:
            out["delta"] = {"role": "assistant", "content": text} if first else (
                {"content": text} if text else {})
        else:
            out["message"] = {"role": "assistant", "content": text}
        out["logprobs"] = logprobs
        out["finish_reason"] = finish_reason
        return out


class Tokens:
    """Token strings for logprobs: the text each id adds after another token, so a
    SentencePiece word's leading space is kept (decoded alone, it would be dropped); special
    tokens by name. Without a tokenizer, "token_id:ID" as vLLM writes it."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}
        if tokenizer is not None:
            self.anchor = tokenizer.encode("a", add_bos=False)[-1:]
            self.anchor_text = tokenizer.decode(self.anchor)

    def text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        if token_id not in self.cache:
            after = self.tokenizer.decode([*self.anchor, token_id])
            self.cache[token_id] = (after[len(self.anchor_text):]
                                    if after.startswith(self.anchor_text)
                                    else self.tokenizer.decode([token_id]))
        return self.cache[token_id]

    def completion(self, entries: Sequence[tuple[int, TokenLogprob | None]],
                   offset: int = 0) -> dict[str, list]:
        """/v1/completions' format: parallel lists; a prompt's first token has no logprob."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                "text_offset": []}
        for token_id, lp in entries:
            token = self.text(token_id)
            out["tokens"].append(token)
            out["token_logprobs"].append(None if lp is None else lp.logprob)
            out["top_logprobs"].append(None if lp is None else
                                       {self.text(i): v for i, v in lp.top})
            out["text_offset"].append(offset)
            offset += len(token)
        return out

    def chat(self, entries: Sequence[TokenLogprob]) -> dict[str, list]:
        """/v1/chat/completions' format."""
        def one(token_id: int, logprob: float) -> dict[str, Any]:
            token = self.text(token_id)
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

        return {"content": [{**one(lp.token_id, lp.logprob),
                             "top_logprobs": [one(i, v) for i, v in lp.top]}
                            for lp in entries]}
