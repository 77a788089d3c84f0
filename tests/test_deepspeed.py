"""The shipped DeepSpeed configs train our model (issue #15, point 4): a CPU smoke test, run where
``deepspeed`` is installed (``pip install -e ".[deepspeed]"``; skipped otherwise, e.g. in CI).

The Trainer's own code fills the configs' ``auto`` values from the TrainingArguments and the model
(transformers' ``HfTrainerDeepSpeedConfig``, as ``Trainer`` does on a GPU), then ``deepspeed.initialize``
wraps a tiny HTC model on one gloo rank and takes two ZeRO steps. (accelerate ignores DeepSpeed on a
CPU, so the Trainer itself cannot be the driver here.)"""

import pytest
import torch
from helpers import images, left_pad, tiny_model

deepspeed = pytest.importorskip("deepspeed")


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_a_shipped_zero_config_trains_the_model_on_cpu(stage, tmp_path, monkeypatch):
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from htc_vlm.layout import image_prompt_ids
    from htc_vlm.training.config import deepspeed_path

    port = 29600 + (stage == "zero3")
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=1,
                             learning_rate=1e-3, max_grad_norm=1.0, use_cpu=True, report_to=[])
    model = tiny_model(compression="htc").train()
    ds = HfTrainerDeepSpeedConfig(deepspeed_path(stage))
    ds.trainer_config_process(args)
    ds.trainer_config_finalize(args, model, num_training_steps=2)
    config = ds.config | {"zero_force_ds_cpu_optimizer": False}
    assert config["zero_optimization"]["stage"] == int(stage[-1]) and "auto" not in str(config)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    pix, q = images(model.config)
    head = image_prompt_ids(model.config, [3])
    ids, am = left_pad([head + [5, 6, 7, 8], head + [9, 10, 11, 12]])
    labels = ids.clone()
    labels[:, :len(head)] = -100
    losses = []
    for _ in range(2):
        loss = engine(input_ids=ids, pixel_values=pix, discrete_latents=q, attention_mask=am, labels=labels).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    assert losses[1] < losses[0]  # the step changed the (sharded) weights the way the loss asks
