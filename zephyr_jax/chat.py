"""Talk to a model in the terminal with the Zephyr chat template, tokens streaming as they are generated.

    python -m zephyr_jax.chat --model=HF_DIR_OR_WORKDIR [--system=...]            # interactive, multi-turn
    python -m zephyr_jax.chat --model=HF_DIR_OR_WORKDIR --prompt="Hello"          # one reply, then exit

In the interactive mode, /reset clears the history and /exit (or end of input) quits.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax.numpy as jnp

from zephyr_jax.generate import stream_ids
from zephyr_jax.tokenizer import load_tokenizer, render_chat


def load_any(path: str, dtype=jnp.float32):
    """A model from a zephyr_jax training workdir (latest checkpoint) or a Hugging Face directory/hub name."""
    from zephyr_jax import hf
    from zephyr_jax.export import load_model

    if os.path.exists(os.path.join(path, "model_config.json")):
        return load_model(path, dtype=dtype)[0]
    return hf.load_pretrained(path, dtype=dtype)


def reply(model, tok, messages, out=sys.stdout, **sampling) -> str:
    """Streams the assistant's reply to `out` and returns it."""
    prompt = tok(render_chat(tok, messages, add_generation_prompt=True)).input_ids
    tokens, shown = [], ""
    for token in stream_ids(model, prompt, eos_id=tok.eos_token_id, **sampling):
        tokens.append(token)
        text = tok.decode(tokens, skip_special_tokens=True)
        out.write(text[len(shown):])  # decode the whole reply: sentencepiece spaces depend on neighbours
        out.flush()
        shown = text
    out.write("\n")
    out.flush()
    return shown


def main(argv=None):
    parser = argparse.ArgumentParser(description="Chat with a zephyr_jax or Hugging Face Mistral model.")
    parser.add_argument("--model", required=True, help="HF directory / hub name, or a zephyr_jax workdir")
    parser.add_argument("--tokenizer", default=None, help="default: the model directory's, else Mistral v0.1")
    parser.add_argument("--system", default="", help="system message")
    parser.add_argument("--prompt", default=None, help="one-shot: answer this and exit")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top_k", type=int, default=50)
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", help="compute dtype (bfloat16 on accelerators)")
    args = parser.parse_args(argv)

    model = load_any(args.model, jnp.dtype(args.dtype))
    has_tokenizer = os.path.exists(os.path.join(args.model, "tokenizer_config.json"))
    tok = load_tokenizer(args.tokenizer or (args.model if has_tokenizer else None))
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p)
    history = [{"role": "system", "content": args.system}]
    if args.prompt is not None:
        reply(model, tok, history + [{"role": "user", "content": args.prompt}], seed=args.seed, **sampling)
        return
    interactive = sys.stdin.isatty()
    turn = 0
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history, turn = history[:1], 0
            print("(history cleared)")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        print("zephyr> ", end="", flush=True)
        history.append({"role": "assistant", "content": reply(model, tok, history, seed=args.seed + turn,
                                                              **sampling)})
        turn += 1


if __name__ == "__main__":
    main()
