"""Host time of streaming a reply's text (engine.Request.new_text, as chat and the server call it after each
decoding call), against its length: the real Mistral tokenizer, README.md's text as the reply, no model.

    python bench/stream_text.py [--tokens_per_call=4]
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from zephyr_jax.engine import Request, SamplingParams  # noqa: E402
from zephyr_jax.tokenizer import load_tokenizer  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens_per_call", type=int, default=4, help="tokens a decoding call adds (engine decode_steps)")
    args = p.parse_args()
    tok = load_tokenizer()
    with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as f:
        ids = tok.encode(f.read(), add_special_tokens=False)
    for n in (1024, 4096, 8192):
        r, k = Request([1], SamplingParams(stop=("\n\n\n\n",))), args.tokens_per_call
        start = time.perf_counter()
        for i in range(0, n, k):
            r.tokens.extend(ids[i:i + k])
            r.new_text(tok)
        print(f"{n} reply tokens, {k} a call: {time.perf_counter() - start:.3f} s")


if __name__ == "__main__":
    main()
