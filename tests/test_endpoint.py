"""data.endpoint over real HTTP on 127.0.0.1 against tests/scripted_server.py: retries by reason match what the
server did, failures are counted replies, the per-URL concurrency bound holds, a fleet shares the load."""

import asyncio
import email.utils
import json
import re
import time

import httpx
import pytest

from tests.scripted_server import ScriptedServer, drop, raw, sleep, status, text
from zephyr_jax.data.backends import Call, CallableBackend, backend_from_spec, map_bounded
from zephyr_jax.data.endpoint import Endpoint, EndpointRefused, retry_after_seconds

RETRY_AFTER = 0.3  # seconds: the one wait a test must really sit through
# The client's timeout where a test needs one to fire: its margin is for a loaded machine, where 1 s once timed out
# every first attempt of a fresh client (CI: 15 timeouts counted where the server slept once).
TIMEOUT = 3.0


def user(content):
    return Call(messages=({"role": "user", "content": content},), temperature=0.0, max_tokens=16)


def content_of(body):
    return body["messages"][-1]["content"] if "messages" in body else body["prompt"]


def run_all(endpoint, calls):
    async def main():
        return await asyncio.gather(*(endpoint.complete(c) for c in calls))

    return asyncio.run(main())


def attempts_by_content(server):
    seen = {}
    for entry in server.log:
        key = content_of(entry["body"])
        seen[key] = max(seen.get(key, 0), entry["attempt"] + 1)
    return seen


def scripted(body, attempt):
    """First attempt by the prompt's prefix; every later attempt a well-formed answer with known usage."""
    c = content_of(body)
    if attempt == 0:
        if c.startswith("rate"):
            return status(429, retry_after=RETRY_AFTER, message="slow down")
        if c.startswith("ms"):
            return status(429, retry_after_ms=RETRY_AFTER * 1000)
        if c.startswith("error"):
            return status(500)
        if c.startswith("slow"):
            return sleep(TIMEOUT + 0.6, text("too late"))
        if c.startswith("drop"):
            return drop()
    return text(f"answer to {c}", prompt_tokens=len(c), completion_tokens=attempt + 2)


def test_retries_by_reason_match_the_server():
    kinds = ["ok"] * 6 + ["rate"] * 2 + ["ms", "error", "error", "slow", "drop", "drop"]
    prompts = [f"{k}-{i}" for i, k in enumerate(kinds)]
    with ScriptedServer(scripted) as server:
        ep = Endpoint("teacher", [server.base_url], timeout=TIMEOUT, backoff=0.01, max_retries=3)
        started = time.monotonic()
        replies = run_all(ep, [user(p) for p in prompts])
        elapsed = time.monotonic() - started
    assert [r.text for r in replies] == [f"answer to {p}" for p in prompts]
    assert all(r.ok and r.finish_reason == "stop" for r in replies)
    counts = server.counts()
    assert counts == {"text": len(prompts), "429": 3, "500": 2, "sleep": 1, "drop": 2}
    assert ep.stats["retry_429"] == counts["429"]
    assert ep.stats["retry_5xx"] == counts["500"]
    assert ep.stats["retry_timeout"] == counts["sleep"]
    assert ep.stats["retry_connection"] == counts["drop"]
    assert ep.stats["retries"] == len(server.log) - len(prompts)
    assert ep.stats["calls"] == len(prompts) and ep.stats["failures"] == 0
    seen = attempts_by_content(server)
    assert [r.attempts for r in replies] == [seen[p] for p in prompts]
    assert [r.attempts for r in replies] == [1 if k == "ok" else 2 for k in kinds]
    # Retry-After (and retry-after-ms) was honoured, not the 0.01 s backoff
    for p in [p for p in prompts if p.startswith(("rate", "ms"))]:
        first, second = [e["time"] for e in server.log if content_of(e["body"]) == p]
        assert second - first >= RETRY_AFTER
    assert elapsed < 10


