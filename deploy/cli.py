"""`g2trt`: a thin click shell; every command body calls one public library function.

Errors a user can cause (`G2trtError`) print as one line on stderr and exit 1; nothing is left
half-written because every writer goes through `export.atomic`.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar

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
    "--preset",
    type=click.Choice(list(PRESETS)),
    default="tiny",
    show_default=True,
    help="Random model to use when no CHECKPOINT_DIR is given.",
)
seed_opt = click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random model.")
dtype_opt = click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
opset_opt = click.option(
    "--opset", type=click.IntRange(18, 24), default=None, help="ONNX opset (default 18; 24 for --kv-cache inplace)."
)


def kv_cache_opt(default: str | None, help: str) -> Callable[[F], F]:
    """`--kv-cache inplace|dynamic` (docs/kv_cache.md); each command says what its default means."""
    return click.option(
        "--kv-cache", type=click.Choice(["inplace", "dynamic"]), default=default, show_default=bool(default), help=help
    )


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
@kv_cache_opt(
    "dynamic", "dynamic: present = past + new (Optimum/genai I/O); inplace: fixed buffers written in place (opset 24)."
)
@click.option(
    "--quant",
    type=click.Choice(["int8", "int4", "fp8"]),
    help="Weight-only quantization of the linear projections (fp8: TensorRT, SM 89+). Implies opset >= 21.",
)
@click.option("--quant-block", type=int, default=32, show_default=True, help="int4/int8: input rows per scale.")
@click.option("--quant-head/--no-quant-head", default=True, show_default=True, help="Quantize the LM head too.")
@_one_line_errors
def export_cmd(
    checkpoint: Path | None,
    out: Path,
    preset: str,
    dtype: str,
    opset: int | None,
    seed: int,
    last_logits_only: bool,
    kv_cache: str,
    quant: str | None,
    quant_block: int,
    quant_head: bool,
) -> None:
    """Export CHECKPOINT_DIR (a HF Gemma 2 directory), or a seeded random model, to OUT/model.onnx."""
    from export.gc_pause import gc_paused

    with gc_paused():  # torch, onnxscript & co.: ~0.5 M objects, no garbage
        from deploy import console as ui
        from export.checkpoint import weight_bytes
        from export.onnx_export import ExportOptions, export_onnx
        from export.weights import open_weights

    source = open_weights(checkpoint, preset, seed)
    options = ExportOptions(
        dtype,  # type: ignore[arg-type]  # click.Choice
        opset,
        last_logits_only,
        kv_cache=kv_cache,  # type: ignore[arg-type]
        quant=quant,  # type: ignore[arg-type]
        quant_block=quant_block,
        quant_head=quant_head,
    )
    total = weight_bytes(source.config, dtype)
    if options.quant:
        from export.quantize import QuantSpec, saved_bytes

        spec = QuantSpec(options.quant, quant_block, quant_head)
        total -= saved_bytes(source.config, spec, 4 if dtype == "fp32" else 2)
    with ui.weight_progress(total, "export") as advance:
        result = export_onnx(source, out, options, advance)
    cfg = source.config
    m = result.manifest
    rows = [
        ("model", str(result.model_path)),
        ("source", str(checkpoint) if checkpoint else f"random {preset} (seed {seed})"),
        (
            "layers / hidden / heads / kv heads / head_dim",
            f"{cfg.num_hidden_layers} / {cfg.hidden_size} / {cfg.num_attention_heads} / "
            f"{cfg.num_key_value_heads} / {cfg.head_dim}",
        ),
        ("parameters", f"{cfg.num_params / 1e6:.1f} M"),
        ("dtype / opset", f"{dtype} / {m['opset']}"),
        ("KV cache", kv_cache),
        *([("quantization", _describe_quant(m["quantization"]))] if "quantization" in m else []),
        ("logits", "last position only" if last_logits_only else "every position"),
        ("inputs / outputs", f"{len(m['io']['inputs'])} / {len(m['io']['outputs'])}"),
        ("files", ", ".join(f"{k} ({ui.human_bytes((out / k).stat().st_size)})" for k in m["sha256"])),
        ("time", f"{result.seconds:.1f} s"),
    ]
    ui.out.print(ui.table("g2trt export", ["", ""], rows))


def _describe_quant(q: dict[str, Any]) -> str:
    block = f"block {q['block_size']}" if q["block_size"] else "per output channel"
    head = "head too" if q["head"] else "head float"
    return f"{q['scheme']} weight-only, {q['projections']} projections, {block}, {q['scale_dtype']} scales, {head}"


@cli.command("pipeline")
@checkpoint_arg
@out_opt
@preset_opt
@dtype_opt
@opset_opt
@seed_opt
@click.option("--sm", type=int, default=89, show_default=True, help="Compute capability of the TensorRT-RTX engine.")
@click.option("--no-bench", is_flag=True, help="Skip the closing benchmark.")
@kv_cache_opt("inplace", "KV cache contract of the export and everything after it.")
@click.option("--no-serve", is_flag=True, help="Skip packaging, serving and querying the model (Triton).")
@_one_line_errors
def pipeline_cmd(
    checkpoint: Path | None,
    out: Path,
    preset: str,
    dtype: str,
    opset: int | None,
    seed: int,
    sm: int,
    no_bench: bool,
    kv_cache: str,
    no_serve: bool,
) -> None:
    """The main job: export CHECKPOINT_DIR (or the embedded tiny model), run the graph passes for every
    target, build a TensorRT-RTX engine, benchmark, then package, serve, query and stop the model,
    verifying every graph against PyTorch."""
    from deploy import console as ui
    from deploy.pipeline import PipelineOptions, check, run_pipeline

    options = PipelineOptions(
        preset=preset,
        seed=seed,
        dtype=dtype,  # type: ignore[arg-type]  # click.Choice
        opset=opset,
        kv_cache=kv_cache,  # type: ignore[arg-type]
        sm=sm,
        bench=not no_bench,
        serve=not no_serve,
    )
    rows = run_pipeline(checkpoint, out, options)
    ui.out.print(
        ui.table(
            "g2trt pipeline",
            ["stage", "result", "s", "output"],
            [(r.stage, r.result, f"{r.seconds:.1f}", _relative(r.output, out)) for r in rows],
        )
    )
    check(rows, out)


def _relative(path: str, base: Path) -> str:
    p = Path(path)
    return str(p.relative_to(base)) if p.is_relative_to(base) else path


@cli.command("build")
@click.argument("model", type=click.Path(path_type=Path, exists=False))
@click.option(
    "--out",
    "engine",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Engine file to write; its side file ENGINE.json is written beside it.",
)
@click.option(
    "--backend",
    type=click.Choice(["auto", "tensorrt", "tensorrt-rtx"]),
    default="auto",
    show_default=True,
    help="auto: the full TensorRT where importable and a GPU is present, else TensorRT-RTX.",
)
@click.option(
    "--sm",
    "sms",
    multiple=True,
    help="Target compute capability, e.g. 80, 86, 89 (repeat for several; TensorRT-RTX). "
    "Default: this GPU, or 89 without one.",
)
@click.option("--min", "mins", default="", metavar="DIMS", help="Profile minimums, e.g. batch=1,seq=1,past=0.")
@click.option("--opt", "opts", default="", metavar="DIMS", help="Profile optimum, e.g. batch=1,seq=128,past=512.")
@click.option("--max", "maxs", default="", metavar="DIMS", help="Profile maximums, e.g. batch=8,seq=512,past=4095.")
@click.option(
    "--timing-cache",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Timing cache to read and update (full TensorRT).",
)
@click.option("--plugins", is_flag=True, help="Register g2trt's TensorRT plugins (full TensorRT; for the trt graph).")
@click.option("--opt-level", type=click.IntRange(0, 5), help="Builder optimization level (default 3).")
@click.option("--json", "as_json", is_flag=True, help="Print the build report as JSON instead of a table.")
@click.option("--verbose", is_flag=True, help="Echo TensorRT's log.")
@_one_line_errors
def build_cmd(
    model: Path,
    engine: Path,
    backend: str,
    sms: tuple[str, ...],
    mins: str,
    opts: str,
    maxs: str,
    timing_cache: Path | None,
    plugins: bool,
    opt_level: int | None,
    as_json: bool,
    verbose: bool,
) -> None:
    """Build a TensorRT engine from MODEL (an .onnx file or a `g2trt export` directory)."""
    import json

    from deploy import console as ui
    from deploy.engine.backend import parse_sm
    from deploy.engine.build import BuildOptions, build_engine
    from deploy.engine.profiles import parse_dims

    options = BuildOptions(
        backend=backend,
        sms=tuple(parse_sm(s) for s in sms),
        min=parse_dims(mins, "--min"),
        opt=parse_dims(opts, "--opt"),
        max=parse_dims(maxs, "--max"),
        timing_cache=timing_cache,
        plugins=plugins,
        optimization_level=opt_level,
        verbose=verbose,
    )
    with ui.status(f"building {engine.name}"):
        report = build_engine(model, engine, options)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        ui.out.print(ui.table("g2trt build", ["", ""], report.rows()))


def _prefill_chunk(value: str) -> int | Literal["auto"] | None:
    if value in ("auto", "off"):
        return None if value == "off" else "auto"
    if not value.isdigit() or int(value) < 1:
        raise click.BadParameter(f"auto, off or a number of tokens >= 1, got {value!r}")
    return int(value)


@cli.command("generate")
@click.argument("model", required=False, type=click.Path(path_type=Path, exists=False))
@click.option("--backend", default="torch", show_default=True, help="torch, ort or trt.")
@click.option("--prompt", "prompts", multiple=True, help="Prompt text (needs a tokenizer); repeat for a batch.")
@click.option("--ids", multiple=True, help="Prompt token ids, e.g. '2 651 1234'; repeat for a batch.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-k", type=int, default=0, show_default=True, help="0 disables the top-k filter.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="1 disables the nucleus filter.")
@click.option("--sample-seed", type=int, default=0, show_default=True, help="Seed of the sampler.")
@click.option("--stop", multiple=True, type=int, help="Stop token id (repeat); default: the model's eos ids.")
@click.option("--no-stop", is_flag=True, help="Always generate --max-new-tokens.")
@click.option(
    "--cache",
    default="window",
    show_default=True,
    help="KV cache policy: window (sliding layers keep sliding_window-1 entries) or full.",
)
@click.option("--tokenizer", type=click.Path(path_type=Path), help="tokenizer.json (default: beside MODEL).")
@click.option("--threads", type=int, help="Intra-op threads (default: all cores).")
@kv_cache_opt(
    None,
    "KV cache contract: inplace (fixed buffers written in place; the default for what this command exports) "
    "or dynamic. An ONNX model runs with its own; asking for the other is an error.",
)
@click.option(
    "--prefill-chunk",
    default="auto",
    show_default=True,
    callback=lambda _ctx, _param, value: _prefill_chunk(value),
    help="In-place cache: prefill in chunks of this many tokens; auto: the runner's choice for long prompts "
    "(onnxruntime: 256-token chunks for prompts over 512); off: the whole prompt in one call.",
)
@click.option(
    "--repeat",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Time N generations in one process after one untimed warm-up (each reported with --json).",
)
@preset_opt
@seed_opt
@click.option("--json", "as_json", is_flag=True, help="Print ids, text and timings as JSON.")
@_one_line_errors
def generate_cmd(
    model: Path | None,
    backend: str,
    prompts: tuple[str, ...],
    ids: tuple[str, ...],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    sample_seed: int,
    stop: tuple[int, ...],
    no_stop: bool,
    cache: str,
    tokenizer: Path | None,
    threads: int | None,
    kv_cache: str | None,
    prefill_chunk: int | Literal["auto"] | None,
    repeat: int,
    preset: str,
    seed: int,
    as_json: bool,
) -> None:
    """Generate text from MODEL (checkpoint dir, ONNX or engine; none: the random --preset)."""
    from deploy.generate.loop import GenerationConfig
    from deploy.generate.run import print_output, run_generate
    from deploy.generate.sampling import SamplingConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        sampling=SamplingConfig(temperature, top_k, top_p, sample_seed),
        stop_tokens=() if no_stop else (stop or None),
        cache=cache,  # type: ignore[arg-type]
        prefill_chunk=prefill_chunk,
    )
    result = run_generate(
        model,
        backend,
        prompts=prompts,
        ids=ids,
        config=config,
        tokenizer=tokenizer,
        preset=preset,
        seed=seed,
        threads=threads,
        kv_cache=kv_cache,  # type: ignore[arg-type]
        repeat=repeat,
    )
    print_output(result, as_json)


@cli.command("bench")
@checkpoint_arg
@click.option(
    "--out",
    "out",
    default="g2trt-bench",
    show_default=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Directory for bench.json, .md and .png.",
)
@click.option("--backends", default="torch,ort-plain,ort,trt,ort-genai", show_default=True)
@click.option("--batch", "batches", default="1,4", show_default=True, help="Batch sizes, comma separated.")
@click.option("--prompt", "prompts", default="128,512", show_default=True, help="Prompt lengths, comma separated.")
@click.option("--new", "new_tokens", type=int, default=64, show_default=True, help="New tokens per run.")
@click.option("--warmup", type=int, default=1, show_default=True, help="Untimed rounds per setting.")
@click.option("--repeats", type=int, default=5, show_default=True, help="Timed rounds per setting.")
@click.option("--threads", type=int, help="Intra-op threads of every backend (default: all cores).")
@click.option("--baseline", default="ort-plain", show_default=True, help="Backend the speedups are against.")
@kv_cache_opt("inplace", "KV cache contract of the g2trt backends.")
@click.option("--cooldown", type=float, default=0.05, show_default=True, help="Idle seconds before each trial.")
@preset_opt
@seed_opt
@click.option("--keep-work", is_flag=True, help="Keep the exported models under OUT/work.")
@_one_line_errors
def bench_cmd(
    checkpoint: Path | None,
    out: Path,
    backends: str,
    batches: str,
    prompts: str,
    new_tokens: int,
    warmup: int,
    repeats: int,
    threads: int | None,
    baseline: str,
    kv_cache: str,
    cooldown: float,
    preset: str,
    seed: int,
    keep_work: bool,
) -> None:
    """Time every backend on CHECKPOINT_DIR (or the random --preset), interleaved, against onnxruntime."""
    from deploy.bench.report import print_tables
    from deploy.bench.run import BenchSettings, parse_list, run

    settings = BenchSettings(
        backends=tuple(parse_list(backends, "--backends", str)),
        batches=tuple(parse_list(batches, "--batch", int)),
        prompts=tuple(parse_list(prompts, "--prompt", int)),
        new_tokens=new_tokens,
        warmup=warmup,
        repeats=repeats,
        threads=threads,
        baseline=baseline,
        kv_cache=kv_cache,
        cooldown_s=cooldown,
    )
    result, paths = run(checkpoint, settings, out, preset=preset, seed=seed, keep_work=keep_work)
    print_tables(result, paths)


@cli.command("package")
@click.argument("model", type=click.Path(path_type=Path, exists=False))
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Triton model repository to write into.",
)
@click.option("--name", default="gemma2", show_default=True, help="Model name (its directory in the repository).")
@click.option(
    "--max-batch-size",
    type=int,
    default=None,
    help="Triton max_batch_size [default: the engine's largest batch every profile runs; 8 for ONNX].",
)
@click.option("--instances", type=int, default=1, show_default=True, help="Model instances per device.")
@click.option("--kind", default="auto", show_default=True, help="Instance kind: auto, gpu or cpu.")
@click.option("--max-queue-delay-us", type=int, default=100, show_default=True, help="Dynamic batcher delay.")
@click.option("--no-dynamic-batching", is_flag=True)
@click.option(
    "--plugin-library",
    "plugin_libraries",
    multiple=True,
    help="A TensorRT plugin .so the server must load (not needed for g2trt's AOT plugins).",
)
@click.option("--no-generate", is_flag=True, help="Skip the generation model (NAME_generate, Python backend).")
@click.option("--tokenizer", type=click.Path(path_type=Path), help="tokenizer.json (default: beside MODEL).")
@click.option("--slots", type=int, default=8, show_default=True, help="Requests the generation model runs at once.")
@click.option("--max-len", type=int, default=0, help="Positions per slot (prompt + new tokens; default: the model's).")
@click.option(
    "--prefill-chunk",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Generation model: at most this many prompt tokens between two decode steps (longer prompts in "
    "chunks of it); 0: generate's chunks (onnxruntime: 256 for prompts over 512).",
)
@_one_line_errors
def package_cmd(
    model: Path,
    out: Path,
    name: str,
    max_batch_size: int | None,
    instances: int,
    kind: str,
    max_queue_delay_us: int,
    no_dynamic_batching: bool,
    plugin_libraries: tuple[str, ...],
    no_generate: bool,
    tokenizer: Path | None,
    slots: int,
    max_len: int,
    prefill_chunk: int,
) -> None:
    """Write a Triton Inference Server repository for MODEL (an ONNX model or a TensorRT engine)."""
    from deploy.serve.generate_model import package_repository, print_generate_result
    from deploy.serve.package import print_result
    from deploy.serve.runtime import ServingParams

    result, generation = package_repository(
        model,
        out,
        name=name,
        generate=not no_generate,
        tokenizer=tokenizer,
        params=ServingParams(slots=slots, max_len=max_len, prefill_chunk=prefill_chunk),
        max_batch_size=max_batch_size,
        instances=instances,
        kind=kind,
        max_queue_delay_us=max_queue_delay_us,
        dynamic_batching=not no_dynamic_batching,
        plugin_libraries=plugin_libraries,
    )
    print_result(result)
    if generation is not None:
        print_generate_result(generation)


@cli.command("serve")
@click.argument("repo", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the server listens on.")
@click.option("--http-port", type=int, default=8000, show_default=True, help="0: a free port.")
@click.option("--grpc-port", type=int, default=8001, show_default=True, help="0: a free port.")
@click.option("--metrics-port", type=int, default=8002, show_default=True, help="0: a free port.")
@click.option("--model", "models", multiple=True, help="Generation model to load (repeat; default: all).")
@click.option("--ready-timeout", type=float, default=120, show_default=True, help="Seconds to wait for readiness.")
@click.option("--quiet", is_flag=True, help="Do not echo the server's log.")
@_one_line_errors
def serve_cmd(
    repo: Path,
    host: str,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    models: tuple[str, ...],
    ready_timeout: float,
    quiet: bool,
) -> None:
    """Serve REPO's generation models with a real Triton Inference Server until Ctrl-C or SIGTERM."""
    from deploy.serve.server import ServerOptions, TritonServer, print_ready, serve_forever

    options = ServerOptions(host, http_port, grpc_port, metrics_port, ready_timeout, models=models)
    server = TritonServer(repo, options, on_line=None if quiet else (lambda line: click.echo(line, err=True)))
    serve_forever(server, on_ready=print_ready)


