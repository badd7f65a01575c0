"""The PyTorch paths on a CUDA GPU give the answers they give on the CPU: the golden reference
cases, a training step (losses and gradients), and the ``--device cuda`` options of
``cops train``, ``cops eval`` and ``cops predict``.

Marked ``gpu``: they skip (with the reason) where PyTorch sees no CUDA device, as on the CI
machine; ``benchmarks/gpu_check.sh`` runs them on a GPU machine. TF32 is turned off, so CUDA's
fp32 is compared with the CPU's fp32 at the golden tolerances.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from golden_support import golden_dir, golden_model

from cops_deploy import create_model
from cops_deploy.cli.main import main

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)"),
]
GOLDEN = golden_dir()
GOLDEN_TOL = 1e-5  # tests/model/test_golden.py's tolerance
CPU_CUDA_TOL = 1e-4  # the same fp32 model on two devices (different reduction orders)


@pytest.fixture(autouse=True)
def _no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _max_diff(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a
    b = b.detach().cpu().numpy() if isinstance(b, torch.Tensor) else b
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


@pytest.mark.skipif(not (GOLDEN / "cases.npz").is_file(), reason=f"no golden at {GOLDEN}")
def test_the_golden_cases_on_cuda():
    model, cases = golden_model(GOLDEN)
    model = model.cuda().eval()
    for index in range(len(cases["images"])):
        image = torch.from_numpy(cases["images"][index : index + 1]).cuda()
        z = torch.from_numpy(cases["z"][index]).cuda()
        with torch.no_grad():
            out = model.forward_intermediates(image, z=z)
        for name in ("text_features", "anomaly_map", "pred_score"):
            err = _max_diff(getattr(out, name)[0], cases[name][index])
            assert err <= GOLDEN_TOL, f"case {index} {name}: {err:.2e} > {GOLDEN_TOL}"


@pytest.mark.parametrize("arch", ["cops-tiny", "anomalyclip-tiny"])
def test_random_models_answer_alike_on_cpu_and_cuda(arch):
    cpu = create_model(arch, seed=0).eval()
    gpu = create_model(arch, seed=0).cuda().eval()
    x = torch.rand(2, 3, cpu.cfg.vision.input_size, cpu.cfg.vision.input_size, generator=None)
    with torch.no_grad():
        a, b = cpu(x), gpu(x.cuda())
    for name in ("pred_score", "anomaly_map"):
        diff = _max_diff(getattr(a, name), getattr(b, name))
        assert diff <= CPU_CUDA_TOL, f"{arch} {name}: {diff:.3g} > {CPU_CUDA_TOL}"


@pytest.mark.skipif(not (GOLDEN / "train").is_dir(), reason=f"no training golden at {GOLDEN}")
def test_a_training_step_on_cuda_matches_the_cpu():
    """One train_step from the golden weights and the golden batch and noise: the loss terms and
    every gradient on CUDA equal the CPU's (the CPU step equals the reference's:
    tests/train/test_train_golden.py)."""
    from cops_deploy.data.dataset import DatasetItem
    from cops_deploy.model.weights import read_reference_cops
    from cops_deploy.train.policy import training_kernel, uses_recon
    from cops_deploy.train.trainer import TrainCfg, make_optimizer, train_step

    t = np.load(GOLDEN / "train" / "train_cases.npz")
    extras = read_reference_cops(GOLDEN / "train" / "cops_tiny_vae_encoder_reference_format.pth")
    masks = torch.from_numpy(t["masks"][:, 0] > 0.5).float()
    n = masks.shape[0]
    batch = DatasetItem(
        torch.from_numpy(t["images"]), masks, torch.from_numpy(t["labels"]),
        ["golden"] * n, [f"golden/{i}" for i in range(n)], [True] * n,
    )  # fmt: skip
    noise = torch.from_numpy(t["mvtec/noise"][0])
    steps = {}
    for device in ("cpu", "cuda"):
        model, _ = golden_model(GOLDEN)
        model.prompt.load_state_dict(extras, strict=False)
        model = model.to(device)
        model.prompt.train()
        opt = make_optimizer(model, TrainCfg(data=Path("."), dataset="mvtec", out=Path(".")))
        terms = train_step(
            model, opt, batch, training_kernel("mvtec"), uses_recon("mvtec"), None,
            device=device, noise=noise.to(device),
        )  # fmt: skip
        grads = {
            k: p.grad.detach().cpu()
            for k, p in model.prompt.named_parameters()
            if p.grad is not None
        }
        steps[device] = (terms.as_floats(), grads)
    (cpu_terms, cpu_grads), (gpu_terms, gpu_grads) = steps["cpu"], steps["cuda"]
    assert cpu_terms.keys() == gpu_terms.keys() and cpu_grads.keys() == gpu_grads.keys()
    for term, value in cpu_terms.items():
        diff = abs(gpu_terms[term] - value)
        assert diff <= 2e-5 * max(1.0, abs(value)), f"loss {term}: {gpu_terms[term]} vs {value}"
    for name, grad in cpu_grads.items():
        scale = float(grad.abs().max()) or 1.0
        rel = 1e-3 if name.startswith("compound_prompts_text") else 1e-4  # fp16-rounded tokens
        diff = _max_diff(gpu_grads[name], grad)
        assert diff <= rel * scale, f"grad {name}: {diff:.3g} > {rel} x {scale:.3g}"


def test_cli_train_eval_and_predict_with_device_cuda(tmp_path):
    """``--device cuda`` in the three commands: training runs, and the scores that eval and
    predict report from the CUDA-trained weights equal those computed on the CPU."""
    from cops_deploy.data.synth import synthesize

    data = synthesize(
        tmp_path / "data", seed=0, n_train_good=1, n_test_good=2, n_test_bad=2, size=48,
        classes=("noise", "pcb", "screw"),
    )  # fmt: skip
    run = tmp_path / "run"
    train = ["train", "--data", str(data), "--dataset", "synth", "--out", str(run)]
    train += ["--model", "cops-tiny", "--random-clip", "--epochs", "1", "--batch-size", "4"]
    assert main([*train, "--classes", "noise,pcb", "--no-progress", "--device", "cuda"]) == 0
    weights = run / "model"
    metrics, per_image = [], []
    for i, device in enumerate(("cpu", "cuda")):
        out = tmp_path / f"eval-{i}"
        ev = ["eval", "--data", str(data), "--dataset", "synth", "--weights", str(weights)]
        ev += ["--random-clip", "--classes", "screw", "--out", str(out), "--no-progress"]
        assert main([*ev, "--device", device]) == 0
        metrics.append(json.loads((out / "results.json").read_text())["mean"])
        with open(out / "scores.csv", newline="") as f:
            per_image.append({row["path"]: float(row["score"]) for row in csv.DictReader(f)})
    assert per_image[0].keys() == per_image[1].keys() and len(per_image[0]) == 4
    for path, score in per_image[0].items():
        assert abs(per_image[1][path] - score) <= CPU_CUDA_TOL, (path, per_image[1][path], score)
    for metric, value in metrics[0].items():  # pixel metrics move with 1e-7 map differences
        if value is not None:
            assert abs(metrics[1][metric] - value) <= 1e-4, (metric, metrics[1][metric], value)
    images = sorted(Path(data).rglob("*.png"))[:3]
    assert images, "the synthetic dataset has no images"
    scores = []
    for i, device in enumerate(("cpu", "cuda")):
        out = tmp_path / f"predict-{i}"
        pr = ["predict", *map(str, images), "--out", str(out), "--model", "cops-tiny"]
        pr += ["--weights", str(weights), "--no-review"]
        assert main([*pr, "--device", device]) == 0
        report = json.loads((out / "scores.json").read_text())
        assert report["failures"] == [] and len(report["results"]) == 3
        scores.append(np.array([r["score"] for r in report["results"]]))
    assert _max_diff(scores[1], scores[0]) <= CPU_CUDA_TOL
