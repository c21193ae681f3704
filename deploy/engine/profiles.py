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

In-place KV cache graphs (export/kv_cache.py) have no past or total dims; their cache buffers must
have a *static* length (TensorRT's KV-cache update layer), so `cache` (global layers' slots) and
`ring` (sliding layers' slots, default: cache) are fixed: min = opt = max, one engine per length.

    max_cache_length                cache (fixed)
    sliding_cache_length            ring (fixed)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from deploy.engine.onnx_info import IoTensor
from export import io_contract as io
from export.errors import G2trtError

KEYS = ("batch", "seq", "past", "cache", "ring")
FIXED = ("cache", "ring")  # static in the network: one value
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
    cache: DimRange | None = None  # in-place KV cache: global layers' slots (fixed)
    ring: DimRange | None = None  # in-place KV cache: sliding layers' slots (fixed)

    def fixed(self, key: str) -> int:
        d: DimRange | None = getattr(self, key)
        assert d is not None and d.min == d.max
        return d.min

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
    """batch 1/1/8; seq 1/128/512; past 0/512/(context - 1), context = max_positions (4096 unknown);
    an in-place cache of `context` slots."""
    context = min(max_positions or 4096, 8192)
    seq_max = max(1, min(512, context // 2))
    past_max = max(0, context - 1)
    return {
        "batch": DimRange(1, 1, 8),
        "seq": DimRange(1, min(128, seq_max), seq_max),
        "past": DimRange(0, min(512, past_max), past_max),
        "cache": DimRange(context, context, context),
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
        if key in FIXED:
            continue
        d = defaults[key]
        hi = maxs.get(key, max(d.max, mins.get(key, d.max), opts.get(key, d.max)))
        lo = mins.get(key, min(d.min, hi, opts.get(key, hi)))
        mid = opts.get(key, min(max(d.opt, lo), hi))
        ranges[key] = DimRange(lo, mid, hi)
    cache = _fixed("cache", mins, opts, maxs, defaults["cache"].max)
    ring = _fixed("ring", mins, opts, maxs, cache.max)
    result = ProfileRanges(ranges["batch"], ranges["seq"], ranges["past"], max_positions, cache, ring)
    validate(result)
    return result


def _fixed(
    key: str, mins: Mapping[str, int], opts: Mapping[str, int], maxs: Mapping[str, int], default: int
) -> DimRange:
    """A static dim: whichever of min/opt/max is given sets all three; different values are an error."""
    given = {v for v in (mins.get(key), opts.get(key), maxs.get(key)) if v is not None}
    if len(given) > 1:
        raise ProfileError(
            f"profile {key} must be fixed (min = opt = max: the in-place KV cache has a static length in a "
            f"TensorRT engine), got {sorted(given)}"
        )
    value = given.pop() if given else default
    return DimRange(value, value, value)


def validate(r: ProfileRanges) -> None:
    floors = {"batch": 1, "seq": 1, "past": 0, "cache": 1, "ring": 1}
    for key in KEYS:
        d: DimRange | None = getattr(r, key)
        if d is None:
            continue
        if d.min < floors[key]:
            raise ProfileError(f"profile {key} min is {d.min}; it must be >= {floors[key]}")
        if not d.min <= d.opt <= d.max:
            raise ProfileError(f"profile {key} needs min <= opt <= max, got min {d.min}, opt {d.opt}, max {d.max}")
    if r.cache is not None and r.ring is not None and r.ring.max > r.cache.max:
        raise ProfileError(f"profile ring {r.ring.max} exceeds cache {r.cache.max}: a ring never outgrows the cache")
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


def _dim_values(
    dim: int | str, name: str, index: int, batch: DimRange, seq: DimRange, past: DimRange, r: ProfileRanges
) -> Shape:
    if isinstance(dim, int):
        return (dim, dim, dim)
    if dim in (io.CACHE, io.SLIDING_CACHE):
        n = r.fixed("cache" if dim == io.CACHE else "ring")
        return (n, n, n)
    if dim == io.BATCH:
        return (batch.min, batch.opt, batch.max)
    if dim == io.SEQ:
        return (seq.min, seq.opt, seq.max)
    if dim in (io.PAST, io.SLIDING_PAST):
        return (past.min, past.opt, past.max)
    if dim == io.TOTAL:
        return (past.min + seq.min, past.opt + seq.opt, past.max + seq.max)
    known = ", ".join((io.BATCH, io.SEQ, io.PAST, io.SLIDING_PAST, io.TOTAL, io.CACHE, io.SLIDING_CACHE))
    raise ProfileError(f"input {name!r} dim {index} is dynamic ({dim!r}); g2trt ranges only the named dims {known}")


def _profile(
    name: str, inputs: Sequence[IoTensor], batch: DimRange, seq: DimRange, past: DimRange, r: ProfileRanges
) -> Profile:
    shapes: dict[str, tuple[Shape, Shape, Shape]] = {}
    for t in inputs:
        per_dim = [_dim_values(d, t.name, i, batch, seq, past, r) for i, d in enumerate(t.dims)]
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
        _profile(PREFILL, inputs, r.batch, r.seq, prefill_past, r),
        _profile(DECODE, inputs, r.batch, one, r.past, r),
    ]


def static_dims(inputs: Sequence[IoTensor], r: ProfileRanges) -> dict[str, int]:
    """The named dims the network must hold static (the in-place cache lengths), by dim name."""
    names = {d for t in inputs for d in t.dims if isinstance(d, str)}
    fixed = {io.CACHE: "cache", io.SLIDING_CACHE: "ring"}
    return {dim: r.fixed(key) for dim, key in fixed.items() if dim in names}
