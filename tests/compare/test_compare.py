"""`rollfast compare`: name grammar, tasks, fairness, failures as results, outputs."""

from __future__ import annotations

import dataclasses
import json
import os
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rollfast
from rollfast.cli import main
from rollfast.compare import Options, Task, compare, get_task, parse, parse_all, report, runner, tasks
from rollfast.compare.charlm import apply, charlm_task, encode, init
from rollfast.compare.cli import learning_rates
from rollfast.compare.tasks import TaskError
from rollfast.registry import as_plugin

CENTRE = jnp.array([[3.0, -4.0], [0.0, 12.0]])  # ||c|| = 13


def make_task() -> Task:
    """A user task (loaded as ``test_compare:make_task``): ½‖W − C‖², optimum C, W₀ = 0."""
    return Task(name="quadratic", init=lambda key: {"w": jnp.zeros((2, 2))},
                loss=lambda p, batch: 0.5 * jnp.sum((p["w"] - CENTRE) ** 2),
                batch=lambda key, step: None,
                evaluate=lambda p: jnp.linalg.norm(p["w"] - CENTRE),
                metric="distance to optimum", steps=12, learning_rate=0.3, target=1.0,
                description="1/2 ||W - C||^2")


def not_a_task():
    return {"w": 1}


def run_cli(capsys, *argv):
    code = main(["compare", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- name grammar -------------------------------------------------------------------

@pytest.mark.parametrize("text, family, mode, masks, averages", [
    ("adamw", "adamw", None, (), ()),
    ("kron", "kron", None, (), ()),
    ("kron:EXP", "kron", "EXP", (), ()),
    ("Kron:exp", "Kron", "exp", (), ()),
    ("prism:bidirectional", "prism", "bidirectional", (), ()),
    ("kron:EQ+magma", "kron", "EQ", ("magma",), ()),
    ("adamw+magma+schedule_free", "adamw", None, ("magma",), ("schedule_free",)),
    ("schedule_free(adamw)", "adamw", None, (), ("schedule_free",)),
    ("schedule_free(kron:EXP+magma)", "kron", "EXP", ("magma",), ("schedule_free",)),
    ("optax:lion", "optax:lion", None, (), ()),
    ("psgd:kron:EXP", "psgd:kron", "EXP", (), ()),
    ("kron:psgd_exp:EXP", "kron", "psgd_exp:EXP", (), ()),
])
def test_grammar_resolves_families_modes_wrappers_and_plugin_names(text, family, mode, masks, averages):
    spec = parse(text)
    assert (spec.family, spec.mode, spec.masks, spec.averages) == (family, mode, masks, averages)
    assert spec.label == text


def test_grammar_reaches_third_party_plugins():
    names = {r.name for r in rollfast.available("mode", "kron")}
    if "CAYLEY" not in names:
        pytest.skip("the kron-cayley example plugin is not installed")
    assert parse("kron:kron_cayley:CAYLEY").mode == "kron_cayley:CAYLEY"
    implied = parse("kron_cayley:CAYLEY")
    assert (implied.family, implied.mode) == ("kron", "kron_cayley:CAYLEY")
    assert parse("adamod+trust_ratio").masks == ("trust_ratio",)


@pytest.mark.parametrize("text, kind, suggestion", [
    ("kronn", "family", "kron"),
    ("kron:EPX", "mode", "EXP"),
    ("optax:lino", "family", "optax:lion"),
    ("adamw+magmaa", "wrapper", "magma"),
    ("schedule_fre(adamw)", "average", "schedule_free"),
])
def test_unknown_names_fail_with_the_registrys_did_you_mean(text, kind, suggestion):
    with pytest.raises(rollfast.UnknownNameError) as info:
        parse(text)
    assert info.value.kind == kind and suggestion in info.value.suggestions


@pytest.mark.parametrize("text", ["", "schedule_free(adamw", "adamw+", "(adamw)x", "adamw++magma"])
def test_malformed_names_are_errors(text):
    with pytest.raises((ValueError, rollfast.UnknownNameError)):
        parse(text)


def test_repeated_names_and_two_averages_are_errors():
    with pytest.raises(ValueError, match="named twice"):
        parse_all(["adamw", "adamw"])
    with pytest.raises(ValueError, match="at most one average"):
        parse("schedule_free(adamw+schedule_free)")


def test_a_spec_builds_exactly_what_rollfast_get_builds():
    params = {"w": jnp.arange(6.0).reshape(2, 3) / 7}
    grads = {"w": jnp.cos(jnp.arange(6.0)).reshape(2, 3)}
    ours = parse("adamw+schedule_free").build(1e-2)
    theirs = rollfast.get("adamw", learning_rate=1e-2, average="schedule_free")
    a, _ = ours.update(grads, ours.init(params), params)
    b, _ = theirs.update(grads, theirs.init(params), params)
    np.testing.assert_array_equal(a["w"], b["w"])


def test_learning_rate_options():
    assert learning_rates(["1e-3", "adamw=3e-3"], ["adamw", "kron"]) == {"*": 1e-3, "adamw": 3e-3}
    with pytest.raises(rollfast.UnknownNameError, match="did you mean 'adamw'"):
        learning_rates(["adamx=1e-3"], ["adamw"])
    for bad in ("adamw=fast", "adamw=-1"):
        with pytest.raises(ValueError, match="--lr"):
            learning_rates([bad], ["adamw"])


def test_cli_rejects_unknown_names_before_running(capsys):
    code, out, err = run_cli(capsys, "adamw", "kron:EPX", "--task", "lstsq")
    assert code == 2 and "did you mean 'EXP'" in err and out == ""
    code, _, err = run_cli(capsys, "adamw", "--task", "digitz")
    assert code == 2 and "did you mean 'digits'" in err


# -- the runner: a known answer, determinism, fairness ------------------------------

def _run(task, name, lr, steps, seed=0):
    spec = parse(name)
    compiled = runner.compile_run(task, spec, steps)
    return runner.train(task, compiled, jax.jit(task.evaluate), label=name, seed=seed,
                        learning_rate=lr, steps=steps)


def test_sgd_on_a_quadratic_follows_the_closed_form():
    """Gradient descent on ½‖W − C‖² from 0: W_t = C(1 − (1−η)^t), so the loss before
    step t is ½(1−η)^{2(t−1)}‖C‖² and the final distance (1−η)^T‖C‖ — across chunks."""
    task, eta, steps = make_task(), 0.25, 120  # 120 steps = 3 chunks of 40
    run = _run(task, "optax:sgd", eta, steps)
    t = np.arange(1, steps + 1)
    expected = 0.5 * (1 - eta) ** (2 * (t - 1)) * 169.0
    np.testing.assert_allclose(run.losses, expected, rtol=1e-4, atol=1e-8)  # float32 W
    assert run.metric == pytest.approx(13 * 0.75**steps, abs=1e-5)
    first_below = int(np.argmax(runner.smooth(expected) <= 1.0)) + 1
    assert run.stats["steps_to_target"] == first_below
    assert len(run.times) == steps and np.all(np.diff(run.times) > 0)
    compiled = runner.compile_run(task, parse("optax:sgd"), steps)
    short = runner.train(task, compiled, jax.jit(task.evaluate), label="sgd", seed=0,
                         learning_rate=eta, steps=steps, budget=1e-9)
    np.testing.assert_array_equal(short.losses, run.losses[:40])  # --budget: one chunk


def test_same_seed_same_numbers_and_every_optimizer_sees_the_same_start():
    task = get_task("digits-mlp", steps=8)
    evaluate = jax.jit(task.evaluate)
    adamw, sgd = (runner.compile_run(task, parse(n), 8) for n in ("adamw", "optax:sgd"))
    train = lambda compiled, lr, seed: runner.train(task, compiled, evaluate, label="x", seed=seed,
                                                    learning_rate=lr, steps=8)
    a, b = train(adamw, 3e-3, 1), train(adamw, 3e-3, 1)
    np.testing.assert_array_equal(a.losses, b.losses)
    assert a.metric == b.metric
    assert train(adamw, 3e-3, 2).losses[0] != a.losses[0]
    other = train(sgd, 0.1, 1)
    assert other.losses[0] == a.losses[0]  # same parameters, same first batch
    assert other.losses[1] != a.losses[1]


def test_tune_picks_the_best_rate_of_the_grid_and_scores_divergence_as_none():
    """On ½‖W − C‖² gradient descent contracts by |1 − η|: of 0.3·{0.1, …, 10} the rate
    0.3·√10 ≈ 0.95 is best and 3 diverges."""
    task = make_task()
    compiled = runner.compile_run(task, parse("optax:sgd"), 300)  # sweep runs: 100 steps
    best, scores = runner.tune(task, compiled, jax.jit(task.evaluate), label="sgd", steps=300)
    assert best == pytest.approx(0.3 * 10**0.5)
    assert scores[max(scores)] is None  # |1 - 3|^100 overflows
    assert len(scores) == len(runner.TUNE_GRID)


def test_each_family_runs_at_its_task_rate_unless_told_otherwise():
    """``family_learning_rates`` sets a family's rate whatever its spelling or wrapper;
    other families get the task's rate; ``--lr`` wins; ``--tune`` sweeps around it."""
    task = dataclasses.replace(make_task(), steps=4, family_learning_rates={"sgd": 0.5})
    specs = parse_all(["optax:sgd", "schedule_free(optax:sgd)", "adamw"])
    options = Options(names=[s.label for s in specs], tasks=["quadratic"])
    (result,) = compare(specs, [task], options)
    assert [e.learning_rate for e in result.entries] == [0.5, 0.5, 0.3]
    assert result.entries[0].runs[0].metric == pytest.approx(13 * 0.5**4, rel=1e-5)
    told = dataclasses.replace(options, learning_rates={"optax:sgd": 0.25})
    (result,) = compare(specs[:1], [task], told)
    assert result.entries[0].learning_rate == 0.25
    tuned = dataclasses.replace(options, tune=True)
    (result,) = compare(specs[:1], [dataclasses.replace(task, steps=40)], tuned)
    (entry,) = result.entries
    assert sorted(entry.sweep) == pytest.approx([0.5 * m for m in sorted(runner.TUNE_GRID)])
    assert entry.learning_rate == 0.5  # |1 - η| is smallest at 0.5 of 0.5·{0.1, …, 10}


def test_builtin_family_rates_name_registered_families():
    known = {r.name for r in rollfast.registry().records("family")}
    for name, rates in tasks.FAMILY_LEARNING_RATES.items():
        assert name in tasks.BUILTIN and set(rates) <= known and all(r > 0 for r in rates.values())


# -- failures are results -----------------------------------------------------------

@pytest.fixture
def exploding_family():
    def boom(learning_rate):
        def update(updates, state, params=None):
            raise RuntimeError("boom in update")
        return optax.GradientTransformation(lambda p: optax.EmptyState(), update)

    plugin = as_plugin(precondition=lambda register: register.family("boom", boom))
    rollfast.plugins.register(plugin, "boom_plugin")
    yield
    rollfast.plugins.reset()


def test_a_diverging_or_raising_optimizer_is_reported_and_the_others_run(exploding_family):
    task = get_task("lstsq", steps=40)
    specs = parse_all(["optax:sgd", "boom", "adamw"])
    options = Options(names=[s.label for s in specs], tasks=["lstsq"],
                      learning_rates={"optax:sgd": 100.0, "adamw": 1e-2})
    (result,) = compare(specs, [task], options)
    sgd, boom, adamw = result.entries
    assert sgd.runs[0].status == "diverged" and "non-finite loss at step" in sgd.runs[0].error
    assert boom.runs[0].status == "error" and "boom in update" in boom.runs[0].error
    assert adamw.status == "ok" and adamw.runs[0].metric < 1.0
    assert result.winner() is adamw
    header, body = report.rows(result)
    assert body[0][-1].startswith("diverged") and body[1][-1].startswith("error")
    assert body[2][-1] == "★ best"


# -- outputs --------------------------------------------------------------------------

def test_user_task_through_the_cli_with_json_and_seeds(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "has", lambda module: False)  # the no-extra path
    code, out, _ = run_cli(capsys, "optax:sgd", "schedule_free(optax:sgd)", "--task",
                           "test_compare:make_task", "--seeds", "2", "--steps", "30",
                           "--lr", "0.5", "--out", str(tmp_path), "--json")
    assert code == 0
    assert "quadratic — 30 steps" in out and report.HINT in out and "★ best" in out
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["schema"] == "rollfast.compare/1"
    assert {"versions", "machine", "options", "argv", "wall_s", "cpu_s", "tasks"} <= set(data)
    assert data["versions"]["jax"] == jax.__version__
    assert data["options"]["seeds"] == 2 and data["options"]["learning_rates"] == {"*": 0.5}
    (task,) = data["tasks"]
    assert task["name"] == "quadratic" and task["steps"] == 30 and task["winner"] in data["options"]["names"]
    sgd = task["results"][0]
    assert sgd["name"] == "optax:sgd" and sgd["status"] == "ok" and len(sgd["runs"]) == 2
    assert sgd["runs"][0]["loss"] == sgd["runs"][1]["loss"]  # the task ignores the seed
    mean, std = sgd["summary"]["metric"]
    assert mean == pytest.approx(13 * 0.5**30, abs=1e-6) and std == 0.0
    for key in ("final_loss", "best_loss", "steps_to_target", "ms_per_step", "compile_s", "state_mb"):
        assert key in sgd["summary"]
    assert len(sgd["runs"][0]["time_s"]) == 30


def test_out_dash_writes_the_json_to_stdout_and_the_tables_to_stderr(capsys):
    code, out, err = run_cli(capsys, "optax:sgd", "--task", "test_compare:make_task", "--steps", "10",
                             "--lr", "0.5", "--out", "-")
    assert code == 0 and "quadratic — 10 steps" in err and "quadratic — 10 steps" not in out
    data = json.loads(out)
    assert data["schema"] == report.SCHEMA
    (entry,) = data["tasks"][0]["results"]
    assert entry["summary"]["metric"][0] == pytest.approx(13 * 0.5**10, abs=1e-6)


def test_lapack_runs_on_one_thread_unless_the_user_chose(capsys, monkeypatch):
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    run_cli(capsys, "adamw", "kron:EPX")
    assert os.environ["OPENBLAS_NUM_THREADS"] == "1"
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    run_cli(capsys, "adamw", "kron:EPX")
    assert os.environ["OPENBLAS_NUM_THREADS"] == "2"


def test_tune_through_the_cli_records_the_sweep(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "optax:sgd", "--task", "test_compare:make_task", "--tune",
                           "--steps", "300", "--out", str(tmp_path), "--json")
    assert code == 0
    (entry,) = json.loads((tmp_path / "compare.json").read_text())["tasks"][0]["results"]
    assert entry["learning_rate"] == pytest.approx(0.3 * 10**0.5)
    assert len(entry["sweep"]) == 5 and entry["sweep"][repr(3.0)] is None
    assert entry["runs"][0]["learning_rate"] == entry["learning_rate"]


def test_bad_user_tasks_are_named(capsys):
    with pytest.raises(TaskError, match="returned dict"):
        get_task("test_compare:not_a_task")
    code, _, err = run_cli(capsys, "adamw", "--task", "test_compare:nothing_here")
    assert code == 2 and "has no function 'nothing_here'" in err
    code, _, err = run_cli(capsys, "adamw", "--task", "no_such_module_xyz:make")
    assert code == 2 and "cannot import module" in err


def test_plots_are_written_when_matplotlib_is_present(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    code, out, _ = run_cli(capsys, "optax:sgd", "--task", "test_compare:make_task", "--steps", "10",
                           "--out", str(tmp_path))
    assert code == 0
    png = tmp_path / "quadratic.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in out


# -- built-in tasks -----------------------------------------------------------------

def test_builtin_tasks_start_where_theory_says():
    """At initialisation: least squares is at distance 1 from its optimum; the digits
    and character models are near the uniform prediction (loss ≈ ln classes)."""
    key = jax.random.PRNGKey(0)
    lstsq = get_task("lstsq")
    assert float(lstsq.evaluate(lstsq.init(key))) == pytest.approx(1.0, abs=1e-5)
    digits = get_task("digits-mlp")
    loss = jax.jit(lambda k: digits.loss(digits.init(k), digits.batch(k, 0)))(key)
    assert abs(float(loss) - math.log(10)) < 0.5
    lm = charlm_task(width=16, layers=1, heads=2, context=8)
    vocab = len(encode()[1])
    params = jax.jit(lm.init)(key)
    assert abs(float(jax.jit(lm.loss)(params, lm.batch(key, 0))) - math.log(vocab)) < 0.5
    assert float(jax.jit(lm.evaluate)(params)) == pytest.approx(math.log2(vocab), abs=0.75)


def test_task_groups_and_the_small_default_language_model():
    assert tasks.expand(["all"]) == list(tasks.BUILTIN)
    assert tasks.expand(["digits", "digits-mlp", "lstsq"]) == ["digits-mlp", "digits-cnn", "lstsq"]
    assert set(tasks.DEFAULT_TASKS) <= set(tasks.BUILTIN)
    key = jax.random.PRNGKey(0)
    sizes = {name: sum(x.size for x in jax.tree.leaves(jax.eval_shape(get_task(name).init, key)))
             for name in ("charlm", "charlm-small")}
    assert sizes == {"charlm": 237_600, "charlm-small": 126_816}  # one block of 110,784 fewer
    assert get_task("charlm-small").name == "charlm-small"


def test_charlm_is_causal():
    """Changing a later character never changes an earlier prediction."""
    params = jax.jit(lambda k: init(k, vocab=11, width=16, layers=1, context=8))(jax.random.PRNGKey(1))
    x = jnp.array([[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 0, 7, 8]])
    logits = jax.jit(lambda p, x: apply(p, x, heads=2))(params, x)
    a, b = logits[:1], logits[1:]
    np.testing.assert_allclose(a[0, :5], b[0, :5], rtol=1e-6)
    assert not np.allclose(a[0, 5:], b[0, 5:])
