"""timm ``tf_efficientnet_*`` reference: state dicts and eval-mode logits on fixed inputs.

Random init (no download) with randomised BN statistics. For each model ``M`` the npz holds
``M/sd/<timm name>`` (numpy arrays), ``M/input`` ``[N, H, W, 3]`` (NHWC), ``M/logits``
``[N, 1000]`` and ``M/features_<stride>`` (NHWC backbone features at strides 8, 16, 32, i.e. the
P3-P5 inputs of an EfficientDet, from timm's ``features_only`` model with the same weights).
Models: B0 at 224, B2 at 192 (a scaled variant), lite0 at 224 (relu6, no SE).
"""

import numpy as np
import timm
import torch
from common import parse_out, randomise_batchnorm, save, seed_everything

MODELS = (("tf_efficientnet_b0", 224, 0), ("tf_efficientnet_b2", 192, 1), ("tf_efficientnet_lite0", 224, 2))


def main() -> None:
    out = parse_out()
    arrays = {}
    for name, size, seed in MODELS:
        seed_everything(100 + seed)
        model = timm.create_model(name, pretrained=False).eval()
        randomise_batchnorm(model, seed=200 + seed)
        x = np.random.default_rng(300 + seed).standard_normal((2, size, size, 3)).astype(np.float32)
        with torch.no_grad():
            logits = model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()
        features = timm.create_model(name, pretrained=False, features_only=True,
                                     out_indices=(2, 3, 4)).eval()
        missing, _ = features.load_state_dict(model.state_dict(), strict=False)
        assert not missing, missing
        with torch.no_grad():
            maps = features(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
        for stride, fmap in zip((8, 16, 32), maps, strict=True):
            arrays[f"{name}/features_{stride}"] = fmap.permute(0, 2, 3, 1).numpy()
        arrays[f"{name}/input"] = x
        arrays[f"{name}/logits"] = logits
        for k, v in model.state_dict().items():
            if not k.endswith("num_batches_tracked"):
                arrays[f"{name}/sd/{k}"] = v.numpy()
    save(out, arrays)


if __name__ == "__main__":
    main()
