"""One object per exported graph: which diffusers component it comes from, its split-by-composition
module, how its dynamic shapes are declared, and the cases it is validated on. The export and its
validation read only these (and the torch-free `GraphSpec`), never branch on a graph's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from effdiff._deps import require
from effdiff.specs import GRAPHS, Geometry, GraphSpec, Precision

# Relative L2 allowed against fp32 PyTorch, per precision of the exported graph.
TOLERANCE = {Precision.FP32: 1e-4, Precision.FP16: 1e-2}


@dataclass(frozen=True)
class Case:
    """One validation input: a batch, a latent size and (decoder) steps decoded per call."""

    batch: int
    height: int
    width: int
    steps: int = 1

    @property
    def name(self) -> str:
        steps = f" x{self.steps} steps" if self.steps > 1 else ""
        return f"b{self.batch} {self.height}x{self.width}{steps}"


@dataclass(frozen=True)
class GraphExport:
    name: str
    component: str  # the diffusers component it is cut from: "text_encoder", "unet" or "vae"
    wrapper: str  # class name in effdiff.runtime.backends.torch_modules (the torch backend runs it too)
    spatial: bool = True  # has latent axes: validated at two sizes (else at two batch sizes only)
    features_from: str | None = None  # its feature inputs are this graph's outputs (the decoder)
    variadic_from: int | None = None  # inputs from this index on are one *args tuple in forward()
    max_steps: int = 1  # steps per call it is validated at (parallel decoding)
    cache_branch: bool = False  # its module takes DeepCache's branch (from the geometry)

    def module(self, component: Any, geom: Geometry) -> Any:
        split = require("effdiff.runtime.backends.torch_modules")
        cls = getattr(split, self.wrapper)
        return (cls(component, geom.cache_branch) if self.cache_branch else cls(component)).eval()

    def dynamic_shapes(self, spec: GraphSpec) -> tuple[Any, ...]:
        """torch.export dynamic shapes, one entry per forward() argument (variadic ones as a tuple)."""
        dim = require("torch").export.Dim.DYNAMIC
        dyn = [{i: dim for i, ax in enumerate(t.axes) if ax.base is not None} for t in spec.inputs]
        if self.variadic_from is not None:
            return (*dyn[: self.variadic_from], tuple(dyn[self.variadic_from :]))
        return tuple(dyn)

    def cases(self, geom: Geometry, height: int, width: int) -> list[Case]:
        """Two batch sizes, at the export size and at a smaller non-square size; the decoder also
        decodes two steps in one call."""
        if not self.spatial:
            return [Case(1, height, width), Case(2, height, width)]
        f = geom.unet_factor
        h2 = max(f, (height // 2) // f * f)
        w2 = h2 + f
        cases = [Case(1, height, width), Case(2, height, width), Case(1, h2, w2), Case(2, h2, w2)]
        if self.max_steps > 1:
            cases += [Case(2, height, width, self.max_steps), Case(1, h2, w2, self.max_steps)]
        return cases


EXPORTS: dict[str, GraphExport] = {
    e.name: e
    for e in (
        GraphExport("text_encoder", "text_encoder", "TextEncoder", spatial=False),
        GraphExport("unet_encoder", "unet", "UNetEncoder"),
        GraphExport(
            "unet_decoder", "unet", "UNetDecoder", features_from="unet_encoder", variadic_from=3, max_steps=2
        ),
        GraphExport("unet", "unet", "WholeUNet"),
        GraphExport("unet_deep", "unet", "UNetDeep", cache_branch=True),
        GraphExport("unet_shallow", "unet", "UNetShallow", features_from="unet_deep", cache_branch=True),
        GraphExport("vae_decoder", "vae", "VAEDecoder"),
    )
}
assert tuple(EXPORTS) == GRAPHS, "every graph name in specs.GRAPHS has one export object, in order"
