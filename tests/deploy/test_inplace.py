"""The in-place KV cache through every target and runtime (issue: in-place KV cache from export to runtime).

Cases: batch 3 with left padding (prompts of 25, 22 and 5 tokens), the longest longer than tiny's
16-token window in one call, 64 new tokens so a 16-slot ring wraps five times. Greedy tokens must be
identical to the PyTorch model's on the dynamic contract; logits within 1e-4 (fp32) of the dynamic
contract at prefill and at every decode step (teacher-forced); engines of the in-place trt-native graph
built with TensorRT-RTX; a decode step copies no cache and memory stays flat.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from deploy.engine.build import BuildError, BuildOptions, build_engine
from deploy.engine.profiles import ProfileError
from deploy.generate.loop import GenerationConfig, GenerationError, chunk_for, generate, pad_left, prefill
from deploy.runners import denormals, ort_runner
from deploy.runners.base import cache_sizes, padded_positions, runner_cache_sizes
from deploy.runners.factory import graph_contract
from deploy.runners.ort_runner import OrtInplaceRunner
from deploy.runners.torch_runner import TorchInplaceRunner, TorchRunner
from deploy.verify.parity import Case, compare_inplace
from export.errors import G2trtError
from export.manifest import read_manifest
from export.onnx_export import ExportOptions, export_onnx
from export.weights import load_model
from graph_passes.targets import SLIDING_FULL_MAX
from tests.deploy.build_graphs import optimized

LENGTHS = (25, 22, 5)
NEW = 64
TARGETS = ("plain", "ort", "trt-native", "trt")  # trt: its plugin nodes run as the reference ops


@pytest.fixture(scope="module")
def inplace_graphs(runtime_inplace_export, tmp_path_factory: pytest.TempPathFactory):
    """`inplace_graphs(target)` -> model.onnx of the untied tiny model's in-place export or its target."""
    export = runtime_inplace_export
    cache: dict[str, Path] = {"plain": export.model_path}

    def get(target: str) -> Path:
        if target not in cache:
            cache[target] = optimized(export.model_path, target, tmp_path_factory.mktemp(f"inplace-{target}"))
        return cache[target]

    return get


@pytest.fixture(scope="module")
def model(runtime_weights):
    return load_model(runtime_weights)


@pytest.fixture(scope="module")
def prompts(runtime_cfg) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, runtime_cfg.vocab_size, n).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def reference_tokens(model, prompts) -> list[list[int]]:
    tokens = generate(TorchRunner(model), prompts, GenerationConfig(max_new_tokens=NEW, stop_tokens=())).tokens
    assert all(len(set(t)) > 8 for t in tokens)  # varied output: a broken cache could not hide behind repeats
    return tokens


def _runner(path: Path, cfg) -> OrtInplaceRunner:
    contract, full = graph_contract(read_manifest(path))
    assert contract == "inplace"
    return OrtInplaceRunner(path, cfg, full_sliding=full)


@pytest.mark.parametrize("target", TARGETS)
def test_greedy_tokens_identical_to_the_dynamic_contract(
    target, inplace_graphs, runtime_cfg, prompts, reference_tokens
):
    runner = _runner(inplace_graphs(target), runtime_cfg)
    got = generate(runner, prompts, GenerationConfig(max_new_tokens=NEW, stop_tokens=()))
    assert got.tokens == reference_tokens


def test_torch_inplace_and_chunked_prefill(model, prompts, reference_tokens) -> None:
    for chunk in (None, 4):
        config = GenerationConfig(max_new_tokens=NEW, stop_tokens=(), prefill_chunk=chunk)
        assert generate(TorchInplaceRunner(model), prompts, config).tokens == reference_tokens


