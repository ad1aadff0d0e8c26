"""The training / evaluation loop: ``train_and_evaluate(config, workdir)`` and friends.

Everything is built by ``experiment.build_experiment``; this module only orders the work:
multi-process start-up, restore or initialise, feed batches, log one step late (the device never
waits for the host), evaluate, checkpoint, and stop cleanly on SIGTERM or a non-finite loss.

Size: the three entry points (train, evaluate, predict), the evaluation pass and the
multi-process start-up share ``setup``, the checkpoint manager and the step bookkeeping, so they stay
in one module of a little over 400 lines rather than being split away from their only callers.

Multi-process runs: ``jax.distributed.initialize`` runs only when the environment asks for it. A
laptop run has none of the variables and stays single-process. A cluster job sets either
``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID`` (e.g. two processes on one
machine), or is a SLURM / Open MPI / Cloud TPU job that jax detects by itself.

Evaluation (``evaluate_state``): every process runs the jitted ``detect`` on its shard of each
global batch; the detections and the batch's ground-truth fields are gathered to every process,
which all compute the same COCO metrics (COCO AP does not decompose over shards). Only process 0's
writer actually writes.
"""

import itertools
import logging as pylogging
import os
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from jax.experimental import multihost_utils

from effdet_jax import evaluation, visualize
from effdet_jax.data import counts as data_counts
from effdet_jax.data import report as data_report
from effdet_jax.data.class_names import label_names
from effdet_jax.data.sources import check_available
from effdet_jax.data.transforms import Normalization, denormalize_image
from effdet_jax.evaluation import report as eval_report
from effdet_jax.train import (
    batches,
    checkpointing,
    compile_cache,
    compile_options,
    console,
    initialization,
    optimizer,
    run_config,
)
from effdet_jax.train.batches import gather_to_all, host_batch_to_global
from effdet_jax.train.config_validation import ConfigError, validate_config
from effdet_jax.train.experiment import Experiment, build_experiment
from effdet_jax.train.train_step import TRAIN_KEYS

# Loss parts a non-finite error names (keys of the step metrics), in the order they are checked.
LOSS_PARTS = ("cls_loss", "box_loss", "box_iou_loss", "reg_l2_loss")
_PART_NAMES = {"cls_loss": "cls", "box_loss": "box", "box_iou_loss": "iou", "reg_l2_loss": "l2"}
# Fields of an eval batch the evaluator needs, besides the detections.
_GT_KEYS = ("image_id", "image_scale", "image_hw", "boxes", "classes", "crowd_classes")
_CLUSTER_HINTS = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


class NonFiniteLossError(FloatingPointError):
    """The loss of ``step`` (1-based: the step that would have produced state ``step``) was not
    finite; ``parts`` names the offending parts (``cls``, ``box``, ``iou``, ``l2``, or ``grad``)."""

    def __init__(self, step: int, parts: list[str], values: dict[str, float]):
        self.step, self.parts = step, parts
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        super().__init__(
            f"non-finite loss at step {step} in part(s) {', '.join(parts)} ({shown}); the update "
            "was not applied and no checkpoint was written after it"
        )


def nonfinite_parts(metrics: dict[str, Any]) -> list[str]:
    """Names of the non-finite loss parts in fetched metrics (``grad`` if only the gradient)."""
    parts = [_PART_NAMES[k] for k in LOSS_PARTS if k in metrics and not np.isfinite(metrics[k])]
    if not parts and not np.isfinite(metrics.get("grad_norm", 0.0)):
        parts = ["grad"]
    return parts or ["loss"]