@cli.command("optimize")
@click.argument("model", type=click.Path(path_type=Path, exists=True))
@click.option(
    "--target",
    type=click.Choice(["trt", "ort", "trt-native"]),
    required=True,
    help="trt: g2trt plugin nodes; ort: onnxruntime contrib ops; trt-native: stock TensorRT ops.",
)
@out_opt
@click.option(
    "--provider",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="ort target: the onnxruntime execution provider to lower for (recorded in the manifest).",
)
@click.option("--debug", is_flag=True, help="Print why each rejected candidate did not match.")
@_one_line_errors
def optimize_cmd(model: Path, target: str, out: Path, provider: str, debug: bool) -> None:
    """Rewrite MODEL (an exported model.onnx or its directory) for TARGET into OUT (model, manifest, pass report)."""
    import logging

    from deploy import console as ui
    from graph_passes import optimize

    if debug:
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
    report = optimize(model, target, out, provider=provider, debug=debug)
    rows = [*report.rows(), ("total", "", "", f"{report.nodes_before} -> {report.nodes_after}")]
    ui.out.print(
        ui.table(f"g2trt optimize --target {target}: {report.model_path}", ["pass", "sites", "expected", "nodes"], rows)
    )


@cli.command("verify")
@click.argument("model", type=click.Path(path_type=Path, exists=True))
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    default=None,
    help="HF checkpoint of MODEL's weights (default: the source its manifest records).",
)
@click.option(
    "--max-len",
    type=click.IntRange(16),
    default=None,
    help="Cap on the 'longer than window' prompt [default: window + 9 tokens, across the sliding window].",
)
@click.option(
    "--tokens",
    type=click.IntRange(2),
    default=512,
    show_default=True,
    help="Quantized graphs: length of the teacher-forced token sequence.",
)
@_one_line_errors
def verify_cmd(model: Path, checkpoint: Path | None, max_len: int | None, tokens: int) -> None:
    """Max |logit diff| of MODEL (any g2trt ONNX, any target) against the PyTorch model; for quantized graphs
    also teacher-forced top-1 agreement and mean KL divergence."""
    from deploy import console as ui
    from deploy.verify.model import verify_model

    v = verify_model(model, checkpoint, max_len=max_len, quality_tokens=tokens)
    rows = [(d.case, d.step, d.max_abs_diff, d.ref_max_abs) for d in v.report.diffs]
    ui.out.print(
        ui.table(
            f"g2trt verify {v.model} ({v.target}, {v.dtype}) vs PyTorch fp32, weights: {v.source}",
            ["case", "step", "max |Δlogit|", "max |logit|"],
            rows,
        )
    )
    verdict = "ok" if v.ok else "FAIL"
    if v.quality is not None and v.agreement_bound is not None:
        q, bound = v.quality, v.agreement_bound
        ui.out.print(
            ui.table(
                f"{v.scheme} weights, teacher-forced over {q.tokens} tokens (random weights are a weak signal)",
                ["top-1 agreement", "mean KL (nats)", "max |Δlogit|", "mean |Δlogit|"],
                [(f"{q.top1_agreement:.2%}", ui.fmt(q.mean_kl), ui.fmt(q.max_abs_diff), ui.fmt(q.mean_abs_diff))],
            )
        )
        ui.out.print(f"{verdict}: top-1 agreement {q.top1_agreement:.2%} (bound {bound:.0%} for {v.scheme})")
        if not v.ok:
            raise G2trtError(f"{v.model}: top-1 agreement {q.top1_agreement:.2%} is below {bound:.0%}")
        return
    ui.out.print(f"{verdict}: max |Δlogit| {ui.fmt(v.report.worst)}; {ui.fmt(v.measured)} vs bound {v.bound}")
    ui.out.print(v.coverage())
    if not v.ok:
        raise G2trtError(f"{v.model}: max |logit diff| {ui.fmt(v.measured)} exceeds the bound {v.bound}")


