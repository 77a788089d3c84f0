"""kill -9 in the middle of a command, then the same command again: it resumes, keeps what was
finished, and ends with the output of an uninterrupted run (issue #18). The kill comes at a point the
test chooses: once the command has written a given number of results."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from htc_vlm.cli import main

RUN = "import sys; from htc_vlm.cli import main; sys.exit(main(sys.argv[1:]))"


def _kill_after(args, done, sig=signal.SIGKILL, timeout=120.0):
    """Start ``htc-vlm args`` in a process, send it ``sig`` as soon as ``done()`` is true; True if it
    was stopped so (False: it finished first, the test then has nothing to check). For SIGINT (Ctrl-C)
    the process must exit by itself with 130 and say how to resume, without a traceback."""
    proc = subprocess.Popen([sys.executable, "-c", RUN, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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
