"""Where rows come from: the Hugging Face hub, local files, or TFDS. Every source gives plain-Python dict rows.

`load_rows(source, split)` accepts:

- a hub dataset name, e.g. `load_rows(ULTRACHAT, "train_sft")` -> `datasets.load_dataset(name, split=split)`.
  It needs the network (or a datasets cache that already holds it); offline, or with files that `datasets`
  cannot read (a parse error, a split size or checksum that differs), the error names the dataset and split.
- a directory written by `Dataset.save_to_disk` (any split, unless the Dataset records another: then an error)
  or `DatasetDict.save_to_disk` (split picks one).
- a URL to such a file (gs://, s3://, https://): handed to `datasets`, which reads it with fsspec.
- local `*.jsonl` / `*.json` / `*.parquet` data: one file or a glob (split ignored: the files are the split),
  or a directory. In a directory the split picks its files by one of these layouts:
      DIR/{split}.jsonl   DIR/{split}.json   DIR/{split}.parquet
      DIR/{split}-*.jsonl  DIR/{split}-*.parquet          (shards: train_prefs-00000-of-00001.parquet)
      DIR/data/{split}-*.parquet  DIR/data/{split}-*.jsonl (the layout of a downloaded hub dataset repo)
  Files of one split in two of these layouts are an error (not the first layout's files alone).
  With split=None a directory gives all of its data files (which must share one format).
  This is the layout that `python -m zephyr_jax.data.binarize` writes (DIR/train_prefs.jsonl, DIR/test_prefs.jsonl).
- `tfds:NAME` (NAME may carry a config and version, "name/config:1.0.0"): `tfds.data_source(NAME, split=split,
  data_dir=data_dir)`, random access over array_record files. Needs `pip install zephyr_jax[tfds]` (no
  TensorFlow). Rows are converted to the same plain schema as the hub rows: bytes decoded to str, numpy values
  to Python values, and sequences of dicts (which TFDS stores column-wise, {"role": [...], "content": [...]})
  back to lists of dicts ([{"role", "content"}, ...]).

Hub and file sources return a `datasets.Dataset` (`rows[i]` is a dict), or with `streaming=True` a
`datasets.IterableDataset`; TFDS sources return a sequence of dicts (`streaming` has no effect: it is lazy).
JSON (local or a URL) that `datasets`' reader refuses, that holds a `null` line (pyarrow's reader crashes the
process on one), or whose rows disagree in a field's type (the reader would type it Json and decode every string in
it, or cast rows past its first 10 MB to the first rows' types), is read with the json module: a bad line is named
by file and line, and columns are typed from every row (the reader types them from the first 10 MB), or, where rows
disagree in a field's type, the rows come as a list of dicts as they are, so the malformed one is named or skipped.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ULTRACHAT = "HuggingFaceH4/ultrachat_200k"  # splits train_sft (207,865) / test_sft (23,110)
ULTRAFEEDBACK_BINARIZED = "HuggingFaceH4/ultrafeedback_binarized"  # splits train_prefs (61,135) / test_prefs (2,000)

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # extension -> datasets builder
TYPE_CHECK_BYTES = 16 << 20  # _json_types_agree parses a file in pieces of this size
SPLIT_PATTERNS = ("{split}.jsonl", "{split}.json", "{split}.parquet", "{split}-*.jsonl", "{split}-*.parquet",
                  "data/{split}-*.parquet", "data/{split}-*.jsonl")


def load_rows(source, split: str | None, *, data_dir: str | os.PathLike | None = None, streaming: bool = False):
    """Rows of `source` (see the module docstring for the accepted forms). `data_dir` is the TFDS data dir."""
    source = os.fspath(source)
    if source.startswith("tfds:"):
        return load_tfds(source[len("tfds:"):], split, data_dir=data_dir)
    if "://" in source and Path(source.split("://", 1)[1]).suffix in FORMATS:
        return _load_files([source], streaming)  # gs://, s3://, https://: fsspec resolves it (and its globs)
    files = local_files(source, split)
    if files is not None:
        return _load_saved(Path(source), split, streaming) if _is_saved(Path(source)) else _load_files(files, streaming)
    try:
        return load_hub(source, split, streaming=streaming)
    except (ConnectionError, FileNotFoundError) as e:
        # "owner/name" is also how a relative path looks: say that it is not here either, and how to make it.
        raise type(e)(f"{source!r} is not a local path (nothing at {os.path.abspath(source)}), and as a "
                                f"hub dataset it failed: {e}{_how_to_make(source)}") from e


def local_files(source, split: str | None) -> list[str] | None:
    """The local files `load_rows(source, split)` reads, found without reading a row: the tokenized cache keys on
    their stats, and a command checks its data is there before loading its models. None for hub, URL and TFDS
    sources; a local source that is not there raises load_rows' FileNotFoundError."""
    source = os.fspath(source)
    if source.startswith("tfds:") or "://" in source:
        return None
    path = Path(source)
    if path.is_dir():
        if _is_saved(path):  # save_to_disk: all of it
            return sorted(str(p) for p in path.rglob("*") if p.is_file())
        return _split_files(path, split)
    if path.suffix in FORMATS or glob.has_magic(source):
        files = matching_files(source)
        if not files:
            raise FileNotFoundError(f"no data file matches {source!r}")
        return files
    if path.is_absolute() or source.startswith(".") or os.path.exists(source):
        raise FileNotFoundError(f"{source!r} is neither a directory nor a {'/'.join(FORMATS)} file")
    return None  # a hub dataset's name


