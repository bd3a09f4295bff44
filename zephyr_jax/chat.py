"""Talk to a model in the terminal with the Zephyr chat template, tokens streaming as they are generated.

    python -m zephyr_jax.chat --model=HF_DIR_OR_WORKDIR [--system=...]            # interactive, multi-turn
    python -m zephyr_jax.chat --model=HF_DIR_OR_WORKDIR --prompt="Hello"          # one reply, then exit

In the interactive mode, /reset clears the history and /exit (or end of input) quits.
"""

from __future__ import annotations

import argparse
import sys

import jinja2

from zephyr_jax.config_common import COMPILATION_CACHE_DIR
from zephyr_jax.engine import SIZE_BOUNDS, Engine, Request, SamplingParams
from zephyr_jax.loading import load
from zephyr_jax.sharding import MESH_FLAG_HELP, local_mesh, mesh_shape
from zephyr_jax.tokenizer import encode_text, render_chat
from zephyr_jax.train_checks import TRAINING_DTYPES


RESET = "/reset clears the history"  # what makes room in the interactive mode


def reply(engine: Engine, tok, messages, out=sys.stdout, *, max_new_tokens: int, temperature: float = 0.7,
          top_k: int = 0, top_p: float = 1.0, seed: int = 0, room_hint: str = RESET) -> str:
    """Streams the assistant's reply to `out` as the engine produces it, and returns it. Near the end of the
    context the reply gets the room left (said on stderr when that is below max_new_tokens, with `room_hint`: what
    makes more)."""
    prompt = encode_text(tok, render_chat(tok, messages, add_generation_prompt=True))
    room = engine.max_length - len(prompt)
    if room < 1:
        raise ValueError(f"the conversation has {len(prompt)} tokens, the context {engine.max_length}: {room_hint}")
    if room < max_new_tokens:
        print(f"(the reply has room for {room} tokens of the context's {engine.max_length}: {room_hint})",
              file=sys.stderr)
    params = SamplingParams(max_tokens=min(max_new_tokens, room), temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed)

    def show(request: Request) -> None:  # the reply's new text; held back while it could still change
        out.write(request.new_text(tok))
        out.flush()

    (done,) = engine.generate([Request(prompt, params, on_update=show)])
    out.write("\n")
    out.flush()
    return done.text


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m zephyr_jax.chat",
                                     description="Chat with a zephyr_jax or Hugging Face Mistral model.")
    parser.add_argument("--model", required=True, help="HF directory / hub name, or a zephyr_jax workdir")
    parser.add_argument("--tokenizer", default=None, help="default: the model's own (a workdir's: its training "
                        "tokenizer), else Mistral-7B-v0.1")
    parser.add_argument("--system", default="", help="system message")
    parser.add_argument("--prompt", default=None, help="one-shot: answer this and exit")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="reply tokens at most (default 256)")
    parser.add_argument("--temperature", type=float, default=0.7, help="default 0.7; 0 for greedy")
    parser.add_argument("--top_k", type=int, default=50, help="default 50; 0 for all tokens")
    parser.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling: default 0.95; 1.0 for all")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--dtype", default="bfloat16", choices=TRAINING_DTYPES,
                        help="compute and weight dtype (float32 for exact numbers)")
    parser.add_argument("--max_length", type=int, default=None,
                        help="conversation tokens (default: the model's max_position_embeddings, at most 4096)")
    parser.add_argument("--mesh", type=mesh_shape, default=None, help=MESH_FLAG_HELP)
    parser.add_argument("--compilation_cache", default=COMPILATION_CACHE_DIR,
                        help="JAX's persistent compilation cache, so a later chat skips compiling ('' = off)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:  # 0 printed an empty reply and exited 0
        sys.exit(f"error: --max_new_tokens={args.max_new_tokens}: must be at least 1")
    if args.max_length is not None and args.max_length < SIZE_BOUNDS["max_length"]:  # the Engine's, before the load
        sys.exit(f"error: --max_length={args.max_length}: must be at least {SIZE_BOUNDS['max_length']}")
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed)
    try:  # the engine's own ranges: it refused them at the first reply, after the model's load (and every turn)
        params.check()
    except ValueError as e:
        sys.exit(f"error: {e}")

    from zephyr_jax.train import use_compilation_cache  # (as serve and evaluate: not at import time)

    use_compilation_cache(args.compilation_cache)
    try:  # no such model, a checkpoint of another shape, a mesh the devices cannot fill: its message alone
        model, tok = load(args.model, args.dtype, local_mesh(args.mesh), tokenizer=args.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    try:  # and those that need its vocabulary (a top_k above it): once, not at every turn
        params.check(model.config.vocab_size)
    except ValueError as e:
        sys.exit(f"error: {e}")
    engine = Engine(model, tok, max_slots=1, max_length=args.max_length)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p)
    history = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        try:
            reply(engine, tok, history + [{"role": "user", "content": args.prompt}], seed=args.seed, **sampling,
                  room_hint="a shorter --prompt or --system, or a larger --max_length, makes room")  # (no /reset)
        except (ValueError, jinja2.TemplateError) as e:
            sys.exit(f"error: {e}")
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
            history, turn = history[:1] if args.system else [], 0
            print("(history cleared)")
            continue
        if not line.strip():
            continue
        asked = history + [{"role": "user", "content": line.rstrip("\n")}]
        print("zephyr> ", end="", flush=True)
        try:
            # (wrapped as the server's n choices wrap: past 2**32 - 1 every later turn was refused)
            answer = reply(engine, tok, asked, seed=(args.seed + turn) % 2 ** 32, **sampling)
        except (ValueError, jinja2.TemplateError) as e:  # the context is full: the session goes on (/reset)
            print(f"\nerror: {e}", file=sys.stderr)
            continue
        history = asked + [{"role": "assistant", "content": answer}]
        turn += 1


if __name__ == "__main__":
    main()
