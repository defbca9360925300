"""PyTorch backend: the split modules (the ones the export traces) built from the source model the manifest
names, on CUDA when present (fp16 there) or on the CPU (fp32).

It needs no exported file: its graphs are opened by name from the model folder (`open_source`), so a
GPU machine without TensorRT runs the same loop, propagation and hooks on PyTorch. With
`host_outputs=False` a graph returns CUDA tensors, which the next graph takes as they are: the
encoder's features stay on the GPU until the decoder has used them. `compile=True` wraps each module in
`torch.compile`; `cuda_graphs=True` captures one CUDA graph per input shape and replays it (fixed shapes,
as the loop has them: one shape for the encoder, one per decoder group size).

Importing this module does not import torch: it is imported when the backend is first asked for.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from effdiff._deps import require
from effdiff.errors import EffdiffError
from effdiff.runtime.backends import first_line
from effdiff.specs import GraphSpec, Precision


def _torch() -> Any:
    return require("torch")


def _describe(value: Any) -> tuple[np.dtype, tuple[int, ...]]:
    if isinstance(value, np.ndarray):
        return value.dtype, value.shape
    torch = _torch()
    if isinstance(value, torch.Tensor):
        return np.dtype(str(value.dtype).removeprefix("torch.")), tuple(value.shape)
    arr = np.asarray(value)
    return arr.dtype, arr.shape


class _CudaGraphRunner:
    """One captured CUDA graph per input shape signature: static input buffers are filled, the graph is
    replayed, and the static outputs are cloned (the next replay overwrites them)."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self._graphs: dict[tuple[tuple[int, ...], ...], tuple[Any, list[Any], tuple[Any, ...]]] = {}

    def __call__(self, *args: Any) -> tuple[Any, ...]:
        torch = _torch()
        key = tuple(tuple(a.shape) for a in args)
        if key not in self._graphs:
            static_in = [a.clone() for a in args]
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up on a side stream, as capture requires
                    self.module(*static_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.module(*static_in)
            self._graphs[key] = (graph, static_in, out if isinstance(out, tuple) else (out,))
        graph, static_in, static_out = self._graphs[key]
        for buf, value in zip(static_in, args, strict=True):
            buf.copy_(value)
        graph.replay()
        return tuple(o.clone() for o in static_out)


class TorchGraph:
    """One split module on a device. Feeds are numpy arrays or tensors (on any device; moved here);
    outputs are numpy arrays, or tensors on the device with `host_outputs=False`."""

    def __init__(
        self,
        module: Any,
        spec: GraphSpec,
        device: str,
        compute_dtype: Any,
        compile: bool = False,
        cuda_graphs: bool = False,
        synchronize: bool = False,
    ) -> None:
        torch = _torch()
        self.spec = spec
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        self.io_dtypes = {t.name: getattr(torch, t.dtype) for t in (*spec.inputs, *spec.outputs)}
        self.synchronize = synchronize and self.device.type == "cuda"
        self.module = module
        call = torch.compile(module, dynamic=False) if compile else module
        self._call = _CudaGraphRunner(call) if cuda_graphs else call

    def _tensor(self, name: str, value: Any) -> Any:
        torch = _torch()
        t = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
        t = t.to(self.device, non_blocking=True)
        return t.to(self.compute_dtype) if t.is_floating_point() and name != "timestep" else t

    def run(self, feeds: Mapping[str, Any], host_outputs: bool = True) -> dict[str, Any]:
        self.spec.check_inputs(feeds, _describe)
        torch = _torch()
        try:
            with torch.inference_mode():
                args = [self._tensor(n, feeds[n]) for n in self.spec.input_names]
                outs = self._call(*args)
                outs = outs if isinstance(outs, tuple) else (outs,)
                result = {
                    n: o.to(self.io_dtypes[n]) for n, o in zip(self.spec.output_names, outs, strict=True)
                }
                if self.synchronize:  # so that the caller's timer measures the work, not its launch
                    torch.cuda.synchronize(self.device)
        except EffdiffError:
            raise
        except Exception as exc:  # out of memory, a kernel's own check
            raise EffdiffError(f"{self.spec.name} failed in PyTorch: {first_line(exc)}") from exc
        if host_outputs:
            return {n: v.cpu().numpy() for n, v in result.items()}
        return result

    def close(self) -> None:
        self.module = self._call = None


class TorchBackend:
    """Runs the split modules in PyTorch, built from the source model the manifest names.

    device: "cuda", "cuda:1", "cpu" (default: CUDA when torch sees one). The pipeline's precision sets
    the graphs' float dtype: fp16 by default on CUDA, fp32 on the CPU. `upcast_vae` runs the VAE decoder
    in fp32 under an fp16 pipeline (fp16 VAE decoders are known to give black or NaN images).
    """

    name = "torch"
    formats = ("torch",)

    def __init__(
        self,
        device: str | None = None,
        compile: bool = False,
        cuda_graphs: bool = False,
        synchronize: bool = False,
        upcast_vae: bool = True,
        threads: int | None = None,
    ) -> None:
        torch = _torch()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise EffdiffError(
                f"the torch backend was asked for {self.device}, but this PyTorch sees no CUDA GPU "
                f"(torch {torch.__version__}); use device='cpu' or a CUDA build of PyTorch"
            )
        if cuda_graphs and not self.device.startswith("cuda"):
            raise EffdiffError("CUDA graphs need a CUDA device; the torch backend runs on the CPU here")
        if threads:
            torch.set_num_threads(threads)
        self.compile = compile
        self.cuda_graphs = cuda_graphs
        self.synchronize = synchronize
        self.upcast_vae = upcast_vae
        # One diffusers component per (folder, component, dtype), shared by the graphs cut from it (the
        # encoder, decoder and whole UNet hold one UNet), and freed when the last of them is closed.
        self._components: weakref.WeakValueDictionary[tuple[str, str, str], Any] = (
            weakref.WeakValueDictionary()
        )
        self._lock = threading.Lock()

    def source_precision(self, requested: Precision | None) -> Precision:
        """fp16 on CUDA and fp32 on the CPU unless asked otherwise; INT8 is a TensorRT/ONNX matter."""
        if requested is None:
            return Precision.FP16 if self.device.startswith("cuda") else Precision.FP32
        if requested is Precision.INT8:
            raise EffdiffError(
                "the torch backend runs fp32 or fp16; INT8 runs through the ort or trt backend on "
                "`effdiff-export int8` graphs"
            )
        return requested

    def _component(self, folder: Path, component: str, dtype: Any) -> Any:
        from effdiff.runtime.backends.torch_modules import load_pretrained

        key = (str(folder), component, str(dtype))
        with self._lock:
            found = self._components.get(key)
            if found is None:
                found = load_pretrained(folder, component, dtype).to(self.device)
                self._components[key] = found
        return found

    def open_source(self, folder: Path, graph: str, spec: GraphSpec) -> TorchGraph:
        """The split module of `graph` around its component of the model in `folder`."""
        torch = _torch()
        from effdiff.runtime.backends.torch_modules import SPLIT_MODULES, split_module

        if spec.float_dtype not in ("float32", "float16"):
            raise EffdiffError(f"the torch backend runs fp32 or fp16 graphs, not {spec.float_dtype}")
        dtype = getattr(torch, spec.float_dtype)
        if graph == "vae_decoder" and self.upcast_vae:
            dtype = torch.float32
        if not Path(folder).is_dir():
            raise EffdiffError(
                f"the torch backend builds its graphs from the source model, but {folder} (named in the "
                "manifest) is not there; run on the machine that exported, or re-export from a copy"
            )
        component = self._component(Path(folder), SPLIT_MODULES[graph][0], dtype)
        module = split_module(graph, component, int(spec.meta.get("cache_branch", 0)))
        return TorchGraph(module, spec, self.device, dtype, self.compile, self.cuda_graphs, self.synchronize)

    def open(self, path: Path, spec: GraphSpec) -> TorchGraph:
        raise EffdiffError(
            f"the torch backend builds {spec.name} from the source model, not from a file ({path})"
        )

    def batches_pay(self) -> bool:
        return self.device.startswith("cuda")

    def to_host(self, value: Any) -> np.ndarray:
        torch = _torch()
        if isinstance(value, torch.Tensor):
            return value.detach().cpu().numpy()
        return np.asarray(value)

    def describe(self) -> str:
        torch = _torch()
        extra = [x for x, on in (("compile", self.compile), ("CUDA graphs", self.cuda_graphs)) if on]
        where = self.device
        if self.device.startswith("cuda"):
            where = f"{self.device} ({torch.cuda.get_device_name(torch.device(self.device))})"
        return f"torch {torch.__version__} on {where}" + (f", {', '.join(extra)}" if extra else "")
