"""kill -9 (or Ctrl-C) in the middle of a command, then the same command again: it resumes, keeps what
was finished, and ends with the output of an uninterrupted run (issue #18). The kill comes at a point
the test chooses: once the command has written a given number of results (predictions, caches,
batches, checkpoints, finished stages)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from htc_vlm.cli import main

from helpers import train_args

# Each child takes Ctrl-C as a terminal delivers it: a test runner started in the background (cmd &)
# ignores SIGINT, and its children would inherit that and never see the interrupt a test sends.
SIGINT_AS_IN_A_TERMINAL = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)"
RUN = SIGINT_AS_IN_A_TERMINAL + "; import sys; from htc_vlm.cli import main; sys.exit(main(sys.argv[1:]))"


def _kill_after(args, done, sig=signal.SIGKILL, timeout=120.0):
    """Start ``htc-vlm args`` in a process, send it ``sig`` as soon as ``done()`` is true; True if it
    was stopped so (False: it finished first, the test then has nothing to check). For SIGINT (Ctrl-C)
    the process must exit by itself with 130 and say how to resume, without a traceback."""
    # the same thread count as this process (conftest's), whatever OMP_NUM_THREADS says: the resumed
    # run here must round as the killed one there did
    env = os.environ | {"OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-c", RUN, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env)
    t0 = time.monotonic()
    try:
        while proc.poll() is None and time.monotonic() - t0 < timeout:
            if done():
                proc.send_signal(sig)
                _, err = proc.communicate(timeout=60)
                if sig == signal.SIGINT and proc.returncode != 0:
                    assert proc.returncode == 130 and b"run the same command again" in err and b"Traceback" not in err
                return proc.returncode != 0
            time.sleep(0.01)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def model_dir(make_model_dir):
    return make_model_dir("voco")


def _lines(path):
    return path.read_text().count("\n") if path.exists() else 0


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_eval_killed_mid_run_resumes_to_the_uninterrupted_result(model_dir, scenes_dir, tmp_path, sig):
    questions = scenes_dir / "test" / "open.jsonl"
    n = _lines(questions)
    args = ["eval", "--model", str(model_dir), "--benchmark", "scenes_open", "--questions", str(questions),
            "--images", str(scenes_dir / "images"), "--batch-size", "1"]
    out = tmp_path / "killed"
    preds = out / "predictions.jsonl"
    if not _kill_after(args + ["--out", str(out)], lambda: _lines(preds) >= 5, sig):
        pytest.skip("eval finished before it could be killed")
    kept = _lines(preds)
    assert 5 <= kept < n and not (out / "metrics.json").exists()
    assert main(args + ["--out", str(out)]) == 0  # resumes: only the rest is answered
    rows = [json.loads(x) for x in preds.read_text().splitlines() if x.endswith("}")]
    assert len(rows) == len({r["question_id"] for r in rows}) == n  # each once (a line cut by the kill is redone)
    assert main(args + ["--out", str(tmp_path / "whole")]) == 0
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (out, tmp_path / "whole")]
    assert metrics[0]["metrics"] == metrics[1]["metrics"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_compress_killed_mid_run_keeps_finished_caches_and_completes(model_dir, scenes_dir, tmp_path, sig):
    from htc_vlm import VisualCache

    images = sorted((scenes_dir / "images").glob("test_*.png"))
    args = ["compress", "--model", str(model_dir), "--batch-size", "1"]
    out = tmp_path / "killed"

    def caches():
        return sorted(out.glob("*.safetensors")) if out.exists() else []

    if not _kill_after(args + ["--out", str(out), *map(str, images)], lambda: len(caches()) >= 3, sig):
        pytest.skip("compress finished before it could be killed")
    assert 3 <= len(caches()) < len(images)
    for f in caches():  # whatever is there under its name is a whole cache
        VisualCache.load(f)
    assert main(args + ["--out", str(out), *map(str, images)]) == 0
    assert main(args + ["--out", str(tmp_path / "whole"), *map(str, images)]) == 0
    whole = sorted((tmp_path / "whole").glob("*.safetensors"))
    assert [f.name for f in caches()] == [f.name for f in whole]
    for a, b in zip(caches(), whole):  # the same content (safetensors orders its metadata per process)
        x, y = VisualCache.load(a), VisualCache.load(b)
        assert x.meta == y.meta and all(torch.equal(s, t) for s, t in zip(x.keys + x.values, y.keys + y.values))


def test_two_processes_compressing_into_one_folder_leave_only_whole_caches(model_dir, scenes_dir, tmp_path):
    from htc_vlm import VisualCache

    images = [str(p) for p in sorted((scenes_dir / "images").glob("test_*.png"))]
    out = tmp_path / "shared"
    args = [sys.executable, "-c", RUN, "compress", "--model", str(model_dir), "--batch-size", "1", "--out", str(out)]
    procs = [subprocess.Popen(args + order, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for order in (images, images[::-1])]  # both write every image, meeting in the middle
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    files = sorted(out.glob("*.safetensors"))
    assert len(files) == len(images)
    for f in files:
        VisualCache.load(f)
    assert not [f for f in out.iterdir() if f.name.startswith(".")]  # no temporary file left behind


def test_encode_discrete_killed_mid_run_resumes_from_its_finished_batches(tmp_path, scenes_dir, monkeypatch):
    from htc_vlm.vq.model import MultiGroupVQ, VQConfig
    from htc_vlm.vq.store import FeatureStore

    torch.manual_seed(0)
    MultiGroupVQ(VQConfig(image_size=48, downsample=4, base_channels=8, codebook_size=16, kmeans_init=False)).save(
        tmp_path / "tok")
    images = scenes_dir / "images"
    n = len(list(images.glob("*.png")))
    args = ["encode-discrete", "--tokenizer", str(tmp_path / "tok"), "--images", str(images), "--batch-size", "4"]
    out = tmp_path / "q.safetensors"
    work = tmp_path / ".q.safetensors.partial"

    def batches():
        return sorted(work.glob("batch-*.safetensors")) if work.exists() else []

    if not _kill_after(args + ["--out", str(out)], lambda: len(batches()) >= 3):
        pytest.skip("encode-discrete finished before it could be killed")
    kept = len(batches())
    assert not out.exists() and 3 <= kept < -(-n // 4)
    calls = []
    real_q = MultiGroupVQ.q
    monkeypatch.setattr(MultiGroupVQ, "q", lambda self, x: calls.append(len(x)) or real_q(self, x))
    assert main(args + ["--out", str(out)]) == 0
    assert sum(calls) == n - 4 * kept  # only the batches not finished were encoded again
    assert not work.exists()
    assert main(args + ["--out", str(tmp_path / "whole.safetensors")]) == 0
    a, b = FeatureStore(out), FeatureStore(tmp_path / "whole.safetensors")
    assert a.ids() == b.ids() and len(a) == n and all(torch.equal(a[i], b[i]) for i in a.ids())


def test_encode_discrete_reuses_a_kept_batch_only_for_the_same_tokenizer_and_files(tmp_path, scenes_dir):
    from htc_vlm.vq.model import MultiGroupVQ, VQConfig
    from htc_vlm.vq.store import encode_folder

    cfg = VQConfig(image_size=48, downsample=4, base_channels=8, codebook_size=16, kmeans_init=False)
    toks = [torch.manual_seed(s) and MultiGroupVQ(cfg).eval() for s in (0, 1)]
    images, work = scenes_dir / "images", tmp_path / "work"
    first, _ = encode_folder(toks[0], images, 8, work=work, tokenizer_key="tok0")
    again, _ = encode_folder(toks[1], images, 8, work=work, tokenizer_key="tok0")  # same key: read back
    assert all(torch.equal(first[k], again[k]) for k in first)
    other, _ = encode_folder(toks[1], images, 8, work=work, tokenizer_key="tok1")  # another tokenizer
    fresh, _ = encode_folder(toks[1], images, 8)
    assert all(torch.equal(other[k], fresh[k]) for k in fresh) and not any(torch.equal(other[k], first[k]) for k in first)
    for f in work.glob("*.safetensors"):  # a torn batch file is encoded again, not trusted
        f.write_bytes(f.read_bytes()[:100])
    torn, _ = encode_folder(toks[1], images, 8, work=work, tokenizer_key="tok1")
    assert all(torch.equal(torn[k], fresh[k]) for k in fresh)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_train_tokenizer_killed_mid_run_resumes_to_the_uninterrupted_weights(tmp_path, scenes_dir, sig):
    from safetensors.torch import load_file

    args = ["train-tokenizer", "--images", str(scenes_dir / "images"), "--steps", "12", "--batch-size", "4",
            "--eval-every", "2"]
    out = tmp_path / "killed"
    state = out / "checkpoint" / "state.json"

    def at_step(k):
        try:
            return json.loads(state.read_text())["step"] >= k
        except (OSError, ValueError):
            return False

    if not _kill_after(args + ["--out", str(out)], lambda: at_step(4), sig):
        pytest.skip("train-tokenizer finished before it could be killed")
    assert not (out / "tokenizer").exists()
    assert main(args + ["--out", str(out)]) == 0
    assert main(args + ["--out", str(tmp_path / "whole")]) == 0
    a, b = (load_file(d / "tokenizer" / "model.safetensors") for d in (out, tmp_path / "whole"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 10, 12]  # each evaluation once, none lost or repeated


def test_train_killed_mid_run_resumes_to_the_uninterrupted_weights(tiny_run, tmp_path):
    from safetensors.torch import load_file

    from htc_vlm.training.run import last_checkpoint

    run = tiny_run
    args = ["train", "--config", "tiny"]
    extra = ("optim.max_steps=8", "optim.save_steps=2")
    killed = run / "fault-killed"
    if not _kill_after(args + train_args(run, "vision", "fault-killed", *extra),
                       lambda: (last_checkpoint(killed) or "").endswith("checkpoint-4")):
        pytest.skip("train finished before it could be killed")
    assert not (killed / "model").exists()
    assert main(args + train_args(run, "vision", "fault-killed", *extra)) == 0
    assert main(args + train_args(run, "vision", "fault-whole", *extra)) == 0
    a, b = (load_file(run / d / "model" / "model.safetensors") for d in ("fault-killed", "fault-whole"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


REPRODUCE = SIGINT_AS_IN_A_TERMINAL + """
import sys, time
from pathlib import Path
import htc_vlm.reproduce as rp
from htc_vlm.cli import main

