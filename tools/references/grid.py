"""Best loss over a learning-rate grid: PSGD Kron against heavyball, PRISM against
rollfast 0.2 (not run in CI).

These optimizers draw random probes, so runs are not bit-comparable across
libraries; each side is tuned over the same grid and its best final loss reported.
Each side runs in its own environment (see ``docs/references.md``)::

    /tmp/refenv/bin/python tools/references/grid.py heavyball   # torch + heavyball
    /tmp/rfenv/bin/python  tools/references/grid.py rollfast02  # jax + rollfast==0.2.1
    .venv/bin/python       tools/references/grid.py ours        # this repository

Each writes its rows into ``tests/fixtures/references/grid.json``; ``grid.py table``
prints the Markdown table.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OUT = ROOT / "tests" / "fixtures" / "references" / "grid.json"
sys.path.insert(0, str(HERE))

LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
PROBLEM_NAMES = ("lsq", "mixed", "mlp")
STEPS = 200


def heavyball_side():
    import harness
    heavyball = harness._heavyball()

    def kron(params, lr):
        return heavyball.PSGDKron(params, lr=lr, preconditioner_update_probability=1.0)

    def pro(params, lr):
        return heavyball.PSGDPRO(params, lr=lr, preconditioner_update_probability=1.0)

    version = heavyball.__version__ if hasattr(heavyball, "__version__") else harness.importlib.metadata.version(
        "heavyball")
    rows = {}
    for name, factory in (("heavyball PSGDKron", kron), ("heavyball PSGDPRO", pro)):
        rows[f"{name} {version}"] = {p: [_final(harness.train(p, factory, lr, STEPS, 0, "jax")[0]) for lr in LRS]
                                     for p in PROBLEM_NAMES}
    return rows


def jax_side(optimizers):
    import jax
    import optax
    from problems import PROBLEMS
    sys.path.insert(0, str(ROOT / "tests" / "contrib"))
    from test_references import LOSSES, train

    rows = {}
    for name, make in optimizers.items():
        rows[name] = {}
        for problem in PROBLEM_NAMES:
            data, init = PROBLEMS[problem]()
            data = jax.tree.map(jax.numpy.asarray, data)
            init = jax.tree.map(jax.numpy.asarray, init)
            rows[name][problem] = [_final(train(make(lr), problem, data, init, STEPS, 0)[0]) for lr in LRS]
    del optax, LOSSES
    return rows


def rollfast02_side():
    from rollfast.optim.prism import prism
    return jax_side({"rollfast 0.2.1 prism": lambda lr: prism(lr)})


def ours_side():
    import rollfast
    kron = lambda mode: (lambda lr: rollfast.get("kron", learning_rate=lr, mode=mode,
                                                 preconditioner_update_probability=1.0))
    return jax_side({"rollfast kron (Q0.5EQ1.5, default)": kron("Q0.5EQ1.5"),
                     "rollfast kron EQ": kron("EQ"),
                     "rollfast prism": lambda lr: rollfast.get("prism", learning_rate=lr)})


def _final(losses):
    last = float(losses[-1])
    return last if math.isfinite(last) else float("inf")


def table():
    rows = json.loads(OUT.read_text())
    head = "| optimizer | " + " | ".join(f"{p}: best (lr)" for p in PROBLEM_NAMES) + " |"
    lines = [head, "|---" * (len(PROBLEM_NAMES) + 1) + "|"]
    for name, by_problem in rows.items():
        cells = []
        for p in PROBLEM_NAMES:
            losses = by_problem[p]
            i = min(range(len(LRS)), key=lambda k: losses[k])
            cells.append(f"{losses[i]:.3g} ({LRS[i]:g})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


def main(side):
    if side == "table":
        return table()
    rows = {"heavyball": heavyball_side, "rollfast02": rollfast02_side, "ours": ours_side}[side]()
    merged = json.loads(OUT.read_text()) if OUT.exists() else {}
    merged.update(rows)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(merged, indent=1) + "\n")
    for name, by_problem in rows.items():
        print(name, {p: [f"{v:.3g}" for v in vs] for p, vs in by_problem.items()})


if __name__ == "__main__":
    main(sys.argv[1])
