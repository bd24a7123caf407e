"""Stage ``powerpaint``: a PowerPaint v2-style model on the frozen base — a branch that keeps cross-attention
and reads task words through its own text encoder, and those words' learned vectors — trained by
:func:`brushnet.training.powerpaint.powerpaint_training_loss` through :func:`fit_loop.fit`, as the
``inpaint`` and ``controlnet`` stages. Writes ``powerpaint/`` (``PowerPaint_Brushnet/`` +
``text_encoder_brushnet/``, what ``--powerpaint`` loads).

The shapes world gives each task a measurable meaning, and a ground truth PowerPaint's real-image training
does not have: a scene can be rendered *without* one of its objects. Every sample picks a task
(:data:`TASK_MIX`) and an object of its scene:

- ``text-guided``: a hole around the object (its silhouette dilated 0–6 px, the disk that holds it, or its
  box), the object's phrase as the prompt; the target is the scene.
- ``shape-guided``: the silhouette dilated 0–2 px (the hole's outline is the shape), the object's phrase.
- ``object-removal``: the silhouette dilated 1–6 px (the mini-BrushBench's holes are dilated by 3); the target
  is the scene rendered without the object, so the hole holds background only; the prompt is the
  background's phrase half the time, else empty.
- ``context-aware``: a free-form brush hole over the scene (objects cut by it continue from their visible
  parts); the scene caption or nothing.
- ``outpainting``: everything but the object (dilated) is the hole; the target is the object alone on the
  background (the branch reads ``P_ctxt``, the UNet "empty scene": extend the background).

The branch starts from the run's BrushNet branch where there is one (its resnets, taps and input conv; the
attention weights come from the base UNet), otherwise from the base UNet alone. Settings: the recipe's
``powerpaint_steps`` steps of batch ``min(16, branch_batch)``, AdamW at 3e-4 with 20 warm-up steps then
constant, no EMA (the shipped BrushNet branch's first-stage settings). On a GPU the samples are made ahead of the
step by the recipe's ``loader_workers`` DataLoader processes, on the CPU in the training process (each sample is a
function of its position, so the bytes are the same either way).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from fit_loop import FitSettings, fit, seeded_init, stage_generator
from recipe import Run
from world_data import SIZE

__all__ = ["TASK_MIX", "TaskBatches", "TaskSamples", "task_sample", "train_powerpaint"]

TASK_MIX = {
    "text-guided": 0.3,
    "shape-guided": 0.15,
    "object-removal": 0.3,
    "context-aware": 0.15,
    "outpainting": 0.1,
}
"""Share of each task among the training samples."""

BATCH = 16
LEARNING_RATE = 3e-4
LR_SCHEDULER = "constant_with_warmup"
WARMUP_STEPS = 20
CAPTION_DROPOUT = 0.1
TASK_DROPOUT = 0.05


def _unit(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0


def _disk(obj, silhouette: np.ndarray, margin: int) -> np.ndarray:
    """The disk that holds the object (its circumradius + ``margin``), with the silhouette's edge pixels that
    rasterise just outside the circle."""
    from brushnet.data.shapes import dilate_mask

    size = silhouette.shape[0]
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    return (np.hypot(xs - obj.center[0], ys - obj.center[1]) <= obj.radius + margin) | dilate_mask(
        silhouette, 1
    )


def _box(mask: np.ndarray, margin: int) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    hole = np.zeros_like(mask)
    hole[
        max(ys.min() - margin, 0) : ys.max() + margin + 1, max(xs.min() - margin, 0) : xs.max() + margin + 1
    ] = True
    return hole


def task_sample(scene, rng: np.random.Generator) -> dict:
    """One training sample of a shapes-world scene: ``{"pixel_values" (3, H, W) in [-1, 1] (the target),
    "mask" (1, H, W) 1 = hole, "caption", "task"}`` (see the module docstring)."""
    from brushnet.data.masks import BrushConfig, random_brush_mask
    from brushnet.data.shapes import Scene, dilate_mask, render_scene

    size = scene.size
    image, masks = render_scene(scene)
    tasks = list(TASK_MIX)
    task = tasks[int(rng.choice(len(tasks), p=list(TASK_MIX.values())))]
    index = int(rng.integers(len(scene.objects)))
    obj, silhouette = scene.objects[index], masks[index]
    target, caption = image, ""
    if task == "text-guided":
        kind, margin = int(rng.integers(3)), int(rng.integers(0, 7))
        hole = (dilate_mask(silhouette, margin), _disk(obj, silhouette, margin), _box(silhouette, margin))[
            kind
        ]
        caption = obj.phrase
    elif task == "shape-guided":
        hole, caption = dilate_mask(silhouette, int(rng.integers(0, 3))), obj.phrase
    elif task == "object-removal":
        hole = dilate_mask(silhouette, int(rng.integers(1, 7)))
        others = tuple(o for i, o in enumerate(scene.objects) if i != index)
        target, _ = render_scene(Scene(size, scene.background, others))
        caption = scene.background.phrase if rng.random() < 0.5 else ""
    elif task == "context-aware":
        hole = random_brush_mask(size, size, rng, BrushConfig(min_strokes=1))
        caption = scene.caption if rng.random() < 0.5 else ""
    else:  # outpainting
        hole = ~dilate_mask(silhouette, int(rng.integers(0, 7)))
        target, _ = render_scene(Scene(size, scene.background, (obj,)))
        caption = scene.background.phrase if rng.random() < 0.5 else ""
    return {
        "pixel_values": _unit(target),
        "mask": torch.from_numpy(hole.astype(np.float32))[None],
        "caption": caption,
        "task": task,
    }


class TaskSamples(torch.utils.data.Dataset):
    """Sample ``position`` of the stage: :func:`task_sample` of training scene ``position % num_scenes``, its
    choices drawn from ``numpy.random.default_rng([seed, position])``. A function of the position alone, so any
    process can make any sample."""

    def __init__(self, world_seed: int, num_scenes: int, seed: int):
        self.world_seed, self.num_scenes, self.seed = world_seed, num_scenes, seed

    def __getitem__(self, position: int) -> dict:
        from brushnet.data.shapes import sample_scene, scene_rng

        scene = sample_scene(scene_rng("train", self.world_seed, position % self.num_scenes), size=SIZE)
        return task_sample(scene, np.random.default_rng([self.seed, position]))


class TaskBatches:
    """Batches of :class:`TaskSamples` in position order; resumable by position. With ``workers`` > 0 the
    samples are made by that many DataLoader processes ahead of the training step (the same bytes: each sample
    depends on its position only); 0 makes them in the training process when asked."""

    def __init__(self, world_seed: int, num_scenes: int, batch_size: int, seed: int, workers: int = 0):
        self.samples = TaskSamples(world_seed, num_scenes, seed)
        self.batch_size, self.workers = batch_size, workers
        self.position = 0
        self._batches = None

    def _loader(self):
        import itertools

        from torch.utils.data import BatchSampler, DataLoader

        positions = BatchSampler(itertools.count(self.position), self.batch_size, drop_last=False)
        return iter(
            DataLoader(self.samples, batch_sampler=positions, num_workers=self.workers, collate_fn=_collate)
        )

    def __call__(self, generator: torch.Generator) -> dict:
        if self._batches is None:
            self._batches = self._loader()
        batch = next(self._batches)
        self.position += self.batch_size
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]
        self._batches = None  # the next call starts a loader at the new position


def _collate(samples: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "mask": torch.stack([s["mask"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "task": [s["task"] for s in samples],
    }


def _warm_start(model, run: Run) -> str | None:
    """Copy the run's trained BrushNet branch into the PowerPaint branch where names and shapes match."""
    from brushnet.models.brushnet import BrushNetModel

    for folder in (
        run.work / "brushnet_run" / "brushnet",
        run.work / "brushnet",
    ):
        if (folder / "config.json").is_file():
            trained = BrushNetModel.from_pretrained(folder, torch_dtype=torch.float32).state_dict()
            own = model.brushnet.state_dict()
            copied = {k: v for k, v in trained.items() if k in own and own[k].shape == v.shape}
            model.brushnet.load_state_dict(copied, strict=False)
            return str(folder)
    return None


