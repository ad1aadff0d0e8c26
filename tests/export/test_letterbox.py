"""Exported graphs that take images of another size letterbox them as the eval pipeline does and
return boxes in the input's pixels: checked against the eval pipeline's own TF transform
(``data.transforms.resize_crop_pad``) followed by the JAX model and post-processing."""

import numpy as np
import pytest
from letterbox_reference import eval_pipeline_letterbox

from effdet_jax.detection import anchors
from effdet_jax.detection.postprocess import PostprocessConfig, postprocess
from effdet_jax.export import check_images, export_model, formats, letterbox, serving
from effdet_jax.export.options import ExportOptions, parse_input_size

SIZE = 64  # the image size of the `tiny` fixture (conftest.py)




def _pipeline(images, model):
    """The eval pipeline's letterbox per image (TF), stacked: ``([B, S, S, 3], image_scale [B])``."""
    return eval_pipeline_letterbox(images, model.config.normalization, SIZE)


@pytest.mark.parametrize("input_hw", [(48, 80), (100, 30)])
def test_letterbox_is_the_eval_pipelines(tiny, input_hw):
    model, _ = tiny
    images = check_images(2, *input_hw, seed=input_hw[0])
    expected, scales = _pipeline(images, model)
    geo = letterbox.geometry(input_hw, SIZE)
    mean, std = (np.float32(v) for v in model.config.normalization)
    got = np.asarray(letterbox.letterbox((images.astype(np.float32) - mean) / std, geo))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(geo.image_scale, scales, rtol=1e-6)


@pytest.mark.slow
def test_exported_letterboxed_detections_are_in_input_pixels(tiny, tmp_path):
    model, variables = tiny
    input_hw = (48, 80)
    images = check_images(2, *input_hw, seed=7)
    pp = PostprocessConfig()
    # Reference: eval pipeline letterbox -> JAX model (CPU kernels as evaluation runs it) ->
    # post-processing with the pipeline's image_scale -> clip to the input image.
    x, scales = _pipeline(images, model)
    cls_out, box_out = model.apply(variables, x, train=False)
    det = postprocess(cls_out, box_out, anchors.generate_anchors(model.config.anchor_config()),
                      SIZE, scales, pp)
    limit = np.asarray([*input_hw, *input_hw], np.float32)
    ref = {k: np.asarray(det[k]) for k in serving.NMS_OUTPUTS}
    ref["boxes"] = np.clip(ref["boxes"], 0, limit)

    result = export_model(model, variables,
                          ExportOptions(("stablehlo",), 2, True, "float32", input_hw), pp, str(tmp_path),
                          images=images)
    out = dict(zip(serving.NMS_OUTPUTS, formats.run("stablehlo", result.written["stablehlo"], images,
                                                      serving.NMS_OUTPUTS), strict=True))
    assert out["boxes"].shape == (2, pp.max_detections, 4)
    k = 20
    np.testing.assert_array_equal(out["classes"][:, :k], ref["classes"][:, :k])
    np.testing.assert_allclose(out["scores"][:, :k], ref["scores"][:, :k], atol=1e-4)
    np.testing.assert_allclose(out["boxes"][:, :k], ref["boxes"][:, :k], atol=2e-3)
    assert (out["boxes"] <= limit).all() and out["boxes"][:, :k, 3].max() > SIZE  # input pixels


@pytest.mark.parametrize("text, expected", [("", None), ("480x640", (480, 640))])
def test_input_size_parses(text, expected):
    assert parse_input_size(text) == expected


@pytest.mark.parametrize("text", ["480", "0x5", "axb"])
def test_bad_input_size_names_the_key_and_fix(text):
    with pytest.raises(ValueError, match="config.export.input_size.*HEIGHTxWIDTH"):
        parse_input_size(text)