@pytest.mark.parametrize("target", [*TARGETS, "ort-rings"])
def test_chunked_prefill_gives_the_same_tokens(target, inplace_graphs, runtime_cfg, prompts, reference_tokens) -> None:
    """Prefill in chunks of 4 and 7 tokens, each continuing what the last wrote: the padded rows start
    mid-chunk, the sliding layers read the window before each chunk (full buffers: a band of slots; rings:
    every slot, wrapped), the global ones the positions written so far (inplace_ops.read_slots)."""
    if target == "ort-rings":  # sliding rings from the first token: chunks continue wrapped buffers
        runner = OrtInplaceRunner(inplace_graphs("ort"), runtime_cfg, full_sliding=True, full_sliding_max=1)
    else:
        runner = _runner(inplace_graphs(target), runtime_cfg)
    runner.prefill_chunk = 4  # what "auto" (the default) then chunks a 25-token prompt in
    widths: list[int] = []
    step = runner.step

    def counted(ids, pos, cache):
        widths.append(ids.shape[1])
        return step(ids, pos, cache)

    runner.step = counted  # type: ignore[method-assign]
    for chunk, steps in (("auto", [4] * 6 + [1, 1]), (7, [7, 7, 7, 4, 1])):
        widths.clear()
        config = GenerationConfig(max_new_tokens=NEW, stop_tokens=(), prefill_chunk=chunk)
        assert generate(runner, prompts, config).tokens == reference_tokens, chunk
        assert widths[: len(steps)] == steps
    # the last chunk's logits against the whole prompt's in one call
    ids, _ = pad_left(prompts, runtime_cfg.pad_token_id)
    width = ids.shape[1]
    pos = padded_positions([len(p) for p in prompts], width)
    whole = runner.step(ids, pos, runner.allocate(3, *runner_cache_sizes(runner, width + 1))).copy()
    cache = runner.allocate(3, *runner_cache_sizes(runner, width + 1, chunk=4))
    last = prefill(runner, ids, pos, cache, 4)
    real = pos[:, -1] >= 0
    assert np.abs(last[real, -1] - whole[real, -1]).max() <= 1e-4


def test_prefill_chunk_settings() -> None:
    """ "auto" (the default) takes the runner's chunk for a prompt of more than two chunks; onnxruntime's
    runners chunk, the others go at once; a number is a chunk for any longer prompt."""
    ort_like, torch_like = SimpleNamespace(prefill_chunk=256), SimpleNamespace(prefill_chunk=None)
    assert GenerationConfig().prefill_chunk == "auto" and ort_runner.PREFILL_CHUNK == 256
    assert chunk_for(ort_like, 512, "auto") is None and chunk_for(ort_like, 513, "auto") == 256
    assert chunk_for(torch_like, 4096, "auto") is None and chunk_for(ort_like, 4096, None) is None
    assert chunk_for(torch_like, 9, 8) == 8 and chunk_for(torch_like, 8, 8) is None
    with pytest.raises(GenerationError, match="--prefill-chunk must be >= 1"):
        chunk_for(ort_like, 9, 0)


@pytest.mark.parametrize("target", TARGETS)
def test_logits_within_bound_of_the_dynamic_contract(target, inplace_graphs, runtime_cfg, model) -> None:
    """Teacher-forced: prefill and 64 decode steps, every step's logits against the dynamic PyTorch model."""
    rng = np.random.default_rng(5)
    width = max(LENGTHS)
    ids = rng.integers(0, runtime_cfg.vocab_size, (3, width))
    mask = np.zeros((3, width), np.int64)
    for row, n in enumerate(LENGTHS):
        mask[row, width - n :] = 1
    report = compare_inplace(
        TorchRunner(model), _runner(inplace_graphs(target), runtime_cfg), [Case("c", ids, mask)], NEW
    )
    assert len(report.diffs) == NEW + 1
    assert report.worst <= 1e-4, report.worst


def test_sliding_buffers_each_target_needs(inplace_graphs) -> None:
    assert graph_contract(read_manifest(inplace_graphs("trt-native"))) == ("inplace", True)  # linear writes
    assert graph_contract(read_manifest(inplace_graphs("ort"))) == ("inplace", True)  # GQA on every layer
    assert read_manifest(inplace_graphs("ort"))["kv_cache_sliding_full_max"] == SLIDING_FULL_MAX["ort"]
    assert "kv_cache_sliding_full_max" not in read_manifest(inplace_graphs("trt-native"))  # a need, at any length