def _is_saved(path: Path) -> bool:
    """A directory written by datasets' save_to_disk (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists())


def _how_to_make(source: str) -> str:
    if Path(source).parts[0] == "demo_data":
        return "\nThe demo's data is made by: python -m zephyr_jax.demo make-data --out=demo_data"
    return ""


def load_hub(name: str, split: str | None, *, streaming: bool = False):
    """`datasets.load_dataset(name, split=split)`, with the dataset's name in any error."""
    import datasets

    what = f"Hugging Face dataset {name!r} (split {split!r})"
    if split is None:
        raise ValueError(f"{what}: pass a split")
    try:
        return datasets.load_dataset(name, split=split, streaming=streaming)
    except ConnectionError as e:
        offline = " (offline mode is on: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if _offline() else ""
        raise ConnectionError(
            f"{what} could not be reached{offline}. Load it where the hub is reachable and pass the directory "
            f"written by save_to_disk, or jsonl/parquet files, as the source instead. Cause: {e}") from e
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{what} was not found: {e}") from e
    except ValueError as e:  # e.g. an unknown split
        raise ValueError(f"{what}: {e}") from e
    except datasets.exceptions.DatasetsError as e:  # files that do not parse, checksums or split sizes that differ
        # (the direct cause: the JSON reader's error; deeper lies its pandas fallback's, which says less)
        cause = e if e.__cause__ is None else e.__cause__
        raise ValueError(f"{what}: its files could not be read: {type(cause).__name__}: {cause}") from e


def _offline() -> bool:
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE or getattr(datasets.config, "HF_DATASETS_OFFLINE", False))


def _load_saved(path: Path, split, streaming):
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"split {split!r} is not in the DatasetDict at {path} (it has {sorted(ds)})")
        ds = ds[split]
    elif split is not None and ds.split is not None and str(ds.split) != split:
        # A single Dataset serves whatever split is asked, except one it says it is not: an eval split pointed
        # at a saved train split would evaluate on the training rows.
        raise ValueError(f"the Dataset at {path} was saved from split {str(ds.split)!r}, not {split!r}: point this "
                         "split at its own data (or save a DatasetDict)")
    return ds.to_iterable_dataset() if streaming else ds


def source_name(source, split) -> str:
    """How messages name a split of a source: "DIR:train_sft", or the file alone when there is no split."""
    return os.fspath(source) if split is None else f"{os.fspath(source)}:{split}"


def matching_files(source: str) -> list[str]:
    """The files a file-or-glob source names: a file that exists is itself, even with [ ] * ? in its path."""
    return [source] if os.path.isfile(source) else sorted(f for f in glob.glob(source) if os.path.isfile(f))