class _StopRequest:
    """SIGTERM (preemption) as a decision the loop takes between steps: save, then exit.

    One process: a Python SIGTERM handler sets a flag. Several processes: every process must stop
    at the same step (the save is collective), even when the signal reaches only one of them, so
    the decision comes from JAX's preemption service, which ``jax.distributed.initialize`` starts
    and which catches SIGTERM itself; ``reached_preemption_sync_point`` then turns true on every
    process at one agreed step. It must be asked at every step, which the loop does.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        self.collective = jax.process_count() > 1 and jax.distributed.is_initialized()
        if not self.collective and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM: saving a checkpoint after the current step and exiting")
        self.requested = True

    def at_step(self, step: int) -> bool:
        """Whether to save and stop after ``step``; call once per step, on every process."""
        if self.collective and not self.requested:
            if multihost_utils.reached_preemption_sync_point(step):
                logging.warning("preemption notice: every process saves and stops after step %d",
                                step)
                self.requested = True
        return self.requested

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _checkpoint_manager(config, workdir):
    return checkpointing.make_manager(
        os.path.join(workdir, "checkpoints"),
        checkpointing.CheckpointOptions(
            every_steps=config.checkpoint.every_steps,
            keep=config.checkpoint.keep,
            keep_best=config.checkpoint.keep_best,
            async_save=config.checkpoint.async_save,
        ),
    )


def restore_or_init(exp: Experiment, manager) -> Any:
    """The latest checkpoint's state if there is one, else the state ``config.init`` gives
    (``initialization.initial_state``: fresh, with a checkpoint's weights loaded over it)."""
    target = checkpointing.abstract_with_shardings(exp.abstract_state, exp.state_shardings)
    restored = checkpointing.restore_latest(manager, target)
    if restored is None:
        return initialization.initial_state(exp)
    state, step = restored
    console.say("resumed from the checkpoint of step %d", step)
    if exp.config.init.checkpoint or exp.config.init.backbone:
        logging.info("config.init is not used: the run resumes from its own checkpoint")
    return state


def inference_state(
    config: ml_collections.ConfigDict, workdir: str, exp: Experiment | None = None
) -> tuple[Experiment, Any]:
    """The state evaluation, prediction and export use: ``workdir``'s latest checkpoint if it has
    one, else ``config.init.checkpoint`` (no training needed), else a ``FileNotFoundError`` that
    says both ways. Builds the experiment unless ``exp`` is given; returns ``(exp, state)``."""
    exp = build_experiment(config) if exp is None else exp
    manager = _checkpoint_manager(config, workdir)
    try:
        if manager.latest_step() is not None:
            return exp, restore_or_init(exp, manager)
        if config.init.checkpoint:
            return exp, initialization.initial_state(exp)
    finally:
        manager.close()
    raise initialization.NoCheckpointError(
        f"no checkpoint in {workdir}/checkpoints and config.init.checkpoint is not set: train into "
        "this workdir first, or pass --config.init.checkpoint=PATH (an automl or effdet "
        "checkpoint, or another run's workdir)"
    )


def maybe_initialize_distributed() -> bool:
    """Initialises jax.distributed when the environment says so; returns whether it did."""
    if jax.distributed.is_initialized():
        return False
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
        return True
    if any(os.environ.get(k) for k in _CLUSTER_HINTS) and int(
        os.environ.get("SLURM_NTASKS", os.environ.get("OMPI_COMM_WORLD_SIZE", "2"))
    ) > 1:
        jax.distributed.initialize()
        return True
    return False


def setup(config: ml_collections.ConfigDict, splits: tuple[str, ...] = (),
          workdir: str | None = None) -> Experiment:
    """Distributed start-up (if asked for), config validation, the presence of the data of
    ``splits`` (``"train"``, ``"eval"``), the data report (``data.report``; written to
    ``workdir`` by process 0 when ``workdir`` is given), then the experiment: a missing dataset
    or bad data under ``on_bad_data="error"`` fails in seconds, before the model is built or
    anything is compiled."""
    maybe_initialize_distributed()
    console.set_process(jax.process_index())
    validate_config(config, num_devices=jax.device_count())
    check_available(config.data, splits)
    if workdir is not None:
        data_report.report_data(config.data, splits,
                                workdir if jax.process_index() == 0 else None)
    directory = compile_cache.enable(config.compilation_cache)
    logging.info("persistent compilation cache: %s", directory or "off")
    return build_experiment(config)


def _write_params_overview(state, writer_is_primary: bool) -> None:
    if not writer_is_primary:
        return
    include_stats = jax.process_count() == 1
    logging.info(
        "parameters:\n%s",
        parameter_overview.get_parameter_overview(state.params, include_stats=include_stats),
    )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, evaluate_during_training: bool = True
) -> dict[str, float]:
    """Trains for ``optimizer.total_steps(config.train)`` steps, evaluating (every
    ``eval.every_steps`` and at the end, unless ``evaluate_during_training`` is off) and
    checkpointing periodically; resumes from ``workdir/checkpoints`` if present.

    Returns the last eval metrics (empty without evaluation).
    """
    maybe_initialize_distributed()
    validate_config(config, num_devices=jax.device_count())  # only a valid config is saved
    run_config.check_and_save(config, workdir)  # before anything is built
    exp = setup(config, ("train", "eval") if evaluate_during_training else ("train",), workdir)
    _log_trainable(exp)
    primary = jax.process_index() == 0
    writer = metric_writers.create_default_writer(workdir, just_logging=not primary)
    manager = _checkpoint_manager(config, workdir)
    state = restore_or_init(exp, manager)
    start = int(jax.device_get(state.step))
    total = optimizer.total_steps(config.train)
    if start == 0:
        _write_params_overview(state, primary)
        writer.write_hparams(_flat_hparams(config))
    if primary:
        console.log_config(config)
        console.say(console.start_line(config, state.params, start, total,
                                       os.path.join(workdir, run_config.CONFIG_FILE)))

    train_iter = batches.train_batches(config, exp.image_size, start_step=start)
    hooks = [periodic_actions.ReportProgress(num_train_steps=total, writer=writer)]
    progress = console.Progress(total)
    stop = _StopRequest()
    eval_metrics: dict[str, float] = {}
    # (step, device metrics, data counts up to that step) not fetched yet
    pending: tuple[int, dict, dict] | None = None
    # Bad/altered-data counters of the training batches read by this process in this run.
    counts_total = {k: 0 for k in data_counts.COUNT_KEYS}

    def drain() -> None:
        """Fetch the pending metrics; log them, and stop on a non-finite loss."""
        nonlocal pending
        if pending is None:
            return
        step, device_metrics, step_counts = pending
        pending = None
        metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        if metrics["finite"] < 1.0:
            parts = nonfinite_parts(metrics)
            values = {k: metrics[k] for k in LOSS_PARTS + ("grad_norm",) if k in metrics}
            if config.train.nonfinite_policy == "error":
                manager.wait_until_finished()
                raise NonFiniteLossError(step, parts, values)
            logging.warning("step %d: non-finite %s, update skipped", step, parts)
        if step % config.log_every_steps == 0 or step == total:
            scalars = {f"train/{k}": v for k, v in metrics.items()}
            scalars.update({f"data/{k}": v for k, v in step_counts.items()})
            writer.write_scalars(step, scalars)
            console.say(progress.line(step, metrics))
        progress.start_clock(step)  # the first step fetched: compilation is over

    try:
        with jax.set_mesh(exp.mesh):
            for step in range(start + 1, total + 1):
                host_batch = next(train_iter)
                data_counts.accumulate(counts_total, host_batch.get("counts", {}))
                batch = host_batch_to_global(host_batch, exp.batch_sharding, TRAIN_KEYS)
                if step == start + 1:
                    cache_before, t0 = compile_cache.CacheEvents.snapshot(), time.perf_counter()
                state, device_metrics = exp.train_step(state, batch)
                if step == start + 1:
                    preset = compile_options.train_step_compiler_options(
                        config.xla_cpu_opt_preset, exp.mesh.devices.flat)
                    logging.info("train step ready after %.1f s: %s%s", time.perf_counter() - t0,
                                 compile_cache.describe(cache_before, jax.config.jax_compilation_cache_dir
                                                        if jax.config.jax_enable_compilation_cache
                                                        else None),
                                 f" (XLA:CPU preset {config.xla_cpu_opt_preset})" if preset else "")
                drain()  # the previous step's metrics, fetched while this one runs
                pending = (step, device_metrics, dict(counts_total))
                for hook in hooks:
                    hook(step)
                do_eval = evaluate_during_training and (
                    step % config.eval.every_steps == 0 or step == total
                )
                do_save = do_eval or step % config.checkpoint.every_steps == 0 or step == total
                stopping = stop.at_step(step)
                if do_save or stopping:
                    drain()  # never checkpoint a state whose step was not checked
                if do_eval:
                    with hooks[0].timed("eval"), progress.paused():
                        eval_metrics = evaluate_state(exp, state, writer, step,
                                                      os.path.join(workdir, "eval"))
                if do_save or stopping:
                    checkpointing.save(
                        manager,
                        state,
                        step,
                        metrics=_best_metric(eval_metrics) if do_eval else None,
                        force=do_eval or stopping or step == total,
                    )
                if stopping:
                    logging.warning("stopped by SIGTERM after step %d", step)
                    break
            drain()
    finally:
        manager.wait_until_finished()
        stop.restore()
        writer.flush()
    manager.close()
    return eval_metrics


