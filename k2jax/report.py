"""What an AOT compilation tells (`Report`: per-chip memory, FLOPs, time, collectives) and the reading of a
compiled module's collectives: which kind, how many bytes each chip moves."""

from __future__ import annotations

import dataclasses
import math
import re

from k2jax.hardware import GiB

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_OP = re.compile(r"=\s*(\(?[^=]*?\)?)\s(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|"
                 r"ragged-all-to-all)(-start)?\(([^\n]*)")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "f8e4m3fn": 1, "s64": 8,
          "f64": 8, "u64": 8, "s16": 2, "u16": 2, "f8e5m2": 1}


def _sizes(types: str) -> list[int]:
    out = []
    for dt, dims in _SHAPE.findall(types):
        if dt not in _BYTES:  # a wrong guess would misstate every byte count built on it
            raise ValueError(f"HLO element type {dt!r} in {types!r}: its size is unknown to k2jax.report._BYTES")
        out.append(_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d))
    return out


def group_size(attrs: str) -> int:
    """Devices in each replica group of a collective, from its HLO attributes (the mesh-axes, iota and explicit
    forms); 1 when none is given."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if m:
        sizes = dict((k.strip("' "), int(v)) for k, v in (kv.split("=") for kv in m.group(1).split(",")))
        return math.prod(sizes[a.strip("' ")] for a in m.group(2).split(",") if a.strip())
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
    return len(m.group(1).split(",")) if m else 1


def collective_moves(hlo_text: str) -> dict[str, float]:
    """Bytes each chip sends per kind of collective in a compiled module's text (each op counted once, loop bodies
    included once): with result size R over groups of n, an all-gather or all-to-all moves R(n-1)/n, a
    reduce-scatter R(n-1), an all-reduce 2R(n-1)/n (ring), a collective-permute R."""
    moved = dict.fromkeys(KINDS, 0.0)
    for types, kind, start, attrs in _OP.findall(hlo_text):
        sizes = _sizes(types)
        if start and kind != "all-reduce":  # (operands..., results...) of an async start
            sizes = sizes[len(sizes) // 2:]
        r, n = float(sum(sizes)), group_size(attrs)
        kind = "all-to-all" if kind == "ragged-all-to-all" else kind
        moved[kind] += {"all-gather": r * (n - 1) / n, "all-to-all": r * (n - 1) / n, "reduce-scatter": r * (n - 1),
                        "all-reduce": 2 * r * (n - 1) / n, "collective-permute": r}[kind]
    return moved


_SPLASH = re.compile(r"%splash_mha_(fwd|dq|dkv)[\w.]* = ([^\n]*?) custom-call\([^\n]*?operand_layout_constraints=\{((?:[^{}]|\{[^{}]*\})*)\}")


def splash_flops(hlo_text: str, qk_dim: int, v_dim: int) -> float:
    """FLOPs of the splash-attention kernel calls in a compiled module (their pallas_calls carry no cost estimate,
    so XLA's cost analysis counts them as nothing): per call of b x h sequences, the causal key blocks its query
    blocks visit, times B² pairs, times 2(qk + v) for the forward, 2(2qk + v) for dq (scores again, dO·Vᵀ, dS·K)
    and 2(2qk + 2v) for dk, dv. Blocks: nb(nb+1)/2 for t tokens in nb blocks; under context parallelism (keys
    N times the queries: one shard's early and late pieces of p blocks each, layers/context.py) 2Np² + p."""
    from k2jax.model.layers.splash import block_size

    per_pair = {"fwd": qk_dim + v_dim, "dq": 2 * qk_dim + v_dim, "dkv": 2 * qk_dim + 2 * v_dim}
    total = 0.0
    for kind, types, operands in _SPLASH.findall(hlo_text):
        shapes = [tuple(int(d) for d in dims.split(",")) for _, dims in _SHAPE.findall(types)]
        rank = max(len(x) for x in shapes)  # outputs [b, h, t, .], or [h, t, .] for one sequence; the rest scratch
        b, h, _ = next((1,) * (4 - rank) + x[:rank - 1] for x in shapes if len(x) == rank)
        lengths = [x[-2] for _, dims in _SHAPE.findall(operands)
                   for x in [tuple(int(d) for d in dims.split(","))] if len(x) == rank and x[-1] == qk_dim]  # q, k
        tq, tk = min(lengths), max(lengths)
        if tk == tq:
            block = block_size(tq)
            blocks = (tq // block) * (tq // block + 1) / 2
        else:
            block = block_size(tq // 2)
            p = tq // 2 // block
            blocks = 2 * (tk // tq) * p * p + p
        total += b * h * blocks * block ** 2 * 2 * per_pair[kind]
    return total


_KERNEL = re.compile(r'%([\w.]+) = [^\n]*?custom_call_target="tpu_custom_call"[^\n]*?cost_estimate\\?":\{\\?"flops'
                     r'\\?":\\?"(\d+)')


def kernel_flops(hlo_text: str, name: str) -> float:
    """Sum of the cost estimates (FLOPs) that the Pallas kernel calls whose name contains `name` carry in a compiled
    TPU module's text (what XLA's cost analysis adds for them; megablox's gmm/tgmm count 2·m·k·n over their whole
    row buffer)."""
    return float(sum(int(flops) for op, flops in _KERNEL.findall(hlo_text) if name in op))


_GMM = re.compile(r'%[\w.]*gmm[\w.]* = [^\n]*?custom_call_target="tpu_custom_call"[^\n]*?operand_layout_constraints='
                  r'\{((?:[^{}]|\{[^{}]*\})*)\}[^\n]*?cost_estimate\\?":\{\\?"flops\\?":\\?"(\d+)')


def gmm_tile_allowance(hlo_text: str) -> float:
    """FLOPs the grouped-matmul calls compute beyond the rows they hold, at most: megablox visits only the row tiles
    of its groups, one tile more for each group that starts inside a tile, so per call (its local groups) x (row
    tile) rows at its cost estimate's 2·k·n per row. From each call's operands: group offsets [G + 1] (gmm_swiglu's
    last group, the rows no local expert takes, is never visited), the tile schedule [tiles + G - 1], rows m."""
    total = 0.0
    for operands, flops in _GMM.findall(hlo_text):
        shapes = [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _SHAPE.findall(operands)]
        schedule = [dims[0] for dt, dims in shapes if dt == "s32" and len(dims) == 1 and dims[0] > 1]
        groups, m = schedule[0] - 1, next(dims[0] for _, dims in shapes if len(dims) == 2)
        tile = m // (schedule[1] - groups + 1)
        total += (groups - 1) * tile * int(flops) / m
    return total


def collective_bytes(hlo_text: str) -> int:
    """Sum of the result sizes of the collective ops in an HLO module's text."""
    return int(sum(sum(_sizes(types)[len(_sizes(types)) // 2 if start and kind != "all-reduce" else 0:])
                   for types, kind, start, _ in _OP.findall(hlo_text)))


@dataclasses.dataclass(kw_only=True)
class Report:
    """What one AOT compilation tells: per-chip memory, FLOPs, estimated time, collectives."""

    topology: str
    mesh: dict
    mode: str
    chips: int
    hbm_bytes: float
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    flops: float  # per step, all chips, loop bodies scaled by their trip counts
    analytic_flops: float
    seconds: float  # XLA's estimate for one step
    tokens: int
    compile_s: float
    collective_bytes: int
    optimizer_flops: float = 0.0  # of `flops`: the optimizer update (MuonClip's Newton-Schulz), once per step
    collectives: dict = dataclasses.field(default_factory=dict)  # bytes each chip moves per step, by kind
    optimizer_collectives: dict = dataclasses.field(default_factory=dict)  # of which the optimizer update's
    ici_bandwidth: float = 0.0  # bytes/s per chip, all links
    # of `flops` less the update, by part: {name: (compiled, analytic)}; empty when the parts cannot be told apart
    parts: dict = dataclasses.field(default_factory=dict)
    grouped_visits: float = 0.0  # the grouped-matmul kernels' FLOPs as they visit rows (at most), all chips

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.hbm_bytes

    def mfu(self, peak: float) -> float:
        return self.analytic_flops / max(self.seconds, 1e-12) / (peak * self.chips)

    @property
    def communication_seconds(self) -> float:
        """The step's collectives at the chip's full ICI bandwidth: a lower bound of their time."""
        return sum(self.collectives.values()) / self.ici_bandwidth if self.ici_bandwidth else float("nan")

    def _part_lines(self) -> list[str]:
        if not self.parts:
            return []
        width = max(len(k) for k in self.parts)
        out = ["    where they go (without the update), compiled / analytic:"] + [
            f"      {name:<{width}} {got:.4e} / {want:.4e} = {got / max(want, 1):.3f}"
            for name, (got, want) in self.parts.items()]
        if self.grouped_visits:  # the first part is then the grouped-matmul kernels'
            got, want = next(iter(self.parts.values()))
            model = self.flops - self.optimizer_flops - got + self.grouped_visits
            out.append(f"      (the gmm kernels visit only the row tiles holding rows: at most "
                       f"{self.grouped_visits:.4e} = {self.grouped_visits / max(want, 1):.3f} of the routed experts' "
                       f"count; ratio without the update counted so {model / max(self.analytic_flops, 1):.3f})")
        return out

    def lines(self, peak: float) -> list[str]:
        gib = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
        verdict = "FITS" if self.fits else f"DOES NOT FIT: short by {(self.total_bytes - self.hbm_bytes) / GiB:.2f} GiB"
        out = [f"{self.mode} step on {self.topology} ({self.chips} chips), mesh {self.mesh}; compiled in "
               f"{self.compile_s:.1f}s",
               f"  per-chip HBM: arguments {gib(self.argument_bytes)}, temporaries {gib(self.temp_bytes)}, "
               f"outputs {gib(self.output_bytes)}, aliased -{gib(self.alias_bytes)}",
               f"  total {gib(self.total_bytes)} of {gib(self.hbm_bytes)} -> {verdict}"]
        if math.isnan(self.flops):  # the memory verdict only (cost=False, or it did not fit)
            return out
        out += [f"  compiled FLOPs/step {self.flops:.4e}; analytic {self.analytic_flops:.4e}; ratio "
               f"{self.flops / max(self.analytic_flops, 1):.3f}",
               *([f"    of which the optimizer update {self.optimizer_flops:.4e} "
                  f"({self.optimizer_flops / max(self.flops, 1):.1%}); ratio without it "
                  f"{(self.flops - self.optimizer_flops) / max(self.analytic_flops, 1):.3f}"]
                 if self.optimizer_flops else []),
               *self._part_lines(),
               f"  XLA-estimated step time {self.seconds:.3f}s -> MFU {self.mfu(peak):.1%}, "
               f"{self.tokens / max(self.seconds, 1e-12):,.1f} tokens/s for the slice "
               f"({self.tokens / max(self.seconds, 1e-12) / self.chips:,.2f} per chip)",
               f"  collectives in the compiled module (loop bodies once): {self.collective_bytes / GiB:.2f} GiB"]
        if self.collectives:
            comm = self.communication_seconds
            kinds = lambda d: ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in d.items() if v) or "none"  # noqa: E731
            out += ["  bytes each chip sends per step: " + kinds(self.collectives),
                    *(["    of which the optimizer update: " + kinds(self.optimizer_collectives)]
                      if self.optimizer_collectives else []),
                    f"  communication at the full ICI bandwidth ({self.ici_bandwidth / 1e9:.0f} GB/s per chip) "
                    f"{comm:.3f}s against the {self.seconds:.3f}s estimate: {comm / (comm + self.seconds):.1%} of "
                    f"the step if none of it overlaps compute"]
        return out