def _split_files(directory: Path, split) -> list[str]:
    if split is None:
        files = sorted(str(p) for p in directory.iterdir() if p.suffix in FORMATS and p.is_file())
    else:
        root = glob.escape(str(directory))  # a directory named "run[1]" is itself, not a character class
        matches = {p: sorted(glob.glob(os.path.join(root, p.format(split=glob.escape(split))))) for p in SPLIT_PATTERNS}
        matches = {p: found for p, found in matches.items() if found}
        if len(matches) > 1:  # two layouts of one split (train_sft.jsonl and train_sft-0.parquet): not half of it
            raise ValueError(f"split {split!r} in {directory} matches more than one layout: " + "; ".join(
                f"{p.format(split=split)}: {[os.path.relpath(f, directory) for f in found][:3]}"
                for p, found in matches.items()) + ". Keep one, or name the files as the source")
        files = next(iter(matches.values()), [])
    if not files:
        present = sorted(p.name for p in directory.iterdir())[:20]
        want = ", ".join(p.format(split=split) for p in SPLIT_PATTERNS) if split else "*.jsonl/json/parquet"
        raise FileNotFoundError(f"no data files for split {split!r} in {directory} (looked for {want}; "
                                f"the directory holds {present})")
    return files


def _load_files(files: list[str], streaming: bool):
    import datasets

    others = [f for f in files if Path(f).suffix not in FORMATS]  # a glob that takes notes.txt
    if others:
        raise ValueError(f"not a {'/'.join(FORMATS)} data file: {_names(others)}")
    first_of = {}  # format -> its first file, to name each
    for f in files:
        first_of.setdefault(FORMATS[Path(f).suffix], f)
    if len(first_of) > 1:
        raise ValueError("data files of one source must share one format, JSON (.jsonl/.json) or parquet: got "
                         + " and ".join(f"{builder} files (e.g. {f})" for builder, f in first_of.items()))
    builder = next(iter(first_of))
    json_rows = builder == "json" and not streaming
    # Checked before datasets' reader sees the files: it crashes the process on a `null` line (see _NULL_LINE), and
    # rows it would type wrong are read once, by the json module, not twice.
    if json_rows and not _json_types_agree(files):
        return _load_json_rows(files)
    if builder == "json" and streaming and _null_line_in(files):  # (streamed, pyarrow's reader parses it too)
        rows = _load_json_rows(files)  # which names the line: a null row is no object
        return rows.to_iterable_dataset() if isinstance(rows, datasets.Dataset) else rows
    try:
        rows = datasets.load_dataset(builder, data_files=files, split="train", streaming=streaming)
    except Exception as e:
        if json_rows:
            return _load_json_rows(files, e)
        raise ValueError(f"could not read {_names(files)}: {_root_cause(e)}") from e
    if json_rows and _has_json_feature(rows.features):
        # A field whose rows disagree in type (a number in one row's content, strings in the others) is typed
        # Json, and every string in it is then decoded as JSON: "8" became 8, "null" None, '"hi"' hi.
        return _load_json_rows(files)
    return rows


def _json_types_agree(files) -> bool:
    """Whether every row of every file gives each field one type, as pyarrow's JSON Lines reader sees them (it
    refuses a type that changes from one row to another). `datasets` types the fields from its first 10 MB chunk
    only (what _has_json_feature sees) and casts later chunks and files to them: a number in a later row's content
    became text ("5"), and every string of a later chunk whose rows disagreed was JSON-encoded ('"hi"').

    Each file is parsed in pieces of about TYPE_CHECK_BYTES, so no more than a piece is held as Arrow (parsed
    whole, a 248 MB file took 0.48 GB of Arrow memory; in pieces 0.03 GB), and the pieces' schemas are merged. A
    piece whose strings of a field all look like dates types it as a timestamp, which no other piece's strings
    merge with: such a file is read whole, as one reader that sees every row decides.

    False too where a piece is not UTF-8: pyarrow reads such bytes unchecked, and the row that holds them then
    fails when it is read (UnicodeDecodeError, naming no file); the json module's reader names its line. And False
    where a line is `null`, which pyarrow's reader must not see (_NULL_LINE)."""
    import fsspec
    import pyarrow as pa
    import pyarrow.json as paj

    def schema(data: bytes):  # one block: no row straddles two (a row longer than a block is refused)
        str(data, "utf-8")  # (pieces end at a line's end, never inside a character)
        block = paj.ReadOptions(block_size=max(len(data), 1 << 20))
        return paj.read_json(pa.BufferReader(data), read_options=block).schema

    schemas = []
    try:
        for f in files:
            pieces = []
            with fsspec.open(f, "rb") as handle:
                for piece in _line_pieces(handle, TYPE_CHECK_BYTES):
                    if _has_null_line(piece):
                        return False
                    pieces.append(schema(piece))
            try:
                schemas.append(pa.unify_schemas(pieces, promote_options="permissive"))
            except (pa.ArrowInvalid, pa.ArrowTypeError):  # the one reader sees every row
                with fsspec.open(f, "rb") as handle:
                    schemas.append(schema(handle.read()))
        pa.unify_schemas(schemas, promote_options="permissive")  # (an int64 and a double field merge)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError,  # also a JSON array: json module
            UnicodeDecodeError):
        return False
    return True


