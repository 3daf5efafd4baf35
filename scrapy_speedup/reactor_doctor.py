"""The reactor doctor: measures how long the reactor is blocked, and by what.

Two cheap parts:

* **A lag timer on the reactor thread.** Every ``interval`` (a fifth of
  ``SPEEDUP_LAG_WARN_MS``, at most 20 ms) a timer notes how late it runs:
  that lateness is the reactor's lag, the time during which no request was
  sent and no response read. It also reads the reactor thread's CPU clock, so
  a block is known to be CPU work (parsing, hashing) or waiting (a blocking
  socket, ``time.sleep``), which need different fixes.
* **A stack sampler that only runs while the reactor is blocked.** Each tick
  re-arms a one-shot ``SIGALRM`` timer (``setitimer``) for when the next
  tick would be half of ``SPEEDUP_LAG_WARN_MS`` late; a healthy reactor
  re-arms it before it fires, so it never fires. When the reactor is
  blocked, it fires, and Python runs the handler on the reactor thread
  between two bytecodes of the blocking code (or interrupts a blocking
  sleep or read, which Python then resumes): the handler looks at the stack
  it interrupted, finds the innermost frame of a component of the crawl
  (the spider and its callbacks, an item pipeline, a downloader or spider
  middleware, an extension) and the innermost frame of the project's own
  code ("where"), and re-arms itself for another sample an interval later.

When the timer then runs more than ``SPEEDUP_LAG_WARN_MS`` late, the doctor
decides what the block was, from the samples taken during it (every 2 ms
at first, then every ``interval``):

* **A long call.** Consecutive samples that see the same frame object of a
  component's method (or of the project's code under it) were taken inside
  one call of it, so the span between them is a lower bound of that call's
  length. A component is named, with its fix, only when one of its calls
  lasted at least ``_MIN_CALL_S`` (5 ms): moving a call that long to a
  process or a thread pays for itself many times over (the move costs
  ~0.3 ms); moving a 1 ms parse would not. A call is long by the reactor
  thread's CPU clock (CPU work), or by the wall clock if the thread waited
  (voluntary context switches: I/O, a lock, sleep); one long on the wall
  clock only because other processes had the cores (involuntary switches)
  is not long: moving it would not help. The first block of each such
  component is a WARNING, with its fix (none for Scrapy's own components).
* **A long call in library code** (no component or project code on the
  stack: Scrapy's engine, a client library): named at INFO, with no fix.
* **Garbage collection**, when collections (timed with ``gc.callbacks``)
  took at least half the block: its own kind, at INFO.
* **A busy reactor**: many short calls, none long enough to blame: the
  crawl's own work (Scrapy, callbacks, middlewares) is its bottleneck. Said
  once, at INFO, with the reactor thread's CPU share.

Sampling, not wrapping the components' methods, because wrapping changes
what Scrapy introspects (coroutine functions, the deprecated ``spider``
argument), misses the time spent iterating a callback's generator, and costs
on every call. A signal, not a watchdog thread, because a thread that wakes
50 times a second takes the GIL from the reactor each time, while re-arming
a timer costs a system call (docs/design.rst). Signals reach only the main thread: when the reactor
runs in another thread (``CrawlerRunner`` in a thread), or when the project
already uses ``SIGALRM``, the doctor measures lag and blocks but cannot name
what blocked, and says so.
"""

from __future__ import annotations

import _signal
import atexit
import gc
import logging
import os
import signal
import sysconfig
import threading
import time
import types
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import scrapy_speedup

if TYPE_CHECKING:
    from collections.abc import Iterator

    from scrapy.crawler import Crawler

    from scrapy_speedup._bridge import Bridge, Timer
    from scrapy_speedup.config import SpeedupConfig

__all__ = ["ReactorDoctor", "ReactorLoad"]

logger = logging.getLogger(__name__)

