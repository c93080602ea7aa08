"""`hcsseg` command line: import images, process plates, inspect results.

Every command prints one clear line and exits with status 2 on bad input, instead of
a traceback; `--debug` shows the traceback when you need it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from hcsseg.errors import HcssegError
from hcsseg.pipeline.presets import PRESET_HELP

app = typer.Typer(
    help="Segment cells and nuclei in OME-Zarr HCS plates and export per-cell features "
    "and QC as Parquet.\n\nTypical use: `hcsseg import FOLDER plate.zarr`, then "
    "`hcsseg process plate.zarr`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
DEBUG = {"on": False}
# The embedded Prefect server can take longer than Prefect's 20 s default to start on a
# busy laptop; and the library's own loggers should reach the Prefect UI.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "hcsseg")
# no telemetry from a laptop's embedded server (it cannot reach the internet anyway and
# logs an ERROR line on every run when it tries)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _one_line(exc: BaseException) -> str:
    """The message of `exc` as one line; pydantic's multi-line report becomes `option: why`."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        problems = []
        for err in exc.errors():
            where = ".".join(str(part) for part in err["loc"])
            got = f" (got {err['input']!r:.60})" if where else ""
            problems.append(f"{where or 'options'}: {err['msg']}{got}")
        return f"invalid {exc.title} options: " + "; ".join(problems)
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def _fail(exc: BaseException) -> None:
    if DEBUG["on"]:
        raise exc
    typer.secho(f"error: {_one_line(exc)}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


class _TerminalFormatter(logging.Formatter):
    """One line per record; tracebacks only with --debug (a full disk once printed 416
    lines, one traceback per well, for one cause)."""

    def __init__(self, *, tracebacks: bool) -> None:
        super().__init__("%(levelname)s %(message)s")
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        if self.tracebacks:
            return super().format(record)
        message = " ".join(part.strip() for part in record.getMessage().splitlines())
        return f"{record.levelname} {message}"


def _pairs(values: list[str] | None, what: str) -> dict[str, str]:
    out = {}
    for item in values or []:
        if "=" not in item:
            raise HcssegError(f"{what} {item!r} must look like KEY=NAME, e.g. 0=DNA")
        key, name = item.split("=", 1)
        out[key.strip()] = name.strip()
    return out


@app.callback()
def main(
    debug: Annotated[bool, typer.Option(help="show full tracebacks")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log progress")] = False,
) -> None:
    DEBUG["on"] = debug
    # Prefect leaves a root handler it finds in place, so this one prints its records too:
    # INFO (a few lines per task run) only with -v. Loggers stay at INFO, so every line
    # still reaches the Prefect UI through Prefect's API handler.
    terminal = logging.StreamHandler()
    terminal.setLevel(logging.INFO if verbose else logging.WARNING)
    terminal.setFormatter(_TerminalFormatter(tracebacks=debug))
    if not (verbose or debug):
        # a failed task or flow is reported once, by the command's own one-line error
        terminal.addFilter(lambda record: not record.name.startswith("prefect"))
    logging.basicConfig(level=logging.INFO, handlers=[terminal])
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per Prefect API call


@app.command("import")
def import_cmd(
    folder: Annotated[Path, typer.Argument(help="folder of per-field TIFF files")],
    out: Annotated[Path, typer.Argument(help="plate to create, e.g. plate.zarr")],
    pattern: Annotated[
        str,
        typer.Option(
            help="file name pattern: 'imagexpress' (<plate>_<well>f<site>d<channel>.tif), "
            "'operetta', or a regex with named groups well, site, channel"
        ),
    ] = "imagexpress",
    channel: Annotated[
        list[str] | None,
        typer.Option("--channel", "-c", help="channel token=name, e.g. -c 0=DNA -c 2=Actin"),
    ] = None,
    pixel_size: Annotated[float, typer.Option(help="pixel size in micrometres")] = 1.0,
    plate_name: Annotated[str | None, typer.Option(help="plate name (default: from files)")] = None,
    ngff: Annotated[str, typer.Option(help="OME-Zarr version: 0.5 (zarr v3) or 0.4")] = "0.5",
    overwrite: Annotated[
        bool, typer.Option(help="replace OUT if it is a plate (anything else is left alone)")
    ] = False,
) -> None:
    """Turn a folder of microscope TIFFs (one file per well/site/channel) into a plate."""
    from hcsseg.io.tiff_import import ImportOptions, import_tiff_folder

    try:
        options = ImportOptions(
            pattern=pattern,
            channel_names=_pairs(channel, "--channel"),
            pixel_size_um=pixel_size,
            plate_name=plate_name,
            version=ngff,  # type: ignore[arg-type]
        )
        plate = import_tiff_folder(folder, out, options=options, overwrite=overwrite)
    except (HcssegError, ValueError, OSError) as exc:
        _fail(exc)
    n = sum(1 for _ in plate.iter_fields())
    typer.echo(f"wrote {out}: plate {plate.name}, {len(plate.wells())} wells, {n} fields")


@app.command("import-pairs")
def import_pairs_cmd(
    folder: Annotated[Path, typer.Argument(help="folder of <stem>_img.tif / <stem>_lab.tif")],
    out: Annotated[Path, typer.Argument(help="plate to create")],
    image_channel: Annotated[str, typer.Option(help="name of the *_img.tif channel")] = "DNA",
    extra: Annotated[
        list[str] | None,
        typer.Option(help="more channels as suffix=name, e.g. --extra dapi=DAPI"),
    ] = None,
    labels_name: Annotated[
        str, typer.Option(help="ground-truth label name for *_lab.tif")
    ] = "nuclei_gt",
    pixel_size: Annotated[float, typer.Option(help="pixel size in micrometres")] = 1.0,
    limit: Annotated[int | None, typer.Option(help="import only the first N pairs")] = None,
    ngff: Annotated[str, typer.Option(help="OME-Zarr version: 0.5 or 0.4")] = "0.5",
    overwrite: Annotated[
        bool, typer.Option(help="replace OUT if it is a plate (anything else is left alone)")
    ] = False,
) -> None:
    """Import annotated image/label pairs; labels are kept as ground truth for evaluation."""
    from hcsseg.io.tiff_import import PairImportOptions, import_tiff_pairs

    try:
        options = PairImportOptions(
            image_channel=image_channel,
            extra_channels=_pairs(extra, "--extra"),
            labels_name=labels_name,
            pixel_size_um=pixel_size,
            limit=limit,
            version=ngff,  # type: ignore[arg-type]
        )
        plate = import_tiff_pairs(folder, out, options=options, overwrite=overwrite)
    except (HcssegError, ValueError, OSError) as exc:
        _fail(exc)
    n = sum(1 for _ in plate.iter_fields())
    typer.echo(f"wrote {out}: {n} annotated fields in {len(plate.wells())} wells")


@app.command()
def info(plate_url: Annotated[str, typer.Argument(help="plate path")]) -> None:
    """Show wells, fields, channels, pixel size and label images of a plate."""
    from hcsseg.io.plate import open_plate

    try:
        plate = open_plate(plate_url)
        wells = plate.wells()
        if not wells:
            raise HcssegError(f"plate {plate.name} ({plate_url}) lists no wells")
        first = plate.fields(wells[0])[0]
        typer.echo(f"plate {plate.name} (NGFF {plate.version}): {len(wells)} wells")
        typer.echo(f"channels: {', '.join(plate.channel_names(first))}")
        typer.echo(f"pixel size: {plate.pixel_size_um(first):g} µm")
        for well in wells:
            refs = plate.fields(well)
            labels = sorted({n for r in refs for n in plate.label_names(r)})
            typer.echo(f"  {well}: {len(refs)} fields; labels: {', '.join(labels) or '-'}")
    except HcssegError as exc:
        _fail(exc)


def _config_data(path: Path | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """Options from a JSON file with the flags given on the command line on top."""
    data: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise HcssegError(f"config file {path} does not exist or is not a file")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HcssegError(f"config file {path} is not readable JSON: {exc}") from None
        if not isinstance(data, dict):
            raise HcssegError(
                f"config file {path} holds a JSON {type(data).__name__}; expected an object of "
                "ProcessConfig options"
            )
    # flags given on the command line win over the file; flags not given never do
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **{k: v for k, v in value.items() if v is not None}}
        elif isinstance(value, dict):
            if any(v is not None for v in value.values()):
                data[key] = {k: v for k, v in value.items() if v is not None}
        elif value is not None:
            data[key] = value
    return data


def _load_config(path: Path | None, overrides: dict[str, Any]) -> Any:
    from hcsseg.config import ProcessConfig

    return ProcessConfig.model_validate(_config_data(path, overrides))


@app.command()
def process(
    plate_url: Annotated[str, typer.Argument(help="plate path, e.g. plate.zarr")],
    nucleus_channel: Annotated[
        str | None, typer.Option(help="nucleus stain channel (default: DAPI/Hoechst/DNA)")
    ] = None,
    cell_channel: Annotated[
        str | None, typer.Option(help="cytoplasm/membrane channel for cell outlines")
    ] = None,
    well: Annotated[list[str] | None, typer.Option(help="only this well (repeatable)")] = None,
    output: Annotated[
        str | None, typer.Option(help="folder for Parquet tables (default: <plate>_tables)")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="JSON file with ProcessConfig options (README: Configuration)"),
    ] = None,
    nuclei_method: Annotated[
        str | None,
        typer.Option(help="classical (default), distance_unet, fpn2ws or cellpose"),
    ] = None,
    cells_method: Annotated[
        str | None,
        typer.Option(help="classical (default), distance_unet, unsupervised or cellpose"),
    ] = None,
    pixel_size: Annotated[
        float | None,
        typer.Option(
            help="pixel size in µm, overriding the plate's (default: each field's scale is "
            "estimated from its nuclei for the classical methods)"
        ),
    ] = None,
    virtual_source: Annotated[
        list[str] | None,
        typer.Option(help="learn the nucleus channel from these channels first (virtual stain)"),
    ] = None,
    workers: Annotated[int, typer.Option(help="wells processed in parallel")] = 2,
    force: Annotated[bool, typer.Option(help="redo wells an earlier run already finished")] = False,
) -> None:
    """Segment nuclei and cells, write labels into the plate and tables as Parquet.

    Runs as a Prefect flow: with no PREFECT_API_URL set it uses Prefect's embedded
    server; with one set, the run shows up in that server's UI.
    """
    try:
        cfg = _load_config(
            config,
            {
                "nucleus_channel": nucleus_channel,
                "cell_channel": cell_channel,
                "wells": well or None,
                "output": output,
                "nuclei_method": nuclei_method,
                "cells_method": cells_method,
                "pixel_size_um": pixel_size,
            },
        )
        if virtual_source:
            cfg.virtual_stain = _virtual_config(
                virtual_source, cfg.nucleus_channel or "DAPI", None, None, "resnet18", None
            )
        if cfg.virtual_stain is None:
            from hcsseg.pipeline.wells import plan_plate

            plan_plate(plate_url, cfg)  # bad input fails here, before Prefect starts
        else:  # channels wait for the virtual stain; the plate path is checked now
            from hcsseg.io.plate import open_plate

            open_plate(plate_url)
        from prefect.task_runners import ThreadPoolTaskRunner

        from flows.process_plate import process_plate
        from hcsseg.pipeline.orchestration import prefect_api

        flow = process_plate.with_options(task_runner=ThreadPoolTaskRunner(max_workers=workers))
        with prefect_api():
            result = flow(plate_url, cfg, force=force)
    except (HcssegError, ValueError) as exc:
        _fail(exc)
    typer.echo(
        f"processed plate {result['plate']}: {result['wells']} wells processed, "
        f"{result['skipped']} already done, {result['cells']} cells in total; "
        f"tables in {result['output']}"
    )


@app.command("run")
def run_cmd(
    plate_url: Annotated[str, typer.Argument(help="plate path, e.g. plate.zarr")],
    preset: Annotated[str, typer.Option(help=PRESET_HELP)] = "classical",
    nucleus_channel: Annotated[
        str | None, typer.Option(help="nucleus stain channel (default: DAPI/Hoechst/DNA)")
    ] = None,
    cell_channel: Annotated[
        str | None, typer.Option(help="cytoplasm/membrane channel for cell outlines")
    ] = None,
    virtual_source: Annotated[
        list[str] | None,
        typer.Option(
            help="channels the virtual nucleus stain is learnt from where the stain is missing "
            "(default: bright-field/phase/DIC channels by name, else the cell channel)"
        ),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="training steps per model (default: each recipe's)")
    ] = None,
    virtual_steps: Annotated[
        int | None, typer.Option(help="virtual-staining training steps (default: its recipe)")
    ] = None,
    transfer: Annotated[
        bool,
        typer.Option(
            help="fine-tune from a compatible model of an earlier plate when the store has one"
        ),
    ] = True,
    train_deployment: Annotated[
        str | None,
        typer.Option(help="train on this GPU-pool deployment, e.g. train-plate/gpu"),
    ] = None,
    well: Annotated[list[str] | None, typer.Option(help="only this well (repeatable)")] = None,
    output: Annotated[
        str | None, typer.Option(help="folder for Parquet tables (default: <plate>_tables)")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="JSON file with ProcessConfig options (README: Configuration)"),
    ] = None,
    workers: Annotated[int, typer.Option(help="wells processed in parallel")] = 2,
    force: Annotated[bool, typer.Option(help="redo every stage and well")] = False,
) -> None:
    """The whole chain for one plate: virtual stain, per-plate training, quality gate,
    segmentation, features, QC and a report, as one Prefect run (`plate-pipeline`).

    A re-run after a crash resumes at the first unfinished stage (and well).
    """
    try:
        from hcsseg.config import ProcessConfig
        from hcsseg.pipeline.plan import plan_pipeline
        from hcsseg.pipeline.presets import preset_config

        data = _config_data(
            config,
            {
                "nucleus_channel": nucleus_channel,
                "cell_channel": cell_channel,
                "wells": well or None,
                "output": output,
                "train": {
                    "steps": steps,
                    "virtual_steps": virtual_steps,
                    "virtual_sources": virtual_source or None,
                    "transfer": None if transfer else False,
                    "deployment": train_deployment,
                },
            },
        )
        plan = plan_pipeline(plate_url, preset_config(preset, data))  # checks, before Prefect
        for note in plan.notes:
            typer.echo(note)
        overrides = ProcessConfig.model_validate(data)
        from prefect.task_runners import ThreadPoolTaskRunner

        from flows.plate_pipeline import plate_pipeline
        from hcsseg.pipeline.orchestration import prefect_api

        flow = plate_pipeline.with_options(task_runner=ThreadPoolTaskRunner(max_workers=workers))
        # the segmentation subflow's wells: N threads unless the environment names a runner
        os.environ.setdefault(
            "HCSSEG_TASK_RUNNER", json.dumps({"kind": "threads", "max_workers": workers})
        )
        with prefect_api():
            result = flow(plate_url, preset, overrides, force=force)  # type: ignore[arg-type]
    except (HcssegError, ValueError) as exc:
        _fail(exc)
    for compartment, chosen in result["models"].items():
        typer.echo(f"{compartment}: {chosen['model_id'] or chosen['method']} ({chosen['reason']})")
    typer.echo(
        f"plate {result['plate']} ({preset}): {result['wells']} wells processed, "
        f"{result['skipped']} already done, {result['cells']} cells in total; "
        f"tables in {result['output']}"
    )


