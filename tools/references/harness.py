"""Record reference trajectories of independent optimizer implementations.

Not run in CI. Run it with the reference environment (see ``docs/references.md``)::

    python3 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install -r tools/references/requirements.txt
    /tmp/refenv/bin/python tools/references/harness.py            # every run
    /tmp/refenv/bin/python tools/references/harness.py soap mars  # runs whose tag starts so

For each run it trains one problem of ``problems.py`` with the reference optimizer
and writes, into ``tests/fixtures/references/<problem>.npz``: the problem's data and
initial parameters, and per run tag the losses before every step and after the last
(``<tag>/loss``), the parameters after ``keep`` steps (``<tag>/p/<leaf>``, JAX layout)
and the settings as JSON (``<tag>/settings``). Numbers only.
"""

from __future__ import annotations

import importlib.metadata
import json
import pathlib
import sys

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from problems import PROBLEMS  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "references"
torch.set_default_dtype(torch.float32)


# --- losses in torch (JAX layout tensors) ------------------------------------------

def lsq_loss(p, d):
    return 0.5 * ((d["x"] @ p["w"] + p["b"] + p["c"] - d["y"]) ** 2).sum()


def mixed_loss(p, d):
    quad = lambda a, m, b: ((a @ m @ b) ** 2).sum()
    return 0.5 * ((d["h_v"] * (p["vec"] - d["t_v"]) ** 2).sum() + d["h_s"] * (p["scal"] - d["t_s"]) ** 2
                  + quad(d["a"], p["mat"] - d["t_m"], d["bm"])
                  + ((d["ck"] @ (p["kern"] - d["t_k"]).reshape(18, 4)) ** 2).sum())


