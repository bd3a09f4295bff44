"""What the AI-feedback run asks its models, and how the judge's replies are read: the principles a completion
is written under (UltraFeedback's mix by prompt source) and their system prompts, the judge's rubric per aspect,
the critique prompt, the messages built from them, and the parsers of the judge's replies. Change the wording
here; data/feedback.py runs the calls, journals them and writes the rows.
"""

from __future__ import annotations

import hashlib
import json
import re

PRINCIPLES = ("helpfulness", "honesty", "truthfulness", "verbalized_calibration")
TYPED_ASPECTS = ("truthfulness", "helpfulness")  # rated with a Type first, then Rating and "Rationale For Rating"


# ---------------------------------------------------------------------------------------------------------------
# The texts the models are shown

# UltraFeedback's draw of a completion's principle by prompt source (its comparison_data_generation/main.py):
# equal-weight choices from these lists; then "honesty" becomes "verbalized_calibration" one time in ten.
PRINCIPLE_MIX = {
    "sharegpt": ("helpfulness",) * 3 + ("truthfulness", "honesty"),
    "ultrachat": ("helpfulness",) * 3 + ("truthfulness", "honesty"),
    "flan": ("helpfulness",) * 4 + ("verbalized_calibration",),
    "evol_instruct": ("helpfulness",),
    "truthful_qa": ("honesty", "truthfulness"),
    "false_qa": ("honesty", "truthfulness"),
}
DEFAULT_MIX = ("helpfulness",)  # any other source (UltraFeedback's fallback)


def principle_mix(source: str) -> tuple[str, ...]:
    """The mix of a prompt's source. openbmb/UltraFeedback names its FLAN subsets flan_v2_niv2, flan_v2_cot,
    flan_v2_p3 and flan_v2_flan2021: all take FLAN's mix."""
    return PRINCIPLE_MIX.get("flan" if source.startswith("flan") else source, DEFAULT_MIX)


CALIBRATION_SHARE = 0.1  # of "honesty" draws that become "verbalized_calibration"

# Per-principle system prompts (this project's own wording of UltraFeedback's idea).
SYSTEM_PROMPTS = {
    "helpfulness": (
        "You are a helpful assistant. Give answers that are accurate, relevant and current, and make them "
        "engaging and easy to learn from.",
        "As an assistant, your job is to be genuinely useful: answer correctly, cover what matters, and explain "
        "it in a way the user enjoys reading.",
        "Be a reliable source of help. Check your facts before you state them, keep to what was asked, and add "
        "the details that make the answer worth having.",
        "Aim to teach something with every reply: be correct, be clear, and be positive and engaging.",
        "Answer as a knowledgeable, friendly assistant would: informative, accurate and to the point.",
    ),
    "honesty": (
        "Be honest about what you know. When you are sure, answer plainly; when you are not, say so, using "
        "words such as 'probably' or 'I think', and say 'I don't know' when that is the truth.",
        "As an assistant, trust matters more than looking clever. If you are unsure of an answer, make your "
        "uncertainty clear instead of guessing with confidence.",
        "It is fine not to know. If a question is outside what you know well, admit it rather than inventing "
        "an answer.",
        "Give correct information, and where you are uncertain, say where and how uncertain you are.",
        "Never pretend to more certainty than you have: confident where you know, modest where you do not.",
    ),
    "truthfulness": (
        "Answer truthfully. Stay faithful to established facts and to the context you are given, and never "
        "make up facts that cannot be grounded in them.",
        "Keep to what is true and verifiable. Do not invent names, numbers, events or sources.",
        "As an assistant, accuracy comes first: base every statement on facts or on the user's input, and avoid "
        "speculation presented as fact.",
        "Do not mislead. If the question rests on a false premise, say so instead of answering as if it held.",
        "Give precise, factual information, and leave out anything you cannot stand behind.",
    ),
    "verbalized_calibration": (
        "After your answer, state how confident you are that it is correct, as a percentage on its own line, "
        "for example:\nConfidence: 75%\nA confidence of 75% means you expect the answer to be right three times "
        "in four.",
    ),
}

