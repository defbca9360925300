"""ONNX Runtime backend: sessions that check their inputs against the graph spec before running.

With a CUDA or TensorRT execution provider, outputs asked for with `host_outputs=False` stay on the
GPU as OrtValues (IOBinding) and are bound, not copied, when fed to the next graph: the encoder's
mid/skip features go to the decoder without a round trip through host memory.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from effdiff._deps import require
from effdiff.artifacts import W16_TAG
from effdiff.errors import EffdiffError
from effdiff.runtime.backends import first_line
from effdiff.specs import UNET_GRAPHS, GraphSpec

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
# After run() returns, a session's intra-op threads spin for a while waiting for more work. Graphs that
# take turns with another graph (encoder/decoder, deep/shallow, and the text encoder and VAE before and
# after the loop) then run while the other session's threads hold the cores: on 2 cores the cache
# recipe's UNet time on the reference model fell from 1.85 to 1.01 s per image (4 rows) once its
# sessions stopped spinning after each run. Only the whole UNet runs back to back, where the spinning
# saves each next run the threads' wake-up, so it keeps ONNX Runtime's default.
SPIN_BETWEEN_RUNS = frozenset({"unet"})
# Session option (not one of ONNX Runtime's): the names of the graphs (or True: all) that allocate from
# one CPU arena registered with the process's ONNX Runtime environment instead of their own. It grows
# by what is asked (no doubling) and outlives sessions, so graphs that run many times keep an arena's
# speed (no fresh pages from the kernel at every run) at about no-arena memory; graphs not named keep
# the other options (a lean plan turns their arena off). A graph on it runs without ONNX Runtime's
# memory pattern unless the options set `enable_mem_pattern`: the pattern asks the arena for one block
# sized for the whole run's planned peak, on top of the blocks it holds. SD1.5 architecture at 512x512,
# 2 rows, run peak above the process, pattern on -> off: fp32 decoder 3.05 -> 2.55 GiB, encoder 2.13 ->
# 1.74, INT8 decoder 1.96 -> 1.41, encoder 1.44 -> 1.00, at the same speed or faster (5.9 -> 5.5 s,
# 2.9 -> 2.8, 3.1 -> 3.0, 1.9 -> 1.6-1.9; benchmarks/memory.py --options shared,shared-no-pattern).
SHARED_ARENA = "shared_arena"
# Session option (not one of ONNX Runtime's): when true, `config:session.disable_prepacking` applies to
# float graphs only. A quantized graph's pre-packed weights replace its int8 initializers (SD1.5
# architecture, INT8 UNet halves at 512x512, one row per call: +0.02 GiB at the run peak), while
# without them MLAS packs every weight again at every call (1.3x slower encoder, 1.25x decoder). A
# float graph's packed copies cost 22 % of its weights (fp32 decoder: 1.94 against 1.51 GiB).
PREPACK_QUANTIZED = "prepack_quantized"
# Session option (not one of ONNX Runtime's): when true, a graph whose spec says it stores fp16 weights
# read through Casts (meta "fp16_weights": INT8 graphs' float layers) keeps them fp16 in memory. ONNX
# Runtime otherwise folds each Cast into an fp32 copy at session creation: in constant folding, and
# again in the layout optimizations of ORT_ENABLE_ALL, which ignore the list of disabled optimizers.
# So such a graph runs at ORT_ENABLE_EXTENDED without constant folding, casting at every call. SD1.5
# architecture, INT8 halves at 512x512, one row, lean options: sessions 0.53 -> 0.38 GiB (encoder) and
# 0.92 -> 0.75 GiB (decoder), run peaks 0.77 -> 0.70 and 1.11 -> 0.98 GiB, the same time per call
# within 4 % in two runs (benchmarks/memory.py --options runtime-lean-fold-fp16,runtime-lean). The
# quantized convolutions then stay NCHW (ORT_ENABLE_ALL moves them to NHWC kernels), which rounds differently:
# on the reference model INT8 still follows every attribute of 192 prompts, 53.9 dB from fp32 against
# 54.0 (benchmarks/int8_reference.py, "int8 lean").
KEEP_FP16_WEIGHTS = "keep_fp16_weights"
# What sessions on the CPU provider get unless the caller passes options: ONNX Runtime's defaults, but
# the UNet graphs, which run at every step, on the shared arena (without the memory pattern, above), and
# the text encoder and VAE, which run once per image, on no arena at all: their memory pattern's block
# comes from the system for each run and goes back after it. With an arena per session, each one keeps
# its own largest run. SD1.5 architecture, 512x512, VAE decoder on one image, run peak above the
# process: 3.07 GiB on the shared arena with the pattern (the previous default), 2.04 without the
# pattern, 1.38 on no arena, in 13.0 / 12.5 / 12.8 s (benchmarks/memory.py --rows 1, two or three interleaved
# fresh processes each). Whole generations: README "Memory". Other providers keep ONNX Runtime's own
# defaults: not measured there.
#
# A graph on no arena runs without ONNX Runtime's buffer reuse unless the options set `enable_mem_reuse`:
# its planner hands a dead tensor's buffer to a later tensor of the same shape, and the buffer sits
# unused in between, while the tensors in between take fresh memory. In the SD1.5 VAE at 512x512 the
# last up block's first GroupNorm runs beside such a held 256 MiB buffer (its upsampler and first
# resnet alone: 1.0 GiB peak with reuse, 0.5 without). Without reuse each tensor's memory goes back to
# the system when it dies, and the memory pattern (kept on) still plans one block per run. Whole VAE
# decoder, one 512x512 image, run peak above its session 1.00 -> 0.88 GiB at the same speed (13.8 s
# both; without the pattern too 0.75 GiB, but 17-19 s; benchmarks/memory.py --rows 1 --options
# no-arena-reuse,no-arena-no-reuse, interleaved fresh processes). The UNet graphs keep reuse on the
# shared arena: off, their activations fall by a third to a half (fp32 decoder 0.61 -> 0.36 GiB above
# its session, INT8 0.51 -> 0.28) but they run 2-10 % slower, so only lean options turn it off there.
CPU_DEFAULT_OPTIONS: dict[str, Any] = {SHARED_ARENA: UNET_GRAPHS, "enable_cpu_mem_arena": False}
_ORT_DTYPES = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
}


def _ort() -> Any:
    return require("onnxruntime")


def available_providers() -> list[str]:
    return list(_ort().get_available_providers())


def default_providers() -> list[str]:
    """CUDA first when onnxruntime-gpu provides it, CPU always last."""
    available = available_providers()
    return [*(p for p in ("CUDAExecutionProvider",) if p in available), "CPUExecutionProvider"]


def check_providers(providers: list[str]) -> list[str]:
    """EffdiffError naming the providers this onnxruntime build lacks (it would only warn and fall back)."""
    available = available_providers()
    unknown = [p for p in providers if p not in available]
    if unknown or not providers:
        raise EffdiffError(
            f"execution provider(s) {', '.join(unknown) or '(none given)'} not available in this "
            f"onnxruntime; available: {', '.join(available)}"
        )
    return providers


def default_session_options(providers: list[str]) -> dict[str, Any]:
    """The options sessions get unless the caller passes some: CPU_DEFAULT_OPTIONS on the CPU provider
    alone, ONNX Runtime's own defaults with any other."""
    return dict(CPU_DEFAULT_OPTIONS) if list(providers) == ["CPUExecutionProvider"] else {}


