"""Clock the time a pipeline spends inside its engines' inference library (used by ``ldm bench``)."""
from __future__ import annotations

import time
from typing import Any, Callable

TIMED_COMPONENTS = ("text_encoder", "unet", "vae_decoder")


class EngineClock:
    """Seconds and calls spent inside each component's inference library since the last ``reset``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def add(self, component: str, seconds: float) -> None:
        self.seconds[component] = self.seconds.get(component, 0.0) + seconds
        self.calls[component] = self.calls.get(component, 0) + 1

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


class _TimedCall:
    """Wraps one object's methods: each call's wall time goes to ``clock`` under ``component``."""

    def __init__(self, target: Any, clock: EngineClock, component: str, methods: tuple[str, ...]):
        self._target, self._clock, self._component = target, clock, component
        for name in methods:
            if hasattr(target, name):
                setattr(self, name, self._timed(getattr(target, name)))

    def _timed(self, fn: Callable) -> Callable:
        clock, component = self._clock, self._component

        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock.add(component, time.perf_counter() - t0)

        return call

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


def instrument(pipe: Any, components: tuple[str, ...] = TIMED_COMPONENTS) -> EngineClock:
    """Open ``components`` of ``pipe`` and clock the time spent inside their inference library.

    An engine with an onnxruntime ``session`` gets the session wrapped (so the clock holds
    onnxruntime's own time, not our feed checks); any other engine is wrapped whole.
    """
    clock = EngineClock()
    opener = getattr(pipe, "open_engines", None)
    if opener is not None:
        opener(components)
    for c in components:
        eng = pipe.engine(c)
        session = getattr(eng, "session", None)
        if session is not None and hasattr(session, "run"):
            eng.session = _TimedCall(session, clock, c, ("run", "run_with_iobinding"))
        else:
            pipe.engines[c] = _TimedCall(eng, clock, c, ("run",))
    return clock
