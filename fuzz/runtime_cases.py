"""Runtime-argument cases: the Python API called with odd values, alone or from threads.

A case loads a cached artifact (``fp32.so`` or ``int8.so``) and makes 1-6 calls among
load / generate / stream / forward / chat / encode / rewind / reset / close, each with
arguments from the pools of ``fuzz.values``. Every call must succeed with a sane
result or raise a clean ``SparsecError``. Checked on success:

- generate/stream/chat: token ids in the vocabulary, at most max_new_tokens, a valid
  finish reason, the streamed pieces join to the text; when the arguments mean greedy
  (temperature 0, or top_k 1) and no stop/penalty is set, the tokens equal a greedy
  loop over ``forward`` on a second Model of the same file;
- forward: the logits equal that second Model's on the same cached tokens (the case
  tracks what the cache holds across generate, rewind and reset);
- position after each call; the arguments passed are not modified (``overwrote``);
- after the calls (and any errors), reset + forward(FIXED_IDS) gives the reference.

Concurrency cases run 2-4 threads on one Model at once (generate, stream, chat,
forward, reset, rewind, close, a load of their own): each call must return the
correct result or raise a clean SparsecError within seconds; the Model must then
still work (unless closed).
"""

from __future__ import annotations

import math
import pickle
import threading
import time

import numpy as np

from fuzz import values as V
from fuzz.common import FIXED_IDS, compare_logits
from fuzz.runner import ERROR, HANG, OK, TRACEBACK, WRONG, Finding, clean_message

NAME = "runtime"
TIMEOUT = 60.0
SHARE = 0.22
ESTIMATE = 0.2
THREAD_DEADLINE = 20.0

KINDS = {"calls": 12, "load_args": 2, "closed": 1, "concurrency": 2}
OPS = {
    "generate": 5,
    "stream": 3,
    "forward": 5,
    "chat": 3,
    "encode": 1,
    "rewind": 2,
    "reset": 1,
    "position": 1,
}
EOS_FINISH = ("eos", "stop", "length")


class Session:
    """The model under test, a second Model for references, and what its cache holds."""

    def __init__(self, ctx, base: str):
        from sparsec import runtime

        self.ctx, self.base = ctx, base
        self.path = ctx.artifact(base)
        self.model = runtime.load(self.path)
        self._ref = None
        self.tokens: list[int] | None = []  # None: unknown after an error
        self.closed = False
        self.vocab = self.model.vocab_size
        self.eos = set(ctx.eos[base])
        self.notes: list[str] = []

    @property
    def ref(self):
        if self._ref is None:
            from sparsec import runtime

            self._ref = runtime.load(self.path)
        return self._ref

    def ref_logits(self, tokens: list[int]) -> np.ndarray:
        self.ref.reset()
        return self.ref.forward(tokens)

    def ref_greedy(self, prompt: list[int], n: int) -> list[int]:
        ref = self.ref
        ref.reset()
        logits = ref.forward(prompt, all_logits=False)
        out: list[int] = []
        while True:
            token = int(np.argmax(logits))
            out.append(token)
            if token in self.eos or len(out) == n:
                return out
            logits = ref.forward([token], all_logits=False)


def _snapshot(value):
    try:
        return pickle.dumps(value)
    except Exception:  # noqa: BLE001 - unpicklable (generators, object()): not compared
        return None


def _check_inputs(before: list, values: list, call: str) -> None:
    for snap, value in zip(before, values, strict=True):
        if snap is not None and _snapshot(value) != snap:
            raise Finding("overwrote", f"{call} modified its argument {value!r:.200}")


def _greedy_args(kwargs: dict) -> bool:
    t, k = kwargs.get("temperature", 0.0), kwargs.get("top_k")
    plain = kwargs.get("repetition_penalty") is None and kwargs.get("stop") is None
    if not plain or kwargs.get("top_p") not in (None,):
        return False
    if type(t) in (int, float) and t == 0 and type(k) in (int, type(None)):
        return k is None or (type(k) is int and k >= 1)
    if type(t) in (int, float) and math.isfinite(t) and t > 0 and type(k) is int and k == 1:
        return True
    return False


