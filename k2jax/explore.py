"""Looking inside a model from a notebook: tables of parameters and of what each device holds, labelled figures."""

from __future__ import annotations

import html
import os
from typing import Any, Sequence

import jax
import numpy as np


class Table:
    """Rows of equal keys, shown as HTML in a notebook and as aligned text elsewhere."""

    def __init__(self, rows: Sequence[dict[str, Any]], title: str = ""):
        self.rows, self.title = list(rows), title
        self.columns = list(self.rows[0]) if self.rows else []

    def __len__(self):
        return len(self.rows)

    def _cells(self):
        return [[_fmt(r[c]) for c in self.columns] for r in self.rows]

    def __repr__(self):
        cells = self._cells()
        widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(self.columns)]
        line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
        out = ([self.title] if self.title else []) + [line(self.columns), line(["-" * w for w in widths])]
        return "\n".join(out + [line(row) for row in cells])

    def _repr_html_(self):
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in self._cells())
        caption = f"<caption>{html.escape(self.title)}</caption>" if self.title else ""
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, tuple):
        return "(" + ", ".join(map(str, v)) + ")"
    return str(v)


def _leaves(model):
    """(dotted name, array) of every parameter of a Model, in tree order."""
    flat = jax.tree_util.tree_flatten_with_path(model.state)[0]
    for path, leaf in flat:
        keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        yield ".".join(k for k in keys if k and k != "value"), leaf


def param_table(model, match: str = "") -> Table:
    """One row per parameter (optionally those whose name contains `match`): shape, dtype, the mesh axes each
    dimension is split over, and the bytes one device holds."""
    rows = []
    for name, a in _leaves(model):
        if match and match not in name:
            continue
        spec = getattr(getattr(a, "sharding", None), "spec", None)
        shard = a.addressable_shards[0].data.shape if hasattr(a, "addressable_shards") else a.shape
        rows.append({"parameter": name, "shape": tuple(a.shape), "dtype": str(a.dtype),
                     "split over": "replicated" if spec is None or not any(spec) else str(tuple(spec)),
                     "per-device shape": tuple(shard),
                     "MiB per device": float(np.prod(shard)) * a.dtype.itemsize / 2**20})
    return Table(rows, f"{len(rows)} parameters")


def device_table(model) -> Table:
    """One row per device: how many parameter bytes it holds, and which experts of the first MoE layer."""
    held: dict[int, float] = {}
    experts: dict[int, str] = {}
    for name, a in _leaves(model):
        for s in a.addressable_shards:
            held[s.device.id] = held.get(s.device.id, 0.0) + s.data.nbytes
            if name.endswith("mlp.wg") and s.device.id not in experts:  # [layers, experts, d, f]
                e = range(a.shape[1])[s.index[1]]
                experts[s.device.id] = f"{e.start}-{e.stop - 1}"
    return Table([{"device": d, "MiB of parameters": held[d] / 2**20, "experts (routed)": experts.get(d, "")}
                  for d in sorted(held)], f"{len(held)} devices")


def save_figure(fig, path: str) -> str:
    """Writes a matplotlib figure as PNG after checking each of its plots has a title and labelled axes."""
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            continue
        missing = [what for what, text in (("title", ax.get_title()), ("x label", ax.get_xlabel()),
                                           ("y label", ax.get_ylabel())) if not text]
        if missing:
            raise ValueError(f"{path}: a plot has no {', no '.join(missing)}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    return path
