"""Name collisions in the registry, in every load order: a first-party plugin beats a
third-party one whatever their priorities, within a party the higher priority wins,
and between equals the one loaded first keeps the name. Losers stay reachable as
``"<plugin>:<name>"``; a third-party loser (or an equal) is warned about."""

import itertools
import warnings

import pytest

import rollfast
from rollfast.registry import Registry, as_plugin

# (plugin name, first party, priority)
CONTENDERS = [("f0", True, 0), ("f1", True, 1), ("t9", False, 9), ("t0", False, 0)]


def plugin(tag, priority, alias=False):
    def mask(register):
        register("shared" if not alias else f"own_{tag}", lambda inner, first_moment: (tag, inner),
                 priority=priority, aliases=("shared",) if alias else ())

    def precondition(register):
        register.family("fam", lambda learning_rate=1.0: tag, priority=priority)
        register.mode("fam", "geom", update_dense=lambda q, t: tag, priority=priority)

    return as_plugin(mask=mask, precondition=precondition)


def load(order, alias=False):
    reg = Registry(autoload=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, first, priority in order:
            reg.register(plugin(name, priority, alias and not first), name, first_party=first)
    return reg, [str(w.message) for w in caught if issubclass(w.category, rollfast.RollfastPluginWarning)]


def expected_winner(group):
    best = max((first, priority) for _, first, priority in group)
    return next(name for name, first, priority in group if (first, priority) == best)


ORDERS = [order for size in (2, 3, 4) for group in itertools.combinations(CONTENDERS, size)
          for order in itertools.permutations(group)]


@pytest.mark.parametrize("alias", [False, True])
def test_collision_winner_in_every_load_order(alias):
    """All 2-, 3- and 4-plugin load orders (60): the same winner for a mask, a family and
    a mode of a family, whichever loads first; every loser reachable by qualified name;
    a warning names each third-party loser, none names a first-party one that lost on
    priority."""
    for order in ORDERS:
        reg, messages = load(order, alias)
        winner = expected_winner(order)
        assert reg.lookup("mask", "shared").provider.plugin == winner, order
        assert reg.lookup("family", "fam").factory() == winner, order
        assert reg.lookup("mode", "geom", "fam").impl["update_dense"](None, None) == winner, order
        for name, first, _ in order:
            assert reg.lookup("family", f"{name}:fam").provider.plugin == name
            named = [m for m in messages if f"plugin {name!r}" in m]
            if name == winner or first:
                assert not named, (order, name, named)
            else:  # one warning per colliding kind: mask, family and mode
                assert len(named) == 3 and all("use" in m and f"{name}:" in m for m in named), (order, named)


def test_equal_rank_keeps_the_first_loaded_and_warns():
    """Two third-party plugins of equal priority: the first loaded keeps the name in
    both orders, and the second is warned about with its qualified name."""
    for a, b in (("ta", "tb"), ("tb", "ta")):
        reg, messages = load([(a, False, 3), (b, False, 3)])
        assert reg.lookup("family", "fam").factory() == a
        assert any(f"plugin {b!r}" in m and f"{b}:fam" in m for m in messages)
        assert not any(f"plugin {a!r}" in m for m in messages)


def test_first_party_entry_points_load_first():
    """The process registry loads first-party entry points before third-party ones, so
    a third-party family named like a first-party one never wins by loading first."""
    infos = rollfast.registry().plugins()
    parties = [info.provider.first_party for info in infos if info.provider.distribution != "<runtime>"]
    assert parties == sorted(parties, reverse=True) and parties[0]