def _check_generation(s: Session, result, kwargs: dict, call: str, prompt_ids=None) -> None:
    from sparsec.runtime import Generation

    if not isinstance(result, Generation):
        raise Finding(WRONG, f"{call} returned {type(result).__name__}, not a Generation")
    ids = result.token_ids
    if not ids or not all(type(t) is int and 0 <= t < s.vocab for t in ids):
        raise Finding(WRONG, f"{call}: token ids {ids[:20]} outside [0, {s.vocab})")
    max_new = int(kwargs.get("max_new_tokens", 128))
    if len(ids) > max_new:
        raise Finding(WRONG, f"{call}: {len(ids)} tokens > max_new_tokens {max_new}")
    if result.finish_reason not in EOS_FINISH:
        raise Finding(WRONG, f"{call}: finish_reason {result.finish_reason!r}")
    if result.finish_reason == "length" and len(ids) != max_new:
        raise Finding(WRONG, f"{call}: finish 'length' after {len(ids)} of {max_new} tokens")
    if result.finish_reason == "eos" and ids[-1] not in s.eos:
        raise Finding(WRONG, f"{call}: finish 'eos' but the last token is {ids[-1]}")
    if not isinstance(result.text, str):
        raise Finding(WRONG, f"{call}: text is {type(result.text).__name__}")
    prompt = list(result.prompt_token_ids)
    if prompt_ids is not None and prompt != [int(t) for t in prompt_ids]:
        raise Finding(WRONG, f"{call}: prompt_token_ids {prompt[:10]} differ from the prompt")
    if _greedy_args(kwargs) and len(prompt) + max_new <= s.model.max_context:
        want = s.ref_greedy(prompt, max_new)
        if ids != want[: len(ids)] or (len(ids) < len(want) and result.finish_reason != "stop"):
            raise Finding(WRONG, f"{call}: greedy tokens {ids} != reference {want}")


def _gen_kwargs(rng, s: Session) -> dict:
    kwargs: dict = {}
    p = rng.choice([0.0, 0.2, 0.5])
    if rng.random() < 0.8:
        kwargs["max_new_tokens"] = V.draw_int(rng, [1, 2, 5, 12], p)
    if rng.random() < 0.6:
        kwargs["temperature"] = V.draw_float(rng, [0.0, 0.0, 0.7, 1.0, 1.5], p)
    if rng.random() < 0.3:
        kwargs["top_k"] = V.draw_int(rng, [None, 1, 5, 40, s.vocab, s.vocab + 1], p)
    if rng.random() < 0.3:
        kwargs["top_p"] = V.draw_float(rng, [None, 0.9, 0.5, 1.0], p)
    if rng.random() < 0.3:
        kwargs["seed"] = V.draw_int(rng, [None, 0, 1, 12345], p)
    if rng.random() < 0.2:
        kwargs["repetition_penalty"] = V.draw_float(rng, [None, 1.0, 1.2, 0.8], p)
    if rng.random() < 0.2:
        kwargs["stop"] = V.draw_stop(rng, p)
    return kwargs


def _prompt(rng, s: Session):
    if rng.random() < 0.5:
        return V.draw_text(rng, p_odd=rng.choice([0.1, 0.5]))
    return V.draw_ids(rng, s.vocab, 12, p_odd=rng.choice([0.1, 0.5]))


def _call(s: Session, name: str, fn, args: list, kwargs: dict):
    """Run one call: (result, None) or (None, clean message); anything else raises."""
    from sparsec.errors import SparsecError

    inputs = list(args) + list(kwargs.values())
    before = [_snapshot(v) for v in inputs]
    position = None if s.closed else s.model.position
    start = time.monotonic()
    try:
        result = fn(*args, **kwargs)
    except SparsecError as exc:
        outcome, detail = clean_message(exc)
        if outcome != ERROR:
            raise Finding(outcome, f"{name}: {detail}") from None
        _check_inputs(before, inputs, name)
        if not s.closed and s.model.position != position:
            s.tokens = None  # a failed call moved the cache: no longer known
        return None, detail
    if time.monotonic() - start > THREAD_DEADLINE:
        raise Finding(HANG, f"{name} took {time.monotonic() - start:.0f} s")
    _check_inputs(before, inputs, name)
    return result, None


def op_generate(rng, s: Session, stream: bool):
    prompt = _prompt(rng, s)
    kwargs = _gen_kwargs(rng, s)
    call = f"{'stream' if stream else 'generate'}({prompt!r:.80}, {kwargs!r:.300})"
    if stream:
        kwargs["stream"] = True
    result, err = _call(s, call, s.model.generate, [prompt], kwargs)
    if err is not None:
        return call, err
    if stream:
        pieces = []
        for piece in result:
            if not isinstance(piece, str):
                raise Finding(WRONG, f"{call}: streamed a {type(piece).__name__}")
            pieces.append(piece)
        gen = result.result
        if "".join(pieces) != gen.text:
            raise Finding(WRONG, f"{call}: streamed pieces do not join to the text")
        result = gen
    ids = prompt if not isinstance(prompt, str | bytes | bytearray) else None
    if ids is not None:
        ids = np.asarray(ids).reshape(-1).tolist()
    _check_generation(s, result, kwargs, call, ids)
    _after_generation(s, result, call)
    return call, None