@cli.command("kernels")
@checkpoint_arg
@out_opt
@preset_opt
@dtype_opt
@click.option(
    "--sm",
    "sms",
    multiple=True,
    type=click.Choice(["80", "86", "89", "90"]),
    help="Target compute capability (repeat; default: all four).",
)
@_one_line_errors
def kernels_cmd(checkpoint: Path | None, out: Path, preset: str, dtype: str, sms: tuple[str, ...]) -> None:
    """Compile the plugin kernels a model needs to cubin + PTX for each target (no GPU needed): OUT/kernels.json."""
    from deploy import console as ui
    from export.weights import open_weights
    from trt_plugins.aot import ARCHS, compile_all, model_requests, write_kernels

    cfg = open_weights(checkpoint, preset).config
    kernels = compile_all([int(s) for s in sms] or ARCHS, model_requests(cfg, dtype))
    write_kernels(kernels, out)
    rows = [(k.plugin, k.dtype, k.ptx_target, k.name, k.num_warps, k.shared_mem) for k in kernels]
    columns = ["plugin", "dtype", "target", "kernel", "warps", "shared B"]
    ui.out.print(ui.table(f"g2trt kernels -> {out}", columns, rows))


def main() -> None:
    try:
        cli(prog_name="g2trt")
    except SystemExit as e:
        _exit_without_teardown(e)


def _exit_without_teardown(e: SystemExit) -> NoReturn:
    """Exit as `e` would, skipping the interpreter's teardown when nothing but its own cleanup is left.

    That teardown runs the cyclic GC over everything torch, sympy and onnxscript left (~0.5 M objects
    after an export): 1.2 s of `g2trt export`'s 12. atexit handlers still run and the standard streams
    are flushed; every file g2trt writes is closed by then (export.atomic). With a non-daemon thread
    still running, the interpreter is left to join it as usual.
    """
    if any(not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        raise e
    code = e.code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (`g2trt ... | head`) or stream
            stream.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    main()