def test_ort_full_sliding_buffers_up_to_their_max(inplace_graphs, runtime_cfg, prompts, reference_tokens) -> None:
    """Full sliding buffers for sequences up to the manifest's `kv_cache_sliding_full_max`, rings beyond
    (GQA's cost grows with the positions it holds, the ring's with its slots): same tokens either way."""
    path = inplace_graphs("ort")
    runner = OrtInplaceRunner(path, runtime_cfg, full_sliding=True)
    assert runner.full_sliding_max == SLIDING_FULL_MAX["ort"]
    window, short = runtime_cfg.sliding_window, runner.full_sliding_max
    assert cache_sizes(runtime_cfg, short, True, full_max=short) == (short, short)
    assert cache_sizes(runtime_cfg, short + 1, True, full_max=short) == (short + 1, window)
    assert runner.allocate(1, short + 1, window).ring == window
    longest = max(len(p) for p in prompts) + NEW
    capped = OrtInplaceRunner(path, runtime_cfg, full_sliding=True, full_sliding_max=longest - 1)
    got = generate(capped, prompts, GenerationConfig(max_new_tokens=NEW, stop_tokens=()))
    assert got.tokens == reference_tokens


def test_ort_masks_are_built_once_per_group_of_layers(inplace_graphs, runtime_cfg) -> None:
    """The `ort` graph's standard-op masks (a first prompt's, the circular buffer's) are built once per
    group of layers sharing a window, behind an If of the GQA condition, not once per layer: one `Range`
    (the slots a circular mask numbers) per group in the whole graph, branches included. The generation
    and parity tests above run these masks (prompts, and rings that wrap)."""
    graph = onnx.load(str(inplace_graphs("ort")), load_external_data=False).graph

    def nodes(g: onnx.GraphProto):
        for n in g.node:
            yield n
            for attr in n.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from nodes(attr.g)

    groups = len(set(runtime_cfg.windows))  # global and sliding
    assert sum(n.op_type == "If" for n in graph.node) == runtime_cfg.num_hidden_layers + groups
    assert sum(n.op_type == "Range" for n in nodes(graph)) == groups


def test_ort_target_on_sliding_rings(inplace_graphs, runtime_cfg, prompts, reference_tokens) -> None:
    """The ort graph also runs on rings (sliding layers then decode by its standard-op branch once a
    sequence outgrows the ring): what a runner told `full_sliding=False` allocates, e.g. to save memory."""
    runner = OrtInplaceRunner(inplace_graphs("ort"), runtime_cfg, full_sliding=False)
    got = generate(runner, prompts, GenerationConfig(max_new_tokens=NEW, stop_tokens=()))
    assert got.tokens == reference_tokens


def test_ort_one_token_graph_equals_its_if_graph(inplace_graphs, runtime_cfg, model) -> None:
    """The tiny `ort` graph decodes in a second session of its one-token form (no per-layer If); the
    teacher-forced logits of every step equal those of the If graph's GQA branch bit for bit, prompts
    stay on the If graph, rings stay on it too (the form needs positions unwrapped), and a graph it
    does not apply to is refused when asked for."""
    path = inplace_graphs("ort")
    runner = _runner(path, runtime_cfg)
    assert runner.decode_session is not None  # tiny: under DECODE_GRAPH_MAX_BYTES
    with_if = OrtInplaceRunner(path, runtime_cfg, full_sliding=True, decode_graph=False)
    assert with_if.decode_session is None
    rng = np.random.default_rng(3)
    ids = rng.integers(0, runtime_cfg.vocab_size, (3, 24))
    pos = np.arange(24)[None].repeat(3, 0) - np.array([[0], [4], [17]])  # left padding: negative positions
    caches = [r.allocate(3, 96) for r in (runner, with_if)]
    assert np.array_equal(runner.step(ids, pos, caches[0]), with_if.step(ids, pos, caches[1]))
    assert runner._bindings == {} and runner._last is None  # the prompt ran on the If graph, unkept
    for _ in range(40):  # past the 16-token window, on full-length buffers
        pos = pos[:, -1:] + 1
        step = rng.integers(0, runtime_cfg.vocab_size, (3, 1))
        assert np.array_equal(runner.step(step, pos, caches[0]), with_if.step(step, pos, caches[1]))
        assert runner._last is not None and runner._last.session is runner.decode_session
    for mine, theirs in zip(caches[0].buffers, caches[1].buffers, strict=True):  # written in place alike
        assert all(np.array_equal(a, b) for a, b in zip(mine, theirs, strict=True))
    ring = OrtInplaceRunner(path, runtime_cfg, full_sliding=False)
    cache = ring.allocate(1, 64, runtime_cfg.sliding_window)
    ring.step(np.array([[5, 6, 7]]), np.array([[0, 1, 2]]), cache)
    ring.step(np.array([[8]]), np.array([[3]]), cache)
    assert ring._last is not None and ring._last.session is ring.session
    with pytest.raises(G2trtError, match="`ort` target's CPU form only"):
        OrtInplaceRunner(inplace_graphs("plain"), runtime_cfg, decode_graph=True)


