"""``brushnet bench``: run, report and speed commands. Heavy imports happen inside each command."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(
    help="BrushBench / EditBench benchmarks: generate, score, report, time.", no_args_is_help=True
)

_WEIGHT_HELP = "Metric weights (skipped with one line when not given): "


def _fail(exc: BaseException) -> None:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _guarded(body: Callable[[], Any]) -> Any:
    try:
        return body()
    except (typer.Exit, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - the CLI turns every error into one line + exit code 2
        _fail(exc)


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


@app.command()
def run(
    methods: str = typer.Option("brushnet", help="Comma-separated method names."),
    dataset: Path = typer.Option(..., "--dataset", help="Dataset folder (or its mapping_file.json)."),
    dataset_kind: str = typer.Option("brushbench", help="brushbench | editbench | folder."),
    mask_kind: str = typer.Option("inside", help="inside | outside (or both: inside,outside)."),
    output: Path = typer.Option(..., "--output", help="Run folder (reused: finished images are skipped)."),
    limit: int | None = typer.Option(None, help="Only the first N images."),
    base: str | None = typer.Option(None, help="SD1.5 base model."),
    base_config: str | None = typer.Option(None, help="Configs for a single-file base."),
    brushnet: str | None = typer.Option(None, help="BrushNet checkpoint."),
    inpaint_model: str | None = typer.Option(None, help="SD inpainting (9-channel) model."),
    controlnet: str | None = typer.Option(None, help="Inpaint ControlNet."),
    allow_pickle: bool = typer.Option(False, help="Allow pickle-based weights."),
    steps: int = typer.Option(50, help="Denoising steps (paper: 50)."),
    guidance: float = typer.Option(7.5, help="Guidance scale (paper: 7.5)."),
    seed: int = typer.Option(1234, help="Seed, the same for every image (paper: 1234)."),
    scheduler: str = typer.Option("unipc-original", help="Scheduler (paper: UniPC ending at sigma_min)."),
    negative_prompt: str = typer.Option("", help="Negative prompt."),
    resolution: int | None = typer.Option(None, help="Working size; default the image size."),
    blend_kernel_size: int = typer.Option(21, help="Blurred-blending kernel, odd (paper: 21 at 512 px)."),
    method_options: str = typer.Option("{}", help='JSON: {"method": {option: value}}.'),
    lpips_linear_weights: str | None = typer.Option(
        None, "--lpips-linear-weights", "--lpips-weights", help=_WEIGHT_HELP + "lpips v0.1 squeeze.pth."
    ),
    lpips_backbone_weights: str | None = typer.Option(None, help=_WEIGHT_HELP + "squeezenet1_1-*.pth."),
    clip_weights: str | None = typer.Option(
        None, "--clip-weights", "--clip-model", help=_WEIGHT_HELP + "CLIP ViT-L/14 folder (CLIP score, AS)."
    ),
    aesthetic_weights: str | None = typer.Option(None, help=_WEIGHT_HELP + "LAION aesthetic linear head."),
    hps_weights: str | None = typer.Option(None, help=_WEIGHT_HELP + "HPS_v2.1_compressed.pt."),
    hps_tokenizer_weights: str | None = typer.Option(
        None, help="CLIP tokenizer folder (default: --clip-weights)."
    ),
    image_reward_weights: str | None = typer.Option(None, help=_WEIGHT_HELP + "ImageReward.pt (v1.0)."),
    image_reward_tokenizer_weights: str | None = typer.Option(
        None, help="bert-base-uncased tokenizer folder."
    ),
    device: str = typer.Option("auto", help="auto (accelerate's device for this process) | cpu | cuda[:N]."),
    dtype: str = typer.Option("fp32", help="fp32 | fp16 | bf16."),
    num_shards: int | None = typer.Option(
        None, help="Manual sharding: number of shards (default: accelerate)."
    ),
    shard_index: int | None = typer.Option(None, help="Manual sharding: this shard's index."),
    report: bool = typer.Option(True, help="Write the reports when done."),
) -> None:
    """Generate and score METHODS on a dataset under the paper's protocol; resumable and shardable."""

    def body() -> None:
        from ..methods import ModelPaths
        from ..metrics import MetricSuite
        from .datasets import load_dataset
        from .report import write_reports
        from .runner import BenchSettings, run_benchmark

        _logging()
        if (num_shards is None) != (shard_index is None):
            raise ValueError("give both --num-shards and --shard-index, or neither")
        state = None
        if num_shards is None:
            from datetime import timedelta

            import torch
            from accelerate import PartialState

            # Without cpu=True accelerate ignores a CPU-only launch's WORLD_SIZE (every process would be 0 of 1).
            # The end-of-run barrier waits for the slowest shard: allow long runs.
            use_cpu = device == "cpu" or not torch.cuda.is_available()
            state = PartialState(cpu=use_cpu, timeout=timedelta(hours=48))
            index, count = state.process_index, state.num_processes
        else:
            index, count = shard_index, num_shards
        run_device = str(state.device) if device == "auto" and state is not None else device
        if run_device == "auto":
            run_device = "cpu"
        models = ModelPaths(base=base, base_config=base_config, brushnet=brushnet, inpaint_model=inpaint_model,
                            controlnet=controlnet, allow_pickle=allow_pickle)  # fmt: skip
        settings = BenchSettings(steps=steps, guidance_scale=guidance, seed=seed, scheduler=scheduler,
                                 negative_prompt=negative_prompt, resolution=resolution,
                                 blend_kernel_size=blend_kernel_size, options=json.loads(method_options))  # fmt: skip
        weights = {
            "lpips_linear": lpips_linear_weights,
            "lpips_backbone": lpips_backbone_weights,
            "clip": clip_weights,
            "aesthetic": aesthetic_weights,
            "hps": hps_weights,
            "hps_tokenizer": hps_tokenizer_weights,
            "image_reward": image_reward_weights,
            "image_reward_tokenizer": image_reward_tokenizer_weights,
        }
        suite = MetricSuite(weights, device=run_device)
        for kind in _split(mask_kind):
            data = load_dataset(dataset, dataset_kind, kind).limit(limit)
            stats = run_benchmark(_split(methods), models, data, output, settings, device=run_device, dtype=dtype,
                                  process_index=index, num_processes=count, metric_suite=suite)  # fmt: skip
            typer.echo(f"{kind}: shard {index}/{count}: {stats}", err=True)
        if state is not None and count > 1:
            state.wait_for_everyone()
        if report and (state is None or state.is_main_process):
            paths = write_reports(output)
            typer.echo(paths["table_md"].read_text())

    _guarded(body)


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A run folder written by `brushnet bench run`."),
    grid_sample: int = typer.Option(8, help="Images in the grid."),
) -> None:
    """Regenerate every report (JSONL, CSV, summary, Markdown table, grids) from the per-image rows."""

    def body() -> None:
        from .report import write_reports

        paths = write_reports(run_dir, grid_sample=grid_sample)
        typer.echo(paths["table_md"].read_text())
        for name, path in paths.items():
            typer.echo(f"{name}: {path}", err=True)

    _guarded(body)


