"""The ablation runner's pieces: the sweep arms, reading metrics back from TensorBoard events, and
the table/plot it writes."""

import importlib.util
import pathlib
import sys

import numpy as np
import pytest

from effdet_jax.models.bifpn import FUSION_METHODS
from effdet_jax.models.efficientnet_config import DROP_CONNECT_VARIANTS

ROOT = pathlib.Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("ablate", ROOT / "experiments" / "ablate.py")
ablate = importlib.util.module_from_spec(spec)
sys.modules["ablate"] = ablate  # dataclasses look their module up while the class is created
spec.loader.exec_module(ablate)


def test_sweep_arms_cover_every_variant():
    assert ablate.SWEEPS == ("drop_connect", "fusion")
    fusion = ablate.sweep_arms("fusion", [0.2])
    assert [a.label for a in fusion] == list(FUSION_METHODS)
    assert fusion[1].overrides == (("config.model.fpn_weight_method", FUSION_METHODS[1]),)
    dc = ablate.sweep_arms("drop_connect", [0.1, 0.3])
    labels = [a.label for a in dc]
    assert labels[0] == "none" and len(labels) == 1 + (len(DROP_CONNECT_VARIANTS) - 1) * 2
    assert "channel@0.3" in labels
    assert dc[0].overrides == (("config.model.drop_connect_variant", "none"),
                               ("config.model.backbone_drop_connect_rate", "0.0"))
    assert dict(dc[labels.index("channel@0.3")].overrides) == {
        "config.model.drop_connect_variant": "channel",
        "config.model.backbone_drop_connect_rate": "0.3",
    }
    with pytest.raises(ValueError, match="drop_connect"):
        ablate.sweep_arms("dropout", [0.1])


def test_read_events_and_table(tmp_path):
    import tensorflow as tf

    writer = tf.summary.create_file_writer(str(tmp_path / "run"))
    with writer.as_default():
        for step, ap50 in ((10, 0.2), (20, 0.5)):
            tf.summary.scalar("eval/AP50", ap50, step=step)
            tf.summary.scalar("eval/AP", ap50 / 2, step=step)
    writer.flush()
    events = ablate.read_events(tmp_path)
    np.testing.assert_allclose([v for _, v in events["eval/AP50"]], [0.2, 0.5], rtol=1e-6)
    assert [s for s, _ in events["eval/AP"]] == [10, 20]

    runs = {
        "sum": [
            {"returncode": 0, "ap": 0.3, "ap50": 0.6, "steps_per_sec": 2.0,
             "curve_ap50": [(10, 0.2), (20, 0.6)]},
            {"returncode": 0, "ap": 0.5, "ap50": 0.8, "steps_per_sec": 4.0,
             "curve_ap50": [(10, 0.4), (20, 0.8)]},
        ],
        "attn": [{"returncode": 1, "error": "exit 1"}],
    }
    table = ablate.write_table(runs, {"sum": 1234, "attn": 1240}, tmp_path / "t.md")
    assert "| sum | 0.400 ± 0.141 | 0.700 ± 0.141 | 3.000 ± 1.414 | 1,234 | 2 |" in table
    assert "| attn | n/a | n/a | n/a | 1,240 | 0 (1 failed) |" in table
    ablate.write_plot(runs, tmp_path / "p.png", "t")
    assert (tmp_path / "p.png").stat().st_size > 1000