# pyarrow's JSON reader (26.0) ends the process with a segmentation fault where a block it parses starts with a
# `null` line, and datasets' reader cuts its blocks at any line's end: such a file goes to the json module's reader,
# which names the line (a JSON NoneType, expected an object).
_NULL_LINE = re.compile(rb"\n[ \t\r]*null[ \t\r]*(?:\n|\Z)")  # (an alternative of \A took 40 times as long)


def _has_null_line(piece) -> bool:
    """Whether a line of `piece` (bytes that start at a line's start) is `null`, the first line included (after a
    byte-order mark, which pyarrow skips)."""
    first = bytes(piece[:64]).removeprefix(b"\xef\xbb\xbf")
    return _NULL_LINE.search(b"\n" + first) is not None or _NULL_LINE.search(piece) is not None


def _null_line_in(files) -> bool:
    """Whether a line of the files is `null` (_NULL_LINE), read in pieces as _json_types_agree reads them."""
    import fsspec

    for f in files:
        with fsspec.open(f, "rb") as handle:
            if any(_has_null_line(piece) for piece in _line_pieces(handle, TYPE_CHECK_BYTES)):
                return True
    return False


def _line_pieces(handle, size: int):
    """The bytes of a binary file in pieces of about `size` (views, not copies) that end at a line's end (a longer
    line is one piece); the last piece is what follows the last newline, if anything does."""
    rest = b""
    while block := handle.read(size):
        block = rest + block if rest else block
        cut = block.rfind(b"\n") + 1
        if cut:
            yield memoryview(block)[:cut]
        rest = block[cut:]
    if rest:
        yield rest


def _has_json_feature(feature) -> bool:
    """Whether a datasets feature (or a struct / list of them) is `Json`: values of several types."""
    import datasets

    if isinstance(feature, datasets.features.Json):
        return True
    if isinstance(feature, dict):
        return any(_has_json_feature(f) for f in feature.values())
    if isinstance(feature, (list, tuple)):
        return any(_has_json_feature(f) for f in feature)
    return _has_json_feature(feature.feature) if hasattr(feature, "feature") else False


def _names(files) -> list[str]:
    return files if len(files) < 4 else files[:3] + ["..."]


def _root_cause(error: BaseException) -> str:
    """The innermost cause's message: `datasets` wraps the reason (a JSON parse error, an Arrow cast) in a generic
    "An error occurred while generating the dataset"."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _open_binary(path):
    """A local file, or a URL (gs://, s3://, https://) through fsspec, as `datasets` reads it."""
    if "://" in str(path):
        import fsspec

        return fsspec.open(str(path), "rb").open()
    return open(path, "rb")


def decode_line(raw: bytes, path, number: int) -> str:
    """A line's text: UTF-8, after a byte-order mark on the first line (which pyarrow's reader skips too)."""
    try:
        return raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{number}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}): "
                         "re-encode the file as UTF-8") from None


def read_json_lines(path) -> list:
    """The values of a JSON Lines file (blank lines skipped; a URL too); ValueError naming the file and line of
    one that is not UTF-8 or not JSON."""
    rows = []
    with _open_binary(path) as f:
        for number, raw in enumerate(f, 1):
            line = decode_line(raw, path, number)
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not valid JSON ({e.msg}, column {e.colno}): "
                                     f"{line.strip()[:80]!r}") from e
    return rows


