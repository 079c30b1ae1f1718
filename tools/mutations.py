"""Planted-bug check: apply plausible one-line bugs to a scratch copy of the source, run
the tests that should notice each, and print a markdown table of who killed what.

Run by hand or from a scheduled job (not on every CI run; all 49 took about 7 minutes
on 2 shared cores, 3-32 s each)::

    python tools/mutations.py                  # every mutation
    python tools/mutations.py kron-momentum    # some, by name
    python tools/mutations.py --list

The tree is copied once to a temporary directory (without ``.git`` and ``.venv``);
each mutation patches one file of the copy, runs its tests there with the copy first
on ``PYTHONPATH`` (``python -m pytest -x``), and restores the file. The working tree
is never touched. A snippet that is no longer in the source is reported as
``snippet not found`` (the table row says so; the script does not stop). Exit status:
0 when every mutation was found and killed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / ".venv" / "bin" / "python"
TIMEOUT = 900  # seconds per mutation


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    what: str


PIPE = "tests/psgd/test_kron_pipeline.py::test_whole_step_matches_float64_reference"
KRON = "tests/psgd/test_kron.py"
MODES = "tests/psgd/test_kron_modes.py"
T = "plugins/rollfast_psgd/transform.py"
F = "plugins/rollfast_psgd/factors.py"
L = "plugins/rollfast_psgd/linalg.py"

MUTATIONS = [
    # ---- kron family: the step
    Mutation("kron-momentum-beta", T, "(1 - beta) * g + beta * m", "beta * g + (1 - beta) * m",
             (PIPE, KRON), "β ↔ 1−β in the momentum"),
    Mutation("kron-momentum-count", T, "beta = jnp.minimum(count / (1 + count), b1)",
             "beta = jnp.minimum((count + 1) / (2 + count), b1)", (PIPE, KRON), "off-by-one step count in β_t"),
    Mutation("kron-b1-for-beta-lipschitz", T, "UpdateConfig(self.spec, self.preconditioner_lr, self.beta_lipschitz,",
             "UpdateConfig(self.spec, self.preconditioner_lr, self.b1,", (PIPE,), "b1 passed where beta_lipschitz is expected"),
    Mutation("kron-update-probability", T, "(u_update < prob) & ~skip", "(u_update < 1 - prob) & ~skip",
             (PIPE, "tests/psgd/test_kron_pipeline.py::test_realised_update_rate_at_probability_0_3"),
             "update with probability 1 − p"),
    Mutation("kron-balance-probability", T, "u_balance < BALANCE_PROBABILITY", "u_balance > BALANCE_PROBABILITY",
             (PIPE,), "balance with probability 0.99"),
    Mutation("kron-whiten-swapped", T, "signal = tiling.split(grads if options.whiten_grad else moms)",
             "signal = tiling.split(moms if options.whiten_grad else grads)", (PIPE,), "whiten_grad inverted"),
    Mutation("kron-probe-damping", T, "h = x + (options.damping + jnp.finfo(x.dtype).eps * jnp.abs(x)) * v",
             "h = x + jnp.finfo(x.dtype).eps * jnp.abs(x) * v", (PIPE,), "damping dropped from the probe"),
    Mutation("kron-lazy-scale-root", T, "+ damping**4) ** (-1 / 8)", "+ damping**4) ** (-1 / 4)",
             (PIPE, KRON), "init scale (mean g⁴)^(−1/4) instead of ^(−1/8)"),
    Mutation("kron-clip-dropped-min", "rollfast/toolbox.py",
             "u = u * jnp.minimum(1.0, a_rms * scale / (rms + tiny)).astype(u.dtype)",
             "u = u * (a_rms * scale / (rms + tiny)).astype(u.dtype)", (PIPE, KRON),
             "RMS cap scales up small updates (kron's clip is the core's update_clipper)"),
    Mutation("kron-nonfinite-not-skipped", T, "skip = ~ok\n", "skip = ok & ~ok\n", (KRON, PIPE),
             "kron's own skip ignores spike_guard's ok: a non-finite gradient is not skipped"),
    Mutation("kron-precondition-old-factors", T, "first = options.update_preconditioner_first",
             "first = not options.update_preconditioner_first", (PIPE,),
             "update_preconditioner_first inverted"),
    # ---- kron family: the factor update
    Mutation("kron-lipschitz-dropped-max", F,
             "l_new = jnp.maximum(cfg.beta_lipschitz * l + (1 - cfg.beta_lipschitz) * bound, bound)",
             "l_new = cfg.beta_lipschitz * l + (1 - cfg.beta_lipschitz) * bound", (PIPE,),
             "L ← βL + (1−β)ℓ without the max with ℓ"),
    Mutation("kron-damping-in-t1", F, "return t1 + cfg.damping, jnp.float32(", "return t1, jnp.float32(", (PIPE,),
             "damping dropped from T1"),
    Mutation("kron-t2-inverted", F, "jnp.float32(n / q.shape[0])", "jnp.float32(q.shape[0] / n)",
             (PIPE, MODES), "T2 = d/n instead of n/d"),
    Mutation("kron-balance-arithmetic-mean", F, "jnp.exp(jnp.mean(jnp.log(nus))) / nus", "jnp.mean(nus) / nus",
             (PIPE,), "balancing to the arithmetic mean (changes the Kronecker product)"),
    Mutation("kron-diag-rule-sign", F, "(1 - terms.eta * (terms.t1 - terms.t2))",
             "(1 + terms.eta * (terms.t1 - terms.t2))", (PIPE,), "diagonal rule moves away from whitening"),
    Mutation("kron-layout-skew", F, "d * d > max_skew_triangular * n", "d > max_skew_triangular * n",
             (PIPE, KRON), "skew limit on d instead of d²"),
    Mutation("kron-one-diag-smallest", F, "key=lambda i: (shape[i], i))", "key=lambda i: (-shape[i], i))",
             (PIPE,), "memory_save_mode='one_diag' picks the smallest axis"),
    Mutation("kron-p-is-qqt", L, "return [gram(q, 1, True, upper) if q.ndim == 2",
             "return [gram(q, 0, True, upper) if q.ndim == 2", (PIPE, KRON), "P = QQᵀ instead of QᵀQ"),
    # ---- kron modes and linear algebra
    Mutation("kron-eq-tril", "plugins/rollfast_psgd/modes/eq.py", "jnp.triu(terms.t1 - terms.t2)",
             "jnp.tril(terms.t1 - terms.t2)", (MODES, PIPE), "EQ keeps the lower triangle"),
    Mutation("kron-eq-statistic", "plugins/rollfast_psgd/modes/eq.py", 'statistic="Qh", inverse_probe=True',
             'statistic="Ph", inverse_probe=True', (PIPE, MODES), "EQ registered with the wrong statistic"),
    Mutation("kron-left-step-sign", L, "(terms.t1 @ q - terms.t2 * q)", "(terms.t1 @ q + terms.t2 * q)",
             (MODES, PIPE), "E = T1 + T2 I in the Euclidean step (Q0.5EQ1.5, NS, QUAD)"),
    Mutation("kron-exp-sign", "plugins/rollfast_psgd/modes/exp.py", "expm_taylor(-terms.eta * whitening_error",
             "expm_taylor(terms.eta * whitening_error", (MODES, PIPE), "EXP steps up the whitening error"),
    Mutation("kron-power-bound-one-round", L, "    for _ in range(2):\n        v = v @ a",
             "    for _ in range(1):\n        v = v @ a", (PIPE,), "one power round in the norm bound"),
    Mutation("kron-hyper-cap-dropped", "plugins/rollfast_psgd/modes/hyper.py", "jnp.minimum(terms.eta, cap)",
             "jnp.maximum(terms.eta, cap)", (MODES, PIPE), "HYPER's trust-region cap becomes a floor"),
    Mutation("kron-taylor2-cap-sign", "plugins/rollfast_psgd/modes/taylor2.py", "cap = 0.5 / (terms.bound - terms.t2",
             "cap = 0.5 / (terms.bound + terms.t2", (MODES, PIPE), "TAYLOR2's cap uses ℓ + T2"),
    Mutation("kron-ns-stops-early", L, "(started_from > NS_TOL)", "(started_from > 1.0)", (MODES, PIPE),
             "Newton–Schulz stops before convergence"),
    Mutation("kron-procrustes-sign", L, "jnp.minimum(-t1 / jnp.where(t2 < 0, t2, -1.0)",
             "jnp.minimum(t1 / jnp.where(t2 < 0, t2, -1.0)", (MODES, PIPE), "Procrustes step rotates the wrong way"),
    # ---- prism
    Mutation("prism-momentum-beta", "plugins/rollfast_prism/transform.py", "b1 * m_prev + (1 - b1) * g",
             "(1 - b1) * m_prev + b1 * g", ("tests/prism/test_prism_reference.py", "tests/prism/test_prism.py"),
             "β ↔ 1−β in PRISM's momentum"),
    Mutation("prism-nesterov-target", "plugins/rollfast_prism/transform.py",
             "return b1 * m + (1 - b1) * g\n", "return m\n", ("tests/prism/test_prism_reference.py", "tests/prism/test_prism.py"),
             "Nesterov look-ahead dropped"),
    Mutation("prism-rounding-nearest", "plugins/rollfast_prism/transform.py",
             "return m.astype(dtype) if rounder is None else rounder.cast(m, dtype, key)",
             "return m.astype(dtype)", ("tests/rounding/test_rounding.py", "tests/prism/test_prism.py"),
             "PRISM's momentum always rounded to nearest"),
    # ---- magma
    Mutation("magma-keep-inverted", "plugins/rollfast_magma/__init__.py",
             "jax.random.uniform(k_mask, (len(flat_u),)) < magma_p",
             "jax.random.uniform(k_mask, (len(flat_u),)) > magma_p", ("tests/magma/test_magma.py",),
             "a leaf kept with probability 1 − p"),
    Mutation("magma-score-decay", "plugins/rollfast_magma/__init__.py",
             "SCORE_DECAY * s + (1 - SCORE_DECAY) * jax.nn.sigmoid(cos / magma_tau)",
             "(1 - SCORE_DECAY) * s + SCORE_DECAY * jax.nn.sigmoid(cos / magma_tau)", ("tests/magma/test_magma.py",),
             "β ↔ 1−β in the score EMA"),
    Mutation("magma-temperature", "plugins/rollfast_magma/__init__.py", "jax.nn.sigmoid(cos / magma_tau)",
             "jax.nn.sigmoid(cos * magma_tau)", ("tests/magma/test_magma.py",), "temperature multiplies"),
    # ---- schedule-free
    Mutation("sf-interpolation", "plugins/rollfast_schedule_free/__init__.py",
             "move = (1 - b_w) * (1 - c_w) * step + c_w * (z_old + step - y.astype(wide))",
             "move = b_w * (1 - c_w) * step + c_w * (z_old + step - y.astype(wide))",
             ("tests/schedule_free/test_schedule_free.py",), "β ↔ 1−β in y = (1−β)z + βx"),
    Mutation("sf-weight-off-by-one", "plugins/rollfast_schedule_free/__init__.py",
             "gamma = learning_rate(t) if callable", "gamma = learning_rate(t + 1) if callable",
             ("tests/schedule_free/test_schedule_free.py",), "weights from the next step's learning rate"),
    Mutation("sf-practical-weight", "plugins/rollfast_schedule_free/__init__.py",
             '"practical": gamma * gamma,', '"practical": gamma,', ("tests/schedule_free/test_schedule_free.py",),
             "practical weighting γ instead of γ²"),
    # ---- rounding
    Mutation("rounding-bf16-nearest", "plugins/rollfast_rounding/__init__.py",
             "noise = random_bits(key, x.shape) & jnp.uint32(0xFFFF)", "noise = jnp.full(x.shape, 0x8000, jnp.uint32)",
             ("tests/rounding/test_rounding.py",), "stochastic bf16 rounding replaced by nearest"),
    Mutation("rounding-f16-threshold", "plugins/rollfast_rounding/__init__.py",
             "up = uniform * (b - a) < jnp.abs(x) - a", "up = uniform * (b - a) < b - jnp.abs(x)",
             ("tests/rounding/test_rounding.py",), "float16 rounds up with the wrong probability"),
    # ---- clip (toolbox helpers used by the clip mask)
    Mutation("clip-permissive-inverted", "rollfast/toolbox.py", "return (ok if permissive else ok & ~spike), factor",
             "return (ok & ~spike if permissive else ok), factor", ("tests/clip/test_clip.py",),
             "permissive_spike_protection inverted"),
    Mutation("policy-guard-dropped", "rollfast/policy.py",
             "            updates, new = run_unless_skipped(ok, step, updates, state)\n        else:",
             "            updates, new = step(updates, state)\n        else:", ("tests/core/test_nonfinite.py",),
             "the core's non-finite policy runs a jitted step whatever the gradient"),
    Mutation("clip-rms-dropped-min", "rollfast/toolbox.py",
             "u = u * jnp.minimum(1.0, a_rms * scale / (rms + tiny)).astype(u.dtype)",
             "u = u * (a_rms * scale / (rms + tiny)).astype(u.dtype)", ("tests/clip/test_clip.py",),
             "RMS cap also scales small updates up"),
    Mutation("clip-cap-not-relative-to-lr", "plugins/rollfast_clip/__init__.py",
             "1.0 if lr is None else jnp.abs(jnp.asarray(lr, jnp.float32))", "1.0",
             ("tests/clip/test_clip.py",), "caps not scaled by the learning rate"),
    # ---- registry
    Mutation("registry-ties-last-wins", "rollfast/registry.py", "if new_rank > old_rank else",
             "if new_rank >= old_rank else", ("tests/core/test_registry_order.py",), "between equals the last loaded wins"),
    Mutation("registry-priority-first", "rollfast/registry.py",
             "new_rank = (record.provider.first_party, record.priority)\n"
             "            old_rank = (holder.provider.first_party, holder.priority)",
             "new_rank = (record.priority, record.provider.first_party)\n"
             "            old_rank = (holder.priority, holder.provider.first_party)",
             ("tests/core/test_registry_order.py",), "priority ranks above first party"),
    Mutation("registry-load-order", "rollfast/registry.py",
             "key=lambda ep: (ep.dist.name != FIRST_PARTY if ep.dist else True, ep.name))",
             "key=lambda ep: (ep.dist.name == FIRST_PARTY if ep.dist else True, ep.name))",
             ("tests/core/test_registry_order.py",), "third-party entry points load first"),
    # ---- assembly
    Mutation("assembly-mask-order", "rollfast/assembly.py", 'key=lambda r: r.metadata.get("order", 0)) + averages',
             'key=lambda r: -r.metadata.get("order", 0)) + averages', ("tests/core/test_wrappers_compose.py", "tests/core/test_core.py"),
             "masks wrapped in reverse order (clip outermost)"),
    Mutation("assembly-lr-default", "rollfast/assembly.py", 'routed[id(p)].setdefault("learning_rate", lr)',
             'routed[id(p)].setdefault("learning_rate", 1.0)', ("tests/core/test_wrappers_compose.py", "tests/clip/test_clip.py"),
             "wrappers get learning rate 1 instead of the family's"),
    Mutation("assembly-first-taker-only", "rollfast/assembly.py",
             "        for p in takers:\n            routed[id(p)][option] = value",
             "        for p in takers[:1]:\n            routed[id(p)][option] = value",
             ("tests/core/test_core.py", "tests/core/test_wrappers_compose.py"), "an option reaches only its first taker"),
]


def scratch_copy() -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="rollfast-mutations-"))
    ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build", "dist")
    shutil.copytree(ROOT, tmp / "tree", ignore=ignore)
    return tmp / "tree"


def line_of(text: str, snippet: str) -> int:
    return text[: text.index(snippet)].count("\n") + 1


def run_tests(tree: Path, tests: tuple[str, ...]) -> tuple[str, str]:
    """``(status, killer)``: "killed" and the first failing test, or "survived"."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(tree / p) for p in ("", "plugins", "contrib")),
               PYTHONDONTWRITEBYTECODE="1")
    cmd = [str(PYTHON), "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *tests]
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return "killed", "timeout"
    if proc.returncode == 0:
        return "survived", ""
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)
    if failed:
        return "killed", failed[0]
    return "killed", f"pytest exit {proc.returncode}: " + (proc.stdout + proc.stderr).strip().splitlines()[-1][:80]