def _virtual_config(
    sources: list[str],
    target: str,
    model_id: str | None,
    steps: int | None,
    encoder: str,
    store: str | None,
    target_mode: str = "intensity",
) -> Any:
    from hcsseg.virtual_stain.options import VirtualStainOptions
    from hcsseg.virtual_stain.plate import VirtualStainConfig

    model = VirtualStainOptions(
        source_channels=sources,
        target_channel=target,
        encoder_name=encoder,
        target_mode=target_mode,  # type: ignore[arg-type]
    )
    if steps is not None:
        model.training.n_steps = steps
    return VirtualStainConfig(model=model, model_id=model_id, model_store=store)


@app.command("virtual-stain")
def virtual_stain_cmd(
    plate_url: Annotated[str, typer.Argument(help="plate path")],
    source: Annotated[
        list[str], typer.Option(help="input channel(s): bright field, phase, DIC or membrane")
    ],
    target: Annotated[str, typer.Option(help="nucleus stain to learn and predict")] = "DAPI",
    model_id: Annotated[
        str | None, typer.Option(help="use this stored model instead of training")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="training steps (default 1500, stops early)")
    ] = None,
    encoder: Annotated[str, typer.Option(help="U-Net encoder (resnet18, densenet121, ...)")] = (
        "resnet18"
    ),
    model_store: Annotated[
        str | None, typer.Option(help="model folder (default: <plate>_models)")
    ] = None,
    target_mode: Annotated[
        str,
        typer.Option(
            help="intensity: regress the stain (L1); mask: learn where it is above Otsu's "
            "threshold (cross-entropy), for markers"
        ),
    ] = "intensity",
) -> None:
    """Learn the nucleus stain from other channels and write <target>_virtual into every field.

    Trains on the fields that have the real stain (validation split by field), stores the
    model with a model card, predicts every field, writes markers and QC (PCC, marker
    FN/FP within 15 µm on fields that have the real stain).
    """
    try:
        cfg = _virtual_config(source, target, model_id, steps, encoder, model_store, target_mode)
        from hcsseg.io.plate import open_plate

        open_plate(plate_url)  # a wrong path fails in a second, not after Prefect starts
        from flows.virtual_stain import virtual_stain_plate
        from hcsseg.pipeline.orchestration import prefect_api

        with prefect_api():
            result = virtual_stain_plate(plate_url, cfg)
    except (HcssegError, ValueError) as exc:
        _fail(exc)
    typer.echo(
        f"model {result['model_id']}; wrote {cfg.virtual_channel} in {result['wells']} wells"
    )
    for row in result["qc"]:
        typer.echo(
            f"  {row['fields']:>10} fields (n={row['n']}): PCC {row['pcc']:.3f}, "
            f"marker FN {row['marker_fn_rate']:.3f}, FP {row['marker_fp_rate']:.3f}"
        )