def test_usage_and_cost_tally():
    prompts = [f"ok-{i}" * (i + 1) for i in range(5)] + ["error-x", "rate-y"]
    with ScriptedServer(scripted) as server:
        ep = Endpoint("teacher", [server.base_url], backoff=0.01, price_per_million=(2.0, 8.0))
        replies = run_all(ep, [user(p) for p in prompts])
    # usage is counted for the answers only (a failed attempt reports none)
    assert ep.stats["prompt_tokens"] == sum(len(p) for p in prompts) == sum(r.prompt_tokens for r in replies)
    expected_completion = sum(2 if p.startswith("ok") else 3 for p in prompts)
    assert ep.stats["completion_tokens"] == expected_completion
    assert ep.cost() == pytest.approx((ep.stats["prompt_tokens"] * 2.0 + expected_completion * 8.0) / 1e6)
    summary = ep.summary()
    assert "2 retries" in summary and "429 1, 5xx 1, timeout 0, connection 0" in summary
    assert f"{ep.cost():.4f}" in summary


def test_always_failing_call_is_a_counted_failure_and_the_run_goes_on():
    def respond(body, attempt):
        c = content_of(body)
        if c == "broken":
            return status(500, message="disk on fire")
        if c == "bad":
            return status(400, message="max_tokens is too large")
        return text(f"fine {c}")

    with ScriptedServer(respond) as server:
        ep = Endpoint("teacher", [server.base_url], backoff=0.01, max_retries=4)
        replies = run_all(ep, [user("a"), user("broken"), user("bad"), user("b")])
    a, broken, bad, b = replies
    assert a.text == "fine a" and b.text == "fine b"
    assert broken.text is None and broken.attempts == 5
    assert "HTTP 500" in broken.error and "disk on fire" in broken.error and server.base_url in broken.error
    assert sum(content_of(e["body"]) == "broken" for e in server.log) == ep.max_retries + 1
    assert bad.text is None and bad.attempts == 1 and "HTTP 400" in bad.error and "max_tokens is too large" in bad.error
    assert server.counts() == {"text": 2, "500": 5, "400": 1}
    assert ep.stats["failures"] == 2 and ep.stats["calls"] == 4
    assert ep.stats["retries"] == ep.stats["retry_5xx"] == 4


def test_unreachable_url_gives_up_with_the_url_in_the_error_and_one_never_reached_stops_the_run():
    with ScriptedServer(lambda body, attempt: text("x")) as server:
        url = server.base_url
        ep = Endpoint("teacher", [url], backoff=0.01, max_retries=2, timeout=2.0)
        assert run_all(ep, [user("hello")])[0].text == "x"
    (reply,) = run_all(ep, [user("anyone there?")])  # it has answered before: a counted failure, the run goes on
    assert reply.text is None and reply.attempts == 3
    assert url in reply.error and "connection" in reply.error
    assert ep.stats["retry_connection"] == 2 and ep.stats["failures"] == 1
    never = Endpoint("teacher", [url], backoff=0.01, max_retries=2, timeout=2.0)  # a wrong port, a server not up
    with pytest.raises(EndpointRefused, match=rf"^teacher: no base URL has answered \({re.escape(url)}\)"):
        run_all(never, [user("anyone there?")])


@pytest.mark.parametrize("answer, named", [
    (status(401, message="bad key"), "HTTP 401: bad key (the API key from $ZJ_TEST_KEY, which is not set)"),
    (status(404, message="no such model"), "HTTP 404: no such model"),
    (raw(json.dumps({"error": {"message": "over quota", "code": "insufficient_quota"}}), code=429),
     "HTTP 429: over quota")], ids=["401", "404", "quota"])
def test_a_status_every_call_would_get_stops_the_run_naming_it(answer, named, monkeypatch):
    """A bad key or model name failed each call on its own (each paid for, with the user simulator's failures only
    counted as truncated dialogues, exit status 0)."""
    monkeypatch.delenv("ZJ_TEST_KEY", raising=False)
    with ScriptedServer(lambda body, attempt: answer) as server:
        ep = Endpoint("teacher", [server.base_url], api_key_env="ZJ_TEST_KEY", backoff=0.01)
        with pytest.raises(EndpointRefused, match=re.escape(f"teacher at {server.base_url}: {named}")):
            run_all(ep, [user("q")])
    assert len(server.log) == 1