def check_imports(tree: Path) -> None:
    """The scratch copy, not the installed tree, must be what the tests import."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(tree / p) for p in ("", "plugins", "contrib")))
    out = subprocess.run([str(PYTHON), "-c", "import rollfast, rollfast_psgd; print(rollfast.__file__, "
                          "rollfast_psgd.__file__)"], cwd=tree, env=env, capture_output=True, text=True)
    assert all(str(tree) in p for p in out.stdout.split()), f"imports do not come from the copy: {out}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    if args.list:
        for m in chosen:
            print(f"{m.name:32} {m.file}: {m.what}")
        return 0
    tree = scratch_copy()
    check_imports(tree)
    print("| mutation | what | file:line | result | killed by |\n|---|---|---|---|---|", flush=True)
    bad = 0
    try:
        for m in chosen:
            path = tree / m.file
            text = path.read_text() if path.exists() else ""
            if text.count(m.original) != 1:
                found = "snippet not found" if m.original not in text else "snippet not unique"
                print(f"| {m.name} | {m.what} | {m.file} | **{found}** | |", flush=True)
                bad += 1
                continue
            where = f"{m.file}:{line_of(text, m.original)}"
            path.write_text(text.replace(m.original, m.replacement))
            start = time.time()
            try:
                status, killer = run_tests(tree, m.tests)
            finally:
                path.write_text(text)
            bad += status != "killed"
            shown = status if status == "killed" else f"**{status}**"
            print(f"| {m.name} | {m.what} | {where} | {shown} ({time.time() - start:.0f} s) | {killer} |",
                  flush=True)
    finally:
        shutil.rmtree(tree.parent, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