def _describe(value: Any) -> tuple[np.dtype, tuple[int, ...]]:
    if isinstance(value, np.ndarray):
        return value.dtype, value.shape
    if hasattr(value, "data_type") and hasattr(value, "shape") and callable(value.shape):  # OrtValue
        return _ORT_DTYPES.get(value.data_type(), np.dtype(object)), tuple(value.shape())
    arr = np.asarray(value)
    return arr.dtype, arr.shape


class OrtGraph:
    """One exported graph in an onnxruntime session."""

    def __init__(
        self,
        path: Path,
        spec: GraphSpec,
        providers: list[str] | None = None,
        threads: int | None = None,
        io_binding: bool | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        ort = _ort()
        self.spec = spec
        self.path = Path(path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # keep ORT's own warnings off the user's terminal
        if threads:
            opts.intra_op_num_threads = threads
        defaults = {} if spec.name in SPIN_BETWEEN_RUNS else {"config:session.force_spinning_stop": "1"}
        options = dict(options or {})
        shared = options.pop(SHARED_ARENA, ())
        if options.pop(PREPACK_QUANTIZED, False) and spec.meta.get("quantized"):
            options.pop("config:session.disable_prepacking", None)
        if options.pop(KEEP_FP16_WEIGHTS, False) and spec.meta.get("fp16_weights"):
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            options["config:optimization.disable_specified_optimizers"] = "ConstantFolding"
        self.on_shared_arena = shared is True or spec.name in shared
        if self.on_shared_arena:
            _register_shared_arena()
            options["config:session.use_env_allocators"] = "1"
            options.pop("enable_cpu_mem_arena", None)
            options.setdefault("enable_mem_pattern", False)
        elif options.get("enable_cpu_mem_arena") is False:
            options.setdefault("enable_mem_reuse", False)  # why: above CPU_DEFAULT_OPTIONS
        for key, value in {**defaults, **options}.items():  # the caller's options win
            if key.startswith("config:"):
                opts.add_session_config_entry(key[len("config:") :], str(value))
            else:
                setattr(opts, key, value)
        providers = providers or default_providers()
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own types (Fail, InvalidGraph, NoSuchFile ...)
            raise EffdiffError(f"cannot load {self.path}: {first_line(exc)}") from exc
        names = [i.name for i in self.session.get_inputs()]
        outs = [o.name for o in self.session.get_outputs()]
        if names != spec.input_names or outs != spec.output_names:
            raise EffdiffError(
                f"{self.path} has inputs {names} and outputs {outs}; its spec says {spec.input_names} "
                f"and {spec.output_names}; re-export"
            )
        on_gpu = self.session.get_providers()[0] in GPU_PROVIDERS
        self.device = "cuda" if on_gpu else "cpu"
        # IOBinding pays where outputs can stay on a device; `io_binding=True` forces it (tests, CPU).
        self.io_binding = on_gpu if io_binding is None else io_binding

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def run(self, feeds: Mapping[str, Any], host_outputs: bool = True) -> dict[str, Any]:
        self.spec.check_inputs(feeds, _describe)
        try:
            if not self.io_binding:
                host = {n: _host(feeds[n]) for n in self.spec.input_names}
                return dict(zip(self.spec.output_names, self.session.run(None, host), strict=True))
            return self._run_bound(feeds, host_outputs)
        except EffdiffError:
            raise
        except Exception as exc:  # a kernel failure (out of memory, an op's own check)
            raise EffdiffError(f"{self.spec.name} failed in onnxruntime: {first_line(exc)}") from exc

    def _run_bound(self, feeds: Mapping[str, Any], host_outputs: bool) -> dict[str, Any]:
        ort = _ort()
        binding = self.session.io_binding()
        for name in self.spec.input_names:
            value = feeds[name]
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.spec.output_names:
            binding.bind_output(name, "cpu" if host_outputs else self.device)
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        if host_outputs:
            return {n: v.numpy() for n, v in zip(self.spec.output_names, values, strict=True)}
        return dict(zip(self.spec.output_names, values, strict=True))

    def close(self) -> None:
        self.unload()
        self.end_phase()

    def unload(self) -> None:
        """Drop the session but leave the shared arena as it is, for the next graph's run (a graph
        opened for each call, `PerCallGraph`); `end_phase` gives it back later."""
        self.session = None  # type: ignore[assignment]

    def end_phase(self) -> None:
        """Between phases the shared arena's blocks would only sit there (the text encoder and the VAE
        run off it): give them back. The next phase's first run takes fresh pages once."""
        if self.on_shared_arena:
            release_shared_arena()


@functools.cache
def _register_shared_arena() -> None:
    """Once per process: ONNX Runtime refuses a second allocator for the same memory info."""
    ort = _ort()
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 1}))  # same as asked


