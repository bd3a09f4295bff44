"""Where each self-instruct dialogue starts (data/dialogues.py runs them): a Seed is an opening message or a
topic the user simulator opens with, in one of UltraChat's three sectors. The built-in seeds are those sectors in
this project's own words; load_seeds reads seeds from a file (see data/dialogues.py's docstring for the columns).
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import os
import random
import re
from pathlib import Path

from zephyr_jax.data.binarize import is_text
from zephyr_jax.data.sources import FORMATS, decode_line

SECTOR_TURNS = {"world": (3, 7), "writing": (2, 4), "materials": (2, 4)}  # UltraChat's rounds per sector
SEED_COLUMNS = ("material", "seed", "topic", "question", "prompt", "instruction")  # the first present is used


# ------------------------------------------------------------------------------------------------ built-in seeds

WORLD_TOPICS = {  # meta-topic: subtopics
    "science and nature": ("how vaccines teach the immune system", "plate tectonics and earthquakes",
                           "the life cycle of a star", "why sunsets are red", "how honeybees share directions"),
    "technology": ("how search engines rank pages", "public-key encryption", "batteries in electric cars",
                   "what a compiler does", "how a phone finds its position by satellite"),
    "history": ("the printing press and what it changed", "the end of the Western Roman Empire",
                "trade along the Silk Road", "the industrial revolution in Britain", "the race to the Moon"),
    "health": ("sleep and memory", "why antibiotics stop working", "what regular exercise does to the body",
               "coping with stress at work", "how the heart pumps blood"),
    "economics and money": ("what causes inflation", "compound interest", "how central banks set interest rates",
                            "index funds versus picking stocks", "supply and demand in everyday prices"),
    "arts and culture": ("the beginnings of jazz", "Impressionist painting", "how editing shapes a film",
                         "the Japanese tea ceremony", "masks and choruses in ancient Greek theatre"),
    "geography and travel": ("the climate of the Sahara", "why Venice floods", "planning a first trip abroad",
                             "the great rivers of the world", "visiting national parks in Canada"),
    "food and cooking": ("why bread dough is kneaded", "fermented foods like kimchi and yogurt",
                         "cooking rice well", "where chocolate comes from", "a balanced vegetarian diet"),
    "the environment": ("how recycling gets sorted", "coral bleaching", "wind and solar compared with coal",
                        "why cities are hotter than the countryside", "protecting pollinators"),
    "philosophy": ("free will and determinism", "the trolley problem", "what makes an argument valid",
                   "Stoic ideas for daily life", "the ethics of testing on animals"),
    "mathematics": ("why prime numbers matter", "the birthday paradox", "what calculus is good for",
                    "different sizes of infinity", "averages that mislead"),
    "language": ("how children learn to talk", "why English spelling is so irregular",
                 "learning a second language as an adult", "how sign languages work", "the first writing systems"),
    "sports and games": ("the rules of cricket", "training for a marathon", "the history of chess",
                         "the modern Olympic Games", "what makes a football team work together"),
    "learning and school": ("study habits that work", "teaching children at home", "whether everyone should "
                            "learn to code", "preparing for a big exam", "online courses versus classrooms"),
    "psychology": ("why habits are hard to break", "confirmation bias", "introverts and extroverts",
                   "rewards and motivation", "false memories"),
    "law and government": ("how a bill becomes a law", "the separation of powers", "what a jury decides",
                           "copyright in plain terms", "different ways to count votes"),
    "space": ("daily life on the International Space Station", "black holes", "looking for life on Mars",
              "how rockets get to orbit", "why the Moon has phases"),
    "home and everyday life": ("saving energy at home", "keeping houseplants alive", "a tidy small kitchen",
                               "a monthly household budget", "looking after a bicycle"),
    "work and careers": ("getting ready for a job interview", "asking for a raise", "working from home",
                         "changing careers at forty", "writing a strong CV"),
    "animals": ("how birds find their way when migrating", "how clever octopuses are", "the first weeks with a "
                "new puppy", "why cats purr", "saving endangered species"),
}

WRITING_TYPES = ("short story", "poem", "haiku", "persuasive essay", "product description", "cover letter",
                 "blog post", "wedding speech", "news report", "limerick", "scene of dialogue", "book review",
                 "letter to an old friend", "advertising slogan", "social media post", "film synopsis",
                 "opinion column", "fairy tale", "personal statement", "song chorus")
WRITING_SUBJECTS = ("the first day at a new school", "a lighthouse keeper's last night on duty",
                    "a city that has banned cars", "learning to swim as a grown-up", "the smell of rain",
                    "a friendship that survived a long silence", "a robot that wants to grow tomatoes",
                    "moving to a country where you do not speak the language", "a library nobody visits",
                    "the last evening of the summer holidays", "a Saturday farmers' market",
                    "a night train crossing the mountains")
WRITING_TEMPLATES = ("Write {a_kind} about {subject}.",
                     "Could you write {a_kind} on the theme of {subject}? Keep it under 300 words.",
                     "Draft {a_kind} about {subject} for a general audience.",
                     "I need {a_kind} about {subject}. Make it warm and a little funny.",
                     "Write {a_kind} about {subject}, told from a child's point of view.",
                     "Write {a_kind} about {subject} that ends with a surprise.",
                     "Please write a short, plain-language {kind} about {subject}.",
                     "Create {a_kind} about {subject} that teenagers would enjoy.")

MATERIAL_TEMPLATES = ("Summarise this text in three sentences.\n\n{text}",
                      "{text}\n\nCan you list the main points of this passage?",
                      "Rewrite the following so a ten-year-old could follow it:\n\n{text}",
                      "Here is a passage:\n\n{text}\n\nWhat questions would check that a reader understood it?",
                      "{text}\n\nPlease rewrite the paragraph above in a more formal register.",
                      "Read the text below and tell me what its author wants to convince me of.\n\n{text}",
                      "{text}\n\nGoing by this passage, what is likely to happen next, and why?",
                      "Give this text a catchy title and explain why you chose it.\n\n{text}",
                      "{text}\n\nWhich statements here would you want to check before repeating them?",
                      "Turn the following text into a short email to a colleague:\n\n{text}")

PASSAGES = (
    "The community garden on Elm Street opened in April on a lot that had been empty for eleven years. "
    "Forty households share its thirty beds, and a rota decides who waters on which day. Surplus vegetables go "
    "to the food bank two streets away, which received about 300 kilograms of produce in the first season.",
    "Ada's bakery opens at six and is usually sold out of sourdough by ten. The owner says the secret is time: "
    "her loaves rise slowly overnight in a cool room. Last month she started a Saturday class where neighbours "
    "learn to keep their own starter alive.",
    "In 1854 a doctor in London mapped the cholera cases around Broad Street and found that most victims had "
    "drawn water from a single public pump. The pump's handle was removed, and new cases fell. The map became "
    "a classic example of using data to trace the source of a disease.",
    "Tardigrades are animals less than a millimetre long that live in moss, soil and the sea. When their "
    "surroundings dry out, they curl up, lose almost all of their water and slow their metabolism nearly to "
    "nothing. In that state they can survive extreme cold, radiation and even a trip to low Earth orbit.",
    "Version 2.3 of the note-taking app adds offline mode, so notes written without a connection are synced "
    "later. Search is now about twice as fast on large notebooks. Support for the oldest phone models ends "
    "with this release; their users keep read-only access to their notes.",
    "The town council voted six to three on Tuesday to turn the car park behind the market hall into a small "
    "park. Shop owners worry about losing customers who drive in; supporters point out that the car park was "
    "rarely more than half full. Work is planned to start next spring.",
    "The under-14 team won the regional final 3-2 after trailing 2-0 at half-time. The coach credited a "
    "change of formation and the goalkeeper, who saved a penalty in the last minute. It is the club's first "
    "regional title in twenty years.",
    "To make a simple lentil soup, soften a chopped onion, carrot and celery stick in olive oil, then add a "
    "cup of rinsed red lentils, a litre of stock and a spoon of cumin. Simmer for about twenty minutes until "
    "the lentils fall apart, season, and finish with lemon juice.",
    "The museum's new exhibition shows everyday objects from a Roman household: oil lamps, hairpins, a child's "
    "clay toy and a wax tablet with a shopping list. Curators chose ordinary things on purpose, to show how "
    "familiar daily life two thousand years ago could be.",
    "Remote work has grown quickly since 2020. Surveys find that many employees value the saved commuting "
    "time, while managers report that onboarding new staff is harder at a distance. Many companies now settle "
    "on a hybrid week, with two or three days in the office.",
    "Sleep researchers recommend keeping the same bedtime on weekends as on weekdays. Shifting it by several "
    "hours, they say, is like flying across time zones every Friday and back every Monday, and it can leave "
    "people tired at the start of the week.",
    "Glass can be recycled again and again without losing quality, but only if it is sorted by colour. Mixed "
    "glass is usually crushed for use in road building instead. Some cities therefore ask residents to keep "
    "clear, green and brown bottles apart.",
)


@dataclasses.dataclass(frozen=True)
class Seed:
    """What dialogue i starts from: an opening message (is_topic False) or a topic the user simulator opens
    with (is_topic True). `sector` picks the default range of turns."""
    text: str
    sector: str = "world"
    is_topic: bool = False


def _a(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def _interleave(*lists) -> list:
    """a0, b0, c0, a1, b1, c1, ... (a shorter list simply runs out)."""
    out = []
    for group in itertools.zip_longest(*lists):
        out.extend(x for x in group if x is not None)
    return out


def builtin_seeds(sector: str = "all", seed: int = 42) -> list[Seed]:
    """Every built-in seed of a sector (world 100, writing 1920, materials 120), shuffled by `seed`; "all"
    interleaves the three so that any first N cover every sector."""
    world = [Seed(f"{sub} ({meta})", "world", True) for meta, subs in WORLD_TOPICS.items() for sub in subs]
    writing = [Seed(t.format(a_kind=_a(kind), kind=kind, subject=subject), "writing")
               for kind in WRITING_TYPES for t in WRITING_TEMPLATES for subject in WRITING_SUBJECTS]
    materials = [Seed(t.format(text=p), "materials") for p in PASSAGES for t in MATERIAL_TEMPLATES]
    pools = {"world": world, "writing": writing, "materials": materials}
    for name, pool in pools.items():
        random.Random(f"{seed}:seeds:{name}").shuffle(pool)
    if sector == "all":
        return _interleave(*pools.values())
    if sector not in pools:
        raise ValueError(f"unknown sector {sector!r}: expected world, writing, materials or all")
    return pools[sector]


# ------------------------------------------------------------------------------------------------ seeds from files

# Not "i", "my", "will" or "name": the first words of names too ("I, Robot", "My Chemical Romance", "Will Smith",
# "The Name of the Rose" less its article), which a file of Wikidata-style topics holds.
_OPENING_WORDS = {"what", "why", "how", "when", "where", "who", "which", "whom", "whose", "is", "are", "can",
                  "could", "would", "should", "do", "does", "did", "please", "write", "explain",
                  "describe", "summarise", "summarize", "give", "list", "tell", "compare", "create", "draft",
                  "compose", "translate", "rewrite", "help", "suggest", "recommend", "i'm"}
SEEDS_ARE = ("auto", "topics", "openings")  # how a "seed" column (a .txt line) is read: see looks_like_opening


def looks_like_opening(text: str) -> bool:
    """True for a question or an instruction (used as the opening as it is), False for a bare topic. A guess
    (load_seeds(seeds_are=...) says it outright for a whole file)."""
    text = text.strip()
    first = re.sub(r"[^\w']", "", text.split(maxsplit=1)[0].lower()) if text else ""
    return text.endswith("?") or "\n" in text or first in _OPENING_WORDS


def _row_seed(row, index: int, where: str, column: str | None, sector: str | None, seed: int,
              seeds_are: str = "auto") -> Seed:
    """One seed from row `index` (from 0) of a seeds file (data/dialogues.py's docstring lists the columns); `where`
    names it in errors."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: not a JSON object")
    # Per row: a file read by `datasets` gives every row every column, None where the row had none.
    column = column or next((c for c in SEED_COLUMNS if row.get(c) is not None), None)
    if column is None or row.get(column) is None:
        present = sorted(k for k, v in row.items() if v is not None)
        raise ValueError(f"{where}: no seed column (expected one of {SEED_COLUMNS} or --seed_column; "
                         f"the row has {present})")
    text = row[column]
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: {column!r} is not a non-empty string")
    if not is_text(text):
        raise ValueError(f"{where}: {column!r} is not valid Unicode (a lone surrogate)")
    text = text.strip()
    row_sector = row.get("sector") or sector
    if column == "material":
        ask = next((row[c] for c in ("instruction", "question", "prompt") if isinstance(row.get(c), str)), None)
        template = random.Random(f"{seed}:material:{index}").choice(MATERIAL_TEMPLATES)
        text = f"{ask.strip()}\n\n{text}" if ask else template.format(text=text)
        is_topic, row_sector = False, row_sector or "materials"
    elif column == "topic":
        is_topic = True
    elif column == "seed":
        is_topic = seeds_are == "topics" or (seeds_are == "auto" and not looks_like_opening(text))
    else:
        is_topic = False
    row_sector = row_sector or "world"
    _check_sector(row_sector, where)
    return Seed(text, row_sector, is_topic)