def test_one_token_graph_only_for_small_weights(inplace_graphs, runtime_cfg, monkeypatch) -> None:
    monkeypatch.setattr(ort_runner, "DECODE_GRAPH_MAX_BYTES", 1 << 20)  # below tiny's weights
    assert _runner(inplace_graphs("ort"), runtime_cfg).decode_session is None
    assert OrtInplaceRunner(inplace_graphs("ort"), runtime_cfg, decode_graph=True).decode_session is not None


def test_only_the_decoding_session_spins_between_runs(inplace_graphs, runtime_cfg) -> None:
    """With a one-token session decoding, the prompt session's pool stops spinning when its run ends (else
    it kept a core busy through every decode step); the decode session keeps spinning between its steps,
    and its threads and denormal mode are the prompt session's."""

    def entry(session, key: str) -> str | None:
        return ort_runner._config_entry(session.get_session_options(), key)

    runner = OrtInplaceRunner(inplace_graphs("ort"), runtime_cfg, threads=2, full_sliding=True)
    assert runner.decode_session is not None
    assert entry(runner.session, ort_runner.SPIN_STOP_KEY) == "1"
    assert entry(runner.decode_session, ort_runner.SPIN_STOP_KEY) is None
    assert entry(runner.decode_session, denormals.CONFIG_KEY) == "1"
    assert runner.decode_session.get_session_options().intra_op_num_threads == 2
    alone = OrtInplaceRunner(inplace_graphs("ort"), runtime_cfg, threads=2, decode_graph=False)
    assert entry(alone.session, ort_runner.SPIN_STOP_KEY) is None  # one session: it decodes too
    unflushed = OrtInplaceRunner(inplace_graphs("ort"), runtime_cfg, flush_denormals=False, decode_graph=True)
    assert unflushed.decode_session is not None and entry(unflushed.decode_session, denormals.CONFIG_KEY) is None


def test_generate_leaves_no_cache_behind(inplace_graphs, runtime_cfg, prompts) -> None:
    """A runner's bindings hold the buffers of the cache they bind; `generate` releases its cache when done,
    so generating again and again does not keep every generation's cache alive."""
    import gc
    import weakref

    runner = _runner(inplace_graphs("ort"), runtime_cfg)
    allocate, held = runner.allocate, []

    def recorded(*args, **kwargs):
        cache = allocate(*args, **kwargs)
        held.append(weakref.ref(cache.buffers[0][0]))
        return cache

    runner.allocate = recorded  # type: ignore[method-assign]
    for _ in range(3):
        generate(runner, prompts, GenerationConfig(max_new_tokens=4, stop_tokens=()))
    gc.collect()
    assert len(held) == 3 and all(ref() is None for ref in held)


