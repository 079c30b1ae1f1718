"""How fast the command line and `import rollfast` are (target: `rollfast list` < 1.5 s).

Prints a table: median wall time of `import rollfast`, `import optax` (the floor every
plugin-loading command pays), `rollfast list` and `rollfast list --json`, and which heavy
modules `import rollfast` pulls in (should be none).
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time

RUNS = 5


def wall(cmd: list[str]) -> float:
    times = []
    for _ in range(RUNS):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    exe = shutil.which("rollfast") or sys.exit("the rollfast console script is not installed")
    rows = [
        ("python -c pass", wall([sys.executable, "-c", "pass"])),
        ("import rollfast", wall([sys.executable, "-c", "import rollfast"])),
        ("import optax", wall([sys.executable, "-c", "import optax"])),
        ("rollfast list", wall([exe, "list"])),
        ("rollfast list --json", wall([exe, "list", "--json"])),
    ]
    print(f"| command | median wall s ({RUNS} runs) |\n|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} |")
    probe = ("import sys, rollfast; print(sorted(m for m in sys.modules if m.split('.')[0] in "
             "('jax', 'jaxlib', 'optax', 'numpy') or m.startswith('rollfast_')))")
    heavy = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip()
    print(f"\nheavy modules imported by `import rollfast`: {heavy}")


if __name__ == "__main__":
    main()
