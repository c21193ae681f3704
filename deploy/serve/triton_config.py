"""Triton Inference Server's `config.pbtxt` schema, the part g2trt writes, as real protobuf messages.

The messages mirror `inference.ModelConfig` of Triton's model_config.proto (same package, message,
field names and numbers, so the text and wire formats are Triton's) restricted to the fields a g2trt
repository uses. Writing goes through `text_format.MessageToString` and reading through the strict
`text_format.Parse`: a misspelt or misplaced field is an error, not a silently ignored line. (The
full schema ships in `tritonclient`, whose grpc extra pins an older protobuf than g2trt's tools need.)
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

from export.errors import G2trtError

PACKAGE = "inference"
DATA_TYPES = {
    "TYPE_INVALID": 0, "TYPE_BOOL": 1, "TYPE_UINT8": 2, "TYPE_UINT16": 3, "TYPE_UINT32": 4, "TYPE_UINT64": 5,
    "TYPE_INT8": 6, "TYPE_INT16": 7, "TYPE_INT32": 8, "TYPE_INT64": 9, "TYPE_FP16": 10, "TYPE_FP32": 11,
    "TYPE_FP64": 12, "TYPE_STRING": 13, "TYPE_BF16": 14,
}  # fmt: skip
INSTANCE_KINDS = {"KIND_AUTO": 0, "KIND_GPU": 1, "KIND_CPU": 2, "KIND_MODEL": 3}

_F = descriptor_pb2.FieldDescriptorProto
# (message, [(field, number, type, label, type_name)])
_MESSAGES: list[tuple[str, list[tuple[str, int, int, int, str]]]] = [
    ("ModelInput", [
        ("name", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("data_type", 2, _F.TYPE_ENUM, _F.LABEL_OPTIONAL, ".inference.DataType"),
        ("dims", 4, _F.TYPE_INT64, _F.LABEL_REPEATED, ""),
        ("allow_ragged_batch", 7, _F.TYPE_BOOL, _F.LABEL_OPTIONAL, ""),
        ("optional", 8, _F.TYPE_BOOL, _F.LABEL_OPTIONAL, ""),
    ]),
    ("ModelOutput", [
        ("name", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("data_type", 2, _F.TYPE_ENUM, _F.LABEL_OPTIONAL, ".inference.DataType"),
        ("dims", 3, _F.TYPE_INT64, _F.LABEL_REPEATED, ""),
    ]),
    ("ModelDynamicBatching", [
        ("preferred_batch_size", 1, _F.TYPE_INT32, _F.LABEL_REPEATED, ""),
        ("max_queue_delay_microseconds", 2, _F.TYPE_UINT64, _F.LABEL_OPTIONAL, ""),
        ("preserve_ordering", 3, _F.TYPE_BOOL, _F.LABEL_OPTIONAL, ""),
    ]),
    ("ModelInstanceGroup", [
        ("name", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("count", 2, _F.TYPE_INT32, _F.LABEL_OPTIONAL, ""),
        ("gpus", 3, _F.TYPE_INT32, _F.LABEL_REPEATED, ""),
        ("kind", 4, _F.TYPE_ENUM, _F.LABEL_OPTIONAL, ".inference.ModelInstanceGroup.Kind"),
        ("profile", 5, _F.TYPE_STRING, _F.LABEL_REPEATED, ""),  # TensorRT optimization profile indices
    ]),
    ("ModelParameter", [("string_value", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, "")]),
    ("ModelOperations", [("op_library_filename", 1, _F.TYPE_STRING, _F.LABEL_REPEATED, "")]),
    ("ModelTransactionPolicy", [("decoupled", 1, _F.TYPE_BOOL, _F.LABEL_OPTIONAL, "")]),
    ("ModelConfig", [
        ("name", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("platform", 2, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("max_batch_size", 4, _F.TYPE_INT32, _F.LABEL_OPTIONAL, ""),
        ("input", 5, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, ".inference.ModelInput"),
        ("output", 6, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, ".inference.ModelOutput"),
        ("instance_group", 7, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, ".inference.ModelInstanceGroup"),
        ("default_model_filename", 8, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("dynamic_batching", 11, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".inference.ModelDynamicBatching"),
        ("parameters", 14, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, ".inference.ModelConfig.ParametersEntry"),
        ("backend", 17, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("model_operations", 18, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".inference.ModelOperations"),
        ("model_transaction_policy", 19, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".inference.ModelTransactionPolicy"),
    ]),
]  # fmt: skip


class ConfigError(G2trtError, ValueError):
    """A config.pbtxt that does not parse as a Triton model configuration."""


def _build_pool() -> descriptor_pool.DescriptorPool:
    f = descriptor_pb2.FileDescriptorProto(name="g2trt/triton_model_config.proto", package=PACKAGE, syntax="proto3")
    dt = f.enum_type.add(name="DataType")
    for name, number in DATA_TYPES.items():
        dt.value.add(name=name, number=number)
    for message, fields in _MESSAGES:
        m = f.message_type.add(name=message)
        for name, number, ftype, label, type_name in fields:
            m.field.add(name=name, number=number, type=ftype, label=label, type_name=type_name or None)
        if message == "ModelInstanceGroup":
            kind = m.enum_type.add(name="Kind")
            for name, number in INSTANCE_KINDS.items():
                kind.value.add(name=name, number=number)
        if message == "ModelConfig":  # map<string, ModelParameter> parameters
            entry = m.nested_type.add(name="ParametersEntry")
            entry.options.map_entry = True
            entry.field.add(name="key", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
            entry.field.add(
                name="value",
                number=2,
                type=_F.TYPE_MESSAGE,
                label=_F.LABEL_OPTIONAL,
                type_name=".inference.ModelParameter",
            )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return pool


_POOL = _build_pool()
ModelConfig: Any = message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.ModelConfig"))


def to_text(config: Any) -> str:
    return text_format.MessageToString(config)


def parse(text: str, source: str = "config.pbtxt") -> Any:
    config = ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise ConfigError(f"{source}: {e}") from None
    return config


def data_type_name(value: int) -> str:
    return next((k for k, v in DATA_TYPES.items() if v == value), f"TYPE_{value}")
