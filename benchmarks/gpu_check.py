"""GPU check for a machine with PyTorch only (no TensorRT, no onnxruntime-gpu).

Reference-eager fp16 (METHOD.md the straightforward way) against our fastest torch path (the
deploy graphs in fp16 with SDPA, replayed as a CUDA graph), on the full cops-vit-l-14-336 at
518 with random weights: latency p50/p90 at batch 1, throughput at batch 8, parity of both
against fp32 PyTorch (TF32 off), and the gates: the paper's 168 ms per frame, our 15 ms target,
and the speed-up over reference-eager. Runs in a few minutes; ``benchmarks/gpu_check.sh`` is
the entry point. ``--device cpu --arch cops-tiny`` dry-runs the same code path on a CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference_eager import ReferenceEager  # noqa: E402

from cops_deploy import create_model  # noqa: E402
from cops_deploy.export.fp16 import to_fp16  # noqa: E402
from cops_deploy.export.graphs import DeployModel  # noqa: E402
from cops_deploy.export.onnx_export import synthetic_images  # noqa: E402

PAPER_MS = 168.0
TARGET_MS = 15.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def stats(times: list[float]) -> dict[str, float]:
    ms = np.asarray(times) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90))}


class GraphRunner:
    """A module replayed as a CUDA graph for one input shape (static input/output buffers)."""

    def __init__(self, module: torch.nn.Module, example: torch.Tensor) -> None:
        self.static_in = example.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(3):  # warm-up (allocator, cuBLAS/cuDNN heuristics) off the graph
                module(self.static_in)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.static_out = module(self.static_in)

    def __call__(self, x: torch.Tensor) -> Any:
        self.static_in.copy_(x)
        self.graph.replay()
        return self.static_out


def parity(scores, maps, ref_scores, ref_maps) -> dict[str, float]:
    d = np.abs(maps - ref_maps)
    return {
        "map_max_diff": float(d.max()),
        "map_median_diff": float(np.median(d)),
        "score_max_diff": float(np.abs(scores - ref_scores).max()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench_out/gpu"))
    p.add_argument("--arch", default="cops-vit-l-14-336")
    p.add_argument("--device", default="cuda")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu for a dry run", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # an honest fp32 reference
    torch.backends.cudnn.allow_tf32 = False
    result: dict[str, Any] = {
        "arch": args.arch,
        "device": str(device),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
    }
    t0 = time.perf_counter()
    model = create_model(args.arch, seed=0).to(device).eval()
    images = synthetic_images(model.cfg, args.images, seed=3).to(device)
    lowp = torch.float16 if device.type == "cuda" else torch.bfloat16
    reps = args.repeats if device.type == "cuda" else 3

    with torch.inference_mode():  # fp32 reference outputs
        ref = [model(images[i : i + 1]) for i in range(len(images))]
    ref_scores = np.concatenate([r.pred_score.float().cpu().numpy() for r in ref])
    ref_maps = np.concatenate([r.anomaly_map.float().cpu().numpy() for r in ref])

    # 1. reference-eager in fp16 (77 tokens, per-sample text loop, SciPy blur on the CPU)
    ref_eager = ReferenceEager(copy.deepcopy(model).to(lowp))
    outs = [ref_eager(images[i : i + 1].to(lowp)) for i in range(len(images))]
    t = timed(lambda: ref_eager(images[:1].to(lowp)), device, 2, max(3, reps // 3))
    result["reference_eager_fp16"] = {
        **stats(t),
        **parity(
            np.array([o[0] for o in outs]), np.stack([o[1] for o in outs]), ref_scores, ref_maps
        ),
    }
    ref_eager = None  # free its fp16 copy of the weights

    # 2. ours: deploy graphs in fp16 (fp32 islands), SDPA, CUDA graph
    deploy = DeployModel(model, attn_impl="sdpa")
    deploy.vision, deploy.head = to_fp16(deploy.vision, lowp), to_fp16(deploy.head, lowp)
    deploy = deploy.eval()
    with torch.inference_mode():
        got = [deploy(images[i : i + 1]) for i in range(len(images))]
        t = timed(lambda: deploy(images[:1]), device, 3, reps)
    ours = {"eager_" + k: v for k, v in stats(t).items()}
    ours.update(
        parity(
            np.concatenate([g.pred_score.float().cpu().numpy() for g in got]),
            np.concatenate([g.anomaly_map.float().cpu().numpy() for g in got]),
            ref_scores,
            ref_maps,
        )
    )
    runner = None
    if device.type == "cuda":
        try:
            runner = GraphRunner(deploy, images[:1])
            replay = [
                runner(images[i : i + 1])[1].float().cpu().numpy() for i in range(len(images))
            ]
            ours["cuda_graph_map_max_diff"] = float(np.abs(np.concatenate(replay) - ref_maps).max())
            t = timed(lambda: runner(images[:1]), device, 5, reps * 3)
            ours.update(stats(t))
            batch = images[:1].repeat(8, 1, 1, 1)
            runner8 = GraphRunner(deploy, batch)
            t8 = timed(lambda: runner8(batch), device, 3, reps)
            ours["throughput_batch8_img_s"] = 8 / statistics.median(t8)
        except RuntimeError as exc:  # report, keep the eager figures
            ours["cuda_graph_error"] = f"{type(exc).__name__}: {exc}"
    if "p50_ms" not in ours:
        ours["p50_ms"], ours["p90_ms"] = ours["eager_p50_ms"], ours["eager_p90_ms"]
    result["ours_fp16"] = ours
    result["speedup_vs_reference_eager"] = result["reference_eager_fp16"]["p50_ms"] / ours["p50_ms"]
    gates = {
        f"ours p50 < paper {PAPER_MS} ms": ours["p50_ms"] < PAPER_MS,
        f"ours p50 < target {TARGET_MS} ms": ours["p50_ms"] < TARGET_MS,
        "ours faster than reference-eager fp16": result["speedup_vs_reference_eager"] > 1,
        "ours map max diff vs fp32 <= 1e-2": ours["map_max_diff"] <= 1e-2,
        "ours score diff vs fp32 <= 1e-2": ours["score_max_diff"] <= 1e-2,
    }
    result["gates"] = gates
    result["wall_s"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    for name, ok in gates.items():
        print(f"gate {name}: {'pass' if ok else 'FAIL'}")
    return 0 if all(gates.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