def _log_trainable(exp: Experiment) -> None:
    """Logs how many parameters train; a ``train.freeze`` that matches no parameter, or all of
    them, is an error (before anything is compiled)."""
    freeze = exp.config.train.freeze
    trained, total = optimizer.count_trainable(exp.abstract_state.params, freeze)
    if freeze and trained in (0, total):
        raise ConfigError(
            f"config.train.freeze={freeze!r} matches {'every' if trained == 0 else 'no'} parameter "
            "(paths look like 'backbone/block_3/expand_conv/kernel', 'class_net/predict/bias')")
    console.say("training %s of %s parameters%s", f"{trained:,}", f"{total:,}",
                 f" ({total - trained:,} frozen by train.freeze={freeze!r}"
                 f"{', with their BN statistics' if exp.config.train.freeze_bn else ''})"
                 if freeze else "")


def _best_metric(eval_metrics: dict[str, float]) -> dict[str, float] | None:
    value = eval_metrics.get(checkpointing.BEST_METRIC)
    return None if value is None else {checkpointing.BEST_METRIC: float(value)}


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    flat = {}

    def visit(prefix, node):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, ml_collections.ConfigDict):
                visit(name + ".", value)
            elif isinstance(value, int | float | str | bool):
                flat[name] = value

    visit("", config)
    return flat


