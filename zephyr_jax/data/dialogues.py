"""UltraChat-style self-instruct dialogues for dSFT, from any teacher: a simulated user and an assistant take
turns, and the kept dialogues are written in the ultrachat_200k schema.

CLI:
    python -m zephyr_jax.data.dialogues --user=SPEC --assistant=SPEC --output=DIR
        [--seeds=FILE [--seeds_split=train] [--seed_column=COL] [--seeds_are=auto|topics|openings]]
        [--sector=world|writing|materials|all]
        [--num_dialogues=N] [--min_turns=A --max_turns=B] [--seed=42] [--test_size=0.1]
        [--concurrency=16] [--max_tokens=1024] [--temperature=1.0] [--max_turn_chars=8000]
        [--timeout=120] [--max_retries=6] [--api_key_env=OPENAI_API_KEY] [--mesh=D,F,T] [--overwrite]
    python -m zephyr_jax.data.dialogues --mode=magpie --assistant=SPEC --num_dialogues=N --output=DIR
        [--tokenizer=PATH] [--min_turns=1 --max_turns=1] ...
SPEC is a backend spec (zephyr_jax.data.backends): endpoint:MODEL@URL[,URL...], engine:PATH or
callable:module:function. --user defaults to --assistant (one model plays both parts).
The Python API is `make_dialogues(seeds, user, assistant, output_dir, ...)`, which returns the stats.

Seeds (data/dialogue_seeds.py). Built in (`builtin_seeds`), UltraChat's three sectors in this project's own
words, interleaved world, writing, materials, ... under --sector=all:
    world      a topic from a list of meta-topics and subtopics; the user simulator writes the opening
               question about it; 3-7 turns
    writing    a writing type x an instruction template x a subject (a ready instruction); 2-4 turns
    materials  an instruction template wrapped around a short passage (summarise, rewrite, question); 2-4 turns
or from --seeds (`load_seeds`): a .txt file (one seed a line) or anything `sources.load_rows` reads, with a
column "material", "seed", "topic", "question", "prompt" or "instruction" (the first a row has, or
--seed_column), and optionally "sector". A "topic" is handed to the user simulator to open with; a "question",
"prompt" or "instruction" is the opening itself; a "material" passage is wrapped in a materials template (or
follows the row's "instruction"/"question", if it has one); a "seed" (and a .txt line) is an opening when it looks
like one (ends with "?", starts with a question word or an imperative verb, or spans lines), else a topic, unless
--seeds_are=topics or openings says which for the whole file. Rows without a sector take --sector's (default:
materials for a material, else world). Dialogue i uses seed i mod the number of seeds; --num_dialogues defaults to
the number of seeds, and takes at most MAX_DIALOGUES (10M; a run holds them all in memory). On later passes over
the seeds (i >= their number) a seed that is an opening is not taken as it is again (it would be dropped as a
duplicate): the user simulator writes another opening of its kind (VARIATION_REQUEST); a topic gets a new opening
anyway.

A turn is one user message and the assistant's reply; each dialogue draws its number of turns from its
sector's range, or from --min_turns..--max_turns (one alone: --min_turns defaults to 1, --max_turns to
--min_turns). The user simulator gets USER_SYSTEM as its system prompt and sees the conversation with the roles
flipped (its own messages as "assistant"), after a user message asking it to open the conversation, so the roles
alternate from a user turn: any chat model whose template takes a system message can play the user.

Magpie mode (--mode=magpie): no seeds and no user model. The assistant model is given only its chat template's
text up to the start of a user turn (rendered with --tokenizer's template around a sentinel, cut before it) as
a raw prompt (/v1/completions on an endpoint), at temperature 1, stopped at the template's end-of-turn and
role markers; what it writes is the user message, which the same model then answers greedily (temperature 0)
through a chat call. Later turns give it the whole conversation so far followed by the user-turn prefix.

Output (DIR):
    train_sft.jsonl, test_sft.jsonl   rows {prompt, prompt_id, messages, sector, models}: the ultrachat_200k
                                      schema (prompt_id = sha256 hex of the prompt), with the seed's sector and
                                      {"user": name, "assistant": name} as provenance; dialogue order.
                                      test_sft is a seeded sample (binarize.train_test_split) of --test_size
                                      rows (a fraction below 1, else a count). load_rows(DIR, "train_sft")
                                      reads them; the trainer takes DIR as data.train / data.eval.
    stats.json                        counts, drops and truncations by reason, tokens of all journaled
                                      calls, each backend's counters (its calls in this process: none for
                                      messages replayed from the journal)
    journal/dialogues.jsonl           every finished call, keyed [dialogue, model name, message index]
                                      (+ .settings.json): what a rerun resumes from

Filters. Every message is checked as it arrives; the first check that fails ends the dialogue there:
    failed call (Reply.ok False)         "failed user call" / "failed assistant call"
    empty after stripping                "empty user turn" / "empty assistant turn"
    "<s>", "</s>" or a role marker       "special-token text in ... turn" (the trainer refuses such rows)
    stopped at max_tokens                "... turn cut off at max_tokens"
    longer than --max_turn_chars         "... turn over N chars"
    assistant refusal                    "refusal in assistant turn" (REFUSAL regexes)
    "as an AI", "I don't have opinions"  "AI boilerplate in assistant turn" (BOILERPLATE regexes)
    "As an AI, ...", "I'm an AI."        in a user turn: "user simulator broke character" (USER_AS_MODEL)
    same text as an earlier message      "repeated ... turn" (compared after normalizing case and punctuation)
A failure in a later message truncates the dialogue to its last complete turn before it (counted in
"truncated", by reason); a failure in the first turn drops the dialogue (counted in "dropped", by reason).
Openings are made first for all dialogues; a dialogue whose normalized opening repeats an earlier dialogue's is
dropped ("duplicate opening prompt") before anything more is asked for it. The user simulator's messages are
tidied before the checks (a leading "User:", "Human:", "Me:" or "Person:" label and quotes around the whole
message removed, anything from a line starting "Assistant:", "AI:", "Bot:" or "Chatbot:" on cut: a reply the
simulator wrote itself); a seed that is the opening is taken as it is. Nothing is dropped silently: stats.json and the
printed summary count every drop and truncation by reason.

Determinism and resume. All randomness of dialogue i comes from random.Random(f"{seed}:{i}"), and each call
carries the seed sha256(f"{seed}:{i}:{message index}") (its first 4 bytes), so with a teacher that honours
seeds the output does not depend on completion order, concurrency or resuming. Each finished call is journaled
(data.journal) as soon as it returns, keyed [dialogue, model name, message index]; a rerun replays journaled
messages without calling again and goes on where it stopped, so after kill -9 at any moment the same command
finishes with no dialogue doubled or missing, and (with such a teacher) the same rows as an uninterrupted
run. Failed calls are counted but not journaled: a rerun tries them again. The settings that
decide the messages (mode, seeds, turn ranges, seed, sampling, max_turn_chars, model names, prompts) are the
journal's settings: a rerun with other settings is refused, naming them, unless --overwrite is given, which
starts afresh. --num_dialogues, --test_size and --concurrency are not among them: a rerun with a larger
--num_dialogues reuses every finished dialogue. The final files are assembled from the journal in dialogue
order and replaced atomically (tmp + os.replace).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import functools
import hashlib
import json
import math
import random
import re
import sys
from pathlib import Path

import jinja2

from zephyr_jax.data.backends import ENGINE_MESH_HELP, Backend, BackendSet, Call, map_bounded
from zephyr_jax.data.binarize import (check_output_flag, prompt_id, train_test_split, write_json,
                                     write_train_and_test)
from zephyr_jax.data.cache import tokenizer_fingerprint
from zephyr_jax.data.conversation import SPECIAL_TEXTS
from zephyr_jax.data.dialogue_seeds import (SECTOR_TURNS, SEED_COLUMNS, SEEDS_ARE, Seed, as_seed, builtin_seeds,
                                            load_seeds)
from zephyr_jax.data.errors import SkipCounter
from zephyr_jax.data.journal import Journal, SettingsMismatch

MODES = ("ultrachat", "magpie")
MAGPIE_TURNS = (1, 1)
JOURNAL = "journal/dialogues.jsonl"
# A run holds every dialogue (and its journal every message) in memory until the files are written: openings are
# deduplicated across the run and the split is drawn over them all. 10M is ~7x UltraChat's 1.5M dialogues, ~60 GB
# of text at its ~6 KB a dialogue; 2**31 was a MemoryError listing the indices. More: runs with other --seed values.
MAX_DIALOGUES = 10_000_000
FORMAT_VERSION = 2  # bump when the calls change in a way the prompts' texts do not show (2: alternating roles)

# ------------------------------------------------------------------------------------------------ prompts

USER_SYSTEM = (
    "You are playing the human side of a chat with an AI assistant. Write only the human's next message. "
    "Be a curious, thoughtful person: ask follow-up questions about details of the last answer, ask for "
    "examples, push back when something seems doubtful, or steer the talk to a related point you care about. "
    "Keep each message short and natural, the way people really type. Do not answer your own questions, do "
    "not write the assistant's reply, do not just thank the assistant, and never say that you are an AI or "
    "that you are playing a part.")
USER_TOPIC = " The conversation is about: {topic}."
OPENING_REQUEST = ("Open a conversation with the assistant about this topic: {topic}. Write only your first "
                   "message to the assistant: a question or a request a real person might have.")
OPENING_GIVEN = "Open a conversation with the assistant: write your first message to it."  # the seed was it
VARIATION_REQUEST = ("Open a conversation with the assistant with a request of your own of the same kind as this "
                     "one (another subject, or another task on the same text):\n\n{opening}\n\nWrite only your "
                     "first message to the assistant.")

# ------------------------------------------------------------------------------------------------ filters

# Matched against the text with typographic apostrophes made plain (’ -> ').
REFUSAL = re.compile("|".join((
    r"\b(?:I(?:'m| am) (?:sorry|afraid)|I apologi[sz]e),? (?:but )?I (?:can(?:no|')t|am (?:not able|unable) to|"
    r"won't|will not)\b",
    r"\bI (?:can(?:no|')t|am (?:not able|unable) to|won't|will not) (?:help|assist|comply|provide|fulfil+)"
    r"(?: you)? with (?:that|this|your request)\b",
    r"\bI(?:'m| am) not (?:able|allowed|permitted) to (?:help|assist|answer|provide)\b",
    r"\bI must (?:decline|refuse)\b",
)), re.IGNORECASE)
BOILERPLATE = re.compile("|".join((
    r"\bas an? (?:ai|artificial intelligence|(?:large )?language model|virtual assistant|chatbot)\b"
    r"[^.!?\n]{0,60}?,?\s+I\b",  # "As an AI language model, I ..." (not "Python as an AI tool")
    r"\bI(?:'m| am) (?:just |only |merely )?an? (?:ai|artificial intelligence|(?:large )?language model|"
    r"virtual assistant|chatbot|computer program)\b",
    r"\bI (?:do not|don't|cannot|can't) (?:have|hold|form|experience|feel) (?:any )?(?:personal )?"
    r"(?:emotions|feelings|opinions|beliefs|preferences|experiences|views)\b",
    r"\bI(?:'m| am) not capable of (?:having |feeling )?(?:emotions|feelings|opinions)\b",
)), re.IGNORECASE)
# The user simulator speaking as a model. Narrower than BOILERPLATE: a real user may be "an AI researcher" or
# "an AI student", or say "I don't have any preferences".
USER_AS_MODEL = re.compile("|".join((
    r"\bas an? (?:ai|artificial intelligence)(?: (?:language )?model| assistant)?(?:\s*,|\s+I\b)",
    r"\bas an? (?:(?:large )?language model|virtual assistant|chatbot)\b",
    r"\bI(?:'m| am) (?:just |only |merely )?an? (?:ai|artificial intelligence)(?: (?:language )?model| assistant)?"
    r"\s*(?:[,.;!]|$|and\b|so\b)",
    r"\bI(?:'m| am) (?:just |only |merely )?an? (?:(?:large )?language model|virtual assistant|chatbot|"
    r"computer program)\b",
)), re.IGNORECASE)
MARKERS = (*SPECIAL_TEXTS, "<|user|>", "<|assistant|>", "<|system|>")
_USER_LABEL = re.compile(r"^\s*(?:user|human|me|person)\s*:\s*", re.IGNORECASE)
_ASSISTANT_LINE = re.compile(r"\n\s*(?:assistant|ai|chatbot|bot)\s*:", re.IGNORECASE)


@functools.lru_cache(maxsize=1024)  # check_turn and then _Dialogue.add ask for the same message's form
def normalize(text: str) -> str:
    """Lower case, words only: the form compared for repeated turns and duplicate openings."""
    return " ".join(re.findall(r"\w+", text.lower()))


def tidy_user_turn(text: str) -> str:
    """The user simulator's message without a "User:" label, wrapping quotes, or a reply it wrote itself."""
    text = _ASSISTANT_LINE.split(text, maxsplit=1)[0]
    text = _USER_LABEL.sub("", text).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'" and text[0] not in text[1:-1]:
        text = text[1:-1].strip()  # one quoted message; not "'Hi' she said, 'bye'", which has quotes inside
    return text