_STAT = "speedup/reactor/"
# A block is CPU work when the reactor thread ran on a CPU for at least this
# share of it; below, it mostly waited (I/O, a lock, sleep).
_CPU_SHARE = 0.5
# Stack samples kept per block: enough to tell which component dominated,
# and (bounded) in case a reactor stopped without closing the spider.
_MAX_SAMPLES = 100
# The first samples of a block come this often, to measure calls of a few
# ms; a sample costs ~20-50 us, spent only while the reactor is blocked.
_FINE_INTERVAL_S = 0.002
_MAX_FINE_SAMPLES = 40
# A component is named only for a call at least this long (see above).
_MIN_CALL_S = 0.005
# A block is garbage collection's when collections took this share of it.
_GC_SHARE = 0.5
# How many of the worst blockers the summary at close lists.
_SUMMARY_ROWS = 10
# The load the adaptive middleware sees is measured over windows this long.
_LOAD_WINDOW_S = 1.0

_KINDS = {
    "spider": "spider",
    "pipeline": "item pipeline",
    "downloader": "downloader middleware",
    "spidermw": "spider middleware",
    "extension": "extension",
}
# Blocks that are not a component's: labels of the summary table.
_GC = "(garbage collection)"
_BUSY = "(many short calls)"


# A frame's code and line: turned into "file:line in function" only for the
# blocks that are reported, not for every sample.
_Where = tuple[types.CodeType | None, int | None]
_UNKNOWN: _Where = (None, None)


@dataclass(frozen=True)
class _Component:
    label: str  # Class.method
    kind: str  # a value of _KINDS
    # Scrapy's own (FeedExporter, ...): nothing the project can move; its
    # calls are long because of what it is given.
    scrapys: bool = False


# Starting the process pool's workers runs inside the first caller of
# run_in_process (a callback): the start-up is named for what it is.
_POOL_START = _Component("starting the process pool's workers", "scrapy-speedup")


@dataclass
class _Blocker:
    component: _Component | None
    where: str
    # "call": a component's or the project's long call; "gc"; "busy";
    # "unknown": no sample could say.
    kind: str = "call"
    # What made its calls long: "cpu" (work on the CPU) or "waits" (the
    # thread waited: blocking I/O, a lock, sleep).
    nature: str = "cpu"
    count: int = 0
    total_s: float = 0.0
    max_s: float = 0.0
    cpu_s: float = 0.0
    longest_call_s: float = 0.0

    @property
    def cpu_share(self) -> float:
        return self.cpu_s / self.total_s if self.total_s else 0.0


@dataclass(frozen=True)
class ReactorLoad:
    """The reactor's load over the last complete window (about a second)."""

    #: The longest the reactor was blocked in the window, in seconds.
    lag_max_s: float
    #: The share of the window the reactor thread ran on a CPU (0 to 1).
    cpu_share: float


@dataclass(frozen=True, slots=True)
class _Sample:
    due: float  # the due time of the tick whose block it was taken in
    at: float
    component: _Component | None
    # The frame whose call the sample was inside: the component's, or the
    # project's code when no component is on the stack. A reference, kept
    # only until the block is judged: identity tells one call from the next.
    frame: types.FrameType | None
    where: _Where
    # The reactor thread's CPU clock and its voluntary context switches
    # (waits for I/O, a lock, sleep; -1 where unknown) when it was taken:
    # a call that is long on the wall clock only because other processes
    # had the cores is not long (preempted, the thread switches
    # involuntarily).
    cpu: float = 0.0
    waits: int = -1
    # No component or project code on the stack: the frame is the callback
    # the loop ran, in a library (Scrapy's engine, a client, ...).
    library: bool = False


try:
    import resource

    _RUSAGE_THREAD = resource.RUSAGE_THREAD

    def _voluntary_switches() -> int:
        return resource.getrusage(_RUSAGE_THREAD).ru_nvcsw

except (ImportError, AttributeError):  # not Linux: judged by the CPU share

    def _voluntary_switches() -> int:
        return -1


# Doctors whose alarm may be armed, disarmed at exit: Python resets signal
# handlers to their defaults while it finalizes, and SIGALRM's default ends
# the process (exit status 142 after Ctrl-C twice).
_armed: weakref.WeakSet[ReactorDoctor] = weakref.WeakSet()


def _disarm_all() -> None:
    for doctor in list(_armed):
        doctor._stopping = True
    if _armed and hasattr(signal, "setitimer"):
        signal.setitimer(signal.ITIMER_REAL, 0)


atexit.register(_disarm_all)


