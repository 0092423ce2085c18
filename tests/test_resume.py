"""A fine-tuning run SIGKILLed after a checkpoint resumes from it (real trainer, real model)."""

import json
import os
import signal
import subprocess
import sys
import time

from fireact_utils.config import ModelParams, TrainParams
from fireact_utils.data import load_fireact
from fireact_utils.train import WALL_CLOCK, finetune, read_train_meta

PARAMS = dict(method="lora", max_steps=4, save_steps=2, batch_size=2, max_length=128, logging_steps=1, lora_r=4)
CHILD = """
import sys
from fireact_utils.config import ModelParams, TrainParams
from fireact_utils.data import load_fireact
from fireact_utils.train import finetune
finetune(load_fireact("hotpotqa")[:4], sys.argv[1], TrainParams(**{params}), ModelParams())
"""


def test_finetune_killed_after_checkpoint_resumes(tmp_path, data_dir):
    out = tmp_path / "ft"
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(params=PARAMS), str(out)], env=os.environ.copy(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "checkpoint-2" / WALL_CLOCK  # written after the checkpoint itself
    deadline = time.time() + 300
    try:
        while not state.is_file() and child.poll() is None and time.time() < deadline:
            time.sleep(0.2)
    finally:  # killed on every path: a failed wait must not leave a training process behind
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert state.is_file(), "no checkpoint before the deadline"
    assert not (out / "final").exists()

    final = finetune(load_fireact("hotpotqa", data_dir=data_dir)[:4], out, TrainParams(**PARAMS), ModelParams())
    meta = read_train_meta(final)
    assert meta["resumed_from"].endswith("checkpoint-2")
    # The training time covers both processes, not only the resumed part.
    before = json.loads(state.read_text())["train_s"]
    assert 0 < before < meta["train_runtime_s"]
    steps = [row.split(",")[-1] for row in (out / "train_log.csv").read_text().splitlines()[1:]]
    assert steps[-1] == "4"
