"""Transport variations for the fuzzers: the same bytes in other pieces.

A byte stream is cut at random points (1 byte up to the whole), sent with
short sleeps between some pieces (a slow sender), or interleaved piecewise
with the streams of other connections.
"""
from __future__ import annotations

import socket
import time


def cuts(rng, n: int, must=()) -> list[int]:
    """Sorted cut offsets in 1..n-1: none, a few, many, or 1-byte pieces
    over the first bytes (the header); ``must`` offsets always."""
    mode = rng.randint(0, 4)
    out = set(c for c in must if 0 < c < n)
    if n > 1:
        if mode == 1:
            out |= {rng.randint(1, n - 1) for _ in range(rng.randint(1, 4))}
        elif mode == 2:
            out |= {rng.randint(1, n - 1) for _ in range(min(n - 1, rng.randint(1, 64)))}
        elif mode == 3:
            out |= set(range(1, min(n, rng.randint(2, 24))))
        elif mode == 4:         # log-uniform piece sizes
            at = 0
            while len(out) < 256:
                at += max(1, int(2 ** rng.uniform(0, max(1, n.bit_length()))))
                if at >= n:
                    break
                out.add(at)
    return sorted(out)


def pieces(rng, data, must=()) -> list[memoryview]:
    mv = memoryview(data).cast("B")
    bounds = [0, *cuts(rng, mv.nbytes, must), mv.nbytes]
    return [mv[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def pause(rng, p: float = 0.15) -> None:
    """A slow sender: sometimes a short sleep between two pieces."""
    if rng.random() < p:
        time.sleep(rng.uniform(0, 0.002))


def send_pieces(sock: socket.socket, rng, data, must=(), slow: float = 0.15) -> bool:
    """Send ``data`` in random pieces; False once the peer has closed."""
    for piece in pieces(rng, data, must):
        try:
            sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            return False
        pause(rng, slow)
    return True


def interleave(rng, queues: list[list]):
    """(index, item) of every queue, each queue in order, queues mixed at random."""
    heads = [0] * len(queues)
    live = [i for i, q in enumerate(queues) if q]
    while live:
        i = rng.choice(live)
        yield i, queues[i][heads[i]]
        heads[i] += 1
        if heads[i] == len(queues[i]):
            live.remove(i)