def check_turn(role: str, text: str, finish_reason: str | None, said: set[str], max_chars: int) -> str | None:
    """Why this message ends the dialogue, or None when it is fine (the filters of the module docstring). `said`
    holds the earlier messages' normalized texts (`normalize`), each made once as its message was added."""
    if not text.strip():
        return f"empty {role} turn"
    if any(m in text for m in MARKERS):
        return f"special-token text in {role} turn"
    if finish_reason == "length":
        return f"{role} turn cut off at max_tokens"
    if len(text) > max_chars:
        return f"{role} turn over {max_chars} chars"
    plain = text.replace("\u2019", "'")
    if role == "assistant" and REFUSAL.search(plain):
        return "refusal in assistant turn"
    if role == "assistant" and BOILERPLATE.search(plain):
        return "AI boilerplate in assistant turn"
    if role == "user" and USER_AS_MODEL.search(plain):
        return "user simulator broke character"
    if normalize(text) in said:
        return f"repeated {role} turn"
    return None


# ------------------------------------------------------------------------------------------------ the run


def call_seed(seed: int, dialogue: int, message: int) -> int:
    """The sampling seed of one call: fixed by (seed, dialogue, message index), whatever the order of calls."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{dialogue}:{message}".encode()).digest()[:4], "big")


def flipped(messages: list[dict]) -> list[dict]:
    """The conversation as the user simulator sees it: its own messages as "assistant", the replies as "user"."""
    swap = {"user": "assistant", "assistant": "user"}
    return [{"role": swap[m["role"]], "content": m["content"]} for m in messages]


class MagpieTemplate:
    """Raw prompts that end where a user message would start, from a tokenizer's chat template."""
    SENTINEL = "\u2063MAGPIE\u2063"  # text no template contains

    def __init__(self, tokenizer):
        from zephyr_jax.tokenizer import render_chat

        self.tokenizer, self._render = tokenizer, render_chat
        probe = [{"role": "user", "content": self.SENTINEL}]
        head, _, tail = render_chat(tokenizer, probe).partition(self.SENTINEL)
        generation = render_chat(tokenizer, probe, add_generation_prompt=True)[len(head) + len(self.SENTINEL):]
        try:  # the text ahead of the user turn (e.g. the Zephyr template's empty system turn)
            before_user = render_chat(tokenizer, [])
        # a template that reads messages[0]; and transformers 5 renders no empty conversation (ValueError): every
        # template but Zephyr's (given its empty system turn) was refused, and magpie mode with it
        except (jinja2.TemplateError, ValueError):
            before_user = ""
        markers = (tail, generation[len(tail):], head[len(before_user):], tokenizer.eos_token)
        self.stop = tuple(dict.fromkeys(m.strip() for m in markers if m and m.strip()))

    def prefix(self, messages: list[dict]) -> str:
        """The template text of `messages` followed by the start of a new user turn (no BOS)."""
        probe = [*messages, {"role": "user", "content": self.SENTINEL}]
        return self._render(self.tokenizer, probe).partition(self.SENTINEL)[0]