def test_an_error_in_a_200_body_is_retried_by_its_code_and_named():
    """Some gateways answer 200 with {"error": {...}}: a 502 there is retried, and its message kept."""
    def respond(body, attempt):
        code = 502 if content_of(body) == "busy" and attempt == 0 else 400 if content_of(body) == "wrong" else None
        return raw(json.dumps({"error": {"message": f"upstream said {code}", "code": code}})) if code else text("ok")

    with ScriptedServer(respond) as server:
        ep = Endpoint("teacher", [server.base_url], backoff=0.01)
        busy, wrong = run_all(ep, [user("busy"), user("wrong")])
    assert busy.text == "ok" and busy.attempts == 2 and ep.stats["retry_5xx"] == 1
    assert wrong.text is None and wrong.attempts == 1 and "upstream said 400" in wrong.error


def test_a_fleet_retries_at_another_replica_and_rests_one_that_failed():
    """A URL that fails fast has no calls in flight, so "fewest in flight" sent retries back to it: with one of two
    replicas down, calls gave up there."""
    with ScriptedServer(lambda body, attempt: text("x")) as dead:
        dead_url = dead.base_url
    with ScriptedServer(lambda body, attempt: sleep(0.05, "up")) as up:
        ep = Endpoint("teacher", [dead_url, up.base_url], concurrency=4, backoff=0.01, max_retries=1)
        first = run_all(ep, [user(f"q{i}") for i in range(12)])
        retries = ep.stats["retries"]
        later = run_all(ep, [user(f"r{i}") for i in range(6)])  # the dead URL rests: none goes there
    assert all(r.text == "up" for r in first + later) and ep.stats["failures"] == 0
    assert 0 < retries == ep.stats["retry_connection"] and ep.stats["retries"] == retries
    assert len(up.log) == 18 and all(r.attempts == 1 for r in later)


def test_a_fleet_whose_replicas_all_failed_backs_off_as_one_url_does():
    with ScriptedServer(lambda body, attempt: text("a")) as one, ScriptedServer(lambda body, attempt: text("b")) as two:
        ep = Endpoint("teacher", [one.base_url, two.base_url], backoff=0.2, max_retries=3)
        assert {r.text for r in run_all(ep, [user("q1"), user("q2")])} == {"a", "b"}
    started = time.monotonic()
    (reply,) = run_all(ep, [user("anyone?")])  # both down now: the second URL at once, then the backoff
    assert reply.text is None and reply.attempts == 4 and time.monotonic() - started >= 0.3


def test_malformed_body_is_a_failure_not_a_crash():
    with ScriptedServer(lambda body, attempt: raw("{not json")) as server:
        ep = Endpoint("teacher", [server.base_url], backoff=0.01)
        (reply,) = run_all(ep, [user("q")])
    assert reply.text is None and "malformed reply" in reply.error and reply.attempts == 1
    assert ep.stats["failures"] == 1 and ep.stats["retries"] == 0


def test_a_wrongly_shaped_200_is_a_failure_and_a_lone_surrogate_is_replaced():
    """The openai client does not validate a 200's shape; each of these would otherwise raise deep in a run."""
    completion = {"choices": [{"index": 0, "text": "hi", "finish_reason": "stop"}]}
    bodies = {"completion to chat": completion, "choices a string": {"choices": "hi"}, "no choices": {},
              "empty choices": {"choices": []},
              "number content": {"choices": [{"index": 0, "message": {"role": "assistant", "content": 5}}]},
              "message a string": {"choices": [{"index": 0, "message": "hi"}]},  # was a successful empty reply
              "surrogate": {"choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": "half \ud83d emoji"}}]},
              "odd usage": {"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
                            "usage": {"prompt_tokens": "many", "completion_tokens": [1]}}}
    respond = lambda body, attempt: raw(json.dumps(bodies[content_of(body)]))  # noqa: E731
    with ScriptedServer(respond) as server:
        ep = Endpoint("teacher", [server.base_url], backoff=0.01)
        replies = dict(zip(bodies, run_all(ep, [user(k) for k in bodies])))
    expected = {"completion to chat": "has no 'message'", "choices a string": "'choices' is str",
                "no choices": "'choices' is NoneType", "number content": "text is int 5, not a string",
                "message a string": "message is str 'hi', not an object with 'content'"}
    for name, error in expected.items():
        reply = replies[name]
        assert reply.text is None and "malformed reply" in reply.error and error in reply.error, (name, reply)
        assert reply.attempts == 1, name
    assert replies["empty choices"].text is None and replies["empty choices"].attempts == 1
    assert replies["empty choices"].error == f"teacher at {server.base_url}: the server's reply has no choices"
    assert replies["surrogate"].text == "half \ufffd emoji"
    assert replies["odd usage"].text == "ok" and replies["odd usage"].prompt_tokens == 0
    assert ep.stats["lone_surrogates_replaced"] == 1 and ep.stats["failures"] == 6
    assert "1 replies with lone surrogates" in ep.summary()