@app.command()
def speed(
    methods: str = typer.Option("all", help="Comma-separated method names, or all (every registered)."),
    resolutions: str = typer.Option("512", help="Comma-separated square sizes."),
    dtype: str = typer.Option("fp32", help="Comma-separated: fp32, fp16, bf16 (fp16/bf16 for GPU)."),
    steps: str = typer.Option("50", help="Comma-separated step counts."),
    repeats: int = typer.Option(3, help="Timed repeats per combination (median reported); warm-up excluded."),
    device: str = typer.Option("cpu", help="cpu | cuda[:N]."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the UNet / branch blocks."),
    cfg_branch: str = typer.Option(
        "once", help="BrushNet under CFG: once (this project), doubled (the original), or once,doubled."
    ),
    threads: int | None = typer.Option(None, help="torch CPU threads (default: torch's)."),
    scheduler: str = typer.Option("unipc-original"),
    guidance: float = typer.Option(7.5),
    random_weights: str | None = typer.Option(None, help="Build random-weight models: tiny | small | sd15."),
    weights_dir: Path | None = typer.Option(
        None, help="Where --random-weights builds (default: a temp dir)."
    ),
    base: str | None = typer.Option(None),
    base_config: str | None = typer.Option(None),
    brushnet: str | None = typer.Option(None),
    inpaint_model: str | None = typer.Option(None),
    controlnet: str | None = typer.Option(None),
    output: Path | None = typer.Option(None, "--output", help="Write the records as JSON here."),
) -> None:
    """Seconds per image, UNet calls and peak memory per method × resolution × dtype × steps."""

    def body() -> None:
        import platform
        import tempfile

        import torch

        from ..methods import ModelPaths, available_methods
        from .speed import format_table, measure_speed, random_weight_models

        _logging()
        if threads is not None:
            torch.set_num_threads(threads)
        names = available_methods() if methods == "all" else _split(methods)
        unknown = [name for name in names if name not in available_methods()]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r}; available: {', '.join(available_methods())}")
        if random_weights is not None:
            folder = weights_dir or Path(tempfile.mkdtemp(prefix="brushnet-speed-"))
            models = random_weight_models(random_weights, folder, names)
        else:
            models = ModelPaths(base=base, base_config=base_config, brushnet=brushnet,
                                inpaint_model=inpaint_model, controlnet=controlnet)  # fmt: skip
        records = measure_speed(
            names,
            models,
            resolutions=[int(r) for r in _split(resolutions)],
            dtypes=_split(dtype),
            steps=[int(s) for s in _split(steps)],
            repeats=repeats,
            device=device,
            compile=compile,
            scheduler=scheduler,
            guidance_scale=guidance,
            cfg_branch=_split(cfg_branch),
        )
        environment = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "cuda_device": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
        }
        argv = sys.argv[sys.argv.index("speed") + 1 :] if "speed" in sys.argv else []
        payload = {"command": " ".join(["brushnet bench speed", *argv]), "environment": environment,
                   "records": records}  # fmt: skip
        if random_weights is not None:
            payload["random_weights"] = random_weights
        if output is not None:
            from ..cli_common import atomic_write_bytes

            atomic_write_bytes(output, json.dumps(payload, indent=2).encode())
        typer.echo(format_table(records))

    _guarded(body)


if __name__ == "__main__":
    app()
