"""Does vLLM's CPU GEMM dispatch repack weights into a private copy on this machine? Measured, not assumed.

vLLM's CPU backend runs `dispatch_cpu_unquantized_gemm` on every linear layer after loading
(`process_weights_after_loading`). Depending on the CPU and dtype it keeps the weight and calls
`torch.nn.functional.linear`, or hands it to oneDNN (or sgl-kernel), which reorder it into their own
blocked layout and drop the loaded parameter. Only the first leaves room for engines that share one
copy of the weights: a repacked copy is private to its process by construction.

For a 4096 x 4096 weight in float32 and bfloat16, this script runs vLLM's own dispatch and reports
which path it took, the process's private memory (USS) growth, whether the loaded parameter is kept,
the largest difference from `F.linear`, and the time per call of the dispatched GEMM against
`F.linear` on the original weight at decode-sized batches (M = 1 and 16 rows).

Writes bench/results/vllm_repack.md and vllm_repack.json.

    python bench/vllm_repack.py
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import psutil
import torch

RESULTS = Path(__file__).resolve().parent / "results"
N = K = 4096
MiB = 2**20


def uss() -> int:
    return int(psutil.Process().memory_full_info().uss)


def per_call_ms(call: Any, repeats: int = 20) -> float:
    call()
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - started) / repeats * 1e3


def measure(dtype: torch.dtype) -> dict[str, Any]:
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    torch.manual_seed(0)
    weight = torch.randn(N, K).to(dtype)
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    before = uss()
    dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
    grown = uss() - before
    kept = layer.weight.numel() == weight.numel() and layer.weight.data_ptr() == weight.data_ptr()
    x = torch.randn(4, K).to(dtype)
    difference = (layer.cpu_linear(x, layer.weight, None).float() - torch.nn.functional.linear(x, weight).float()).abs()
    row: dict[str, Any] = {
        "dtype": str(dtype).removeprefix("torch."),
        "weight_mib": weight.numel() * weight.element_size() / MiB,
        "private_growth_mib": grown / MiB,
        "loaded_weight_kept": kept,
        "path": "F.linear on the loaded weight" if kept else "repacked (oneDNN / sgl-kernel)",
        "max_abs_difference": float(difference.max()),
    }
    for rows in (1, 16):
        x = torch.randn(rows, K).to(dtype)
        dispatched = per_call_ms(lambda x=x: layer.cpu_linear(x, layer.weight, None))
        plain = per_call_ms(lambda x=x: torch.nn.functional.linear(x, weight))
        row[f"dispatched_ms_m{rows}"], row[f"f_linear_ms_m{rows}"] = dispatched, plain
    return row


def main() -> None:
    import vllm
    from vllm import _custom_ops as ops

    torch.set_num_threads(1)
    rows = [measure(torch.float32), measure(torch.bfloat16)]
    meta = {
        "cpu": platform.processor() or platform.machine(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
        "onednn": bool(ops._supports_onednn),
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vllm_repack.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# vLLM's CPU GEMM dispatch: repacked or kept? (bench/vllm_repack.py)",
        "",
        f"vLLM {meta['vllm']}, torch {meta['torch']}, CPU capability {meta['capability']}, AVX512-BF16 "
        f"{meta['avx512_bf16']}, oneDNN {meta['onednn']}; {meta['date']}. One {N} x {K} linear weight, one thread.",
        "",
        "| dtype | weight MiB | path vLLM took | private memory growth MiB | loaded weight kept | max abs diff | "
        "ms/call M=1 (dispatched / F.linear) | ms/call M=16 (dispatched / F.linear) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['weight_mib']:.0f} | {r['path']} | {r['private_growth_mib']:.1f} | "
            f"{r['loaded_weight_kept']} | {r['max_abs_difference']:.1e} | "
            f"{r['dispatched_ms_m1']:.2f} / {r['f_linear_ms_m1']:.2f} | "
            f"{r['dispatched_ms_m16']:.2f} / {r['f_linear_ms_m16']:.2f} |"
        )
    (RESULTS / "vllm_repack.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
