"""GGUF files of the Phi-3 family (llama.cpp architecture `phi3`): hyperparameters and tensors.

`GGUFCheckpoint` reads a file with the `gguf` package (llama.cpp's own reader) and presents it as
the Hugging Face checkpoint it was converted from: `config` is the Phi3Config, and tensors are
served under their HF names, in HF layout, one at a time (`check` and `get`), so the HF table in
hf_weights (`tensor_specs`) does the rest.

llama.cpp keeps the HF layouts: a GGUF tensor's numpy shape (its ggml shape reversed) is the HF
[out, in] shape, Q/K/V rows stay fused in `attn_qkv` and the gate/up rows in `ffn_up` (gate
first). Files from other converters may split them (`attn_q`/`attn_k`/`attn_v`, `ffn_gate` +
`ffn_up`); both load. LongRoPE lives in two f32 tensors (`rope_factors_long`/`_short`) plus
metadata; they become the config, not parameters.

Quantized tensors (q8_0, q4_0, q4_K, q6_K, ...) are dequantized by `gguf.quants`, a slab of rows
at a time, so the transient memory is bounded by the slab rather than the tensor.
"""

from __future__ import annotations

import math
import mmap
import os
from typing import Any

import numpy as np

from phi3_jax.config import Phi3Config, RopeScaling
from phi3_jax.hf_weights import TensorSpec, tensor_specs

ARCH = "phi3"
# Architectures people may mistake for this one, named so the error can say what they are.
_OTHER_ARCHS = {
    "phi2": "Phi-1/Phi-2",
    "phimoe": "Phi-3.5-MoE (mixture of experts)",
    "llama": "Llama",
}
_SLAB_BYTES = 64 * 2**20  # dequantized rows per step


