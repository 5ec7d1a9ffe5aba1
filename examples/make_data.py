"""Generate the example inputs: CSV files of records, some labelled, some to predict.

    python examples/make_data.py examples/data [--files 24] [--rows 20000] [--seed 7]

Each file follows its own hidden linear model plus noise, so each shard fits its own weights.
The same arguments always give the same files.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path


def make_file(path: Path, rows: int, rng: random.Random) -> None:
    true_w = [rng.uniform(-2, 2) for _ in range(4)]
    with path.open("w", encoding="utf-8") as fh:
        fh.write("id,x1,x2,x3,y\n")
        for i in range(rows):
            x = [rng.gauss(0, 1) for _ in range(3)]
            y = (
                true_w[0]
                + sum(w * v for w, v in zip(true_w[1:], x, strict=True))
                + rng.gauss(0, 0.1)
            )
            label = "" if i % 5 == 0 else f"{y:.5f}"  # every fifth row is to be predicted
            fh.write(f"{path.stem}-{i},{x[0]:.5f},{x[1]:.5f},{x[2]:.5f},{label}\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--files", type=int, default=24)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    for n in range(args.files):
        make_file(args.out / f"region-{n:03d}.csv", args.rows, rng)
    print(f"wrote {args.files} files of {args.rows} records to {args.out}")


if __name__ == "__main__":
    main()
