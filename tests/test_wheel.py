"""Tests for changeloop._wheel: deadlines on one loop timer, on a fake clock (no sockets, no sleep).

The wheel's promise: an item's callback runs once the clock passed its deadline, at most one
``resolution`` late and never early; setting a deadline again moves it, discarding removes it;
callbacks may set or discard anything; an empty wheel leaves no timer behind (so ``run()``
returns); and the wheel does not keep its loop alive.
"""

import gc
import weakref
from typing import Dict, Iterator, List, Optional, Tuple

import pytest
from couch3 import FakeClock
from hypothesis import example, given, settings
from hypothesis import strategies as st

from changeloop._wheel import DeadlineWheel
from changeloop.loop import Loop

pytestmark = pytest.mark.timeout(10)


Clocked = Tuple[Loop, FakeClock]


@pytest.fixture
def clocked() -> Iterator[Clocked]:
    """A loop on a clock that moves only when a test says so."""
    clock = FakeClock()
    with Loop(clock=clock) as loop:
        yield loop, clock


def step_to(loop: Loop, clock: FakeClock, when: float) -> None:
    clock.now = when
    loop.run_once(0)


def test_a_deadline_is_met_within_one_resolution_and_never_early(clocked: Clocked) -> None:
    loop, clock = clocked
    fired: List[Tuple[str, float]] = []
    wheel: DeadlineWheel[str] = DeadlineWheel(loop, lambda item: fired.append((item, clock.now)))
    wheel.set("a", 1000.42)
    deadline = wheel.deadline("a")
    assert deadline is not None and 1000.42 <= deadline <= 1000.42 + 0.1
    step_to(loop, clock, 1000.41)
    assert fired == []
    step_to(loop, clock, deadline)
    assert fired == [("a", deadline)]
    assert len(wheel) == 0 and "a" not in wheel and wheel.deadline("a") is None


def test_setting_again_moves_and_discard_removes(clocked: Clocked) -> None:
    loop, clock = clocked
    fired: List[str] = []
    wheel: DeadlineWheel[str] = DeadlineWheel(loop, fired.append)
    wheel.set("moved", 1001.0)
    wheel.set("moved", 1005.0)  # pushed back, as a watchdog is on activity
    wheel.set("dropped", 1001.0)
    wheel.discard("dropped")
    wheel.discard("never-set")  # no error
    step_to(loop, clock, 1002.0)
    assert fired == []
    step_to(loop, clock, 1005.1)
    assert fired == ["moved"]


def test_an_earlier_deadline_than_the_timers_is_met(clocked: Clocked) -> None:
    loop, clock = clocked
    fired: List[str] = []
    wheel: DeadlineWheel[str] = DeadlineWheel(loop, fired.append)
    wheel.set("late", 1030.0)
    wheel.set("early", 1001.0)  # the loop timer must move forward for it
    step_to(loop, clock, 1001.1)
    assert fired == ["early"]


def test_an_emptied_wheel_leaves_no_timer_so_run_returns(clocked: Clocked) -> None:
    loop, clock = clocked
    wheel: DeadlineWheel[str] = DeadlineWheel(loop, lambda item: None)
    wheel.set("a", 1060.0)
    assert loop.next_timeout() is not None
    wheel.discard("a")
    assert loop.next_timeout() is None
    loop.run()  # returns at once: nothing pending
    wheel.set("b", 1001.0)  # and a later deadline is timed again
    step_to(loop, clock, 1001.1)
    assert len(wheel) == 0


