"""The bench's view of Python's garbage collector inside each proxy it measures.

``make bench`` puts this directory on the proxies' PYTHONPATH (every proxy alike, the plugin-free one
included) with ``BENCH_GC_STATS`` naming a directory: Python imports ``sitecustomize`` at startup, and this one
appends to ``gc-<pid>.txt`` there, every quarter second, the collections run so far and the CPU seconds they took, per
generation (``time epoch n0 n1 n2 s0 s1 s2``). A full collection of a LiteLLM proxy's heap (about
820,000 objects) was measured at ~0.45 s of CPU, every 10 to 20 s under the bench's load: one more or
one fewer inside a 7 s step moves that step's CPU per request by about 1 ms, so the bench reports
the collector's share beside each figure. Nothing happens without ``BENCH_GC_STATS``.

What watching costs: about 1.3 us per collection (the proxies run about ten a second). It can also
change how often collections run where several threads allocate at once: the callback is Python
code, so another thread may run while a collection is under way, and that thread's allocations
cannot start one of their own (three allocating threads in one process ran a third as many
collections with any callback installed). A proxy does its work on one event-loop thread, with
worker threads mostly idle, where counts with and without the probe matched; every proxy of the
bench is watched alike, the plugin-free one too."""

import gc
import os
import threading
import time

DIRECTORY = os.environ.get("BENCH_GC_STATS")
EVERY_S = 0.25

if DIRECTORY:
    _counts, _seconds, _began = [0, 0, 0], [0.0, 0.0, 0.0], {}

    def _on_collection(phase: str, info: dict) -> None:
        me = threading.get_ident()
        if phase == "start":
            _began[me] = time.thread_time()
        elif me in _began:
            generation = info["generation"]
            _counts[generation] += 1
            _seconds[generation] += time.thread_time() - _began.pop(me)

    def _write() -> None:
        with open(os.path.join(DIRECTORY, f"gc-{os.getpid()}.txt"), "a", buffering=1) as out:
            while True:
                out.write(f"{time.time():.3f} {' '.join(map(str, _counts))} "
                          f"{' '.join(f'{s:.6f}' for s in _seconds)}\n")
                time.sleep(EVERY_S)

    gc.callbacks.append(_on_collection)
    threading.Thread(target=_write, name="bench-gc-probe", daemon=True).start()