log = Path(sys.argv[1]) / "calls.log"

def stage(name, hold):
    def run(root, preset):
        with open(log, "a") as f:
            f.write(name + "\\n")
        t0 = time.monotonic()
        while hold and (Path(sys.argv[1]) / "hold").exists() and time.monotonic() - t0 < 60:
            time.sleep(0.05)
        (root / f"{name}.txt").write_text(name)
        return {"outputs": f"{name}.txt", "command": "true"}
    return rp.Stage(name, run, f"stage {name}")

rp.stages = lambda p: [stage("a", False), stage("b", True), stage("c", False)]
sys.exit(main(["reproduce", "--quick", "--out", sys.argv[2]]))
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_reproduce_killed_mid_stage_keeps_finished_stages_and_completes(tmp_path, sig):
    """The run record and report under kill: stage a finished, b killed while running, c not begun."""
    (tmp_path / "hold").touch()
    out = tmp_path / "run"

    def run_until(done):
        proc = subprocess.Popen([sys.executable, "-c", REPRODUCE, str(tmp_path), str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < 60 and not done():
            time.sleep(0.01)
        return proc

    calls = lambda: (tmp_path / "calls.log").read_text().split() if (tmp_path / "calls.log").exists() else []  # noqa: E731
    proc = run_until(lambda: calls() == ["a", "b"])
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and b"Traceback" not in err
    record = json.loads((out / "run.json").read_text())
    assert {k: v["status"] for k, v in record["stages"].items()} == {"a": "done"}
    (tmp_path / "hold").unlink()
    proc = run_until(lambda: False)
    assert proc.wait(timeout=60) == 0
    assert calls() == ["a", "b", "b", "c"]  # a kept, b started again, c run once
    record = json.loads((out / "run.json").read_text())
    assert {k: v["status"] for k, v in record["stages"].items()} == {"a": "done", "b": "done", "c": "done"}
    assert all((out / f"{n}.txt").exists() for n in "abc") and (out / "report.md").exists()