class ReactorDoctor:
    """Measures reactor lag and names what blocks the reactor; one per crawl,
    reached as ``SpeedupExtension.of(crawler).doctor`` (``None`` when
    ``SPEEDUP_DOCTOR_ENABLED`` is False)."""

    def __init__(self, crawler: Crawler, config: SpeedupConfig, bridge: Bridge) -> None:
        self.crawler = crawler
        self.stats = crawler.stats
        self.warn_s = config.lag_warn_ms / 1000
        self._engines = config.crawl_processes if config.engine_index is not None else 1
        self.interval_s = min(0.02, self.warn_s / 5)
        self._bridge = bridge
        self._components: dict[types.CodeType, _Component] = {}
        self._library_files: dict[str, bool] = {}
        self._timer: Timer | None = None
        self._stopping = False
        self.sample_after_s = max(self.interval_s, self.warn_s / 2)
        #: Why blocks cannot be attributed ("" when they can).
        self.no_sampling_reason = ""
        self._previous_handler: Any = None
        self._alarm_at = 0.0  # when the alarm we armed fires (monotonic)
        # Written by the timer and the signal handler, both on the reactor
        # thread; a sample carries the due time of the tick it delayed.
        self._due = 0.0
        self._samples: list[_Sample] = []
        self._gc_s = 0.0  # time in garbage collection so far
        self._gc_started = 0.0
        self._gc_at_tick = 0.0
        self._busy_said = False
        self._last_tick = self._last_cpu = 0.0
        self._window = (0.0, 0.0, 0.0)  # start, cpu at start, lag max
        #: The reactor's load over the last complete window (about a second).
        self.load = ReactorLoad(0.0, 0.0)
        self.lag_max_s = 0.0
        self.blocked_s = 0.0
        self.block_count = 0
        self._blockers: dict[tuple[_Component | None, str, str], _Blocker] = {}

    # -- life cycle (reactor thread) ------------------------------------------

    def start(self) -> None:
        self._components = dict(_components_of(self.crawler))
        self.no_sampling_reason = _why_no_sampling()
        if not self.no_sampling_reason:
            self._previous_handler = signal.signal(signal.SIGALRM, self._on_alarm)
            # Restart the system calls that the alarm interrupts, so that C
            # code blocked in a read does not see EINTR.
            signal.siginterrupt(signal.SIGALRM, False)
            _armed.add(self)
        gc.callbacks.append(self._on_gc)
        now = time.monotonic()
        self._last_tick, self._last_cpu = now, time.thread_time()
        self._window = (now, self._last_cpu, 0.0)
        self._schedule(now)

    def stop(self) -> None:
        self._stopping = True
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        _armed.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.no_sampling_reason:
            # Disarm first: SIGALRM's default action ends the process.
            signal.setitimer(signal.ITIMER_REAL, 0)
            if signal.getsignal(signal.SIGALRM) == self._on_alarm:
                signal.signal(signal.SIGALRM, self._previous_handler or signal.SIG_DFL)
            self.no_sampling_reason = "stopped"

    def _schedule(self, now: float) -> None:
        self._due = now + self.interval_s
        self._timer = self._bridge.call_later(self.interval_s, self._tick)
        if self.no_sampling_reason:
            return
        # _signal's getsignal: signal's wraps it in an enum conversion that
        # cost 50 us here, on every tick.
        if _signal.getsignal(signal.SIGALRM) != self._on_alarm:
            self._yield_sigalrm(now)
            return
        self._arm(self.interval_s + self.sample_after_s)

    def _arm(self, delay: float) -> None:
        self._alarm_at = time.monotonic() + delay
        signal.setitimer(signal.ITIMER_REAL, delay)

    def _yield_sigalrm(self, now: float) -> None:
        """The project took SIGALRM during the crawl: leave its handler and
        its timer alone from now on (``alarm()`` shares ours)."""
        self.no_sampling_reason = "the project installed a SIGALRM handler during the crawl"
        remaining = signal.getitimer(signal.ITIMER_REAL)[0]
        if remaining and abs(remaining - (self._alarm_at - now)) < 0.005:
            signal.setitimer(signal.ITIMER_REAL, 0)  # ours, still pending
        logger.info(
            "scrapy-speedup reactor doctor: %s; blocks are still measured, but what"
            " blocks can no longer be named",
            self.no_sampling_reason,
            extra={"crawler": self.crawler},
        )

    def _tick(self) -> None:
        now, cpu = time.monotonic(), time.thread_time()
        try:
            self._measure(now, cpu)
        finally:
            # Even if a signal handler of the project raised in the middle:
            # the doctor keeps running.
            self._last_tick, self._last_cpu = now, cpu
            if not self._stopping:
                self._schedule(now)

    def _measure(self, now: float, cpu: float) -> None:
        lag = max(0.0, now - self._due)
        block_cpu = min(1.0, (cpu - self._last_cpu) / max(now - self._last_tick, 1e-9))
        samples, self._samples = self._samples, []
        if lag > self.lag_max_s:
            self.lag_max_s = lag
            self.stats.max_value(_STAT + "lag_max_ms", round(lag * 1000))
        gc_s, self._gc_at_tick = self._gc_s - self._gc_at_tick, self._gc_s
        if lag > self.warn_s:
            due = self._due
            self._block(lag, block_cpu, gc_s, [s for s in samples if s.due == due])
        start, start_cpu, window_lag = self._window
        window_lag = max(window_lag, lag)
        if now - start >= _LOAD_WINDOW_S:
            self.load = ReactorLoad(window_lag, min(1.0, (cpu - start_cpu) / (now - start)))
            self._window = (now, cpu, 0.0)
        else:
            self._window = (start, start_cpu, window_lag)

    # -- the sampler (reactor thread, in a signal handler) ---------------------

    def _on_alarm(self, signum: int, frame: types.FrameType | None) -> None:
        if frame is None or self._stopping:
            return
        try:
            self._samples.append(self._sample(frame))
        except Exception:  # never into the code it interrupted
            logger.debug("reactor doctor: stack sample failed", exc_info=True)
            return
        # Sample again while the block lasts: finely at first, to measure
        # calls of a few ms, then coarsely; a block long enough to fill the
        # list has been seen enough.
        count = len(self._samples)
        if count < _MAX_FINE_SAMPLES:
            self._arm(_FINE_INTERVAL_S)
        elif count < _MAX_SAMPLES:
            self._arm(self.interval_s)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started:
            self._gc_s += time.perf_counter() - self._gc_started
            self._gc_started = 0.0

    def _sample(self, frame: types.FrameType) -> _Sample:
        """What the reactor thread is inside of: the innermost component
        frame on the stack, else the innermost frame of the project's code
        run by the loop (the script that started the loop does not count:
        it is always on the stack)."""
        where: _Where | None = None
        project: types.FrameType | None = None
        innermost: _Where | None = None
        outermost: types.FrameType | None = None
        f: types.FrameType | None = frame
        depth = 0
        at, cpu, waits = time.monotonic(), time.thread_time(), _voluntary_switches()
        while f is not None and depth < 200:
            code = f.f_code
            if code in _LOOP_CODES:
                break  # older frames run the loop itself
            if innermost is None:
                innermost = (code, f.f_lineno)
            if code in _POOL_START_CODES:
                return _Sample(self._due, at, _POOL_START, f, (code, f.f_lineno), cpu, waits)
            if project is None and not self._is_library(code.co_filename):
                project, where = f, (code, f.f_lineno)
            component = self._components.get(code)
            if component is not None:
                return _Sample(self._due, at, component, f, where or (code, f.f_lineno),
                               cpu, waits)
            outermost = f
            f = f.f_back
            depth += 1
        if project is None and outermost is not None:
            return _Sample(self._due, at, None, outermost,
                           (outermost.f_code, outermost.f_lineno), cpu, waits, library=True)
        return _Sample(self._due, at, None, project, where or innermost or _UNKNOWN, cpu, waits)

    def _is_library(self, filename: str) -> bool:
        library = self._library_files.get(filename)
        if library is None:
            library = filename.startswith(_LIBRARY_PREFIXES) or filename.startswith("<")
            self._library_files[filename] = library
        return library

    # -- reporting (reactor thread) -------------------------------------------

    def _block(self, lag: float, cpu_share: float, gc_s: float,
               samples: list[_Sample]) -> None:
        self.block_count += 1
        self.blocked_s += lag
        self.stats.inc_value(_STAT + "block_count")
        self.stats.set_value(_STAT + "blocked_seconds", round(self.blocked_s, 3))
        component, where, longest, kind, nature = self._judge(lag, gc_s, samples)
        self.stats.inc_value(f"{_STAT}block_count/{kind}")
        key = (component, where if component is None else "", kind)
        blocker = self._blockers.get(key)
        if blocker is None:
            blocker = self._blockers[key] = _Blocker(component, where, kind, nature)
        blocker.count += 1
        blocker.total_s += lag
        blocker.max_s = max(blocker.max_s, lag)
        blocker.cpu_s += lag * cpu_share
        blocker.longest_call_s = max(blocker.longest_call_s, longest)
        if kind == "busy":
            self._say_busy(blocker, lag, cpu_share)
        elif kind == "library":
            if blocker.count == 1:
                logger.info(
                    "Library code blocked the reactor for %d ms in one call (at %s; %d%% of"
                    " it on the CPU): not a component of the project, so nothing to move;"
                    " such a call is long because of what it is given (a huge response or"
                    " result, thousands of requests at once). Further blocks are counted"
                    " and listed when the spider closes.",
                    round(lag * 1000), where, round(cpu_share * 100),
                    extra={"crawler": self.crawler},
                )
        elif kind == "gc":
            if blocker.count == 1:
                logger.info(
                    "Garbage collection paused the reactor: %d ms of collections in a"
                    " block of %d ms. Many live objects make collections long:"
                    " gc.freeze() once the crawl's long-lived objects exist, or fewer"
                    " objects per item, shortens them. Further pauses are counted and"
                    " listed when the spider closes.",
                    # Collections just before the tick was due count in gc_s,
                    # not in the lag: never more than the block.
                    round(min(gc_s, lag) * 1000), round(lag * 1000),
                    extra={"crawler": self.crawler},
                )
        elif blocker.count == 1:
            self._warn_first(blocker, lag, cpu_share, where)
        elif _is_power_of_ten(blocker.count):
            logger.warning(
                "%s has now blocked the reactor %d times for longer than %d ms,"
                " %.1f s in all (longest %d ms)",
                self._name(blocker),
                blocker.count,
                round(self.warn_s * 1000),
                blocker.total_s,
                round(blocker.max_s * 1000),
                extra={"crawler": self.crawler},
            )

    def _judge(
        self, lag: float, gc_s: float, samples: list[_Sample]
    ) -> tuple[_Component | None, str, float, str, str]:
        """(component, where, its longest call, kind, nature) of a block."""
        if gc_s >= _GC_SHARE * lag:
            return None, _GC, 0.0, "gc", "cpu"
        if not samples:
            return None, self._unsampled(), 0.0, "unknown", "cpu"
        # Runs of consecutive samples inside the same call; each run's span
        # is a lower bound of that call's length. Calls are grouped by
        # component, or by the project function (or library callback) when
        # no component is on the stack; `where` is from the first sample of
        # the longest call.
        longest: dict[object, tuple[float, _Component | None, _Where, str, bool]] = {}
        total: dict[object, float] = {}
        longest_any = 0.0
        run_start = samples[0]
        for previous, sample in zip(samples, [*samples[1:], None], strict=True):
            if sample is not None and sample.frame is not None and (
                    sample.frame is previous.frame):
                continue
            if previous.frame is not None:
                span = previous.at - run_start.at
                longest_any = max(longest_any, span)
                nature = _call_nature(run_start, previous)
                key = previous.component or run_start.where[0]
                if nature is not None and span >= longest.get(key, (-1.0,))[0]:
                    longest[key] = (span, previous.component, run_start.where, nature,
                                    previous.library)
                if nature is not None:
                    total[key] = total.get(key, 0.0) + span
            if sample is not None:
                run_start = sample
        if not longest:
            return None, _BUSY, longest_any, "busy", "cpu"
        # The component with the most time in long calls; the project's own
        # code outside components only when no component qualifies, and a
        # library's callback only when neither does.
        named = ([key for key in longest if longest[key][1] is not None]
                 or [key for key in longest if not longest[key][4]] or list(longest))
        span, component, code_line, nature, library = longest[max(named, key=total.__getitem__)]
        kind = "library" if component is None and library else "call"
        return component, _location(*code_line), span, kind, nature

    def _say_busy(self, blocker: _Blocker, lag: float, cpu_share: float) -> None:
        if self._busy_said:
            return
        self._busy_said = True
        preempted = ""
        if cpu_share < _CPU_SHARE:
            preempted = (
                " The reactor thread was on a CPU for only part of it: the machine's"
                " cores were busy with other work (other processes, the crawl's own"
                " workers), or short waits added up."
            )
        logger.info(
            "The reactor was busy for %d ms (%d%% of it on the CPU) with many short"
            " calls, none of %d ms or more: the crawl's own work (Scrapy, callbacks,"
            " middlewares) keeps its one reactor thread full, and no single component"
            " is worth moving to a process or a thread.%s %s Such blocks are counted"
            " and listed when the spider closes.",
            round(lag * 1000), round(cpu_share * 100), round(_MIN_CALL_S * 1000), preempted,
            self._engines_hint(), extra={"crawler": self.crawler},
        )

    def _engines_hint(self) -> str:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count() or 1
        if self._engines > 1:
            return (f"This is one of {self._engines} engine processes on {cores} cores:"
                    f" {'more engine processes' if self._engines < cores else 'more cores'}"
                    " (SPEEDUP_CRAWL_PROCESSES) would share the work further.")
        if cores < 2:
            return ""
        return (f"Engine processes run the crawl itself on every core: SPEEDUP_CRAWL_PROCESSES"
                f' = "auto" ({cores} here).')

    def _warn_first(self, blocker: _Blocker, lag: float, cpu_share: float, where: str) -> None:
        calls = ""
        if blocker.kind == "call":
            calls = f", in calls of {round(blocker.longest_call_s * 1000)} ms or more each"
        if blocker.kind == "unknown":
            logger.warning(
                "The reactor was blocked for %d ms (%d%% of it on the CPU), and the doctor"
                " cannot tell by what (%s): while it is blocked no request is sent and no"
                " response is read. Further blocks are counted and listed when the spider"
                " closes.",
                round(lag * 1000), round(cpu_share * 100), where.removeprefix("unknown: "),
                extra={"crawler": self.crawler},
            )
            return
        logger.warning(
            "%s blocked the reactor for %d ms (at %s; %d%% of it on the CPU)%s:"
            " while it runs no request is sent and no response is read. %s"
            " Further blocks by it are counted (warned again at 10, 100, ...)"
            " and listed when the spider closes.",
            self._name(blocker),
            round(lag * 1000),
            where,
            round(cpu_share * 100),
            calls,
            self._fix(blocker.component, blocker.nature),
            extra={"crawler": self.crawler},
        )

    def _unsampled(self) -> str:
        if self.no_sampling_reason:
            return f"unknown: {self.no_sampling_reason}"
        # The alarm's handler runs between bytecodes: C code that held on
        # for the whole block left it no chance.
        return "unknown: C code blocked without returning to Python"

    @staticmethod
    def _name(blocker: _Blocker) -> str:
        if blocker.component is None:
            return f"Code outside the crawl's components ({blocker.where})"
        return f"{blocker.component.label} ({blocker.component.kind})"

    def _fix(self, component: _Component | None, nature: str) -> str:
        if component is _POOL_START:
            return (
                "It happens once per crawl, at the first offloaded call; fewer"
                " SPEEDUP_PROCESS_WORKERS start sooner."
            )
        if component is not None and component.scrapys:
            return (
                "It is Scrapy's own component: its calls are long because of what it is"
                " given (huge items or responses, a slow feed storage), not a move to"
                " make."
            )
        if nature == "waits":
            return (
                "It waits (blocking I/O, a lock, sleep): run the blocking call in"
                " the crawl's thread pool with `await run_in_thread(func, ...)` or"
                " decorate it with @blocking (scrapy_speedup)."
            )
        if component is not None and component.kind == _KINDS["pipeline"]:
            return (
                "It is CPU work: add the pipeline's import path to"
                " SPEEDUP_PROCESS_PIPELINES to run it in worker processes, or move"
                " the heavy call to `await run_in_process(func, ...)`."
            )
        return (
            "It is CPU work: move the heavy call to a worker process with"
            " `await run_in_process(func, ...)` or decorate it with @cpu_bound"
            " (scrapy_speedup)."
        )

    def log_summary(self) -> None:
        warn_ms = round(self.warn_s * 1000)
        if not self._blockers:
            logger.info(
                "scrapy-speedup reactor doctor: no block longer than %d ms (lag max %d ms)",
                warn_ms,
                round(self.lag_max_s * 1000),
                extra={"crawler": self.crawler},
            )
            return
        worst = sorted(self._blockers.values(), key=lambda b: b.total_s, reverse=True)
        rows = [
            (
                _row_label(b),
                b.component.kind if b.component else "",
                str(b.count),
                f"{b.total_s:.2f}",
                str(round(b.max_s * 1000)),
                f"{round(b.cpu_share * 100)}%",
                _row_fix(b),
                "" if b.kind in ("gc", "busy") else b.where,
            )
            for b in worst[:_SUMMARY_ROWS]
        ]
        header = ("blocker", "kind", "blocks", "total s", "max ms", "CPU", "fix", "where")
        table = "\n".join(_table([header, *rows]))
        # A crawl whose blocks are all its own busy work or collections
        # has nothing to fix in a component: INFO, not WARNING.
        named = any(b.kind in ("call", "unknown") for b in self._blockers.values())
        logger.log(
            logging.WARNING if named else logging.INFO,
            "scrapy-speedup reactor doctor: the reactor was blocked %d times for"
            " longer than %d ms, %.2f s in all (lag max %d ms); worst blockers"
            " (fix: process = run_in_process / SPEEDUP_PROCESS_PIPELINES,"
            " thread = run_in_thread / @blocking, engines = SPEEDUP_CRAWL_PROCESSES):\n%s",
            self.block_count,
            warn_ms,
            self.blocked_s,
            round(self.lag_max_s * 1000),
            table,
            extra={"crawler": self.crawler},
        )


