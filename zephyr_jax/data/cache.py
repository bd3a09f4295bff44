"""Tokenized examples cached on disk, so a restart or a second host does not tokenize the same rows again.

One file per (data, tokenizer, processing) key: `DIR/{source}-{split}-{stage}-{key}.npz`, holding each token
field concatenated with its offsets, the truncated flags and (as JSON text) the key's parts and the skip counts.
No pickle: `np.load(..., allow_pickle=False)` reads it. The key covers everything that changes the examples:

- the rows: source, split, data_dir, row limit, and the data itself: local files' paths, sizes and mtimes
  (editing a jsonl invalidates the entry), a `datasets` fingerprint for hub / URL datasets (it changes with the
  revision downloaded), the files of a TFDS dataset's directory. Rows that cannot be fingerprinted are not cached.
- the tokenizer: its full backend definition (vocabulary, merges, normalizer, post-processor), chat template,
  special tokens and encoding flags; transformers' and tokenizers' versions.
- the processing: stage, the example builder's arguments (loss_on, max_length, too_long, max_prompt_length),
  on_bad_row, and the source code of the modules that turn rows into examples, plus FORMAT_VERSION (this layout).

Entries are written atomically (a temporary file, then os.replace): a crash never leaves a truncated file, and
a file that cannot be read or was written for another key is reported and rebuilt.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from zephyr_jax.data.errors import SkipCounter
from zephyr_jax.data.preference import PreferenceExample
from zephyr_jax.data.sft import SFTExample
from zephyr_jax.data.sources import local_files

FORMAT_VERSION = 1  # bump when the file layout changes
ENV_VAR = "ZEPHYR_JAX_CACHE"
DEFAULT_DIR = "~/.cache/zephyr_jax/tokenized"
# Stage -> (example type, its token fields). Every other field but `truncated` must be None to be cached.
LAYOUT = {"sft": (SFTExample, ("ids", "loss_mask")), "dpo": (PreferenceExample, ("prompt", "chosen", "rejected"))}
# The modules whose code decides what a row becomes: editing one invalidates every entry.
CODE = ("zephyr_jax.data.sources", "zephyr_jax.data.pipeline", "zephyr_jax.data.sft", "zephyr_jax.data.preference",
        "zephyr_jax.data.conversation", "zephyr_jax.data.errors", "zephyr_jax.tokenizer")
# Tokenizer settings that change encoding but may live outside the backend definition.
TOKENIZER_FLAGS = ("add_bos_token", "add_eos_token", "legacy", "add_prefix_space", "clean_up_tokenization_spaces")


def cache_dir(setting: str | None) -> str | None:
    """The cache directory: `setting`, else $ZEPHYR_JAX_CACHE, else DEFAULT_DIR; None when "" (caching off)."""
    if setting is None:
        setting = os.environ.get(ENV_VAR, DEFAULT_DIR)
    return os.path.abspath(os.path.expanduser(setting)) if setting else None


# --------------------------------------------------------------------------------------------------- the key


def key_parts(*, stage: str, source, split, data_dir, limit, rows, tok, args: dict, on_bad_row: str) -> dict | None:
    """Everything that decides the examples, as JSON-able values; None when the rows cannot be fingerprinted
    (then nothing is cached: a cache that might serve stale data is worse than none). `rows` are the loaded
    rows before the limit is applied (None for local files, which their stat alone fingerprints)."""
    data = data_fingerprint(os.fspath(source), split, rows)
    if data is None:
        return None
    import tokenizers
    import transformers

    return {"format": FORMAT_VERSION, "stage": stage, "source": os.fspath(source), "split": split,
            "data_dir": None if data_dir is None else os.fspath(data_dir), "limit": limit, "data": data,
            "tokenizer": tokenizer_fingerprint(tok), "args": args, "on_bad_row": on_bad_row, "code": code_hash(),
            "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__}}


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def data_fingerprint(source: str, split, rows):
    """Local files: [[path, size, mtime_ns], ...]; hub / URL datasets: their `datasets` fingerprint (computed
    from the downloaded revision's cache files); TFDS: its directory's files; None if none of these applies."""
    files = local_files(source, split)
    if files is not None:
        return _stat(files)
    tfds_dir = getattr(getattr(getattr(rows, "source", None), "dataset_info", None), "data_dir", None)
    if source.startswith("tfds:"):
        return _stat(sorted(str(p) for p in Path(tfds_dir).rglob("*") if p.is_file())) if tfds_dir else None
    fingerprint = getattr(rows, "_fingerprint", None)
    return {"datasets_fingerprint": fingerprint} if fingerprint else None


def _stat(files) -> list:
    return [[os.path.abspath(f), (st := os.stat(f)).st_size, st.st_mtime_ns] for f in files]


def tokenizer_fingerprint(tok) -> str:
    """A hash of what the tokenizer does (not where it was loaded from: hosts may keep their copies in different
    places)."""
    backend = getattr(tok, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else sorted(tok.get_vocab().items())
    flags = {k: getattr(tok, k, tok.init_kwargs.get(k)) for k in TOKENIZER_FLAGS}
    return digest({"class": type(tok).__name__, "definition": definition, "template": tok.chat_template,
                   "special": {k: str(v) for k, v in tok.special_tokens_map.items()},
                   "flags": {k: v if isinstance(v, (bool, int, float, str, type(None))) else str(v)
                             for k, v in flags.items()}})


def code_hash() -> str:
    import importlib

    h = hashlib.sha256()
    for name in CODE:  # (import_module: the loaded module, or loaded now)
        h.update(Path(importlib.import_module(name).__file__).read_bytes())
    return h.hexdigest()


def _label(parts: dict) -> str:
    """{source}-{split}-{stage}: the readable start of an entry's file name (for people; the key alone decides)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{Path(parts['source']).name}-{parts['split']}-{parts['stage']}")[:80]


def entry_path(directory: str, parts: dict) -> str:
    """DIR/{label}-{key}.npz."""
    return os.path.join(directory, f"{_label(parts)}-{digest(parts)[:24]}.npz")


# ------------------------------------------------------------------------------------------ writing, reading


def write(path: str, examples: list, counter: SkipCounter, parts: dict, log: Callable = print) -> bool:
    """Writes the entry atomically; a failure (disk full, read-only directory) is reported, never raised: the
    run goes on with the examples it has."""
    kind = _kind(parts)
    arrays = _pack(examples, LAYOUT[kind][1])
    arrays["meta"] = np.array(json.dumps({"key": digest(parts), "parts": parts, "counter": _counter_state(counter)},
                                         default=str))
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=os.path.basename(path) + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        log(f"warning: could not write the tokenized-example cache {path}: {e}")
        return False
    finally:  # also after Ctrl-C or a MemoryError mid-write: no half-written file is left (after os.replace
        if tmp and os.path.exists(tmp):  # the temporary name no longer exists)
            os.remove(tmp)
    # Temporary files of this entry left by a writer killed mid-write (kill -9 skips the `finally`): each is a
    # whole entry's size. One still being written by another run makes that run's replace fail, which it reports.
    for stale in glob.glob(glob.escape(path) + ".*.tmp"):
        try:
            os.remove(stale)
        except OSError:
            pass
    _remove_superseded(path, parts, log)
    return True


# An entry for the same local data files (paths), split and settings whose files have since changed (sizes or
# mtimes) can never be read again: the newer entry replaces it (~1.3 GiB for UltraChat's train split). Entries of
# other code or library versions are kept (another checkout or environment may still read them).


def _file_paths(data):
    """The paths of a key's local data files ([path, size, mtime] each), or None (a hub dataset's fingerprint)."""
    if isinstance(data, list) and data and all(isinstance(f, list) and len(f) == 3 for f in data):
        return [f[0] for f in data]
    return None


def _remove_superseded(path: str, parts: dict, log: Callable) -> None:
    new = json.loads(json.dumps(parts, default=str))
    if _file_paths(new["data"]) is None:
        return
    rest = {k: v for k, v in new.items() if k != "data"}
    for other in glob.glob(os.path.join(glob.escape(os.path.dirname(path)), glob.escape(_label(parts)) + "-*.npz")):
        try:
            if os.path.samefile(other, path):
                continue
            with np.load(other, allow_pickle=False) as npz:
                old = json.loads(str(npz["meta"]))["parts"]
            if _file_paths(old.get("data")) == _file_paths(new["data"]) and \
                    {k: v for k, v in old.items() if k != "data"} == rest:
                os.remove(other)
                log(f"removed the superseded tokenized-example cache {other} (its data files have changed)")
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # removed by another run meanwhile, or junk
            continue


def read(path: str, parts: dict, log: Callable = print):
    """(examples, SkipCounter) from the entry at `path`, or None when there is none. A file that cannot be read
    or was written for another key is reported and ignored (the caller rebuilds it)."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
            if meta.get("key") != digest(parts):
                log(f"warning: ignoring the tokenized-example cache {path}: it was written for another key")
                return None
            fields = LAYOUT[_kind(parts)][1]
            arrays = {name: npz[name] for name in npz.files if name != "meta"}
        return _unpack(arrays, _kind(parts), fields), _counter_from(meta["counter"])
    except Exception as e:  # noqa: BLE001 (a truncated zip, a missing array, bad JSON: all mean "rebuild it")
        log(f"warning: ignoring the unreadable tokenized-example cache {path} ({type(e).__name__}: {e}); "
            "rebuilding it")
        return None


def _kind(parts: dict) -> str:
    return "sft" if parts["stage"] == "sft" else "dpo"


def _pack(examples: list, fields) -> dict:
    """Each token field concatenated, with int64 offsets [n + 1]; plus the truncated flags."""
    arrays = {"truncated": np.array([bool(e.truncated) for e in examples], bool)}
    for e in examples:
        extra = [f for f in e._fields if f not in fields and f != "truncated" and getattr(e, f) is not None]
        if extra:
            raise ValueError(f"cannot cache examples that carry {extra}")
    for name in fields:
        values = [getattr(e, name) for e in examples]
        arrays[name] = np.concatenate(values)
        arrays[f"{name}_offsets"] = np.concatenate([[0], np.cumsum([len(v) for v in values])]).astype(np.int64)
    return arrays


def _unpack(arrays: dict, kind: str, fields) -> list:
    example_type = LAYOUT[kind][0]
    n = len(arrays["truncated"])
    pieces = {}
    for name in fields:
        values, offsets = arrays[name], arrays[f"{name}_offsets"]
        if len(offsets) != n + 1 or offsets[-1] != len(values):
            raise ValueError(f"offsets of {name!r} do not match its {len(values)} values")
        pieces[name] = [values[offsets[i]:offsets[i + 1]] for i in range(n)]
    truncated = arrays["truncated"].tolist()
    return [example_type(**{name: pieces[name][i] for name in fields}, truncated=truncated[i]) for i in range(n)]


def _counter_state(counter: SkipCounter) -> dict:
    # Reasons in insertion order: most_common() breaks ties by it, so the summary reads back identical.
    return {"source": counter.source, "kept": counter.kept, "skipped": list(counter.skipped.items())}


def _counter_from(state: dict) -> SkipCounter:
    counter = SkipCounter(state["source"])
    counter.keep(state["kept"])
    for reason, n in state["skipped"]:
        counter.skipped[reason] = n
    return counter


def process_index() -> int:
    """jax.process_index(), without importing JAX (and starting its backend) in a process that never did."""
    if "jax" not in sys.modules:
        return 0
    import jax

    return jax.process_index()
