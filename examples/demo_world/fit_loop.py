"""The one optimisation loop of the demo's own stages (VAE, decoder, base, 9-channel UNet, ControlNet).

The BrushNet branch is trained by the project's loop (:func:`brushnet.training.train`); this loop mirrors
its choices so the models it trains beside the branch are trained alike: AdamW, a diffusers learning-rate
schedule with warm-up, gradient clipping, an optional EMA of the weights (the final weights are the EMA's),
one seeded ``torch.Generator`` per stage for every random draw, and a checkpoint every few hundred steps
that a rerun of the same stage resumes from. Nothing here touches the global random state or the number of
threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from brushnet.devices import DeferredLosses

__all__ = ["FitResult", "FitSettings", "StreamBatches", "fit", "seeded_init", "stage_generator"]

logger = logging.getLogger("demo_world.fit")


def stage_generator(seed: int, stage: str) -> torch.Generator:
    """The CPU generator of one stage: seeded from the run's seed and the stage's name."""
    digest = hashlib.sha256(f"{seed}:{stage}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:6], "little"))


@contextlib.contextmanager
def seeded_init(generator: torch.Generator) -> Iterator[None]:
    """Build models inside this block for weights that are a function of ``generator`` alone.

    Module constructors draw their initial weights from the global generator; this forks it (the global
    state is restored on exit), seeds the fork from ``generator``, and leaves the process's random state as it
    was.
    """
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@dataclass
class FitSettings:
    """How one stage optimises (the names of :class:`brushnet.training.config.TrainConfig` where they exist)."""

    steps: int
    learning_rate: float
    lr_scheduler: str = "cosine"  # a diffusers.optimization.get_scheduler name
    lr_warmup_steps: int = 20
    adam_weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    ema_decay: float | None = None  # None: no EMA
    logging_steps: int = 50
    checkpointing_steps: int = 250


@dataclass
class FitResult:
    """What a stage's fit reports."""

    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0  # of the steps this process ran (a resumed fit counts only its own)
    steps_run: int = 0

    def summary(self) -> dict:
        recent = self.losses[-50:] or [float("nan")]
        return {
            "steps": self.steps,
            "final_loss": sum(recent) / len(recent),
            "seconds_per_step": round(self.seconds / max(self.steps_run, 1), 3),
        }


class StreamBatches:
    """Batches of a training stream the way :func:`brushnet.training.train` reads them (same loader, same
    epochs), so a stage fed by it sees the branch's samples in the branch's order; resumable by position."""

    def __init__(self, dataset, batch_size: int, num_workers: int = 0):
        from torch.utils.data import DataLoader

        from brushnet.training.data import collate

        self.dataset = dataset
        self.loader = DataLoader(
            dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate, drop_last=True
        )
        self.epoch, self.batches_done = 0, 0
        self._batches = None

    def __call__(self, generator: torch.Generator) -> dict:
        from brushnet.training.data import iterate_batches

        while True:
            if self._batches is None:
                self._batches = iterate_batches(
                    self.loader, self.dataset, epoch=self.epoch, skip=self.batches_done
                )
            batch = next(self._batches, None)
            if batch is not None:
                self.batches_done += 1
                return batch
            self.epoch, self.batches_done, self._batches = self.epoch + 1, 0, None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_done, self._batches = state["epoch"], state["batches_done"], None


def fit(
    model: torch.nn.Module,
    loss_of: Callable[[object, torch.Generator], torch.Tensor],
    batches: Callable[[torch.Generator], object],
    settings: FitSettings,
    *,
    generator: torch.Generator,
    name: str,
    checkpoint: str | os.PathLike | None = None,
) -> FitResult:
    """Train the parameters of ``model`` that require grad for ``settings.steps`` steps.

    Args:
        model: the trained module(s) (an ``nn.ModuleDict`` for several); frozen parts stay outside.
        loss_of: ``(batch, generator) → scalar loss``; draws its own noise, timesteps, ... from ``generator``.
        batches: ``generator → batch``; if it has ``state_dict``/``load_state_dict`` its position is
            checkpointed (:class:`StreamBatches`), otherwise it must draw from ``generator`` alone.
        settings: the optimisation.
        generator: the stage's generator (checkpointed with the rest).
        name: for the log lines.
        checkpoint: a file to save the whole state to every ``checkpointing_steps`` steps and resume from
            when it exists and was written with the same settings; ``None``: no checkpoints.

    Returns:
        The losses of every step this process ran, and their time. ``model`` is left in eval mode with the
        EMA weights when ``ema_decay`` is set.
    """
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.adam_weight_decay)
    lr_scheduler = get_scheduler(
        settings.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=settings.lr_warmup_steps,
        num_training_steps=settings.steps,
    )
    # on CUDA a few multi-tensor kernels per step (as AdamW's default there); on the CPU the loop earlier runs used
    foreach = bool(params) and params[0].device.type == "cuda"
    ema = EMAModel(params, decay=settings.ema_decay, foreach=foreach) if settings.ema_decay else None
    step, losses = 0, []
    checkpoint = Path(checkpoint) if checkpoint is not None else None

    def save() -> None:
        state = {
            "settings": asdict(settings),
            "step": step,
            "losses": losses,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "generator": generator.get_state(),
            "batches": batches.state_dict() if hasattr(batches, "state_dict") else None,
        }
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = checkpoint.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, checkpoint)

    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        if state["settings"] == asdict(settings):
            step, losses = state["step"], state["losses"]
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            lr_scheduler.load_state_dict(state["lr_scheduler"])
            if ema is not None:
                ema.load_state_dict(state["ema"])
            generator.set_state(state["generator"])
            if state["batches"] is not None:
                batches.load_state_dict(state["batches"])
            logger.info("%s: resumed from %s at step %d", name, checkpoint, step)
        else:
            logger.warning("%s: %s was written with other settings; starting over", name, checkpoint)
    # each step's loss stays on the device until a log line or a checkpoint needs it: reading it every step would
    # make the host wait for the device at the end of every step
    pending = DeferredLosses(losses)
    first = step
    start = time.perf_counter()
    model.train()
    while step < settings.steps:
        loss = loss_of(batches(generator), generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(params)
        step += 1
        pending.add(loss)
        if step % settings.logging_steps == 0 or step == settings.steps:
            pending.read()
            recent = losses[-settings.logging_steps :]
            elapsed = time.perf_counter() - start
            logger.info(
                "%s step %d/%d loss %.4f lr %.2e (%.2f s/step)",
                name,
                step,
                settings.steps,
                sum(recent) / len(recent),
                lr_scheduler.get_last_lr()[0],
                elapsed / (step - first),
            )
        if checkpoint is not None and (step % settings.checkpointing_steps == 0 or step == settings.steps):
            pending.read()
            save()
    seconds = time.perf_counter() - start
    if ema is not None:
        ema.copy_to(params)
    model.eval()
    return FitResult(step, losses, seconds, step - first)
