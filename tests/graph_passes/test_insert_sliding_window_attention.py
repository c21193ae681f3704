"""insert_sliding_window_attention: the attention core -> one SlidingWindowAttention node whose window
comes from the mask subgraph and must agree with the config; an SDPA-style core is not matched. The
core's scale is query_pre_attn_scalar ** -0.5 with query_pre_attn_scalar = 144 != head_dim (27B's), so the
node must carry the graph's scale, and a config implying head_dim ** -0.5 must be refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from export.config import GLOBAL
from export.model import attention_bias, attention_core
from graph_passes import insert_sliding_window_attention as swa
from graph_passes.labels import expected_layers
from tests.graph_passes.graphs import FP32_BOUND, apply, max_output_diff, ops, prefill_feeds, run
from trt_plugins.attention import SPEC

H, KV, D = 4, 2, 8
QPAS = 144  # query_pre_attn_scalar, not head_dim
NAMES_IN = ["query", "key", "value", "past_key_values.0.key", "past_key_values.0.value", "attention_mask"]
NAMES_OUT = ["out", "present.0.key", "present.0.value"]


class Core(nn.Module):
    """The model's attention core with its cache append (export.model), or an SDPA one (Llama-style)."""

    def __init__(self, window: int, cap: float | None, sdpa: bool = False) -> None:
        super().__init__()
        self.window, self.cap, self.sdpa = window, cap, sdpa

    def forward(self, q, k, v, past_k, past_v, attention_mask):  # type: ignore[no-untyped-def]
        k, v = torch.cat((past_k, k), 2), torch.cat((past_v, v), 2)
        bias = attention_bias(attention_mask, q.shape[2], k.shape[2], self.window)
        if self.sdpa:
            rep = q.shape[1] // k.shape[1]
            out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), bias)
        else:
            out = attention_core(q, k, v, bias, QPAS**-0.5, self.cap)
        return out, k, v


def _export(tmp: Path, window: int = 4, cap: float | None = 5.0, sdpa: bool = False) -> onnx.ModelProto:
    from torch.export import Dim

    b, s, p, t = Dim("batch"), Dim("seq"), Dim("past"), Dim("total")
    args = (
        torch.zeros(2, H, 3, D),
        torch.zeros(2, KV, 3, D),
        torch.zeros(2, KV, 3, D),
        torch.zeros(2, KV, 5, D),
        torch.zeros(2, KV, 5, D),
        torch.ones(2, 8, dtype=torch.int64),
    )
    dims = ({0: b, 2: s}, {0: b, 2: s}, {0: b, 2: s}, {0: b, 2: p}, {0: b, 2: p}, {0: b, 1: t})
    prog = torch.onnx.export(
        Core(window, cap, sdpa).eval(),
        args,
        dynamo=True,
        input_names=NAMES_IN,
        output_names=NAMES_OUT,
        dynamic_shapes=dims,
        verbose=False,
    )
    path = tmp / "core.onnx"
    prog.save(str(path))
    return onnx.load(str(path))


def _feeds(seq: int = 7, past: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    mask = np.ones((2, past + seq), np.int64)
    mask[1, :3] = 0  # left padding
    f = {
        n: rng.standard_normal(s).astype(np.float32) * 3
        for n, s in zip(
            NAMES_IN[:5],
            [(2, H, seq, D), (2, KV, seq, D), (2, KV, seq, D), (2, KV, past, D), (2, KV, past, D)],
            strict=True,
        )
    }
    return f | {"attention_mask": mask}


@pytest.fixture(scope="module")
def core(tmp_path_factory) -> onnx.ModelProto:
    return _export(tmp_path_factory.mktemp("core"))


def test_core_becomes_one_node_with_the_masks_window(core) -> None:
    fused, (report,) = apply(core, swa.PASS)
    assert report.sites == ["layer 0"] and ops(fused) == [SPEC.name]
    attrs = SPEC.parse({a.name: onnx.helper.get_attribute_value(a) for a in fused.graph.node[0].attribute})
    assert attrs.pop("scale") == pytest.approx(QPAS**-0.5, rel=1e-7)  # ONNX float attributes are fp32
    want = SPEC.attributes(num_heads=H, kv_heads=KV, head_dim=D, scale=0.0, softcap=5.0, window=4)
    assert attrs == {k: v for k, v in want.items() if k != "scale"}
    feeds = _feeds()
    got, want = run(fused, feeds), run(core, feeds)
    valid = feeds["attention_mask"][:, -7:].astype(bool)
    np.testing.assert_allclose(got[0].transpose(0, 2, 1, 3)[valid], want[0].transpose(0, 2, 1, 3)[valid], atol=1e-5)
    for a, b in zip(got[1:], want[1:], strict=True):
        np.testing.assert_array_equal(a, b)


def _cfg(tiny_cfg, **changes):
    base = dict(num_attention_heads=H, num_key_value_heads=KV, head_dim=D, query_pre_attn_scalar=QPAS)
    base |= dict(attn_logit_softcapping=5.0, sliding_window=4)
    return tiny_cfg.replace(**(base | changes))


def test_config_that_disagrees_with_the_mask_is_rejected(core, tiny_cfg) -> None:
    out, (report,) = apply(core, swa.PASS, config=_cfg(tiny_cfg, layer_types=(GLOBAL,) * 4))
    assert report.count == 0 and ops(out) == ops(core)
    assert "layer 0: mask window 4" in report.rejected[0].reason and report.rejected[0].label == "layer 0"


def test_config_whose_scale_is_head_dims_is_rejected(core, tiny_cfg) -> None:
    _, (report,) = apply(core, swa.PASS, config=_cfg(tiny_cfg))
    assert report.count == 1  # the graph's scale agrees with query_pre_attn_scalar 144 ...
    _, (report,) = apply(core, swa.PASS, config=_cfg(tiny_cfg, query_pre_attn_scalar=D))
    assert report.count == 0 and "score scale" in report.rejected[0].reason  # ... and not with head_dim


def test_sdpa_core_is_not_matched(tmp_path) -> None:
    m = _export(tmp_path, sdpa=True)
    out, (report,) = apply(m, swa.PASS)
    assert report.count == 0 and ops(out) == ops(m) and report.rejected


def test_idempotent(core) -> None:
    once, _ = apply(core, swa.PASS)
    twice, (again,) = apply(once, swa.PASS)
    assert again.count == 0 and ops(twice) == ops(once)


def test_tiny_export_one_per_layer_and_unchanged_outputs(tiny_proto, tiny_export, tiny_cfg) -> None:
    fused, (report,) = apply(tiny_proto, swa.PASS, config=tiny_cfg)
    assert report.sites == expected_layers(tiny_cfg)
    windows = [
        SPEC.parse({a.name: onnx.helper.get_attribute_value(a) for a in n.attribute})["window"]
        for n in fused.graph.node
        if n.op_type == SPEC.name
    ]
    assert windows == list(tiny_cfg.windows)  # layer order, read from each mask, equal to the config's
    weights = tiny_export("fp32").model_path.parent
    assert max_output_diff(tiny_proto, fused, weights, prefill_feeds(tiny_cfg)) <= FP32_BOUND
