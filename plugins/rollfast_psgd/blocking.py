"""Blocked factors: where the factors of a large matrix live (``kron(block_size=...)``).

A leaf is viewed as a matrix (:func:`matrix_view`) and, when a side exceeds the block
size, cut into pieces that each get their own small factors (:func:`piece_rule`):

* ``"tiles"``: both sides ``≤ max_size_dense``: a grid of ``bs × bs`` tiles, each with a
  dense left and a dense right factor. The tiles of *all* such leaves of the tree (and of
  every layer of a scanned leaf) are stacked into one ``(N, bs, bs)`` unit, fitted by one
  ``vmap`` like a scanned leaf, so the compiled step does not grow with ``N``.
* ``"rows"`` / ``"cols"``: one side ``> max_size_dense``: the other side is cut into strips
  of ``bs``; a strip has a dense ``bs × bs`` factor on the cut side and a diagonal one on
  the long side (``(S, bs, n)`` or ``(S, m, bs)`` units).
* ``"diag"``: both sides ``> max_size_dense``: one diagonal factor per side.
* ``"whole"``: vectors, scalars and matrices with both sides ``≤ bs`` keep the unblocked
  layout (today's rules, exactly).

Pieces at the edge are zero padded; their *valid* sizes travel with the unit
(:attr:`Tiling.valid`) so that the probe noise, the damping, ``T_2 = n/d`` and the factors
are confined to the valid block: padded rows and columns of every factor stay exactly
zero, and the valid block moves as an unpadded factor of the valid size would.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from rollfast_psgd.factors import valid_mask

KINDS = ("whole", "tiles", "rows", "cols", "diag")


class TileStack(NamedTuple):
    """The state of the stacked tiles: per factor side an ``(N, bs, bs)`` array (factors)
    or an ``(N,)`` array (Lipschitz estimates); its leading axis is the one a mesh axis can
    shard (:func:`rollfast.state_shardings`)."""

    left: object
    right: object


class BlockedFactors(NamedTuple):
    """Factors (or Lipschitz estimates) of a blocked kron state: ``stack`` the
    :class:`TileStack` (``None`` without tiles) and ``units`` a tuple, per other work unit
    (strips, diagonal pairs, unblocked leaves), of its per-factor arrays."""

    stack: object
    units: tuple


def matrix_view(shape) -> tuple:
    """The matrix (or vector) a leaf of ``shape`` is blocked as.

    Rank < 2 stays; a shape with one side > 1 is the vector of that side; rank 2 stays;
    rank ≥ 3 is split into ``(prod(prefix), prod(suffix))`` at the split that minimises
    ``max/min`` (the first such split). An empty matrix stays whole.

    >>> matrix_view((4, 8, 2)), matrix_view((1, 7, 1)), matrix_view(())
    ((4, 16), (7,), ())
    """
    shape = tuple(shape)
    if len(shape) < 2:
        return shape
    if math.prod(shape) == max(shape):
        return (max(shape),)
    if len(shape) == 2:
        return shape
    splits = [(math.prod(shape[:s]), math.prod(shape[s:])) for s in range(1, len(shape))]
    return min(splits, key=lambda lr: max(lr) / max(min(lr), 1))


def piece_rule(view, block_size: int, max_size_dense: int) -> str:
    """Which :data:`KINDS` of pieces a leaf with matrix ``view`` is cut into.

    >>> [piece_rule(v, 128, 1000) for v in [(64,), (100, 120), (300, 700), (500, 4096), (2000, 3000)]]
    ['whole', 'whole', 'tiles', 'rows', 'diag']
    """
    if len(view) < 2 or max(view) <= block_size or min(view) == 0:
        return "whole"
    m, n = view
    if m <= max_size_dense and n <= max_size_dense:
        return "tiles"
    if m <= max_size_dense:
        return "rows"
    if n <= max_size_dense:
        return "cols"
    return "diag"


def _cuts(d, bs):
    """Valid lengths of the ``ceil(d/bs)`` pieces of a side of length ``d``."""
    return [min(bs, d - k * bs) for k in range(-(-d // bs))]


def _pad_to(x, axis, size):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


class Piece(NamedTuple):
    """How one leaf maps to work: its ``kind``, ``layers`` (``L`` of a scanned leaf, else
    ``None``), its matrix ``view`` of one layer, and (tiles) its slice of the stack."""

    kind: str
    layers: int | None
    view: tuple
    start: int = 0
    count: int = 0


class Untiled:
    """The work layout without blocking: every leaf is its own unit (``block_size=None``)."""

    stacked = 0

    def __init__(self, plans):
        self.plans, self.valid = list(plans), [None] * len(plans)

    def split(self, leaves: list) -> list:
        return leaves

    def join(self, units: list, like: list) -> list:
        return units


class Tiling:
    """The blocked work layout of a tree of leaves (static; built once per trace).

    ``split`` maps per-leaf arrays to per-unit arrays (the stack first, if any), ``join``
    maps them back (cropping the padding); ``plans`` and ``valid`` are per unit: its
    ``(scanned, dense)`` plan and ``None`` or, per factor, the ``(N,)`` int32 valid lengths.

    >>> t = Tiling([(300, 700)], [(False, (True, True))], block_size=128, max_size_dense=1000)
    >>> t.plans, [v.tolist() for v in t.valid[0]][0][-3:]
    ([(True, (True, True))], [44, 44, 44])
    >>> x = jnp.arange(300 * 700.0).reshape(300, 700)
    >>> bool((t.join(t.split([x]), [x])[0] == x).all()), t.split([x])[0].shape
    (True, (18, 128, 128))
    """

    def __init__(self, shapes, plans, *, block_size, max_size_dense, stack_multiple=1):
        self.block_size, self.pieces, self.units = block_size, [], []
        self.plans, self.valid = [], []
        rows, cols, start = [], [], 0
        for shape, (scanned, dense) in zip(shapes, plans):
            lead = shape[0] if scanned else None
            view = matrix_view(shape[1:] if scanned else shape)
            kind = piece_rule(view, block_size, max_size_dense)
            if kind == "tiles":
                r, c = _cuts(view[0], block_size), _cuts(view[1], block_size)
                grid = [(a, b) for a in r for b in c] * (lead or 1)
                rows += [a for a, _ in grid]
                cols += [b for _, b in grid]
                self.pieces.append(Piece(kind, lead, view, start, len(grid)))
                start += len(grid)
                continue
            self.pieces.append(Piece(kind, lead, view))
        self.stacked = start
        if start:
            fill = -start % stack_multiple
            rows, cols = rows + [1] * fill, cols + [1] * fill
            self.plans.append((True, (True, True)))
            self.valid.append((np.asarray(rows, np.int32), np.asarray(cols, np.int32)))
        for i, (piece, (scanned, dense)) in enumerate(zip(self.pieces, plans)):
            if piece.kind != "tiles":
                self.units.append(i)
                self.plans.append(self._unit_plan(piece, scanned, dense))
                self.valid.append(self._unit_valid(piece))

    @property
    def stack_size(self) -> int:
        """``N``: the tiles of the stack including the filler tiles (0 without a stack)."""
        return len(self.valid[0][0]) if self.stacked else 0

    def _unit_plan(self, piece, scanned, dense):
        if piece.kind == "whole":
            return scanned, dense
        if piece.kind == "diag":
            return scanned, (False, False)
        return True, ((True, False) if piece.kind == "rows" else (False, True))

    def _unit_valid(self, piece):
        if piece.kind not in ("rows", "cols"):
            return None
        (m, n), layers = piece.view, piece.layers or 1
        if piece.kind == "rows":
            r = _cuts(m, self.block_size) * layers
            return np.asarray(r, np.int32), np.full(len(r), n, np.int32)
        else:
            c = _cuts(n, self.block_size) * layers
            return np.full(len(c), m, np.int32), np.asarray(c, np.int32)

    def split(self, leaves: list) -> list:
        """Per-leaf arrays → per-unit arrays (:meth:`_cut`; the tiles of all leaves stacked)."""
        units = []
        if self.stacked:
            tiles = [self._cut(x, p) for x, p in zip(leaves, self.pieces) if p.kind == "tiles"]
            bs, fill = self.block_size, self.stack_size - self.stacked
            units.append(jnp.concatenate(tiles + [jnp.zeros((fill, bs, bs), tiles[0].dtype)] * bool(fill)))
        return units + [self._cut(leaves[i], self.pieces[i]) for i in self.units]

    def _cut(self, x, piece):
        """One leaf's pieces: tiles ``(L·R·C, bs, bs)``, strips ``(L·S, bs, n)`` /
        ``(L·S, m, bs)``, or the leaf as a (per-layer) matrix, zero padded."""
        if piece.kind == "whole":
            return x
        bs, lead = self.block_size, (piece.layers or 1)
        m, n = piece.view
        x = x.reshape(lead, m, n)
        if piece.kind == "diag":
            return x if piece.layers else x[0]
        r, c = -(-m // bs), -(-n // bs)
        if piece.kind == "rows":
            return _pad_to(x, 1, r * bs).reshape(lead * r, bs, n)
        if piece.kind == "cols":
            x = _pad_to(x, 2, c * bs).reshape(lead, m, c, bs)
            return x.transpose(0, 2, 1, 3).reshape(lead * c, m, bs)
        x = _pad_to(_pad_to(x, 1, r * bs), 2, c * bs).reshape(lead, r, bs, c, bs)
        return x.transpose(0, 1, 3, 2, 4).reshape(lead * r * c, bs, bs)

    def join(self, units: list, like: list) -> list:
        """Per-unit arrays → per-leaf arrays shaped like ``like`` (padding cropped)."""
        out = [None] * len(like)
        rest = iter(units[1:] if self.stacked else units)
        for i, piece in enumerate(self.pieces):
            if piece.kind == "tiles":
                part = units[0][piece.start:piece.start + piece.count]
            else:
                part = next(rest)
            out[i] = self._paste(part, piece).reshape(like[i].shape)
        return out

    def _paste(self, part, piece):
        """Inverse of :meth:`_cut`: the leaf's (per-layer) matrix, padding cropped."""
        if piece.kind in ("whole", "diag"):
            return part
        bs, lead = self.block_size, (piece.layers or 1)
        m, n = piece.view
        r, c = -(-m // bs), -(-n // bs)
        if piece.kind == "rows":
            return part.reshape(lead, r * bs, n)[:, :m]
        if piece.kind == "cols":
            return part.reshape(lead, c, m, bs).transpose(0, 2, 1, 3).reshape(lead, m, c * bs)[:, :, :n]
        x = part.reshape(lead, r, c, bs, bs).transpose(0, 1, 3, 2, 4)
        return x.reshape(lead, r * bs, c * bs)[:, :m, :n]

    def init_factors(self, scale) -> list:
        """Per unit, factors at :math:`P = s^2 I` on the valid block and 0 on the padding."""
        # Whole units are initialised by the caller (their layout is today's).
        return [None if v is None else tuple(scale ** 0.5 * valid_factor(d, vi, dense)
                                             for d, vi, dense in zip(self._sides(u), v, self.plans[u][1]))
                for u, v in enumerate(self.valid)]

    def _sides(self, u):
        if u == 0 and self.stacked:
            return self.block_size, self.block_size
        piece = self.pieces[self.units[u - bool(self.stacked)]]
        m, n = piece.view
        return (self.block_size, n) if piece.kind == "rows" else (m, self.block_size)


def valid_factor(d, valid, dense):
    """Identity (dense) or ones (diagonal) on the valid entries, zero on the padding."""
    mask = valid_mask(d, valid)
    return mask[..., None] * jnp.eye(d) if dense else mask


def unit_mask(valid, shape):
    """The 0/1 mask of the valid block of a ``(N, m, n)`` unit."""
    rows, cols = valid
    return valid_mask(shape[1], rows)[:, :, None] * valid_mask(shape[2], cols)[:, None, :]
