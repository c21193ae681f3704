"""The TensorRT API surface deploy.engine.build is type-checked against (deploy/engine/trt_api.py) exists in the
installed TensorRT-RTX: a renamed or removed member fails here, not in a user's build."""

from __future__ import annotations

import pytest

from deploy.engine.backend import import_backend
from deploy.engine.trt_api import CLASSES


def members(protocol: type) -> set[str]:
    names = set(getattr(protocol, "__annotations__", {}))
    names |= {n for n in vars(protocol) if not n.startswith("_")}
    return names


@pytest.mark.parametrize("protocol", list(CLASSES), ids=lambda p: p.__name__)
def test_protocol_members_exist_in_tensorrt_rtx(protocol: type):
    trt = import_backend("tensorrt-rtx").trt
    cls = getattr(trt, CLASSES[protocol])
    missing = sorted(m for m in members(protocol) if not hasattr(cls, m))
    assert not missing, f"{CLASSES[protocol]} lacks {missing}"
    assert members(protocol)
