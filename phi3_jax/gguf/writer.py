"""A phi3-jax checkpoint (Orbax, or a Hugging Face folder such as a fine-tune's output) as a GGUF
file that llama.cpp and Ollama load, plus a Modelfile for `ollama create`.

The file is what llama.cpp's `convert_hf_to_gguf.py` writes for `Phi3ForCausalLM`: the same tensor
names (fused `attn_qkv` and gate/up `ffn_up`, as the HF layout has them), the same `phi3.*` and
`tokenizer.*` keys, LongRoPE factors as the `rope_factors_long`/`_short` tensors, norms and 1-D
tensors in F32. Types:

- f32, f16, bf16: every matrix in that type.
- q8_0: every matrix in Q8_0, as the converter's `--outtype q8_0`.
- q4_0: matrices in Q4_0, the output head (or the tied embedding) in Q8_0: llama.cpp's quantizer
  keeps the head at higher precision (Q6_K, which the `gguf` package cannot write; Q8_0 is the
  nearest it can).

A matrix whose rows do not split into 32-value blocks falls back to F16, as in the converter.
Tensors are read, converted and written one at a time; the file appears under its name only
when complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from phi3_jax.config import Phi3Config
from phi3_jax.gguf import ollama, vocab
from phi3_jax.gguf.reader import ARCH, GGUFError, _gguf
from phi3_jax.hf_weights import TensorSpec, tensor_specs

FILE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
MODELFILE = "Modelfile"


def gguf_names(config: Phi3Config) -> dict[str, str]:
    """HF tensor name -> GGUF tensor name (llama.cpp's TensorNameMap for phi3)."""
    names = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(config.num_hidden_layers):
        hf, g = f"model.layers.{i}.", f"blk.{i}."
        names.update({
            hf + "input_layernorm.weight": g + "attn_norm.weight",
            hf + "self_attn.qkv_proj.weight": g + "attn_qkv.weight",
            hf + "self_attn.o_proj.weight": g + "attn_output.weight",
            hf + "post_attention_layernorm.weight": g + "ffn_norm.weight",
            hf + "mlp.gate_up_proj.weight": g + "ffn_up.weight",
            hf + "mlp.down_proj.weight": g + "ffn_down.weight",
        })
    return names


def _tensor_type(gguf: Any, name: str, shape: tuple[int, ...], file_type: str,
                 head: str) -> Any:
    Q = gguf.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return Q.F32
    qtype = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[file_type]
    if qtype == Q.Q4_0 and name == head:
        qtype = Q.Q8_0
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block == 0 else Q.F16


def _encode(gguf: Any, array: np.ndarray, qtype: Any) -> np.ndarray:
    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return np.ascontiguousarray(array, np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(array, np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(array, np.float32), qtype)


def _file_type(gguf: Any, file_type: str) -> int:
    F = gguf.LlamaFileType
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
            "q4_0": F.MOSTLY_Q4_0}[file_type]


class _Source:
    """The checkpoint to export, giving each tensor in HF layout, one at a time."""

    def __init__(self, path: str):
        from phi3_jax import orbax_checkpoint as ock

        self.path = path
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no checkpoint folder at {path}")
        self.config = Phi3Config.from_hf(path)
        self.specs = tensor_specs(self.config)
        if ock.is_orbax_checkpoint(path):
            from convert.orbax_to_hf import _LayerReader
            from phi3_jax.model import abstract_model
            from phi3_jax.params import resolve_dtype

            meta = ock.verify_checkpoint(path)  # every file's checksum, before reading it
            stored = ock.stored_quantization(meta)
            if stored is not None:
                raise ValueError(f"{path} is quantized ({stored.scheme}); GGUF export needs "
                                 f"dense weights: `phi3-jax export` it to a Hugging Face folder "
                                 f"(dequantized) and export that, or convert the original "
                                 f"without --quantize")
            dtype = resolve_dtype(meta["dtype"])
            _, abstract = abstract_model(self.config, dtype)
            from flax import nnx

            shapes = {p: tuple(v.shape) for p, v in nnx.to_flat_state(abstract)}
            reader = _LayerReader(os.path.join(path, meta.get("params", ock.PARAMS_DIR)),
                                  [s.path for s in self.specs], shapes, dtype)
            self._get: Callable[[TensorSpec], np.ndarray] = \
                lambda spec: spec.to_hf(reader.get(spec.path))
            self._release: Callable[[TensorSpec], None] = lambda spec: None
        else:
            from phi3_jax.hf_weights import HFCheckpoint

            checkpoint = HFCheckpoint(path)
            checkpoint.check(self.config)
            self._get = lambda spec: checkpoint[spec.hf_name]
            self._release = lambda spec: checkpoint.release(spec.hf_name)

    def tensors(self) -> Iterator[tuple[TensorSpec, np.ndarray]]:
        for spec in self.specs:
            yield spec, self._get(spec)
            self._release(spec)


def export_gguf(source: str | os.PathLike, out: str | os.PathLike, file_type: str = "f16",
                force: bool = False, progress: bool = True, name: str | None = None,
                modelfile: bool = True) -> list[str]:
    """Writes `source` (an Orbax checkpoint or a Hugging Face folder) as the GGUF file `out`
    and, with `modelfile`, a Modelfile next to it; returns the paths written."""
    gguf = _gguf()
    if file_type not in FILE_TYPES:
        raise ValueError(f"GGUF type {file_type!r} is not supported; choose from "
                         f"{', '.join(FILE_TYPES)}")
    source, out = os.path.abspath(source), os.path.abspath(out)
    if not out.endswith(".gguf"):
        raise ValueError(f"{out}: a GGUF file name must end in .gguf")
    modelfile_path = os.path.join(os.path.dirname(out), MODELFILE)
    for target in (out, modelfile_path) if modelfile else (out,):
        if os.path.lexists(target) and not force:
            raise FileExistsError(f"{target} already exists; pass --force to replace it")
        if os.path.isdir(target):
            raise FileExistsError(f"{target} is a folder; not replacing it")
    if source == out or os.path.realpath(out).startswith(os.path.realpath(source) + os.sep):
        raise ValueError(f"the GGUF file {out} would be written inside its source {source}")
    src = _Source(source)
    config = src.config

    writer = gguf.GGUFWriter(None, ARCH)
    tokenizer_kind = _add_metadata(gguf, writer, config, source, file_type, name)
    head = "output.weight" if not config.tie_word_embeddings else "token_embd.weight"
    names = gguf_names(config)
    plan = []  # (gguf name, shape, qtype) in writing order
    if config.rope_scaling is not None:
        half = config.rotary_dim // 2
        plan += [("rope_factors_long.weight", (half,), gguf.GGMLQuantizationType.F32),
                 ("rope_factors_short.weight", (half,), gguf.GGMLQuantizationType.F32)]
    for spec in src.specs:
        name_ = names[spec.hf_name]
        plan.append((name_, spec.hf_shape, _tensor_type(gguf, name_, spec.hf_shape, file_type,
                                                         head)))
    for name_, shape, qtype in plan:
        byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
        writer.add_tensor_info(name_, byte_shape, np.dtype(np.uint8),
                               int(np.prod(byte_shape)), raw_dtype=qtype)
    total = sum(int(np.prod(gguf.quant_shape_to_byte_shape(s, q))) for _, s, q in plan)

    family, stop = _chat(source, tokenizer_kind)
    tmp_gguf = tmp_modelfile = None
    try:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        fd, tmp_gguf = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.tmp-",
                                        dir=os.path.dirname(out))
        os.close(fd)
        writer.write_header_to_file(path=Path(tmp_gguf))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="export",
                  disable=not progress, leave=False) as bar:
            if config.rope_scaling is not None:
                for factors in (config.rope_scaling.long_factor, config.rope_scaling.short_factor):
                    writer.write_tensor_data(np.asarray(factors, np.float32))
            qtypes = [qtype for _, _, qtype in plan[-len(src.specs):]]
            for qtype, (_, array) in zip(qtypes, src.tensors(), strict=True):
                data = _encode(gguf, array, qtype)
                writer.write_tensor_data(data.view(np.uint8).reshape(-1))
                bar.update(data.nbytes)
        writer.close()
        written = [out]
        if modelfile:
            fd, tmp_modelfile = tempfile.mkstemp(prefix=f".{MODELFILE}.tmp-",
                                                 dir=os.path.dirname(out))
            with os.fdopen(fd, "w") as f:
                f.write(ollama.modelfile(os.path.basename(out), family, stop))
        os.chmod(tmp_gguf, 0o644)
        os.replace(tmp_gguf, out)
        tmp_gguf = None
        if tmp_modelfile is not None:
            os.chmod(tmp_modelfile, 0o644)
            os.replace(tmp_modelfile, modelfile_path)
            tmp_modelfile = None
            written.append(modelfile_path)
        return written
    finally:
        writer.close()
        for tmp in (tmp_gguf, tmp_modelfile):
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)


