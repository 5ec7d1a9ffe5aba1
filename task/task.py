"""The example task, and the template to edit: one input file in, predictions out.

Each shard is one CSV file of records ``id,x1,x2,x3,y``; rows with an empty ``y`` are the ones to
predict. ``run`` fits a small ridge regression on the labelled rows and writes:

- ``predictions.csv``: ``source,id,prediction`` for the unlabelled rows (combined into one file);
- ``models.jsonl``: one line with the fitted weights and the training error.

Replace the body of ``run`` with your own logic; anything written under ``shard.output_dir`` is
kept and combined. ``shard`` carries ``input`` (a local path), ``params``, ``id``, ``index``,
``attempt`` and ``run_id``. Optionally define ``combine(paths, out)`` to merge outputs yourself.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

FEATURES = ("x1", "x2", "x3")
RIDGE = 1e-3


def run(shard: Any) -> None:
    source = Path(shard.input).name
    train_x: list[list[float]] = []
    train_y: list[float] = []
    todo: list[tuple[str, list[float]]] = []
    with open(shard.input, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            x = [1.0] + [float(row[f]) for f in FEATURES]
            if row["y"] == "":
                todo.append((row["id"], x))
            else:
                train_x.append(x)
                train_y.append(float(row["y"]))
    if not train_x:
        raise ValueError(f"{source} has no labelled rows to learn from")

    weights = fit_ridge(train_x, train_y, RIDGE)
    rmse = math.sqrt(
        sum((dot(weights, x) - y) ** 2 for x, y in zip(train_x, train_y, strict=True))
        / len(train_y)
    )

    out = Path(shard.output_dir)
    with open(out / "predictions.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["source", "id", "prediction"])
        for row_id, x in todo:
            writer.writerow([source, row_id, f"{dot(weights, x):.6f}"])
    with open(out / "models.jsonl", "w", encoding="utf-8") as fh:
        model = {"source": source, "weights": weights, "train_rmse": rmse, "rows": len(train_y)}
        fh.write(json.dumps(model) + "\n")
    print(f"{source}: trained on {len(train_y)} rows (rmse {rmse:.4f}), predicted {len(todo)}")


def dot(a: list[float], b: list[float]) -> float:
    return sum(p * q for p, q in zip(a, b, strict=True))


def fit_ridge(xs: list[list[float]], ys: list[float], ridge: float) -> list[float]:
    """Solve (X'X + ridge*I) w = X'y by Gaussian elimination: small, exact, no dependencies."""
    n = len(xs[0])
    a = [
        [sum(x[i] * x[j] for x in xs) + (ridge if i == j else 0.0) for j in range(n)]
        for i in range(n)
    ]
    b = [sum(x[i] * y for x, y in zip(xs, ys, strict=True)) for i in range(n)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[pivot] = a[pivot], a[col]
        b[col], b[pivot] = b[pivot], b[col]
        for r in range(col + 1, n):
            factor = a[r][col] / a[col][col]
            for c in range(col, n):
                a[r][c] -= factor * a[col][c]
            b[r] -= factor * b[col]
    w = [0.0] * n
    for r in reversed(range(n)):
        w[r] = (b[r] - sum(a[r][c] * w[c] for c in range(r + 1, n))) / a[r][r]
    return w
