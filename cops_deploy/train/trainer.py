"""Train the learned CoPS parameters on an auxiliary dataset (METHOD.md section 6).

``train(TrainCfg(...))`` freezes CLIP and trains ctx_pos, ctx_neg, the deep tokens, t_n, t_a,
the prototype extractor and the VAE encoder and decoder with Adam (lr 1e-3, betas (0.5, 0.999)),
batch 8, on the labelled (test) split of the dataset. A run folder holds::

    RUN/train_config.json          what the run is (checked again on --resume)
    RUN/losses.jsonl               one JSON line per step, and one per epoch (means)
    RUN/checkpoints/epoch_NNNN/    one atomic, pickle-free checkpoint per epoch
    RUN/model/                     the final model: save_model(include_clip=False)

Everything random is driven by seeded generators whose states are checkpointed (the
DataLoader's shuffling, the ICTS noise, the global torch RNG), so a run resumed from a
checkpoint gives exactly the tensors of the same run left uninterrupted.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cops_deploy.data.dataset import DatasetItem, MetaDataset
from cops_deploy.data.solvers import canonical_dataset
from cops_deploy.errors import ConfigError, TrainingError
from cops_deploy.model.cops import CopsModel
from cops_deploy.model.factory import create_model, save_model
from cops_deploy.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    load_optimizer_state,
    optimizer_state,
    remove_stale_temporaries,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from cops_deploy.train.forward import training_forward
from cops_deploy.train.losses import LossTerms, check_empty_gather, cops_loss, patch_labels
from cops_deploy.train.policy import training_kernel, uses_recon
from cops_deploy.version import __version__

CONFIG_FILE = "train_config.json"
LOSS_LOG = "losses.jsonl"
CHECKPOINTS = "checkpoints"
MODEL_DIR = "model"
NOISE_SEED_OFFSET = 1  # the ICTS noise generator is seeded with seed + this
# Run settings that may change between an interrupted run and its --resume.
RESUMABLE_CHANGES = ("epochs", "device", "num_workers")
PROGRESS_TERMS = ("total", "image", "patch", "gather", "scatter", "kl", "recon")


@dataclass(frozen=True)
class TrainCfg:
    """One training run. ``clip_weights`` or ``random_clip`` (smoke runs) must be given."""

    data: Path
    dataset: str
    out: Path
    model: str = "cops-vit-l-14-336"
    clip_weights: str | None = None
    random_clip: bool = False
    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    seed: int = 0
    classes: tuple[str, ...] | None = None
    resume: bool = False
    device: str = "cpu"
    num_workers: int = 0
    progress: bool = True
    # gather on a batch without normal patches: "reference" (NaN, as the reference) or "zero"
    empty_gather: str = "reference"
    # None: the reference's rule from the dataset name (policy.training_kernel / uses_recon)
    neighbour_kernel: int | None = None
    recon_loss: bool | None = None


@dataclass
class TrainResult:
    """What a run produced."""

    run_dir: Path
    model_dir: Path
    loss_log: Path
    checkpoints: list[Path]
    start_epoch: int  # 0, or the epoch of the checkpoint resumed from
    epochs: int
    steps: int
    epoch_losses: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    model: CopsModel | None = None


# ------------------------------------------------------------------------------ checks


def _check_cfg(cfg: TrainCfg) -> None:
    checks = [
        (cfg.epochs >= 1, f"--epochs must be >= 1, got {cfg.epochs}"),
        (cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}"),
        (cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}"),
        (cfg.seed >= 0, f"--seed must be >= 0, got {cfg.seed}"),
        (cfg.num_workers >= 0, f"num_workers must be >= 0, got {cfg.num_workers}"),
        (
            len(cfg.betas) == 2 and all(0.0 <= b < 1.0 for b in cfg.betas),
            f"betas must be two values in [0, 1), got {cfg.betas}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"invalid training setting: {message}")
    check_empty_gather(cfg.empty_gather)
    k = cfg.neighbour_kernel
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 != 1):
        raise ConfigError(
            f"invalid training setting: --neighbour-kernel must be a positive odd int, got {k!r}. "
            "Fix: pass 3 or 5, or leave it out for the reference's rule (3 on MVTec-AD, else 5)."
        )
    if cfg.clip_weights is None and not cfg.random_clip:
        raise ConfigError(
            "no CLIP weights given: CoPS trains on top of a frozen CLIP. Fix: pass "
            "--clip-weights (a ViT-L-14-336px .pt file, or 'openai' to download it), or "
            "--random-clip for a smoke run (the result is meaningless)."
        )
    if cfg.clip_weights is not None and cfg.random_clip:
        raise ConfigError(
            f"--clip-weights {cfg.clip_weights!r} and --random-clip exclude each other. "
            "Fix: pass only one."
        )


def _prepare_run_dir(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder. Fix: choose a folder path.")
    if resume:
        if not (out / CONFIG_FILE).is_file():
            raise ConfigError(
                f"--resume: {out} holds no run to resume (no {CONFIG_FILE}). Fix: pass the "
                "--out folder of an interrupted run, or leave out --resume to start one."
            )
        return
    if out.is_dir() and any(out.iterdir()):
        shown = ", ".join(sorted(p.name for p in out.iterdir())[:5])
        raise ConfigError(
            f"--out {out} is not empty (holds {shown}). Fix: pass --resume to continue the run "
            "in it, or choose a new or empty folder."
        )
    out.mkdir(parents=True, exist_ok=True)


def _run_config(cfg: TrainCfg, model: CopsModel, data: MetaDataset) -> dict[str, Any]:
    return {
        "data": str(Path(cfg.data).resolve()),
        "dataset": canonical_dataset(cfg.dataset),
        "split": data.split,
        "classes": data.classes,
        "images": len(data),
        "model": model.cfg.name,
        "clip": model.provenance["clip"],
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "betas": list(cfg.betas),
        "seed": cfg.seed,
        "neighbour_kernel": (
            training_kernel(cfg.dataset) if cfg.neighbour_kernel is None else cfg.neighbour_kernel
        ),
        "recon_loss": uses_recon(cfg.dataset) if cfg.recon_loss is None else cfg.recon_loss,
        "empty_gather": cfg.empty_gather,
        "device": cfg.device,
        "num_workers": cfg.num_workers,
        "cops_deploy_version": __version__,
    }


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    from cops_deploy.fileio import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(payload, indent=2) + "\n").encode())


def _check_resume_config(saved: dict[str, Any], now: dict[str, Any], run: Path) -> None:
    saved = {"empty_gather": "zero", **saved}  # runs from before the option gave 0
    keys = sorted((saved.keys() | now.keys()) - set(RESUMABLE_CHANGES))
    diff = [
        f"{k}: run {saved.get(k)!r}, now {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)
    ]
    if diff:
        raise ConfigError(
            f"--resume: the settings differ from those of the run in {run} ("
            + "; ".join(diff)
            + "). Only --epochs may change. Fix: resume with the original settings "
            f"(see {run / CONFIG_FILE}), or start a new run in another folder."
        )


# ------------------------------------------------------------------------------ training


def train_step(
    model: CopsModel,
    optimizer: torch.optim.Optimizer,
    batch: DatasetItem,
    kernel: int,
    use_recon: bool,
    generator: torch.Generator | None,
    device: str | torch.device = "cpu",
    noise: torch.Tensor | None = None,
    empty_gather: str = "reference",
) -> LossTerms:
    """One optimisation step on a collated batch; returns the loss terms (before the step).

    ``noise`` replaces the ICTS draw from ``generator`` (to replay a recorded step).
    ``empty_gather`` is what gather is on a batch without normal patches (see
    ``cops_deploy.train.losses``): with ``"reference"`` that NaN is expected, its gradient is
    finite, and the step goes on; any other non-finite term stops training.
    """
    images = batch.image.to(device)
    out = training_forward(model, images, kernel, generator, noise)
    terms = cops_loss(
        out,
        batch.mask.to(device),
        batch.label.to(device),
        model.cfg.vision.patch_size,
        use_recon,
        empty_gather,
    )
    checked = terms.total
    patches = patch_labels(batch.mask, model.cfg.vision.patch_size)
    if empty_gather == "reference" and bool(patches.ne(0).all()):
        # no normal patch: gather is the reference's NaN; every other term must be finite
        checked = terms.image + terms.patch + terms.scatter + terms.kl + terms.recon
    if not torch.isfinite(checked):
        raise TrainingError(
            f"the loss is not finite ({terms.as_floats()}) on the batch of "
            f"{list(batch.path)[:3]}... Fix: lower --lr, or check these images and masks."
        )
    optimizer.zero_grad(set_to_none=True)
    terms.total.backward()
    optimizer.step()
    return terms


def _truncate_log(path: Path, last_epoch: int) -> None:
    """Keep the lines of the epochs up to ``last_epoch`` (a resumed run rewrites the rest)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the interruption
        if isinstance(record, dict) and record.get("epoch", 0) <= last_epoch:
            kept.append(line)
    from cops_deploy.fileio import atomic_write_bytes

    atomic_write_bytes(path, "".join(f"{line}\n" for line in kept).encode())


