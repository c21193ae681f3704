"""Optimization profiles: ranges from min/opt/max per dim, mapped onto the I/O contract's named dims."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deploy.engine.onnx_info import IoTensor
from deploy.engine.profiles import DECODE, PREFILL, DimRange, ProfileError, make_ranges, parse_dims, plan_profiles
from export import io_contract as io

INPUTS = (
    IoTensor(io.INPUT_IDS, 7, (io.BATCH, io.SEQ)),
    IoTensor(io.ATTENTION_MASK, 7, (io.BATCH, io.TOTAL)),
    IoTensor(io.POSITION_IDS, 7, (io.BATCH, io.SEQ)),
    IoTensor("past_key_values.0.key", 1, (io.BATCH, 2, io.SLIDING_PAST, 32)),
    IoTensor("past_key_values.1.key", 1, (io.BATCH, 2, io.PAST, 32)),
)


def test_defaults_follow_the_model_context():
    r = make_ranges(max_positions=1024)
    assert r.batch == DimRange(1, 1, 8)
    assert r.seq == DimRange(1, 128, 512)
    assert r.past == DimRange(0, 512, 1023)  # decode reaches the last position
    assert r.prefill_past() == DimRange(0, 0, 512)  # prefill (chunked) must still fit past + seq


def test_unset_values_adapt_to_set_ones():
    r = make_ranges(maxs={"seq": 64})
    assert r.seq == DimRange(1, 64, 64)
    r = make_ranges(mins={"batch": 16})
    assert r.batch == DimRange(16, 16, 16)


def test_two_profiles_prefill_and_decode():
    r = make_ranges({"batch": 1}, {"batch": 2, "seq": 16, "past": 32}, {"batch": 4, "seq": 64, "past": 128}, 1024)
    prefill, decode = plan_profiles(INPUTS, r)
    assert (prefill.name, decode.name) == (PREFILL, DECODE)
    assert prefill.shapes[io.INPUT_IDS] == ((1, 1), (2, 16), (4, 64))
    assert decode.shapes[io.INPUT_IDS] == ((1, 1), (2, 1), (4, 1))
    assert prefill.shapes["past_key_values.1.key"] == ((1, 2, 0, 32), (2, 2, 0, 32), (4, 2, 128, 32))
    assert decode.shapes["past_key_values.1.key"] == ((1, 2, 0, 32), (2, 2, 32, 32), (4, 2, 128, 32))
    # sliding layers get the same range: a runner may trim them to window - 1 entries, or not
    assert decode.shapes["past_key_values.0.key"] == decode.shapes["past_key_values.1.key"]
    assert decode.shapes[io.ATTENTION_MASK] == ((1, 1), (2, 33), (4, 129))
    assert prefill.shapes[io.ATTENTION_MASK] == ((1, 1), (2, 16), (4, 192))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(1, 64), min_size=3, max_size=3),
    st.lists(st.integers(1, 256), min_size=3, max_size=3),
    st.lists(st.integers(0, 512), min_size=3, max_size=3),
)
def test_profiles_hold_min_opt_max_and_total_is_past_plus_seq(batch, seq, past):
    b, s, p = sorted(batch), sorted(seq), sorted(past)
    r = make_ranges(*({"batch": b[i], "seq": s[i], "past": p[i]} for i in range(3)), max_positions=None)
    for prof in plan_profiles(INPUTS, r):
        for lo, mid, hi in prof.shapes.values():
            assert all(x <= y <= z for x, y, z in zip(lo, mid, hi, strict=True))
        for k in range(3):
            ids, mask, past0 = (prof.shapes[n][k] for n in (io.INPUT_IDS, io.ATTENTION_MASK, "past_key_values.1.key"))
            assert mask == (ids[0], past0[2] + ids[1])


@pytest.mark.parametrize(
    ("mins", "opts", "maxs", "positions", "message"),
    [
        ({"seq": 0}, {}, {}, None, "seq min is 0; it must be >= 1"),
        ({"batch": 0}, {}, {}, None, "batch min is 0"),
        ({"past": -1}, {}, {}, None, "past min is -1"),
        ({}, {"batch": 9}, {"batch": 4}, None, "batch needs min <= opt <= max, got min 1, opt 9, max 4"),
        ({"seq": 8}, {}, {"seq": 4}, None, "seq needs min <= opt <= max"),
        ({}, {}, {"past": 1024}, 1024, "past max 1024 + 1 decode token exceeds the model's max_position_embeddings"),
        ({}, {}, {"seq": 2048}, 1024, "seq max 2048 exceeds the model's max_position_embeddings 1024"),
        ({"past": 900}, {}, {"seq": 512}, 1024, "past min 900 + seq max 512 exceeds"),
    ],
)
def test_impossible_profiles_are_one_line_errors(mins, opts, maxs, positions, message):
    with pytest.raises(ProfileError, match=message.replace("+", r"\+")) as e:
        make_ranges(mins, opts, maxs, positions)
    assert "\n" not in str(e.value)


def test_parse_dims():
    assert parse_dims("batch=1, seq=128,past=0", "--min") == {"batch": 1, "seq": 128, "past": 0}
    assert parse_dims("", "--min") == {}
    with pytest.raises(ProfileError, match="--max 'total=4'"):
        parse_dims("total=4", "--max")
    with pytest.raises(ProfileError, match="seq='x' is not an integer"):
        parse_dims("seq=x", "--opt")


def test_unknown_dynamic_dim_is_refused():
    bad = (*INPUTS, IoTensor("extra", 1, (io.BATCH, "num_images")))
    with pytest.raises(ProfileError, match=r"input 'extra' dim 1 is dynamic \('num_images'\)"):
        plan_profiles(bad, make_ranges())
