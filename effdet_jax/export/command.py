"""``python main.py --mode=export``: the workdir's weights through :func:`export_model`, a
summary per format on stdout, and an error naming every format that could not be produced."""

from __future__ import annotations

import jax
import ml_collections

from effdet_jax.detection.postprocess import PostprocessConfig
from effdet_jax.export import ExportResult, export_model
from effdet_jax.export.options import parse_options


class ExportIncompleteError(RuntimeError):
    """Some requested formats could not be produced; the message says which and why."""


def summary_lines(result: ExportResult) -> list[str]:
    """One line per format: the written file and its parity, or why it is missing."""
    lines = [f"{fmt}: {path} parity {result.parity[fmt]}" for fmt, path in result.written.items()]
    lines += [f"{fmt}: NOT PRODUCED: {why}" for fmt, why in result.unavailable.items()]
    return lines


def run_export(config: ml_collections.ConfigDict, workdir: str, output_dir: str) -> ExportResult:
    """Exports the latest checkpoint of ``workdir`` (EMA weights by default) as
    ``config.export`` asks into ``output_dir``; prints one line per format."""
    from effdet_jax.train import trainer

    options = parse_options(config.export)  # before anything is restored or compiled
    exp, variables = trainer.inference_variables(config, workdir)
    variables = jax.device_get(variables)
    result = export_model(exp.model, variables, options,
                          PostprocessConfig(**config.eval.postprocess.to_dict()), output_dir)
    for line in summary_lines(result):
        print(line)
    if result.unavailable:
        raise ExportIncompleteError(
            "not produced: " + "; ".join(result.unavailable.values())
            + f" (the other formats are in {output_dir})"
        )
    return result