@app.command()
def train(
    plate_url: Annotated[str, typer.Argument(help="plate path")],
    channel: Annotated[list[str], typer.Option(help="channel(s) the model sees")],
    compartment: Annotated[str, typer.Option(help="nuclei or cells")] = "nuclei",
    method: Annotated[
        str, typer.Option(help="distance_unet, fpn2ws, unsupervised (cells) or cellpose")
    ] = "distance_unet",
    truth: Annotated[
        str | None,
        typer.Option(
            help="ground-truth labels in the plate, e.g. cells_gt (default: pseudo-labels)"
        ),
    ] = None,
    nucleus_channel: Annotated[
        str | None, typer.Option(help="nucleus stain for pseudo-labels and markers")
    ] = None,
    init: Annotated[str, typer.Option(help="random, imagenet or virtual_stain")] = "random",
    pseudo_labels: Annotated[
        str,
        typer.Option(
            help="without --truth, cells are taught by classical cells grown from the nuclei "
            "(propagation) or found in the cell stain alone (stain)"
        ),
    ] = "propagation",
    steps: Annotated[int | None, typer.Option(help="training steps")] = None,
    model_store: Annotated[str | None, typer.Option(help="model folder")] = None,
    parent_model: Annotated[
        str | None, typer.Option(help="fine-tune this stored model (same method and channels)")
    ] = None,
    transfer: Annotated[
        bool,
        typer.Option(
            help="fine-tune the latest compatible model of another plate in the store, with a "
            "quarter of the steps, when there is one"
        ),
    ] = True,
) -> None:
    """Train a segmentation model on this plate's ground truth, pseudo-labels or markers."""
    try:
        from hcsseg.pipeline.training import TrainConfig, budget_options

        options = budget_options(method, steps)  # the budget changes; the recipe stays
        cfg = TrainConfig(
            compartment=compartment,  # type: ignore[arg-type]
            method=method,  # type: ignore[arg-type]
            input_channels=channel,
            truth=truth,
            nucleus_channel=nucleus_channel,
            init=init,  # type: ignore[arg-type]
            cell_pseudo_labels=pseudo_labels,  # type: ignore[arg-type]
            options=options,
            parent_model=parent_model,
            transfer=transfer,
        )
        from hcsseg.io.plate import open_plate

        open_plate(plate_url)  # a wrong path fails in a second, not after Prefect starts
        from flows.train_plate import train_plate
        from hcsseg.pipeline.orchestration import prefect_api

        with prefect_api():
            result = train_plate(plate_url, cfg, model_store)
    except (HcssegError, ValueError) as exc:
        _fail(exc)
    typer.echo(f"stored model {result['model_id']} in {result['model_store']}")


