"""GPU check for a machine with PyTorch and CUDA only (no TensorRT, no onnxruntime-gpu).

One prepared run (``benchmarks/gpu_check.sh``, under 5 minutes on one GPU) on the full
cops-vit-l-14-336 at 518 with random weights. Stages, in order; the JSON
(``OUT/gpu_check.json``) is rewritten after every stage, so a crash or a timeout keeps what was
measured before it:

- ``fp32_reference``: the model (CopsModel) in fp32, TF32 off: the outputs every path is
  compared with, and its eager latency.
- ``reference_eager_fp32`` / ``reference_eager_fp16``: METHOD.md computed the straightforward
  way (``reference_eager.py``).
- ``deploy_fp16_sdpa`` / ``deploy_bf16_sdpa``: our fastest torch path, the deploy graphs in
  fp16 / bf16 (FP32 islands) with SDPA, replayed as CUDA graphs.
- ``exported_fp16``: the exported FP16 graphs' arithmetic (explicit attention, the islands as
  exported: float32 logits, softmax, LayerNorm, reductions) through PyTorch, CUDA graphs.
- ``exported_fp16_fp16_logits``: the same with float16 attention logits (the form before the
  overflow fix), for the cost of the fix only; not gated.
- ``compare_fp32_reference`` / ``compare_deploy_fp16_sdpa``: the same two measurements for the
  ``--compare-arch`` model (AnomalyCLIP by default), so that CoPS and its baseline are timed
  side by side on one GPU in one run (the paper: 168 vs 131 ms on an RTX 3090); its fp16 path
  is parity-gated against its own fp32 outputs.

Each timed stage measures latency p50/p90 at batch 1 and throughput at ``--batch`` (32), peak GPU
memory, and the parity against ``fp32_reference`` of the outputs of the very runner that was
timed (the CUDA-graph replays, at batch 1 and at the large batch). A stage that fails is recorded
as failed with its error, never replaced by another path. Gates: every gated path's parity, the
paper's 168 ms per frame for the PyTorch fp16 path, no failed stage; the 15 ms target is
reported beside them. Exit status 0 only when every gate passes.

Dry runs on a CPU: ``--device cpu --arch cops-tiny`` runs every stage (eager runners: CUDA
graphs exist on CUDA only, and the JSON says so); ``--device meta`` builds every path on the
``meta`` device, CUDA's stand-in for device placement (a constant created on the CPU fails it).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
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

PAPER_MS = 168.0  # the gate: the paper's per-frame latency
PAPER_COMPARE_MS = 131.0  # AnomalyCLIP in the paper's timing (reported beside ours, not gated)
TARGET_MS = 15.0  # our target for the PyTorch fp16 path (reported, not gated)
MAP_TOL = 1e-2  # anomaly-map max abs diff vs fp32 (the benchmarks' low-precision gate)
SCORE_TOL = 1e-2
GATED_PATH = "deploy_fp16_sdpa"  # the PyTorch fp16 path the latency gate and target apply to
COMPARE_PATH = "compare_deploy_fp16_sdpa"  # the --compare-arch model's fp16 path


# ----------------------------------------------------------------------------------------------
# Timing and runners


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA work is asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` calls, synchronised."""
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
    """p50 / p90 in milliseconds."""
    ms = np.asarray(times) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90))}


class CudaGraphRunner:
    """A module replayed as a CUDA graph for one input shape (static input and outputs).

    Calls return clones of the static outputs, so results of earlier calls stay valid.
    """

    kind = "cuda_graph"

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

    def replay(self, x: torch.Tensor) -> None:
        """Copy ``x`` in and replay (outputs left in the static buffers: the timed call)."""
        self.static_in.copy_(x)
        self.graph.replay()

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.replay(x)
        return self.static_out[0].clone(), self.static_out[1].clone()


class EagerRunner:
    """The module called eagerly: the runner on devices without CUDA graphs (the CPU dry run)."""

    kind = "eager"

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def replay(self, x: torch.Tensor) -> None:
        """One call (the timed call)."""
        with torch.inference_mode():
            self.module(x)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            out = self.module(x)
        return out[0], out[1]