def _after_generation(s: Session, result, call: str) -> None:
    steps = result.stats.decode_steps
    expected = len(result.prompt_token_ids) + steps
    if s.model.position != expected:
        raise Finding(WRONG, f"{call}: position {s.model.position}, expected {expected}")
    s.tokens = list(result.prompt_token_ids) + list(result.token_ids[:steps])


def op_chat(rng, s: Session):
    messages = V.draw_messages(rng, rng.choice([0.2, 0.6]))
    kwargs = _gen_kwargs(rng, s)
    extra = {}
    if rng.random() < 0.3:
        extra["template_kwargs"] = V.draw_template_kwargs(rng)
    if rng.random() < 0.2:
        extra["add_generation_prompt"] = V.pick(rng, [True, False], [None, 0, "no"])
    if rng.random() < 0.05:
        kwargs["not_an_argument"] = 1  # chat() documents a clean error for these
    call = f"chat({messages!r:.120}, {kwargs!r:.200}, {extra!r:.100})"
    result, err = _call(s, call, s.model.chat, [messages], {**kwargs, **extra})
    if err is not None:
        return call, err
    _check_generation(s, result, kwargs, call)
    _after_generation(s, result, call)
    return call, None


def op_forward(rng, s: Session):
    room = max(1, s.model.max_context - s.model.position)
    ids = V.draw_ids(rng, s.vocab, min(room, 20), p_odd=rng.choice([0.1, 0.4]))
    kwargs = {}
    if rng.random() < 0.5:
        kwargs["all_logits"] = V.pick(rng, [True, False], [None, 0, 1, "no", np.bool_(False)])
    call = f"forward({ids!r:.120}, {kwargs!r})"
    position = s.model.position
    result, err = _call(s, call, s.model.forward, [ids], kwargs)
    if err is not None:
        return call, err
    flat = [int(t) for t in np.asarray(ids).reshape(-1)]
    n = len(flat)
    if s.model.position != position + n:
        raise Finding(WRONG, f"{call}: position {s.model.position}, expected {position + n}")
    all_logits = kwargs.get("all_logits", True)
    shape = (n, s.vocab) if all_logits else (s.vocab,)
    if not isinstance(result, np.ndarray) or result.shape != shape:
        got = getattr(result, "shape", type(result).__name__)
        raise Finding(WRONG, f"{call}: result {got}, expected shape {shape}")
    if s.tokens is not None:
        want = s.ref_logits(s.tokens + flat)[-n:]
        # int8: another chunking of the same tokens may round one activation the other
        # way (one int8 step, up to ~0.1 in the logits; tests/codegen/test_compile_e2e.py)
        atol = 1e-4 if s.model.manifest.get("precision") == "fp32" else 0.2
        got = result if all_logits else result[None]
        compare_logits(got, want if all_logits else want[-1:], call, atol=atol)
        s.tokens = s.tokens + flat
    return call, None


def op_encode(rng, s: Session):
    text = V.draw_text(rng, p_odd=0.6)
    kwargs = {}
    if rng.random() < 0.3:
        kwargs["add_special_tokens"] = V.pick(rng, [True, False], [None, "yes", 2])
    call = f"encode({text!r:.80}, {kwargs!r})"
    result, err = _call(s, call, s.model.encode, [text], kwargs)
    if err is None and not (
        isinstance(result, list) and all(type(t) is int and 0 <= t < s.vocab for t in result)
    ):
        raise Finding(WRONG, f"{call}: returned {result!r:.200}")
    return call, err


