"""Helpers shared by the PyTorch reference scripts (run in the Python 3.11 torch venv).

Each ``make_<name>.py`` script writes one ``<name>.npz`` of reference arrays that the JAX tests read.
Arrays are float32 NHWC where they are images or activations; state dicts are stored under
``sd/<torch name>`` keys as numpy arrays (never pickles).
"""

import argparse
import os
import tempfile

import numpy as np


def parse_out() -> str:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="path of the .npz to write")
    return parser.parse_args().out


def seed_everything(seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(2)


def randomise_batchnorm(model, seed: int) -> None:
    """Give every BatchNorm non-trivial affine params and running statistics (so a port that
    ignores them, or uses batch statistics, fails)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def state_dict_arrays(model) -> dict:
    return {f"sd/{k}": v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def save(out: str, arrays: dict) -> None:
    """Write atomically so an interrupted run never leaves a half-written reference."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=os.path.dirname(os.path.abspath(out)))
    os.close(fd)
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, out)
