"""``python main.py --mode=export``: the workdir's weights through :func:`export_model`, a
summary per format on stdout, and an error naming every format that could not be produced and
every written float32 file that does not reproduce the JAX model (``parity.failures``)."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from effdet_jax.detection.postprocess import PostprocessConfig
from effdet_jax.export import ExportResult, export_model
from effdet_jax.export.options import parse_options


class ExportIncompleteError(RuntimeError):
    """Some requested formats could not be produced, or a written one does not reproduce the
    model; the message says which and why."""


def summary_lines(result: ExportResult) -> list[str]:
    """One line per format: the written file and its parity (and what it misses of the bars),
    or why it is missing."""
    lines = []
    for fmt, path in result.written.items():
        line = f"{fmt}: {path} parity {result.parity[fmt]}"
        if fmt in result.parity_failures:
            line += f" FAILS PARITY: {result.parity_failures[fmt]}"
        lines.append(line)
    lines += [f"{fmt}: NOT PRODUCED: {why}" for fmt, why in result.unavailable.items()]
    return lines


def incomplete_message(result: ExportResult, output_dir: str) -> str | None:
    """The error of an export with missing formats or files that fail parity; ``None`` when
    every requested format was written and reproduces the model."""
    problems = [f"not produced: {why}" for why in result.unavailable.values()]
    problems += [
        f"{fmt} FAILS PARITY ({why}): {result.written[fmt]} is written but does not reproduce the "
        "model, do not deploy it (the README's export table lists the converter limits)"
        for fmt, why in result.parity_failures.items()]
    if not problems:
        return None
    return "; ".join(problems) + f" (the other formats are in {output_dir})"


# Images of the configured eval data that calibrate an int8 LiteRT file.
CALIBRATION_IMAGES = 32


def calibration_images(config: ml_collections.ConfigDict, image_size: int,
                       count: int = CALIBRATION_IMAGES) -> np.ndarray:
    """The first ``count`` images of the eval data as uint8 ``[N, S, S, 3]`` pixels: the eval
    pipeline's letterboxed images with its normalisation undone (padding examples left out)."""
    from effdet_jax.data.transforms import denormalize_image
    from effdet_jax.train.batches import eval_pipeline

    pipeline = eval_pipeline(config, image_size)
    images = []
    for batch in pipeline:
        real = np.asarray(batch["image_id"]) >= 0
        rgb = denormalize_image(np.asarray(batch["images"])[real], pipeline.normalization)
        images.extend(np.clip(np.round(rgb), 0, 255).astype(np.uint8))
        if len(images) >= count:
            break
    if not images:
        raise ValueError("int8 LiteRT export needs calibration images, and the eval data has none")
    return np.stack(images[:count])


def run_export(config: ml_collections.ConfigDict, workdir: str, output_dir: str) -> ExportResult:
    """Exports the latest checkpoint of ``workdir`` (EMA weights by default) as
    ``config.export`` asks into ``output_dir``; prints one line per format."""
    from effdet_jax.train import trainer

    options = parse_options(config.export)  # before anything is restored or compiled
    postprocess_config = PostprocessConfig(**config.eval.postprocess.to_dict())
    exp, variables = trainer.inference_variables(config, workdir)
    variables = jax.device_get(variables)
    calibration = None
    if options.dtype == "int8":
        calibration = calibration_images(config, exp.image_size)
    result = export_model(exp.model, variables, options,
                          postprocess_config, output_dir,
                          calibration=calibration)
    for line in summary_lines(result):
        print(line)
    message = incomplete_message(result, output_dir)
    if message:
        raise ExportIncompleteError(message)
    return result
