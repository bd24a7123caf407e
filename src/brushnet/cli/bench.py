"""``brushnet bench``: run, report and speed commands. Heavy imports happen inside each command."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import typer

from ..bench.protocol import BENCH_DEFAULTS, BENCH_EXCLUDED_FIELDS
from .common import guarded, split_options
from .flags import model_flags, request_flags, runtime_flags

__all__ = ["app"]

app = typer.Typer(
    help="BrushBench / EditBench benchmarks: generate, score, report, time.", no_args_is_help=True
)

_WEIGHT_HELP = "Metric weights (skipped with one line when not given): "


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


@app.command()
@guarded
@request_flags(
    exclude=BENCH_EXCLUDED_FIELDS,
    defaults=BENCH_DEFAULTS,
    help={
        "scheduler": "Scheduler; default: the paper's UniPC (ending at sigma_min) for every method that takes any "
        "scheduler, each other method's own (RePaint: DDIM).",
        "blend_kernel_size": "Blurred-blending kernel of the blended variant, odd (paper: 21 at 512 px).",
    },
    panel="Protocol",
)
@model_flags()
@runtime_flags(quiet=False)
def run(
    methods: str = typer.Option("brushnet", help="Comma-separated method names."),
    dataset: Path = typer.Option(..., "--dataset", help="Dataset folder (or its mapping_file.json)."),
    dataset_kind: str = typer.Option("brushbench", help="brushbench | editbench | folder."),
    mask_kind: str = typer.Option("inside", help="inside | outside (or both: inside,outside)."),
    output: Path = typer.Option(..., "--output", help="Run folder (reused: finished images are skipped)."),
    limit: int | None = typer.Option(None, help="Only the first N images."),
    option: list[str] = typer.Option(
        None, "--option", help="Method option key=value for every method, or method:key=value (repeatable)."
    ),
    method_options: str = typer.Option(
        "{}", help='JSON: {"method": {option: value}} (merged with --option).'
    ),
    score: list[str] = typer.Option(
        None, "--score", help="Extra per-image scorer (repeatable): shapes, or module:function."
    ),
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
    num_shards: int | None = typer.Option(
        None, help="Manual sharding: number of shards (default: accelerate)."
    ),
    shard_index: int | None = typer.Option(None, help="Manual sharding: this shard's index."),
    report: bool = typer.Option(True, help="Write the reports when done."),
    request: dict = None,
    models: dict = None,
    runtime: Any = None,
) -> None:
    """Generate and score METHODS on a dataset under the paper's protocol; resumable and shardable.

    A bad entry is skipped and listed (failures.jsonl); exit code 1 if any entry failed.

    --device auto (or cuda under `accelerate launch`) takes accelerate's device for this process.
    """
    from ..bench.datasets import load_dataset
    from ..bench.report import write_reports
    from ..bench.runner import BenchSettings, run_benchmark
    from ..errors import InputError
    from ..methods import ModelPaths, get_method_class
    from ..metrics import MetricSuite

    _logging()
    names = _split(methods)
    classes = [get_method_class(name) for name in names]
    if (num_shards is None) != (shard_index is None):
        raise InputError("give both --num-shards and --shard-index, or neither")
    if num_shards is not None and num_shards < 1:
        raise InputError(f"--num-shards must be at least 1, got {num_shards}")
    if shard_index is not None and not 0 <= shard_index < num_shards:
        raise InputError(
            f"--shard-index must be between 0 and {num_shards - 1} (--num-shards {num_shards}), got {shard_index}"
        )
    try:
        per_method = json.loads(method_options)
    except json.JSONDecodeError as exc:
        raise InputError(f"--method-options is not valid JSON ({exc})") from None
    if not isinstance(per_method, dict) or not all(isinstance(value, dict) for value in per_method.values()):
        raise InputError('--method-options must be a JSON object {"method": {option: value}}')
    for name in per_method:  # as for --option method:key=value: an option for a method not run is refused
        if name not in names:
            raise InputError(f"--method-options names method {name!r}, which is not among {', '.join(names)}")
    for name, options in split_options(option, names).items():
        per_method[name] = {**per_method.get(name, {}), **options}
    settings = BenchSettings(**request, options=per_method, scorers=list(score or []))
    datasets = [_load_dataset(load_dataset, dataset, dataset_kind, kind, limit) for kind in _split(mask_kind)]
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
    MetricSuite.check_weights(weights)
    paths = ModelPaths(**models)
    for cls in classes:
        paths.require(cls)
        settings.request_for(cls, "")
    if runtime.device != "auto":
        runtime.check()
    state = None
    if num_shards is None:
        from datetime import timedelta

        import torch
        from accelerate import PartialState

        # Without cpu=True accelerate ignores a CPU-only launch's WORLD_SIZE (every process would be 0 of 1).
        # The end-of-run barrier waits for the slowest shard: allow long runs.
        use_cpu = runtime.device == "cpu" or not torch.cuda.is_available()
        state = PartialState(cpu=use_cpu, timeout=timedelta(hours=48))
        index, count = state.process_index, state.num_processes
    else:
        index, count = shard_index, num_shards
    device = str(state.device) if runtime.device == "auto" and state is not None else runtime.device
    if device == "auto":
        device = "cpu"
    runtime.device = device
    runtime.apply()
    suite = MetricSuite(weights, device=device)
    failed = 0
    for data in datasets:
        kind = data.mask_kind
        stats = run_benchmark(names, paths, data, output, settings, device=device, dtype=runtime.dtype,
                              process_index=index, num_processes=count, metric_suite=suite,
                              load=runtime.load_method)  # fmt: skip
        typer.echo(f"{kind}: shard {index}/{count}: {stats}", err=True)
        failed += stats.failed
        for failure in stats.failures:
            typer.echo(
                f"failed: {failure['method']}/{failure['mask_kind']}/{failure['id']}: {failure['error']}",
                err=True,
            )
    if state is not None and count > 1:
        state.wait_for_everyone()
    if report and (state is None or state.is_main_process):
        written = write_reports(output)
        typer.echo(written["table_md"].read_text())
    if failed:  # as batch and compare: a partial benchmark is not a success (the failures are listed above)
        raise typer.Exit(1)


def _load_dataset(load_dataset, dataset: Path, dataset_kind: str, mask_kind: str, limit: int | None):
    """``load_dataset(...).limit(limit)``; a mapping file that is not UTF-8 text (an image given as --dataset) is
    one line naming the flag and the file."""
    from ..errors import InputError

    try:
        return load_dataset(dataset, dataset_kind, mask_kind).limit(limit)
    except UnicodeDecodeError:
        mapping = dataset / "mapping_file.json" if dataset.is_dir() else dataset
        raise InputError(
            f"--dataset {dataset}: {mapping} is not a {dataset_kind} mapping file (not UTF-8 JSON text); give "
            "the set's folder or its mapping_file.json"
        ) from None


@app.command()
@guarded
def report(
    run_dir: Path = typer.Argument(..., help="A run folder written by `brushnet bench run`."),
    grid_sample: int = typer.Option(8, help="Images in the grid."),
) -> None:
    """Regenerate every report (JSONL, CSV, summary, Markdown table, grids) from the per-image rows."""
    from ..bench.report import write_reports

    paths = write_reports(run_dir, grid_sample=grid_sample)
    typer.echo(paths["table_md"].read_text())
    for name, path in paths.items():
        typer.echo(f"{name}: {path}", err=True)


@app.command()
@guarded
@model_flags()
@runtime_flags(quiet=False, dtype=False)
def speed(
    methods: str = typer.Option("all", help="Comma-separated method names, or all (every registered)."),
    resolutions: str = typer.Option("512", help="Comma-separated square sizes."),
    dtype: str = typer.Option("fp32", help="Comma-separated: fp32, fp16, bf16 (fp16/bf16 for GPU)."),
    steps: str = typer.Option("50", help="Comma-separated step counts."),
    repeats: int = typer.Option(3, help="Timed repeats per combination (median reported); warm-up excluded."),
    cfg_branch: str = typer.Option(
        "once", help="BrushNet under CFG: once (this project), doubled (the original), or once,doubled."
    ),
    scheduler: str = typer.Option(
        "unipc-original", help="Scheduler (methods with their own schedule keep theirs)."
    ),
    guidance: float = typer.Option(
        7.5,
        "--guidance",
        "--guidance-scale",
        help="Classifier-free guidance (only whether it is above 1 matters).",
    ),
    option: list[str] | None = typer.Option(
        None,
        "--option",
        help="key=value for every method, or method:key=value for one (repeatable), e.g. hd-painter:rasg=false.",
    ),
    random_weights: str | None = typer.Option(
        None, help="Build random-weight models: tiny | small | sd15 | tiny-xl | sdxl."
    ),
    weights_dir: Path | None = typer.Option(
        None, help="Where --random-weights builds (default: a temp dir)."
    ),
    output: Path | None = typer.Option(None, "--output", help="Write the records as JSON here."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Let --output replace a file that is not an earlier `bench speed` record."
    ),
    models: dict = None,
    runtime: Any = None,
) -> None:
    """Seconds per image, UNet calls and peak memory per method × resolution × dtype × steps."""
    import shutil
    import tempfile

    from ..bench.speed import check_speed_settings
    from ..errors import InputError
    from ..io import check_output_path

    _logging()
    # every flag and the output path, before any model is built or loaded
    resolution_list = _positive_ints(resolutions, "--resolutions")
    step_list = _positive_ints(steps, "--steps")
    try:
        check_speed_settings(resolution_list, _split(dtype), step_list, repeats, _split(cfg_branch),
                             names={"resolutions": "--resolutions", "dtypes": "--dtype", "steps": "--steps",
                                    "repeats": "--repeats", "cfg_branch": "--cfg-branch"})  # fmt: skip
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if output is not None:
        try:
            check_output_path(output)
        except InputError as exc:
            raise InputError(f"--output: {exc}") from None
        if output.is_file() and not overwrite and not _is_speed_record(output):
            raise InputError(
                f"--output {output} exists and is not a `bench speed` record: it would be replaced; choose "
                "another path, or pass --overwrite"
            )
    if weights_dir is not None and weights_dir.exists() and not weights_dir.is_dir():
        raise InputError(f"--weights-dir {weights_dir} is a file, not a folder")
    runtime.apply()
    temporary = None  # the temp folder --random-weights builds into without --weights-dir; removed at the end
    try:
        if random_weights is not None and weights_dir is None:
            from ..random_models import PRESETS

            if random_weights in PRESETS:
                temporary = Path(tempfile.mkdtemp(prefix="brushnet-speed-"))
        _speed(methods, resolution_list, dtype, step_list, repeats, cfg_branch, scheduler, guidance, option,
               random_weights, weights_dir or temporary, output, models, runtime)  # fmt: skip
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


def _positive_ints(value: str, flag: str) -> list[int]:
    """``"256,512"`` → ``[256, 512]``; anything else is one line naming ``flag``."""
    from ..errors import InputError

    numbers = []
    for part in _split(value):
        try:
            numbers.append(int(part))
        except ValueError:
            raise InputError(f"{flag} takes comma-separated whole numbers, got {part!r}") from None
    if not numbers:
        raise InputError(f"{flag} is empty: give at least one value")
    return numbers


def _speed(methods, resolutions, dtype, steps, repeats, cfg_branch, scheduler, guidance, option, random_weights,
           weights_root, output, models, runtime) -> None:  # fmt: skip
    """The body of :func:`speed`, after its checks (``weights_root``: where --random-weights builds)."""
    import platform

    import torch

    from ..bench.speed import format_table, measure_speed
    from ..errors import InputError
    from ..io import atomic_write_bytes
    from ..methods import ModelPaths, available_methods, check_request, get_method_class

    names = available_methods() if methods == "all" else _split(methods)
    classes = [get_method_class(name) for name in names]
    per_method = split_options(option, names)
    for cls in classes:  # every method's options, before any model is built or loaded
        check_request(cls, {"prompt": "", "steps": steps[0], "guidance_scale": guidance,
                            "options": per_method[cls.name]})  # fmt: skip
    if random_weights is not None:
        from ..random_models import PRESETS, build_model_set, buildable, preset_family

        if random_weights not in PRESETS:
            raise InputError(
                f"unknown --random-weights preset {random_weights!r}; choose one of: {', '.join(PRESETS)}"
            )
        family = preset_family(random_weights)
        unbuildable = [cls.name for cls in classes if not buildable(cls.models) or family not in cls.families]
        if unbuildable and methods != "all":
            raise InputError(
                f"no random-weight {family} models can be built for {', '.join(unbuildable)}; pass its models"
            )
        if unbuildable:
            typer.echo(f"skipped (no random-weight {family} models): {', '.join(unbuildable)}", err=True)
            classes = [cls for cls in classes if cls.name not in unbuildable]
            names = [cls.name for cls in classes]
        folder = weights_root / random_weights
        slots = {slot for cls in classes for slot in cls.models if slot.folder is not None}
        models = {**build_model_set(folder, slots, random_weights, reuse=True), **models}
    paths = ModelPaths(**models)
    for cls in classes:
        paths.require(cls)
    records = measure_speed(
        names,
        paths,
        resolutions=resolutions,
        dtypes=_split(dtype),
        steps=steps,
        repeats=repeats,
        device=runtime.device,
        compile=runtime.compile,
        scheduler=scheduler,
        guidance_scale=guidance,
        cfg_branch=_split(cfg_branch),
        options=per_method,
    )
    environment = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cuda_device": torch.cuda.get_device_name(runtime.device)
        if runtime.device.startswith("cuda")
        else None,
    }
    argv = sys.argv[sys.argv.index("speed") + 1 :] if "speed" in sys.argv else []
    payload = {
        "command": " ".join(["brushnet bench speed", *argv]),
        "environment": environment,
        "records": records,
    }
    if random_weights is not None:
        payload["random_weights"] = random_weights
    if output is not None:
        atomic_write_bytes(output, json.dumps(payload, indent=2).encode())
    typer.echo(format_table(records))


def _is_speed_record(path: Path) -> bool:
    """Whether ``path`` holds what ``bench speed --output`` writes (so a rerun may replace it)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(record, dict)
        and isinstance(record.get("records"), list)
        and str(record.get("command", "")).startswith("brushnet bench speed")
    )
