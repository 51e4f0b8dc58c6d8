"""Pools of argument values: the plausible and the odd, drawn by a case's generator.

Each ``draw_*`` returns a value (sometimes a sensible one, so calls also succeed and the
model's state moves on) and the pools cover the types a Python caller can pass: None,
bools, negative/zero/huge ints, 2**32 + 1, NaN/inf/5e-324 floats, numpy scalars,
strings with lone surrogates or NULs, bytes, wrong containers.
"""

from __future__ import annotations

import fractions

import numpy as np

NAN = float("nan")
INF = float("inf")

ODD_SCALARS = [
    None,
    True,
    False,
    0,
    -1,
    2**31,
    2**32 + 1,
    2**63,
    -(2**63),
    10**100,
    0.5,
    NAN,
    INF,
    -INF,
    5e-324,
    1e308,
    "1",
    "",
    b"1",
    [1],
    {},
    np.int64(3),
    np.uint64(2**64 - 1),
    np.float32(NAN),
    np.float16(0.5),
    np.bool_(True),
    complex(1, 1),
    fractions.Fraction(1, 3),
    object(),
]

ODD_STRINGS = [
    "",
    " ",
    "hello",
    "\ud800",
    "a\udcffb",
    "\x00",
    "nul\x00inside",
    "<|im_end|>",
    "<|bos|><|eos|>",
    "日本語 🙂 \u202e rtl",
    "e\u0301\u0301\u0301",
    "\r\n\t",
    "x" * 300,
    "word " * 2000,
    b"bytes",
    bytearray(b"ba"),
    None,
    5,
    ["list"],
]


def pick(rng, sensible: list, odd: list, p_odd: float = 0.5):
    return rng.choice(odd) if rng.random() < p_odd else rng.choice(sensible)


def draw_int(rng, sensible, p_odd=0.5):
    odd = [
        0,
        -1,
        -5,
        2**31 - 1,
        2**31,
        2**32 + 1,
        2**63,
        10**100,
        True,
        False,
        1.0,
        2.5,
        NAN,
        "3",
        None,
        np.int64(4),
        np.int32(-1),
        np.uint8(255),
        np.float64(3.0),
        [3],
    ]
    return pick(rng, sensible, odd, p_odd)


def draw_float(rng, sensible, p_odd=0.5):
    odd = [
        0,
        0.0,
        -0.0,
        -1.0,
        5e-324,
        1e-300,
        1e-30,
        1e308,
        2.0**53,
        NAN,
        INF,
        -INF,
        10**400,
        True,
        "0.5",
        None,
        np.float32(0.5),
        np.float16(NAN),
        np.float64(INF),
        complex(0.5, 0),
        fractions.Fraction(1, 2),
        [0.5],
    ]
    return pick(rng, sensible, odd, p_odd)


def draw_text(rng, sensible=("Hello", "The quick brown fox", "1 + 1 ="), p_odd=0.5):
    return pick(rng, list(sensible), ODD_STRINGS, p_odd)


def draw_ids(rng, vocab: int, max_len: int, p_odd=0.5):
    """Token ids: a list, tuple or array of valid ids, or something odd."""
    n = rng.randrange(1, max(2, max_len))
    valid = [rng.randrange(vocab) for _ in range(n)]
    sensible = [
        valid,
        tuple(valid),
        np.array(valid, np.int64),
        np.array(valid, np.int32),
        np.array(valid, np.uint16),
        [np.int64(t) for t in valid],
        np.array(valid + valid, np.int64)[::2],  # a strided view
        [256, *valid][:max_len],
    ]
    odd = [
        [],
        [vocab],
        [-1],
        [2**31],
        [2**63],
        [2**64],
        [1.5],
        [1.0, 2.0],
        ["a"],
        [None],
        [[1, 2]],
        [[1], [2, 3]],
        [True, False],
        np.array(valid, np.float32),
        np.array(valid, np.uint64) + np.uint64(2**63),
        np.array([2**40], np.int64),
        np.array(5),
        np.zeros((2, 2), np.int64),
        np.array([], np.int64),
        "hello",
        b"\x01\x02",
        None,
        5,
        {1, 2},
        {1: 2},
        range(3),
        iter([1, 2]),
        memoryview(b"\x01\x02"),
        [rng.randrange(vocab) for _ in range(max_len + rng.choice([1, 100, 5000]))],
    ]
    return pick(rng, sensible, odd, p_odd)


def draw_stop(rng, p_odd=0.5):
    sensible = [None, None, "\n", ["."], ["xyz", "qq"]]
    odd = ["", [""], [None], 5, ["\ud800"], "x" * 1000, b"a", [[]], [" "] * 1000, ("a",)]
    return pick(rng, sensible, odd, p_odd)


def draw_messages(rng, p_odd=0.5):
    sensible = [
        [{"role": "user", "content": "Hi"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello there"},
        ],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    ]
    odd = [
        [],
        "hello",
        None,
        [None],
        [{}],
        [{"role": "user"}],
        [{"content": "x"}],
        [{"role": 5, "content": 5}],
        [{"role": "user", "content": "\ud800"}],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": ["nested", {"a": 1}]}],
        [{"role": "user", "content": "x" * 20000}],
        [{"role": "user", "content": "hi"}] * 500,
        {"role": "user", "content": "hi"},
        [["user", "hi"]],
        [{"role": "user", "content": "{{ 7 * 7 }}{% for x in range(10**9) %}"}],
    ]
    return pick(rng, sensible, odd, p_odd)


def draw_template_kwargs(rng, p_odd=0.5):
    sensible = [None, {}, {"enable_thinking": False}]
    odd = [
        {"messages": []},
        {"bos_token": "x"},
        {1: 2},
        {"not an identifier": 1},
        "str",
        [("a", 1)],
        {"x": object()},
        {"range": None},
    ]
    return pick(rng, sensible, odd, p_odd)
