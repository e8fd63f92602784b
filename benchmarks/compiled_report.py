"""Prints what XLA reports about a compiled program: per-device memory and, where known, its flops."""

from typing import Any


def print_compiled(compiled: Any, *, bf16_on_cpu: bool) -> None:
    """``memory_analysis()`` per device and ``cost_analysis()`` flops of a ``jax.stages.Compiled``."""
    mem = compiled.memory_analysis()
    print("memory_analysis (per device):")
    for field in (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "alias_size_in_bytes",
        "temp_size_in_bytes",
        "generated_code_size_in_bytes",
    ):
        value = getattr(mem, field, None)
        if value is not None:
            print(f"  {field:30s} {value / 2**30:8.2f} GiB")
    if bf16_on_cpu:
        # XLA:CPU has no bf16 matmuls: it converts the operands to f32, hoisting f32 copies of the stacked
        # weights out of the scan, which inflates temp memory by about 2x the weights. GPUs/TPUs do not.
        print("  note: on CPU, temp includes f32 copies of the bf16 weights: an upper bound for TPU/GPU")
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    if cost and "flops" in cost:
        print(f"flops (XLA estimate)             {cost['flops'] / 1e12:8.2f} TFLOP")