@app.command()
def models(
    store: Annotated[Path, typer.Argument(help="model store folder, e.g. plate_models")],
) -> None:
    """List stored models: kind, plate, channels, steps and the model each was fine-tuned
    from, every fine-tuned model indented under its parent."""
    from hcsseg.model_store import parent_id, scan_store

    if not store.is_dir():
        _fail(HcssegError(f"model store {store} does not exist or is not a folder"))
    cards, damaged = scan_store(store)
    # a damaged card is a model missing from the listing: say so, one line each
    for path, why in damaged:
        typer.secho(f"damaged model card {path}: {why}", fg=typer.colors.YELLOW, err=True)
    if not cards:
        typer.echo(f"no models in {store}")
        return
    known = {c["model_id"] for c in cards}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for card in cards:
        parent = parent_id(card)
        children.setdefault(parent if parent in known else None, []).append(card)

    def line(card: dict[str, Any]) -> str:
        channels = ",".join(card.get("input_channels") or card.get("source_channels") or [])
        if card.get("target_channel"):
            channels += f" -> {card['target_channel']}"
        history = card.get("history") or {}
        parent = parent_id(card)
        origin = "from scratch"
        if parent:
            origin = f"parent: {parent}" + ("" if parent in known else " (not in store)")
        val = history.get("best_val_loss")
        return (
            f"{card['model_id']}  {card.get('kind')}  plate {card.get('plate')}  "
            f"channels {channels}  steps {history.get('steps', '?')}  {origin}"
            + (f"  val loss {val:.4g}" if isinstance(val, int | float) else "")
        )

    shown: set[str] = set()

    def show(card: dict[str, Any], depth: int) -> None:
        shown.add(card["model_id"])
        typer.echo("  " * depth + line(card))
        for child in children.get(card["model_id"], []):
            if child["model_id"] not in shown:
                show(child, depth + 1)

    for card in children.get(None, []):
        show(card, 0)
    for card in cards:  # cards that name each other as parents (edited by hand): unindented
        if card["model_id"] not in shown:
            show(card, 0)


