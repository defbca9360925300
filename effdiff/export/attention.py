"""How attention is written into the ONNX graphs.

`standard` (the default) is what torch.onnx emits for `scaled_dot_product_attention`: MatMul, Softmax,
MatMul at opset 20 (ONNX's `Attention` op from opset 23). Any ONNX consumer runs it, TensorRT included,
but ONNX Runtime's CPU kernels materialize every head's full score matrix: at 512x512 (4096 latent
tokens) that is 8 heads x 4096 x 4096 x 4 B = 0.5 GiB per batch row for each self-attention.

`fused` writes ONNX Runtime's own `com.microsoft.MultiHeadAttention` instead, through the dynamo
exporter's custom translation table, so no hand-made graph rewriting is involved. Its CPU kernel is a
flash-attention loop that never holds the score matrix: one SD1.5 self-attention at 4096 tokens,
2 rows, 8 heads, took 0.04 GiB above its inputs against 1.01 GiB for ONNX's `Attention` op and ran
2.2x faster (ONNX Runtime 1.32, 2-core AVX2 CPU). It is an ONNX Runtime contrib op: TensorRT's and
other parsers refuse it, so the TensorRT path needs a `standard` export.

Only unmasked, non-causal attention is fused (the UNet's and the VAE's); the text encoder's causal
attention is short (77 tokens) and stays standard.
"""

from __future__ import annotations

import math
from typing import Any

from effdiff.errors import EffdiffError

ATTENTION_KINDS = ("standard", "fused")
FUSED_DOMAIN = "com.microsoft"
UNFUSED_GRAPHS = frozenset({"text_encoder"})  # causal attention; left to the exporter


def check_attention(kind: str) -> str:
    if kind not in ATTENTION_KINDS:
        raise EffdiffError(f"attention must be one of {', '.join(ATTENTION_KINDS)}, got {kind!r}")
    return kind


def translation_table(kind: str, graph: str) -> dict[Any, Any] | None:
    """The `custom_translation_table` for torch.onnx.export of `graph`, or None for the exporter's own."""
    if check_attention(kind) == "standard" or graph in UNFUSED_GRAPHS:
        return None
    import torch

    return {torch.ops.aten.scaled_dot_product_attention.default: _fused_sdpa}


def _fused_sdpa(
    query: Any,
    key: Any,
    value: Any,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Any:
    """SDPA on (batch, heads, tokens, head_dim) tensors as one MultiHeadAttention on (batch, tokens,
    heads * head_dim), the layout the contrib op takes; traced by onnxscript at export time."""
    from onnxscript import opset18 as op

    if attn_mask is not None or is_causal or dropout_p or enable_gqa:
        raise EffdiffError(
            "fused attention covers unmasked, non-causal attention only; export with --attention standard"
        )
    heads, head_dim = query.shape[1], query.shape[3]
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        raise EffdiffError("fused attention needs a static head count and head size")
    flat = op.Constant(value_ints=[0, 0, -1])
    split = op.Constant(value_ints=[0, 0, heads, head_dim])

    def tokens_major(x: Any) -> Any:
        return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), flat)

    out = _mha_op()(
        tokens_major(query),
        tokens_major(key),
        tokens_major(value),
        num_heads=heads,
        scale=float(scale) if scale is not None else 1.0 / math.sqrt(head_dim),
    )
    return op.Transpose(op.Reshape(out, split), perm=[0, 2, 1, 3])


def _mha_op() -> Any:
    """The contrib op as an onnxscript Op. onnx's registry has no schema for ONNX Runtime's contrib ops,
    and the exporter's tracer needs one, so it gets the part of the op's documented signature used here:
    query, key, value in; output out; num_heads and scale attributes."""
    import onnx
    from onnxscript.values import Op, Opset

    param = onnx.defs.OpSchema.FormalParameter
    attr = onnx.defs.OpSchema.Attribute
    schema = onnx.defs.OpSchema(
        "MultiHeadAttention",
        FUSED_DOMAIN,
        1,
        inputs=[param("query", "T"), param("key", "T"), param("value", "T")],
        outputs=[param("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float tensors")],
        attributes=[
            attr("num_heads", onnx.defs.OpSchema.AttrType.INT, "heads", required=True),
            attr("scale", onnx.defs.OpSchema.AttrType.FLOAT, "score scale", required=False),
        ],
    )
    return Op(Opset(FUSED_DOMAIN, 1), "MultiHeadAttention", schema)
