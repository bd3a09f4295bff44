"""Hugging Face <-> JAX: Mistral weights (safetensors only) and config.json.

    model, tok = zephyr_jax.load("path/or/hub-name", dtype="bfloat16")   # reads through hf.read_weights
    model = hf.load_pretrained("path/or/hub-name", dtype=jnp.float32)      # the same reader, model only
    hf.save_pretrained(model, out_dir, tokenizer=tok)                     # transformers loads out_dir

Both directions go one tensor at a time, so the host never holds a second copy of the model: loading reads
each tensor in row blocks straight into one buffer in the parameter's layout and dtype, places it on its
device(s) and drops the host copy; saving fetches one parameter and writes it in row blocks. The safetensors
format (an 8-byte header length, a JSON header, raw little-endian bytes) is read and written here directly
rather than through `safetensors`: its writer wants every tensor of a shard in memory at once, a memory-mapped
read adds each tensor's pages to the process's RSS, and the numpy API of the older releases setup.py allows
has no bfloat16.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import struct

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from zephyr_jax.hub import hub_error, local_dir
from zephyr_jax.model import Mistral, MistralConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# What a hub download fetches: transformers' files only (Mistral's own repos also hold consolidated.safetensors,
# the same weights again under mistral-inference's names).
HUB_PATTERNS = ["*.json", "model*.safetensors", "tokenizer.model"]

# ---------------------------------------------------------------------------------------------------------
# The name mapping, shared by import and export. HF tensor name <-> dotted path of the parameter in Mistral;
# True marks a Linear: HF stores weight [out, in], our kernel is [in, out] (the transpose). The decoder layers'
# parameters are stacked on a leading axis (the model scans over them): HF's "model.layers.{i}.X" is slice i
# of our "layers.X". In HF's module order, which is also the order the tensors are saved in.
NAME_TABLE = (
    ("model.embed_tokens.weight", "embed_tokens", False),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers.self_attn.q_proj.kernel", True),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers.self_attn.k_proj.kernel", True),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers.self_attn.v_proj.kernel", True),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.self_attn.o_proj.kernel", True),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers.mlp.gate_proj.kernel", True),
    ("model.layers.{i}.mlp.up_proj.weight", "layers.mlp.up_proj.kernel", True),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.mlp.down_proj.kernel", True),
    ("model.layers.{i}.input_layernorm.weight", "layers.input_layernorm.scale", False),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.post_attention_layernorm.scale", False),
    ("model.norm.weight", "norm.scale", False),
    ("lm_head.weight", "lm_head.kernel", True),  # absent when tie_word_embeddings
)
# Buffers some checkpoints carry that are recomputed, not loaded.
IGNORED_TENSORS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_HF_PATTERNS = [(re.compile(re.escape(hf).replace(r"\{i\}", r"(\d+)")), flax, t) for hf, flax, t in NAME_TABLE]


def hf_to_flax_name(hf_name: str) -> tuple[str, int | None, bool] | None:
    """"model.layers.3.mlp.up_proj.weight" -> ("layers.mlp.up_proj.kernel", 3, True): the parameter, the
    layer (its slice of the stacked parameter; None outside the layers) and whether HF stores it transposed.
    None if it is not a Mistral tensor name."""
    for pattern, flax, transposed in _HF_PATTERNS:
        m = pattern.fullmatch(hf_name)
        if m:
            return flax, (int(m.group(1)) if m.groups() else None), transposed
    return None


def flax_to_hf_name(flax_name: str, layer: int | None = None) -> tuple[str, bool]:
    """("layers.mlp.up_proj.kernel", 3) -> ("model.layers.3.mlp.up_proj.weight", True)."""
    for hf, flax, transposed in NAME_TABLE:
        if flax == flax_name and ("{i}" in hf) == (layer is not None):
            return hf.format(i=layer), transposed
    raise KeyError(f"parameter {flax_name!r} (layer {layer}) has no Hugging Face name (see NAME_TABLE in "
                   "zephyr_jax/hf.py)")


def hf_names(cfg: MistralConfig) -> list[str]:
    """Every HF tensor name of a Mistral with this config, in HF's module order."""
    per_layer = [hf for hf, _, _ in NAME_TABLE if "{i}" in hf]
    names = ["model.embed_tokens.weight"]
    names += [t.format(i=i) for i in range(cfg.num_hidden_layers) for t in per_layer]
    names.append("model.norm.weight")
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def _dotted(path) -> str:
    """A state path (tuple of names/indices, or jax key path entries) as "layers.0.mlp.up_proj.kernel"."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator=".")


# ---------------------------------------------------------------------------------------------------------
# The safetensors format: u64 little-endian header length, JSON header {name: {dtype, shape, data_offsets}},
# then the tensors' bytes. Offsets are relative to the end of the header.
_ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(jnp.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(bool),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_BLOCK_BYTES = 32 * 2**20  # tensors move between file and host in row blocks of about this size
# A Linear's kernel is HF's tensor transposed: a block copied to or from its transposed view as one numpy copy
# walks the strided side element by element, a cache miss each (at 7B's width 80% of a load's time). Copied in
# strips of this many rows or columns, each strip reads and writes contiguous runs: one 7B MLP weight moves
# 2.5-3.5x faster (bench/RESULTS.md, "At 7B's width").
_STRIP = 64


def _row_blocks(shape, itemsize):
    """Slices of the first axis, each about _BLOCK_BYTES of a C-order array of this shape."""
    row_bytes = math.prod(shape[1:]) * itemsize
    rows = max(1, _BLOCK_BYTES // max(row_bytes, 1))
    return [slice(r, min(r + rows, shape[0])) for r in range(0, shape[0], rows)]


def read_safetensors_header(file: str) -> tuple[dict, int]:
    """({tensor name: {dtype, shape, data_offsets}}, byte offset where the data starts) of one file."""
    with open(file, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < n <= 100_000_000:
            raise ValueError(f"{file} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} has a corrupt safetensors header: {e}") from e
    header.pop("__metadata__", None)
    return header, 8 + n


def tensor_layout(file: str, name: str, info: dict) -> tuple[np.dtype, tuple, int]:
    """(dtype, shape, byte offset from the data start) of one tensor of a header, checked for consistency."""
    if info["dtype"] not in _ST_DTYPES:
        raise ValueError(f"{file}: tensor {name} has dtype {info['dtype']}, which zephyr_jax cannot load")
    dtype, shape = _ST_DTYPES[info["dtype"]], tuple(info["shape"])
    begin, end = info["data_offsets"]
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"{file}: tensor {name} has {end - begin} bytes for shape {shape} {info['dtype']}")
    return dtype, shape, begin


def _read_into(file: str, offset: int, dtype: np.dtype, shape: tuple, target: np.ndarray, name: str):
    """Reads a C-order [shape] tensor of `dtype` at `offset` into `target` (any view of that shape), casting
    as it goes; only one row block (and its cast) is ever held besides the target."""
    block = np.empty((_row_blocks(shape, dtype.itemsize)[0].stop, *shape[1:]), dtype) if shape[0] else None
    with open(file, "rb") as f:
        f.seek(offset)
        for rows in _row_blocks(shape, dtype.itemsize):
            part = block[: rows.stop - rows.start]
            if f.readinto(part.reshape(-1).view(np.uint8)) != part.nbytes:
                raise ValueError(f"{file} is truncated inside tensor {name}")
            _copy_into(target[rows], part)


def _copy_into(target: np.ndarray, block: np.ndarray) -> None:
    """target[...] = block cast to target's dtype; a transposed target (a kernel) in strips of _STRIP rows, the
    block cast first so that each strip is a plain copy."""
    if target.ndim != 2 or target.flags.c_contiguous:
        np.copyto(target, block, casting="unsafe")
        return
    block = block.astype(target.dtype, copy=False)
    for r in range(0, block.shape[0], _STRIP):
        np.copyto(target[r:r + _STRIP], block[r:r + _STRIP])


def _contiguous(view: np.ndarray, dtype) -> np.ndarray:
    """A C-order copy of `view` in `dtype`; a transposed view (a kernel in HF's layout) in strips of _STRIP
    columns."""
    if view.ndim != 2 or view.flags.c_contiguous:
        return np.ascontiguousarray(view, dtype=dtype)
    out = np.empty(view.shape, dtype)
    for c in range(0, view.shape[1], _STRIP):
        np.copyto(out[:, c:c + _STRIP], view[:, c:c + _STRIP], casting="unsafe")
    return out


def _write_safetensors(file: str, tensors: list[tuple[str, tuple, np.dtype, callable]], metadata: dict):
    """Writes (name, shape, dtype, blocks) entries; blocks() yields one tensor's C-order row blocks."""
    header, offset = {"__metadata__": metadata}, 0
    for name, shape, dtype, _ in tensors:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad so the data starts 8-byte aligned, as safetensors does
    tmp = file + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape, dtype, blocks in tensors:
            written = 0
            for block in blocks():
                assert block.dtype == dtype and block.flags.c_contiguous, (name, block.dtype)
                written += f.write(block.reshape(-1).view(np.uint8))  # raw bytes (bfloat16 has no buffer format)
            if written != math.prod(shape) * dtype.itemsize:
                raise AssertionError(f"{name}: wrote {written} bytes for shape {shape} {dtype}")
    os.replace(tmp, file)  # a crash mid-write leaves no truncated shard behind


# ---------------------------------------------------------------------------------------------------------
# Loading.

def resolve(path_or_hub_name: str) -> str:
    """A local checkpoint directory, downloading a hub name (config, safetensors, tokenizer) when needed.
    FileNotFoundError, on one line, for a name the hub does not give (no such repo, no network, a gated model):
    the CLIs print it as their error."""
    path = local_dir(path_or_hub_name, "checkpoint directory")
    if path is not None:
        return path
    try:
        return huggingface_hub.snapshot_download(path_or_hub_name, allow_patterns=HUB_PATTERNS)
    except Exception as e:
        raise FileNotFoundError(f"{path_or_hub_name!r} is not a local directory and could not be fetched from the "
                                f"Hugging Face Hub ({hub_error(e)}). Check the name, your network / HF_HUB_OFFLINE, "
                                "and your token for gated models, or pass a local directory.") from e


def load_config(path: str, **jax_settings) -> MistralConfig:
    """The MistralConfig of a checkpoint directory's config.json, with JAX-side settings (dtype, remat...)."""
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}: not a Hugging Face model directory")
    return MistralConfig.from_json_file(file, **jax_settings)


