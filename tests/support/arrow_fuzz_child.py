"""Decode mutated Arrow/npy streams in a child process (a native abort would kill pytest).

``python -m tests.support.arrow_fuzz_child SEED N`` prints ``ok N`` when every one of the N
mutated inputs decoded or failed with ``ValueCodecError``; a process abort means a forged
stream reached native code unvalidated.
"""

from __future__ import annotations

import random
import sys

from swarm_notebook.errors import ValueCodecError
from swarm_notebook.protocol.values import TAG, DecodeBudget, decode_value
from tests.test_values_bounds import MB, _seeds

LARGE = [300 * MB, 2**40, 10**9, 2**31 - 1, -2]
KINDS = ["df", "series", "index", "ndarray", "npscalar"]


def mutate(rng: random.Random, data: bytearray) -> bytes:
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(["flip", "int", "int", "int", "cut", "splice"])
        pos = rng.randrange(len(data))
        if op == "flip":
            data[pos] ^= 1 << rng.randrange(8)
        elif op == "int":  # a forged length, offset or prefix over an aligned 8-byte field
            pos -= pos % 8
            data[pos : pos + 8] = rng.choice(LARGE).to_bytes(8, "little", signed=True)
        elif op == "cut":
            del data[max(1, pos) :]
        else:
            data[pos:pos] = rng.randbytes(rng.randrange(33))
    return bytes(data)


def main(seed: int, n: int) -> None:
    rng = random.Random(seed)
    for _ in range(n):
        data = mutate(rng, bytearray(rng.choice(_seeds)))
        try:
            decode_value({TAG: rng.choice(KINDS), "data": data}, budget=DecodeBudget(4 * MB))
        except ValueCodecError:
            pass
    print("ok", n, flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