def mlp_loss(p, d):
    return ((torch.tanh(d["x"] @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"] - d["y"]) ** 2).mean()


LOSSES = {"lsq": lsq_loss, "mixed": mixed_loss, "mlp": mlp_loss}


# --- layouts --------------------------------------------------------------------------

def to_layout(x, layout):
    """A JAX-layout array in the reference's layout (``"torch"``: ``(out, in)``,
    kernels ``(out, in, h, w)``)."""
    if layout == "jax" or x.ndim < 2:
        return x
    return x.T if x.ndim == 2 else x.permute(3, 2, 0, 1)


def from_layout(x, layout):
    if layout == "jax" or x.ndim < 2:
        return x
    return x.T if x.ndim == 2 else x.permute(2, 3, 1, 0)


# --- the references ---------------------------------------------------------------

def _heavyball():
    """heavyball with torch.compile off (eager; the same arithmetic, no autotuning)."""
    import heavyball
    heavyball.utils.compile_mode = None
    return heavyball


def soap_heavyball(params, lr):
    heavyball = _heavyball()
    return heavyball.SOAP(params, lr=lr, betas=(0.95, 0.95), shampoo_beta=0.95, eps=1e-8,
                          weight_decay=0.01, precondition_frequency=10, max_precond_dim=10000,
                          merge_dims=False, precondition_1d=False, use_precond_schedule=False,
                          compile_step=False)


def soap_pytorch_optimizer(params, lr):
    from pytorch_optimizer import SOAP
    return SOAP(params, lr=lr, betas=(0.95, 0.95), shampoo_beta=0.95, eps=1e-8, weight_decay=0.01,
                precondition_frequency=10, max_precondition_dim=10000, merge_dims=False,
                precondition_1d=False)


def mars(kind):
    def make(params, lr):
        from pytorch_optimizer import MARS
        return MARS(params, lr=lr, betas=(0.95, 0.99), gamma=0.025, mars_type=kind, optimize_1d=True,
                    weight_decay=0.01, eps=1e-8, foreach=False)
    return make


def qhadamw(params, lr):
    from qhoptim.pyt import QHAdam
    return QHAdam(params, lr=lr, betas=(0.995, 0.999), nus=(0.7, 1.0), weight_decay=0.01,
                  decouple_weight_decay=True, eps=1e-8)


def normuon(params, lr):
    from pytorch_optimizer import NorMuon
    groups = [{"params": [p for p in params if p.ndim >= 2], "use_muon": True},
              {"params": [p for p in params if p.ndim < 2], "use_muon": False}]
    return NorMuon(groups, lr=lr, momentum=0.95, beta2=0.95, weight_decay=0.0, nesterov=False,
                   ns_steps=5, ns_coeffs="original", update_scale="match_rms", eps=1e-8,
                   adamw_lr=lr, adamw_betas=(0.9, 0.999), adamw_wd=0.0, adamw_eps=1e-8, foreach=False)


def apollo(scale_type, rank, scale):
    def make(params, lr):
        from apollo_torch import APOLLOAdamW
        mats = [p for p in params if p.ndim == 2]
        rest = [p for p in params if p.ndim != 2]
        groups = [{"params": mats, "rank": rank, "proj": "random", "scale_type": scale_type,
                   "scale": scale, "update_proj_gap": 200, "proj_type": "std"}, {"params": rest}]
        return APOLLOAdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    return make


def adamw8bit(params, lr):
    import bitsandbytes as bnb
    return bnb.optim.AdamW8bit(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                               min_8bit_size=0)


def sf_adamw(params, lr):
    import schedulefree
    return schedulefree.AdamWScheduleFree(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                          warmup_steps=0, r=0.0, weight_lr_power=2.0)


def sf_sgd(params, lr):
    import schedulefree
    return schedulefree.SGDScheduleFree(params, lr=lr, momentum=0.9, weight_decay=0.0, warmup_steps=0,
                                        r=0.0, weight_lr_power=2.0)


# tag: (problem, factory, package, learning rate, steps, keep, layout)
RUNS = {
    "soap_heavyball": ("lsq", soap_heavyball, "heavyball", 3e-2, 100, 4, "jax"),
    "soap_pytorch_optimizer": ("lsq", soap_pytorch_optimizer, "pytorch-optimizer", 3e-2, 100, 4, "jax"),
    "soap_mixed": ("mixed", soap_pytorch_optimizer, "pytorch-optimizer", 3e-2, 100, 4, "jax"),
    "mars_adamw": ("mlp", mars("adamw"), "pytorch-optimizer", 1e-2, 100, 3, "jax"),
    "mars_adamw_lsq": ("lsq", mars("adamw"), "pytorch-optimizer", 3e-2, 100, 3, "jax"),
    "mars_lion": ("mlp", mars("lion"), "pytorch-optimizer", 1e-3, 100, 3, "jax"),
    "qhadamw": ("mixed", qhadamw, "qhoptim", 3e-2, 100, 3, "jax"),
    "qhadamw_mlp": ("mlp", qhadamw, "qhoptim", 1e-2, 100, 3, "jax"),
    "normuon": ("mlp", normuon, "pytorch-optimizer", 2e-2, 100, 3, "torch"),
    "apollo": ("mlp", apollo("channel", 4, 1.0), "apollo-torch", 1e-2, 100, 0, "torch"),
    "apollo_mini": ("mlp", apollo("tensor", 1, 128 ** 0.5), "apollo-torch", 1e-2, 100, 0, "torch"),
    "adamw8bit": ("mlp", adamw8bit, "bitsandbytes", 1e-2, 100, 1, "jax"),
    "adamw8bit_lsq": ("lsq", adamw8bit, "bitsandbytes", 3e-2, 100, 1, "jax"),
    "sf_adamw": ("mlp", sf_adamw, "schedulefree", 1e-2, 100, 3, "jax"),
    "sf_sgd": ("mlp", sf_sgd, "schedulefree", 1e-1, 100, 3, "jax"),
}
SOAP_TABLE = {"heavyball": soap_heavyball, "pytorch-optimizer": soap_pytorch_optimizer}
SOAP_LRS, SOAP_STEPS = (1e-2, 3e-2, 1e-1), 300


def train(problem, factory, lr, steps, keep, layout):
    """Losses before each step and after the last, and the parameters after ``keep`` steps."""
    data, init = PROBLEMS[problem]()
    d = {k: torch.tensor(v) for k, v in data.items()}
    names = list(init)
    leaves = [to_layout(torch.tensor(init[n]), layout).clone().requires_grad_(True) for n in names]
    opt = factory(leaves, lr)
    loss_fn = LOSSES[problem]
    view = lambda: {n: from_layout(x, layout) for n, x in zip(names, leaves)}
    losses, kept = [], None
    for t in range(steps + 1):
        if hasattr(opt, "train"):
            opt.train()
        loss = loss_fn(view(), d)
        losses.append(loss.item())
        if t == keep:
            kept = {n: from_layout(x.detach(), layout).numpy().copy() for n, x in zip(names, leaves)}
        if t == steps:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    return np.array(losses), kept


def settings(package, factory, lr, steps, keep, layout):
    return json.dumps({"package": package, "version": importlib.metadata.version(package),
                       "torch": torch.__version__, "factory": factory.__qualname__,
                       "learning_rate": lr, "steps": steps, "keep": keep, "layout": layout})


def main(prefixes):
    arrays = {name: {} for name in PROBLEMS}
    for name in PROBLEMS:
        path = OUT / f"{name}.npz"
        if path.exists():
            arrays[name].update(np.load(path))
        data, init = PROBLEMS[name]()
        arrays[name].update({f"data/{k}": v for k, v in data.items()})
        arrays[name].update({f"init/{k}": v for k, v in init.items()})
    chosen = {t: r for t, r in RUNS.items() if not prefixes or t.startswith(tuple(prefixes))}
    for tag, (problem, factory, package, lr, steps, keep, layout) in chosen.items():
        losses, kept = train(problem, factory, lr, steps, keep, layout)
        out = arrays[problem]
        out[f"{tag}/loss"] = losses.astype(np.float32)
        out.update({f"{tag}/p/{k}": v for k, v in (kept or {}).items()})
        out[f"{tag}/settings"] = np.array(settings(package, factory, lr, steps, keep, layout))
        print(f"{tag:24s} {problem:6s} lr={lr:g}: loss {losses[0]:.4g} -> {losses[-1]:.4g}")
    if not prefixes or any("soap_table".startswith(p) for p in prefixes):
        for package, factory in SOAP_TABLE.items():
            for lr in SOAP_LRS:
                losses, _ = train("lsq", factory, lr, SOAP_STEPS, 0, "jax")
                tag = f"soap_table/{package}/{lr:g}"
                arrays["lsq"][f"{tag}/loss"] = losses.astype(np.float32)
                arrays["lsq"][f"{tag}/settings"] = np.array(
                    settings(package, factory, lr, SOAP_STEPS, 0, "jax"))
                print(f"{tag:30s}: step1 {losses[1]:.4g} step2 {losses[2]:.4g} final {losses[-1]:.4g}")
    OUT.mkdir(parents=True, exist_ok=True)
    for name, out in arrays.items():
        np.savez_compressed(OUT / f"{name}.npz", **out)


if __name__ == "__main__":
    main(sys.argv[1:])