def _weight_files(path: str) -> dict[str, str]:
    """{HF tensor name: file} from the index of a sharded checkpoint, or from model.safetensors."""
    index, single = os.path.join(path, INDEX_NAME), os.path.join(path, WEIGHTS_NAME)
    if os.path.exists(single):  # transformers prefers the single file too
        header, _ = read_safetensors_header(single)
        return {name: single for name in header}
    if os.path.exists(index):
        with open(index) as f:
            try:
                index_json = json.load(f)
            except json.JSONDecodeError as e:  # (a bare JSONDecodeError named no file)
                raise ValueError(f"{index}: not valid JSON ({e})") from e
        weight_map = index_json.get("weight_map") if isinstance(index_json, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map")
        files = {name: os.path.join(path, file) for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not os.path.exists(file):
                raise FileNotFoundError(f"{index} lists shard {os.path.basename(file)}, which is missing")
        return files
    torch_files = [os.path.basename(f) for ext in ("bin", "pt", "pth", "ckpt")
                   for f in glob.glob(os.path.join(path, f"*.{ext}"))]
    if torch_files:
        raise ValueError(
            f"{path} holds only PyTorch pickle weights ({', '.join(sorted(torch_files))}); zephyr_jax loads "
            "safetensors only. Convert once with transformers: AutoModelForCausalLM.from_pretrained(dir)"
            ".save_pretrained(dir, safe_serialization=True)")
    raise FileNotFoundError(f"{path} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")


def _check_names(files: dict[str, str], params: dict) -> set[str]:
    """Every parameter has exactly one tensor and every tensor a parameter; otherwise say which. Returns the
    names of the tensors to read."""
    layers = params["layers.input_layernorm.scale"].get_value().shape[0]
    expected = {flax_to_hf_name(p, i)[0]
                for p in params for i in (range(layers) if p.startswith("layers.") else [None])}
    present = {n for n in files if not IGNORED_TENSORS.fullmatch(n)}
    if "lm_head.weight" not in expected:  # tied: some savers also write the head, which the embedding replaces
        present.discard("lm_head.weight")
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    where = sorted({os.path.basename(f) for f in files.values()})
    if missing:
        raise ValueError(f"checkpoint ({', '.join(where)}) is missing {len(missing)} tensor(s): "
                         f"{', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
    if unexpected:
        raise ValueError(f"checkpoint ({', '.join(where)}) has {len(unexpected)} tensor(s) this Mistral config "
                         f"does not use: {', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}")
    return present


def _check_tied_head(files: dict[str, str], headers: dict) -> None:
    """A tied config whose checkpoint also holds an `lm_head.weight` (some savers write both): the embedding
    replaces it when it is the embedding's copy; a head of its own is refused, not dropped (transformers then
    unties them and keeps the head)."""
    names = ("lm_head.weight", "model.embed_tokens.weight")
    if not all(n in files and n in headers[files[n]][0] for n in names):
        return

    def layout(name):  # (its header entry, the file offset of its first byte)
        header, data_start = headers[files[name]]
        return header[name], data_start + header[name]["data_offsets"][0]

    (head, head_start), (embed, embed_start) = layout(names[0]), layout(names[1])
    same = head["dtype"] == embed["dtype"] and head["shape"] == embed["shape"]
    size = head["data_offsets"][1] - head["data_offsets"][0]
    with open(files[names[0]], "rb") as h, open(files[names[1]], "rb") as e:
        h.seek(head_start), e.seek(embed_start)
        for start in range(0, size if same else 0, _BLOCK_BYTES):
            n = min(_BLOCK_BYTES, size - start)  # not past the tensor's end: other tensors follow
            if h.read(n) != e.read(n):
                same = False
                break
    if not same:
        raise ValueError(f"config.json sets tie_word_embeddings=true, but the checkpoint's lm_head.weight "
                         f"({head['dtype']} {head['shape']}) differs from model.embed_tokens.weight: set "
                         "tie_word_embeddings to false in config.json to load its own head (transformers unties "
                         "them)")


def _flat_shardings(shardings) -> dict:
    """{dotted param name: Sharding} from a pytree of Shardings matching nnx.state(model) (load_model's)."""
    is_leaf = lambda x: isinstance(x, (jax.sharding.Sharding, nnx.Variable))
    return {_dotted(key_path): leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
            for key_path, leaf in jax.tree_util.tree_flatten_with_path(shardings, is_leaf=is_leaf)[0]}


def _aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """np.empty aligned to 64 bytes: jax on CPU then adopts the buffer instead of copying it."""
    dtype = np.dtype(dtype)
    buf = np.empty(math.prod(shape) * dtype.itemsize + align, np.uint8)
    start = -buf.ctypes.data % align
    return buf[start:start + math.prod(shape) * dtype.itemsize].view(dtype).reshape(shape)


def _read_tensor(file, name, info, data_start, transposed, target: np.ndarray) -> None:
    """One checkpoint tensor into `target` (the parameter, or one layer's slice of it: _checked_weights has
    checked its shape)."""
    dtype, shape, begin = tensor_layout(file, name, info)
    _read_into(file, data_start + begin, dtype, shape, target.T if transposed else target, name)


def _checked_weights(path: str, params: dict) -> tuple[dict, dict, set]:
    """(files, headers, names to read) of the weights in `path` for `params` ({dotted name: abstract Variable}),
    checked from the headers and file sizes alone: every tensor present and used, of a dtype and the shape the
    config needs, its bytes inside its file."""
    files = _weight_files(path)
    used = _check_names(files, params)
    headers = {file: read_safetensors_header(file) for file in sorted(set(files.values()))}
    for name in used:
        file = files[name]
        header, data_start = headers[file]
        if name not in header:
            raise ValueError(f"{file} lacks tensor {name}, which the index places in it")
        dtype, shape, begin = tensor_layout(file, name, header[name])
        flax_name, layer, transposed = hf_to_flax_name(name)
        need = params[flax_name].get_value().shape[0 if layer is None else 1:]  # (a layer's slice of the stack)
        need = tuple(need[::-1] if transposed else need)
        if shape != need:
            raise ValueError(f"{file}: tensor {name} has shape {shape}, but the config needs {need}")
        if data_start + begin + math.prod(shape) * dtype.itemsize > os.path.getsize(file):
            raise ValueError(f"{file} is truncated inside tensor {name}")
    return files, headers, used


def check_weights(path: str, cfg: MistralConfig) -> None:
    """read_weights' checks without reading any weight but a tied config's head (seconds for a 7B): what training
    runs before its data work, so a wrong or damaged checkpoint is named before minutes of tokenizing."""
    _, state = nnx.split(nnx.eval_shape(lambda: Mistral(cfg, rngs=nnx.Rngs(0))))
    files, headers, _ = _checked_weights(path, {_dotted(p): var for p, var in nnx.to_flat_state(state)})
    if cfg.tie_word_embeddings:
        _check_tied_head(files, headers)


def read_weights(path: str, cfg: MistralConfig, shardings) -> Mistral:
    """A Mistral(cfg) holding the safetensors weights of the local HF directory `path` (internal: the reader
    behind zephyr_jax.load, which resolves hub names and builds `cfg` from config.json).

    Parameters are stored in cfg.param_dtype. shardings: a pytree of jax Shardings matching nnx.state(model)
    (load_model's: NamedShardings over sharding.param_specs, or the default device's).
    """
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Mistral(cfg, rngs=nnx.Rngs(0))))
    params = {_dotted(p): var for p, var in nnx.to_flat_state(state)}  # values: ShapeDtypeStructs
    placement = _flat_shardings(shardings)
    files, headers, used = _checked_weights(path, params)
    if cfg.tie_word_embeddings:
        _check_tied_head(files, headers)
    sources = {}  # parameter -> [(layer, HF name)], in file order so each file is read front to back
    for name in sorted(used, key=lambda n: (files[n], headers[files[n]][0].get(n, {}).get("data_offsets", [0]))):
        flax_name, layer, _ = hf_to_flax_name(name)
        sources.setdefault(flax_name, []).append((layer, name))

    for flax_name, parts in sources.items():
        var = params[flax_name]
        abstract = var.get_value()
        host = _aligned_empty(abstract.shape, abstract.dtype)  # the one host copy, in the parameter's layout
        for layer, name in parts:
            file = files[name]
            header, data_start = headers[file]
            _, _, transposed = hf_to_flax_name(name)
            target = host if layer is None else host[layer]
            _read_tensor(file, name, header[name], data_start, transposed, target)
        array = _place_weight(host, placement[flax_name], flax_name, path)
        var.set_value(array.block_until_ready())  # bounded memory: the host copy goes before the next parameter
    return nnx.merge(graphdef, state)


def _place_weight(host: np.ndarray, sharding, name: str, path: str) -> jax.Array:
    """A parameter's host copy on its sharding. Over several processes each places only the shards its devices
    hold, once a digest of its copy matches process 0's: jax.device_put all-gathered the whole parameter from every
    process onto every device to compare the copies (Mistral-7B's stacked MLP weights, 7.5 GB in float32, times
    the processes on each chip)."""
    if sharding.is_fully_addressable:
        # A fresh buffer of our own, so letting the CPU backend alias it is safe; elsewhere this is the transfer.
        return jax.device_put(host, sharding, may_alias=True)
    if len({d.process_index for d in sharding.device_set}) == jax.process_count():  # (each process gets here)
        digest = hashlib.blake2b(np.ascontiguousarray(host).reshape(-1).view(np.uint8), digest_size=16).digest()
        everyone = multihost_utils.process_allgather(np.frombuffer(digest, np.uint8))  # [processes, 16]
        differ = [p for p in range(len(everyone)) if not np.array_equal(everyone[p], everyone[0])]
        if differ:  # raised on every process alike, so none waits for the others in a collective
            raise ValueError(f"parameter {name} of {path} differs between processes {differ} and process 0: every "
                             "process must read the same weights (a host's copy of the checkpoint is stale, or "
                             "another model's)")
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index], dtype=host.dtype)