def test_callbacks_may_set_and_discard_any_item(clocked: Clocked) -> None:
    loop, clock = clocked
    fired: List[str] = []
    wheel: DeadlineWheel[str] = DeadlineWheel(loop, lambda item: on_due(item))

    def on_due(item: str) -> None:
        fired.append(item)
        if item == "rearm":
            wheel.set("rearm", clock.now + 5.0)  # a watchdog that saw activity
        if item in ("a", "b"):
            wheel.discard("b" if item == "a" else "a")  # whichever came first drops the other
        if item == "past":
            wheel.set("past", clock.now - 100.0)  # in the past: waits for the next firing

    for item in ("rearm", "a", "b", "past"):
        wheel.set(item, 1001.0)
    step_to(loop, clock, 1001.0)
    assert sorted(fired) in (["a", "past", "rearm"], ["b", "past", "rearm"])
    fired.clear()
    step_to(loop, clock, 1001.0)  # not in a pass at the same time: no busy loop
    assert fired == []
    step_to(loop, clock, 1001.1)  # the next slot: "past" again, once
    assert fired == ["past"]
    fired.clear()
    wheel.discard("past")
    step_to(loop, clock, 1006.1)
    assert fired == ["rearm"]


def test_a_failing_callback_loses_no_other_deadline(clocked: Clocked) -> None:
    loop, clock = clocked
    fired: List[str] = []

    def on_due(item: str) -> None:
        fired.append(item)
        if item == "bad":
            raise ValueError("boom")

    wheel: DeadlineWheel[str] = DeadlineWheel(loop, on_due)
    for item in ("bad", "x", "y"):
        wheel.set(item, 1001.0)
    for _ in range(3):  # the loop logs the error and goes on; what is left fires next pass
        step_to(loop, clock, 1001.0)
    assert sorted(fired) == ["bad", "x", "y"]
    assert len(wheel) == 0


def test_a_dropped_loop_and_its_wheel_are_collected() -> None:
    loop = Loop()
    wheel: DeadlineWheel[str] = DeadlineWheel(loop, lambda item: None)
    wheel.set("a", loop.time() + 60.0)  # a pending loop timer: loop and wheel hold each other
    refs = [weakref.ref(loop), weakref.ref(wheel)]
    loop.close()
    del loop, wheel
    gc.collect()
    assert [ref() for ref in refs] == [None, None]


def test_resolution_must_be_positive(clocked: Clocked) -> None:
    loop, _ = clocked
    with pytest.raises(ValueError):
        DeadlineWheel(loop, lambda item: None, resolution=0)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["set", "discard", "advance"]),
            st.integers(0, 5),  # item
            st.floats(0.0, 3.0),  # a deadline offset, or how far to advance
        ),
        max_size=40,
    ),
    st.sampled_from([0.1, 0.25, 1.0]),
)
@example(
    ops=[("advance", 0, 1 / 3), ("advance", 0, 1 / 3), ("set", 0, 1 / 3), ("advance", 0, 1.0)],
    resolution=0.1,
)
def test_wheel_matches_a_model(ops: List[Tuple[str, int, float]], resolution: float) -> None:
    """Against a dict of exact deadlines: every item fires once, in [deadline, deadline + res]."""
    clock = FakeClock()
    with Loop(clock=clock) as loop:
        fired: List[Tuple[int, float]] = []
        wheel: DeadlineWheel[int] = DeadlineWheel(
            loop, lambda item: fired.append((item, clock.now)), resolution
        )
        model: Dict[int, float] = {}
        for op, item, amount in ops:
            if op == "set":
                model[item] = clock.now + amount
                wheel.set(item, clock.now + amount)
            elif op == "discard":
                model.pop(item, None)
                wheel.discard(item)
            else:
                target = clock.now + amount
                # Step through the loop's own timer times, as a real loop would wake.
                while True:
                    nxt: Optional[float] = loop.next_timeout()
                    if nxt is None or clock.now + nxt > target:
                        break
                    clock.now += nxt
                    loop.run_once(0)
                clock.now = target
                loop.run_once(0)
            for done, at in fired:
                deadline = model.pop(done)
                # 1e-9 either way: the clock is stepped by float sums, so a deadline may be one
                # ulp past the time that reaches it (1000 + 1/3 + 1/3 + 1/3 > 1001.0).
                assert deadline - 1e-9 <= at <= deadline + resolution + 1e-9
            fired.clear()
            assert len(wheel) == len(model)
            assert all(item in wheel for item in model)