def _row_label(blocker: _Blocker) -> str:
    if blocker.component is not None:
        return blocker.component.label
    if blocker.kind in ("gc", "busy"):
        return blocker.where
    if blocker.kind == "library":
        return "(library code)"
    return "(outside components)"


def _row_fix(blocker: _Blocker) -> str:
    if blocker.kind == "busy":
        return "engines"  # SPEEDUP_CRAWL_PROCESSES
    component = blocker.component
    if blocker.kind != "call" or component is _POOL_START or (component and component.scrapys):
        return "-"
    return "thread" if blocker.nature == "waits" else "process"


def _loop_codes() -> frozenset[types.CodeType]:
    """The code that dispatches the loop's callbacks, asyncio's and
    Twisted's: frames older than these run the loop itself."""
    import asyncio.events

    codes = [asyncio.events.Handle._run.__code__]
    try:
        from twisted.internet import base, posixbase

        codes.append(base.ReactorBase.runUntilCurrent.__code__)
        codes.append(posixbase._PollLikeMixin._doReadOrWrite.__code__)
    except (ImportError, AttributeError):  # another Twisted: the whole stack counts
        pass
    return frozenset(codes)


_LOOP_CODES = _loop_codes()


def _call_nature(first: _Sample, last: _Sample) -> str | None:
    """What made the call sampled from *first* to *last* long: "cpu", or
    "waits"; None when it was not long: shorter than _MIN_CALL_S, or long on
    the wall clock only because the thread was preempted (a busy machine,
    the crawl's own workers on every core), which moving it would not fix."""
    span = last.at - first.at
    cpu = last.cpu - first.cpu
    if last.waits < 0:  # unknown here: the CPU share decides
        if cpu >= _MIN_CALL_S:
            return "cpu"
        if span < _MIN_CALL_S:
            return None
        return "cpu" if cpu >= _CPU_SHARE * span else "waits"
    # Waiting that outweighs the CPU is what to fix, whatever the CPU: the
    # samples themselves cost some (~0.1 ms each on a loaded machine, 40 of
    # them in a 150 ms sleep).
    if last.waits > first.waits and span - cpu >= max(cpu, _MIN_CALL_S):
        return "waits"
    if cpu >= _MIN_CALL_S:
        return "cpu"
    return None