# ---------------------------------------------------------------------------------------------------------
# Saving.

def parse_size(size: int | str) -> int:
    """Bytes from an int or "5GB" / "200MB" / "10KB" (powers of 10) / "1GiB" / "512MiB" (powers of 2)."""
    if isinstance(size, float) and size.is_integer():  # 1e9
        size = int(size)
    if isinstance(size, int):
        return size
    if not isinstance(size, str):
        raise ValueError(f"max_shard_size={size!r}: use an int (bytes) or a string such as '5GB' or '200MB'")
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]i?B)?\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size={size!r}: use an int (bytes) or a string such as '5GB' or '200MB'")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(m.group(1)) * scale


def _fetch(x: jax.Array) -> np.ndarray:
    """x on the host, leaving no copy behind: np.asarray(x) caches the host copy on x for x's lifetime (a
    sharded or accelerator array would keep a second model on the host after a save). Reading through a fresh
    Array over the same device buffers caches on that one instead, which goes when we are done."""
    if not x.is_fully_addressable:
        raise ValueError("save_pretrained needs every parameter addressable from this process (single host); "
                         "on a multi-host mesh, gather the parameters first or export from an orbax checkpoint")
    shards = [s.data for s in x.addressable_shards]
    return np.asarray(jax.make_array_from_single_device_arrays(x.shape, x.sharding, shards))


