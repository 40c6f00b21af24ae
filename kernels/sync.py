"""The persistent kernels' step barrier: per-program flags, one release arrive, a bounded acquire wait.

Every persistent kernel (RNN, GRU, LSTM; forward and backward) is a grid of programs that walk
time together: per step a program publishes its slice of the exchanged state (``h_t`` forward,
the gate gradients backward), then :func:`arrive`\\ s; before it reads the whole state of the step
it :func:`wait`\\ s until every program of its group has arrived. The two functions here are the
whole synchronisation; no kernel spells out a barrier of its own.

Layouts:

* ``flags``: int32, one per program, zeroed by the launcher before every launch. A program's flag
  holds the number of steps it has published: it only grows (no reset inside a launch, so there
  is no ABA problem), and a wait compares it with ``>=`` (an equality poll can miss a flag that
  has already moved on to the next step). The flags of one group (the programs that exchange
  state with each other: same batch group and direction) are contiguous, ``count`` of them.
* ``error``: one int32, zeroed by the launcher. A wait that runs out of spins sets it to 1; every
  wait of every program returns at once once it is set, so a launch with a missing arrival ends in
  bounded time and the launcher raises (``fastrnn.ops.persistent``), never hangs.

Memory ordering (PTX memory model, scope ``gpu``): why a reader sees the data a writer published.

1. Writer, :func:`arrive`: its threads store the data (plain ``st.global``), then
   ``tl.debug_barrier()`` (``bar.sync``: every thread of the program has issued its stores, and
   they are ordered before what follows in the program by the CTA barrier), then one
   ``atom``/``red`` with ``sem="release"``: a release operation is cumulative, so every write
   observed by (ordered before) the releasing thread, including the other threads' stores made
   visible to it by the barrier, is visible to whoever acquires the flag value it writes.
2. Reader, :func:`wait`: spins on ``tl.atomic_add(flag, 0, sem="acquire")`` (an acquire read:
   ``ld.acquire.gpu`` or ``atom.acquire.gpu``; Triton 3.6 has no ``tl.atomic_load``). When it
   reads a value ``>= target`` it synchronises with the release that wrote that value (or a later
   one: flags are written only by their owner, increasingly, so a later value's release is
   ordered after the earlier one's data too). Then ``tl.debug_barrier()``: every thread of the
   reading program, not only the ones whose lanes acquired the flags, is ordered after the
   acquires, so all its later loads of the exchanged data see the published values.
3. Reuse of a ping-pong slot: a program overwrites the slot of step ``s - 1`` only in step
   ``s + 1``, after its wait for step ``s``; every program arrived at step ``s`` only after it
   finished reading step ``s - 1``'s slot (its loads precede its release), so no read of a slot
   races with its next write.

``tl.load(..., volatile=True)`` would not do for the spin: it lowers to ``ld.volatile`` with no
acquire, and the data loads after it may be served stale. ``tests/test_persistent.py`` checks the
compiled PTX for the acquire, the release and the absence of a volatile spin; a CPU harness
(``tests/concurrent_grid.py``) checks the rest of the protocol, which it can see.

``fault`` (a test-only constexpr, 0 in every real launch) breaks the protocol on purpose so the
tests can prove the harness catches it: :data:`FAULT_NO_WAIT` skips the wait,
:data:`FAULT_OFF_BY_ONE` waits for one step too few, :data:`FAULT_ARRIVE_EARLY` is applied by the
kernels (they arrive before storing), :data:`FAULT_NEVER_ARRIVE` makes program 0 of every group
never arrive.
"""

import triton
import triton.language as tl

FAULT_NONE = tl.constexpr(0)
FAULT_NO_WAIT = tl.constexpr(1)
FAULT_ARRIVE_EARLY = tl.constexpr(2)
FAULT_OFF_BY_ONE = tl.constexpr(3)
FAULT_NEVER_ARRIVE = tl.constexpr(4)


@triton.jit
def arrive(flag_ptr, steps_published, index_in_group, FAULT: tl.constexpr):
    """Publish: after every thread's stores, one release write of ``steps_published`` to this
    program's flag (``flag_ptr``: scalar int32 pointer). ``index_in_group``: this program's place
    in its group (program 0 is the one :data:`FAULT_NEVER_ARRIVE` silences)."""
    tl.debug_barrier()
    if FAULT == FAULT_NEVER_ARRIVE:
        if index_in_group != 0:
            tl.atomic_xchg(flag_ptr, steps_published, sem="release", scope="gpu")
    else:
        tl.atomic_xchg(flag_ptr, steps_published, sem="release", scope="gpu")


@triton.jit
def wait(group_flags_ptr, count, target, error_ptr, max_spins, BLOCK_FLAGS: tl.constexpr, FAULT: tl.constexpr):
    """Block until all ``count`` flags at ``group_flags_ptr`` (int32, ``BLOCK_FLAGS >= count`` a
    power of two) are ``>= target``, reading them with acquire semantics; at most ``max_spins``
    polls, then set ``error_ptr`` (int32 scalar) and return. Returns at once while the error flag
    is set. Ends with a block barrier so every thread is ordered after the acquires."""
    if FAULT != FAULT_NO_WAIT:
        if FAULT == FAULT_OFF_BY_ONE:
            target = target - 1
        lanes = tl.arange(0, BLOCK_FLAGS)
        in_group = lanes < count
        flags = tl.atomic_add(group_flags_ptr + lanes, 0, mask=in_group, sem="acquire", scope="gpu")
        least = tl.min(tl.where(in_group, flags, target), axis=0)
        failed = tl.atomic_add(error_ptr, 0, sem="relaxed", scope="gpu")
        spins = 0
        while (least < target) & (failed == 0) & (spins < max_spins):
            flags = tl.atomic_add(group_flags_ptr + lanes, 0, mask=in_group, sem="acquire", scope="gpu")
            least = tl.min(tl.where(in_group, flags, target), axis=0)
            failed = tl.atomic_add(error_ptr, 0, sem="relaxed", scope="gpu")
            spins += 1
        if (least < target) & (failed == 0):
            tl.atomic_xchg(error_ptr, 1, sem="relaxed", scope="gpu")
    tl.debug_barrier()
