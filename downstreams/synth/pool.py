"""Render chunks in parallel worker processes started as ``python -m speechbench.downstreams.synth.pool``.

Not ``multiprocessing``: its "spawn" start method re-imports the caller's ``__main__`` in every worker, so a
script without an ``if __name__ == "__main__"`` guard (or code piped to stdin) makes the pool respawn failing
workers forever, and "fork" would copy whatever the parent holds (torch's threads, a loaded libespeak-ng). A
worker here is a clean interpreter that only imports this package and talks over its stdin/stdout with
length-prefixed pickles: request = a chunk, reply = ``("ok", results)`` or ``("error", message)``.
"""

from __future__ import annotations

import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

_HEADER = struct.Struct("<Q")


def _send(stream: BinaryIO, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _recv(stream: BinaryIO) -> Any:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError
    (size,) = _HEADER.unpack(header)
    return pickle.loads(stream.read(size))


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the directory holding the `downstreams` package
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_chunks(chunks: Sequence[Any], workers: int, on_result: Callable[[Any], None]) -> None:
    """Render every chunk with ``render.render_chunk`` in ``workers`` processes; ``on_result`` receives each
    chunk's results in the calling thread (in completion order: callers key results by id). Raises RuntimeError
    with the worker's message if a chunk fails."""
    todo: queue.Queue[int] = queue.Queue()
    for i in range(len(chunks)):
        todo.put(i)
    done: queue.Queue[tuple[str, Any]] = queue.Queue()
    procs = [subprocess.Popen([sys.executable, "-m", "speechbench.downstreams.synth.pool"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env=_worker_env()) for _ in range(min(workers, len(chunks)))]

    def drive(proc: subprocess.Popen) -> None:
        try:
            while True:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                _send(proc.stdin, chunks[i])
                status, payload = _recv(proc.stdout)
                done.put((status, payload))
                if status != "ok":
                    return
        except (EOFError, OSError, ValueError):  # ValueError: stdin closed by the main thread while stopping
            done.put(("error", f"synthesis worker {proc.pid} died (exit code {proc.poll()})"))

    threads = [threading.Thread(target=drive, args=(p,), daemon=True) for p in procs]
    for t in threads:
        t.start()
    try:
        for _ in range(len(chunks)):
            status, payload = done.get()
            if status != "ok":
                raise RuntimeError(payload)
            on_result(payload)
    finally:
        while not todo.empty():  # on error or interrupt: hand out no more work
            try:
                todo.get_nowait()
            except queue.Empty:
                break
        for p in procs:
            if p.stdin:
                try:
                    p.stdin.close()  # EOF: the worker exits its loop
                except OSError:
                    pass
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for t in threads:
            t.join(timeout=1)


def main() -> None:
    """Worker loop: chunks in on stdin, results out on the original stdout (fd 1 is redirected to stderr so
    nothing else, e.g. a C library's printf, can corrupt the protocol)."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    from speechbench.downstreams.synth.render import render_chunk

    while True:
        try:
            chunk = _recv(inp)
        except EOFError:
            return
        try:
            reply = ("ok", render_chunk(chunk))
        except Exception as e:  # reported to the parent, which raises it with this message
            reply = ("error", f"{type(e).__name__}: {e}")
        _send(out, reply)


if __name__ == "__main__":
    main()