class _LayerSlice:
    """Layer `layer` of a stacked parameter, sliced on the device only when the writer reaches it."""

    def __init__(self, param, layer: int):
        self.param, self.layer, self.shape = param, layer, param.shape[1:]

    def fetch(self) -> np.ndarray:
        return _fetch(self.param[self.layer])


def _hf_blocks(param, transposed: bool, dtype, name: str = "?"):
    """One parameter in HF's layout and the save dtype, as C-order row blocks (transposed and cast per block,
    so the host holds the fetched parameter, a view of the device buffer on CPU, plus one block)."""
    host = param.fetch() if isinstance(param, _LayerSlice) else _fetch(param)
    src = host.T if transposed else host
    for rows in _row_blocks(src.shape, np.dtype(dtype).itemsize):
        with np.errstate(over="ignore"):  # an overflow is checked below, and named
            block = _contiguous(src[rows], dtype)
        # float16 tops out at 65504: a larger weight would be saved as inf, and every output NaN
        if block.dtype == np.float16 and not np.isfinite(block).all() and np.isfinite(src[rows]).all():
            big = float(np.abs(np.asarray(src[rows], np.float32)).max())
            raise ValueError(f"{name} has a value of magnitude {big:.4g}, past float16's largest (65504): save it "
                             "as bfloat16 or float32")
        yield block