def _add_metadata(gguf: Any, writer: Any, config: Phi3Config, source: str, file_type: str,
                  name: str | None) -> str:
    """The general.*, phi3.* and tokenizer.* keys, as llama.cpp's converter writes them;
    returns the tokenizer kind ('llama' or 'gpt2')."""
    tokens, scores, types, kind, pre = _vocabulary(source, config)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(_model_name(name or os.path.basename(source.rstrip(os.sep)), kind))
    writer.add_context_length(config.max_position_embeddings)
    # Without LongRoPE, llama.cpp ignores it; the converter copies config.json's value.
    original = config.original_max_position_embeddings if config.rope_scaling else \
        _read_json(Path(source) / "config.json").get("original_max_position_embeddings",
                                                      config.max_position_embeddings)
    writer.add_rope_scaling_orig_ctx_len(int(original))
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.rotary_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_file_type(_file_type(gguf, file_type))
    writer.add_sliding_window(config.sliding_window or 0)
    if config.rope_scaling is not None:
        writer.add_rope_scaling_attn_factors(config.rope_scaling.attention_factor)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    if scores is not None:
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(source, load_merges=kind == "gpt2", n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)
    return kind


def _model_name(name: str, kind: str) -> str:
    """general.name. llama.cpp gives a SentencePiece vocabulary Phi-3's whitespace rule after
    special tokens (as the Hub tokenizer has it) only when the name says phi3 or phi-3, and
    fails to load a BPE vocabulary whose name does; so the name says it exactly when the
    vocabulary is Phi-3's."""
    says_phi3 = any(s in name.lower() for s in ("phi3", "phi-3"))
    if kind == "llama" and not says_phi3:
        return f"{name} (Phi-3)"
    if kind == "gpt2" and says_phi3:
        return name.replace("phi3", "phi").replace("Phi3", "Phi").replace("phi-3", "phi") \
            .replace("Phi-3", "Phi").replace("PHI-3", "PHI").replace("PHI3", "PHI")
    return name


