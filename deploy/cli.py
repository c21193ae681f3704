"""`g2trt`: a thin click shell; every command body calls one public library function.

Errors a user can cause (`G2trtError`) print as one line on stderr and exit 1; nothing is left
half-written because every writer goes through `export.atomic`.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from export.config import PRESETS
from export.errors import G2trtError

F = TypeVar("F", bound=Callable[..., Any])


def _one_line_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except G2trtError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


checkpoint_arg = click.argument(
    "checkpoint", required=False, type=click.Path(path_type=Path, file_okay=False, exists=False)
)
preset_opt = click.option(
    "--preset", type=click.Choice(list(PRESETS)), default="tiny", show_default=True,
    help="Random model to use when no CHECKPOINT_DIR is given.",
)
seed_opt = click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random model.")
dtype_opt = click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
opset_opt = click.option("--opset", type=click.IntRange(18, 23), default=18, show_default=True)
out_opt = click.option("--out", "out", required=True, type=click.Path(path_type=Path, file_okay=False))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="g2trt")
def cli() -> None:
    """Gemma 2 from PyTorch to ONNX, graph passes and TensorRT engines."""


@cli.command("export")
@checkpoint_arg
@out_opt
@preset_opt
@dtype_opt
@opset_opt
@seed_opt
@click.option("--last-logits-only", is_flag=True, help="Logits only for the last position: [batch, 1, vocab].")
@_one_line_errors
def export_cmd(
    checkpoint: Path | None, out: Path, preset: str, dtype: str, opset: int, seed: int, last_logits_only: bool
) -> None:
    """Export CHECKPOINT_DIR (a HF Gemma 2 directory), or a seeded random model, to OUT/model.onnx."""
    from deploy import console as ui
    from export.checkpoint import weight_bytes
    from export.onnx_export import ExportOptions, export_onnx
    from export.weights import open_weights

    source = open_weights(checkpoint, preset, seed)
    options = ExportOptions(dtype=dtype, opset=opset, last_logits_only=last_logits_only)  # type: ignore[arg-type]
    with ui.weight_progress(weight_bytes(source.config, dtype), "export") as advance:
        result = export_onnx(source, out, options, advance)
    cfg = source.config
    m = result.manifest
    rows = [
        ("model", str(result.model_path)),
        ("source", str(checkpoint) if checkpoint else f"random {preset} (seed {seed})"),
        ("layers / hidden / heads / kv heads / head_dim",
         f"{cfg.num_hidden_layers} / {cfg.hidden_size} / {cfg.num_attention_heads} / "
         f"{cfg.num_key_value_heads} / {cfg.head_dim}"),
        ("parameters", f"{cfg.num_params / 1e6:.1f} M"),
        ("dtype / opset", f"{dtype} / {opset}"),
        ("logits", "last position only" if last_logits_only else "every position"),
        ("inputs / outputs", f"{len(m['io']['inputs'])} / {len(m['io']['outputs'])}"),
        ("files", ", ".join(f"{k} ({ui.human_bytes((out / k).stat().st_size)})" for k in m["sha256"])),
        ("time", f"{result.seconds:.1f} s"),
    ]
    ui.out.print(ui.table("g2trt export", ["", ""], rows))


@cli.command("pipeline")
@checkpoint_arg
@out_opt
@preset_opt
@dtype_opt
@opset_opt
@seed_opt
@_one_line_errors
def pipeline_cmd(checkpoint: Path | None, out: Path, preset: str, dtype: str, opset: int, seed: int) -> None:
    """The main job: export CHECKPOINT_DIR (or the embedded tiny model) and verify every stage."""
    from deploy import console as ui
    from deploy.pipeline import PipelineOptions, run_pipeline

    rows = run_pipeline(checkpoint, out, PipelineOptions(preset=preset, seed=seed, dtype=dtype, opset=opset))
    ui.out.print(
        ui.table("g2trt pipeline", ["stage", "result", "s", "output"],
                 [(r.stage, r.result, f"{r.seconds:.1f}", r.output) for r in rows])
    )
    if any(r.result.startswith("FAIL") for r in rows):
        raise G2trtError(f"pipeline failed; see {out / 'pipeline.json'}")


def main() -> None:
    cli(prog_name="g2trt")


if __name__ == "__main__":
    main()