@app.command()
def evaluate(
    plate_url: Annotated[str, typer.Argument(help="plate path")],
    pred: Annotated[str, typer.Option(help="label image to score")] = "nuclei",
    truth: Annotated[str, typer.Option(help="ground-truth label image")] = "nuclei_gt",
    output: Annotated[
        Path | None, typer.Option(help="folder for the metrics (default: <plate>_tables/eval)")
    ] = None,
) -> None:
    """Score labels against ground truth: AP = TP/(TP+FP+FN) at IoU 0.5..0.95, F1, PQ."""
    from hcsseg.config import ProcessConfig
    from hcsseg.evaluate.plate_eval import evaluate_plate, write_evaluation

    try:
        table, summary = evaluate_plate(plate_url, pred=pred, truth=truth)
    except HcssegError as exc:
        _fail(exc)
    out = output or ProcessConfig().output_root(plate_url) / "eval"
    parquet, js = write_evaluation(table, summary, out)
    typer.echo(
        f"{summary['n_images']} fields, {summary['n_true']} true / "
        f"{summary['n_pred']} predicted objects"
    )
    typer.echo(f"{'IoU':>5} {'AP (mean of fields)':>20} {'AP (pooled)':>12}")
    for t in ("50", "75", "90"):
        typer.echo(
            f"{'0.' + t:>5} {summary[f'ap_{t}_image_mean']:>20.3f} "
            f"{summary[f'ap_{t}_pooled']:>12.3f}"
        )
    typer.echo(
        f"mean AP 0.50:0.95: {summary['ap_mean_image_mean']:.3f} (fields), "
        f"{summary['ap_mean_pooled']:.3f} (pooled); F1@0.5 "
        f"{summary['f1_50_pooled']:.3f}; splits {summary['splits_total']}, "
        f"merges {summary['merges_total']}"
    )
    typer.echo(f"wrote {parquet} and {js}")


