"""Run every program of a Triton interpreter launch in its own thread, so grid barriers complete.

Triton's interpreter (``TRITON_INTERPRET=1``) runs a grid's programs one after another: a kernel
whose programs wait for each other (the persistent kernels' step barrier, ``fastrnn.kernels.sync``)
would spin until its bound runs out. Inside :func:`concurrent_grid`, each program of a launch runs
in a thread of its own, all started together (as co-resident programs are), so a program that
spins hands the interpreter over to the others and the barrier completes.

How (every patch is undone when the block exits; the stock launch loop, argument copies and
language patching are reused unchanged):

* ``InterpreterBuilder.grid_idx`` becomes thread-local: ``tl.program_id`` reads the thread's own.
* ``GridExecutor.__init__`` swaps the kernel body it will call for :class:`_ProgramThreads`: the
  stock loop's call for each grid index starts a thread (parked at a start line); the call for the
  last index releases them all, then joins them with a deadline.
* Atomics and masked loads/stores run one at a time under one lock (each is then indivisible, as
  the hardware's are); after an atomic or a volatile load the thread sleeps for 0 s, handing the
  GIL over, so a spin never starves the program it waits for.
* Optional ``chaos``: random sub-millisecond sleeps before plain stores (loads and atomics stay
  prompt, so a reader that runs ahead of a writer reads early), so programs drift apart and an ordering bug in a kernel (a missing wait, arriving before storing,
  waiting for one step too few) shows up as wrong numbers.
* The interpreter's first call of a ``@triton.jit`` helper rewrites it and copies names into its
  module's globals, which a program calling a helper in that module iterates at the same moment
  (``_patch_lang``): measured, a first barrier launch in a fresh process failed with "dictionary
  changed size during iteration". Both run under one re-entrant lock (``_patch_lang`` and
  ``InterpretedFunction.rewrite``).
* A launch whose programs have not all finished after ``timeout_s`` raises :class:`LaunchTimeout`
  (a program still spinning is aborted at its next atomic); an exception in one program aborts the
  others and is re-raised by the launch.

:func:`first_run_caught` is the mutation checks' loop: a launch repeated under chaos until a run
shows the fault (wrong numbers, or a wait that ran out of spins).

What it cannot see: memory ordering. Under the lock every access is sequentially consistent, so a
relaxed arrive or a volatile spin passes here; the PTX test checks that instead.

Version guard: the patch points are interpreter internals. :func:`unsupported_reason` names why the
harness cannot run on the installed Triton (checked: 3.6 and 3.9, whose ``create_masked_load``
signatures differ by one argument, ``is_volatile`` last in both; 3.6 has no ``create_atomic_store``).
"""

from __future__ import annotations

import contextlib
import inspect
import random
import sys
import threading
import time

import triton

#: Triton versions whose interpreter internals this harness was written against and checked on.
SUPPORTED_TRITON = ("3.6", "3.9")
_ATOMICS = ("create_atomic_rmw", "create_atomic_cas", "create_atomic_store")


class LaunchTimeout(TimeoutError):
    """Some programs of a launch were still running when the harness's deadline passed."""


class ProgramAborted(RuntimeError):
    """Raised inside a program's thread when its launch failed elsewhere or timed out."""


def unsupported_reason() -> str | None:
    """Why the harness cannot run here (None when it can)."""
    version = ".".join(triton.__version__.split(".")[:2])
    if version not in SUPPORTED_TRITON:
        return f"concurrent_grid supports triton {', '.join(SUPPORTED_TRITON)}; installed: {triton.__version__}"
    try:
        from triton.runtime import interpreter
    except ImportError as error:
        return f"triton's interpreter cannot be imported: {error}"
    missing = [name for name in ("create_atomic_rmw", "create_atomic_cas", "create_masked_load", "create_masked_store",
                                 "set_grid_idx") if not hasattr(interpreter.InterpreterBuilder, name)]
    missing += [name for name in ("GridExecutor", "_patch_lang") if not hasattr(interpreter, name)]
    if not hasattr(getattr(interpreter, "InterpretedFunction", None), "rewrite"):
        missing.append("InterpretedFunction.rewrite")
    if missing:
        return f"triton {triton.__version__}'s interpreter lacks {missing}"
    volatile = list(inspect.signature(interpreter.InterpreterBuilder.create_masked_load).parameters)[-1]
    if volatile != "is_volatile":
        return f"triton {triton.__version__}: create_masked_load's last argument is {volatile!r}, not is_volatile"
    return None


