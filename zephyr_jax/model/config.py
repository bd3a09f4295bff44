"""MistralConfig: the architecture, with Hugging Face's field names, plus the JAX-side compute settings."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp
import numpy as np

from zephyr_jax.sharding import rules_table

# Fields that describe the architecture and appear in a Hugging Face config.json.
HF_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "rope_theta", "sliding_window", "tie_word_embeddings", "bos_token_id", "eos_token_id",
    "pad_token_id", "attention_dropout",
)
# HF config.json keys that carry no architecture information and are accepted silently.
_HF_IGNORED = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "_name_or_path", "output_hidden_states", "output_attentions", "return_dict", "is_encoder_decoder",
    "id2label", "label2id", "problem_type", "chunk_size_feed_forward", "rope_scaling", "rope_parameters",
    "tokenizer_class",
}
# What transformers' MistralConfig assumes for a key config.json leaves out, where it differs from the defaults
# below (Mistral-7B-v0.1's values, which its config.json states).
_HF_CLASS_DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 4096 * 32}
INT32_MAX = 2 ** 31 - 1  # the most a size may be: jax indexes (and shapes) in int32
ATTENTION_IMPLS = ("auto", "xla", "splash", "cudnn")  # model/attention.py attend's kernels
REMAT_POLICIES = ("none", "full", "save_dots", "save_all_but_mlp", "offload")  # see model/mistral.py remat_policy


@dataclasses.dataclass(frozen=True)
class MistralConfig:
    """The architecture under Hugging Face's config.json names (defaults: Mistral-7B-v0.1's; `from_hf_dict` /
    `to_hf_dict` read and write config.json), then the JAX-side settings: compute and storage dtypes, the
    attention kernel, remat, the layer scan and the sharding rules. Frozen and hashable: jit keys on it."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8  # None: num_attention_heads (transformers' reading of a null)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: int | None = 4096  # a query sees at most this many keys, itself included (HF semantics)
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int | tuple[int, ...] = 2  # a tuple where config.json lists several (exports write them back)
    pad_token_id: int | None = None
    attention_dropout: float = 0.0
    # JAX-side settings (not part of the HF config).
    dtype: Any = jnp.float32  # compute dtype of activations and matmuls
    param_dtype: Any = jnp.float32  # storage dtype of the parameters
    attention_impl: str = "auto"  # "auto": splash on TPUs, cuDNN on GPUs, einsum ("xla") elsewhere
    remat: str = "none"  # what the backward pass recomputes of each layer: one of REMAT_POLICIES
    scan_layers: bool = True  # False: the layer scan fully unrolled (one compiled copy per layer; XLA cost analysis)
    sharding_rules: Any = None  # logical axis -> mesh axes for activations (None: sharding.DEFAULT_RULES)

    def __post_init__(self):
        # Types first: a "4096" string or a "False" (truthy) from a hand-written dict crashed later, or ran wrong.
        whole = lambda x: isinstance(x, (int, np.integer)) and not isinstance(x, bool)  # noqa: E731
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) is None and name in ("num_key_value_heads", "head_dim"):  # defaults below
                continue
            if not whole(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be a whole number >= 1")
            if getattr(self, name) > INT32_MAX:  # jax's int32 shapes and indices: an OverflowError naming none
                raise ValueError(f"{name}={getattr(self, name)}: above 2**31 - 1, more than int32 indices can address")
        if not (self.sliding_window is None or whole(self.sliding_window)):
            raise ValueError(f"sliding_window={self.sliding_window!r}: a whole number or None")
        for name in ("tie_word_embeddings", "scan_layers"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name}={getattr(self, name)!r}: must be True or False")
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
            if self.head_dim < 1:  # more heads than hidden units: a model with empty heads ran on
                raise ValueError(f"head_dim=0 (hidden_size={self.hidden_size} // num_attention_heads="
                                 f"{self.num_attention_heads}): must be at least 1")
        if self.head_dim % 2:  # (numpy's "array split does not result in an equal division" named nothing)
            raise ValueError(f"head_dim={self.head_dim}: must be even, RoPE rotates the two halves of each head "
                             "(where not given, it is hidden_size / num_attention_heads)")
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if isinstance(self.eos_token_id, list):  # from JSON; a tuple keeps the config hashable
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r}: only 'silu' (SwiGLU) is implemented")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r}: expected one of {ATTENTION_IMPLS}")
        if isinstance(self.remat, bool):  # older configs: remat=True recomputed whole layers
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}: expected one of {REMAT_POLICIES}")
        real = lambda x: isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)  # noqa: E731
        for name in ("rope_theta", "rms_norm_eps"):  # a NaN loss at the first step, blamed on the learning rate
            if not (real(getattr(self, name)) and getattr(self, name) > 0):  # (True ran as 1, "1e6" failed unnamed)
                raise ValueError(f"{name}={getattr(self, name)!r}: must be a positive number")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window={self.sliding_window} must be positive or None")
        object.__setattr__(self, "sharding_rules", rules_table(self.sharding_rules))  # hashable: jit keys on it
        for name in ("dtype", "param_dtype"):  # accept "bfloat16" strings from configs and the command line
            object.__setattr__(self, name, jnp.dtype(getattr(self, name)))
            if not jnp.issubdtype(getattr(self, name), jnp.floating):  # int8 failed deep in jax.random
                raise ValueError(f"{name}={getattr(self, name)}: a floating-point dtype (float32, bfloat16, ...)")

    @classmethod
    def mistral_7b_v0_1(cls, **overrides) -> MistralConfig:
        """mistralai/Mistral-7B-v0.1 (the defaults above are its values)."""
        return cls(**overrides)

    def replace(self, **changes) -> MistralConfig:
        return dataclasses.replace(self, **changes)

    @property
    def matmul_params(self) -> int:
        """The weights each token is multiplied by (N of the FLOP count): the layers' projections and the LM head;
        not the embedding lookup or the RMSNorm scales."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        mlp = 3 * h * self.intermediate_size
        return self.num_hidden_layers * (attn + mlp) + self.vocab_size * h

    @property
    def num_params(self) -> int:
        norm_scales = (2 * self.num_hidden_layers + 1) * self.hidden_size
        embedding = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size  # tied: the LM head's
        return self.matmul_params + norm_scales + embedding

    @classmethod
    def from_hf_dict(cls, d: dict, **jax_settings) -> MistralConfig:
        """Builds the config from a HF config.json dict; refuses other architectures and unknown fields."""
        if not isinstance(d, dict):  # (a list's missing .get was an AttributeError naming nothing)
            raise ValueError(f"a JSON object of config fields, not a {type(d).__name__}")
        arch = d.get("architectures") or []
        if d.get("model_type", "mistral") != "mistral" or any(a != "MistralForCausalLM" for a in arch):
            raise ValueError(f"config.json describes model_type={d.get('model_type')!r}, architectures={arch}; "
                             "zephyr_jax loads only Mistral (MistralForCausalLM) checkpoints")
        rope = d.get("rope_scaling") or {}
        params = d.get("rope_parameters") or {}
        if (rope and rope.get("rope_type", rope.get("type")) not in (None, "default")) or \
                params.get("rope_type", "default") != "default":
            raise ValueError(f"rope scaling {rope or params} is not supported (Mistral-7B-v0.1 uses plain RoPE)")
        quantization = d.get("quantization_config")
        if quantization:  # (its packed weights and scales failed as "tensors this Mistral config does not use")
            method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
            raise ValueError(f"quantization_config (quant_method={method!r}): quantized checkpoints are not "
                             "supported; load the unquantized weights")
        # Keys starting with "_" are transformers' bookkeeping (e.g. _attn_implementation_autoset, 4.48-4.50).
        unknown = sorted(k for k in d if k not in HF_FIELDS and k not in _HF_IGNORED and not k.startswith("_"))
        if unknown:
            raise ValueError(f"config.json has fields zephyr_jax does not know: {unknown}")
        fields = {**_HF_CLASS_DEFAULTS, **{k: d[k] for k in HF_FIELDS if k in d}}
        nested = rope or params  # transformers>=5: a rope_scaling replaces rope_parameters; its theta comes first
        if "rope_theta" in nested:
            fields["rope_theta"] = nested["rope_theta"]
        if isinstance(fields.get("bos_token_id"), list):
            fields["bos_token_id"] = fields["bos_token_id"][0]
        return cls(**fields, **jax_settings)

    @classmethod
    def from_json_file(cls, file: str, **jax_settings) -> MistralConfig:
        """from_hf_dict of a config.json (or a workdir's model_config.json), the file named in any error."""
        with open(file) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}: not valid JSON ({e})") from e
        try:
            return cls.from_hf_dict(d, **jax_settings)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{file}: {e}") from e

    def to_hf_dict(self) -> dict:
        d = {k: getattr(self, k) for k in HF_FIELDS}
        d["eos_token_id"] = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        d["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": "default"}  # transformers>=5 reads this
        d.update(architectures=["MistralForCausalLM"], model_type="mistral",
                 torch_dtype=str(jnp.dtype(self.param_dtype)), use_cache=True)
        return d