def _pool_start_codes() -> frozenset[types.CodeType]:
    from scrapy_speedup.process.pool import ProcessPool

    return frozenset({ProcessPool.start.__code__, ProcessPool._spawn.__code__})


_POOL_START_CODES = _pool_start_codes()


def _why_no_sampling() -> str:
    """Why the stack cannot be sampled with SIGALRM here, or ""."""
    if not hasattr(signal, "setitimer"):
        return "no setitimer on this platform"
    if threading.current_thread() is not threading.main_thread():
        return "the reactor does not run in the main thread, where signals go"
    handler = signal.getsignal(signal.SIGALRM)
    if isinstance(getattr(handler, "__self__", None), ReactorDoctor):
        return "another crawl's doctor in this process samples the reactor"
    # None: a handler installed outside Python, by a C library.
    if handler is not signal.SIG_DFL or any(signal.getitimer(signal.ITIMER_REAL)):
        return "SIGALRM is in use by the project"
    return ""


def _table(rows: list[tuple[str, ...]]) -> Iterator[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    numeric = {2, 3, 4, 5}
    for row in rows:
        cells = (
            cell.rjust(width) if i in numeric else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        yield "  " + "  ".join(cells).rstrip()


def _is_power_of_ten(n: int) -> bool:
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1


def _location(code: types.CodeType | None, line: int | None) -> str:
    if code is None:
        return "unknown"
    filename = code.co_filename
    try:
        relative = os.path.relpath(filename)
    except ValueError:
        relative = filename
    if not relative.startswith(".."):
        filename = relative
    return f"{filename}:{line} in {code.co_name}"


def _library_prefixes() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths[name] for name in ("stdlib", "platstdlib", "purelib", "platlib")}
    dirs.add(os.path.dirname(scrapy_speedup.__file__))
    return tuple(os.path.join(os.path.realpath(d), "") for d in dirs) + tuple(
        os.path.join(d, "") for d in dirs
    )


_LIBRARY_PREFIXES = _library_prefixes()


def _components_of(crawler: Crawler) -> Iterator[tuple[types.CodeType, _Component]]:
    """The code of every method of the crawl's components, with its label."""
    engine = crawler.engine
    managers: list[tuple[str, Any]] = []
    if engine is not None:
        managers = [
            ("pipeline", engine.scraper.itemproc),
            ("spidermw", engine.scraper.spidermw),
            ("downloader", engine.downloader.middleware),
        ]
    managers.append(("extension", crawler.extensions))
    objects: list[tuple[str, object]] = [("spider", crawler.spider)] if crawler.spider else []
    for kind, manager in managers:
        objects += [(kind, component) for component in getattr(manager, "middlewares", ())]
    # scrapy-speedup's own components (its extension, the pipeline proxies,
    # its middlewares) are not the project's to fix: what blocks in them is
    # reported by what it is (the project's code they run, or busy work).
    objects = [(kind, obj) for kind, obj in objects
               if not type(obj).__module__.startswith("scrapy_speedup.")]
    found: dict[types.CodeType, set[_Component]] = {}
    for kind, obj in objects:
        cls = type(obj)
        for base in cls.__mro__[:-1]:  # not object
            for name, value in vars(base).items():
                for code in _codes_of(value):
                    found.setdefault(code, set()).add(_Component(
                        f"{cls.__name__}.{name}", _KINDS[kind],
                        scrapys=cls.__module__.startswith("scrapy."),
                    ))
    for code, components in found.items():
        if len(components) == 1:
            yield code, components.pop()
        else:
            # A base class's method shared by several components cannot say
            # which one ran: name it by where it is defined.
            kinds = sorted({c.kind for c in components})
            yield code, _Component(code.co_qualname, " or ".join(kinds),
                                   scrapys=all(c.scrapys for c in components))


def _codes_of(value: object) -> Iterator[types.CodeType]:
    """The code of a class attribute that is a function, and of the
    functions nested in it (closures, lambdas, comprehensions in 3.11)."""
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    elif isinstance(value, property):
        for accessor in (value.fget, value.fset, value.fdel):
            if accessor is not None:
                yield from _codes_of(accessor)
        return
    seen_wrappers = 0
    while hasattr(value, "__wrapped__") and seen_wrappers < 10:
        code = getattr(value, "__code__", None)
        if isinstance(code, types.CodeType):
            yield from _nested(code)
        value = value.__wrapped__
        seen_wrappers += 1
    code = getattr(value, "__code__", None)
    if isinstance(code, types.CodeType):
        yield from _nested(code)


def _nested(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _nested(const)
