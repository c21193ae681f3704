"""Optimization profiles for a g2trt graph: one for prefill, one for decode.

A Gemma 2 step has two very different shapes: prefill (many query tokens, little or no cache) and
decode (one token, a long cache). One profile spanning both makes TensorRT tune every kernel for a
single `opt` point that fits neither; two profiles let it pick tactics per phase, and the runner
selects the profile by the step it runs (profile 0 prefill, profile 1 decode, named in the engine's
side file).

Ranges are given per dimension (batch, seq, past) as min/opt/max and mapped onto the inputs by the
I/O contract's dim names (export/io_contract.py):

    batch_size                      batch
    sequence_length                 seq (prefill), 1 (decode)
    past_sequence_length            past: decode (min, opt, max); prefill (min, min, max that still fits)
    sliding_past_sequence_length    the same as past (a runner may keep fewer: window - 1 entries)
    total_sequence_length           past + seq, dimension by dimension (attention_mask)

`max_positions` (the model's max_position_embeddings, when known) bounds past + seq.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from deploy.engine.onnx_info import IoTensor
from export import io_contract as io
from export.errors import G2trtError

KEYS = ("batch", "seq", "past")
PREFILL, DECODE = "prefill", "decode"

Shape = tuple[int, ...]


class ProfileError(G2trtError):
    """Profile ranges that no engine can satisfy, or an input whose dynamic dims g2trt cannot range."""


@dataclasses.dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int

    def as_list(self) -> list[int]:
        return [self.min, self.opt, self.max]


@dataclasses.dataclass(frozen=True)
class ProfileRanges:
    batch: DimRange
    seq: DimRange
    past: DimRange
    max_positions: int | None = None

    def prefill_past(self) -> DimRange:
        """Prefill may continue from a cache (chunked prefill) as long as past + seq still fits."""
        top = self.past.max
        if self.max_positions is not None:
            top = min(top, self.max_positions - self.seq.max)
        return DimRange(self.past.min, self.past.min, top)


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    shapes: dict[str, tuple[Shape, Shape, Shape]]  # input -> (min, opt, max)

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()}}


def parse_dims(text: str | None, option: str) -> dict[str, int]:
    """`"batch=1,seq=128"` -> {"batch": 1, "seq": 128}; one-line errors name the option."""
    out: dict[str, int] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in KEYS:
            raise ProfileError(f"{option} {text!r}: expected KEY=INT pairs with KEY in {', '.join(KEYS)}")
        try:
            out[key] = int(value)
        except ValueError:
            raise ProfileError(f"{option} {text!r}: {key}={value.strip()!r} is not an integer") from None
    return out


def default_ranges(max_positions: int | None) -> dict[str, DimRange]:
    """batch 1/1/8; seq 1/128/512; past 0/512/(context - 1), context = max_positions (4096 unknown)."""
    context = min(max_positions or 4096, 8192)
    seq_max = max(1, min(512, context // 2))
    past_max = max(0, context - 1)
    return {
        "batch": DimRange(1, 1, 8),
        "seq": DimRange(1, min(128, seq_max), seq_max),
        "past": DimRange(0, min(512, past_max), past_max),
    }


def make_ranges(
    mins: Mapping[str, int] | None = None,
    opts: Mapping[str, int] | None = None,
    maxs: Mapping[str, int] | None = None,
    max_positions: int | None = None,
) -> ProfileRanges:
    """User values over defaults; unset values adapt to the set ones (e.g. `--max seq=64` lowers opt)."""
    mins, opts, maxs = dict(mins or {}), dict(opts or {}), dict(maxs or {})
    defaults = default_ranges(max_positions)
    ranges: dict[str, DimRange] = {}
    for key in KEYS:
        d = defaults[key]
        hi = maxs.get(key, max(d.max, mins.get(key, d.max), opts.get(key, d.max)))
        lo = mins.get(key, min(d.min, hi, opts.get(key, hi)))
        mid = opts.get(key, min(max(d.opt, lo), hi))
        ranges[key] = DimRange(lo, mid, hi)
    result = ProfileRanges(ranges["batch"], ranges["seq"], ranges["past"], max_positions)
    validate(result)
    return result


def validate(r: ProfileRanges) -> None:
    floors = {"batch": 1, "seq": 1, "past": 0}
    for key in KEYS:
        d: DimRange = getattr(r, key)
        if d.min < floors[key]:
            raise ProfileError(f"profile {key} min is {d.min}; it must be >= {floors[key]}")
        if not d.min <= d.opt <= d.max:
            raise ProfileError(f"profile {key} needs min <= opt <= max, got min {d.min}, opt {d.opt}, max {d.max}")
    if r.max_positions is not None:
        if r.seq.max > r.max_positions:
            raise ProfileError(
                f"profile seq max {r.seq.max} exceeds the model's max_position_embeddings {r.max_positions}"
            )
        if r.past.max + 1 > r.max_positions:
            raise ProfileError(
                f"profile past max {r.past.max} + 1 decode token exceeds the model's max_position_embeddings "
                f"{r.max_positions}; use --max past={r.max_positions - 1} or less"
            )
        if r.past.min + r.seq.max > r.max_positions:
            raise ProfileError(
                f"profile past min {r.past.min} + seq max {r.seq.max} exceeds the model's "
                f"max_position_embeddings {r.max_positions}"
            )


def _dim_values(dim: int | str, name: str, index: int, batch: DimRange, seq: DimRange, past: DimRange) -> Shape:
    if isinstance(dim, int):
        return (dim, dim, dim)
    if dim == io.BATCH:
        return (batch.min, batch.opt, batch.max)
    if dim == io.SEQ:
        return (seq.min, seq.opt, seq.max)
    if dim in (io.PAST, io.SLIDING_PAST):
        return (past.min, past.opt, past.max)
    if dim == io.TOTAL:
        return (past.min + seq.min, past.opt + seq.opt, past.max + seq.max)
    known = ", ".join((io.BATCH, io.SEQ, io.PAST, io.SLIDING_PAST, io.TOTAL))
    raise ProfileError(f"input {name!r} dim {index} is dynamic ({dim!r}); g2trt ranges only the named dims {known}")


def _profile(name: str, inputs: Sequence[IoTensor], batch: DimRange, seq: DimRange, past: DimRange) -> Profile:
    shapes: dict[str, tuple[Shape, Shape, Shape]] = {}
    for t in inputs:
        per_dim = [_dim_values(d, t.name, i, batch, seq, past) for i, d in enumerate(t.dims)]
        shapes[t.name] = (
            tuple(v[0] for v in per_dim),
            tuple(v[1] for v in per_dim),
            tuple(v[2] for v in per_dim),
        )
    return Profile(name, shapes)


def plan_profiles(inputs: Sequence[IoTensor], r: ProfileRanges) -> list[Profile]:
    """[prefill, decode]: prefill spans seq with past from its min; decode is one token over the past range."""
    validate(r)
    prefill_past = r.prefill_past()
    if prefill_past.max < prefill_past.min:
        raise ProfileError(
            f"profile past min {r.past.min} + seq max {r.seq.max} leaves no room under max_position_embeddings"
        )
    one = DimRange(1, 1, 1)
    return [
        _profile(PREFILL, inputs, r.batch, r.seq, prefill_past),
        _profile(DECODE, inputs, r.batch, one, r.past),
    ]