def shortest(x: float) -> float:
    """A float32 read back as the shortest decimal that rounds to it (1e-05, not
    9.999999747378752e-06): GGUF stores floats as float32, config.json as decimals."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


class GGUFError(ValueError):
    """A GGUF file that is unreadable, truncated, of another architecture or incomplete."""


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("reading and writing GGUF files needs the `gguf` package: "
                          "pip install 'phi3-jax[gguf]'") from e
    return gguf


def _reader_class():
    gguf = _gguf()

    class Reader(gguf.GGUFReader):
        """GGUFReader that names the tensor at fault before its own checks fail cryptically."""

        def _build_tensors(self, start_offs: int, fields: list) -> None:
            size = len(self.data)
            for field in fields:
                _, name_data, _, dims, raw_type, offset = field.parts
                name = bytes(name_data).decode("utf-8", "replace")
                try:
                    qtype = gguf.GGMLQuantizationType(int(raw_type[0]))
                except ValueError:
                    raise GGUFError(f"tensor {name!r} has tensor type {int(raw_type[0])}, which "
                                    f"gguf {_version(gguf)} does not know (a newer llama.cpp "
                                    f"format? upgrade gguf)") from None
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
                end = int(start_offs + offset[0]) + int(np.prod(dims)) * type_size // block
                if end > size:
                    raise GGUFError(f"is truncated: tensor {name!r} ends at byte {end}, but the "
                                    f"file has {size} bytes")
            super()._build_tensors(start_offs, fields)

    return Reader


def _version(module: Any) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:  # pragma: no cover - a vendored copy
        return getattr(module, "__version__", "?")


class GGUFCheckpoint:
    """A Phi-3 family GGUF file, read lazily: metadata at once, tensor data on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"no GGUF file at {self.path}")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise GGUFError(f"{self.path} is not a GGUF file (it starts with {magic!r}, not "
                            f"b'GGUF')")
        self._gguf = _gguf()
        try:
            self.reader = _reader_class()(self.path)
        except GGUFError as e:
            raise GGUFError(f"{self.path} {e}" if str(e).startswith("is ") else
                            f"{self.path}: {e}") from None
        except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
            raise GGUFError(f"{self.path} is truncated or corrupt (gguf cannot parse it: "
                            f"{e})") from e
        arch = self.meta("general.architecture")
        if arch != ARCH:
            what = f" ({_OTHER_ARCHS[arch]})" if arch in _OTHER_ARCHS else ""
            raise GGUFError(f"{self.path} holds a {arch!r}{what} model; phi3-jax reads GGUF "
                            f"architecture {ARCH!r} (Phi-3, Phi-3.5, Phi-4, Phi-4-mini)")
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.config = self._config()
        self._sources = self._hf_sources()

    # ---- metadata ----
    def meta(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return default
        value = field.contents()
        return value

    def _require(self, key: str) -> Any:
        value = self.meta(key)
        if value is None:
            raise GGUFError(f"{self.path} lacks the metadata key {key!r}, which llama.cpp's "
                            f"converter always writes")
        return value

    def _config(self) -> Phi3Config:
        a = ARCH
        D = int(self._require(f"{a}.embedding_length"))
        heads = int(self._require(f"{a}.attention.head_count"))
        kv_heads = int(self.meta(f"{a}.attention.head_count_kv", heads))
        head_dim = D // heads
        key_length = self.meta(f"{a}.attention.key_length")
        if key_length is not None and int(key_length) != head_dim:
            raise GGUFError(f"{self.path}: {a}.attention.key_length is {key_length}, but Phi-3 "
                            f"heads are embedding_length / head_count = {head_dim} wide")
        rot = int(self.meta(f"{a}.rope.dimension_count", head_dim))
        embed = self._tensor_info("token_embd.weight")
        V = int(embed.shape[1])  # ggml order: [D, V]
        max_pos = int(self._require(f"{a}.context_length"))
        window = int(self.meta(f"{a}.attention.sliding_window", 0) or 0)
        tied = "output.weight" not in self.tensors
        eos = self.meta("tokenizer.ggml.eos_token_id")
        return Phi3Config(
            vocab_size=V,
            hidden_size=D,
            intermediate_size=int(self._require(f"{a}.feed_forward_length")),
            num_hidden_layers=int(self._require(f"{a}.block_count")),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=max_pos,
            rms_norm_eps=shortest(self._require(f"{a}.attention.layer_norm_rms_epsilon")),
            rope_theta=shortest(self.meta(f"{a}.rope.freq_base", 10000.0)),
            partial_rotary_factor=rot / head_dim,
            rope_scaling=self._rope_scaling(max_pos, rot),
            # llama.cpp's converter writes 0 for "no window" (Phi-4's null).
            sliding_window=window or None,
            tie_word_embeddings=tied,
            bos_token_id=self.meta("tokenizer.ggml.bos_token_id"),
            eos_token_id=() if eos is None else (int(eos),),
            pad_token_id=self.meta("tokenizer.ggml.padding_token_id"),
        )

    def _rope_scaling(self, max_pos: int, rot: int) -> RopeScaling | None:
        names = ("rope_factors_short.weight", "rope_factors_long.weight")
        present = [n for n in names if n in self.tensors]
        if not present:
            return None
        if len(present) == 1:
            raise GGUFError(f"{self.path} has {present[0]} but not its pair; LongRoPE needs both "
                            f"rope_factors_short and rope_factors_long")
        short, long = (self._float(n).astype(np.float64).reshape(-1) for n in names)
        original = self.meta(f"{ARCH}.rope.scaling.original_context_length")
        if original is None:
            raise GGUFError(f"{self.path} has LongRoPE factors but no "
                            f"{ARCH}.rope.scaling.original_context_length")
        original = int(original)
        scale = max_pos / original
        rule = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
        factor = self.meta(f"{ARCH}.rope.scaling.attn_factor")
        # The converter writes the sqrt rule's value (0.1 ln(s) + 1 for legacy "yarn"); keep
        # the rule's float64 value when the float32 in the file is that.
        factor = rule if factor is None or np.float32(factor) == np.float32(rule) else factor
        if len(short) != rot // 2 or len(long) != rot // 2:
            raise GGUFError(f"{self.path}: rope factor tensors have {len(short)}/{len(long)} "
                            f"entries; rope.dimension_count {rot} implies {rot // 2}")
        return RopeScaling(short_factor=tuple(map(shortest, short)),
                           long_factor=tuple(map(shortest, long)),
                           original_max_position_embeddings=original,
                           attention_factor=float(factor))

    # ---- tensors ----
    def _tensor_info(self, name: str) -> Any:
        if name not in self.tensors:
            raise GGUFError(f"{self.path} lacks the tensor {name!r}")
        return self.tensors[name]

    def _hf_sources(self) -> dict[str, tuple[str, ...]]:
        """HF tensor name -> the GGUF tensors whose rows, stacked, make it."""
        sources = {"model.embed_tokens.weight": ("token_embd.weight",),
                   "model.norm.weight": ("output_norm.weight",)}
        if not self.config.tie_word_embeddings:
            sources["lm_head.weight"] = ("output.weight",)
        for i in range(self.config.num_hidden_layers):
            hf, g = f"model.layers.{i}.", f"blk.{i}."
            split_qkv = f"{g}attn_qkv.weight" not in self.tensors and f"{g}attn_q.weight" in \
                self.tensors
            split_mlp = f"{g}ffn_gate.weight" in self.tensors
            sources.update({
                hf + "input_layernorm.weight": (g + "attn_norm.weight",),
                hf + "self_attn.qkv_proj.weight":
                    tuple(g + f"attn_{p}.weight" for p in "qkv") if split_qkv
                    else (g + "attn_qkv.weight",),
                hf + "self_attn.o_proj.weight": (g + "attn_output.weight",),
                hf + "post_attention_layernorm.weight": (g + "ffn_norm.weight",),
                hf + "mlp.gate_up_proj.weight":
                    (g + "ffn_gate.weight", g + "ffn_up.weight") if split_mlp
                    else (g + "ffn_up.weight",),
                hf + "mlp.down_proj.weight": (g + "ffn_down.weight",),
            })
        return sources

    def check(self, config: Phi3Config | None = None) -> list[TensorSpec]:
        """Checks that every tensor the model needs is there once with the right shape and
        that nothing unknown is left over, before any data is read; returns the specs."""
        specs = tensor_specs(config or self.config)
        used = {"rope_factors_long.weight", "rope_factors_short.weight"}
        for spec in specs:
            parts = self._sources[spec.hf_name]
            rows = 0
            for name in parts:
                info = self._tensor_info(name)
                shape = tuple(int(d) for d in reversed(info.shape.tolist()))
                if len(shape) != len(spec.hf_shape) or shape[1:] != spec.hf_shape[1:]:
                    raise GGUFError(f"{self.path}: tensor {name!r} has shape {list(shape)}; the "
                                    f"metadata implies {list(spec.hf_shape)} for "
                                    f"{spec.hf_name}")
                rows += shape[0]
                used.add(name)
            if rows != spec.hf_shape[0]:
                raise GGUFError(f"{self.path}: tensor(s) {', '.join(parts)} have {rows} rows; "
                                f"the metadata implies {spec.hf_shape[0]}")
        extra = sorted(set(self.tensors) - used)
        if extra:
            raise GGUFError(f"{self.path}: unexpected tensor {extra[0]!r} (not part of a "
                            f"Phi-3 model)" + (f" and {len(extra) - 1} more" if extra[1:] else ""))
        return specs

    def type_names(self, names: list[str] | None = None) -> list[str]:
        """The GGML types of the given GGUF tensors (all by default), e.g. ['F32', 'Q8_0']."""
        tensors = [self.tensors[n] for n in names] if names else self.tensors.values()
        return sorted({t.tensor_type.name for t in tensors})

    def weight_type(self) -> str:
        """The type of the big matrices (the first layer's attention output)."""
        name = "blk.0.attn_output.weight"
        return self.tensors[name].tensor_type.name if name in self.tensors else "F32"

    def get(self, hf_name: str, dtype: Any) -> np.ndarray:
        """The HF tensor `hf_name` in HF layout and `dtype`, a copy (quantized tensors are
        dequantized straight into `dtype`, with no float32 copy of the whole tensor)."""
        parts = [self._float(name, np.dtype(dtype)) for name in self._sources[hf_name]]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def release(self) -> None:
        """Drops the file's mapped pages from this process's resident set (they stay in the page
        cache), so that streaming a model through the map does not show the whole file as this
        process's memory. Call it once a tensor's data has been copied out."""
        base = self.reader.data
        while base is not None and not isinstance(base, mmap.mmap):
            base = getattr(base, "base", None)
        if base is not None and hasattr(mmap, "MADV_DONTNEED"):
            base.madvise(mmap.MADV_DONTNEED)

    def _float(self, name: str, dtype: np.dtype | None = None) -> np.ndarray:
        gguf = self._gguf
        info = self._tensor_info(name)
        Q = gguf.GGMLQuantizationType
        shape = tuple(int(d) for d in reversed(info.shape.tolist()))
        if info.tensor_type in (Q.F32, Q.F16):
            array = info.data.reshape(shape)
            return array if dtype is None else array.astype(dtype)
        if info.tensor_type == Q.BF16:
            import ml_dtypes

            array = info.data.view(ml_dtypes.bfloat16).reshape(shape)
            return array if dtype is None else array.astype(dtype)
        return self._dequantize(info, shape, np.dtype(dtype or np.float32))

    def _dequantize(self, info: Any, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        gguf = self._gguf
        raw = info.data.reshape(-1, info.data.shape[-1])  # [rows, bytes per row]
        out = np.empty((raw.shape[0], shape[-1]), dtype)
        step = max(1, _SLAB_BYTES // (shape[-1] * 4))
        for start in range(0, raw.shape[0], step):
            try:
                block = gguf.quants.dequantize(raw[start:start + step], info.tensor_type)
            except NotImplementedError as e:
                raise GGUFError(f"{self.path}: tensor {info.name!r} is {info.tensor_type.name}, "
                                f"which gguf {_version(gguf)} cannot dequantize") from e
            out[start:start + step] = block
        return out.reshape(shape)

