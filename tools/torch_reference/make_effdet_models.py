"""effdet (PyTorch) ``tf_efficientdet_*`` reference: state dicts and raw outputs on fixed inputs.

Random init (``pretrained=False``; no download) with randomised BN statistics and fusion weights, so a
port that ignores either fails. For each model ``M``: ``M/sd/<name>``, ``M/input`` ``[N, H, W, 3]``
(NHWC), ``M/cls_<L>`` and ``M/box_<L>`` (NHWC, anchor-major channels). Models: d0 at 512 (fastattn)
and lite0 at 320 (sum fusion, relu6, legacy 3->5 nearest upsampling).
"""

import numpy as np
import torch
from common import parse_out, randomise_batchnorm, save, seed_everything
from effdet import create_model

MODELS = (("tf_efficientdet_d0", 512, 0), ("tf_efficientdet_lite0", 320, 1))


def main() -> None:
    out = parse_out()
    arrays = {}
    for name, size, seed in MODELS:
        seed_everything(400 + seed)
        model = create_model(name, pretrained=False, pretrained_backbone=False).eval()
        randomise_batchnorm(model, seed=500 + seed)
        g = torch.Generator().manual_seed(600 + seed)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "edge_weights" in pname:  # fusion weights; a negative one exercises relu
                    p.copy_(torch.rand(p.shape, generator=g) + 0.25)
                    if pname.endswith("fpn.cell.0.fnode.4.combine.edge_weights"):
                        p[-1] = -0.5
        x = np.random.default_rng(700 + seed).standard_normal((2, size, size, 3)).astype(np.float32)
        with torch.no_grad():
            cls, box = model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
        arrays[f"{name}/input"] = x
        for i, (c, b) in enumerate(zip(cls, box, strict=True)):
            level = 3 + i
            arrays[f"{name}/cls_{level}"] = c.permute(0, 2, 3, 1).numpy()
            arrays[f"{name}/box_{level}"] = b.permute(0, 2, 3, 1).numpy()
        for k, v in model.state_dict().items():
            if not k.endswith("num_batches_tracked"):
                arrays[f"{name}/sd/{k}"] = v.numpy()
    save(out, arrays)


if __name__ == "__main__":
    main()
