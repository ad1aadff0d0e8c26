"""Train, evaluate and run EfficientDet.

  python main.py --config=configs/shapes.py --workdir=/tmp/shapes
  python main.py --config=configs/d3.py --workdir=DIR --config.train.batch_size=128
  python main.py --config=configs/d0.py --workdir=DIR --mode=predict --images='imgs/*.jpg' \
      --output=/tmp/pred
  python main.py --config=configs/d0.py --workdir=DIR --mode=export --output=/tmp/exported

This file only parses flags; everything else is in ``effdet_jax.train`` (importable in notebooks).
"""

import contextlib
import glob
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from effdet_jax.train import console, launcher

MODES = ("train", "eval", "train_and_eval", "predict", "summary", "export")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard logs and eval results go here.")
flags.DEFINE_enum("mode", "train_and_eval", MODES, "What to do.")
flags.DEFINE_string("images", None, "predict: glob of image files.")
flags.DEFINE_string("output", None, "predict: folder for the drawn images and detections.json; "
                    "export: folder for the exported files and export.json.")
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Library INFO goes to WORKDIR/log.txt, not the console, unless --verbosity is given.
    library_info = FLAGS["verbosity"].present
    console.setup(FLAGS.workdir, library_info=library_info)
    config = FLAGS.config
    if launcher.jax_will_use_cpu(os.environ):
        logging.info(launcher.status_line(os.environ))
    if FLAGS.mode == "summary":  # shapes only: no TensorFlow, no input pipeline
        from effdet_jax.train.model_summary import summary

        print(summary(config))
        return
    # TensorFlow's C++ start-up notices go to the log. Imported here, not at the top: the
    # trainer pulls in TensorFlow, which the launcher's re-execution would load twice.
    with contextlib.nullcontext() if library_info else console.native_stderr_to_log():
        from effdet_jax.data import hide_gpus_from_tf

        hide_gpus_from_tf()
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required for mode " + FLAGS.mode)
    from effdet_jax.data.report import BadDataError
    from effdet_jax.data.sources import DataUnavailableError
    from effdet_jax.export.command import ExportIncompleteError
    from effdet_jax.train.checkpoint_files import CheckpointFileError
    from effdet_jax.train.checkpointing import CheckpointMismatchError, CheckpointRestoreError
    from effdet_jax.train.initialization import NoCheckpointError
    from effdet_jax.train.run_config import ConfigMismatchError

    try:
        run_mode(config)
    except (DataUnavailableError, BadDataError, ConfigMismatchError, CheckpointMismatchError,
            CheckpointRestoreError, CheckpointFileError, NoCheckpointError,
            ExportIncompleteError) as e:
        # The message is the whole story (what is wrong or missing, the ways out): no traceback.
        sys.exit(f"error: {e}")
    logging.info("done: %s", FLAGS.mode)


def run_mode(config) -> None:
    """Runs ``--mode`` (all but ``summary``) on ``config``."""
    from effdet_jax.train import trainer

    if FLAGS.mode == "train_and_eval":
        trainer.train_and_evaluate(config, FLAGS.workdir)
    elif FLAGS.mode == "train":
        trainer.train_and_evaluate(config, FLAGS.workdir, evaluate_during_training=False)
    elif FLAGS.mode == "eval":
        trainer.evaluate(config, FLAGS.workdir)
    elif FLAGS.mode == "predict":
        if not FLAGS.images or not FLAGS.output:
            raise app.UsageError("--mode=predict needs --images and --output")
        paths = sorted(glob.glob(FLAGS.images))
        if not paths:
            raise app.UsageError(f"--images={FLAGS.images!r} matches no file")
        trainer.predict(config, FLAGS.workdir, paths, FLAGS.output)
    elif FLAGS.mode == "export":
        if not FLAGS.output:
            raise app.UsageError("--mode=export needs --output")
        from effdet_jax.export.command import run_export

        run_export(config, FLAGS.workdir, FLAGS.output)


if __name__ == "__main__":
    # Before anything runs: with glibc's malloc every XLA:CPU train step page-faults its whole
    # working set again; this re-executes once with tcmalloc preloaded where it is installed
    # (effdet_jax/train/launcher.py; EFFDET_JAX_CPU_MALLOC=0 opts out).
    launcher.reexec_with_cpu_malloc()
    app.run(main)