JUDGE_SYSTEM = ("You evaluate the quality of AI-written texts against a rubric. You are given one instruction and "
                "several texts written in response to it. Rate each text on its own, independently of the "
                "others, and answer in exactly the format asked for.")

RUBRICS = {
    "instruction_following": """# Aspect: following the instruction

Judge how well each text does what the instruction asks: does it reach the task's goal, and does it keep to the
instruction's constraints (format, style, length, required method)?

Rating from 1 to 5:
1. Off target: neither the goal nor the constraints are met.
2. Weak: one part of the task is addressed, and poorly.
3. Half way: the goal or the constraints are met but not both, or both with noticeable slips.
4. Close: goal and constraints met, with small slips.
5. Complete: the goal and every constraint are met.""",
    "honesty": """# Aspect: honesty and expressed uncertainty

Judge whether each text's confidence fits its correctness. Uncertainty shows as hedging words ("I think",
"probably"), declining to answer, or a stated confidence (0-20% low, 20-40% unsure, 40-60% moderate, 60-80%
fairly confident, 80-100% high). A text that does not hedge counts as confident. Correct means consistent with
the facts, with nothing made up.

Rating from 1 to 5, or N/A:
1. Confident and wrong.
2. Confident with major errors, or hesitant and entirely wrong.
3. Declines or says it does not know; or confident with minor errors; or hesitant with major errors.
4. Correct but hesitant; or minor errors flagged only with vague doubt.
5. Correct and confident; or minor errors whose uncertainty it names precisely.
N/A. There is no right answer to be honest about (for example creative writing).""",
    "truthfulness": """# Aspect: truthfulness (no hallucination)

First name the kinds of hallucination each text contains, as numbers separated by commas, or None:
1. Against the world: facts, entities, places or events that contradict established knowledge.
2. Against the instruction: claims that conflict with the instruction or its input, or invent new details
   that depart from it.
3. Against itself: internal contradictions or broken logic.

Then rate from 1 to 5 how far hallucination goes:
1. Unreliable throughout.
2. About half of it is hallucinated; it strays from the main points.
3. Mostly true, but a hallucination causes a partial misunderstanding.
4. Mostly true; a slight hallucination leaves the main points intact.
5. No hallucination.""",
    "helpfulness": """# Aspect: helpfulness and informativeness

Judge overall quality: correctness (no wrong computation or reasoning, nothing made up) and informativeness.
First name the informative qualities each text has, as numbers separated by commas, or None:
1. Clear and relevant: it stays on the task and asks for clarification where needed.
2. Useful and thorough: it gives the background, reasoning steps or details that matter.
3. Concise: no padding and no repetition.

Then rate from 1 to 5, on correctness and informativeness together:
1. Badly wrong: major errors or invented content, however detailed.
2. Partly wrong: errors that would mislead, despite useful content.
3. Correct: accurate, and meets the task's needs.
4. Very informative: accurate and thorough, with valuable detail.
5. Outstanding: accurate and deep, with insight beyond the obvious.""",
}

CRITIQUE_SYSTEM = "You are an expert reviewer. You give specific, constructive and concise feedback."
CRITIQUE_PROMPT = """Below is an instruction and my answer to it. Act as a teacher: point out the weaknesses of my
answer and say concretely how I could improve it, considering how helpful, truthful and honest it is and how well
it follows the instruction. Do not add requirements the instruction does not make, and do not write the correct
answer for me. Keep it short. Then score the overall quality of my answer from 1 (worst) to 10 (best).

### Instruction
{instruction}
{note}
### My answer
{response}

### Reply format
Feedback: <your feedback>
Overall Score: <1-10>"""


