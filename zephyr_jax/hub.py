"""A local directory or a Hugging Face hub name: one rule for every `path_or_name` (models, tokenizers)."""

from __future__ import annotations

import os

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id


def local_dir(path_or_name: str, what: str) -> str | None:
    """The local directory `path_or_name` names (~ expanded), or None for a hub name ("org/name", "gpt2").
    A file, or a path that is neither a directory nor a valid hub name (absolute, ./ or ~, three parts, a//b),
    raises FileNotFoundError naming `what` (transformers and the hub client would ask for a valid repo id)."""
    if not str(path_or_name).strip():  # (the message below would name nothing visible; a pathlib.Path is fine)
        blank = "an empty string" if path_or_name == "" else f"blank ({path_or_name!r})"
        raise FileNotFoundError(f"{what} is {blank}: name a local directory or a Hugging Face hub name")
    path = os.path.expanduser(path_or_name)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise FileNotFoundError(f"{what} {path} is a file: pass the directory that holds it")
    if not is_hub_name(path_or_name):
        raise FileNotFoundError(f"{what} {path_or_name} does not exist (neither a local directory nor a Hugging "
                                "Face hub name)")
    return None


def is_hub_name(name) -> bool:
    """A valid hub repository id ("org/name", "gpt2") by the hub client's own rule; nothing is looked up."""
    if not isinstance(name, str):  # (the rule lets None through)
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_error(e: BaseException) -> str:
    """The hub client's (or transformers') error as one line, for a message the CLIs print: theirs span lines."""
    return " ".join(f"{type(e).__name__}: {e}".split())
