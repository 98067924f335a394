"""The arithmetic that bench/decode_step.py's kernel table rests on, checked on made-up kernel timelines."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def decode_step():
    spec = importlib.util.spec_from_file_location("decode_step", BENCH / "decode_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# (start, end, name) sorted by start: b overlaps a's tail, c runs wholly inside b, and a second a follows a gap.
EVENTS = [(0.0, 10.0, "a"), (5.0, 12.0, "b"), (6.0, 8.0, "c"), (20.0, 25.0, "a")]


def test_each_kernel_is_charged_for_how_far_it_moves_the_end(decode_step):
    charged = decode_step.charged_us(EVENTS)
    assert charged == [10.0, 2.0, 0.0, 13.0]  # the gap before the second a is charged to it
    assert sum(charged) == EVENTS[-1][1] - EVENTS[0][0]


def test_an_empty_profile_charges_nothing(decode_step):
    assert decode_step.charged_us([]) == []


def test_kernel_table_sums_launches_busy_and_charged_time_per_step(decode_step):
    table = decode_step.kernel_table(EVENTS, replays=2)
    assert table == {"a": (1.0, 7.5, 11.5), "b": (0.5, 3.5, 1.0), "c": (0.5, 1.0, 0.0)}