class _Generators:
    """The run's named torch generators, seeded from the run seed."""

    def __init__(self, seed: int) -> None:
        self.loader = torch.Generator().manual_seed(seed)
        self.noise = torch.Generator().manual_seed(seed + NOISE_SEED_OFFSET)

    def named(self) -> dict[str, torch.Generator]:
        return {"loader": self.loader, "noise": self.noise}


def _resume(
    run: Path, model: CopsModel, optimizer: torch.optim.Optimizer, gens: _Generators
) -> tuple[int, int]:
    """Load the latest checkpoint of ``run`` (if any); return (epoch, step) to go on from."""
    ckpt_root = run / CHECKPOINTS
    remove_stale_temporaries(ckpt_root)
    found = list_checkpoints(ckpt_root)
    if not found:
        _truncate_log(run / LOSS_LOG, 0)
        return 0, 0
    ck = load_checkpoint(found[-1])
    model.prompt.load_state_dict(ck.prompt)
    names = [n for n, _ in model.prompt.named_parameters()]
    load_optimizer_state(optimizer, names, ck.optimizer_tensors, ck.optimizer_meta, str(ck.path))
    restore_rng_state(ck.rng, gens.named(), str(ck.path))
    _truncate_log(run / LOSS_LOG, ck.epoch)
    return ck.epoch, ck.step


