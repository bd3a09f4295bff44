"""The reference nobody here wrote: transformers' PyTorch MistralForCausalLM with random weights, handed to
zephyr_jax through a safetensors directory (transformers' save_pretrained -> zephyr_jax.load)."""

from __future__ import annotations

import numpy as np
import torch
import transformers


def torch_mistral(seed=0, **fields):
    """A random-initialised PyTorch Mistral in float32 eager attention (the clearest reference)."""
    defaults = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    initializer_range=0.1, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=None,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    defaults.update(fields)
    config = transformers.MistralConfig(**defaults)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.MistralForCausalLM(config).eval().float()
    with torch.no_grad():  # the norms start at 1; perturb them so their weights are exercised too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def save_torch(model, path) -> str:
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def torch_logits(model, input_ids, attention_mask=None, position_ids=None) -> np.ndarray:
    """float32 logits as numpy, the inputs sent to the model's device (CPU in the tests, CUDA in bench/gpu_parity)."""
    device = next(model.parameters()).device
    tensor = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.long, device=device)  # noqa: E731
    with torch.no_grad():
        kw = {}
        if attention_mask is not None:
            kw["attention_mask"] = tensor(attention_mask)
        if position_ids is not None:
            kw["position_ids"] = tensor(position_ids)
        out = model(tensor(input_ids), **kw)
    return out.logits.float().cpu().numpy()


def positions_from_mask(mask) -> np.ndarray:
    """Position ids that count real tokens (what transformers' generate uses for left padding)."""
    mask = np.asarray(mask)
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)
