"""lm-evaluation-harness model "zephyr_jax": the Open LLM Leaderboard tasks (ARC, HellaSwag, MMLU, TruthfulQA, ...)
on a zephyr_jax workdir or a Hugging Face Mistral directory, with the JAX model.

Command line (this module registers the model, then runs lm_eval's own CLI with the same arguments; lm_eval has
no plugin hook for models, so `lm_eval --model zephyr_jax` alone does not find it):

    python -m zephyr_jax.lm_eval_adapter --model zephyr_jax \\
        --model_args pretrained=HF_DIR_OR_WORKDIR,dtype=bfloat16,batch_size=16 \\
        --tasks arc_challenge --num_fewshot 25 [--include_path MY_TASKS_DIR] [--output_path out/]

--num_fewshot holds for every task of a run. Without --batch_size (or batch_size in model_args) it scores 8 rows at a
time, as from Python. The Open LLM Leaderboard (v1) figures of Zephyr-7B-beta (its model card) took ARC-Challenge
25-shot, HellaSwag 10-shot, MMLU 5-shot and TruthfulQA (mc2) 0-shot: one run per few-shot count.

Python:

    import lm_eval, zephyr_jax.lm_eval_adapter          # the import registers "zephyr_jax"
    lm_eval.simple_evaluate(model="zephyr_jax", model_args="pretrained=DIR", tasks=["arc_easy"])

model_args: pretrained (HF dir / hub name / workdir, or a Mistral module from Python), tokenizer (default: the
model's own, else Mistral-7B-v0.1), dtype (float32), batch_size (8), max_length (default: the smaller of the
model's max_position_embeddings and 4096, Mistral v0.1's sliding window), max_gen_toks (256), add_bos_token
(True: every sequence starts with `<s>`, the format the model was trained on), seed (0: with a request's task,
document, index and prompt it keys that request's draws, whatever other tasks run beside it).

Scoring runs one jitted forward per batch of `batch_size` rows padded to a power-of-two length, so a task
compiles a handful of shapes; generation runs on the engine (zephyr_jax/engine.py: continuous batching
over batch_size KV-cache slots).
Single process: run one evaluation per host. The model is on one device unless model_args name a mesh over this
host's devices (mesh=1x1x8: tensor parallel; a 7B in float32, the default dtype, fits no single TPU v4/v5e chip).
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m zephyr_jax.lm_eval_adapter`: register under the importable module name
    from zephyr_jax.lm_eval_adapter import main

    main()
    raise SystemExit(0)

import collections
import functools
import inspect
import logging

import jax
import jax.numpy as jnp
import lm_eval.models  # noqa: F401  (lm_eval's own model names, so registering ours first does not hide them)
import numpy as np
from flax import nnx
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from zephyr_jax import train_steps as steps
from zephyr_jax.data.batches import bucket, default_buckets
from zephyr_jax.engine import SamplingParams, default_max_length
from zephyr_jax.generate import keyed_seed, run
from zephyr_jax.sharding import local_mesh, mesh_shape
from zephyr_jax.tokenizer import render_chat
from zephyr_jax.train_checks import check_float_dtype


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score(graphdef, state, batch):
    """Per row: the sum of log p(targets) at its loss positions, and whether each of those targets is the argmax:
    the training step's loss_position_logps (the LM head at those positions only; float32 logits at every
    position were 3.9 GiB for 8 rows of 4,096 tokens at 7B). A row is one sequence."""
    logps, correct, valid, _ = steps.loss_position_logps(graphdef, state, batch, max_segments=1)
    return jnp.sum(logps, axis=-1), jnp.all(correct | ~valid, axis=-1)


log = logging.getLogger("zephyr_jax.lm_eval_adapter")


def _flag(x, name: str) -> bool:
    """A model_args / gen_kwargs boolean, as lm-eval passes it (a bool or text); a typo is an error, not False."""
    if isinstance(x, bool):
        return x
    if str(x).lower() in ("1", "true", "yes", "0", "false", "no"):
        return str(x).lower() in ("1", "true", "yes")
    raise ValueError(f"{name}={x!r}: expected true or false")


@register_model("zephyr_jax")
class ZephyrJaxLM(LM):
    def __init__(self, pretrained, tokenizer=None, dtype="float32", batch_size=8, max_length=None,
                 max_gen_toks=256, add_bos_token=True, seed=0, device=None, max_batch_size=None, mesh=None,
                 trust_remote_code=None, **unknown):
        # device, max_batch_size and trust_remote_code come from lm_eval's own flags and are not used: the mesh
        # places the model, batch_size is fixed (no search), and nothing is loaded as remote code.
        if unknown:  # a misspelt model_arg (dtpye=bfloat16) ran with the default, unsaid
            known = sorted(set(inspect.signature(ZephyrJaxLM.__init__).parameters) - {"self", "unknown"})
            raise TypeError(f"zephyr_jax model_args: unknown {', '.join(sorted(unknown))} (known: {', '.join(known)})")
        add_bos_token = _flag(add_bos_token, "add_bos_token")  # before the model loads
        check_float_dtype(dtype, "dtype")  # (fp8: a TypeError deep in numpy)
        # (batch_size=-1 scored nothing and returned None for every request; max_length=-8 dropped tokens)
        for name, value in (("batch_size", batch_size), ("max_length", max_length)):
            if value is not None and str(value).lstrip("-").isdigit() and int(value) < 1:
                raise ValueError(f"{name}={int(value)}: must be at least 1")
        super().__init__()
        from zephyr_jax.loading import load
        from zephyr_jax.tokenizer import tokenizer_for

        if isinstance(pretrained, str):  # mesh: "1x1x8" (model_args are split at commas)
            mesh = local_mesh(mesh_shape(mesh) if mesh else None)
            self.model, self.tokenizer = load(pretrained, dtype, mesh, tokenizer=tokenizer)
        else:  # a Mistral module built in Python
            self.model = pretrained
            self.tokenizer = tokenizer if tokenizer is not None and not isinstance(tokenizer, str) \
                else tokenizer_for(None, tokenizer)
        self.pretrained = pretrained if isinstance(pretrained, str) else type(pretrained).__name__
        if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
            log.warning("zephyr_jax does not search for a batch size (batch_size=%s): it scores 8 rows at a time; "
                        "pass batch_size=N for more", batch_size)
            batch_size = 8
        self.batch_size = int(batch_size)
        cfg = self.model.config
        self.max_length = int(max_length) if max_length else default_max_length(cfg)
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.seed = int(seed)
        self.graphdef, self.state = nnx.split(self.model)
        self.buckets = default_buckets(self.max_length, min(16, self.max_length))
        self.bos, self.eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        self._warned: set[str] = set()  # generation settings this engine does not implement, said once each

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        """lm_eval passes --batch_size / --device beside model_args; a model_args value wins over them."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # --- tokenization -----------------------------------------------------------------------------------

    def tok_encode(self, text: str, bos: bool | None = None) -> list[int]:
        """Token ids of `text`, after one `<s>` (unless bos=False, add_bos_token=False, or the text has its own)."""
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        bos = self.add_bos_token if bos is None else bos
        return ([self.bos] if bos and ids[:1] != [self.bos] else []) + ids

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm-eval's HFLM splits them: the joint text's tokens after the
        context's own token count, so the continuation's tokens are those the model sees in the joint text, also
        where the tokenizer merges across the boundary ("It is" + "n't"). Spaces at the end of the context move
        to the continuation (lm-eval's convention). An empty context becomes `<s>`."""
        stripped = context.rstrip()
        if len(stripped) < len(context):
            continuation, context = context[len(stripped):] + continuation, stripped
        if not continuation:  # HFLM refuses it too; the split below would score the context's last token
            raise ValueError(f"an empty continuation after the context {context[-40:]!r}: nothing to score")
        if not context:
            cont = self.tok_encode(continuation, bos=False)
            if cont[:1] == [self.bos] and len(cont) > 1:  # a continuation that brings its own <s> (as HFLM reads it)
                return cont[:1], cont[1:]
            return [self.bos], cont
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        if len(whole) > len(ctx):
            return ctx, whole[len(ctx):]
        # The merge swallowed the whole continuation into the context's last tokens (HFLM would score nothing):
        # split the joint text where it stops agreeing with the context's own tokens, keeping one token to score.
        k = next((i for i, (a, b) in enumerate(zip(whole, ctx)) if a != b), len(whole))
        k = max(min(k, len(whole) - 1), 1)
        return whole[:k], whole[k:]

    # --- scoring ----------------------------------------------------------------------------------------

    def _score_rows(self, rows: list[tuple[list[int], int]], desc: str = "",
                    owner: list[int] | None = None) -> list[tuple[float, bool]]:
        """rows: (token ids, n): the log-prob of the last n tokens given everything before them, and whether
        greedy decoding produces them. Inputs keep their last max_length tokens (left truncation). owner: each
        row's request index, for the errors (default: row i is request i)."""
        vocab = self.model.config.vocab_size
        owner = range(len(rows)) if owner is None else owner
        for i, (tokens, n) in enumerate(rows):  # all before any batch: a short row is scored last, after hours
            if max(tokens) >= vocab:  # jit embeds it as NaN, or scores a clipped target
                raise ValueError(f"request {owner[i]} holds token id {max(tokens)}, outside the model's vocabulary "
                                 f"of {vocab}: the tokenizer has tokens the model lacks")
            if n > min(len(tokens) - 1, self.max_length):  # lm-eval refuses it too: only part would be scored
                raise ValueError(f"a continuation of {n} tokens does not fit max_length={self.max_length} "
                                 f"(request {owner[i]}: {self.tokenizer.decode(tokens[-n:][:12])!r}...)")
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results = [None] * len(rows)
        bs = self.batch_size
        for start in tqdm(range(0, len(order), bs), desc=desc, disable=len(order) <= bs, mininterval=5):
            chunk = order[start:start + bs]
            prepared = []
            for i in chunk:
                tokens, n = rows[i]
                inputs, targets = tokens[:-1][-self.max_length:], tokens[1:][-self.max_length:]
                prepared.append((inputs, targets, n))
            length = bucket(max(len(p[0]) for p in prepared), self.buckets)
            width = min(1 << max(max(p[2] for p in prepared) - 1, 7).bit_length(), length)  # >= 8, few shapes
            batch = {k: np.zeros((bs, length), np.int32) for k in ("inputs", "targets", "positions", "segment_ids")}
            batch["loss_positions"] = np.full((bs, width), -1, np.int32)
            for row, (inputs, targets, n) in enumerate(prepared):
                batch["inputs"][row, :len(inputs)] = inputs
                batch["targets"][row, :len(targets)] = targets
                batch["positions"][row, :len(inputs)] = np.arange(len(inputs))
                batch["segment_ids"][row, :len(inputs)] = 1  # padding is segment 0
                batch["loss_positions"][row, :n] = np.arange(len(targets) - n, len(targets))
            logp, greedy = _score(self.graphdef, self.state, jax.tree.map(jnp.asarray, batch))
            logp, greedy = np.asarray(logp), np.asarray(greedy)
            for row, i in enumerate(chunk):
                results[i] = (float(logp[row]), bool(greedy[row]))
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        rows = []
        for request in requests:
            ctx, cont = self._encode_pair(*request.args)
            rows.append((ctx + cont, len(cont)))
        results = self._score_rows(rows, "loglikelihood")
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Each text's log-likelihood after `<s>`, in windows of max_length tokens that predict each token once."""
        rows, owner = [], []
        for k, request in enumerate(requests):
            tokens = self.tok_encode(request.args[0], bos=False)
            for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(
                    tokens, prefix_token=self.bos, max_seq_len=self.max_length, context_len=1)):
                rows.append((ctx + pred, len(pred)))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (logp, _) in zip(owner, self._score_rows(rows, "loglikelihood_rolling", owner)):
            totals[k] += logp
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # --- generation -------------------------------------------------------------------------------------

    def _sampling(self, gen_kwargs: dict) -> tuple:
        """(until, max_gen_toks, temperature, top_k, top_p) as lm-eval's own normalisation reads the task's
        kwargs: max_new_tokens / max_tokens are max_gen_toks, a temperature above 0 without do_sample samples."""
        from lm_eval.models.utils import normalize_gen_kwargs

        kwargs = normalize_gen_kwargs(dict(gen_kwargs or {}), self.max_gen_toks)
        until = [u for u in kwargs.pop("until") if u]
        eos_text = self.tokenizer.decode([self.eos])
        if eos_text not in until:
            until.append(eos_text)
        max_gen = kwargs.pop("max_gen_toks")
        if max_gen >= self.max_length:
            raise ValueError(f"max_gen_toks={max_gen} must be below the model's max_length={self.max_length}")
        temperature = float(kwargs.pop("temperature", 1.0))  # popped either way: greedy tasks carry 0.0
        temperature = temperature if _flag(kwargs.pop("do_sample"), "do_sample") else 0.0
        top_k, top_p = int(kwargs.pop("top_k", 0) or 0), float(kwargs.pop("top_p", 1.0) or 1.0)
        ignored = sorted(set(kwargs) - self._warned)
        if ignored:  # num_beams, repetition_penalty, min_p, ...: said once, not silently dropped
            self._warned.update(ignored)
            log.warning("zephyr_jax ignores these generation settings: %s", ignored)
        return tuple(until), max_gen, temperature, top_k, top_p

    def _request_seed(self, request, occurrences: collections.Counter) -> int:
        """The request's seed, keyed by its task, document, index and prompt, and by how many times the same
        request came before it in this call (lm-eval repeats one instance `repeats` times for several samples):
        lm-eval hands every task's requests over in one list, and a seed from the position in that list gave a
        task's samples other draws when it ran beside other tasks."""
        key = (request.task_name, request.doc_id, request.idx, request.args[0])
        occurrences[key] += 1
        return keyed_seed(self.seed, *key, occurrences[key] - 1)

    def generate_until(self, requests) -> list[str]:
        """Every request on the engine at once (continuous batching over batch_size slots): each stops at its
        own `until` strings, EOS or max_gen_toks, and its prompt keeps its last max_length - max_gen_toks
        tokens."""
        prompts, params, occurrences = [], [], collections.Counter()
        for request in requests:
            until, max_gen, temperature, top_k, top_p = self._sampling(request.args[1])
            keep = max(self.max_length - max_gen, 1)
            prompts.append(self.tok_encode(request.args[0])[-keep:])
            params.append(SamplingParams(max_tokens=max_gen, temperature=temperature, top_k=top_k, top_p=top_p,
                                         seed=self._request_seed(request, occurrences),
                                         stop=tuple(s for s in until if s)))
        done = run(self.model, prompts, params, self.tokenizer, max_slots=self.batch_size, eos_id=self.eos,
                   max_length=self.max_length, progress=len(requests) > self.batch_size)
        results = [r.text for r in done]
        for request, text in zip(requests, results):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return results

    # --- chat templates (lm_eval --apply_chat_template) ---------------------------------------------------

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """lm-eval asks for no generation prompt when the history ends with an assistant prefix (a task's
        gen_prefix, "Answer:"): that turn is continued, as HFLM does, not closed with `</s>`."""
        ends_with_reply = bool(chat_history) and chat_history[-1].get("role") == "assistant"
        continue_final = ends_with_reply and not add_generation_prompt
        return render_chat(self.tokenizer, chat_history, add_generation_prompt=add_generation_prompt,
                           continue_final_message=continue_final)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "") or "mistral-7b-v0.1").replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The template lm-eval records with the results, chosen as HFLM chooses it from a tokenizer's named
        templates (a dict: --apply_chat_template=NAME's, else "default"; lm-eval hashes a string)."""
        template = self.tokenizer.chat_template
        if not isinstance(template, dict):
            return template
        name = chat_template if isinstance(chat_template, str) else "default"
        if name not in template:
            raise ValueError(f"--apply_chat_template={chat_template}: the tokenizer's chat templates are "
                             f"{sorted(template)}, and none is named {name!r}")
        return template[name]

    def get_model_info(self) -> dict:
        return {"model_name": self.pretrained, "max_length": self.max_length, "add_bos_token": self.add_bos_token}


def main(argv=None) -> None:
    """lm_eval's command line, with "zephyr_jax" registered (argv: the arguments after the program name)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    args = sys.argv[1:] if argv is None else list(argv)
    evaluates = args and args[0] not in ("ls", "validate") and not {"-h", "--help"} & set(args)
    if evaluates and not any(a.startswith(("--batch", "-b")) for a in args):
        args += ["--batch_size", "8"]  # this model's default; lm_eval's own (1) scored a row at a time
    sys.argv = [sys.argv[0], *args]
    cli_evaluate()