@pytest.mark.parametrize("target", ["plain", "ort"])
def test_an_onnxruntime_generation_imports_no_torch(target, inplace_graphs) -> None:
    """A process that only runs onnxruntime (a serving instance, `generate --backend ort`) never imports
    torch, the tiny `ort` graph's one-token session included: 185 MiB and about a second less per process
    (docs/runtime.md)."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from deploy.runners.factory import open_runner, resolve_model\n"
        "from deploy.generate.loop import generate, GenerationConfig\n"
        f"runner = open_runner(resolve_model({str(inplace_graphs(target))!r}), 'ort')\n"
        f"assert (runner.decode_session is not None) == {target == 'ort'}\n"
        "generate(runner, [[5, 6, 7]], GenerationConfig(max_new_tokens=4))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_one_token_graph_reads_a_hard_linked_weights_file(inplace_graphs, runtime_cfg, tmp_path: Path) -> None:
    """`g2trt pipeline` hard-links the export's weights into each target's folder; onnx's loader refuses
    such a file, so the one-token session takes its weights through onnxruntime, as the main one does."""
    import os
    import shutil

    source = inplace_graphs("ort").parent
    for f in source.iterdir():
        (os.link if f.name.endswith(".data") else shutil.copy)(f, tmp_path / f.name)
    runner = _runner(tmp_path / "model.onnx", runtime_cfg)
    assert runner.decode_session is not None
    cache = runner.allocate(1, 32)
    runner.step(np.array([[5, 6, 7]]), np.array([[0, 1, 2]]), cache)
    runner.step(np.array([[8]]), np.array([[3]]), cache)
    assert runner._last is not None and runner._last.session is runner.decode_session


def test_generation_that_does_not_fit_is_refused(inplace_graphs, runtime_cfg) -> None:
    runner = _runner(inplace_graphs("plain"), runtime_cfg)
    long = [[1] * (runtime_cfg.max_position_embeddings - 3)]
    with pytest.raises(GenerationError, match="exceeds the model's max_position_embeddings"):
        generate(runner, long, GenerationConfig(max_new_tokens=8))


def test_decode_copies_no_cache_and_memory_stays_flat(inplace_graphs, runtime_cfg) -> None:
    """1,000 decode steps of the tiny model: resident memory after step 100 and after step 1,000 agree.

    A runner that allocated a present per step, or copied the cache, would grow or churn here; the
    present outputs are bound to the past buffers themselves (tests/export/test_kv_cache.py checks the
    pointers), so a step writes one slot per layer.
    """
    from deploy.bench.worker import rss_mib

    runner = _runner(inplace_graphs("ort"), runtime_cfg)
    cache = runner.allocate(1, 1024, runtime_cfg.sliding_window)
    runner.step(np.array([[5, 6, 7]]), np.array([[0, 1, 2]]), cache)
    ids, pos = np.array([[9]]), np.array([[2]])
    rss = []
    for step in range(1000):
        pos += 1
        runner.step(ids, pos, cache)
        if step in (99, 999):
            rss.append(rss_mib("VmRSS"))
    assert rss[0] is not None and rss[1] is not None
    assert rss[1] - rss[0] < 2.0, rss  # MiB
    assert len(runner._bindings) == 1  # one decode binding, reused by every step


SMALL = {"opt": {"batch": 1, "seq": 16}, "max": {"batch": 2, "seq": 32, "cache": 96}}


@pytest.fixture(scope="module")
def native_graph(runtime_weights, inplace_graphs, tmp_path_factory):
    """`native_graph(dtype)` -> the in-place trt-native graph of an fp32 or fp16 export (cached)."""
    cache: dict[str, Path] = {"fp32": inplace_graphs("trt-native")}

    def get(dtype: str) -> Path:
        if dtype not in cache:
            options = ExportOptions(dtype=dtype, kv_cache="inplace")  # type: ignore[arg-type]
            export = export_onnx(runtime_weights, tmp_path_factory.mktemp(f"inplace-{dtype}"), options)
            cache[dtype] = optimized(export.model_path, "trt-native", tmp_path_factory.mktemp(f"native-{dtype}"))
        return cache[dtype]

    return get


@pytest.mark.parametrize(("dtype", "sm"), [("fp32", 80), ("fp32", 89), ("fp16", 80), ("fp16", 89)], ids=str)
def test_tensorrt_rtx_builds_the_inplace_trt_native_graph(dtype, sm, native_graph, runtime_weights, tmp_path_factory):
    native = native_graph(dtype)
    report = build_engine(
        native, tmp_path_factory.mktemp("engines") / "m.engine", BuildOptions("tensorrt-rtx", (sm,), **SMALL)
    )
    layers = runtime_weights.config.num_hidden_layers
    assert report.layers.get("KV_CACHE_UPDATE") == 2 * layers  # the in-place write, one per cache tensor
    assert report.meta.dtype == dtype and report.meta.target_sms == (sm,)
    for profile in report.meta.profiles:
        for name in ("past_key_values.0.key", "past_key_values.1.key"):  # sliding and global: static, full
            assert [shape[2] for shape in profile["shapes"][name]] == [96, 96, 96]


def test_engine_profiles_must_fix_the_cache(inplace_graphs, tmp_path: Path) -> None:
    native = inplace_graphs("trt-native")
    with pytest.raises(ProfileError, match="cache must be fixed"):
        build_engine(
            native, tmp_path / "e.engine", BuildOptions("tensorrt-rtx", (89,), min={"cache": 64}, max={"cache": 96})
        )
    with pytest.raises(BuildError, match="ring 64 must equal cache 96"):
        build_engine(native, tmp_path / "e.engine", BuildOptions("tensorrt-rtx", (89,), max={"cache": 96, "ring": 64}))
    assert not list(tmp_path.iterdir())  # nothing written