class _Settings:
    """The one active harness's configuration and per-thread state."""

    def __init__(self, timeout_s: float, chaos: float, seed: int, jitter_s: float = 1e-3):
        self.timeout_s, self.chaos, self.seed, self.jitter_s = timeout_s, chaos, seed, jitter_s
        self.local = threading.local()  # grid_idx, rng, abort (an Event) of the current program
        self.lock = threading.Lock()

    def maybe_abort(self) -> None:
        abort = getattr(self.local, "abort", None)
        if abort is not None and abort.is_set():
            raise ProgramAborted("aborted: another program of the launch failed, or the launch timed out")

    def hand_over(self) -> None:
        self.maybe_abort()
        time.sleep(0)

    def jitter(self) -> None:
        rng = getattr(self.local, "rng", None)
        if rng is not None and self.chaos and rng.random() < self.chaos:
            time.sleep(rng.random() * self.jitter_s)


_active: _Settings | None = None


class _ProgramThreads:
    """Stands in for the kernel body ``GridExecutor`` calls once per grid index."""

    def __init__(self, body, settings: _Settings, builder):
        self.body, self.settings, self.builder = body, settings, builder
        self.threads: list[threading.Thread] = []
        self.failures: list[tuple[tuple, BaseException]] = []
        self.start_line, self.abort = threading.Event(), threading.Event()
        # GridExecutor.__call__ reads the body's argument spec and the globals it patches tl in.
        self.__signature__ = inspect.signature(body)
        self.__globals__ = body.__globals__
        self.__name__ = getattr(body, "__name__", "kernel")

    def __call__(self, **args):
        index = self.builder.grid_idx  # set by the stock loop in the launching thread
        thread = threading.Thread(target=self._run, args=(index, args), name=f"program{index}", daemon=True)
        self.threads.append(thread)
        thread.start()
        nx, ny, nz = self.builder.grid_dim
        if len(self.threads) == nx * ny * nz:
            self._finish()

    def _run(self, index, args):
        local = self.settings.local
        local.grid_idx, local.abort = index, self.abort
        local.rng = random.Random(f"{self.settings.seed}-{index}")
        self.start_line.wait()
        try:
            self.body(**args)
        except BaseException as error:  # noqa: BLE001 - handed to the launching thread
            self.failures.append((index, error))
            self.abort.set()

    def _finish(self):
        self.start_line.set()
        deadline = time.monotonic() + self.settings.timeout_s
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        running = [t.name for t in self.threads if t.is_alive()]
        if running:
            self.abort.set()
            for thread in self.threads:
                thread.join(10.0)
            raise LaunchTimeout(f"launch not finished after {self.settings.timeout_s} s; still running: {', '.join(running)}")
        real = [(i, e) for i, e in self.failures if not isinstance(e, ProgramAborted)]
        if real:
            index, error = real[0]
            raise RuntimeError(f"program {index} failed: {error!r}") from error


def _serialised(original, settings: _Settings, hand_over_after: bool):
    def patched(builder, *args, **kwargs):
        if not hand_over_after:  # plain stores drift; atomics stay prompt, so spinners poll often
            settings.jitter()
        with settings.lock:
            result = original(builder, *args, **kwargs)
        if hand_over_after:
            settings.hand_over()
        return result
    return patched


def _serialised_load(original, settings: _Settings):
    def patched(builder, *args, **kwargs):
        volatile = kwargs["is_volatile"] if "is_volatile" in kwargs else bool(args and args[-1])
        with settings.lock:
            result = original(builder, *args, **kwargs)
        if volatile:
            settings.hand_over()
        return result
    return patched