def evaluate_state(exp: Experiment, state: Any, writer: Any, step: int,
                   results_dir: str | None = None) -> dict[str, float]:
    """COCO metrics of ``state`` (EMA weights by default) on ``config.eval``'s split (``{}``
    when the split has no ground truth, e.g. test-dev).

    Writes ``eval/<metric>`` scalars and ``eval/detections`` images at ``step``, the COCO
    results and metrics json (with per-class AP) to ``results_dir``
    (``effdet_jax.evaluation.report``), and logs the evaluation block.
    """
    config = exp.config
    pipeline = batches.eval_pipeline(config, exp.image_size)
    evaluator = evaluation.CocoEvaluator(pipeline.label_map, pipeline.gt_annotations,
                                         image_sizes=data_report.eval_image_sizes(config.data),
                                         per_class=True)
    variables = exp.eval_variables(state)
    num_batches = pipeline.num_batches
    if config.eval.num_images is not None:
        num_batches = min(num_batches, -(-config.eval.num_images // config.eval.batch_size))
    summary_images = None
    counts_total = {k: 0 for k in data_counts.COUNT_KEYS}  # this process's eval batches
    for host_batch in itertools.islice(iter(pipeline), num_batches):
        data_counts.accumulate(counts_total, host_batch.get("counts", {}))
        images = host_batch_to_global(host_batch, exp.batch_sharding, ("images",))["images"]
        detections = gather_to_all(exp.detect(variables, images))
        gt = gather_to_all({k: host_batch[k] for k in _GT_KEYS if k in host_batch})
        dets = tuple(detections[k] for k in ("boxes", "scores", "classes", "valid"))
        evaluator.add_batch(gt, dets)
        if summary_images is None and config.eval.num_summary_images > 0:
            n = config.eval.num_summary_images
            summary_images = _draw(host_batch["images"][:n], detections,
                                   pipeline.label_map.class_names(), pipeline.normalization)
    pylogging.getLogger("effdet_jax.evaluation.coco_metrics").setLevel(pylogging.WARNING)
    metrics = eval_report.finish_evaluation(evaluator, step, results_dir,
                                            eval_report.split_tag(config.data),
                                            write_files=jax.process_index() == 0)
    _log_eval_data(evaluator, counts_total)
    if metrics:  # the per-class APs are in the table and metrics json, not 80 more scalars
        writer.write_scalars(step, {f"eval/{k}": metrics[k] for k in evaluation.METRIC_NAMES})
    writer.write_scalars(step, data_report.eval_scalars(evaluator.gt_report, counts_total))
    if summary_images is not None:
        writer.write_images(step, {"eval/detections": summary_images})
    return metrics


def _log_eval_data(evaluator: evaluation.CocoEvaluator, counts: dict[str, int]) -> None:
    """One log line on the data of an evaluation: images skipped as unreadable and ground-truth
    boxes dropped (by the box rule on the json when there is one, else in the pipeline)."""
    report = evaluator.gt_report
    if report is not None:
        gt = f"{report.num_dropped} ground-truth boxes dropped [{report.format()}]"
    else:
        dropped = sum(v for k, v in counts.items() if k.startswith("boxes_") and "dropped" in k)
        gt = f"{dropped} ground-truth boxes dropped"
        if counts.get("boxes_over_max_dropped", 0):
            # Without a json the ground truth is read from the eval batches, M rows per image.
            gt += (f" ({counts['boxes_over_max_dropped']} of them beyond "
                   "config.data.max_instances_per_image, the smallest: raise it to score them)")
    console.say("eval data: %d images skipped as unreadable, %s; pipeline counts: %s",
                counts.get("images_unreadable", 0), gt, data_counts.format_counts(counts))


def _draw(images: np.ndarray, detections: dict, class_names, normalization: Normalization,
          threshold: float = 0.3) -> np.ndarray:
    """[N, S, S, 3] uint8 network-input images with their detections drawn, for TensorBoard;
    ``normalization`` is the pipeline's, so the images are de-normalised with what made them."""
    rgb = np.clip(denormalize_image(np.asarray(images), normalization), 0, 255)
    drawn = [
        np.asarray(
            visualize.draw_detections(
                rgb[i].astype(np.uint8),
                detections["boxes"][i],
                detections["scores"][i],
                detections["classes"][i],
                class_names,
                score_threshold=threshold,
            )
        )
        for i in range(len(images))
    ]
    return np.stack(drawn)


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Evaluates ``inference_state``: the latest checkpoint of ``workdir``, else
    ``config.init.checkpoint`` (EMA weights by default)."""
    exp, state = inference_state(config, workdir, setup(config, ("eval",)))
    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() != 0, collection="eval"
    )
    with jax.set_mesh(exp.mesh):
        metrics = evaluate_state(exp, state, writer, int(jax.device_get(state.step)),
                                 os.path.join(workdir, "eval"))
    writer.flush()
    return metrics


def inference_variables(config: ml_collections.ConfigDict, workdir: str) -> tuple[Experiment, dict]:
    """The experiment and the variables inference uses (EMA by default), from ``inference_state``
    (the latest checkpoint of ``workdir``, else ``config.init.checkpoint``): the one place predict
    and export get their weights."""
    exp, state = inference_state(config, workdir, setup(config))
    return exp, exp.eval_variables(state)


def predict(
    config: ml_collections.ConfigDict, workdir: str, paths: list[str], output_dir: str
) -> list[dict]:
    """Detects objects in image files with ``inference_variables`` and writes drawn images plus
    ``detections.json`` to ``output_dir`` (``effdet_jax.visualize.predict_images``). Class names
    come from the label space (``data.class_names.label_names``); the images of the dataset are not
    needed."""
    exp, variables = inference_variables(config, workdir)
    batch_size = exp.mesh.shape["data"]

    def detect_fn(images: np.ndarray):
        batch = host_batch_to_global({"images": images}, exp.batch_sharding, ("images",))
        out = jax.device_get(exp.detect(variables, batch["images"]))
        return out["boxes"], out["scores"], out["classes"], out["valid"]

    class_names = label_names(config.data, config.model.num_classes)
    with jax.set_mesh(exp.mesh):
        return visualize.predict_images(
            paths, detect_fn, exp.image_size, class_names, output_dir, batch_size=batch_size,
            normalization=exp.model.config.normalization,
        )
