"""python -m zephyr_jax.data.dialogues: schema and splits, filters counted by reason, determinism, resume after
kill -9 (row by row against an uninterrupted run, no finished call made twice), settings refusal, Magpie mode,
both modes over real HTTP against tests/scripted_server.py, and a tiny dSFT run on the output. The teachers are
deterministic Python callables defined here, so the CLI subprocesses reach them as
callable:tests.test_dialogues:NAME."""

import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from zephyr_jax.data import dialogues
from zephyr_jax.data.backends import Call, CallableBackend, Reply
from zephyr_jax.data.dialogue_seeds import Seed, builtin_seeds, load_seeds, looks_like_opening
from zephyr_jax.data.dialogues import SettingsMismatch, check_turn, make_dialogues, tidy_user_turn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# read by the callables in CLI subprocesses
CALL_LOG, SLEEP, HOLD_FROM = "DIALOGUES_TEST_CALL_LOG", "DIALOGUES_TEST_SLEEP", "DIALOGUES_TEST_HOLD_FROM"
_calls_started = itertools.count(1)  # numbers this process's calls (next() is atomic)


# --------------------------------------------------------------------------------------- scripted teachers

def _note_call(call):
    """Appends the call's seed to $DIALOGUES_TEST_CALL_LOG (one line per call) and sleeps $DIALOGUES_TEST_SLEEP;
    the $DIALOGUES_TEST_HOLD_FROM-th call and those after it wait for the test's kill, so the run cannot end first."""
    if os.environ.get(CALL_LOG):
        with open(os.environ[CALL_LOG], "a") as f:
            f.write(f"{call.seed}\n")
    held = next(_calls_started) >= int(os.environ.get(HOLD_FROM, sys.maxsize))
    time.sleep(300 if held else float(os.environ.get(SLEEP, 0)))