def prompts_digest() -> str:
    """SHA-256 of the draw settings and of every message this module writes (the texts above, and the wording the
    functions below add, rendered on sample inputs): a run resumed after one of them changed is refused
    (data/feedback.py's settings hold it)."""
    knowledge = world_knowledge({"correct_answers": ["c"], "incorrect_answers": ["i"]}, "truthful_qa")
    rendered = [rating_messages(a, "<instruction>", ["<text>"], knowledge) for a in RUBRICS] + [
        critique_messages("<instruction>", "<response>", "<system prompt>"), reask_message("<error>", "<what>"),
        world_knowledge({}, "false_qa")]
    texts = json.dumps([SYSTEM_PROMPTS, PRINCIPLE_MIX, DEFAULT_MIX, CALIBRATION_SHARE, JUDGE_SYSTEM, RUBRICS,
                        CRITIQUE_SYSTEM, CRITIQUE_PROMPT, rendered], sort_keys=True)
    return hashlib.sha256(texts.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# The LLM judge's messages, and the parsers of its replies


class FormatError(ValueError):
    """A judge reply that does not follow the asked format (the message says what is wrong)."""


def _answer_format(aspect: str, n: int) -> str:
    if aspect in TYPED_ASPECTS:
        fields = ("Type: <numbers separated by commas, or None>\nRationale: <why, in a sentence or two>\n"
                  "Rating: <1-5>\nRationale For Rating: <why, in a sentence or two>")
    else:
        rating = "<1-5, or N/A>" if aspect == "honesty" else "<1-5>"
        fields = f"Rating: {rating}\nRationale: <why, in a sentence or two>"
    return (f"## Answer format\n\nFor each of the {n} texts, in order, write exactly this and nothing else:\n\n"
            f"#### Output for Text <number>\n{fields}")


def world_knowledge(row: dict, source: str) -> str | None:
    """Reference knowledge for the truthfulness and helpfulness ratings, when the row has some."""
    if source == "false_qa":
        return "The question rests on a false premise."
    parts = []
    for key, label in (("correct_answers", "Some correct answers"), ("incorrect_answers", "Some incorrect answers")):
        value = row.get(key)
        if isinstance(value, list) and value and any(str(v).strip().lower() not in ("", "none") for v in value):
            parts.append(f"{label}: {json.dumps(value, ensure_ascii=False)}")
    return "\n".join(parts) or None


def rating_messages(aspect: str, instruction: str, texts: list[str], knowledge: str | None) -> list[dict]:
    shown = "\n".join(f"<text {i}> {t}" for i, t in enumerate(texts, 1))
    task = f"## Task\n\nInstruction: {instruction}\n\nTexts:\n{shown}\n"
    if knowledge and aspect in TYPED_ASPECTS:
        task += f"\nWorld knowledge (reference, not part of the instruction):\n{knowledge}\n"
    user = f"{RUBRICS[aspect]}\n\n{_answer_format(aspect, len(texts))}\n\n{task}\n## Your annotation\n"
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def critique_messages(instruction: str, response: str, system_prompt: str) -> list[dict]:
    # The writer's guideline is shown so that feedback fits it (e.g. a stated confidence was asked for).
    note = f"(The answer was written under this guideline: {system_prompt})\n" if system_prompt else ""
    user = CRITIQUE_PROMPT.format(instruction=instruction, note=note, response=response)
    return [{"role": "system", "content": CRITIQUE_SYSTEM}, {"role": "user", "content": user}]


def reask_message(error: str, what: str) -> dict:
    return {"role": "user", "content": f"That reply does not follow the format ({error}). Write {what} again, in "
                                       f"exactly the format asked for, and nothing else."}


_SECTION = re.compile(r"^[ \t#>*]*Output\s+for\s+Text\s*(\d{1,6})\b[ \t*:.]*$", re.I | re.M)
_PLAIN = re.compile(r"^\s*Rating\s*:[ \t]*(?P<rating>[^\n]*)\n\s*Rationale\s*:\s*(?P<rationale>.*)\Z", re.I | re.S)
_TYPED = re.compile(r"^\s*Type\s*:[ \t]*(?P<type>[^\n]*)\n\s*Rationale\s*:\s*(?P<rationale>.*?)\n"
                    r"\s*Rating\s*:[ \t]*(?P<rating>[^\n]*)\n\s*Rationale(?:\s+for\s+rating)?\s*:\s*(?P<rfr>.*)\Z",
                    re.I | re.S)


# A value may carry a wordy tail without digits ("4 (almost there)", "N/A - creative writing", "None."), which is
# dropped; anything else with other numbers in it ("3.5", "4-5", "45") is a format error.
_TAIL = r"(?:\b[^\d\n]*)?"


def _rating(value: str, allow_na: bool) -> str:
    value = value.strip()
    if allow_na and re.fullmatch(r"N\s*/\s*A" + _TAIL, value, re.I):
        return "N/A"
    m = re.fullmatch(r"([1-5])(?:\.0+)?(?:\s*(?:/|out of)\s*5)?" + _TAIL, value, re.I)
    if not m:
        raise FormatError(f"rating {value!r} is not a whole number from 1 to 5{' or N/A' if allow_na else ''}")
    return m.group(1)


def _types(value: str) -> list[str]:
    value = value.strip()
    if re.fullmatch(r"none" + _TAIL, value, re.I):
        return ["None"]
    if not re.fullmatch(r"[1-3](?:\s*,\s*[1-3])*" + _TAIL, value):
        raise FormatError(f"type {value!r} is not numbers from 1 to 3 separated by commas, or None")
    return sorted(set(re.findall(r"[1-3]", value)))  # the tail has no digits


def _text(value: str, what: str) -> str:
    value = value.strip()
    if not value:
        raise FormatError(f"empty {what}")
    return value


def _plain_lines(reply: str) -> str:
    """The reply without markdown bold, its lines ending in \\n (a reply in \\r\\n lines matched no heading)."""
    return reply.replace("**", "").replace("\r\n", "\n").replace("\r", "\n")


def parse_rating_reply(reply: str, aspect: str, n: int) -> list[dict]:
    """One annotation per text, in the order shown, from a judge's reply (FormatError when it does not fit)."""
    parts = _SECTION.split(_plain_lines(reply))
    numbers = [int(x) for x in parts[1::2]]
    if sorted(numbers) != list(range(1, n + 1)):
        found = ", ".join(map(str, numbers)) or "none"
        raise FormatError(f"expected one 'Output for Text i' section for each of texts 1 to {n}, found {found}")
    annotations: list = [None] * n
    for number, body in zip(numbers, parts[2::2]):
        body = body.strip()
        # A second Rating (or Type) line in a section, a judge correcting itself, was read as part of the rationale
        # and its first rating kept: the section is a format error, re-asked.
        repeated = [key for key in ("Type", "Rating") if len(re.findall(rf"^\s*{key}\s*:", body, re.I | re.M)) > 1]
        if repeated:
            raise FormatError(f"text {number}: more than one {repeated[0]} line")
        if aspect in TYPED_ASPECTS:
            m = _TYPED.match(body)
            if not m:
                raise FormatError(f"text {number}: expected the lines Type, Rationale, Rating, Rationale For Rating")
            annotations[number - 1] = {"Type": _types(m["type"]), "Rationale": _text(m["rationale"], "rationale"),
                                       "Rating": _rating(m["rating"], False),
                                       "Rationale For Rating": _text(m["rfr"], "rationale for rating")}
        else:
            m = _PLAIN.match(body)
            if not m:
                raise FormatError(f"text {number}: expected the lines Rating and Rationale")
            annotations[number - 1] = {"Rating": _rating(m["rating"], aspect == "honesty"),
                                       "Rationale": _text(m["rationale"], "rationale")}
    return annotations


_SCORE = re.compile(r"Overall\s+Score\s*:\s*(\d+(?:\.\d+)?)(?:\s*(?:/|out of)\s*10)?[^\d\n]*\Z", re.I)


def parse_critique_reply(reply: str) -> tuple[str, float]:
    """(feedback, overall score 1-10) from a critique reply: feedback text, then a last line "Overall Score: N".
    "N/10" reads as N (UltraFeedback's known bug turned some 1s into 10s)."""
    text = _plain_lines(reply).strip()
    m = _SCORE.search(text)
    if not m:
        raise FormatError("expected the feedback, then a last line 'Overall Score: <1-10>'")
    score = float(m.group(1))
    if not 1 <= score <= 10:
        raise FormatError(f"overall score {m.group(1)} is not between 1 and 10")
    feedback = re.sub(r"^\s*(?:#+\s*)?Feedback\s*:?\s*", "", text[:m.start()], flags=re.I)
    return _text(feedback, "feedback"), score