# ONNX model `y = Identity(x)`, x and y float[1], opset 13, IR 7: what onnx.helper.make_model serializes
# (tests check it). Written out because the runtime does not depend on the onnx package.
_IDENTITY_MODEL = (
    b'\x08\x07:7\n\x10\n\x01x\x12\x01y"\x08Identity\x12\x01gZ\x0f\n\x01x\x12\n\n\x08\x08\x01\x12\x04'
    b"\n\x02\x08\x01b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\r"
)


@functools.cache
def _arena_releaser() -> tuple[Any, Any]:
    """A trivial session on the process's shared arena, and run options that shrink the arenas it uses
    once its run ends."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.use_env_allocators", "1")
    # no thread pool: its threads would spin after the run while the next phase's graph starts
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    session = ort.InferenceSession(_IDENTITY_MODEL, opts, providers=["CPUExecutionProvider"])
    run_options = ort.RunOptions()
    run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return session, run_options


def release_shared_arena() -> None:
    """Give the shared arena's free blocks back to the system. Its blocks outlive runs and sessions:
    after the UNet phase it otherwise keeps the largest run's activations and, once the graphs are
    closed, the quantized graphs' pre-packed weights (SD1.5 architecture, INT8 halves at 512x512: 0.88
    GiB held after both closed, 0.08 after this), and the next phase opens and runs on top of them. ONNX
    Runtime shrinks an arena only at the end of a run, hence a run of a one-op graph."""
    if _register_shared_arena.cache_info().currsize == 0:
        return  # no shared arena in this process
    session, run_options = _arena_releaser()
    session.run(None, {"x": np.zeros(1, np.float32)}, run_options)


def _host(value: Any) -> np.ndarray:
    return value.numpy() if hasattr(value, "numpy") and not isinstance(value, np.ndarray) else value


class OrtBackend:
    """ONNX Runtime with the given execution providers (default: CUDA when present, then CPU).
    `fp16_weights=True` runs the folder's `fp32-w16` variants (weights stored fp16, computed fp32)."""

    name = "ort"
    formats = ("onnx",)

    def __init__(
        self,
        providers: list[str] | None = None,
        threads: int | None = None,
        io_binding: bool | None = None,
        session_options: Mapping[str, Any] | None = None,
        fp16_weights: bool = False,
    ) -> None:
        self.providers = check_providers(list(providers)) if providers else default_providers()
        self.variant_tag = W16_TAG if fp16_weights else ""
        self.threads = threads
        self.io_binding = io_binding
        options = default_session_options(self.providers) if session_options is None else session_options
        self.session_options = dict(options)

    def open(self, path: Path, spec: GraphSpec) -> OrtGraph:
        return OrtGraph(path, spec, self.providers, self.threads, self.io_binding, self.session_options)

    def batches_pay(self) -> bool:
        """Measured on 2 CPU cores (SD1.5 architecture): decoder batching costs 0.71 -> 0.89 s per step
        at 8 steps per call, so only GPU providers batch by default."""
        return self.providers[0] in GPU_PROVIDERS

    def to_host(self, value: Any) -> np.ndarray:
        return _host(value)

    def describe(self) -> str:
        return f"onnxruntime {_ort().__version__} ({', '.join(self.providers)})"