def test_empty_content_is_an_empty_string_and_prompt_calls_use_completions():
    def respond(body, attempt):
        return text(None) if "messages" in body else text(" continued", completion_tokens=1)

    with ScriptedServer(respond) as server:
        ep = Endpoint("teacher", [server.base_url])
        chat = Call(messages=[{"role": "user", "content": "hi"}], seed=7, stop=("</s>",))
        empty, continued = run_all(ep, [chat, Call(prompt="<|user|>\n", max_tokens=8)])
    assert empty.ok and empty.text == ""
    assert continued.text == " continued" and continued.completion_tokens == 1
    by_path = {e["path"]: e["body"] for e in server.log}
    assert set(by_path) == {"/v1/chat/completions", "/v1/completions"}
    assert by_path["/v1/chat/completions"]["seed"] == 7 and by_path["/v1/chat/completions"]["stop"] == ["</s>"]
    assert by_path["/v1/completions"]["prompt"] == "<|user|>\n" and by_path["/v1/completions"]["max_tokens"] == 8
    assert "seed" not in by_path["/v1/completions"] and "stop" not in by_path["/v1/completions"]
    assert by_path["/v1/completions"]["model"] == "teacher"


def test_concurrency_bound_per_url():
    with ScriptedServer(lambda body, attempt: sleep(0.15, "done")) as server:
        ep = Endpoint("teacher", [server.base_url], concurrency=3)
        replies = run_all(ep, [user(f"q{i}") for i in range(12)])
    assert all(r.text == "done" for r in replies)
    assert server.max_in_flight == 3


def test_a_fleet_shares_the_load():
    with ScriptedServer(lambda body, attempt: sleep(0.1, "a")) as one, \
            ScriptedServer(lambda body, attempt: sleep(0.1, "b")) as two:
        ep = Endpoint("teacher", [one.base_url, two.base_url], concurrency=2)
        replies = run_all(ep, [user(f"q{i}") for i in range(8)])
    assert sorted(r.text for r in replies) == ["a"] * 4 + ["b"] * 4
    assert len(one.log) == len(two.log) == 4
    assert one.max_in_flight == two.max_in_flight == 2


def test_works_across_event_loops():
    with ScriptedServer(lambda body, attempt: text("again")) as server:
        ep = Endpoint("teacher", [server.base_url])
        for _ in range(3):  # each asyncio.run is a new loop; the clients of the last one closed with it
            assert run_all(ep, [user("q")])[0].text == "again"

        async def with_aclose():
            async with ep:
                return await ep.complete(user("q"))

        assert asyncio.run(with_aclose()).text == "again"
        ep.close()
    assert ep.stats["calls"] == 4


def test_retry_after_parsing():
    assert retry_after_seconds(httpx.Headers({"retry-after": "2.5"})) == 2.5
    assert retry_after_seconds(httpx.Headers({"retry-after-ms": "250", "retry-after": "9"})) == 0.25
    date = email.utils.formatdate(1_000_030, usegmt=True)
    assert retry_after_seconds(httpx.Headers({"retry-after": date}), now=1_000_000) == pytest.approx(30)
    assert retry_after_seconds(httpx.Headers({"retry-after": "soon"})) is None
    for ms in ("soon", "inf", "nan"):  # an unreadable retry-after-ms leaves Retry-After to decide
        assert retry_after_seconds(httpx.Headers({"retry-after-ms": ms, "retry-after": "2"})) == 2.0, ms
    assert retry_after_seconds(httpx.Headers({"retry-after-ms": "-5"})) == 0.0
    assert retry_after_seconds(httpx.Headers({"retry-after": "inf"})) is None
    no_zone = email.utils.formatdate(1_000_030)[:-6]  # a date without its GMT is no HTTP date
    assert retry_after_seconds(httpx.Headers({"retry-after": no_zone}), now=1_000_000) is None
    assert retry_after_seconds(httpx.Headers({})) is None
    assert retry_after_seconds(None) is None