@contextlib.contextmanager
def concurrent_grid(timeout_s: float = 60.0, chaos: float = 0.0, seed: int = 0, switch_interval: float | None = 1e-4,
                    jitter_s: float = 1e-3):
    """Within this block every interpreter launch runs one thread per program (see the module
    docstring). ``switch_interval``: the GIL's switch interval while active (short, so programs
    interleave finely; None keeps Python's). ``jitter_s``: the longest chaos sleep before a store
    (the window in which a reader that runs ahead sees the store missing)."""
    global _active
    reason = unsupported_reason()
    if reason:
        raise RuntimeError(reason)
    if _active is not None:
        raise RuntimeError("concurrent_grid is not re-entrant")
    from triton.runtime import interpreter

    builder_cls, executor_cls = interpreter.InterpreterBuilder, interpreter.GridExecutor
    settings = _Settings(timeout_s, chaos, seed, jitter_s)
    saved = {name: builder_cls.__dict__[name] for name in (*_ATOMICS, "create_masked_load", "create_masked_store")
             if name in builder_cls.__dict__}
    stock_init = executor_cls.__init__
    stock_patch_lang, stock_rewrite = interpreter._patch_lang, interpreter.InterpretedFunction.rewrite
    globals_lock = threading.RLock()  # a helper's module globals: first-call rewrite vs. _patch_lang

    def patch_lang(fn):
        with globals_lock:
            return stock_patch_lang(fn)

    def rewrite(function):
        with globals_lock:
            return stock_rewrite(function)
    had_grid_idx = "grid_idx" in builder_cls.__dict__
    old_interval = sys.getswitchinterval()

    def init(executor, fn, *args, **kwargs):
        stock_init(executor, fn, *args, **kwargs)
        executor.fn = _ProgramThreads(executor.fn, settings, interpreter.interpreter_builder)

    builder_cls.grid_idx = property(lambda b: getattr(settings.local, "grid_idx", None),
                                    lambda b, value: setattr(settings.local, "grid_idx", value))
    for name in _ATOMICS:
        if name in saved:
            setattr(builder_cls, name, _serialised(saved[name], settings, hand_over_after=True))
    builder_cls.create_masked_load = _serialised_load(saved["create_masked_load"], settings)
    builder_cls.create_masked_store = _serialised(saved["create_masked_store"], settings, hand_over_after=False)
    executor_cls.__init__ = init
    interpreter._patch_lang, interpreter.InterpretedFunction.rewrite = patch_lang, rewrite
    _active = settings
    if switch_interval is not None:
        sys.setswitchinterval(switch_interval)
    try:
        yield settings
    finally:
        sys.setswitchinterval(old_interval)
        executor_cls.__init__ = stock_init
        interpreter._patch_lang, interpreter.InterpretedFunction.rewrite = stock_patch_lang, stock_rewrite
        for name, original in saved.items():
            setattr(builder_cls, name, original)
        if not had_grid_idx:
            del builder_cls.grid_idx
        _active = None


def first_run_caught(launch, check, runs: int, chaos: float, jitter_s: float, timeout_s: float = 120.0,
                     flagged: str = "at a step barrier") -> int | None:
    """The mutation checks' loop: ``launch()`` under the harness with ``chaos`` and ``jitter_s``,
    seeds ``0 .. runs - 1``, until one run shows the fault: ``launch`` raises the launcher's
    ``RuntimeError`` for a wait that ran out of spins (its message holds ``flagged``; any other
    error propagates) or ``check(result)`` raises ``AssertionError`` (wrong numbers). Returns that
    run's number (from 1), None when none did."""
    for run in range(runs):
        try:
            with concurrent_grid(timeout_s=timeout_s, chaos=chaos, seed=run, jitter_s=jitter_s):
                result = launch()
        except RuntimeError as error:
            if flagged not in str(error):
                raise
            return run + 1
        try:
            check(result)
        except AssertionError:
            return run + 1
    return None