def _vocabulary(source: str, config: Phi3Config
                ) -> tuple[list[str], list[float] | None, list[int], str, str]:
    """(tokens, scores, token types, tokenizer.ggml.model, tokenizer.ggml.pre) of the folder's
    tokenizer, padded to the embedding's rows."""
    folder = Path(source)
    tokenizer_config = _read_json(folder / "tokenizer_config.json")
    bpe = tokenizer_config.get("tokenizer_class") == "GPT2Tokenizer" or (
        not (folder / "tokenizer.model").is_file() and (folder / "tokenizer.json").is_file())
    if bpe:
        return (*_bpe_vocabulary(folder, config), "gpt2", _bpe_pre(folder))
    if not (folder / "tokenizer.model").is_file():
        raise GGUFError(f"{source} has no tokenizer (tokenizer.model or tokenizer.json); a GGUF "
                        f"file must carry one for llama.cpp to run it")
    tokens, scores, types = _sentencepiece_vocabulary(folder, config, tokenizer_config)
    return tokens, scores, types, "llama", "default"


def _sentencepiece_vocabulary(folder: Path, config: Phi3Config, tokenizer_config: dict
                              ) -> tuple[list[str], list[float], list[int]]:
    """llama.cpp's Phi3MiniModel.set_vocab: the pieces, then the added tokens, then padding."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    n = config.vocab_size
    if sp.vocab_size() > n:
        raise GGUFError(f"{folder}/tokenizer.model has {sp.vocab_size()} pieces, more than the "
                        f"model's {n} embedding rows")
    tokens = [f"[PAD{i}]" for i in range(n)]
    scores = [-10000.0] * n
    types = [vocab.UNUSED] * n
    for i in range(sp.vocab_size()):
        tokens[i], scores[i] = sp.id_to_piece(i), sp.get_score(i)
        types[i] = (vocab.UNKNOWN if sp.is_unknown(i) else vocab.CONTROL if sp.is_control(i)
                    else vocab.UNUSED if sp.is_unused(i) else vocab.BYTE if sp.is_byte(i)
                    else vocab.NORMAL)
    entries = [(i, {"content": t, "special": False})
               for t, i in _read_json(folder / "added_tokens.json").items()]
    entries += [(int(i), e) for i, e in tokenizer_config.get("added_tokens_decoder", {}).items()]
    entries += [(int(e["id"]), e) for e in
                _read_json(folder / "tokenizer.json").get("added_tokens", [])]
    for i, entry in entries:
        if i >= n:
            continue
        tokens[i], scores[i] = entry["content"], -1000.0
        types[i] = vocab.CONTROL if entry.get("special") else vocab.USER_DEFINED
    return tokens, scores, types


def _bpe_vocabulary(folder: Path, config: Phi3Config) -> tuple[list[str], None, list[int]]:
    spec = _read_json(folder / "tokenizer.json")
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise GGUFError(f"{folder}/tokenizer.json is not a BPE tokenizer; llama.cpp's 'gpt2' "
                        f"tokenizer needs one")
    n = config.vocab_size
    tokens: list[str | None] = [None] * n
    types = [vocab.UNUSED] * n
    for token, i in model["vocab"].items():
        if i < n:
            tokens[i], types[i] = token, vocab.NORMAL
    for entry in spec.get("added_tokens", []):
        i, content = int(entry["id"]), entry["content"]
        if i >= n:
            continue
        tokens[i] = content
        looks_special = content.startswith("<|") and content.endswith("|>")
        types[i] = vocab.CONTROL if entry.get("special") or looks_special else vocab.USER_DEFINED
    return [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)], None, types


def _bpe_pre(folder: Path) -> str:
    """tokenizer.ggml.pre for the folder's pre-tokenizer: the llama.cpp name of its regex."""
    pre = _read_json(folder / "tokenizer.json").get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regexes = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if not regexes and byte_level and byte_level[0].get("use_regex", True):
        return "gpt-2"
    if len(regexes) == 1 and regexes[0] in vocab.PRE_NAME:
        return vocab.PRE_NAME[regexes[0]]
    raise GGUFError(f"{folder}/tokenizer.json: its pre-tokenizer matches none that llama.cpp "
                    f"implements and phi3-jax knows (GPT-2's, cl100k's for Phi-4, o200k's for "
                    f"Phi-4-mini)")


def _chat(source: str, kind: str) -> tuple[str | None, list[str]]:
    """(the Modelfile template family, the stop strings) of the folder's tokenizer."""
    from phi3_jax.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(source)
    family = None
    if tokenizer.chat_format is not None:
        try:
            family = ollama.chat_family(tokenizer.apply_chat_template(
                [{"role": "user", "content": "X"}], add_generation_prompt=True))
        except ValueError:
            family = None
    generation = _read_json(Path(source) / "generation_config.json")
    ids = generation.get("eos_token_id", [])
    ids = ids if isinstance(ids, list) else [ids]
    stop = [tokenizer.decode([i]) for i in ids if isinstance(i, int)]
    for token in ("<|end|>", "<|im_end|>", "<|endoftext|>"):
        try:
            tokenizer.token_id(token)
        except KeyError:
            continue
        stop.append(token)
    return family, sorted({s for s in stop if s})


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)