def make_runner(module: torch.nn.Module, example: torch.Tensor) -> CudaGraphRunner | EagerRunner:
    """A CUDA-graph runner on CUDA (a capture failure is raised, never replaced by eager), an
    eager one elsewhere."""
    if example.device.type == "cuda":
        return CudaGraphRunner(module, example)
    return EagerRunner(module)


def parity(
    scores: np.ndarray, maps: np.ndarray, ref_scores: np.ndarray, ref_maps: np.ndarray
) -> dict[str, float]:
    """Max / median anomaly-map and max score differences (NaN counts as infinitely far)."""
    d = np.abs(maps.astype(np.float64) - ref_maps)
    s = np.abs(scores.astype(np.float64) - ref_scores)
    return {
        "map_max_diff": float(np.nan_to_num(d, nan=np.inf).max()),
        "map_median_diff": float(np.median(np.nan_to_num(d, nan=np.inf))),
        "score_max_diff": float(np.nan_to_num(s, nan=np.inf).max()),
        "finite": bool(np.isfinite(maps).all() and np.isfinite(scores).all()),
    }


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A float64 host copy."""
    return t.detach().float().cpu().numpy().astype(np.float64)


# ----------------------------------------------------------------------------------------------
# The check


class Check:
    """Runs the stages, keeps the results and rewrites the JSON after each stage."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.out = args.out / "gpu_check.json"
        self.t0 = time.perf_counter()
        self.result: dict[str, Any] = {
            "arch": args.arch,
            "compare_arch": args.compare_arch or None,
            "device": str(self.device),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
            "batch": args.batch,
            "images": args.images,
            "gates_config": {
                "paper_ms": PAPER_MS,
                "target_ms": TARGET_MS,
                "map_tol": MAP_TOL,
                "score_tol": SCORE_TOL,
            },
            "stages": {},
            "status": "running",
        }
        self.refs: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # by model: "" or "compare"
        self.write()

    def write(self) -> None:
        """Rewrite the JSON (atomically: a reader never sees half a file)."""
        self.result["wall_s"] = time.perf_counter() - self.t0
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.result, indent=2))
        os.replace(tmp, self.out)

    def stage(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        """Run one stage; record its figures, or its failure with the error; write the JSON.
        A stage that ``--stages`` leaves out is neither run nor recorded."""
        if not self.selected(name):
            return
        budget = self.args.budget_s
        elapsed = time.perf_counter() - self.t0
        if elapsed > budget:
            entry: dict[str, Any] = {
                "status": "skipped",
                "reason": f"time budget: {elapsed:.0f} s used of --budget-s {budget:.0f}",
            }
        else:
            print(f"[gpu_check] {name} ...", flush=True)
            start = time.perf_counter()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(self.device)
            try:
                entry = {"status": "ok", **fn()}
            except Exception as exc:  # recorded as a failure (and gated), never hidden
                entry = {
                    "status": "failed",
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(limit=-6),
                }
            entry["stage_s"] = time.perf_counter() - start
            if self.device.type == "cuda":
                entry["peak_gpu_mem_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.result["stages"][name] = entry
        print(f"[gpu_check] {name}: {entry['status']}", flush=True)
        self.write()

    # -- stages --------------------------------------------------------------------------------

    def reference(
        self, model: torch.nn.Module, images: torch.Tensor, key: str = ""
    ) -> dict[str, Any]:
        """fp32 outputs, one image at a time (kept under ``key``), and the eager latency."""
        with torch.inference_mode():
            outs = [model(images[i : i + 1]) for i in range(len(images))]
            t = timed(lambda: model(images[:1]), self.device, 1, self.reps(3))
        scores = np.concatenate([to_numpy(o.pred_score) for o in outs])
        maps = np.concatenate([to_numpy(o.anomaly_map) for o in outs])
        self.refs[key] = (scores, maps)
        return {"eager": stats(t), "finite": bool(np.isfinite(maps).all())}

    def reference_eager(self, model: torch.nn.Module, images: torch.Tensor, dtype) -> dict:
        """ReferenceEager in ``dtype``: latency at batch 1 and parity of its outputs."""
        ref_scores, ref_maps = self.need_reference()
        ref_model = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
        runner = ReferenceEager(ref_model)
        x = images.to(dtype)
        outs = [runner(x[i : i + 1]) for i in range(len(x))]
        t = timed(lambda: runner(x[:1]), self.device, 1, self.reps(3))
        scores = np.array([o[0] for o in outs], dtype=np.float64)
        maps = np.stack([o[1] for o in outs]).astype(np.float64)
        return {"batch1": stats(t), "parity": parity(scores, maps, ref_scores, ref_maps)}

    def deploy_path(
        self, module: torch.nn.Module, images: torch.Tensor, key: str = ""
    ) -> dict[str, Any]:
        """One deploy path: batch-1 runner (latency, parity of its outputs), batch-N runner
        (throughput, parity of its outputs); parity against the fp32 outputs kept under
        ``key``."""
        ref_scores, ref_maps = self.need_reference(key)
        n = len(images)
        runner = make_runner(module, images[:1])
        outs = [runner(images[i : i + 1]) for i in range(n)]
        p1 = parity(
            np.concatenate([to_numpy(o[0]) for o in outs]),
            np.concatenate([to_numpy(o[1]) for o in outs]),
            ref_scores,
            ref_maps,
        )
        t1 = timed(lambda: runner.replay(images[:1]), self.device, self.warmup(3), self.reps())
        runner = None  # free the batch-1 graph before capturing the large batch
        b = self.args.batch
        idx = torch.arange(b) % n
        batch = images[idx.to(images.device)]
        big = make_runner(module, batch)
        scores, maps = big(batch)
        pb = parity(
            to_numpy(scores), to_numpy(maps), ref_scores[idx.numpy()], ref_maps[idx.numpy()]
        )
        tb = timed(lambda: big.replay(batch), self.device, self.warmup(2), self.reps(3))
        return {
            "runner": runner_kind(self.device),
            "batch1": stats(t1),
            "parity": p1,
            f"batch{b}": {**stats(tb), "img_per_s": b / float(np.median(tb))},
            f"parity_batch{b}": pb,
        }

    def placement(self, module: torch.nn.Module, images: torch.Tensor) -> dict[str, Any]:
        """Build and run a path on the check's device (the meta dry run): outputs on that
        device with the right shapes."""
        with torch.inference_mode():
            out = module(images[:2])
        devices = {t.device.type for t in (out.pred_score, out.anomaly_map)}
        size = images.shape[-1]
        if devices != {self.device.type} or tuple(out.anomaly_map.shape) != (2, size, size):
            raise RuntimeError(
                f"outputs on {devices} with shape {tuple(out.anomaly_map.shape)}; expected "
                f"{self.device.type} and (2, {size}, {size})"
            )
        buffers = {b.device.type for b in module.buffers()} | {
            p.device.type for p in module.parameters()
        }
        return {"output_devices": sorted(devices), "weight_and_constant_devices": sorted(buffers)}

    # -- helpers -------------------------------------------------------------------------------

    def reps(self, share: int = 1) -> int:
        """Timed repeats: ``--repeats`` divided by ``share`` (the slow paths), at least 1."""
        return max(1, self.args.repeats // share)

    def warmup(self, n: int) -> int:
        """Warm-up calls: ``n`` on CUDA, 1 on a dry run."""
        return n if self.device.type == "cuda" else 1

    def selected(self, name: str) -> bool:
        """Whether stage ``name`` is to run (``--stages``; every stage by default)."""
        return not self.args.stages or name in self.args.stages.split(",")

    def need_reference(self, key: str = "") -> tuple[np.ndarray, np.ndarray]:
        if key not in self.refs:
            stage = f"{key}_fp32_reference" if key else "fp32_reference"
            raise RuntimeError(f"no fp32 reference outputs (stage {stage} failed)")
        return self.refs[key]

    def gates(self) -> None:
        """Gates (exit status) and the target, from the recorded stages."""
        stages = self.result["stages"]
        gates: dict[str, bool] = {}
        if self.device.type == "meta":
            for name, entry in stages.items():
                gates[f"{name} builds and runs on meta"] = entry["status"] == "ok"
        else:
            for name in (
                "reference_eager_fp32",
                "reference_eager_fp16",
                "deploy_fp16_sdpa",
                "deploy_bf16_sdpa",
                "exported_fp16",
                *((COMPARE_PATH,) if self.args.compare_arch else ()),
            ):
                if name not in stages and not self.selected(name):
                    continue  # left out by --stages
                entry = stages.get(name, {})
                for key in [k for k in entry if k.startswith("parity")]:
                    p = entry[key]
                    gates[f"{name} {key} map max diff <= {MAP_TOL}"] = p["map_max_diff"] <= MAP_TOL
                    gates[f"{name} {key} score diff <= {SCORE_TOL}"] = (
                        p["score_max_diff"] <= SCORE_TOL
                    )
                if entry.get("status") != "ok":
                    gates[f"{name} ran"] = False
            gated = stages.get(GATED_PATH, {})
            p50 = gated.get("batch1", {}).get("p50_ms")
            gates[f"{GATED_PATH} p50 < paper {PAPER_MS} ms"] = p50 is not None and p50 < PAPER_MS
            self.result["target"] = {
                f"{GATED_PATH} p50 < {TARGET_MS} ms": p50 is not None and p50 < TARGET_MS,
                "p50_ms": p50,
            }
            ref_p50 = stages.get("reference_eager_fp16", {}).get("batch1", {}).get("p50_ms")
            if p50 and ref_p50:
                self.result["speedup_vs_reference_eager_fp16"] = ref_p50 / p50
            before = stages.get("exported_fp16_fp16_logits", {}).get("batch1", {}).get("p50_ms")
            after = stages.get("exported_fp16", {}).get("batch1", {}).get("p50_ms")
            if before and after:
                self.result["fp32_logits_cost_ratio"] = after / before
            if self.args.compare_arch:
                other = stages.get(COMPARE_PATH, {}).get("batch1", {}).get("p50_ms")
                self.result["side_by_side"] = {
                    "fp16 batch 1 p50_ms": {self.args.arch: p50, self.args.compare_arch: other},
                    "ratio": (p50 / other) if p50 and other else None,
                    "paper_ms (RTX 3090)": {"cops": PAPER_MS, "anomalyclip": PAPER_COMPARE_MS},
                    "paper_ratio": PAPER_MS / PAPER_COMPARE_MS,
                }
        gates["no stage failed"] = all(e["status"] != "failed" for e in stages.values())
        self.result["gates"] = gates
        self.result["status"] = "pass" if all(gates.values()) else "fail"
        self.write()


def runner_kind(device: torch.device) -> str:
    """What the timed and parity-checked runner is on ``device``."""
    return "cuda_graph" if device.type == "cuda" else "eager (CUDA graphs exist on CUDA only)"


def deploy_variant(model: torch.nn.Module, attn: str, dtype: torch.dtype, fp32_logits=True):
    """The deploy graphs with attention ``attn`` cast to ``dtype`` (FP32 islands)."""
    deploy = DeployModel(model, attn_impl=attn)
    deploy.vision, deploy.head = to_fp16(deploy.vision, dtype), to_fp16(deploy.head, dtype)
    deploy.vision.fp32_logits = deploy.head.fp32_logits = fp32_logits
    return deploy.eval()


PATHS: tuple[tuple[str, str, torch.dtype, bool], ...] = (
    ("deploy_fp16_sdpa", "sdpa", torch.float16, True),
    ("deploy_bf16_sdpa", "sdpa", torch.bfloat16, True),
    ("exported_fp16", "explicit", torch.float16, True),
    ("exported_fp16_fp16_logits", "explicit", torch.float16, False),
)


STAGES = (
    "fp32_reference",
    "reference_eager_fp32",
    "reference_eager_fp16",
    *(p[0] for p in PATHS),
    "compare_fp32_reference",
    COMPARE_PATH,
)


def run(args: argparse.Namespace) -> int:
    """Run the check; returns the exit status."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu (or meta) for a dry run", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # an honest fp32 reference
    torch.backends.cudnn.allow_tf32 = False
    if args.stages:
        unknown = sorted(set(args.stages.split(",")) - set(STAGES))
        if unknown or "fp32_reference" not in args.stages.split(","):
            print(
                f"--stages: unknown {unknown} or no fp32_reference (every path is compared "
                f"with it); stages: {', '.join(STAGES)}",
                file=sys.stderr,
            )
            return 2
    check = Check(args)
    model = create_model(args.arch, seed=0).to(device).eval()
    images = synthetic_images(model.cfg, args.images, seed=3).to(device)

    if device.type == "meta":  # placement only: meta tensors have shapes, no data
        check.stage("placement_model_fp32", lambda: check.placement(model, images))
        check.stage(
            "placement_deploy_fp32", lambda: check.placement(DeployModel(model).eval(), images)
        )
        for name, attn, dtype, fp32_logits in PATHS:
            variant = (attn, dtype, fp32_logits)
            check.stage(
                f"placement_{name}",
                lambda v=variant: check.placement(deploy_variant(model, *v), images),
            )
        if args.compare_arch:
            other = create_model(args.compare_arch, seed=0).to(device).eval()
            other_images = synthetic_images(other.cfg, args.images, seed=3).to(device)
            check.stage(
                f"placement_{COMPARE_PATH}",
                lambda: check.placement(deploy_variant(other, "sdpa", torch.float16), other_images),
            )
        check.gates()
        return 0 if check.result["status"] == "pass" else 1

    check.stage("fp32_reference", lambda: check.reference(model, images))
    for dtype, name in (
        (torch.float32, "reference_eager_fp32"),
        (torch.float16, "reference_eager_fp16"),
    ):
        check.stage(name, lambda d=dtype: check.reference_eager(model, images, d))
    for name, attn, dtype, fp32_logits in PATHS:
        variant = (attn, dtype, fp32_logits)
        check.stage(name, lambda v=variant: check.deploy_path(deploy_variant(model, *v), images))
    if args.compare_arch:  # the baseline, side by side, after every CoPS figure is on disk
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        other: dict[str, Any] = {}  # built inside the stage, so a failure is recorded

        def compare_reference() -> dict[str, Any]:
            other["model"] = create_model(args.compare_arch, seed=0).to(device).eval()
            other["images"] = synthetic_images(other["model"].cfg, args.images, seed=3).to(device)
            return check.reference(other["model"], other["images"], "compare")

        def compare_deploy() -> dict[str, Any]:
            if "model" not in other:
                raise RuntimeError("no model (stage compare_fp32_reference failed)")
            module = deploy_variant(other["model"], "sdpa", torch.float16)
            return check.deploy_path(module, other["images"], "compare")

        check.stage("compare_fp32_reference", compare_reference)
        check.stage(COMPARE_PATH, compare_deploy)
    check.gates()
    print(
        json.dumps({k: check.result[k] for k in ("gates", "target") if k in check.result}, indent=2)
    )
    for gate, ok in check.result["gates"].items():
        print(f"gate {gate}: {'pass' if ok else 'FAIL'}")
    print(f"results: {check.out}")
    return 0 if check.result["status"] == "pass" else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench_out/gpu"))
    p.add_argument("--arch", default="cops-vit-l-14-336")
    p.add_argument(
        "--compare-arch",
        default="anomalyclip-vit-l-14-336",
        help="a second model timed beside --arch (fp32 reference, fp16 deploy path); '' for none",
    )
    p.add_argument(
        "--stages",
        default="",
        help="comma-separated stages to run (default: all); fp32_reference is required",
    )
    p.add_argument("--device", default="cuda", help="cuda, cuda:N; cpu or meta for dry runs")
    p.add_argument("--images", type=int, default=4, help="images for parity (batch 1 each)")
    p.add_argument("--batch", type=int, default=32, help="batch of the throughput runner")
    p.add_argument("--repeats", type=int, default=30, help="timed runs on CUDA")
    p.add_argument(
        "--budget-s",
        type=float,
        default=260.0,
        help="stages that would start after this many seconds are recorded as skipped",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
