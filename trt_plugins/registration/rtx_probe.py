"""The experiment: g2trt's plugins under TensorRT-RTX, through the Python plugin API it does have.

TensorRT-RTX has no `tensorrt.plugin` module (no quickly deployable / AOT plugins) and no
`INetworkDefinition.add_plugin_v3`; its ONNX parser does look plugin nodes up in the plugin registry,
and its bindings expose `IPluginV3` / `IPluginCreatorV3One` for Python implementations. This module
registers each g2trt plugin that way (shape and dtype rules from the op modules, like the full
TensorRT registration) and builds an ONNX graph with TensorRT-RTX, printing each stage it reaches.

It runs in its own process, `python -m trt_plugins.registration.rtx_probe MODEL.onnx [--sm 89]`,
because TensorRT-RTX 1.7.1 aborts the whole process (SIGABRT, "terminate called without an active
exception") once the parser has created a Python plugin. `run_probe` runs it and records what
happened; docs/build.md has the result and tests/trt_plugins/test_registration_rtx.py asserts it, so a
TensorRT-RTX release that changes it is noticed.

The plugins' enqueue is not implemented: the probe only builds (no GPU here), and it never gets that far.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

STAGES = ("imported", "registered", "parsed", "built")


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    returncode: int
    stages: tuple[str, ...]  # the stages the probe printed, in order
    calls: tuple[str, ...]  # plugin methods TensorRT-RTX called, in order
    stderr_tail: str

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(-self.returncode).name if self.returncode < 0 else None

    def describe(self) -> str:
        how = self.signal_name or f"exit code {self.returncode}"
        last = self.stderr_tail.strip().splitlines()[-1] if self.stderr_tail.strip() else ""
        return f"{how} after stages {list(self.stages)}, plugin calls {list(self.calls)}; last stderr line: {last!r}"


def run_probe(onnx_path: str | Path, sm: int = 89, timeout: float = 300) -> ProbeResult:
    """Run the probe in a subprocess and report how far it got and how it ended."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "trt_plugins.registration.rtx_probe", str(onnx_path), "--sm", str(sm)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    )
    lines = proc.stdout.splitlines()
    stages = tuple(line.split(" ", 1)[1] for line in lines if line.startswith("stage "))
    calls = tuple(line.split(" ", 1)[1] for line in lines if line.startswith("call "))
    return ProbeResult(proc.returncode, stages, calls, proc.stderr[-2000:])


def _plugin_classes(trt: Any, module: ModuleType) -> tuple[type, type]:
    """An IPluginV3 (core + build + runtime) and its creator for one g2trt op module."""
    import numpy as np

    spec = module.SPEC
    field_type = {"int": trt.PluginFieldType.INT64, "float": trt.PluginFieldType.FLOAT64}

    def trace(name: str) -> None:
        print(f"call {spec.name}.{name}", flush=True)

    class Plugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):  # type: ignore[misc]
        def __init__(self, attrs: dict[str, Any]) -> None:
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name, self.plugin_namespace, self.plugin_version = spec.name, spec.namespace, spec.version
            self.num_outputs = len(spec.outputs)
            self.attrs = attrs

        def get_capability_interface(self, kind: Any) -> Any:
            trace(f"get_capability_interface({kind})")
            return self

        def get_output_data_types(self, input_types: list[Any]) -> list[Any]:
            trace("get_output_data_types")
            return list(module.output_dtypes(*input_types))

        def get_output_shapes(self, inputs: list[Any], shape_inputs: list[Any], builder: Any) -> list[Any]:
            trace("get_output_shapes")

            class Dim:
                def __init__(self, e: Any) -> None:
                    self.e = e

                def __add__(self, other: Dim) -> Dim:
                    return Dim(builder.operation(trt.DimensionOperation.SUM, self.e, other.e))

            shapes = module.output_shapes(*[tuple(Dim(d) for d in x) for x in inputs])
            return [trt.DimsExprs([d.e for d in s]) for s in shapes]

        def supports_format_combination(self, pos: int, in_out: list[Any], num_inputs: int) -> bool:
            trace("supports_format_combination")
            return bool(in_out[pos].desc.format == trt.TensorFormat.LINEAR)

        def configure_plugin(self, inputs: list[Any], outputs: list[Any]) -> None:
            trace("configure_plugin")

        def on_shape_change(self, inputs: list[Any], outputs: list[Any]) -> None:
            trace("on_shape_change")

        def get_valid_tactics(self) -> list[int]:
            return []

        def set_tactic(self, tactic: int) -> None:
            pass

        def enqueue(self, *args: Any) -> None:
            raise NotImplementedError("rtx_probe plugins only build")

        def attach_to_context(self, context: Any) -> Any:
            return self.clone()

        def get_fields_to_serialize(self) -> Any:
            trace("get_fields_to_serialize")
            return trt.PluginFieldCollection(
                [trt.PluginField(a.name, np.array([self.attrs[a.name]]), field_type[a.type]) for a in spec.attrs]
            )

        def clone(self) -> Plugin:
            trace("clone")
            return Plugin(dict(self.attrs))

    class Creator(trt.IPluginCreatorV3One):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_namespace, self.plugin_version = spec.name, spec.namespace, spec.version
            self.field_names = trt.PluginFieldCollection(
                [trt.PluginField(a.name, np.array([]), field_type[a.type]) for a in spec.attrs]
            )

        def create_plugin(self, name: str, fc: Any, phase: Any) -> Plugin:
            trace("create_plugin")
            given = {f.name: f.data for f in fc}
            return Plugin(spec.parse({k: float(np.asarray(v).reshape(-1)[0]) for k, v in given.items()}))

    return Plugin, Creator


