"""The TensorRT builder API g2trt uses, as typing Protocols shared by `tensorrt` and TensorRT-RTX.

Why not `tensorrt-stubs`: its 10.13.0.35.1 release does not parse (parameters named `in`, a default
before a non-default), mypy skips it without a py.typed marker, it has no `tensorrt.plugin`, and
TensorRT-RTX has no stubs at all. These Protocols name exactly what `deploy.engine.build` calls, so mypy
checks the calls, and tests/deploy/test_build_api.py checks every member exists in the installed
TensorRT-RTX.
"""

from __future__ import annotations

from typing import Any, Protocol


class ParserError(Protocol):
    def node(self) -> int: ...
    def node_name(self) -> str: ...
    def node_operator(self) -> str: ...
    def desc(self) -> str: ...


class OnnxParser(Protocol):
    @property
    def num_errors(self) -> int: ...
    def get_error(self, index: int) -> ParserError: ...
    def parse(self, model: bytes, path: str = ...) -> bool: ...
    def parse_from_file(self, model: str) -> bool: ...


class ILayer(Protocol):
    @property
    def type(self) -> Any: ...


class INetworkDefinition(Protocol):
    @property
    def num_layers(self) -> int: ...
    def get_layer(self, index: int) -> ILayer: ...


class IOptimizationProfile(Protocol):
    def set_shape(self, input: str, min: tuple[int, ...], opt: tuple[int, ...], max: tuple[int, ...]) -> None: ...


class ITimingCache(Protocol):
    def serialize(self) -> Any: ...


class IBuilderConfig(Protocol):
    profiling_verbosity: Any
    builder_optimization_level: int
    num_compute_capabilities: int

    def set_compute_capability(self, compute_capability: Any, index: int) -> bool: ...
    def add_optimization_profile(self, profile: IOptimizationProfile) -> int: ...
    def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache | None: ...
    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool: ...


class Builder(Protocol):
    def create_network(self, flags: int) -> INetworkDefinition: ...
    def create_builder_config(self) -> IBuilderConfig: ...
    def create_optimization_profile(self) -> IOptimizationProfile: ...
    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> Any: ...
    def build_serialized_network_to_stream(
        self, network: INetworkDefinition, config: IBuilderConfig, writer: Any
    ) -> bool: ...


# Protocol -> the class name both modules give it (for the test that checks the members exist)
CLASSES: dict[type, str] = {
    OnnxParser: "OnnxParser",
    ParserError: "ParserError",
    INetworkDefinition: "INetworkDefinition",
    ILayer: "ILayer",
    IOptimizationProfile: "IOptimizationProfile",
    ITimingCache: "ITimingCache",
    IBuilderConfig: "IBuilderConfig",
    Builder: "Builder",
}