@app.command()
def demo(
    out: Annotated[Path, typer.Argument(help="folder for the demo plate and its tables")] = Path(
        "demo"
    ),
    shared_data: Annotated[
        Path | None,
        typer.Option(help="../shared/data folder; its CellProfiler example is used if present"),
    ] = None,
) -> None:
    """Build a small demo plate and process it end to end."""
    from hcsseg.demo import demo_plate

    out.mkdir(parents=True, exist_ok=True)
    plate_path = out / "demo.zarr"
    try:
        plate = demo_plate(plate_path, shared_data=shared_data)
    except HcssegError as exc:
        _fail(exc)
    typer.echo(f"demo plate {plate.name} at {plate_path}")
    process(
        str(plate_path),
        nucleus_channel=None,
        cell_channel=None,
        well=None,
        output=None,
        config=None,
        nuclei_method=None,
        cells_method=None,
        pixel_size=None,
        virtual_source=None,
        workers=2,
        force=False,
    )


def run() -> None:
    """Console entry point: what no command caught (a full disk, a read-only mount, a bug)
    is still one line and exit 2, never a traceback per well; `--debug` shows it whole."""
    try:
        app()
    except (KeyboardInterrupt, SystemExit):
        raise
    except OSError as exc:
        if DEBUG["on"]:
            raise
        where = f" {exc.filename}" if exc.filename else ""
        typer.secho(
            f"error: cannot use{where}: {exc.strerror or exc}; what was written before "
            "is intact, re-run once the cause is fixed",
            fg=typer.colors.RED,
            err=True,
        )
        sys.exit(2)
    except Exception as exc:
        if DEBUG["on"]:
            raise
        typer.secho(
            f"error: {type(exc).__name__}: {_one_line(exc)} (re-run with --debug for details)",
            fg=typer.colors.RED,
            err=True,
        )
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    run()