def _progress_text(sums: dict[str, float], count: int) -> dict[str, str]:
    return {k: f"{sums[k] / count:.4f}" for k in PROGRESS_TERMS}


def make_optimizer(model: CopsModel, cfg: TrainCfg) -> torch.optim.Adam:
    """The reference's optimizer (train.py:53): Adam over every learned CoPS parameter (CLIP
    frozen), lr and betas from ``cfg`` (1e-3, (0.5, 0.999)), eps 1e-8, no weight decay."""
    return torch.optim.Adam(model.prompt.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))


def build_model(cfg: TrainCfg) -> CopsModel:
    """The model a run starts from: the architecture, CLIP weights (or random) and seed."""
    model = create_model(cfg.model, clip_weights=cfg.clip_weights, seed=cfg.seed)
    return model.to(cfg.device)


@dataclass
class _Session:
    """Everything one training session works with."""

    cfg: TrainCfg
    run: Path
    model: CopsModel
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    gens: _Generators
    kernel: int
    use_recon: bool
    result: TrainResult

    def run_epoch(self, epoch: int, log: Any) -> None:
        """One pass over the data; appends step lines and the epoch line to the loss log."""
        cfg, sums, count = self.cfg, {}, 0
        bar = tqdm(
            self.loader,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="batch",
            disable=not cfg.progress,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        for batch in bar:
            terms = train_step(
                self.model,
                self.optimizer,
                batch,
                self.kernel,
                self.use_recon,
                self.gens.noise,
                cfg.device,
                empty_gather=cfg.empty_gather,
            )
            self.result.steps += 1
            count += 1
            values = terms.as_floats()
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            record = {"kind": "step", "epoch": epoch + 1, "step": self.result.steps, **values}
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(_progress_text(sums, count), refresh=False)
        bar.close()
        means = {k: v / max(count, 1) for k, v in sums.items()}
        record = {"kind": "epoch", "epoch": epoch + 1, "step": self.result.steps, **means}
        log.write(json.dumps(record) + "\n")
        log.flush()
        os.fsync(log.fileno())
        self.result.epoch_losses.append(means)

    def checkpoint(self, epoch: int) -> None:
        """Write the checkpoint after ``epoch`` epochs."""
        names = [n for n, _ in self.model.prompt.named_parameters()]
        tensors, meta = optimizer_state(self.optimizer, names)
        path = save_checkpoint(
            self.run / CHECKPOINTS,
            epoch,
            self.result.steps,
            self.model.prompt.state_dict(),
            tensors,
            meta,
            rng_state(self.gens.named()),
            {"epoch_loss": self.result.epoch_losses[-1]},
        )
        self.result.checkpoints.append(path)


def _start(cfg: TrainCfg) -> tuple[_Session, dict[str, Any], MetaDataset]:
    """Check, build the model and data, write (or check) the run config, resume if asked."""
    _check_cfg(cfg)
    run = Path(cfg.out)
    canonical_dataset(cfg.dataset)  # refuse an unknown name before any work
    _prepare_run_dir(run, cfg.resume)
    model = build_model(cfg)
    data = MetaDataset(cfg.data, model.cfg.preprocess, "test", cfg.classes)
    run_config = _run_config(cfg, model, data)
    if cfg.resume:
        saved = json.loads((run / CONFIG_FILE).read_text())
        _check_resume_config(saved, run_config, run)
    _write_json(run / CONFIG_FILE, run_config)
    model.prompt.train()
    optimizer = make_optimizer(model, cfg)
    gens = _Generators(cfg.seed)
    start_epoch, step = _resume(run, model, optimizer, gens) if cfg.resume else (0, 0)
    loader = DataLoader(
        data,
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=gens.loader,
        num_workers=cfg.num_workers,
    )
    result = TrainResult(
        run_dir=run,
        model_dir=run / MODEL_DIR,
        loss_log=run / LOSS_LOG,
        checkpoints=[],
        start_epoch=start_epoch,
        epochs=cfg.epochs,
        steps=step,
    )
    kernel, use_recon = run_config["neighbour_kernel"], run_config["recon_loss"]
    session = _Session(cfg, run, model, optimizer, loader, gens, kernel, use_recon, result)
    return session, run_config, data


def train(cfg: TrainCfg) -> TrainResult:
    """Run (or resume) a training run; see the module docstring for what it writes."""
    start_time = time.perf_counter()
    session, run_config, data = _start(cfg)
    result, model = session.result, session.model
    with open(result.loss_log, "a", encoding="utf-8") as log:
        for epoch in range(result.start_epoch, cfg.epochs):
            session.run_epoch(epoch, log)
            session.checkpoint(epoch + 1)
    model.eval()
    model.provenance = {
        **model.provenance,
        "cops": f"cops train: {run_config['dataset']} ({', '.join(data.classes)}), "
        f"{cfg.epochs} epochs, seed {cfg.seed}",
    }
    save_model(model, result.model_dir, include_clip=False)
    result.seconds = time.perf_counter() - start_time
    result.model = model
    return result


def read_loss_log(path: str | os.PathLike[str], kind: str = "epoch") -> list[dict[str, Any]]:
    """The records of a run's ``losses.jsonl`` of one kind ("step" or "epoch")."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("kind") == kind]
