"""Benchmark: AttZoom layer, fused (one conv_transpose2d) vs literal (zero insertion + conv).

Forward + backward of ``layer(x)`` (fixed upstream gradient) with ``x.requires_grad``, at a mid-network
shape (N=32, C=64, 32x32) and at the input position (N=32, C=3, 64x64). Prints one JSON
object to stdout; progress goes to stderr.

Timing: after warm-up, the two modes are timed alternately (fused, literal, fused, ...)
so that load from other processes hits both alike; the median of each is reported.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over one forward + backward,
minus what was allocated before it. On CPU, one forward + backward runs under
``torch.profiler.profile(profile_memory=True)``; every tensor allocation and free the
CPU allocator makes is recorded with its size, and the peak of their running sum is the
peak extra tensor memory of the step (input, weights and their ``.grad`` from earlier
steps excluded; the step's own ``.grad`` included). Unlike RSS this counts only tensor
bytes, is not blurred by the malloc arena or by the other mode having run earlier in the
same process, and does not need a fresh process per mode.

    .venv/bin/python benchmarks/layer.py            # default, well under 2 minutes on 2 cores
    .venv/bin/python benchmarks/layer.py --quick    # smaller batch, fewer repeats
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from attzoom.layer import AttZoom  # noqa: E402
from benchmarks.common import log, sync  # noqa: E402

SHAPES = {"mid_C64": (64, 32), "input_C3": (3, 64)}  # name -> (channels, side)


def step(module: AttZoom, x: torch.Tensor) -> None:
    x.grad = None
    module.zero_grad(set_to_none=True)
    out = module(x)
    out.backward(upstream_grad(out))


_GRADS: dict = {}


def upstream_grad(out: torch.Tensor) -> torch.Tensor:
    """A fixed gradient from 'the layers above', made once per shape and memory format: in a network it
    arrives as a real tensor laid out like the activation (the fused layer emits channels_last on CPU),
    while ``.sum().backward()`` would make both modes pay to materialise a broadcast of ones."""
    channels_last = out.dim() == 4 and not out.is_contiguous() and out.is_contiguous(
        memory_format=torch.channels_last)
    key = (tuple(out.shape), channels_last, out.device)
    if key not in _GRADS:
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
        _GRADS[key] = grad.contiguous(memory_format=torch.channels_last) if channels_last else grad
    return _GRADS[key]


def timed_step(module: AttZoom, x: torch.Tensor, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    step(module, x)
    sync(device)
    return time.perf_counter() - start


def _walk(nodes):
    for node in nodes:
        yield node
        yield from _walk(node.children)


def peak_bytes_cpu(module: AttZoom, x: torch.Tensor) -> int:
    """Peak of the running sum of CPU tensor allocations minus frees during one step."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    step(module, x)  # leave no lazily created buffers for the profiled step
    x.grad = None
    module.zero_grad(set_to_none=True)
    with torch.no_grad():
        grad = upstream_grad(module(x))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        module(x).backward(grad)
    events = [
        node for node in _walk(prof.profiler.kineto_results.experimental_event_tree())
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu"
    ]
    if not events:
        raise RuntimeError("the profiler recorded no allocations")
    events.sort(key=lambda node: node.start_time_ns)
    live = peak = 0
    for node in events:
        live += node.extra_fields.alloc_size  # negative for a free
        peak = max(peak, live)
    return peak


def peak_bytes_cuda(module: AttZoom, x: torch.Tensor, device: torch.device) -> int:
    step(module, x)
    x.grad = None
    module.zero_grad(set_to_none=True)
    sync(device)
    with torch.no_grad():
        grad = upstream_grad(module(x))
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    module(x).backward(grad)
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def bench_shape(batch: int, channels: int, side: int, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    modules = {"fused": AttZoom(channels, fused=True).to(device)}
    modules["literal"] = AttZoom(channels, fused=False).to(device)
    modules["literal"].load_state_dict(modules["fused"].state_dict())
    x = torch.randn(batch, channels, side, side, device=device, requires_grad=True)

    with torch.no_grad():
        max_abs_diff = (modules["fused"](x) - modules["literal"](x)).abs().max().item()

    for _ in range(args.warmup):
        for module in modules.values():
            step(module, x)
    times = {name: [] for name in modules}
    for _ in range(args.repeats):
        for name, module in modules.items():
            times[name].append(timed_step(module, x, device))

    peaks = {}
    for name, module in modules.items():
        peaks[name] = peak_bytes_cuda(module, x, device) if device.type == "cuda" else peak_bytes_cpu(module, x)

    fused_ms = 1e3 * statistics.median(times["fused"])
    literal_ms = 1e3 * statistics.median(times["literal"])
    result = {
        "shape": [batch, channels, side, side],
        "fused_ms": round(fused_ms, 3),
        "literal_ms": round(literal_ms, 3),
        "speedup": round(literal_ms / fused_ms, 3),
        "fused_ms_min": round(1e3 * min(times["fused"]), 3),
        "literal_ms_min": round(1e3 * min(times["literal"]), 3),
        "fused_peak_mb": round(peaks["fused"] / 2**20, 3),
        "literal_peak_mb": round(peaks["literal"] / 2**20, 3),
        "memory_ratio": round(peaks["literal"] / peaks["fused"], 3),
        "max_abs_diff_fused_vs_literal": max_abs_diff,
    }
    log(f"{result['shape']}: fused {fused_ms:.1f} ms, literal {literal_ms:.1f} ms, "
        f"speedup {result['speedup']}x; peak {result['fused_peak_mb']} vs {result['literal_peak_mb']} MB")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 8, 3 repeats")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 32; 8 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per mode (default 15; 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    args.batch = args.batch or (8 if args.quick else 32)
    args.repeats = args.repeats or (3 if args.quick else 15)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    started = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    shapes = {name: bench_shape(args.batch, c, side, args, device) for name, (c, side) in SHAPES.items()}
    mid = shapes["mid_C64"]
    memory_method = (
        "torch.cuda.max_memory_allocated over one forward+backward, minus memory_allocated before it"
        if device.type == "cuda" else
        "torch.profiler profile_memory=True over one forward+backward: peak of the running sum of every "
        "CPU tensor allocation/free (bytes), i.e. peak extra tensor memory of the step; not RSS"
    )
    print(json.dumps({
        "benchmark": "attzoom_layer_fused_vs_literal",
        "pass": "forward + backward of layer(x) with a fixed upstream gradient, x.requires_grad; AttZoom(C, k=3, t=0.5, zoom=2, gate=True)",
        "device": str(device) if device.type != "cuda" else f"cuda ({torch.cuda.get_device_name(device)})",
        "torch": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": [round(load_at_start, 2), round(os.getloadavg()[0], 2)],
        "load_note": "1-minute load average at start and end; other processes on the CPUs skew timings, "
                     "multi-threaded ones most (use --threads 1 on a shared machine)",
        "quick": args.quick,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "timing": "median of repeats, fused and literal timed alternately",
        "memory_method": memory_method,
        "shapes": shapes,
        "target": "fused >= 3x faster than literal at C=64, and less peak memory",
        "target_met": mid["speedup"] >= 3.0 and mid["fused_peak_mb"] < mid["literal_peak_mb"],
        "wall_s": round(time.perf_counter() - started, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