def _small_profile(onnx_path: str) -> dict[str, tuple[tuple[int, ...], ...]]:
    """One small profile over the graph's inputs: every dynamic dim 1..4 (past lengths 0..4).

    The probe only needs *a* buildable network; the engine builder's real profiles live in
    deploy/engine/profiles.py, which this layer does not import.
    """
    import onnx

    proto = onnx.load(onnx_path, load_external_data=False)
    shapes: dict[str, tuple[tuple[int, ...], ...]] = {}
    for value in proto.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]
        lo = tuple(d if isinstance(d, int) else (0 if "past" in d else 1) for d in dims)
        mid = tuple(d if isinstance(d, int) else 2 for d in dims)
        hi = tuple(d if isinstance(d, int) else 4 for d in dims)
        shapes[value.name] = (lo, mid, hi)
    return shapes


class _Logger:
    """A TensorRT logger that keeps the errors (the probe prints the last one when a build fails)."""

    def __new__(cls, trt: Any) -> Any:
        class Logger(trt.ILogger):  # type: ignore[misc]
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity: Any, msg: str) -> None:
                if severity <= trt.ILogger.Severity.ERROR:
                    self.errors.append(msg)

        return Logger()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("onnx")
    ap.add_argument("--sm", type=int, default=89)
    args = ap.parse_args(argv)

    import importlib

    from trt_plugins import PLUGINS

    trt = importlib.import_module("tensorrt_rtx_bindings")
    print("stage imported", flush=True)
    registry = trt.get_plugin_registry()
    creators = [_plugin_classes(trt, m)[1]() for m in PLUGINS.values()]
    for c in creators:
        if not registry.register_creator(c, c.plugin_namespace):
            print(f"register_creator failed for {c.name}", file=sys.stderr)
            return 2
    print("stage registered", flush=True)
    logger = _Logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(args.onnx):
        print(f"parse failed: {[str(parser.get_error(i)) for i in range(parser.num_errors)]}", file=sys.stderr)
        return 3
    print("stage parsed", flush=True)
    config = builder.create_builder_config()
    config.num_compute_capabilities = 1
    config.set_compute_capability(getattr(trt.ComputeCapability, f"SM{args.sm}"), 0)
    profile = builder.create_optimization_profile()
    for name, (lo, mid, hi) in _small_profile(args.onnx).items():
        profile.set_shape(name, lo, mid, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        print(f"build failed: {logger.errors[-1:]}", file=sys.stderr)
        return 4
    print(f"stage built {plan.nbytes}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