def _load_json_rows(files: list[str], error: Exception | None = None):
    """JSON files (local or URLs) that `datasets`' reader refused or typed as Json, read with the json module: a
    line that is not a JSON object is named by file and line, and rows that parse become a Dataset whose column
    types are inferred from every row (`datasets` takes them from the first 10 MB, so a field that stays null
    there, such as feedback's `error`, cannot hold a string later on), or, where rows disagree in a field's type,
    the list of rows as they are, so that whoever reads them names or counts the malformed row."""
    import datasets

    rows, where = [], []
    for f in files:
        value = None
        if Path(f).suffix == ".json":  # a JSON array of rows, or (as datasets also reads it) JSON Lines
            with _open_binary(f) as handle:
                try:
                    value = json.loads(handle.read().decode("utf-8-sig"))
                except (json.JSONDecodeError, UnicodeDecodeError):  # read_json_lines names the line
                    pass
        if value is not None and not isinstance(value, list):
            reason = _root_cause(error) if error else f"a JSON {type(value).__name__}, expected a list of rows"
            raise ValueError(f"could not read {f}: {reason}") from error
        for i, row in enumerate(read_json_lines(f) if value is None else value, 1):
            if not isinstance(row, dict):
                raise ValueError(f"{f} row {i}: a JSON {type(row).__name__}, expected an object")
            rows.append(row)
            where.append(f"{f} row {i}")
    if not rows:
        raise ValueError(f"{_names(files)} hold no rows")
    try:  # columns from every row's keys (from_list would take the first row's only)
        keys = dict.fromkeys(k for row in rows for k in row)
        return datasets.Dataset.from_dict({k: [row.get(k) for row in rows] for k in keys})
    except Exception as e:  # a column whose values disagree in type across rows, or text Arrow cannot hold
        for row, at in zip(rows, where):
            try:
                json.dumps(row, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{at}: text with a lone surrogate (half of a UTF-16 pair, e.g. a cut emoji), "
                                 "which is not valid Unicode: mend or drop that row") from e
        return rows


# ---------------------------------------------------------------------------------------------------- TFDS


def load_tfds(name: str, split: str | None, *, data_dir=None) -> TFDSRows:
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(f"reading 'tfds:{name}' needs tensorflow_datasets and array_record: "
                          "pip install zephyr_jax[tfds]") from e
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError's message lists the whole catalog: keep its first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        message = f"TFDS dataset {name!r} (split {split!r}, data_dir={data_dir}): {first}"
        try:
            error = type(e)(message)
        except Exception:  # noqa: BLE001 (an exception type with another constructor)
            error = RuntimeError(message)
        raise error from e
    return TFDSRows(source, f"tfds:{name}:{split}")


class TFDSRows(Sequence):
    """A TFDS data source whose rows come back as plain-Python dicts (see `tfds_to_python`)."""

    def __init__(self, source, name: str):
        self.source, self.name = source, name
        info = getattr(source, "dataset_info", None)
        self.features = getattr(info, "features", None)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for {self.name} ({n} rows)")
        return tfds_to_python(self.source[i % n], self.features)

    def __repr__(self) -> str:
        return f"TFDSRows({self.name}, {len(self)} rows)"


def tfds_to_python(value, feature=None):
    """A TFDS example -> plain Python. With the dataset's `feature` tree, Sequence(FeaturesDict) values (which
    TFDS stores column-wise, nested dicts included) become lists of dicts; without it, only bytes and numpy
    values are converted."""
    if _kind(feature) == "Sequence":
        if isinstance(value, dict):  # {"role": [n], "content": [n]} -> [{"role", "content"}] * n
            n = _column_length(value)
            return [tfds_to_python(_element(value, i), feature.feature) for i in range(n)]
        if isinstance(value, (list, tuple, np.ndarray)):
            return [tfds_to_python(v, feature.feature) for v in value]
    if isinstance(value, dict):
        return {k: tfds_to_python(v, _child(feature, k)) for k, v in value.items()}
    return _plain(value)


def _kind(feature):
    return None if feature is None else type(feature).__name__


def _column_length(columns) -> int:
    while isinstance(columns, dict):
        if not columns:
            return 0
        columns = next(iter(columns.values()))
    return len(columns)


def _element(columns, i):
    if isinstance(columns, dict):
        return {k: _element(v, i) for k, v in columns.items()}
    return columns[i]


def _child(feature, key):
    if _kind(feature) != "FeaturesDict":
        return None
    return feature[key] if key in feature else None


def _plain(value):
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.ndim else _plain(value.item())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