# Files a tokenizer's save_pretrained may write (or an older release wrote): an earlier save's that this one does
# not overwrite would change the saved tokenizer (a special_tokens_map.json's bos, an added_tokens.json's ids).
TOKENIZER_ARTIFACTS = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                       "added_tokens.json", "chat_template.jinja", "chat_template.json")


def _remove_stale_weights(out_dir: str, keep: set[str]) -> None:
    """Drops weight files of an earlier save that this one does not overwrite (a stale model.safetensors
    would shadow a new sharded index, and old shards would linger)."""
    # (.tmp: a save killed while writing that file)
    stale = re.compile(r"(model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json)(\.tmp)?")
    for name in os.listdir(out_dir):
        if stale.fullmatch(name) and name not in keep:
            os.remove(os.path.join(out_dir, name))


def load_pretrained(path_or_name: str, dtype=jnp.float32, **options) -> Mistral:
    """transformers' name for the one loader: zephyr_jax.loading.load_model(path_or_name, dtype, **options), a
    Hugging Face directory or hub name (or a training workdir) read through read_weights; model.config is its
    MistralConfig."""
    from zephyr_jax.loading import load_model  # loading imports this module

    return load_model(path_or_name, dtype, **options)


def save_pretrained(model: Mistral, out_dir: str, tokenizer=None, max_shard_size: int | str = "5GB",
                    dtype=None, model_card: str | None = None) -> None:
    """Writes a HF checkpoint transformers loads: safetensors shards (+ index), config.json,
    generation_config.json, and the tokenizer (with its chat template) and a model card (README.md) when given.

    dtype: the saved dtype (e.g. jnp.bfloat16); default: the parameters' own dtype.
    """
    if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):  # before any file is written
        raise TypeError(f"tokenizer={tokenizer!r}: pass a tokenizer object (zephyr_jax.tokenizer.load_tokenizer("
                        "path) reads one), or None")
    cfg: MistralConfig = model.config
    if tokenizer is not None and len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens and the model a vocabulary of {cfg.vocab_size}: "
                         f"ids from {cfg.vocab_size} on have no embedding (a tokenizer with tokens added that the "
                         "model lacks). Save the model's own tokenizer")
    params = {_dotted(p): var.get_value() for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    names = hf_names(cfg)
    to_flax = {name: hf_to_flax_name(name) for name in names}
    if set(params) != {flax for flax, _, _ in to_flax.values()}:
        raise ValueError(f"the model's parameters {sorted(params)} do not match its config's HF names {names}")

    def hf_tensor(name):  # (the parameter or its layer's slice, transposed) without fetching anything yet
        flax, layer, transposed = to_flax[name]
        param = params[flax]
        return (param if layer is None else _LayerSlice(param, layer)), transposed

    tensors = {name: hf_tensor(name) for name in names}
    if dtype is not None and not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):  # int8 wrote zeros
        raise ValueError(f"save_pretrained dtype={jnp.dtype(dtype)}: a floating-point dtype (float32, bfloat16, "
                         "float16)")
    save_dtype = {name: jnp.dtype(dtype or params[to_flax[name][0]].dtype) for name in names}
    shapes = {name: t.shape[::-1] if tr else t.shape for name, (t, tr) in tensors.items()}
    sizes = {name: math.prod(shapes[name]) * save_dtype[name].itemsize for name in names}

    # transformers' own split (in order; a tensor over the limit alone) and names: model-0000k-of-0000N.safetensors
    split = huggingface_hub.split_state_dict_into_shards_factory(
        sizes, get_storage_size=lambda size: size, filename_pattern=WEIGHTS_NAME.replace(".", "{suffix}.", 1),
        max_shard_size=parse_size(max_shard_size))
    files, shards = list(split.filename_to_tensors), list(split.filename_to_tensors.values())
    os.makedirs(out_dir, exist_ok=True)
    # config.json goes first and comes back last: a save killed midway over an earlier one leaves no directory
    # that loads (transformers and zephyr_jax.load both need config.json) instead of old and new shards mixed.
    if os.path.exists(os.path.join(out_dir, CONFIG_NAME)):
        os.remove(os.path.join(out_dir, CONFIG_NAME))
    _remove_stale_weights(out_dir, keep=set(files) | ({INDEX_NAME} if split.is_sharded else set()))
    if model_card is not None:  # before the weights: a save killed after them would have had no card
        with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card)

    def blocks(name):
        tensor, transposed = tensors[name]
        return lambda: _hf_blocks(tensor, transposed, save_dtype[name], name)

    for file, shard in zip(files, shards):
        entries = [(name, shapes[name], save_dtype[name], blocks(name)) for name in shard]
        _write_safetensors(os.path.join(out_dir, file), entries, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_parameters": sum(math.prod(s) for s in shapes.values()), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        _write_json(os.path.join(out_dir, INDEX_NAME), index)

    dtype_name = str(save_dtype[names[0]])
    config = cfg.to_hf_dict()
    config.update(dtype=dtype_name, torch_dtype=dtype_name)  # transformers>=4.56 reads dtype, older torch_dtype
    _write_json(os.path.join(out_dir, "generation_config.json"), generation_config(cfg))
    if tokenizer is not None:
        for name in TOKENIZER_ARTIFACTS:
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
        tokenizer.save_pretrained(out_dir)
        _portable_tokenizer_class(out_dir)
    _write_json(os.path.join(out_dir, CONFIG_NAME), config)  # last: the directory is complete


def _portable_tokenizer_class(out_dir: str) -> None:
    """transformers 5 names a tokenizer.json-backed tokenizer `TokenizersBackend`, a class transformers 4 lacks;
    `PreTrainedTokenizerFast` (5's alias of it) reads the same tokenizer.json in both."""
    path = os.path.join(out_dir, "tokenizer_config.json")
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        tokenizer_config = json.load(f)
    if tokenizer_config.get("tokenizer_class") == "TokenizersBackend":
        tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
        _write_json(path, tokenizer_config)


def generation_config(cfg: MistralConfig) -> dict:
    """generation_config.json: BOS/EOS, and pad = EOS when the model has no pad token. transformers'
    generate() falls back to exactly that (with a warning each call); saying it here silences the warning. It
    affects only how finished rows are filled during batched generation, never training."""
    eos = cfg.to_hf_dict()["eos_token_id"]  # an int, or the list config.json gave (generate stops at each)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else eos[0] if isinstance(eos, list) else eos
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "pad_token_id": pad,
            "do_sample": False}


def _write_json(file: str, obj) -> None:
    with open(file + ".tmp", "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(file + ".tmp", file)