def op_rewind(rng, s: Session):
    pos = s.model.position
    target = V.draw_int(rng, [0, pos, max(0, pos - 1), pos // 2], rng.choice([0.1, 0.5]))
    call = f"rewind({target!r})"
    _, err = _call(s, call, s.model.rewind, [target], {})
    if err is None:
        if s.model.position != int(target):
            raise Finding(WRONG, f"{call}: position {s.model.position}")
        if s.tokens is not None:
            s.tokens = s.tokens[: int(target)]
    return call, err


def op_reset(rng, s: Session):
    _, err = _call(s, "reset()", s.model.reset, [], {})
    if err is None:
        if s.model.position != 0:
            raise Finding(WRONG, f"reset(): position {s.model.position}")
        s.tokens = []
    return "reset()", err


def op_position(rng, s: Session):
    pos = s.model.position
    if type(pos) is not int or not 0 <= pos <= s.model.max_context:
        raise Finding(WRONG, f"position is {pos!r}")
    if s.tokens is not None and pos != len(s.tokens):
        raise Finding(WRONG, f"position {pos}, but {len(s.tokens)} tokens were cached")
    repr(s.model)
    return "position", None


def run_op(rng, s: Session, op: str):
    if op == "generate":
        return op_generate(rng, s, stream=False)
    if op == "stream":
        return op_generate(rng, s, stream=True)
    return {
        "forward": op_forward,
        "chat": op_chat,
        "encode": op_encode,
        "rewind": op_rewind,
        "reset": op_reset,
        "position": op_position,
    }[op](rng, s)


def health_check(s: Session, after: str) -> None:
    if s.closed:
        return
    from sparsec.errors import SparsecError

    try:
        s.model.reset()
        got = s.model.forward(FIXED_IDS)
    except SparsecError as exc:
        raise Finding(WRONG, f"the model no longer works after {after}: {exc}") from None
    try:
        compare_logits(got, s.ctx.refs[s.base], f"forward(FIXED_IDS) after {after}")
    except Finding as f:
        raise Finding(WRONG, f.detail) from None


# --------------------------------------------------------------------------- cases


def run(rng, ctx, workdir, rep):
    kind = rng.choices(list(KINDS), list(KINDS.values()))[0]
    base = rng.choices(["fp32", "int8"], [3, 1])[0]
    if kind == "load_args":
        return _load_args(rng, ctx, workdir, rep, base)
    if kind == "concurrency":
        return _concurrency(rng, ctx, rep, base)
    ops = [rng.choices(list(OPS), list(OPS.values()))[0] for _ in range(rng.randint(1, 6))]
    close_at = rng.randrange(len(ops) + 1) if kind == "closed" else None
    rep.describe(
        kind,
        f"{base}: {' '.join(ops)}"
        + (f", close before op {close_at}" if close_at is not None else ""),
    )
    s = Session(ctx, base)
    log, errors = [], 0
    for i, op in enumerate(ops):
        if i == close_at:
            s.model.close()
            s.closed = True
        if s.closed:
            call, err = _after_close(rng, s, op)
        else:
            call, err = run_op(rng, s, op)
        log.append(call + (f" -> error: {err}" if err else " -> ok"))
        errors += err is not None
    health_check(s, "; ".join(c.split("(")[0] for c in log))
    detail = " | ".join(log)
    return (ERROR if errors else OK), detail


def _after_close(rng, s: Session, op: str):
    """Every call on a closed model but encode/position raises a clean error."""
    from sparsec.errors import SparsecError

    fns = {
        "generate": lambda: s.model.generate("hi", max_new_tokens=2),
        "stream": lambda: list(s.model.generate("hi", max_new_tokens=2, stream=True)),
        "forward": lambda: s.model.forward([1, 2]),
        "chat": lambda: s.model.chat([{"role": "user", "content": "hi"}], max_new_tokens=2),
        "rewind": lambda: s.model.rewind(0),
        "reset": lambda: s.model.reset(),
        "encode": lambda: s.model.encode("hi"),
        "position": lambda: s.model.position,
    }
    try:
        fns[op]()
    except SparsecError as exc:
        outcome, detail = clean_message(exc)
        if outcome != ERROR:
            raise Finding(outcome, f"{op} after close: {detail}") from None
        return f"{op} after close", detail
    if op not in ("encode", "position", "reset"):
        raise Finding(WRONG, f"{op} after close() succeeded")
    return f"{op} after close", None


def _load_args(rng, ctx, workdir, rep, base):
    from sparsec import runtime

    path = ctx.artifact(base)
    kwargs = {}
    if rng.random() < 0.7:
        kwargs["threads"] = V.draw_int(rng, [None, 1, 2, 3], 0.6)
    if rng.random() < 0.4:
        kwargs["verify"] = V.pick(rng, [True, False], [None, 0, "no", np.bool_(True)])
    if rng.random() < 0.4:
        kwargs["huge_pages"] = V.pick(rng, [None, False, True], [0, "yes", 2])
    target = path
    if rng.random() < 0.25:
        target = rng.choice(
            [str(path), bytes(str(path), "utf-8"), None, 5, "", "\ud800.so", [str(path)]]
            + [path.parent, "/", "relative/missing.so"]
        )
    rep.describe("load_args", f"load({target!r:.100}, {kwargs!r:.200})")
    before = _snapshot(kwargs)
    try:
        model = runtime.load(target, **kwargs)
    except Exception as exc:  # noqa: BLE001 - classified (clean SparsecError or not)
        outcome, detail = clean_message(exc)
        return outcome, detail
    if _snapshot(kwargs) != before:
        raise Finding("overwrote", "load() modified its arguments")
    with model:
        threads = kwargs.get("threads")
        if threads is not None and model.threads != int(threads):
            raise Finding(WRONG, f"threads={threads!r} loaded with {model.threads} threads")
        got = model.forward(FIXED_IDS)
        compare_logits(got, ctx.refs[base], "forward after load")
    return OK, f"loaded with {model.threads} threads, {model.weights_memory}"


def _concurrency(rng, ctx, rep, base):
    from sparsec.errors import SparsecError

    n = rng.randint(2, 4)
    kinds = ["generate", "stream", "chat", "forward", "reset", "rewind", "close", "load_own"]
    weights = [5, 4, 2, 3, 1, 1, 1, 1]
    plan = [rng.choices(kinds, weights)[0] for _ in range(n)]
    prompts = [
        rng.choice([[256, 40, 69, 76, 76, 79], [256, 5, 6], "Hello", "The fox"]) for _ in plan
    ]
    max_new = [rng.choice([4, 8, 16]) for _ in plan]
    rep.describe("concurrency", f"{base}: {n} threads at once: {', '.join(plan)}")
    s = Session(ctx, base)
    model = s.model
    # References first (the second model, before any thread starts).
    refs = {}
    for i, op in enumerate(plan):
        if op in ("generate", "stream", "load_own"):
            prompt = prompts[i]
            ids = model.encode(prompt) if isinstance(prompt, str) else prompt
            refs[i] = s.ref_greedy(ids, max_new[i])
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def work(i: int, op: str) -> None:
        start = time.monotonic()
        try:
            barrier.wait(timeout=10)
            if op == "generate":
                got = model.generate(prompts[i], max_new_tokens=max_new[i]).token_ids
                verdict = (OK, "") if got == refs[i][: len(got)] else (WRONG, f"{got} != {refs[i]}")
            elif op == "stream":
                stream = model.generate(prompts[i], max_new_tokens=max_new[i], stream=True)
                text = "".join(stream)
                got = stream.result.token_ids
                if got != refs[i][: len(got)] or text != stream.result.text:
                    verdict = (WRONG, f"stream tokens {got} != {refs[i]}")
                else:
                    verdict = (OK, "")
            elif op == "chat":
                model.chat([{"role": "user", "content": "hi"}], max_new_tokens=max_new[i])
                verdict = (OK, "")
            elif op == "forward":
                out = model.forward([1, 2, 3])
                ok = out.shape == (3, model.vocab_size) and np.isfinite(out).all()
                verdict = (OK, "") if ok else (WRONG, f"forward gave {out.shape}, finite={ok}")
            elif op == "reset":
                model.reset()
                verdict = (OK, "")
            elif op == "rewind":
                model.rewind(0)
                verdict = (OK, "")
            elif op == "close":
                model.close()
                verdict = (OK, "")
            else:
                from sparsec import runtime

                with runtime.load(s.path) as own:
                    got = own.generate(prompts[i], max_new_tokens=max_new[i]).token_ids
                verdict = (OK, "") if got == refs[i] else (WRONG, f"own load {got} != {refs[i]}")
        except SparsecError as exc:
            verdict = clean_message(exc)
        except BaseException as exc:  # noqa: BLE001 - classified as a traceback
            verdict = clean_message(exc)
        seconds = time.monotonic() - start
        if seconds > THREAD_DEADLINE:
            verdict = (HANG, f"took {seconds:.0f} s")
        results[i] = verdict

    threads = [
        threading.Thread(target=work, args=(i, op), daemon=True) for i, op in enumerate(plan)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + THREAD_DEADLINE + 10
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [plan[i] for i, t in enumerate(threads) if t.is_alive()]
    if stuck:
        raise Finding(
            HANG, f"thread(s) still running {', '.join(stuck)} after {THREAD_DEADLINE + 10:.0f} s"
        )
    summary = "; ".join(
        f"{op}: {o}{' ' + d[:150] if d else ''}" for op, (o, d) in zip(plan, results, strict=True)
    )
    for outcome in (TRACEBACK, WRONG, HANG):
        if any(o == outcome for o, _ in results):
            raise Finding(outcome, summary)
    s.closed = "close" in plan
    health_check(s, "the concurrent calls")
    errors = any(o == ERROR for o, _ in results)
    return (ERROR if errors else OK), summary
