"""Run by test_training.py under torchrun: train a few steps, then write this rank's weight digest."""

import hashlib
import os
import sys

import torch
from transformers import TrainerCallback

from htc_vlm.training.config import load_config
from htc_vlm.training.run import train


class Digest(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        h = hashlib.sha256()
        for name, p in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
        with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.sha"), "w") as f:
            f.write(h.hexdigest())


if __name__ == "__main__":
    torch.set_num_threads(1)
    train(load_config("tiny", sys.argv[2:]), callbacks=[Digest()])