def test_backend_from_spec_and_bad_specs(monkeypatch):
    monkeypatch.setenv("MY_KEY", "secret")
    ep = backend_from_spec("endpoint:org/model-7b@http://a:8000/v1,https://b/v1", api_key_env="MY_KEY",
                           concurrency=5, max_retries=2, timeout=9)
    assert isinstance(ep, Endpoint) and ep.name == "org/model-7b"
    assert ep.base_urls == ["http://a:8000/v1", "https://b/v1"]
    assert (ep.concurrency, ep.max_retries, ep.timeout, ep.api_key_env) == (5, 2, 9.0, "MY_KEY")
    for spec in ["endpoint:model", "endpoint:@http://a/v1", "endpoint:model@"]:
        with pytest.raises(ValueError, match="endpoint:MODEL@URL"):
            backend_from_spec(spec)
    with pytest.raises(ValueError, match="'ftp://a/v1' is not an http"):
        backend_from_spec("endpoint:model@http://a/v1,ftp://a/v1")
    with pytest.raises(ValueError, match="'localhost:8000' is not an http"):
        Endpoint("m", ["localhost:8000"])
    with pytest.raises(ValueError, match="concurrency"):
        Endpoint("m", ["http://a/v1"], concurrency=0)
    # The CLIs' --timeout / --max_retries reach these: each refused with its value
    for options, message in (({"max_retries": -1}, "max_retries must be at least 0, got -1"),
                             ({"timeout": 0}, "timeout must be positive, got 0"),
                             ({"timeout": float("nan")}, "timeout must be positive, got nan"),
                             ({"backoff": -1.0}, "backoff and max_backoff must be non-negative, got -1.0, 60.0")):
        with pytest.raises(ValueError, match=re.escape(message)):
            Endpoint("m", ["http://a/v1"], **options)
    with pytest.raises(ValueError, match="an endpoint needs a model name"):
        Endpoint("", ["http://a/v1"])
    with pytest.raises(ValueError, match="endpoint 'm' needs at least one base URL"):
        Endpoint("m", " , ")
    for spec, message in (("gpt-4o", "unknown backend spec 'gpt-4o': expected endpoint:MODEL@URL[,URL...]"),
                          ("engine:", "unknown backend spec 'engine:'"),
                          ("callable:os", "'os' is not 'module:function'"),
                          ("callable:os:sep", "'os:sep' is not callable")):
        with pytest.raises(ValueError, match=re.escape(message)):
            backend_from_spec(spec)


# --- Found by mutation testing: retries, resting URLs, rotation and usage that were untested. ---

def test_408_is_retried_as_a_timeout():
    with ScriptedServer(lambda body, attempt: status(408) if attempt == 0 else text("ok")) as server:
        ep = Endpoint("teacher", [server.base_url], backoff=0.01, max_retries=2)
        (reply,) = run_all(ep, [user("q")])
    assert reply.text == "ok" and reply.attempts == 2 and ep.stats["retry_timeout"] == 1


def test_a_429_does_not_rest_the_url():
    def respond(body, attempt):
        return status(429, retry_after=0.05) if body["messages"][-1]["content"] == "first" and attempt == 0 \
            else text("ok")
    with ScriptedServer(respond) as one, ScriptedServer(lambda body, attempt: text("ok")) as two:
        ep = Endpoint("teacher", [one.base_url, two.base_url], backoff=0.01, max_retries=2)
        (first,) = run_all(ep, [user("first")])  # 429 at one, then answered at two
        assert len(one.log) == 1
        assert first.text == "ok"
        n_one = len(one.log)
        later = [run_all(ep, [user(f"q{i}")])[0] for i in range(4)]  # one at a time
    assert all(r.text == "ok" for r in later)
    assert len(one.log) - n_one > 0, "the URL that answered 429 got no later call: it was rested"