@dataclasses.dataclass
class _Dialogue:
    """What became of one dialogue: its messages so far, and why it ended early (None: it ran its course)."""
    index: int
    seed: Seed
    messages: list[dict]
    reason: str | None = None
    said: set[str] = dataclasses.field(default_factory=set)  # normalize() of each message, for the repeat check

    def add(self, role: str, text: str) -> None:
        self.messages.append({"role": role, "content": text})
        self.said.add(normalize(text))


class _Run:
    """One make_dialogues run: settings, backends, the journal, and the counters."""

    def __init__(self, seeds, user, assistant, *, mode, turns, seed, max_tokens, temperature, max_turn_chars,
                 magpie):
        self.seeds, self.user, self.assistant, self.journal = seeds, user, assistant, None
        self.mode, self.turns, self.seed = mode, turns, seed
        self.max_tokens, self.temperature, self.max_turn_chars = max_tokens, temperature, max_turn_chars
        self.magpie = magpie
        self.errors: collections.Counter = collections.Counter()  # failed calls by error text

    def seed_of(self, i: int) -> Seed:
        return self.seeds[i % len(self.seeds)] if self.seeds else Seed("", "magpie")

    def varies(self, i: int, seed: Seed) -> bool:
        """Whether dialogue i opens with another message of its seed's kind: a seed that is an opening, on a later
        pass over the seeds (taken as it is again, it was dropped as a duplicate: 100,000 dialogues from the
        2,140 built-in seeds kept a few thousand)."""
        return self.mode != "magpie" and not seed.is_topic and i >= len(self.seeds)

    def rounds(self, i: int, seed: Seed) -> int:
        lo, hi = self.turns or (MAGPIE_TURNS if self.mode == "magpie" else SECTOR_TURNS[seed.sector])
        return random.Random(f"{self.seed}:{i}").randint(lo, hi)

    async def message(self, i: int, t: int, backend: Backend, call: Call) -> dict:
        """The journaled reply of message t of dialogue i, or a new call's (journaled when it succeeded)."""
        key = (i, backend.name, t)
        value = self.journal.get(key)
        if value is None:
            reply = await backend.complete(call)
            if not reply.ok:
                self.errors[reply.error or "unknown error"] += 1
                return {"text": None, "error": reply.error}
            value = {"text": reply.text, "finish_reason": reply.finish_reason, "seed": call.seed,
                     "prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens}
            self.journal.append(key, value)
        return value

    def call(self, i: int, t: int, **fields) -> Call:
        fields.setdefault("temperature", self.temperature)
        return Call(max_tokens=self.max_tokens, seed=call_seed(self.seed, i, t), **fields)

    def request(self, d: _Dialogue, t: int) -> tuple[Backend, Call]:
        """Which model writes message t of dialogue d, and the call that asks for it."""
        messages, user_turn = d.messages[:t], t % 2 == 0
        if self.mode == "magpie":  # one model: raw template prefix for the user turn, greedy chat for the reply
            if user_turn:
                return self.assistant, self.call(d.index, t, prompt=self.magpie.prefix(messages), temperature=1.0,
                                                 stop=self.magpie.stop)
            return self.assistant, self.call(d.index, t, messages=tuple(messages), temperature=0.0)
        if not user_turn:
            return self.assistant, self.call(d.index, t, messages=tuple(messages))
        system = USER_SYSTEM + (USER_TOPIC.format(topic=d.seed.text) if d.seed.is_topic else "")
        # The request for the opening comes first, so the roles alternate from a user turn, as strict chat
        # templates (Mistral-Instruct's, Llama-2's) require.
        request = OPENING_REQUEST.format(topic=d.seed.text) if d.seed.is_topic else \
            VARIATION_REQUEST.format(opening=d.seed.text) if self.varies(d.index, d.seed) else OPENING_GIVEN
        view = [{"role": "user", "content": request}, *flipped(messages)]
        return self.user, self.call(d.index, t, messages=({"role": "system", "content": system}, *view))

    async def next_message(self, d: _Dialogue) -> tuple[str | None, str | None]:
        """(text, None) for message len(d.messages) of dialogue d, or (None, the reason it ends here)."""
        t = len(d.messages)
        role = "user" if t % 2 == 0 else "assistant"
        given = t == 0 and self.mode != "magpie" and not d.seed.is_topic and not self.varies(d.index, d.seed)
        value = {"text": d.seed.text} if given else await self.message(d.index, t, *self.request(d, t))
        if value["text"] is None:
            return None, f"failed {role} call"
        text = tidy_user_turn(value["text"]) if role == "user" and not given else value["text"].strip()
        reason = check_turn(role, text, value.get("finish_reason"), d.said, self.max_turn_chars)
        return (None, reason) if reason else (text, None)

    async def opening(self, i: int) -> _Dialogue:
        d = _Dialogue(i, self.seed_of(i), [])
        text, d.reason = await self.next_message(d)
        if text is not None:
            d.add("user", text)
        return d

    async def finish(self, d: _Dialogue) -> _Dialogue:
        """Runs dialogue d (which has its opening) to its number of turns or its first failed check; a failure
        cuts it back to its last complete turn."""
        for t in range(1, 2 * self.rounds(d.index, d.seed)):
            text, reason = await self.next_message(d)
            if reason:
                d.messages, d.reason = d.messages[:t - t % 2], reason
                break
            d.add("user" if t % 2 == 0 else "assistant", text)
        d.said.clear()  # needed only while it runs: 200,000 finished dialogues would hold a copy of their text
        return d


def _settings(run: _Run) -> dict:
    """What decides the journaled messages: a rerun with other values is refused (see the module docstring)."""
    seeds = [dataclasses.astuple(s) for s in run.seeds]
    settings = {
        "mode": run.mode, "seed": run.seed, "turns": list(run.turns) if run.turns else None,
        "max_tokens": run.max_tokens, "temperature": run.temperature, "max_turn_chars": run.max_turn_chars,
        "assistant": run.assistant.name, "user": run.user.name if run.user else None,
        "seeds": hashlib.sha256(json.dumps(seeds).encode()).hexdigest(), "num_seeds": len(seeds),
        "prompts": hashlib.sha256("\n".join((USER_SYSTEM, USER_TOPIC, OPENING_REQUEST, OPENING_GIVEN,
                                             VARIATION_REQUEST)).encode()).hexdigest(), "format": FORMAT_VERSION,
    }
    if run.magpie:
        # What the tokenizer does, not where it was loaded from (hosts keep their copies in different places)
        settings.update(template_prefix=run.magpie.prefix([]), stop=list(run.magpie.stop),
                        tokenizer=tokenizer_fingerprint(run.magpie.tokenizer))
    return settings


def _test_count(test_size: float, n: int) -> int:
    """Rows for test_sft: test_size itself when >= 1, else that fraction of n (leaving train at least one).
    test_size's form was checked before any teacher call (_check_sizes); whether a count is below the kept
    dialogues is known only here, at the end."""
    if test_size >= 1:
        if test_size >= n:
            raise ValueError(f"test_size={test_size} must be a whole count below the {n} kept dialogues "
                             f"(or a fraction below 1)")
        return int(test_size)
    return min(round(test_size * n), max(n - 1, 0))


def _row(d: _Dialogue, models: dict) -> dict:
    prompt = d.messages[0]["content"]
    return {"prompt": prompt, "prompt_id": prompt_id(prompt), "messages": d.messages, "sector": d.seed.sector,
            "models": models}


async def amake_dialogues(seeds, user: Backend | None, assistant: Backend, output_dir, *, mode: str = "ultrachat",
                          num_dialogues: int | None = None, min_turns: int | None = None,
                          max_turns: int | None = None, seed: int = 42, test_size: float = 0.1,
                          concurrency: int = 16, max_tokens: int = 1024, temperature: float = 1.0,
                          max_turn_chars: int = 8000, tokenizer=None, overwrite: bool = False,
                          log=print) -> dict:
    """make_dialogues as a coroutine (for callers that already run an event loop, e.g. a notebook)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    if isinstance(seeds, (str, Seed, dict)):  # a string seeded one dialogue per character
        raise TypeError(f"seeds is one seed ({type(seeds).__name__}): pass a list of them, e.g. [seed]")
    for name, backend in (("assistant", assistant), ("user", user)):
        if not (isinstance(backend, Backend) or (name == "user" and backend is None)):
            raise TypeError(f"{name}={backend!r}: pass a Backend (data.backends.backend_from_spec makes one from "
                            "a spec string)")
    _check_sizes(test_size, concurrency, num_dialogues, min_turns, max_turns)
    if mode == "magpie":
        if seeds or user not in (None, assistant):
            raise ValueError("magpie mode takes no seeds and no user backend: the assistant model writes the user "
                             "turns from its chat template alone")
        if num_dialogues is None:
            raise ValueError("magpie mode needs num_dialogues")
        from zephyr_jax.tokenizer import load_tokenizer

        seeds = []
        magpie = MagpieTemplate(load_tokenizer(tokenizer) if tokenizer is None or isinstance(tokenizer, str)
                                else tokenizer)
    else:
        seeds = [as_seed(s, i, seed) for i, s in enumerate(seeds or ())]
        if not seeds:
            raise ValueError("no seeds: pass seeds (see builtin_seeds / load_seeds)")
        user, magpie = user or assistant, None
        num_dialogues = len(seeds) if num_dialogues is None else num_dialogues
    output_dir = Path(output_dir)
    run = _Run(seeds, user, assistant, mode=mode, turns=_turn_range(min_turns, max_turns), seed=seed,
               max_tokens=max_tokens, temperature=temperature, max_turn_chars=max_turn_chars, magpie=magpie)
    run.journal = Journal(output_dir / JOURNAL, _settings(run), overwrite=overwrite)
    try:
        if run.journal.resumed:
            log(f"resuming: {run.journal.resumed} finished messages in {output_dir / JOURNAL}")
        dialogues = await map_bounded(run.opening, range(num_dialogues), concurrency, "openings", " dialogues")
        _drop_duplicate_openings(dialogues)
        await map_bounded(run.finish, [d for d in dialogues if d.reason is None], concurrency, "dialogues",
                          " dialogues")
        return _write_outputs(run, dialogues, output_dir, test_size, log)
    finally:  # after the outputs: the journal's lock keeps a second run out until they are written
        run.journal.close()


def _check_sizes(test_size: float, concurrency: int, num_dialogues: int | None, min_turns: int | None,
                 max_turns: int | None) -> None:
    """The numbers' ranges (the CLI checks them before its engine: backends load their models)."""
    if not math.isfinite(test_size) or test_size < 0 or (test_size >= 1 and test_size != int(test_size)):
        raise ValueError(f"test_size={test_size}: expected a fraction in [0, 1) or a whole count of rows")
    if concurrency < 1:  # a semaphore of 0 would wait forever, holding the journal's lock
        raise ValueError(f"concurrency={concurrency}: at least 1 dialogue must be in flight")
    if num_dialogues is not None and num_dialogues < 0:
        raise ValueError(f"num_dialogues={num_dialogues} is negative")
    if num_dialogues is not None and num_dialogues > MAX_DIALOGUES:
        raise ValueError(f"num_dialogues={num_dialogues}: more than the {MAX_DIALOGUES:,} one run holds in memory "
                         "until its files are written; make a larger corpus in several runs (other --seed values)")
    _turn_range(min_turns, max_turns)


def _turn_range(min_turns: int | None, max_turns: int | None) -> tuple[int, int] | None:
    """(min, max) turns per dialogue, or None for each sector's range. One alone: min defaults to 1, max to min."""
    if min_turns is None and max_turns is None:
        return None
    turns = (1 if min_turns is None else min_turns, max_turns if max_turns is not None else min_turns)
    if not 1 <= turns[0] <= turns[1]:
        raise ValueError(f"need 1 <= min_turns <= max_turns, got min_turns={min_turns}, max_turns={max_turns}")
    return turns


def _drop_duplicate_openings(dialogues: list[_Dialogue]) -> None:
    """Marks each dialogue whose normalized opening an earlier one had. The first wins, in dialogue order, so
    the result does not depend on which opening was written first."""
    seen = set()
    for d in dialogues:
        if d.reason is None:
            key = normalize(d.messages[0]["content"])
            if key in seen:
                d.reason = "duplicate opening prompt"
            seen.add(key)


def _write_outputs(run: _Run, dialogues: list[_Dialogue], output_dir: Path, test_size: float, log) -> dict:
    """train_sft/test_sft/stats from the finished dialogues (atomic replaces); returns the stats."""
    dropped, truncated = SkipCounter("dialogues"), collections.Counter()
    models = {"user": (run.user or run.assistant).name, "assistant": run.assistant.name}
    kept = []
    for d in dialogues:
        if len(d.messages) < 2:
            dropped.skip(d.reason or "no complete turn")
            continue
        dropped.keep()
        if d.reason:
            truncated[d.reason] += 1
        kept.append(_row(d, models))
    train, test = train_test_split(kept, _test_count(test_size, len(kept)), run.seed) if kept else ([], [])
    write_train_and_test(train, test, output_dir / "train_sft.jsonl", output_dir / "test_sft.jsonl")
    counters = {"assistant": dict(run.assistant.stats), "user": dict((run.user or run.assistant).stats)}
    stats = {
        "dialogues": len(dialogues), "kept": len(kept), "train_sft": len(train), "test_sft": len(test),
        "dropped": dict(dropped.skipped.most_common()), "truncated": dict(truncated.most_common()),
        "turns": sum(len(r["messages"]) // 2 for r in kept), "failed_calls": dict(run.errors.most_common(20)),
        "messages_journaled": len(run.journal.done), "messages_resumed": run.journal.resumed,
        "tokens": {k: sum(v.get(k, 0) for v in run.journal.done.values())  # every journaled call, all runs
                   for k in ("prompt_tokens", "completion_tokens")},
        "models": models, "backends": counters,
    }
    write_json(stats, output_dir / "stats.json")
    backends = dict.fromkeys(b for b in (run.user, run.assistant) if b is not None)  # one line per model
    log("\n".join([summary(stats, output_dir), *(b.summary() for b in backends)]))
    return stats


def summary(stats: dict, output_dir) -> str:
    """The counts of stats.json as the lines printed at the end of a run."""
    lines = [f"kept {stats['kept']} of {stats['dialogues']} dialogues ({stats['turns']} turns): "
             f"{stats['train_sft']} train_sft, {stats['test_sft']} test_sft -> {output_dir}"]
    for title, counts in (("dropped", stats["dropped"]), ("truncated", stats["truncated"])):
        if counts:
            lines.append(f"{title} {sum(counts.values())}:")
            lines.extend(f"  {n} x {reason}" for reason, n in counts.items())
    if stats["failed_calls"]:
        lines.append("failed calls (most frequent errors):")
        lines.extend(f"  {n} x {error[:200]}" for error, n in stats["failed_calls"].items())
    tokens = stats["tokens"]
    lines.append(f"tokens of all journaled calls: {tokens['prompt_tokens']} prompt + "
                 f"{tokens['completion_tokens']} completion; {stats['messages_resumed']} messages resumed")
    return "\n".join(lines)


def make_dialogues(seeds, user: Backend | None, assistant: Backend, output_dir, **options) -> dict:
    """Makes, filters and writes the dialogues (see the module docstring); returns the stats (also in
    DIR/stats.json). Options: mode ("ultrachat" | "magpie"), num_dialogues, min_turns, max_turns, seed,
    test_size, concurrency, max_tokens, temperature, max_turn_chars, tokenizer (magpie), overwrite, log.
    `user` None: the assistant backend also plays the user."""
    return asyncio.run(amake_dialogues(seeds, user, assistant, output_dir, **options))


# ------------------------------------------------------------------------------------------------ CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zephyr_jax.data.dialogues", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="directory for train_sft.jsonl, test_sft.jsonl, stats.json")
    p.add_argument("--assistant", required=True, help="backend spec of the assistant model")
    p.add_argument("--user", default=None, help="backend spec of the user simulator (default: --assistant)")
    p.add_argument("--mode", choices=MODES, default="ultrachat")
    p.add_argument("--seeds", default=None, help="seeds file (.txt, .jsonl, ... or anything load_rows reads); "
                                                 "default: the built-in seeds of --sector")
    p.add_argument("--seeds_split", default="train", help="split of --seeds when it is a directory or hub name")
    p.add_argument("--seed_column", default=None, help=f"column of --seeds to use (default: first of {SEED_COLUMNS})")
    p.add_argument("--seeds_are", choices=SEEDS_ARE, default="auto",
                   help="a 'seed' column or .txt line: topics, openings, or auto (guessed one by one)")
    p.add_argument("--sector", choices=(*SECTOR_TURNS, "all"), default="all",
                   help="built-in seeds to use; with --seeds, the sector of rows that name none")
    p.add_argument("--num_dialogues", type=int, default=None, help="default: one per seed")
    p.add_argument("--min_turns", type=int, default=None, help="default: the sector's range (magpie: 1)")
    p.add_argument("--max_turns", type=int, default=None)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--test_size", type=float, default=0.1, help="test_sft rows: a fraction below 1, else a count")
    p.add_argument("--concurrency", type=int, default=16, help="dialogues in flight (and calls per endpoint URL)")
    p.add_argument("--max_tokens", type=int, default=1024, help="per call")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max_turn_chars", type=int, default=8000, help="longer messages end the dialogue")
    p.add_argument("--tokenizer", default=None, help="magpie: tokenizer whose chat template gives the prefix "
                                                     "(default: Mistral-7B-v0.1 with the Zephyr template)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per endpoint request")
    p.add_argument("--max_retries", type=int, default=6, help="endpoint retries of 429/5xx/timeouts/drops")
    p.add_argument("--mesh", default=None, help=ENGINE_MESH_HELP)
    p.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--overwrite", action="store_true",
                   help="discard the journal and start afresh (a command that carries it never resumes)")
    return p


def main(argv=None) -> dict:
    p = _parser()
    args = p.parse_args(argv)
    # before the models load (the journal would find a bad --output only after it)
    check_output_flag(p, args.output, "train_sft.jsonl, test_sft.jsonl and stats.json")
    if args.mode == "magpie" and (args.seeds or args.user):
        p.error("--mode=magpie takes neither --seeds nor --user: the assistant model writes both sides")
    if args.mode == "magpie" and args.num_dialogues is None:
        p.error("--mode=magpie needs --num_dialogues")
    # Bad input (a seeds file, a spec, other settings on disk) ends with its message, not a traceback.
    try:
        _check_sizes(args.test_size, args.concurrency, args.num_dialogues, args.min_turns, args.max_turns)
        tokenizer = args.tokenizer
        if args.mode == "magpie":  # a typo in it: now, not once an engine: assistant has loaded its model
            from zephyr_jax.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(args.tokenizer)
        with BackendSet(api_key_env=args.api_key_env, concurrency=args.concurrency, timeout=args.timeout,
                        max_retries=args.max_retries, mesh=args.mesh) as backends:
            seeds = None
            if args.mode == "ultrachat":
                sector = None if args.sector == "all" else args.sector
                seeds = (load_seeds(args.seeds, split=args.seeds_split, column=args.seed_column, sector=sector,
                                    seed=args.seed, seeds_are=args.seeds_are)
                         if args.seeds else builtin_seeds(args.sector, args.seed))
            user = backends.get(args.user) if args.user else None
            stats = make_dialogues(seeds, user, backends.get(args.assistant), args.output, mode=args.mode,
                                  num_dialogues=args.num_dialogues, min_turns=args.min_turns,
                                  max_turns=args.max_turns, seed=args.seed, test_size=args.test_size,
                                  concurrency=args.concurrency, max_tokens=args.max_tokens,
                                  temperature=args.temperature, max_turn_chars=args.max_turn_chars,
                                  tokenizer=tokenizer, overwrite=args.overwrite)
    except (SettingsMismatch, ValueError, OSError) as e:  # OSError: a missing file; a hub name unreachable
        sys.exit(f"error: {e}")
    if not stats["kept"]:  # a script's next step (training) must not start on empty splits
        sys.exit(f"error: no dialogue of {stats['dialogues']} was kept ({stats['dropped']}; failed calls: "
                 f"{stats['failed_calls']}); the journal keeps what finished")
    return stats


if __name__ == "__main__":
    main()
