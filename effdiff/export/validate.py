"""Validation of exported graphs: each graph in the runtime's backend against its PyTorch module on the
same realistic inputs, and the chain decoder(encoder(x)) against the whole diffusers UNet.

Inputs are what sampling feeds: latents ~ N(0,1), DDIM timesteps, text embeddings of real prompts, and
for the decoder the PyTorch encoder's features of such latents.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from effdiff._deps import require
from effdiff.compare import Comparison, compare_outputs
from effdiff.export.graphs import Case, GraphExport
from effdiff.runtime.backends import Graph
from effdiff.specs import GraphSpec

VALIDATION_PROMPTS = ("a photo of a cat on a red background", "a small blue square at the top left")
# Realistic DDIM-50 timesteps (leading spacing, steps_offset 1): early, middle and late in sampling.
VALIDATION_TIMESTEPS = np.array([981.0, 501.0, 21.0, 741.0], dtype=np.float32)


def run_torch(module: Any, spec: GraphSpec, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The PyTorch module on host feeds, in fp32, outputs as float32 arrays named as in the spec."""
    torch = require("torch")
    with torch.inference_mode():
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in spec.input_names]
        args = [a.float() if a.is_floating_point() else a for a in args]
        outs = module(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return {n: o.float().numpy() for n, o in zip(spec.output_names, outs, strict=True)}


def to_graph_dtype(spec: GraphSpec, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {t.name: np.asarray(feeds[t.name]).astype(t.dtype) for t in spec.inputs}


def case_inputs(
    spec: GraphSpec, case: Case, ehs: np.ndarray, ids: np.ndarray, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Realistic float32 inputs for one case (the graph's own dtypes are applied when it runs)."""
    rows = case.batch * case.steps
    ts = np.resize(VALIDATION_TIMESTEPS, rows)
    feeds = spec.sample_inputs(case.batch, case.height, case.width, rng, timesteps=ts, steps=case.steps)
    if "encoder_hidden_states" in feeds:
        feeds["encoder_hidden_states"] = np.resize(ehs, (case.batch, *ehs.shape[1:])).astype(np.float32)
    if "input_ids" in feeds:
        feeds["input_ids"] = np.resize(ids, (case.batch, ids.shape[1]))
    return {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in feeds.items()}


def validate_graph(
    export: GraphExport,
    module: Any,
    graph: Graph,
    specs: Mapping[str, GraphSpec],
    cases: list[Case],
    ehs: np.ndarray,
    ids: np.ndarray,
    tolerance: float,
    feature_module: Any = None,
) -> list[Comparison]:
    """The exported graph against its PyTorch module, case by case. `feature_module` computes the
    feature inputs of a graph that takes another's outputs (the decoder takes the encoder's)."""
    spec = graph.spec
    rng = np.random.default_rng(0)
    comparisons: list[Comparison] = []
    for case in cases:
        feeds = case_inputs(spec, case, ehs, ids, rng)
        if export.features_from is not None:
            source = specs[export.features_from]
            src_feeds = case_inputs(source, Case(case.batch, case.height, case.width), ehs, ids, rng)
            feeds.update(run_torch(feature_module, source, src_feeds))
        want = run_torch(module, specs[export.name], feeds)
        got = graph.run(to_graph_dtype(spec, feeds))
        case_name = f"b{case.batch}" if not export.spatial else case.name
        comparisons += compare_outputs(export.name, case_name, got, want, tolerance)
    return comparisons


def validate_chain(
    first: Graph,
    second: Graph,
    whole_module: Any,
    whole_spec: GraphSpec,
    cases: list[Case],
    ehs: np.ndarray,
    ids: np.ndarray,
    tolerance: float,
) -> list[Comparison]:
    """second(first(x)) in the backend against the whole diffusers UNet in PyTorch: decoder(encoder(x)),
    and the shallow path around the deep feature of the same inputs (DeepCache at a full step)."""
    rng = np.random.default_rng(1)
    comparisons = []
    name = f"chain {first.spec.name.removeprefix('unet_')}>{second.spec.name.removeprefix('unet_')}"
    for case in cases:
        feeds = case_inputs(whole_spec, case, ehs, ids, rng)
        want = run_torch(whole_module, whole_spec, feeds)
        features = first.run(to_graph_dtype(first.spec, feeds))
        features = {k: v for k, v in features.items() if k in second.spec.input_names}
        got = second.run(to_graph_dtype(second.spec, {**feeds, **features}))
        comparisons += compare_outputs(name, case.name, got, want, tolerance)
    return comparisons