def train_powerpaint(run: Run) -> dict:
    """Stage ``powerpaint`` (see the module docstring); writes ``powerpaint/``."""
    from inpainting import _frozen_components

    from brushnet.training.powerpaint import PowerPaintModel, powerpaint_training_loss

    cfg = run.cfg
    steps = cfg.powerpaint_steps
    components = _frozen_components(run)
    family = components.family
    with seeded_init(stage_generator(cfg.seed, "powerpaint.init")):
        model = PowerPaintModel.from_base(components.unet, family.text_encoder, family.tokenizer)
    warm_start = _warm_start(model, run)
    model.to(run.device)
    prediction_type = components.scheduler_config.get("prediction_type", "epsilon")

    def loss_of(batch: dict, generator: torch.Generator) -> torch.Tensor:
        return powerpaint_training_loss(
            model,
            components,
            batch,
            generator,
            prediction_type=prediction_type,
            caption_dropout=CAPTION_DROPOUT,
            task_dropout=TASK_DROPOUT,
        )

    settings = FitSettings(
        steps=steps,
        learning_rate=LEARNING_RATE,
        lr_scheduler=LR_SCHEDULER,
        lr_warmup_steps=WARMUP_STEPS,
    )
    batch_size = min(BATCH, cfg.branch_batch)
    # on a GPU the samples (4 ms each) are made ahead of the step; on the CPU, where the step is ~3 s, a worker
    # only adds its copies (docs/demo.md)
    workers = cfg.loader_workers if run.device != "cpu" else 0
    result = fit(
        model,
        loss_of,
        TaskBatches(cfg.seed, cfg.scenes, batch_size, cfg.seed + 2, workers=workers),
        settings,
        generator=stage_generator(cfg.seed, "powerpaint"),
        name="powerpaint",
        checkpoint=run.checkpoint("powerpaint"),
    )
    out = run.work / "powerpaint"
    model.save_pretrained(out)
    run.checkpoint("powerpaint").unlink(missing_ok=True)
    return {
        **result.summary(),
        "batch": batch_size,
        "task_mix": TASK_MIX,
        "warm_start": warm_start,
        "model_dir": str(out),
        "settings": dataclasses.asdict(settings),
    }
