"""Log-probs' token strings (serve's `token`, `bytes` and the completions API's `tokens`): the text each token of a
sequence adds, so that the strings join to the text the tokenizer decodes the sequence to.

A token is read in context, as decoding it alone would read it wrong: a piece loses its leading space, and a byte
token (sentencepiece's byte fallback, `<0xE2>`) decodes to U+FFFD. The ByteFallback decoder turns each run of
byte tokens (consecutive but for special tokens, which decoding skips) into its characters when the run's bytes are
valid UTF-8, and into one U+FFFD per byte when they are not (a model's stray byte, an emoji cut short by
max_tokens). So a run's text is known only once a piece ends it, and each of its byte tokens is given: the
character it completes, "" for a byte inside a character (a valid run), or its U+FFFD (an invalid one). A token's
`bytes` are its own: a byte token's one byte (OpenAI's meaning: they join to the text's UTF-8 wherever the model
wrote valid UTF-8), a piece's its text's UTF-8. Special tokens show as themselves and add no text; an id the
tokenizer lacks shows as "<id N>".
"""

from __future__ import annotations

import codecs
import re


class TokenStrings:
    CONTEXT = 6  # tokens before a piece: enough for its leading space (the window's first piece loses its own)
    TAIL = 16  # the tokens before an alternative (top_logprobs) it is read after
    BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

    def __init__(self, tokenizer):
        self.tokenizer, self.special, self.size = tokenizer, set(tokenizer.all_special_ids), len(tokenizer)
        self._pieces: dict[int, tuple[str | None, int | None]] = {}  # id -> (piece, byte): asked per token read

    def _piece_and_byte(self, token: int) -> tuple[str | None, int | None]:
        if token not in self._pieces:
            piece = self.tokenizer.convert_ids_to_tokens(token) if 0 <= token < self.size else None
            match = self.BYTE.fullmatch(piece or "")
            self._pieces[token] = piece, None if match is None else int(match.group(1), 16)
        return self._pieces[token]

    def _piece(self, token: int) -> str | None:
        return self._piece_and_byte(token)[0]

    def _byte(self, token: int) -> int | None:
        return self._piece_and_byte(token)[1]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([t for t in ids if self._piece(t) is not None], skip_special_tokens=True)

    def _ends_run(self, token: int) -> bool:
        """Whether the text up to `token` is settled: it is a piece (not a byte, a special token or an id the
        tokenizer lacks: decoding skips those two, so the bytes around them join)."""
        return token not in self.special and self._piece(token) is not None and self._byte(token) is None

    def settled(self, ids: list[int]) -> int:
        """How many of `ids` have strings no later token changes: up to the last piece."""
        return next((k + 1 for k in range(len(ids) - 1, -1, -1) if self._ends_run(ids[k])), 0)

    def shares(self, ids: list[int], start: int = 0) -> list[str]:
        """The text each of ids[start:] adds after the tokens before it (a run that `start` is inside is read
        from its first byte)."""
        first = start
        while first > 0 and not self._ends_run(ids[first - 1]):
            first -= 1
        out, i = [], first
        while i < len(ids):  # one run of byte (and special) tokens ids[i:j], then the piece ids[j] that ends it
            j = i
            while j < len(ids) and not self._ends_run(ids[j]):
                j += 1
            window = max(0, i - self.CONTEXT)
            while window > 0 and not self._ends_run(ids[window - 1]):
                window -= 1  # from a settled point: the run before it decodes as in the whole sequence
            before = self._decode(ids[window:i])
            with_run = self._decode(ids[window:j]) if j > i else before
            out += self._run_shares(ids[i:j], with_run[len(before):] if with_run.startswith(before)
                                    else self._decode(ids[i:j]))
            if j < len(ids):
                after = self._decode(ids[window:j + 1])
                out.append(after[len(with_run):] if after.startswith(with_run)
                           else self.tokenizer.convert_tokens_to_string([self._piece(ids[j])]))
            i = j + 1
        return out[start - first:]

    def _run_shares(self, run: list[int], text: str) -> list[str]:
        """`text`, the run's decoded text, shared among its byte tokens."""
        raw = [self._byte(t) for t in run]
        at = [k for k, b in enumerate(raw) if b is not None]
        shares = [""] * len(run)
        if text.encode() == bytes(raw[k] for k in at):  # valid UTF-8: a character at the byte that completes it
            decoder = codecs.getincrementaldecoder("utf-8")()
            for k in at:
                shares[k] = decoder.decode(bytes([raw[k]]))
        elif len(text) == len(at):  # the decoder's U+FFFD for each byte of an invalid run
            for k, char in zip(at, text):
                shares[k] = char
        elif at:  # another decoder's way: the text is the run's last byte's, so the strings still join
            shares[at[-1]] = text
        return shares

    def entries(self, ids: list[int], start: int = 0) -> list[tuple[str, str, list[int]]]:
        """(the string shown, the text it adds, its bytes) for each of ids[start:]."""
        return [self._entry(token, share) for token, share in zip(ids[start:], self.shares(ids, start))]

    def alternative(self, ids: list[int], k: int, token: int) -> tuple[str, str, list[int]]:
        """The entry of `token` in place of ids[k] (a top-logprobs alternative), read after the TAIL tokens before
        it as if the sequence ended with it (a byte that completes the character begun before it shows that
        character)."""
        context = list(ids[max(0, k - self.TAIL):k])
        return self.entries([*context, token], len(context))[0]

    def _entry(self, token: int, share: str) -> tuple[str, str, list[int]]:
        piece, byte = self._piece(token), self._byte(token)
        if piece is None:
            return f"<id {token}>", "", []
        shown = piece if token in self.special else share
        return shown, share, [byte] if byte is not None else list(shown.encode())