def test_sequential_calls_rotate_over_a_fleet():
    with ScriptedServer(lambda body, attempt: text("a")) as one, ScriptedServer(lambda body, attempt: text("b")) as two:
        ep = Endpoint("teacher", [one.base_url, two.base_url])

        async def one_at_a_time():
            return [await ep.complete(user(f"q{i}")) for i in range(4)]
        replies = asyncio.run(one_at_a_time())
    assert sorted(r.text for r in replies) == ["a", "a", "b", "b"]


def test_a_retry_after_a_429_goes_to_another_url():
    """429 does not rest a URL, and a URL that answers 429 fast has the fewest calls in flight: without `avoid`
    every retry went back to it."""
    with ScriptedServer(lambda body, attempt: status(429, retry_after=0.01)) as limited, \
            ScriptedServer(lambda body, attempt: sleep(0.2, "ok")) as fine:
        ep = Endpoint("teacher", [limited.base_url, fine.base_url], backoff=0.01, max_retries=1)
        replies = run_all(ep, [user(f"q{i}") for i in range(8)])
    assert all(r.text == "ok" for r in replies), [r.error for r in replies if not r.ok]


def test_a_url_that_answers_again_stops_resting():
    def respond(body, attempt):
        return drop() if body["messages"][-1]["content"] == "a" and attempt == 0 else text("ok")
    with ScriptedServer(respond) as one, ScriptedServer(respond) as two:
        ep = Endpoint("teacher", [one.base_url, two.base_url], backoff=0.01, max_retries=3)
        (a,) = run_all(ep, [user("a")])  # one drops, two drops (both rest), then one answers: it is up again
        assert a.text == "ok" and a.attempts == 3
        n_two = len(two.log)

        async def one_at_a_time():
            return [await ep.complete(user(f"b{i}")) for i in range(4)]
        later = asyncio.run(one_at_a_time())
    assert all(r.text == "ok" for r in later)
    assert len(two.log) == n_two, "calls went to the URL still resting, though the other had answered"


def test_retry_after_is_cut_to_max_backoff():
    with ScriptedServer(lambda body, attempt: status(429, retry_after=20) if attempt == 0 else text("ok")) as server:
        ep = Endpoint("teacher", [server.base_url], max_backoff=0.2)
        started = time.monotonic()
        (reply,) = run_all(ep, [user("q")])
    assert reply.text == "ok" and time.monotonic() - started < 5


def test_negative_usage_counts_as_zero():
    with ScriptedServer(lambda body, attempt: text("ok", prompt_tokens=-5, completion_tokens=-2)) as server:
        ep = Endpoint("teacher", [server.base_url])
        (reply,) = run_all(ep, [user("q")])
    assert reply.text == "ok" and (reply.prompt_tokens, reply.completion_tokens) == (0, 0)
    assert ep.stats["prompt_tokens"] == ep.stats["completion_tokens"] == 0


def _counting_in_flight(result):
    """(an async function that sleeps a moment and returns result(x), the most calls it had in flight at once)."""
    state = {"now": 0, "max": 0}

    async def fn(x):
        state["now"] += 1
        state["max"] = max(state["max"], state["now"])
        await asyncio.sleep(0.01)
        state["now"] -= 1
        return result(x)

    return fn, state


def test_a_callable_backend_holds_its_concurrency_for_async_functions():
    fn, state = _counting_in_flight(lambda call: "ok")
    backend = CallableBackend(fn, concurrency=3)

    async def main():
        return await asyncio.gather(*(backend.complete(user(str(i))) for i in range(12)))
    assert all(r.text == "ok" for r in asyncio.run(main())) and state["max"] == 3
    # A function that returns something else (None, a dict): that call fails, named, and the run goes on
    odd = asyncio.run(CallableBackend(lambda call: {"text": "ok"}, name="checker").complete(user("q")))
    assert odd.text is None and odd.error == "checker returned dict, not str or Reply"


def test_map_bounded_holds_its_concurrency():
    fn, state = _counting_in_flight(lambda x: x * 2)
    assert asyncio.run(map_bounded(fn, range(10), 3, "t")) == [x * 2 for x in range(10)] and state["max"] == 3
