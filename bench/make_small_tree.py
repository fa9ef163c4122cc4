#!/usr/bin/env python3
"""Writes a deterministic tree of small files for the benchmark's small-files case.
  make_small_tree.py DEST [SEED=1] [FILES=6500]
FILES files of 100 B to 64 KiB (log-uniform sizes: most are a few KiB, mean ~10 KiB, ~65 MB
in all), ~85% incompressible random bytes and ~15% text, ~19 per folder in 3 levels of nested
folders (a/b/c/). The same SEED gives byte-identical trees."""
import math
import os
import random
import sys

dest, seed = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1
files = int(sys.argv[3]) if len(sys.argv) > 3 else 6500
rng = random.Random(seed)
WORDS = ("backup snapshot chunk repository encrypt restore folder file index pack key tree "
         "blob the a of and to in is it for on with as was at by data server client").split()
width = max(1, round((files / 19) ** (1 / 3)))  # width^3 leaf folders of ~19 files each
total = 0
for n in range(files):
    leaf = n * width**3 // files
    folder = os.path.join(dest, f"d{leaf // width**2:02}", f"d{leaf // width % width:02}",
                          f"d{leaf % width:02}")
    os.makedirs(folder, exist_ok=True)
    size = round(math.exp(rng.uniform(math.log(100), math.log(64 * 1024))))
    if rng.random() < 0.15:
        text = " ".join(rng.choice(WORDS) for _ in range(size // 4 + 1)).encode()
        data, name = text[:size], f"note{n:05}.txt"
    else:
        data, name = rng.randbytes(size), f"blob{n:05}.bin"
    with open(os.path.join(folder, name), "wb") as out:
        out.write(data)
    total += size
print(f"{files} files, {width**3} folders, {total / 2**20:.1f} MiB in {dest}")