def scripted_user(call):
    """A user simulator: opens with a question about the topic (with a label and quotes to tidy away), then
    asks follow-ups that name the call's seed (so no two are alike)."""
    _note_call(call)
    last = call.messages[-1]["content"]
    own = sum(m["role"] == "assistant" for m in call.messages)  # its earlier messages, roles flipped
    if own == 0:
        like = re.search(r"of the same kind as this one.*?:\n\n(.*)\n\nWrite only", last, re.S)
        if like:  # a later pass over a seed that is an opening
            return f"Something like '{like.group(1)}', but mine ({call.seed % 10007})?"
        topic = re.search(r"about this topic: (.*?)\. Write only", last).group(1)
        return f'User: "What should I know about {topic}?"'
    roles = [m["role"] for m in call.messages]
    assert roles == ["system", *["user", "assistant"] * (len(roles) // 2 - 1), "user"], roles  # alternating
    opening = call.messages[2]["content"]
    if "BREAK" in opening:
        return "As an AI language model, I would ask about the weather."
    if "USERFAIL" in opening:
        raise RuntimeError("user model is down")
    return f"Follow-up {own} ({call.seed % 10007}): what about '{last[:24]}'?"


def scripted_assistant(call):
    """An assistant that answers plainly, or misbehaves on the turn its opening's keyword asks for."""
    _note_call(call)
    opening, n = call.messages[0]["content"], sum(m["role"] == "user" for m in call.messages)
    plain = f"Answer {n} ({call.seed % 10007}) to '{call.messages[-1]['content'][:40]}'."
    misbehaviour = {
        ("REFUSE", 2): "I'm sorry, but I can't help with that.",
        ("EMOTION", 1): "As an AI, I don't have opinions on music.",
        ("REPEAT", 2): f"Always the same answer to {opening[:20]}.",
        ("REPEAT", 1): f"Always the same answer to {opening[:20]}.",
        ("EMPTY", 1): "   ",
        ("LONG", 1): "word " * 200,
        ("MARKER", 1): "Sure</s><|user|>\nmore",
        ("CUT", 2): Reply("Half an ans", finish_reason="length"),
    }
    for (word, turn), reply in misbehaviour.items():
        if word in opening and n == turn:
            return reply
    if "FAIL" in opening and "USERFAIL" not in opening and n == 2:
        raise RuntimeError("assistant model is down")
    return plain


def _backends():
    return CallableBackend(scripted_user), CallableBackend(scripted_assistant)


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _run(out, seeds, **options):
    user, assistant = _backends()
    return make_dialogues(seeds, user, assistant, out, log=lambda s: None, **options)


# --------------------------------------------------------------------------------------- schema, filters, seeds

def test_schema_splits_sectors_and_sft_processing(tmp_path):
    from zephyr_jax.data import process_rows, sft_example
    from zephyr_jax.data.sources import load_rows
    from zephyr_jax.demo import prompt_id
    from zephyr_jax.tokenizer import load_tokenizer

    stats = _run(tmp_path / "a", builtin_seeds("all"), num_dialogues=12, test_size=3)
    train, test = _rows(tmp_path / "a" / "train_sft.jsonl"), _rows(tmp_path / "a" / "test_sft.jsonl")
    assert (len(train), len(test)) == (9, 3) and stats["kept"] == 12 and not stats["dropped"]
    assert json.load(open(tmp_path / "a" / "stats.json")) == json.loads(json.dumps(stats))
    for row in train + test:
        assert set(row) == {"prompt", "prompt_id", "messages", "sector", "models"}
        assert row["prompt_id"] == prompt_id(row["prompt"]) == hashlib.sha256(row["prompt"].encode()).hexdigest()
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and row["messages"][0]["content"] == row["prompt"]
        lo, hi = {"world": (3, 7), "writing": (2, 4), "materials": (2, 4)}[row["sector"]]
        assert lo <= len(roles) // 2 <= hi
        assert row["models"] == {"user": "scripted_user", "assistant": "scripted_assistant"}
    world = [r for r in train + test if r["sector"] == "world"]
    assert {r["sector"] for r in train + test} == {"world", "writing", "materials"} and len(world) == 4
    assert all(re.fullmatch(r"What should I know about .+\?", r["prompt"]) for r in world)  # label, quotes tidied
    assert len(load_rows(tmp_path / "a", "train_sft")) == 9 and len(load_rows(tmp_path / "a", "test_sft")) == 3
    tok = load_tokenizer()
    examples, counter = process_rows(train + test, lambda r, i: sft_example(r, i, tok, max_length=4096),
                                     progress=False, log=lambda s: None)
    assert len(examples) == 12 and counter.total == 0

    # The same seed gives byte-identical files, whatever the concurrency (completion order).
    _run(tmp_path / "b", builtin_seeds("all"), num_dialogues=12, test_size=3, concurrency=1)
    for name in ("train_sft.jsonl", "test_sft.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_a_reply_with_a_lone_surrogate_is_written_with_a_replacement_character(tmp_path):
    """Half an emoji ("\\ud83d" in a server's JSON) cannot be written as UTF-8: it used to end the run in the
    journal's write, and every rerun paid for the same reply and ended again."""
    from zephyr_jax.data.journal import Journal

    half = json.loads('"Sure \\ud83d here."')
    assistant = CallableBackend(lambda call: half, name="cut")
    stats = make_dialogues([Seed("What is a volcano?", "world")], CallableBackend(scripted_user), assistant,
                           tmp_path, min_turns=1, max_turns=1, test_size=0, log=lambda s: None)
    (row,) = _rows(tmp_path / "train_sft.jsonl")
    assert row["messages"][1]["content"] == "Sure \ufffd here." and stats["kept"] == 1
    assert assistant.stats["lone_surrogates_replaced"] == 1
    with Journal(tmp_path / "j.jsonl", {}) as journal:
        with pytest.raises(UnicodeEncodeError):
            journal.append(("k",), {"text": half})
        assert ("k",) not in journal  # not counted as done when it could not be written


def test_replies_with_unicode_line_separators_resume(tmp_path):
    """U+2028, U+2029 and U+0085 stay unescaped in the journal's JSON: reading it back must not split lines
    there (str.splitlines did, and every rerun was refused as a damaged journal)."""
    from zephyr_jax.data.journal import Journal

    text = "First line\u2028second\u2029third, and a NEL\x85here."
    with Journal(tmp_path / "j.jsonl", {}) as journal:
        journal.append(("k",), {"text": text})
        journal.append(("k2",), {"text": "plain"})
    with Journal(tmp_path / "j.jsonl", {}) as journal:
        assert journal.resumed == 2 and journal.get(("k",)) == {"text": text}


@pytest.mark.parametrize("partial", [b'{"key": ["k2"], "val', b"{"])  # (its first byte alone is cut off too)
def test_a_line_cut_by_a_kill_is_dropped_so_every_later_run_resumes(tmp_path, partial):
    """A run killed mid-write leaves half a line: the next run cuts it off before appending (glued to it, the
    next item made a line that stopped the run after)."""
    from zephyr_jax.data.journal import Journal

    path = tmp_path / "j.jsonl"
    with Journal(path, {"a": 1}) as journal:
        journal.append(("k1",), {"v": 1})
    with open(path, "ab") as f:
        f.write(partial)
    for run in range(2):
        with Journal(path, {"a": 1}) as journal:
            assert journal.resumed == 1 + run and journal.get(("k1",)) == {"v": 1}
            if run == 0:
                journal.append(("k2",), {"v": 2})
            else:
                assert journal.get(("k2",)) == {"v": 2}


def test_a_journal_is_read_line_by_line(tmp_path):
    """Resuming holds the journal's items, not the file as well: it was read whole and split into lines, three
    times its size at the peak (feedback on 16k prompts: a 372 MB journal peaked at 1.44 GB)."""
    import tracemalloc

    from zephyr_jax.data.journal import Journal

    path = tmp_path / "j.jsonl"
    with Journal(path, {}) as journal:
        for k in range(200):
            journal.append((k,), {"text": f"reply {k} " + "x" * 10_000})
    size = path.stat().st_size
    tracemalloc.start()
    try:
        with Journal(path, {}) as journal:
            _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert journal.resumed == 200 and journal.get((7,))["text"].startswith("reply 7 x")
    assert peak < 1.5 * size, (peak, size)


def test_a_slow_journal_read_shows_its_progress(tmp_path, monkeypatch, capsys):
    """Resuming feedback on 16,000 prompts read a 320 MB journal for 3 s before a word (UltraFeedback's 64,000:
    12 s and more); a read that lasts over PROGRESS_DELAY seconds shows a bar."""
    from zephyr_jax.data import journal

    path = tmp_path / "j.jsonl"
    with journal.Journal(path, {}) as j:
        for i in range(2048):  # the bar moves every 1,024 lines
            j.append(("k", i), {"v": i})
    capsys.readouterr()
    monkeypatch.setattr(journal, "PROGRESS_DELAY", 0, raising=False)
    bars = []

    class Bar(journal.tqdm):  # the bytes it counted, out of the bytes it was told of
        def close(self):
            bars.append((self.n, self.total))
            super().close()

    monkeypatch.setattr(journal, "tqdm", Bar)
    journal.Journal(path, {}).close()
    assert "reading j.jsonl" in capsys.readouterr().err
    assert bars[0] == (path.stat().st_size, path.stat().st_size), bars


@pytest.mark.parametrize("junk", [b"\xff\xfe garbage", b'{"key": [[1]], "value": {}}'])
def test_a_damaged_journal_line_is_named(tmp_path, junk):
    """Bytes that are not UTF-8 and keys holding lists raised bare UnicodeDecodeError / TypeError."""
    from zephyr_jax.data.journal import Journal

    path = tmp_path / "j.jsonl"
    path.write_bytes(b'{"key": [1], "value": {}}\n' + junk + b"\n")
    with pytest.raises(ValueError, match=f"{path}:2: not a journal line"):
        Journal(path, {})


def test_one_run_per_journal(tmp_path):
    from zephyr_jax.data.journal import Journal, JournalInUse

    assert issubclass(JournalInUse, ValueError)  # the CLIs print it as one line, as they do SettingsMismatch

    with Journal(tmp_path / "j.jsonl", {"a": 1}):
        with pytest.raises(JournalInUse, match="in use by another run"):
            Journal(tmp_path / "j.jsonl", {"a": 1})
        with pytest.raises(JournalInUse):  # refused before it could delete the running one's work
            Journal(tmp_path / "j.jsonl", {"a": 2}, overwrite=True)
    with pytest.raises(SettingsMismatch):
        Journal(tmp_path / "j.jsonl", {"a": 2})
    with Journal(tmp_path / "j.jsonl", {"a": 1}) as journal:  # free again, also after a refused open
        journal.append(("k",), {"v": 1})
    # A setting the journal predates is taken, then kept: the next resume with another value is refused.
    with Journal(tmp_path / "j.jsonl", {"a": 1, "temperature": 0.7}) as journal:
        assert journal.resumed == 1
    with pytest.raises(SettingsMismatch, match=r"temperature: 0\.7 on disk, 1\.0 now"):
        Journal(tmp_path / "j.jsonl", {"a": 1, "temperature": 1.0})


def test_a_seed_that_is_the_opening_is_taken_as_it_is(tmp_path):
    """The user simulator's tidying (labels, quotes, a reply it wrote itself) is not for given text."""
    opening = '"Summarise" this chat:\n\nCustomer: it blinks red.\nAI: Restart it.'
    _run(tmp_path, [Seed(opening, "materials")], min_turns=1, max_turns=1, test_size=0)
    (row,) = _rows(tmp_path / "train_sft.jsonl")
    assert row["messages"][0]["content"] == row["prompt"] == opening


def test_a_later_pass_over_openings_asks_for_others_of_their_kind(tmp_path):
    """Dialogue i takes seed i mod the seeds: a seed that is an opening, taken as it is again, was dropped as a
    duplicate (100,000 dialogues from the 2,140 built-in seeds kept a few thousand). From the second pass on, the
    user simulator writes another opening of the seed's kind."""
    seeds = [Seed("Write a poem about tides.", "writing"), Seed("Summarise: the moon pulls the sea.", "materials")]
    stats = _run(tmp_path, seeds, num_dialogues=6, min_turns=1, max_turns=1, test_size=0)
    openings = [r["prompt"] for r in _rows(tmp_path / "train_sft.jsonl")]
    assert stats["kept"] == 6 and openings[:2] == [s.text for s in seeds]
    for i, opening in enumerate(openings[2:], 2):
        assert opening.startswith(f"Something like '{seeds[i % 2].text}', but mine ("), opening
    assert len(set(openings)) == 6


FILTER_SEEDS = [  # (opening, what becomes of it with 3 turns)
    ("Tell me about tides?", "kept"),
    ("Please explain REFUSE rules.", "truncated: refusal in assistant turn"),
    ("What do you think of EMOTION in music?", "dropped: AI boilerplate in assistant turn"),
    ("Why REPEAT things?", "truncated: repeated assistant turn"),
    ("Describe EMPTY space.", "dropped: empty assistant turn"),
    ("Explain LONG division.", "dropped: assistant turn over 500 chars"),
    ("Write a MARKER poem.", "dropped: special-token text in assistant turn"),
    ("How do I CUT glass?", "truncated: assistant turn cut off at max_tokens"),
    ("Why does FAIL happen?", "truncated: failed assistant call"),
    ("Can you BREAK it down?", "truncated: user simulator broke character"),
    ("What if USERFAIL occurs?", "truncated: failed user call"),
    ("tell me   about TIDES", "dropped: duplicate opening prompt"),
]


def test_filters_drop_or_truncate_and_count_each_reason(tmp_path):
    seeds = [Seed(text, "writing") for text, _ in FILTER_SEEDS]
    stats = _run(tmp_path, seeds, min_turns=3, max_turns=3, max_turn_chars=500, test_size=0)
    expect = {"dropped": {}, "truncated": {}}
    for _, fate in FILTER_SEEDS:
        if fate != "kept":
            kind, reason = fate.split(": ")
            expect[kind][reason] = expect[kind].get(reason, 0) + 1
    assert stats["dropped"] == expect["dropped"] and stats["truncated"] == expect["truncated"]
    rows = {r["prompt"]: r for r in _rows(tmp_path / "train_sft.jsonl")}
    kept = [text for text, fate in FILTER_SEEDS if not fate.startswith("dropped")]
    assert list(rows) == kept and stats["kept"] == len(kept) and stats["dialogues"] == len(FILTER_SEEDS)
    turns = {text: len(rows[text]["messages"]) // 2 for text in kept}
    assert turns == {"Tell me about tides?": 3, "Please explain REFUSE rules.": 1, "Why REPEAT things?": 1,
                     "How do I CUT glass?": 1, "Why does FAIL happen?": 1, "Can you BREAK it down?": 1,
                     "What if USERFAIL occurs?": 1}
    assert stats["failed_calls"] == {"RuntimeError: assistant model is down": 1,
                                     "RuntimeError: user model is down": 1}
    assert stats["backends"]["assistant"]["failures"] == 1 and stats["backends"]["user"]["failures"] == 1


@pytest.mark.parametrize("role, text, reason", [
    ("assistant", "I’m sorry, but I cannot share that.", "refusal in assistant turn"),
    ("assistant", "I apologize, but I won't write that.", "refusal in assistant turn"),
    ("assistant", "I can't assist you with this request... ok, I can't help with that.", "refusal in assistant turn"),
    ("assistant", "As an AI language model trained on text, I think so.", "AI boilerplate in assistant turn"),
    ("assistant", "I do not have personal opinions, but here are both sides.", "AI boilerplate in assistant turn"),
    ("assistant", "I'm just a language model.", "AI boilerplate in assistant turn"),
    ("user", "As an AI, I wonder about this.", "user simulator broke character"),
    ("user", "I'm an AI language model, so I cannot ask.", "user simulator broke character"),
    ("user", "As an AI language model I cannot ask that.", "user simulator broke character"),
    ("user", "As an AI researcher, I want to know how transformers scale.", None),
    ("user", "I am an AI student, how do I start? I don't have any preferences.", None),
    ("assistant", "The token <unk> is id 0.", "special-token text in assistant turn"),
    ("assistant", "You can use Python as an AI tool. I'm sorry to hear it broke.", None),
    ("assistant", "I don't have a car either, so take the bus.", None),
    ("assistant", "Hello <|user|>", "special-token text in assistant turn"),
    ("assistant", "Tides, as said.", "repeated assistant turn"),
])
def test_turn_checks(role, text, reason):
    assert check_turn(role, text, "stop", {"tides as said"}, 8000) == reason


def test_user_turns_are_tidied():
    assert tidy_user_turn(' User: "Why is the sky blue?"\nAssistant: Because...') == "Why is the sky blue?"
    assert tidy_user_turn("Human: tell me more") == "tell me more"
    # Quotes that open and close the message, not quotes around its parts (their outer two were cut).
    assert tidy_user_turn("'Hi' she said, 'bye'") == "'Hi' she said, 'bye'"
    assert tidy_user_turn('"Dune" or "Foundation"') == '"Dune" or "Foundation"'


def test_seeds_from_files(tmp_path):
    txt = tmp_path / "seeds.txt"
    txt.write_text("volcanoes\n\nWhy is the sea salty?\nWrite a poem about frost.\n")
    assert load_seeds(txt) == [Seed("volcanoes", "world", True), Seed("Why is the sea salty?", "world"),
                               Seed("Write a poem about frost.", "world")]
    assert not looks_like_opening("the Roman roads") and looks_like_opening("Summarize the Roman roads")
    # Names that start like a sentence are topics (they were openings, sent to the assistant as they are), and a
    # file can say what its lines are
    names = ["Will Smith", "My Chemical Romance", "I, Robot", "Name of the Rose"]
    assert not any(looks_like_opening(n) for n in names)
    assert [s.is_topic for s in load_seeds(txt, seeds_are="topics")] == [True] * 3
    assert [s.is_topic for s in load_seeds(txt, seeds_are="openings")] == [False] * 3
    with pytest.raises(ValueError, match=r"seeds_are='names': expected one of \('auto', 'topics', 'openings'\)"):
        load_seeds(txt, seeds_are="names")
    jsonl = tmp_path / "seeds.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in (
        {"topic": "glaciers", "sector": "world"}, {"question": "What is rust?"},
        {"material": "Rust forms when iron meets water and air."},
        {"material": "Bees dance.", "instruction": "Explain this to a child:"})) + "\n")
    seeds = load_seeds(jsonl, sector="writing")
    assert seeds[:2] == [Seed("glaciers", "world", True), Seed("What is rust?", "writing")]
    assert seeds[2].sector == "writing" and "Rust forms when iron meets water and air." in seeds[2].text
    assert seeds[3] == Seed("Explain this to a child:\n\nBees dance.", "writing")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "ok?"}\n{"text": "no seed column"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl row 2: no seed column"):
        load_seeds(bad)
    bad.write_text('{"question": "ok?", "sector": ["world"]}\n')  # a list raised TypeError (unhashable)
    with pytest.raises(ValueError, match=r"bad.jsonl row 1: unknown sector \['world'\]"):
        load_seeds(bad)
    bad.write_text('{"question": "half \\ud83d an emoji?"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl row 1: text with a lone surrogate"):
        load_seeds(bad)
    for missing in ("missing.txt", "missing.jsonl"):
        with pytest.raises(FileNotFoundError, match=f"seeds file .*{missing}' does not exist"):
            load_seeds(tmp_path / missing)
    # A .txt file: bytes that are not UTF-8 are named by file and line (the decoder's error named neither), a
    # byte-order mark is not part of the first seed, and a file of blank lines holds none.
    latin = tmp_path / "latin.txt"
    latin.write_bytes("tea\r\ncaf\xe9 culture\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.txt:2: not UTF-8 \(byte 0xe9 at column 4\)"):
        load_seeds(latin)
    latin.write_bytes(b"\xef\xbb\xbfWhy is tea bitter?\r\ncoffee\r\n")
    assert load_seeds(latin) == [Seed("Why is tea bitter?", "world"), Seed("coffee", "world", True)]
    latin.write_text("\n  \n")
    with pytest.raises(ValueError, match=r"seeds file .*latin\.txt' holds no seeds"):
        load_seeds(latin)
    # Rows given to make_dialogues as dicts are the rows of a seeds file: each material row draws its own
    # question template (they all drew the first row's).
    rows = [{"material": f"Passage {i} about gardens and bread."} for i in range(8)]
    (tmp_path / "mat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from_file = load_seeds(tmp_path / "mat.jsonl", seed=7)
    assert len({seed.text.replace(r["material"], "") for seed, r in zip(from_file, rows)}) > 1
    openings = []
    teacher = CallableBackend(lambda call: openings.append(call.messages[-1]["content"]) or "An answer.")
    make_dialogues(rows, None, teacher, tmp_path / "out", min_turns=1, max_turns=1, seed=7, test_size=0,
                   concurrency=1, log=lambda s: None)
    assert openings == [seed.text for seed in from_file]
    with pytest.raises(ValueError, match="concurrency=0"):
        make_dialogues(rows, None, teacher, tmp_path / "out0", concurrency=0, log=lambda s: None)
    with pytest.raises(ValueError, match="concurrency=0"):
        CallableBackend(scripted_user, concurrency=0)


def test_what_load_rows_reads_is_not_refused_as_a_missing_seeds_file(tmp_path, monkeypatch):
    """A hub name with a dot in it ("teknium/OpenHermes-2.5") and a glob with "?" were refused as missing files."""
    from zephyr_jax.data import sources

    (tmp_path / "part1.jsonl").write_text('{"question": "From a glob?"}\n')
    assert load_seeds(str(tmp_path / "part?.jsonl")) == [Seed("From a glob?", "world")]
    monkeypatch.setattr(sources, "load_rows", lambda source, split: [{"prompt": f"From {source}:{split}?"}])
    assert load_seeds("teknium/OpenHermes-2.5") == [Seed("From teknium/OpenHermes-2.5:train?", "world")]


def test_a_callable_backend_runs_concurrency_calls_at_once():
    """Each sync call waits until all 12 are in flight: asyncio's shared default pool (min(32, CPUs + 4) threads,
    6 on 2 cores) could never hold them all, so every call broke the barrier."""
    import asyncio
    import threading

    barrier = threading.Barrier(12, timeout=20)
    backend = CallableBackend(lambda call: str(barrier.wait()), concurrency=12)
    calls = [backend.complete(Call(messages=[{"role": "user", "content": str(i)}])) for i in range(12)]

    async def run_all():
        return await asyncio.gather(*calls)

    replies = asyncio.run(run_all())
    backend.close()
    assert [r.error for r in replies] == [None] * 12 and sorted(int(r.text) for r in replies) == list(range(12))


# --------------------------------------------------------------------------------------- resume and settings

def test_rerun_resumes_refuses_other_settings_and_overwrite_starts_afresh(tmp_path):
    seeds = builtin_seeds("all")
    user, assistant = CallableBackend(scripted_user, concurrency=1), CallableBackend(scripted_assistant, concurrency=1)
    first = make_dialogues(seeds, user, assistant, tmp_path, num_dialogues=6, log=lambda s: None)
    calls = first["backends"]["assistant"]["calls"] + first["backends"]["user"]["calls"]
    again = make_dialogues(seeds, user, assistant, tmp_path, num_dialogues=6, log=lambda s: None)  # same backends
    assert again["messages_resumed"] == calls and again["backends"]["assistant"]["calls"] == first["backends"][
        "assistant"]["calls"]  # their counters did not move: nothing was called again
    grown = make_dialogues(seeds, user, assistant, tmp_path, num_dialogues=9, log=lambda s: None)  # reuses all
    assert grown["messages_resumed"] == calls and grown["kept"] == 9
    with pytest.raises(SettingsMismatch, match=r"temperature: 1\.0 on disk, 0\.5 now.*--overwrite"):
        _run(tmp_path, seeds, num_dialogues=6, temperature=0.5)
    fresh = _run(tmp_path, seeds, num_dialogues=6, temperature=0.5, overwrite=True)
    assert fresh["messages_resumed"] == 0 and fresh["messages_journaled"] == calls


CLI = ["--user=callable:tests.test_dialogues:scripted_user", "--assistant=callable:tests.test_dialogues:"
       "scripted_assistant", "--sector=all", "--num_dialogues=12", "--min_turns=1", "--max_turns=3",
       "--concurrency=3", "--test_size=2"]


def _cli(out, log, *extra, sleep=0.0, hold_from=None):
    env = {**os.environ, CALL_LOG: str(log), SLEEP: str(sleep), **({HOLD_FROM: str(hold_from)} if hold_from else {})}
    return subprocess.Popen([sys.executable, "-m", "zephyr_jax.data.dialogues", f"--output={out}", *CLI, *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _lines(path):
    """The whole lines of a file (a line cut off by a kill has no newline yet)."""
    text = open(path).read() if os.path.exists(path) else ""
    return text[:text.rfind("\n") + 1].splitlines()


def _kill_after(proc, journal, n):
    """SIGKILLs `proc` once `journal` holds n lines (polled every few ms, for at most two minutes)."""
    deadline = time.time() + 120
    while len(_lines(journal)) < n:
        assert proc.poll() is None, f"the run ended before {n} journal lines: {_communicate(proc)[1][-2000:]}"
        assert time.time() < deadline, f"no {n} journal lines in 120 s"
        time.sleep(0.003)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def _communicate(proc, timeout=300):
    """(stdout, stderr) of a finished run; a run still going after `timeout` seconds is killed and fails."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise


def test_kill9_at_several_points_then_rerun_equals_uninterrupted_run(tmp_path):
    ref = tmp_path / "ref"
    proc = _cli(ref, tmp_path / "ref.calls")
    _, err = _communicate(proc)
    assert proc.returncode == 0, err[-3000:]
    ref_journal = _lines(ref / "journal" / "dialogues.jsonl")
    total = len(ref_journal)
    assert total == len(_lines(tmp_path / "ref.calls")) > 20
    for n in (1, total // 2, total - 3):
        out, journal = tmp_path / f"kill{n}", tmp_path / f"kill{n}" / "journal" / "dialogues.jsonl"
        # The last call waits for the kill: the run's last 3 calls took 83-143 ms, which a loaded machine's pause
        # of this poll can outlast (paused up to 100-305 ms a minute on 2 busy cores): the kill found a finished run.
        _kill_after(_cli(out, tmp_path / f"kill{n}.calls", sleep=0.05, hold_from=total), journal, n)
        done = {json.loads(line)["value"]["seed"] for line in _lines(journal)}
        assert len(done) >= n and not (out / "train_sft.jsonl").exists()
        assert n > total // 2 or len(done) < total  # killed mid-run: the rerun has calls left to make
        proc = _cli(out, tmp_path / f"rerun{n}.calls")
        printed, err = _communicate(proc)
        assert proc.returncode == 0 and f"resuming: {len(done)} finished messages" in printed, err[-3000:]
        recalled = {int(s) for s in _lines(tmp_path / f"rerun{n}.calls")}
        assert not recalled & done, "the rerun called again for messages the journal held"
        assert len(_lines(journal)) == total and len(recalled) + len(done) == total
        for name in ("train_sft.jsonl", "test_sft.jsonl"):
            assert _rows(out / name) == _rows(ref / name), (n, name)
            assert (out / name).read_bytes() == (ref / name).read_bytes()
    proc = _cli(ref, tmp_path / "other.calls", "--temperature=0.5")  # other settings: refused, named
    _, err = _communicate(proc)
    assert proc.returncode != 0 and "temperature: 1.0 on disk, 0.5 now" in err and "--overwrite" in err


# --------------------------------------------------------------------------------------- Magpie

MAGPIE_CALLS = []


def magpie_model(call):
    """Writes a user query for a raw prompt, answers a chat call; records both."""
    MAGPIE_CALLS.append(call)
    if call.prompt is not None:
        return f"How many legs does a spider have? ({call.seed % 101})"
    return f"Eight. (reply to {len(call.messages)} messages)"


def test_magpie_raw_prompt_is_the_template_prefix(tmp_path):
    MAGPIE_CALLS.clear()
    stats = make_dialogues(None, None, CallableBackend(magpie_model, concurrency=1), tmp_path, mode="magpie",
                           num_dialogues=3, min_turns=2, max_turns=2, test_size=0, concurrency=1,
                           log=lambda s: None)
    assert stats["kept"] == 3 and stats["models"] == {"user": "magpie_model", "assistant": "magpie_model"}
    raw = [c for c in MAGPIE_CALLS if c.prompt is not None]
    chat = [c for c in MAGPIE_CALLS if c.messages is not None]
    assert len(raw) == len(chat) == 6
    assert {c.prompt for c in raw[:3]} == {"<|system|>\n</s>\n<|user|>\n"}  # the openings: the bare prefix
    assert all(c.temperature == 1.0 and set(c.stop) >= {"</s>", "<|assistant|>", "<|user|>"} for c in raw)
    assert all(c.temperature == 0.0 for c in chat)
    row = _rows(tmp_path / "train_sft.jsonl")[0]
    first, answer = row["messages"][:2]
    assert raw[3].prompt == f"<|system|>\n</s>\n<|user|>\n{first['content']}</s>\n<|assistant|>\n" \
                           f"{answer['content']}</s>\n<|user|>\n"
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"] * 2 and row["sector"] == "magpie"
    with pytest.raises(ValueError, match="magpie mode takes no seeds"):
        make_dialogues(["a?"], None, CallableBackend(magpie_model), tmp_path, mode="magpie", num_dialogues=1)
    with pytest.raises(ValueError, match="^magpie mode needs num_dialogues$"):  # (it has no seeds to count)
        make_dialogues(None, None, CallableBackend(magpie_model), tmp_path, mode="magpie")
    for seeds in (None, []):  # ultrachat mode with nothing to start from
        with pytest.raises(ValueError, match=r"^no seeds: pass seeds \(see builtin_seeds / load_seeds\)$"):
            make_dialogues(seeds, None, CallableBackend(magpie_model), tmp_path)
    with pytest.raises(ValueError, match=r"^mode='self_chat': expected one of \('ultrachat', 'magpie'\)$"):
        make_dialogues(["a?"], None, CallableBackend(magpie_model), tmp_path, mode="self_chat")
    # The same command again resumes (the default tokenizer loads from a new temporary directory each time).
    MAGPIE_CALLS.clear()
    again = make_dialogues(None, None, CallableBackend(magpie_model, concurrency=1), tmp_path, mode="magpie",
                           num_dialogues=3, min_turns=2, max_turns=2, test_size=0, concurrency=1,
                           log=lambda s: None)
    assert not MAGPIE_CALLS and again["kept"] == 3
    with pytest.raises(ValueError, match=r"test_size=1.5: expected a fraction"):  # refused before any call is made
        make_dialogues(None, None, CallableBackend(magpie_model), tmp_path / "b", mode="magpie", num_dialogues=1,
                       test_size=1.5)
    assert not MAGPIE_CALLS and not (tmp_path / "b").exists()
    # Another template (ChatML): transformers 5 renders no empty conversation, which every template but Zephyr's
    # got here (a ValueError: magpie mode took none of them)
    from zephyr_jax.tokenizer import load_tokenizer

    chatml = load_tokenizer()
    chatml.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                            "'<|im_end|>\\n' }}{% endfor %}"
                            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    magpie = dialogues.MagpieTemplate(chatml)
    assert magpie.prefix([]) == "<|im_start|>user\n"
    assert magpie.prefix([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]) == \
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n<|im_start|>user\n"
    assert set(magpie.stop) == {"<|im_end|>", "<|im_start|>assistant", "<|im_start|>user", "</s>"}


# --------------------------------------------------------------------------------------- over real HTTP

def test_both_modes_over_http_against_the_scripted_server(tmp_path):
    from tests.scripted_server import ScriptedServer, status, text
    from zephyr_jax.data.backends import backend_from_spec

    def respond(body, attempt):
        if attempt == 0 and body.get("seed", 0) % 5 == 0:
            return status(429, retry_after=0.01)  # retried by the client: no row lost or doubled
        if "prompt" in body:  # Magpie's raw prefix on /v1/completions
            return text(f" Which prime follows {body['seed']}?")
        if body["messages"][0]["role"] == "system":  # the user simulator
            return text(f"And why is that so? ({body['seed']})")
        return text(f"Because of {body['seed']}.")

    with ScriptedServer(respond) as server:
        spec = f"endpoint:teacher@{server.base_url}"
        chat = make_dialogues(builtin_seeds("writing"), None, backend_from_spec(spec), tmp_path / "chat",
                              num_dialogues=4, min_turns=2, max_turns=2, test_size=1, log=lambda s: None)
        magpie = make_dialogues(None, None, backend_from_spec(spec), tmp_path / "magpie", mode="magpie",
                                num_dialogues=3, test_size=0, log=lambda s: None)
        log, counts = server.log, server.counts()
    assert chat["kept"] == 4 and magpie["kept"] == 3
    assert chat["backends"]["assistant"]["retries"] + magpie["backends"]["assistant"]["retries"] == counts["429"] > 0
    assert chat["backends"]["assistant"]["calls"] == 4 * 3 and magpie["backends"]["assistant"]["calls"] == 3 * 2
    raw = [e["body"] for e in log if e["path"] == "/v1/completions"]
    assert {b["prompt"] for b in raw} == {"<|system|>\n</s>\n<|user|>\n"} and len(raw) >= 3
    assert all(set(b["stop"]) >= {"</s>", "<|assistant|>"} and b["temperature"] == 1.0 for b in raw)
    rows = _rows(tmp_path / "magpie" / "train_sft.jsonl")
    assert len({r["prompt"] for r in rows}) == 3 and all(r["prompt"].startswith("Which prime") for r in rows)


# --------------------------------------------------------------------------------------- the trainer reads it

def test_output_trains_in_a_tiny_sft_run(tmp_path):
    from zephyr_jax import train
    from zephyr_jax.config_common import load_config

    _run(tmp_path / "data", builtin_seeds("all"), num_dialogues=10, min_turns=1, max_turns=2, test_size=2)
    cfg = load_config(os.path.join(ROOT, "configs", "sft.py:tiny"), **{
        "data.train": str(tmp_path / "data"), "data.eval": str(tmp_path / "data"), "train.progress": False,
        "logging.tensorboard": False, "train.max_steps": 2, "train.eval_every": 0, "train.save_every": 0})
    metrics = train.run(cfg, str(tmp_path / "sft"))
    records = [json.loads(line) for line in open(tmp_path / "sft" / "metrics.jsonl")]
    assert [r["step"] for r in records if r["split"] == "train"][-1] == 2
    assert all(v == v for v in metrics.values() if isinstance(v, float))  # no NaN in the final eval


def unreachable(call):
    """A backend (callable:tests.test_dialogues:unreachable) whose server refuses every connection: the dialogues
    CLI's teacher here, the feedback CLI's generator in tests/test_feedback.py."""
    raise ConnectionRefusedError("connection refused")


def test_cli_fails_when_no_dialogue_was_kept(tmp_path):
    """It exited 0 with empty splits, so `dialogues && train` went on to train on nothing."""
    from zephyr_jax.data import dialogues

    with pytest.raises(SystemExit, match=r"error: no dialogue of 2 was kept .*connection refused"):
        dialogues.main([f"--output={tmp_path}", "--assistant=callable:tests.test_dialogues:unreachable",
                        "--num_dialogues=2", "--test_size=0"])


def test_cli_refuses_bad_numbers_before_an_engine_loads(tmp_path, monkeypatch, capsys):
    """They were checked inside make_dialogues, after the engine: teacher had loaded its model (minutes)."""
    from zephyr_jax.data import backends, dialogues

    def no_load(*args, **kw):
        raise AssertionError("an engine model was loaded before the arguments were checked")

    monkeypatch.setattr(backends.EngineBackend, "from_path", no_load)
    for flags, message in ((["--test_size=2.5"], "test_size=2.5: expected a fraction in [0, 1) or a whole count"),
                           (["--concurrency=0"], "concurrency=0: at least 1 dialogue must be in flight"),
                           (["--num_dialogues=-1"], "num_dialogues=-1 is negative"),
                           # a MemoryError listing 2**31 indices after the engine's load (magpie's alike)
                           (["--num_dialogues=2147483648"], "num_dialogues=2147483648: more than the 10,000,000"),
                           (["--mode=magpie", "--num_dialogues=10000001"], "num_dialogues=10000001: more than the"),
                           # inf: an OverflowError traceback; nan passed, and failed at the split, unnamed
                           (["--test_size=inf"], "test_size=inf: expected a fraction in [0, 1) or a whole count"),
                           (["--test_size=nan"], "test_size=nan: expected a fraction in [0, 1) or a whole count"),
                           (["--min_turns=3", "--max_turns=2"], "need 1 <= min_turns <= max_turns, got min_turns=3")):
        with pytest.raises(SystemExit, match=re.escape(f"error: {message}")):
            dialogues.main([f"--output={tmp_path / 'out'}", "--assistant=engine:teacher", *flags])
    dialogues._check_sizes(0.2, 1, dialogues.MAX_DIALOGUES, None, None)  # the bound itself is taken
    # magpie's --tokenizer, read for its template: a typo was found once the teacher had loaded its model too
    with pytest.raises(SystemExit, match=f"error: tokenizer {re.escape(str(tmp_path / 'no_tokenizer'))} does not"):
        dialogues.main([f"--output={tmp_path / 'out'}", "--assistant=engine:teacher", "--mode=magpie",
                        "--num_dialogues=2", f"--tokenizer={tmp_path / 'no_tokenizer'}"])
    for flags, message in ((["--num_dialogues=2", "--user=engine:user"], "--mode=magpie takes neither --seeds nor "
                                                                           "--user: the assistant model writes both"),
                           ([], "--mode=magpie needs --num_dialogues")):
        with pytest.raises(SystemExit):
            dialogues.main([f"--output={tmp_path / 'out'}", "--assistant=engine:teacher", "--mode=magpie", *flags])
        assert message in capsys.readouterr().err, flags
    assert not (tmp_path / "out").exists()
    (tmp_path / "notes").write_text("mine")  # (an error from the journal's folder, after the model's load)
    with pytest.raises(SystemExit):
        dialogues.main([f"--output={tmp_path / 'notes'}", "--assistant=engine:teacher"])
    assert f"--output={tmp_path / 'notes'}: {tmp_path / 'notes'} is a file, not a directory" in \
        capsys.readouterr().err


def test_one_seed_or_one_stop_string_is_not_taken_for_many(tmp_path):
    """A string where a list belongs was iterated: a dialogue seeded by each character, a stop at each one."""
    with pytest.raises(TypeError, match="seeds is one seed .str.: pass a list of them"):
        make_dialogues("Direct preference optimization", None, CallableBackend(scripted_assistant), tmp_path)
    # A Seed of a sector that has no turn range: refused before any call (a KeyError after the paid openings).
    calls = []
    with pytest.raises(ValueError, match=r"seeds\[1\] 'gardening': unknown sector 'science'"):
        make_dialogues([Seed("What is rain?"), Seed("gardening", "science", True)], None,
                       CallableBackend(lambda call: calls.append(call) or "ok"), tmp_path / "sector")
    assert calls == []
    assert Call(messages=[{"role": "user", "content": "Hi"}], stop="END").stop == ("END",)
    with pytest.raises(TypeError, match="assistant='callable:tests.test_dialogues:scripted_assistant': pass a Backend"):
        make_dialogues(["a topic"], None, "callable:tests.test_dialogues:scripted_assistant", tmp_path)


# --- Found by mutation testing: what a subtly wrong dialogue loop would still have passed. ---

def test_truncated_dialogues_end_on_an_assistant_turn(tmp_path):
    seeds = [Seed(t, "writing") for t, _ in FILTER_SEEDS]
    _run(tmp_path, seeds, min_turns=3, max_turns=3, max_turn_chars=500, test_size=0)
    for row in _rows(tmp_path / "train_sft.jsonl"):
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and len(roles) % 2 == 0, (row["prompt"], roles)


def test_turn_counts_are_drawn_per_dialogue_over_the_whole_range(tmp_path):
    seeds = [Seed(f"Question number {i} about tides?", "world") for i in range(20)]
    _run(tmp_path, seeds, min_turns=1, max_turns=4, test_size=0)
    turns = [len(r["messages"]) // 2 for r in _rows(tmp_path / "train_sft.jsonl")]
    assert len(turns) == 20 and set(turns) == {1, 2, 3, 4}, turns  # both ends reached (seeded: fixed)


def test_each_message_is_normalized_a_bounded_number_of_times(tmp_path, monkeypatch):
    # The repeat check normalized every earlier message again for each new one: a dialogue of n messages cost
    # n(n+1)/2 normalizations (40 turns: 3,240), a third of a resumed 20,000-dialogue run's time.
    calls = []
    monkeypatch.setattr(dialogues, "normalize", lambda text: calls.append(text) or text.lower())
    made, add = [], dialogues._Dialogue.add
    monkeypatch.setattr(dialogues._Dialogue, "add", lambda d, role, text: (made.append(d), add(d, role, text))[1])
    _run(tmp_path, [Seed("What about tides?", "world")], min_turns=40, max_turns=40, test_size=0)
    assert len(_rows(tmp_path / "train_sft.jsonl")[0]["messages"]) == 80
    assert len(calls) <= 2 * 80 + 1, len(calls)
    assert made and not any(d.said for d in made)  # a finished dialogue lets go of its normalized texts


def test_turn_range_defaults():
    assert dialogues._turn_range(None, 3) == (1, 3) and dialogues._turn_range(2, None) == (2, 2)
    assert dialogues._turn_range(None, 1) == (1, 1)
    with pytest.raises(ValueError, match="min_turns=0"):  # --min_turns=0 --max_turns=3 ran as 1..3
        dialogues._turn_range(0, 3)


def test_a_fraction_test_size_leaves_train_a_row():
    assert dialogues._test_count(0.9, 1) == 0 and dialogues._test_count(0.99, 10) == 9
    assert dialogues._test_count(2, 3) == 2  # a count: checked against the kept dialogues, known at the end
    with pytest.raises(ValueError, match=r"test_size=3 must be a whole count below the 3 kept dialogues"):
        dialogues._test_count(3, 3)


def test_a_turn_of_exactly_max_turn_chars_is_kept():
    assert check_turn("assistant", "x" * 10, "stop", set(), 10) is None
    assert check_turn("assistant", "x" * 11, "stop", set(), 10) == "assistant turn over 10 chars"


def test_a_message_that_repeats_the_other_side_is_a_repeat():
    said = [dialogues.normalize("What about tides?"), dialogues.normalize("Tides, as said.")]
    assert check_turn("user", "tides as said", "stop", set(said), 8000) == "repeated user turn"
    assert check_turn("assistant", "What about tides", "stop", set(said[:1]), 8000) == "repeated assistant turn"


def test_a_failed_call_is_not_journaled_and_a_rerun_makes_it(tmp_path):
    broken = {"on": True}

    def flaky(call):
        if broken["on"] and "FLAKY" in call.messages[0]["content"]:
            raise RuntimeError("down")
        return scripted_assistant(call)

    seeds = [Seed("Tell me about FLAKY tides?", "writing"), Seed("Why is the sea salty?", "writing")]

    def run():
        return make_dialogues(seeds, CallableBackend(scripted_user, name="u"),
                                        CallableBackend(flaky, name="a"), tmp_path, min_turns=2, max_turns=2,
                                        test_size=0, log=lambda s: None)
    first = run()
    assert first["kept"] == 1 and first["dropped"] == {"failed assistant call": 1}
    broken["on"] = False
    second = run()
    # made again: the failed reply (message 1), then messages 2 and 3 of that dialogue; nothing else
    assert second["kept"] == 2 and second["backends"]["assistant"]["calls"] == 2
    assert second["backends"]["user"]["calls"] == 1


def test_the_user_simulator_is_told_the_topic_on_every_turn(tmp_path):
    systems = []

    def user(call):
        systems.append((call.messages[0]["content"], call.messages[1]["content"]))
        return scripted_user(call)

    seeds = [Seed("volcanoes", "world", True), Seed("Why is the sea salty?", "writing")]
    make_dialogues(seeds, CallableBackend(user, concurrency=1), CallableBackend(scripted_assistant),
                             tmp_path, min_turns=2, max_turns=2, test_size=0, log=lambda s: None)
    for system, first in systems:
        topic = "about this topic: volcanoes" in first
        assert system.endswith(" The conversation is about: volcanoes.") == topic, (system, first)
    assert any("volcanoes" in f for _, f in systems)


def test_stats_turns_count_turns_not_messages(tmp_path):
    seeds = [Seed(t, "writing") for t, _ in FILTER_SEEDS]
    stats = _run(tmp_path, seeds, min_turns=3, max_turns=3, max_turn_chars=500, test_size=0)
    assert stats["turns"] == sum(len(r["messages"]) // 2 for r in _rows(tmp_path / "train_sft.jsonl")) == 3 + 6


def test_a_seed_that_spans_lines_is_an_opening():
    from zephyr_jax.data.dialogue_seeds import as_seed
    text = "Customer: my router blinks red.\nAgent: restart it."
    assert looks_like_opening(text) and not as_seed(text).is_topic


def test_reason_kind_blanks_multi_digit_positions():
    from zephyr_jax.data.errors import SkipCounter, reason_kind
    assert reason_kind("empty content in messages[12]") == "empty content in messages[*]"
    c = SkipCounter()
    c.skip("empty content in messages[3]")
    c.skip("empty content in messages[117]")
    assert dict(c.skipped) == {"empty content in messages[*]": 2}


def test_a_setting_on_disk_that_the_rerun_lacks_is_refused(tmp_path):
    from zephyr_jax.data.journal import Journal, SettingsMismatch
    Journal(tmp_path / "j.jsonl", {"a": 1, "b": 2}).close()
    with pytest.raises(SettingsMismatch, match=r"b: 2 on disk, None now"):
        Journal(tmp_path / "j.jsonl", {"a": 1})
