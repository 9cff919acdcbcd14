"""FP8 block-quantisation kernels in the DeepSeek-V3 style.

128 x 128 weight tiles and 1 x 128 activation groups of float8_e4m3fn (max 448) with float32
dequantisation scales; partial blocks are supported, so no dimension has to be a multiple of 128.
`grouped_fp8_gemm` runs many experts' FP8 GEMMs in one call (MoE layers).
Each op has a plain-torch reference (`kernels.reference`) and a Triton kernel
(`kernels.triton_fp8`), chosen per call through `impl` (see `kernels.dispatch`). Importing this
package does not import triton. `weight_quant` (for writing FP8 checkpoints) is torch-only.
`mla_attention` is the masked latent attention of the absorbed MLA path (torch reference and a
Triton kernel in `kernels.triton_attention`, chosen the same way through `impl`).
`kernels.invariant` selects the batch-invariant kernel sets (Triton fixed tiles, or one torch call
per row) that `--batch-invariant` runs.
"""

from .attention import mla_attention, mla_attention_reference
from .dispatch import act_quant, fp8_gemm, fp8_linear, grouped_fp8_gemm, triton_available, weight_dequant
from .reference import BLOCK_SIZE, weight_quant

__all__ = [
    "BLOCK_SIZE",
    "act_quant",
    "fp8_gemm",
    "fp8_linear",
    "grouped_fp8_gemm",
    "mla_attention",
    "mla_attention_reference",
    "triton_available",
    "weight_dequant",
    "weight_quant",
]
