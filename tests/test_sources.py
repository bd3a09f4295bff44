"""Row sources on small local data in the real schemas: save_to_disk dirs, jsonl/json/parquet, the hub offline, TFDS."""

import json
import re
import sys
import time

import datasets
import numpy as np
import pytest

from zephyr_jax.data.sources import ULTRACHAT, load_hub, load_rows, tfds_to_python

ROWS = [  # the HuggingFaceH4/ultrachat_200k schema
    {"prompt": "Hi", "prompt_id": "a1",
     "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    {"prompt": "Café?", "prompt_id": "b2",
     "messages": [{"role": "user", "content": "Café?"}, {"role": "assistant", "content": "Oui."},
                  {"role": "user", "content": "Merci"}, {"role": "assistant", "content": "De rien"}]},
    {"prompt": "Bye", "prompt_id": "c3",
     "messages": [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you"}]},
]


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """datasets caches what it reads from files: keep that cache inside the test's tmp dir."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def rows_of(ds):
    return [ds[i] for i in range(len(ds))]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def test_save_to_disk_dataset_and_dict(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    assert rows_of(load_rows(tmp_path / "one", "train_sft")) == ROWS  # a single Dataset: split ignored
    # ... unless it records the split it was saved from: an eval split pointed at it would read training rows.
    datasets.Dataset.from_list(ROWS, split=datasets.NamedSplit("train_sft")).save_to_disk(str(tmp_path / "train"))
    assert rows_of(load_rows(tmp_path / "train", "train_sft")) == ROWS
    with pytest.raises(ValueError, match=r"saved from split 'train_sft', not 'test_sft'"):
        load_rows(tmp_path / "train", "test_sft")
    datasets.DatasetDict({"train_sft": datasets.Dataset.from_list(ROWS[:2]),
                          "test_sft": datasets.Dataset.from_list(ROWS[2:])}).save_to_disk(str(tmp_path / "dict"))
    assert rows_of(load_rows(str(tmp_path / "dict"), "train_sft")) == ROWS[:2]
    assert rows_of(load_rows(str(tmp_path / "dict"), "test_sft")) == ROWS[2:]
    assert list(load_rows(str(tmp_path / "dict"), "test_sft", streaming=True)) == ROWS[2:]
    with pytest.raises(ValueError, match=r"split 'validation' is not in the DatasetDict .*'test_sft', 'train_sft'"):
        load_rows(str(tmp_path / "dict"), "validation")


def test_jsonl_json_parquet_files(tmp_path):
    write_jsonl(tmp_path / "rows.jsonl", ROWS)
    (tmp_path / "rows.json").write_text(json.dumps(ROWS), encoding="utf-8")
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "rows.parquet"))
    for name in ("rows.jsonl", "rows.json", "rows.parquet"):
        assert rows_of(load_rows(str(tmp_path / name), "train")) == ROWS, name
    assert list(load_rows(str(tmp_path / "rows.jsonl"), None, streaming=True)) == ROWS
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "part-0.jsonl", ROWS[:1])
    write_jsonl(shards / "part-1.jsonl", ROWS[1:])
    assert rows_of(load_rows(str(shards / "part-*.jsonl"), None)) == ROWS  # a glob, in sorted order


def test_directory_split_convention(tmp_path):
    write_jsonl(tmp_path / "train_sft.jsonl", ROWS[:2])
    write_jsonl(tmp_path / "test_sft.jsonl", ROWS[2:])
    assert rows_of(load_rows(tmp_path, "train_sft")) == ROWS[:2]
    assert rows_of(load_rows(tmp_path, "test_sft")) == ROWS[2:]
    assert len(load_rows(tmp_path, None)) == 3  # every data file in the directory
    with pytest.raises(FileNotFoundError, match=r"no data files for split 'validation' in .*test_sft\.jsonl"):
        load_rows(tmp_path, "validation")
    repo = tmp_path / "hub_snapshot"  # the layout of a downloaded hub dataset repo
    (repo / "data").mkdir(parents=True)
    datasets.Dataset.from_list(ROWS[:1]).to_parquet(str(repo / "data" / "train_sft-00000-of-00002-abc.parquet"))
    datasets.Dataset.from_list(ROWS[1:]).to_parquet(str(repo / "data" / "train_sft-00001-of-00002-abc.parquet"))
    assert rows_of(load_rows(repo, "train_sft")) == ROWS
    assert rows_of(load_rows(repo / "data", None)) == ROWS  # a directory of parquet files: every one
    jsonl_repo = tmp_path / "jsonl_snapshot"  # the same layout in JSON Lines
    (jsonl_repo / "data").mkdir(parents=True)
    write_jsonl(jsonl_repo / "data" / "test_sft-00000-of-00001.jsonl", ROWS[2:])
    assert rows_of(load_rows(jsonl_repo, "test_sft")) == ROWS[2:]
    # Files of two formats, or a glob that takes a file of none: named, not "must all be one of .jsonl/.json/
    # .parquet formats" (which both of .jsonl and .parquet are).
    datasets.Dataset.from_list(ROWS[:1]).to_parquet(str(jsonl_repo / "data" / "extra.parquet"))
    with pytest.raises(ValueError, match=r"share one format.*: got parquet files \(e\.g\. \S*extra\.parquet\) and "
                                         r"json files \(e\.g\. \S*test_sft-0\S*\.jsonl\)"):
        load_rows(jsonl_repo / "data", None)
    (jsonl_repo / "data" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"not a \.jsonl/\.json/\.parquet data file: \['\S*notes\.txt'\]"):
        load_rows(str(jsonl_repo / "data" / "*"), None)
    # One split in two layouts: an error naming both, not the first layout's rows alone.
    write_jsonl(repo / "train_sft-extra.jsonl", ROWS[:1])
    with pytest.raises(ValueError, match=r"matches more than one layout: train_sft-\*\.jsonl: \['train_sft-extra"
                                         r"\.jsonl'\]; data/train_sft-\*\.parquet"):
        load_rows(repo, "train_sft")


def test_paths_with_glob_characters_are_read_as_themselves(tmp_path):
    """A run directory named like "sweep[lr=1e-6]" or "run*" is a path: its brackets are not a character class."""
    from zephyr_jax.data.sources import local_files

    for name in ("sweep[lr=1e-6]", "run*?"):
        directory = tmp_path / name
        directory.mkdir()
        write_jsonl(directory / "train_sft.jsonl", ROWS)
        assert rows_of(load_rows(directory, "train_sft")) == ROWS
        assert rows_of(load_rows(str(directory / "train_sft.jsonl"), None)) == ROWS
        assert local_files(str(directory), "train_sft") == local_files(str(directory / "train_sft.jsonl"), None) == [
            str(directory / "train_sft.jsonl")]


def test_missing_local_paths(tmp_path):
    """load_rows and local_files (the cache key's and the early checks' resolver) refuse alike, reading no row."""
    from zephyr_jax.data.sources import local_files

    (tmp_path / "rows.csv").write_text("a\n1\n")
    for source, message in ((tmp_path / "nope.jsonl", "no data file matches"), (tmp_path / "*.parquet", "no data "
                            "file matches"), (tmp_path / "rows.csv", "neither a directory nor"),
                            (tmp_path, "no data files for split 'train'")):
        for read in (load_rows, local_files):
            with pytest.raises(FileNotFoundError, match=message):
                read(str(source), "train")
    # Remote and TFDS sources are no local files, even named with a data file's extension (feedback's early check
    # refused a URL that load_rows reads).
    for source in ("https://example.com/prompts.jsonl", "gs://bucket/train-*.parquet", "tfds:mbpp", "org/name"):
        assert local_files(source, "train") is None, source


def test_hub_name_offline_fails_fast_and_names_it(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # conftest sets the env vars; be sure anyway
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"{ULTRACHAT}.*train_sft.*could not be reached.*offline"):
        load_rows(ULTRACHAT, "train_sft")
    assert time.monotonic() - start < 5


def test_hub_files_that_do_not_parse_are_a_value_error_naming_the_dataset(tmp_path, monkeypatch):
    """datasets' DatasetGenerationError (no ValueError) passed train.run's wrapping as a traceback naming neither
    the dataset nor data.train. A local folder in a hub repo's layout goes through load_hub's own loader."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "repo" / "data").mkdir(parents=True)
    (tmp_path / "repo" / "data" / "train_sft-00000-of-00001.jsonl").write_text(
        '{"prompt": "a", "messages": [{"role": "user", "content": "a"}]}\n{"prompt": "b", "messages": [\n')
    with pytest.raises(ValueError, match=rf"Hugging Face dataset '{re.escape(str(tmp_path))}/repo' \(split "
                                         r"'train_sft'\): its files could not be read: ArrowInvalid: JSON parse"):
        load_hub(str(tmp_path / "repo"), "train_sft")
    # Split sizes other than the dataset card states: datasets' own error, with no cause behind it
    (tmp_path / "sized" / "data").mkdir(parents=True)
    (tmp_path / "sized" / "README.md").write_text("---\ndataset_info:\n  splits:\n  - name: train_sft\n"
                                                  "    num_examples: 5\n---\n")
    (tmp_path / "sized" / "data" / "train_sft-00000-of-00001.jsonl").write_text('{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"/sized' \(split 'train_sft'\): its files could not be read: "
                                         r"NonMatchingSplitsSizesError: \[\{'expected'"):
        load_hub(str(tmp_path / "sized"), "train_sft")
    # A split the dataset lacks, no split, a repo without data files: each names the dataset and the split
    (tmp_path / "good" / "data").mkdir(parents=True)
    (tmp_path / "good" / "data" / "train_sft-00000-of-00001.jsonl").write_text('{"prompt": "a"}\n')
    good = re.escape(str(tmp_path / "good"))
    for split, message in (("test_sft", r"\(split 'test_sft'\): Unknown split \"test_sft\""),
                           (None, r"\(split None\): pass a split")):
        with pytest.raises(ValueError, match=rf"^Hugging Face dataset '{good}' {message}"):
            load_hub(str(tmp_path / "good"), split)
    (tmp_path / "bare").mkdir()
    with pytest.raises(FileNotFoundError, match=r"/bare' \(split 'train'\) was not found: .*any data files"):
        load_hub(str(tmp_path / "bare"), "train")


def test_missing_demo_data_says_it_is_not_here_and_how_to_make_it(monkeypatch, tmp_path, capsys):
    """A fresh clone has no demo_data/: the error says the local path is missing and which command makes it."""
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConnectionError) as err:
        load_rows("demo_data/sft", "train_sft")
    message = str(err.value)
    assert f"'demo_data/sft' is not a local path (nothing at {tmp_path / 'demo_data' / 'sft'})" in message
    assert "python -m zephyr_jax.demo make-data --out=demo_data" in message
    # The data CLIs end with that message on one line (they caught FileNotFoundError, not ConnectionError: three
    # chained tracebacks).
    from zephyr_jax.data import binarize, dialogues, feedback

    for cli, args in ((binarize.main, ["--input=demo_data/raw", "--output=out"]),
                      (feedback.main, ["--prompts=demo_data/prompts", "--output=out",
                                       "--judge_fn=tests.test_feedback:check_sum",
                                       "--generators=callable:tests.test_feedback:slow_right"]),
                      (dialogues.main, ["--seeds=demo_data/seeds", "--output=out",
                                        "--assistant=callable:tests.test_dialogues:scripted_assistant"])):
        with pytest.raises(SystemExit) as stop:
            cli(args)
        said = str(stop.value.code) if cli is not feedback.main else capsys.readouterr().err
        assert said.startswith("error: 'demo_data/") and "is not a local path" in said, (cli.__module__, said)


def test_tfds_missing_package_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install zephyr_jax\[tfds\]"):
        load_rows("tfds:ultrachat_200k", "train_sft")


# ---------------------------------------------------------------------------------------------------- TFDS

RAW = [  # a slice of the openbmb/UltraFeedback schema: a sequence of dicts with a nested dict inside, a sequence of
    # text (models), and a row whose sequences are empty
    {"instruction": "Why?", "models": ["ultralm-13b", "gpt-4"], "completions": [
        {"response": "Because.", "overall_score": 7.5, "annotations": {"helpfulness": {"Rating": "4"}}},
        {"response": "No idea", "overall_score": 2.0, "annotations": {"helpfulness": {"Rating": "N/A"}}}]},
    {"instruction": "And?", "models": [], "completions": []},
]


def build_tfds(data_dir):
    """Writes tiny array_record TFDS datasets with TFDS's own builder (no TensorFlow needed)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    f = tfds.features

    class TinyChat(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            message = {"role": f.Text(), "content": f.Text()}
            features = f.FeaturesDict({"prompt": f.Text(), "prompt_id": f.Text(), "messages": f.Sequence(message)})
            return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {"train_sft": self._generate_examples(ROWS[:2]), "test_sft": self._generate_examples(ROWS[2:])}

        def _generate_examples(self, rows):
            yield from enumerate(rows)

    class TinyRaw(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            completion = {"response": f.Text(), "overall_score": f.Scalar(dtype=np.float32),
                          "annotations": {"helpfulness": {"Rating": f.Text()}}}
            features = f.FeaturesDict({"instruction": f.Text(), "models": f.Sequence(f.Text()),
                                       "completions": f.Sequence(completion)})
            return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(RAW)}

        def _generate_examples(self, rows):
            yield from enumerate(rows)

    for builder in (TinyChat, TinyRaw):
        builder(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_tfds_array_record(tmp_path):
    build_tfds(tmp_path)
    train = load_rows("tfds:tiny_chat", "train_sft", data_dir=tmp_path)
    assert len(train) == 2 and list(train) == ROWS[:2]
    assert train[-1] == ROWS[1] and train[0:2] == ROWS[:2]
    with pytest.raises(IndexError):
        train[2]
    assert list(load_rows("tfds:tiny_chat:1.0.0", "test_sft", data_dir=tmp_path)) == ROWS[2:]
    assert list(load_rows("tfds:tiny_raw", "train", data_dir=tmp_path)) == RAW
    with pytest.raises(ValueError, match=r"TFDS dataset 'no_such_set' \(split 'train'"):
        load_rows("tfds:no_such_set", "train", data_dir=tmp_path)


def test_tfds_to_python_without_features():
    value = {"a": b"x", "b": np.array([b"y", b"z"], dtype=object), "c": np.float32(1.5), "d": np.int64(3)}
    assert tfds_to_python(value) == {"a": "x", "b": ["y", "z"], "c": 1.5, "d": 3}


def test_bad_json_lines_are_named_by_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{"a": 2,}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        load_rows(str(tmp_path / "bad.jsonl"), None)
    (tmp_path / "list.jsonl").write_text('{"a": 1}\n\n["a", 2]\n')
    with pytest.raises(ValueError, match=r"list\.jsonl row 2: a JSON list, expected an object"):
        load_rows(str(tmp_path / "list.jsonl"), None)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="hold no rows"):
        load_rows(str(tmp_path / "empty.jsonl"), None)
    (tmp_path / "scalar.json").write_text("5")  # was datasets' pandas fallback's "DataFrame constructor not ..."
    with pytest.raises(ValueError, match=r"could not read \S*scalar\.json: a JSON int, expected a list of rows"):
        load_rows(str(tmp_path / "scalar.json"), None)
    # A `null` line: pyarrow's JSON reader ended the process (a segmentation fault) where one starts a block (the
    # first line, also after a byte-order mark; datasets' reader cuts blocks at any line's end), and elsewhere
    # read it as a row of nulls.
    good = json.dumps(ROWS[0]).encode()
    for name, data in (("null.jsonl", b"null\n" + good + b"\n"), ("bom.json", b"\xef\xbb\xbf null"),
                       ("late.jsonl", good + b"\n\n \tnull\r\n" + good)):
        (tmp_path / name).write_bytes(data)
        for streaming in (False, True):  # (streamed, the reader crashed the same way)
            with pytest.raises(ValueError, match=name.replace(".", r"\.") + r" row [12]: a JSON NoneType, expected"):
                load_rows(str(tmp_path / name), None, streaming=streaming)
    # Bytes that are not UTF-8: pyarrow's reader took them, and reading that row raised UnicodeDecodeError from
    # inside pyarrow naming no file; beside a row the json module reads, its decoder's error named neither.
    for name, tail in (("latin1.jsonl", b'{"a": "caf\xe9"}\n'), ("mixed.jsonl", b'{"a": 5}\n{"a": "caf\xe9"}\n')):
        (tmp_path / name).write_bytes(good + b"\n" + tail)
        with pytest.raises(ValueError, match=name.replace(".", r"\.") + r":\d: not UTF-8 \(byte 0xe9 at column"):
            rows_of(load_rows(str(tmp_path / name), None))
    # A byte-order mark before the first row (Windows tools write one): pyarrow's reader skips it, and so does
    # the json module's reader, which a row of another type in the same file makes the one that reads it.
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + good + b'\r\n{"prompt": 5}\r\n')
    assert [dict(r) for r in load_rows(str(tmp_path / "bom.jsonl"), None)] == [ROWS[0], {"prompt": 5}]


def test_a_column_that_stays_null_for_the_first_10_mb_still_reads(tmp_path):
    """datasets' JSON reader types columns from the first 10 MB; feedback's `error` is null until a call fails."""
    path = tmp_path / "train.jsonl"
    filler = "x" * 1000
    with open(path, "w") as f:
        for i in range(11 * 1024):  # ~11 MB of rows whose "error" is null
            f.write(json.dumps({"i": i, "error": None, "text": filler}) + "\n")
        f.write(json.dumps({"i": -1, "error": "HTTP 500", "text": "late", "source": "flan_v2_cot"}) + "\n")
    rows = load_rows(str(path), None)
    assert len(rows) == 11 * 1024 + 1  # and a column first seen in the last row is kept
    assert rows[-1] == {"i": -1, "error": "HTTP 500", "text": "late", "source": "flan_v2_cot"}
    assert rows[0]["error"] is None and rows[0]["source"] is None
    lines = tmp_path / "lines.json"  # JSON Lines in a .json file, as datasets reads it too
    lines.write_text('{"a": 1}\n{"a": 2, "b": [1]}\n')
    assert [dict(r) for r in load_rows(str(lines), None)] == [{"a": 1, "b": None}, {"a": 2, "b": [1]}]


def test_the_type_check_reads_a_file_in_pieces(tmp_path, monkeypatch):
    """The check that rows agree in type parsed each file whole into one Arrow table, a copy of the dataset held
    only for its schema (a 248 MB UltraChat-like file: 0.48 GB); it parses pieces of TYPE_CHECK_BYTES, cut at line
    ends, and merges their schemas, finding the same disagreements."""
    import pyarrow.json as paj

    from zephyr_jax.data import sources

    monkeypatch.setattr(sources, "TYPE_CHECK_BYTES", 1 << 16, raising=False)
    tables, read_json = [], paj.read_json
    monkeypatch.setattr(paj, "read_json", lambda *a, **k: tables.append(read_json(*a, **k)) or tables[-1])
    filler = "x" * 1000
    rows = [{"i": i, "error": None, "text": filler} for i in range(1000)]  # ~1 MB, 16 pieces
    good, bad, dates = tmp_path / "good.jsonl", tmp_path / "bad.jsonl", tmp_path / "dates.jsonl"
    write_jsonl(good, rows + [{"i": -1, "error": "HTTP 500", "text": "late"}])  # null, then a string: agree
    write_jsonl(bad, rows + [{"i": -1, "error": None, "text": 5}])  # a number among the strings, in the last piece
    # A piece whose strings all look like dates is typed timestamp: not a disagreement with the later strings.
    write_jsonl(dates, [{"d": "2024-01-01", "text": filler}] * 100 + [{"d": "soon", "text": filler}] * 100)
    assert sources._json_types_agree([str(good)]) and not sources._json_types_agree([str(bad)])
    assert sources._json_types_agree([str(dates)])
    assert sources._json_types_agree([good.as_uri()])  # a URL is read in pieces too
    assert not sources._json_types_agree([str(good), str(bad)])
    largest = max(t.nbytes for t in tables[:-1])  # the whole of `dates` is read again, once its pieces disagree
    assert len(tables) > 16 and largest < 4 * (1 << 16), (len(tables), largest)
    # Pieces that each agree within but not with each other: every piece's schema counts, not the first's only.
    late = tmp_path / "late.jsonl"
    write_jsonl(late, rows[:100] + [{"i": -1}] * 20000 + [{"i": -1, "text": 5}])  # strings, 3 pieces without, a number
    assert not sources._json_types_agree([str(late)])
    # A line longer than a piece is one piece, parsed as one block however long (pyarrow refuses a row longer
    # than its block, which is no disagreement).
    long = tmp_path / "long.jsonl"
    write_jsonl(long, [{"i": -1, "error": None, "text": "y" * (3 << 20)}] + rows[:3])  # (no newline in its first read)
    assert sources._json_types_agree([str(long)])
    unended = tmp_path / "unended.jsonl"  # the last line, with no newline after it, is read too
    unended.write_text(good.read_text() + json.dumps({"i": -1, "error": None, "text": 5}), encoding="utf-8")
    assert not sources._json_types_agree([str(unended)])


def test_one_row_of_another_type_changes_no_other_row(tmp_path):
    """datasets reads a field whose rows disagree in type (one reply a number, the rest strings) as Json and
    decodes every string in it as JSON ("8" -> 8, '"hi"' -> hi, "null" -> None), so the good rows changed or were
    skipped and the bad one went unnamed. The rows come as written, and the malformed one is the skipped one."""
    from zephyr_jax.data.errors import BadRow
    from zephyr_jax.data.sft import sft_example
    from zephyr_jax.tokenizer import load_tokenizer

    replies = ['"quoted"', "null", '{"a": 1}', 5, "8", "plain text"]
    rows = [{"messages": [{"role": "user", "content": "Reply in JSON"}, {"role": "assistant", "content": reply}]}
            for reply in replies]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    read = load_rows(str(path), None)
    assert [dict(r) for r in read] == rows
    tok = load_tokenizer()
    bad = []
    for i, row in enumerate(read):
        try:
            sft_example(row, i, tok)
        except BadRow as e:
            bad.append(str(e))
    assert bad == ["row 4: messages[1].content is not a string"]
    # The same file as a URL (file:// stands in for gs:// and s3://: fsspec reads all three) reads the same.
    assert [dict(r) for r in load_rows(path.as_uri(), None)] == rows
    # Behind a first shard (or 10 MB) of good rows: datasets typed the field from those and cast the rest to it,
    # a number to text ("5") and, where a shard's rows disagreed, every string of it JSON-encoded ("8" -> '"8"').
    for later in (rows, rows[3:4]):
        shards = tmp_path / f"shards{len(later)}"
        shards.mkdir()
        write_jsonl(shards / "train-0.jsonl", rows[-1:])  # strings only
        write_jsonl(shards / "train-1.jsonl", later)
        assert [dict(r) for r in load_rows(str(shards), "train")] == rows[-1:] + later