def _check_sector(sector, where: str) -> None:
    """ValueError naming `where` for a sector without a turn range (a list raised TypeError: unhashable)."""
    if not isinstance(sector, str) or sector not in SECTOR_TURNS:
        raise ValueError(f"{where}: unknown sector {sector!r} (expected {sorted(SECTOR_TURNS)})")


def load_seeds(source, *, split: str = "train", column: str | None = None, sector: str | None = None,
               seed: int = 42, seeds_are: str = "auto") -> list[Seed]:
    """Seeds from a .txt file (one a line, blank lines skipped) or any `sources.load_rows` source. `sector` is
    the sector of rows without a "sector" column (default: materials for a material, else world). `seeds_are`:
    whether a "seed" column (a .txt line) holds topics, openings, or each is guessed (looks_like_opening)."""
    if seeds_are not in SEEDS_ARE:
        raise ValueError(f"seeds_are={seeds_are!r}: expected one of {SEEDS_ARE}")
    source = os.fspath(source)
    # A file's suffix only: a hub name may hold a dot ("teknium/OpenHermes-2.5"), and a glob is load_rows' to match
    if Path(source).suffix in (".txt", *FORMATS) and "://" not in source and not glob.has_magic(source) and \
            not os.path.exists(source):
        raise FileNotFoundError(f"seeds file {source!r} does not exist")
    if source.endswith(".txt"):
        with open(source, "rb") as f:  # (bytes that are not UTF-8 named by file and line; a byte-order mark dropped)
            lines = [decode_line(raw, source, number).strip() for number, raw in enumerate(f, 1)]
        rows = [{"seed": line, **({"sector": sector} if sector else {})} for line in lines if line]
    else:
        from zephyr_jax.data.sources import load_rows

        rows = load_rows(source, split)
    seeds = [_row_seed(row, i, f"{source} row {i + 1}", column, sector, seed, seeds_are)
             for i, row in enumerate(rows)]
    if not seeds:
        raise ValueError(f"seeds file {source!r} holds no seeds")
    return seeds


def as_seed(s, index: int = 0, seed: int = 0) -> Seed:
    """A Seed from a Seed, a string (opening or topic by `looks_like_opening`) or a dict row (as row `index` of a
    seeds file read with `seed`: a "material" row draws its question template from both, as load_seeds does)."""
    if isinstance(s, Seed):  # its sector checked before any call is paid for (a KeyError at its first round)
        _check_sector(s.sector, f"seeds[{index}] {s.text!r:.40}")
        return s
    if isinstance(s, str):
        return Seed(s.strip(), "world", not looks_like_opening(s))
    if isinstance(s, dict):
        return _row_seed(s, index, f"seeds[{index}]", None, None, seed)
    raise TypeError(f"a seed is a Seed, str or dict, not {type(s).__name__}")
