import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import benchmark_script

from htc_vlm.cli import main
from htc_vlm.errors import HTCError


def test_reproduce_records_stages_resumes_and_refuses_another_preset(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["reproduce", "--quick", "--out", str(out), "--only", "scenes"]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["stages"]["scenes"]["status"] == "done" and "vision" not in record["stages"]
    assert (out / "report.md").exists() and "htc-vlm data scenes" in (out / "report.md").read_text()
    stamp = (out / "scenes" / "meta.json").stat().st_mtime_ns
    assert main(["reproduce", "--quick", "--out", str(out), "--only", "scenes"]) == 0
    assert "done already" in capsys.readouterr().err
    assert (out / "scenes" / "meta.json").stat().st_mtime_ns == stamp  # not redone
    assert main(["reproduce", "--out", str(out), "--only", "scenes"]) == 2  # the full preset on a quick run
    assert "holds a run of preset 'tiny-quick'" in capsys.readouterr().err
    assert main(["reproduce", "--quick", "--out", str(out), "--only", "nope"]) == 2
    assert main(["reproduce", "--preset", "huge", "--out", str(tmp_path / "x")]) == 2


def test_a_failing_stage_is_reported_and_resumed(tmp_path, capsys, monkeypatch):
    import htc_vlm.reproduce as rp

    out = tmp_path / "run"
    calls = []

    def boom(root, preset):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("disk on fire")
        return {"outputs": "ok", "command": "true"}

    first = rp.stages(rp.get_preset("tiny", True))[0]
    monkeypatch.setattr(rp, "stages", lambda p: [first, rp.Stage("boom", boom, "fails once")])
    with pytest.raises(RuntimeError, match="disk on fire"):  # an inline stage's error reaches the caller
        main(["reproduce", "--quick", "--out", str(out)])
    assert "failed: RuntimeError: disk on fire" in (out / "report.md").read_text()
    assert main(["reproduce", "--quick", "--out", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["stages"]["boom"]["status"] == "done" and len(calls) == 2


def test_report_tables_retention_and_per_template(tmp_path):
    from htc_vlm.report import render

    (tmp_path / "scenes" / "test").mkdir(parents=True)
    scenes = [{"image": "a.png", "objects": [{}]}, {"image": "b.png", "objects": [{}, {}]}]
    qs = [{"question_id": "1", "image": "a.png", "template": "open/color", "answer": "red"},
          {"question_id": "2", "image": "b.png", "template": "open/color", "answer": "blue"},
          {"question_id": "3", "image": "b.png", "template": "open/count", "answer": "2"}]
    (tmp_path / "scenes/test/scenes.jsonl").write_text("\n".join(map(json.dumps, scenes)))
    (tmp_path / "scenes/test/open.jsonl").write_text("\n".join(map(json.dumps, qs)))
    preds = tmp_path / "eval/upper/open"
    preds.mkdir(parents=True)
    preds.joinpath("predictions.jsonl").write_text("\n".join(json.dumps({"benchmark": "scenes_open", "question_id": q, "prediction": p})
                                                             for q, p in (("1", "red"), ("2", "red"), ("3", "2"))) + "\n")

    def ev(open_, pope):
        return {"status": "done", "scores": {"open": open_, "pope_random": pope}, "open_by_tag": {}, "command": "c"}

    record = {"preset": {"name": "t", "budgets": [1], "table2_families": ["open"]},
              "stages": {"eval/upper": ev(80.0, 60.0), "eval/lower": ev(20.0, 70.0), "eval/voco-b1": ev(50.0, 65.0)}}
    text, results = render(tmp_path, record)
    assert results["table1"]["voco-b1"]["retention"] == {"open": 50.0}  # (50-20)/(80-20); pope: upper < lower
    assert "| VoCo-LLaMA | 50.0 (50%) | 65.0 |" in text and "No retention for pope_random" in text
    assert results["open_by_template"]["upper bound (every patch token)"] == {"color": 50.0, "count": 100.0}
    assert results["open_by_template"]["upper bound, one-object scenes only"] == {"color": 100.0}
    assert "| eval/voco-b1 | done |" in text

    # Table 1 intervals and the convergence table, from their stages' summaries
    cell = {"mean": 50.0, "ci95": [47.5, 52.5], "seeds": 3}
    diff = {"difference": -1.25, "ci95": [-3.0, 0.5], "p_bootstrap": 0.2, "p_sign_flip": 0.25}
    record["stages"]["table1/intervals"] = {"status": "done", "seeds": [0, 1, 2], "replicates": 2000,
                                            "cells": {"voco": {"open": cell}}, "htc_minus_voco": {"open": diff}}
    curve = {"steps": [100, 200, 300], "val_loss": [0.6, 0.5, 0.499], "final_step": 300, "flat": True,
             "relative_gain_last_window": 0.002, "window": 0.2, "tolerance": 0.01}
    record["stages"]["train/voco-b1"] = {"status": "done", "val_curve": curve}
    record["stages"]["train/htc-b1"] = {"status": "done", "val_curve": curve | {"flat": False, "final_step": 3000}}
    text, results = render(tmp_path, record)
    assert "| VoCo-LLaMA | 50.0 [47.5, 52.5] |" in text
    assert "| open | -1.25 | [-3.00, +0.50] | 0.200 | 0.25 |" in text
    assert "HTC's runs trained 3000 steps and VoCo's 300. Their difference may be where the early stop fired" in text
    record["stages"]["train/htc-b1"]["val_curve"]["final_step"] = 300
    assert "HTC's runs trained 300 steps and VoCo's 300: equal training." in render(tmp_path, record)[0]
    record["stages"]["train/htc-b1"]["val_curve"]["final_step"] = 3000
    assert "| voco-b1 | 300 | 300 | 0.4990 | 0.20% | yes |  |" in text and "Not flat (stopped by the step cap): htc-b1" in text
    falling = {"steps": list(range(100, 1100, 100)), "val_loss": [1.0 - 0.0001 * s for s in range(100, 1100, 100)]}
    record["stages"]["train/qformer-b1"] = {"status": "done", "val_curve": curve | falling | {"final_step": 1000}}
    text, _ = render(tmp_path, record)
    assert "| qformer-b1 | 1000 | 1000 | 0.9000 | 0.20% | yes | +2.2% ± 0.0 |" in text
    assert "Still falling by the trend (more than 1% by two standard errors): qformer-b1." in text
    assert "stops once the best loss of the last 20% of its steps improved by less than 1%" in text  # an old record
    record["preset"] |= {"compress_early_stop": False, "compress_max_steps": 3000}  # every run to the same step
    text, _ = render(tmp_path, record)
    assert "Each run trains 3000 steps, evaluating its loss" in text and "stops once" not in text
    assert "**Not flat: htc-b1.**" in text and "lowest validation loss" not in text
    record["preset"]["compress_keep_best"] = True  # each run keeps its best checkpoint: the table says which
    record["stages"]["train/voco-b1"]["val_curve"]["kept_step"] = 200
    text, _ = render(tmp_path, record)
    assert "Each run's model is the checkpoint of its lowest validation loss" in text
    assert "| voco-b1 | 300 | 200 | 0.4990 |" in text
    assert (tmp_path / "val_curves.png").exists()


def test_more_seeds_extend_a_run_and_refresh_the_intervals(tmp_path, monkeypatch):
    """--seeds adds Table 1 runs to an existing run folder (other settings still refused) and marks
    the per-seed summary stale, so it is computed again over every seed."""
    import htc_vlm.reproduce as rp

    p1, p3 = rp.get_preset("tiny", False, seeds=1), rp.get_preset("tiny", False, seeds=3)
    keys = lambda p: {e.key for e in rp.experiments(p) if "table1" in e.groups}  # noqa: E731
    assert keys(p1) == {f"{m}-b1" for m in rp.table1_methods()}
    assert keys(p3) == keys(p1) | {f"{m}-b1-s{s}" for m in rp.table1_methods() for s in (1, 2)}
    assert main(["reproduce", "--seeds", "0", "--out", str(tmp_path / "x")]) == 2

    calls = []

    def per_seed(root, preset):
        calls.append(list(preset.seeds))
        return {"outputs": "ok", "command": "true", "seeds": list(preset.seeds)}

    monkeypatch.setattr(rp, "stages", lambda p: [rp.Stage("table1/intervals", per_seed, "intervals", "table1",
                                                          per_seeds=True)])
    out = tmp_path / "run"
    assert main(["reproduce", "--quick", "--out", str(out)]) == 0
    assert main(["reproduce", "--quick", "--out", str(out)]) == 0  # same seeds: done already
    assert main(["reproduce", "--quick", "--seeds", "2", "--out", str(out)]) == 0  # more seeds: computed again
    assert calls == [[0], [0, 1]]
    assert json.loads((out / "run.json").read_text())["preset"]["seeds"] == [0, 1]


def test_pooled_stages_run_side_by_side_after_their_needs_and_a_failure_stops_the_run(tmp_path, monkeypatch, capsys):
    """--jobs 2: pooled stages run two at a time, each after the stages it needs; the unpooled one runs
    alone. A failing worker stage is recorded, the others finish, and the run resumes from there."""
    import contextlib
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import htc_vlm.reproduce as rp

    spans, lock, fail = {}, threading.Lock(), {"c": True}

    def work(name):
        def run(root, preset):
            t0 = time.perf_counter()
            time.sleep(0.3)
            with lock:
                spans[name] = (t0, time.perf_counter())
            if fail.get(name):
                raise RuntimeError(f"{name} broke")
            return {"outputs": name, "command": "true"}
        return run

    todo = [rp.Stage("a", work("a"), "base"),
            *(rp.Stage(n, work(n), n, needs=("a",), pooled=True) for n in ("b1", "b2", "b3")),
            rp.Stage("c", work("c"), "c", needs=("b1", "b2"), pooled=True)]
    monkeypatch.setattr(rp, "stages", lambda p: todo)
    monkeypatch.setattr(rp, "_make_pool", lambda jobs, threads: ThreadPoolExecutor(jobs))
    monkeypatch.setattr(rp, "_output_to", lambda log: contextlib.nullcontext())
    out = tmp_path / "run"
    assert main(["reproduce", "--quick", "--out", str(out), "--jobs", "2"]) == 2  # c fails: a clear error
    stages = json.loads((out / "run.json").read_text())["stages"]
    assert {n: s["status"] for n, s in stages.items()} == {"a": "done", "b1": "done", "b2": "done", "b3": "done",
                                                           "c": "failed"}
    assert "RuntimeError: c broke" in stages["c"]["error"]
    assert f"(log: {out / 'logs' / 'c.log'})" in capsys.readouterr().err  # the error names the worker's log
    starts = sorted((t0, n) for n, (t0, _) in spans.items())
    assert starts[0][1] == "a" and all(spans["a"][1] <= spans[n][0] for n in ("b1", "b2", "b3"))
    for t, _ in starts:  # never more than two at once
        assert sum(s <= t < e for s, e in spans.values()) <= 2
    assert spans["b1"][0] < spans["b2"][1] and spans["b2"][0] < spans["b1"][1]  # side by side
    assert spans["c"][0] >= max(spans["b1"][1], spans["b2"][1])
    fail["c"] = False
    spans.clear()
    assert main(["reproduce", "--quick", "--out", str(out), "--jobs", "2"]) == 0
    assert set(spans) == {"c"}  # only the failed stage ran again
    record = json.loads((out / "run.json").read_text())
    assert [c["jobs"] for c in record["calls"]] == [2, 2] and all(c["wall_s"] > 0.25 for c in record["calls"])
    assert record["stages"]["b1"]["threads"] >= 1 and "over 2 call(s) of `htc-vlm reproduce` (--jobs 2)" in (out / "report.md").read_text()
    # each call records its machine; the report names it, and says so when the calls' machines differ
    import torch

    from htc_vlm.machine import describe

    here = describe()
    assert all(c["machine"] == here for c in record["calls"])
    assert here["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and here["packages"]["torch"]
    report = (out / "report.md").read_text()
    assert f"Machine: {here['cpu']} ({here['cpu_capability']})" in report and "Machines differ" not in report
    from htc_vlm.reproduce import write_report

    record["calls"][1]["machine"] = here | {"cores": 64}  # another core count alone rounds nothing differently
    write_report(out, record)
    assert "Machine: " in (report := (out / "report.md").read_text()) and "Machines differ" not in report
    record["calls"][0]["machine"] = here | {"cpu_capability": "AVX512"}  # resumed on another kind of CPU
    write_report(out, record)
    report = (out / "report.md").read_text()
    assert "**Machines differ between the calls of this run**" in report
    assert f"- call 1: {here['cpu']} (AVX512)" in report and f"- call 2: {here['cpu']} ({here['cpu_capability']}), 64 cores" in report
    assert main(["reproduce", "--quick", "--out", str(out), "--jobs", "0"]) == 2


def test_a_worker_output_goes_to_its_log_and_the_terminal_comes_back(tmp_path):
    """In a fresh interpreter, as in a spawned worker: Python and C-level output (fds 1 and 2) go to
    the log inside the block, and to the terminal again after it."""
    import subprocess
    import sys

    log = tmp_path / "logs" / "w.log"
    script = ("import os, sys\nfrom pathlib import Path\nfrom htc_vlm.reproduce import _output_to\n"
              f"with _output_to(Path({str(log)!r})):\n"
              "    print('from python')\n    print('to stderr', file=sys.stderr)\n    os.write(1, b'from C\\n')\n"
              "print('back')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert sorted(log.read_text().splitlines()) == ["from C", "from python", "to stderr"]
    assert done.stdout == "back\n" and done.stderr == ""


def test_a_broken_run_record_is_one_clear_error(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for text in ("{not json", "[1, 2]", '{"preset": {}}', "\xff\xfe"):
        (out / "run.json").write_bytes(text.encode("latin-1"))
        assert main(["reproduce", "--quick", "--out", str(out), "--only", "scenes"]) == 2
        assert "is not a run record" in capsys.readouterr().err


def test_a_dead_worker_fails_its_stage_with_the_reason(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    import htc_vlm.reproduce as rp

    def ok(root, preset):
        return {"outputs": "ok", "command": "true"}

    def died(*args):
        raise BrokenProcessPool("a child process terminated abruptly")

    monkeypatch.setattr(rp, "stages", lambda p: [rp.Stage("a", ok, "base"),
                                                 rp.Stage("w", ok, "pooled", needs=("a",), pooled=True)])
    monkeypatch.setattr(rp, "_make_pool", lambda jobs, threads: ThreadPoolExecutor(jobs))
    monkeypatch.setattr(rp, "_pooled_stage", died)
    out = tmp_path / "run"
    assert main(["reproduce", "--quick", "--out", str(out), "--jobs", "2"]) == 2
    stages = json.loads((out / "run.json").read_text())["stages"]
    assert stages["a"]["status"] == "done" and stages["w"]["status"] == "failed"
    assert "the worker process died: BrokenProcessPool" in stages["w"]["error"]


def test_a_compression_stage_asks_for_a_converged_run(tmp_path, monkeypatch):
    """train/<key> passes the convergence settings of the preset to the compress stage and returns
    the run's validation curve (no training here: _train is replaced); with lookups it trains and
    validates on the scenes' conversations without them."""
    import htc_vlm.reproduce as rp

    seen = {}

    def fake_train(root, stage, out, *extra, method=None, budget=1):
        seen.update(stage=stage, out=out, extra=extra, method=method)
        (tmp_path / "model").mkdir(exist_ok=True)
        (tmp_path / "model" / "val_curve.json").write_text('{"steps": [100], "val_loss": [0.5]}')
        return {"outputs": str(tmp_path / "model"), "command": "c"}

    monkeypatch.setattr(rp, "_train", fake_train)
    p = rp.get_preset("tiny", False, mc_form="letter", lookups=0, letter_epochs=0)  # no lookups: one file
    e = next(x for x in rp.experiments(p) if x.key == "htc-b1-s1")
    summary = rp._train_experiment(e)(tmp_path, p)
    assert seen["stage"] == "compress" and seen["method"] == "htc" and seen["out"] == "runs/htc-b1-s1"
    # the tiny preset trains every run the same number of steps; a run folder from before stopped early
    assert {"optim.max_steps=3000", "optim.seed=1"} <= set(seen["extra"]) and p.compress_max_steps == 3000
    assert not any(x.startswith(("optim.stop_when_flat", "optim.min_steps", "optim.keep_best")) for x in seen["extra"])
    longer = rp.get_preset("tiny", False, mc_form="letter", lookups=0, letter_epochs=0, compress_steps=7500,
                           keep_best=True)  # --compress-steps 7500 --keep-best
    rp._train_experiment(e)(tmp_path, longer)
    assert {"optim.max_steps=7500", "optim.keep_best=true"} <= set(seen["extra"])
    with pytest.raises(HTCError, match="--compress-steps must be at least 1"):
        rp.get_preset("tiny", False, compress_steps=0)
    older = rp.recorded_preset({k: v for k, v in rp.asdict(p).items() if k != "compress_early_stop"})
    rp._train_experiment(e)(tmp_path, older)
    for want in ("optim.stop_when_flat=0.01", f"optim.min_steps={p.compress_min_steps}",
                 f"optim.max_steps={p.compress_max_steps}", "optim.seed=1"):
        assert want in seen["extra"]
    assert summary["val_curve"]["val_loss"] == [0.5]
    sc = tmp_path / "scenes"
    assert {f"data.conversations={sc / 'train' / 'conversations.json'}",
            f"data.val_conversations={sc / 'val' / 'conversations.json'}"} <= set(seen["extra"])
    # with lookups the base's instruct stage trains on them, compression runs on the rest
    from htc_vlm.data.scenes import WITHOUT_LOOKUPS

    p = rp.get_preset("tiny", False, mc_form="content-letter", lookups=8, letter_epochs=0)
    rp._train_experiment(e)(tmp_path, p)
    assert {f"data.conversations={sc / 'train' / WITHOUT_LOOKUPS}",
            f"data.val_conversations={sc / 'val' / WITHOUT_LOOKUPS}"} <= set(seen["extra"])
    rp._stage_instruct(0)(tmp_path, p)
    assert f"data.conversations={sc / 'train' / 'conversations.json'}" in seen["extra"]
    # align trains on the captions, and with --text-lookups on the text-only lookups after them too
    from htc_vlm.data.scenes import ALIGN_LOOKUPS

    for text_lookups, file in ((0, "captions.json"), (4, ALIGN_LOOKUPS)):
        for s in (0, 1):
            rp._stage_align(s)(tmp_path, rp.get_preset("tiny", False, text_lookups=text_lookups))
            assert seen["stage"] == "align" and seen["out"] == ("align" if s == 0 else "bases/s1/align")
            assert f"data.conversations={sc / 'train' / file}" in seen["extra"]


def test_instruct_epochs_reach_every_base_and_belong_to_the_run_folder(tmp_path, monkeypatch, capsys):
    """--instruct-epochs is passed to the instruct stage of every base and --align-epochs to its align
    stage (no training: _train is replaced); each is part of the folder's preset and must be positive."""
    import htc_vlm.reproduce as rp

    seen = []
    monkeypatch.setattr(rp, "_train", lambda root, stage, out, *extra, **kw: seen.append((out, extra)) or {})
    for stage, run_stage, default in (("instruct", rp._stage_instruct, 12), ("align", rp._stage_align, 24)):
        seen.clear()
        p = rp.get_preset("tiny", False, **{f"{stage}_epochs": 12})
        for s in p.seeds:
            run_stage(s)(tmp_path, p)
        assert [out for out, _ in seen] == [stage, f"bases/s1/{stage}", f"bases/s2/{stage}"]
        assert all("optim.num_train_epochs=12" in extra for _, extra in seen)
        assert getattr(rp.get_preset("tiny", False), f"{stage}_epochs") == default
        out, flag = tmp_path / stage, f"--{stage}-epochs"
        assert main(["reproduce", "--quick", "--out", str(out), "--only", "scenes", flag, "2"]) == 0
        assert json.loads((out / "run.json").read_text())["preset"][f"{stage}_epochs"] == 2
        assert main(["reproduce", "--quick", "--out", str(out), "--only", "scenes"]) == 2  # another preset
        assert main(["reproduce", "--quick", "--out", str(tmp_path / "x"), flag, "0"]) == 2
        assert f"{flag} must be positive" in capsys.readouterr().err


def test_letter_epochs_give_every_base_a_first_instruct_stage_on_letter_answers(tmp_path, monkeypatch, capsys):
    """--letter-epochs E: each base trains instruct-letter (E epochs from align on the letter-form
    conversations), then instruct from it on the run's own; without it instruct starts from align.
    It needs another MC form or lookups, is not negative, and belongs to the run folder."""
    import htc_vlm.reproduce as rp
    from htc_vlm.data.scenes import LETTER_FORM

    seen = {}
    monkeypatch.setattr(rp, "_train", lambda root, stage, out, *extra, **kw: seen.update({out: extra}) or {})
    p = rp.get_preset("tiny", False, mc_form="content-letter", lookups=8, letter_epochs=5, replay_verification=False)
    by_name = {st.name: st for st in rp.stages(p)}
    for s, base in ((0, ""), (1, "bases/s1/"), (2, "bases/s2/")):
        assert by_name[f"{base}instruct-letter"].needs == (f"{base}align",)
        assert by_name[f"{base}instruct"].needs == (f"{base}instruct-letter",)
        rp._stage_instruct(s, "instruct-letter")(tmp_path, p)
        rp._stage_instruct(s)(tmp_path, p)
        sc, b = tmp_path / "scenes" / "train", tmp_path / base
        assert {"optim.num_train_epochs=5", f"model.init={b / 'align' / 'model'}",
                f"data.conversations={sc / LETTER_FORM}", f"optim.seed={s}"} <= set(seen[f"{base}instruct-letter"])
        assert {f"optim.num_train_epochs={p.instruct_epochs}", f"model.init={b / 'instruct-letter' / 'model'}",
                f"data.conversations={sc / 'conversations.json'}"} <= set(seen[f"{base}instruct"])
    names = [st.name for st in rp.stages(p)]
    assert names.index("align") < names.index("instruct-letter") < names.index("instruct")
    one = rp.get_preset("tiny", False, mc_form="content-letter", lookups=8, letter_epochs=0)
    assert "instruct-letter" not in {st.name for st in rp.stages(one)} and not one.replay_verification
    full, quick = rp.get_preset("tiny", False), rp.get_preset("tiny", True)  # the main job and CI: the same stages
    assert (full.letter_epochs, full.instruct_epochs, full.replay_verification) == (6, 12, True)
    assert [(st.name, st.conversations) for st in rp.instruct_stages(quick)] == [
        (st.name, st.conversations) for st in rp.instruct_stages(full)]
    rp._stage_instruct(0)(tmp_path, one)
    assert f"model.init={tmp_path / 'align' / 'model'}" in seen["instruct"]
    out = tmp_path / "run"
    assert main(["reproduce", "--quick", "--out", str(out), "--only", "scenes", "--lookups", "1",
                 "--letter-epochs", "1"]) == 0
    assert json.loads((out / "run.json").read_text())["preset"]["letter_epochs"] == 1
    assert (out / "scenes" / "train" / LETTER_FORM).exists()
    assert main(["reproduce", "--quick", "--out", str(out), "--only", "scenes", "--lookups", "1",
                 "--letter-epochs", "0"]) == 2
    assert "with other settings (letter_epochs 1.0 (now 0.0), replay_verification True (now False))" in capsys.readouterr().err
    assert main(["reproduce", "--quick", "--out", str(tmp_path / "x"), "--mc-form", "letter", "--lookups", "0",
                 "--letter-epochs", "2"]) == 2
    assert "--letter-epochs needs --mc-form content-letter or --lookups" in capsys.readouterr().err
    assert main(["reproduce", "--quick", "--out", str(tmp_path / "x"), "--lookups", "1", "--letter-epochs", "-1"]) == 2
    assert "--letter-epochs must be 0" in capsys.readouterr().err


@pytest.mark.parametrize("mme_pairs", [1, 6])
def test_replay_stage_keeps_each_images_records_in_one_packed_item_for_every_mme_pairs(tmp_path, mme_pairs):
    """The replay stage's data.max_length is the room of one image's records (content-letter answers,
    8 lookups, the replayed POPE and MME questions) up to six MME pairs: at 640, three pairs split
    every image in two and doubled the stage's steps (docs/LOG.md, session 26)."""
    from transformers import AutoTokenizer

    import htc_vlm.reproduce as rp
    from htc_vlm.data.llava import LlavaDataset
    from htc_vlm.data.scenes import REPLAY_FORM, write_benchmark
    from htc_vlm.data.tokenizer import save_tokenizer
    from htc_vlm.presets import build_config

    write_benchmark(tmp_path, 40, 5, seed=0, image_size=48, n_val=5, mme_pairs=mme_pairs,
                    mc_form="content-letter", lookups=8)
    save_tokenizer(tmp_path / "tokenizer")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    args = (tmp_path / "train" / REPLAY_FORM, tmp_path / "images", tok, build_config("tiny", tok))
    packed = LlavaDataset(*args, max_length=rp.REPLAY_MAX_LENGTH, pack_by_image=True)
    assert len(packed) == 40  # one item per image
    longest = max(len(packed[i]["input_ids"]) for i in range(len(packed)))
    assert longest > 512  # the tiny preset's own limit would split them
    if mme_pairs > 1:
        assert len(LlavaDataset(*args, max_length=640, pack_by_image=True)) > 40  # the old limit did


def test_replay_verification_trains_the_second_stage_on_the_first_stages_pope_and_mme_questions_too(
        tmp_path, monkeypatch, capsys):
    """--replay-verification: every base's instruct stage (after instruct-letter) trains on the replay
    file with room for an image's records in one packed item; instruct-letter is unchanged. It needs
    --letter-epochs and belongs to the run folder; base_robustness.py plans the same stages."""
    import htc_vlm.reproduce as rp
    from htc_vlm.data.scenes import LETTER_FORM, REPLAY_FORM

    base_robustness = benchmark_script("base_robustness")
    seen = {}
    monkeypatch.setattr(rp, "_train", lambda root, stage, out, *extra, **kw: seen.update({out: extra}) or {})
    p = rp.get_preset("tiny", False, mc_form="content-letter", lookups=8, letter_epochs=6, replay_verification=True)
    plain = rp.get_preset("tiny", False, mc_form="content-letter", lookups=8, letter_epochs=6, replay_verification=False)
    assert [st.name for st in rp.stages(p)] == [st.name for st in rp.stages(plain)]
    sc = tmp_path / "scenes" / "train"
    for s, base in ((0, ""), (2, "bases/s2/")):
        for preset, tag in ((plain, "plain"), (p, "replay")):
            rp._stage_instruct(s, "instruct-letter")(tmp_path, preset)
            rp._stage_instruct(s)(tmp_path, preset)
            seen[f"{tag}/{base}"] = (seen[f"{base}instruct-letter"], seen[f"{base}instruct"])
        assert seen[f"replay/{base}"][0] == seen[f"plain/{base}"][0]  # the first stage as before
        assert f"data.conversations={sc / LETTER_FORM}" in seen[f"replay/{base}"][0]
        replayed, own = set(seen[f"replay/{base}"][1]), set(seen[f"plain/{base}"][1])
        assert replayed - own == {f"data.conversations={sc / REPLAY_FORM}", f"data.max_length={rp.REPLAY_MAX_LENGTH}"}
        assert own - replayed == {f"data.conversations={sc / 'conversations.json'}"}
    assert base_robustness.plan(json.loads(json.dumps(rp.asdict(p)))) == rp.instruct_stages(p)
    # a record written before these settings existed: their dataclass defaults, one instruct stage
    old = rp.instruct_stages(rp.get_preset("tiny", False, letter_epochs=0, instruct_epochs=6))
    assert base_robustness.plan({"name": "tiny", "instruct_epochs": 6}) == old and len(old) == 1
    out = tmp_path / "run"
    assert main(["reproduce", "--quick", "--out", str(out), "--only", "scenes", "--lookups", "1",
                 "--letter-epochs", "1", "--replay-verification"]) == 0
    assert json.loads((out / "run.json").read_text())["preset"]["replay_verification"] is True
    assert (out / "scenes" / "train" / REPLAY_FORM).exists()
    assert main(["reproduce", "--quick", "--out", str(out), "--only", "scenes", "--lookups", "1",
                 "--letter-epochs", "1", "--no-replay-verification"]) == 2
    assert "with other settings" in capsys.readouterr().err
    assert main(["reproduce", "--quick", "--out", str(tmp_path / "x"), "--lookups", "1", "--letter-epochs", "0",
                 "--replay-verification"]) == 2
    assert "--replay-verification needs --letter-epochs" in capsys.readouterr().err


def test_base_robustness_scores_the_bases_reproduce_trained_instead_of_training_them_again(tmp_path, monkeypatch):
    """A --seeds seed whose base the run trained (bases/sN, every stage done) is only scored; an
    unfinished one, a one-thread one and a run with one base for every seed are trained."""
    import htc_vlm.reproduce as rp

    br = benchmark_script("base_robustness")
    run = tmp_path / "run"
    p = rp.get_preset("tiny", False, mc_form="content-letter", lookups=8, letter_epochs=6)
    names = lambda s: [f"bases/s{s}/{n}" for n in ("align", "instruct-letter", "instruct")]  # noqa: E731
    stages = {n: {"status": "done", "seconds": 10.0} for s in (1, 2) for n in names(s)}
    stages |= {"scenes": {"status": "done"}, "vision": {"status": "done"}}
    stages["bases/s2/instruct"] = {"status": "failed"}
    record = {"preset": json.loads(json.dumps(rp.asdict(p))), "stages": stages}
    assert br.run_base(run, record, 1) == (run / "bases/s1", 30.0)
    assert br.run_base(run, record, 2) is None and br.run_base(run, record, 0) is None
    one = json.loads(json.dumps(rp.asdict(rp.get_preset("tiny", False, base_per_seed=False))))
    assert br.run_base(run, {"preset": one, "stages": {"align": {"status": "done", "seconds": 1.0}}}, 1) is None

    run.mkdir()
    (run / "run.json").write_text(json.dumps(record))
    trained, scored = [], []
    monkeypatch.setattr(br, "_run", lambda cmd, log, threads: trained.append((log.parent.name, log.stem, threads)))
    monkeypatch.setattr(br, "evaluate_families", lambda root, key, model, method, budget, fams, split, out:
                        scored.append((model, split, out)) or {"scores": {f: 1.0 for f in fams}})
    br.main([str(run), "--seeds", "1", "2", "--one-thread-seed", "1"])
    assert trained == [(c, st, t) for c, t in (("seed2", None), ("seed1-1thread", 1))
                       for st in ("align", "instruct-letter", "instruct")]
    out = run / "robustness"
    assert scored[:2] == [(run / "bases/s1/instruct/model", split, out / "seed1" / f"eval-{split}")
                          for split in ("val", "test")]
    assert [m for m, _, _ in scored[2:]] == [out / c / "instruct" / "model" for c in ("seed2", "seed2", "seed1-1thread",
                                                                                      "seed1-1thread")]
    rows = json.loads((out / "table.json").read_text())
    assert [(r["seed"], r["threads"], r["train_seconds"]) for r in rows][0] == (1, "run's own", 30.0)
    assert [r["threads"] for r in rows[1:]] == [os.cpu_count(), 1] and rows[0]["val_mc"] == 1.0


def test_base_per_seed_gives_each_table1_seed_its_own_base_and_bounds(tmp_path, monkeypatch):
    """--base-per-seed: seed s > 0 trains align + instruct with seed s into bases/s<s>, compresses from
    that base, and its bounds are evaluated and pooled into the intervals; without it one base serves all."""
    import htc_vlm.reproduce as rp

    plain = {"letter_epochs": 0}  # one instruct stage per base
    one, per = rp.get_preset("tiny", False, base_per_seed=False, **plain), rp.get_preset("tiny", False, **plain)
    assert per.base_per_seed and not rp.get_preset("tiny", True).base_per_seed  # the main job's default; --quick's one seed
    by_name = lambda p: {s.name: s for s in rp.stages(p)}  # noqa: E731
    assert not any(n.startswith("bases/") or n.startswith("eval/upper-") for n in by_name(one))
    assert by_name(one)["train/voco-b1-s1"].needs == ("instruct", "features")
    stages = by_name(per)
    for s in (1, 2):
        assert stages[f"bases/s{s}/align"].needs == ("vision",)
        assert stages[f"bases/s{s}/instruct"].needs == (f"bases/s{s}/align",)
        assert stages[f"eval/upper-s{s}"].needs == stages[f"eval/lower-s{s}"].needs == (f"bases/s{s}/instruct",)
        assert stages[f"train/htc-b1-s{s}"].needs == (f"bases/s{s}/instruct", "features")
        assert {f"eval/upper-s{s}", f"eval/lower-s{s}"} <= set(stages["table1/intervals"].needs)
    assert stages["train/htc-b1"].needs == ("instruct", "features")  # seed 0 keeps the main base
    assert rp.bound_keys(per, "upper") == ["upper", "upper-s1", "upper-s2"] and rp.bound_keys(one, "lower") == ["lower"]

    seen = []

    def fake_train(root, stage, out, *extra, method=None, budget=1):
        seen.append((stage, out, extra))
        model = tmp_path / out / "model"
        model.mkdir(parents=True, exist_ok=True)
        (model / "val_curve.json").write_text('{"steps": [100], "val_loss": [0.5]}')
        return {"outputs": str(model), "command": "c"}

    monkeypatch.setattr(rp, "_train", fake_train)
    stages["bases/s2/align"].run(tmp_path, per)
    stages["bases/s2/instruct"].run(tmp_path, per)
    stages["train/voco-b1-s2"].run(tmp_path, per)
    stages["align"].run(tmp_path, per)
    (align, a_out, a_extra), (instruct, i_out, i_extra), (_, c_out, c_extra), (_, main_out, main_extra) = seen
    assert (align, a_out, instruct, i_out) == ("align", "bases/s2/align", "instruct", "bases/s2/instruct")
    assert "optim.seed=2" in a_extra and "optim.seed=2" in i_extra and "optim.seed=0" in main_extra
    assert f"model.init={tmp_path / 'bases/s2/align/model'}" in i_extra
    assert c_out == "runs/voco-b1-s2" and f"model.init={tmp_path / 'bases/s2/instruct/model'}" in c_extra
    assert main_out == "align"
    evaluated = []
    monkeypatch.setattr(rp, "evaluate_families", lambda root, key, model_dir, method, budget, fams, split="test":
                        evaluated.append((key, model_dir, method)) or {})
    for name in ("eval/upper-s1", "eval/lower-s2", "eval/upper"):
        stages[name].run(tmp_path, per)
    assert evaluated == [("upper-s1", tmp_path / "bases/s1/instruct/model", "upper"),
                         ("lower-s2", tmp_path / "bases/s2/instruct/model", "lower"),
                         ("upper", tmp_path / "instruct/model", "upper")]

    # a run folder written before this setting existed resumes (the setting takes its default)
    out = tmp_path / "old"
    monkeypatch.setattr(rp, "stages", lambda p: [rp.Stage("s", lambda r, p: {"outputs": "", "command": ""}, "s")])
    assert main(["reproduce", "--quick", "--out", str(out)]) == 0
    record = json.loads((out / "run.json").read_text())
    del record["preset"]["base_per_seed"]
    (out / "run.json").write_text(json.dumps(record))
    assert main(["reproduce", "--quick", "--out", str(out)]) == 0
    assert main(["reproduce", "--quick", "--base-per-seed", "--out", str(out)]) == 2  # another setting: refused
    # a tiny folder of the recipe before session 30 (its record lacks the fields added since) resumes with that
    # recipe's flags (docs/results.md) and is refused with the current one's
    old, flags = tmp_path / "before-30", ["--mc-form", "letter", "--lookups", "0", "--letter-epochs", "0",
                                          "--mme-pairs", "1", "--align-epochs", "8", "--instruct-epochs", "6"]
    assert main(["reproduce", "--out", str(old), *flags]) == 0
    record = json.loads((old / "run.json").read_text())
    for newer in ("letter_epochs", "replay_verification", "align_epochs", "text_lookups"):
        del record["preset"][newer]
    (old / "run.json").write_text(json.dumps(record))
    assert main(["reproduce", "--out", str(old), *flags]) == 0
    assert main(["reproduce", "--out", str(old)]) == 2


def test_an_inline_stage_writes_its_output_to_its_log_not_the_terminal(tmp_path, monkeypatch, capfd):
    """A base stage runs in the scheduler's process: what it prints (the Trainer's dictionaries and
    progress bars, Python or C level) goes to logs/<stage>.log; the terminal gets its start line with
    the log's path and its 'done' line."""
    import os

    import htc_vlm.reproduce as rp

    def noisy(root, preset):
        print("{'loss': 0.5}")
        os.write(2, b"progress 10/10\n")
        return {"outputs": "", "command": ""}

    monkeypatch.setattr(rp, "stages", lambda p: [rp.Stage("base/noisy", noisy, "a noisy stage")])
    out = tmp_path / "run"
    assert main(["reproduce", "--quick", "--out", str(out), "--jobs", "1"]) == 0
    got = capfd.readouterr()
    term = got.out + got.err
    assert "loss" not in term and "progress 10/10" not in term
    assert sorted((out / "logs" / "base_noisy.log").read_text().splitlines()) == ["progress 10/10", "{'loss': 0.5}"]
    assert "logs/base_noisy.log" in term and "base/noisy: done in" in term


def test_a_terminal_gets_a_live_display_fed_by_the_stages_progress_files(tmp_path, monkeypatch):
    """On a terminal, `reproduce` draws the stages done / running / left and a bar per running stage
    from the progress file each stage writes (here a stage reporting half its steps, with a loss),
    while the stage's own output still goes to its log; off a terminal nothing is drawn."""
    import os

    from rich.console import Console
    from rich.text import Text

    import htc_vlm.reproduce as rp
    from htc_vlm.progress import ENV, report

    seen = {}

    def stage(root, preset):
        report(5, 10, force=True, loss=0.25)
        seen["progress"] = json.loads(open(os.environ[ENV]).read())
        seen["rows"] = live_rows()
        print("the stage's own output")
        time.sleep(1.2)  # the display refreshes twice a second, from another thread, onto the terminal
        return {"outputs": "", "command": ""}

    monkeypatch.setattr(rp, "stages", lambda p: [rp.Stage("base/half", stage, "a stage at half way")])
    monkeypatch.delenv(ENV, raising=False)  # (tests that run pooled stages on threads may leave it set)
    made = {}
    real = rp._live_console

    def spy(console, live):
        made["live"] = live
        return real(console, live)

    monkeypatch.setattr(rp, "_live_console", spy)
    live_rows = lambda: made["live"].rows()  # noqa: E731
    screen = tmp_path / "screen"
    with open(screen, "w") as f:
        rp.run(tmp_path / "run", quick=True, console=Console(file=f, force_terminal=True, width=120))
    assert seen["progress"]["done"] == 5 and seen["progress"]["total"] == 10 and seen["progress"]["loss"] == 0.25
    (name, frac, text), = seen["rows"]
    assert name == "base/half" and frac == 0.5 and text.startswith("5/10, loss 0.250, ") and text.endswith("min left")
    drawn = screen.read_text()
    assert "base/half: done in" in drawn and "the stage's own output" not in drawn
    assert "5/10, loss 0.250" in drawn and "1 running" in Text.from_ansi(drawn).plain  # drawn while the stage ran
    assert "the stage's own output" in (tmp_path / "run" / "logs" / "base_half.log").read_text()
    assert ENV not in os.environ  # restored after the stage
    assert rp._live_console(Console(file=open(os.devnull, "w")), made["live"])[1] is None  # not a terminal


def test_the_trainer_callback_reports_steps_and_the_last_loss_only_when_asked(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from htc_vlm.progress import ENV, ProgressCallback, read

    cb, path = ProgressCallback(), tmp_path / "p.json"
    state = SimpleNamespace(global_step=20, max_steps=20, is_world_process_zero=True)
    cb.on_log(None, state, None, logs={"loss": 0.75, "learning_rate": 1e-3})
    monkeypatch.delenv(ENV, raising=False)
    cb.on_step_end(None, state, None)
    assert not path.exists()  # no variable: nothing written
    monkeypatch.setenv(ENV, str(path))
    cb.on_step_end(None, state, None)
    p = read(path)
    assert (p["done"], p["total"], p["loss"]) == (20, 20, 0.75)


def test_the_provenance_commands_of_the_first_stages_reproduce_their_outputs(tmp_path):
    """The command a stage records (the report's provenance table) is the stage: run through the
    CLI into another folder, it writes the same scenes, tokenizer weights and features. With
    --mc-form the scenes' MC answers take that form, and the folder resumes only with it."""
    import shlex

    from safetensors.torch import load_file

    out = tmp_path / "run"
    assert main(["reproduce", "--quick", "--out", str(out), "--only", "scenes", "--only", "tokenizer",
                 "--only", "features", "--mc-form", "content-letter", "--lookups", "2", "--mme-pairs", "3",
                 "--text-lookups", "2"]) == 0
    meta = json.loads((out / "scenes" / "meta.json").read_text())
    assert (meta["mc_form"], meta["mme_pairs"]) == ("content-letter", 3)
    assert main(["reproduce", "--quick", "--out", str(out), "--only", "scenes"]) == 2  # the default form
    assert main(["reproduce", "--quick", "--out", str(tmp_path / "x"), "--mc-form", "words"]) == 2
    assert main(["reproduce", "--quick", "--out", str(tmp_path / "x"), "--lookups", "33"]) == 2
    assert main(["reproduce", "--quick", "--out", str(tmp_path / "x"), "--text-lookups", "-1"]) == 2
    assert main(["reproduce", "--quick", "--out", str(tmp_path / "x"), "--mme-pairs", "7"]) == 2
    stages = json.loads((out / "run.json").read_text())["stages"]
    assert "--mme-pairs 3 --mc-form content-letter --lookups 2 --text-lookups 2" in stages["scenes"]["command"]
    again = tmp_path / "again"
    for name in ("scenes", "tokenizer", "features"):
        args = shlex.split(stages[name]["command"].replace(str(out), str(again)))
        assert args[0] == "htc-vlm" and main(args[1:]) == 0, stages[name]["command"]
    files = lambda root: sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())  # noqa: E731
    assert files(out / "scenes") == files(again / "scenes")
    assert all((out / "scenes" / f).read_bytes() == (again / "scenes" / f).read_bytes() for f in files(out / "scenes"))
    a, b = (load_file(r / "vq" / "tokenizer" / "model.safetensors") for r in (out, again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = (load_file(r / "features.safetensors") for r in (out, again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_base_robustness_jobs_trains_one_thread_bases_side_by_side_and_stops_on_a_failure(tmp_path, monkeypatch):
    """--jobs 2: the unfinished one-thread configurations run two at a time, each as this script with one
    seed; their results make the table as if run one after another. A failed one stops the others."""
    import subprocess

    import htc_vlm.reproduce as rp

    br = benchmark_script("base_robustness")
    run, out = tmp_path / "run", tmp_path / "run" / "robustness"
    p = rp.get_preset("tiny", False, mc_form="content-letter", lookups=8, letter_epochs=6)
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"preset": json.loads(json.dumps(rp.asdict(p))),
                                              "stages": {"scenes": {"status": "done"}, "vision": {"status": "done"}}}))
    result = lambda seed: {"seed": seed, "threads": 1, "train_seconds": 1.0,  # noqa: E731
                           **{f"{sp}_{f}": float(seed) for sp in ("val", "test") for f in rp.FAMILY_BENCHMARKS}}
    (out / "seed3-1thread").mkdir(parents=True)
    (out / "seed3-1thread" / "result.json").write_text(json.dumps(result(3)))
    alive, started, stopped = set(), [], []

    class Child:  # a child script: done on its second poll, seed 4 failing
        def __init__(self, cmd, stdout, stderr, env=None, start_new_session=False):
            self.seed, self.polls, self.returncode = int(cmd[cmd.index("--one-thread-seed") + 1]), 0, None
            self.pid = self.seed  # what the group kill is given
            assert cmd[1] == br.__file__ and cmd[cmd.index("--out") + 1] == str(out) and cmd[3:5] == ["--seeds", "--one-thread-seed"]
            started.append((self.seed, sorted(alive)))
            alive.add(self.seed)

        def poll(self):
            self.polls += 1
            if self.polls < 2:
                return None
            self.returncode = int(self.seed == 4)
            if not self.returncode:
                (out / f"seed{self.seed}-1thread").mkdir(exist_ok=True)
                (out / f"seed{self.seed}-1thread" / "result.json").write_text(json.dumps(result(self.seed)))
            alive.discard(self.seed)
            return self.returncode

    monkeypatch.setattr(subprocess, "Popen", Child)
    monkeypatch.setattr(os, "killpg", lambda pid, sig: stopped.append(pid))
    monkeypatch.setattr(br.time, "sleep", lambda s: None)
    monkeypatch.setattr(br, "_run", lambda *a: pytest.fail("a finished configuration was trained again"))
    monkeypatch.setattr(br, "evaluate_families", lambda *a, **k: pytest.fail("a finished configuration was scored again"))
    br.main([str(run), "--seeds", "--one-thread-seed", "1", "2", "3", "--jobs", "2"])
    assert started == [(1, []), (2, [1])]  # two at a time; seed 3 was finished
    assert [(r["seed"], r["val_mc"]) for r in json.loads((out / "table.json").read_text())] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    with pytest.raises(SystemExit, match="seed4-1thread failed"):
        br.main([str(run), "--seeds", "--one-thread-seed", "4", "5", "--jobs", "2"])
    assert stopped == [5]
    with pytest.raises(SystemExit, match="--jobs must be at least 1"):
        br.main([str(run), "--jobs", "0"])


def test_equal_steps_retrains_table1_runs_to_the_same_length_and_compares_them_paired(tmp_path, monkeypatch, tiny_run):
    """benchmarks/equal_steps.py: each Table 1 run of the methods is trained again from its seed's base
    with reproduce's command minus the early stop, for exactly --steps steps; a run already that long is
    scored as it is; the paired difference reads the predictions it wrote on both splits."""
    import htc_vlm.reproduce as rp

    es = benchmark_script("equal_steps")
    run = tmp_path / "run"
    run.mkdir()
    (run / "scenes").symlink_to(tiny_run / "scenes")
    p = rp.get_preset("tiny", False, seeds=2)
    keys = ["htc-b1", "htc-b1-s1", "voco-b1", "voco-b1-s1"]
    record = {"preset": json.loads(json.dumps(rp.asdict(p))), "stages": {f"train/{k}": {"status": "done"} for k in keys}}
    (run / "run.json").write_text(json.dumps(record))
    for k in keys:  # voco-b1 hit the cap: it is already 3,000 steps long
        (run / "runs" / k / "model").mkdir(parents=True)
        (run / "runs" / k / "model" / "val_curve.json").write_text(
            json.dumps({"final_step": 3000 if k == "voco-b1" else 1500, "val_loss": [0.5, 0.4]}))
    jobs = es.runs(run, record, ["htc", "voco"], 3000)
    assert [(j["key"], j["seed"], j["own"]) for j in jobs] == [("htc-b1", 0, False), ("htc-b1-s1", 1, False),
                                                               ("voco-b1", 0, True), ("voco-b1-s1", 1, False)]
    assert jobs[1]["init"] == run / "bases/s1/instruct/model" and jobs[0]["init"] == run / "instruct/model"
    trained = []

    def fake_train(cmd, stdout, stderr):
        trained.append(cmd)
        out = Path(next(c for c in cmd if c.startswith("output_dir=")).split("=", 1)[1])
        (out / "model").mkdir(parents=True)
        (out / "model" / "val_curve.json").write_text(json.dumps({"final_step": 3000, "val_loss": [0.5, 0.3]}))
        return subprocess.CompletedProcess(cmd, 0)

    def fake_eval(root, key, model, method, budget, fams, split, out):  # HTC answers right, VoCo wrongly
        for f in fams:
            rows = rp.predictions(root, out, f, split)[1]
            (out / f).mkdir(parents=True)
            (out / f / "predictions.jsonl").write_text("".join(json.dumps(
                {"benchmark": rp.FAMILY_BENCHMARKS[f], "question_id": r["question_id"],
                 "prediction": r["answer"] if key.startswith("htc") else "zzz"}) + "\n" for r in rows))
        return {"scores": {f: 1.0 for f in fams}}

    workers = []

    def fake_side_by_side(todo, n, env, say):  # each worker's command, run in this process
        workers.extend((name, env["OMP_NUM_THREADS"]) for name, _, _ in todo)
        for _, cmd, _ in todo:
            assert cmd[:2] == [sys.executable, es.__file__]
            es.main(cmd[2:])

    monkeypatch.setattr(es.subprocess, "run", fake_train)
    monkeypatch.setattr(es, "evaluate_families", fake_eval)
    monkeypatch.setattr(es.processes, "side_by_side", fake_side_by_side)
    es.main([str(run), "--steps", "3000", "--methods", "voco", "htc", "--jobs", "2"])
    assert workers == [(k, "1") for k in ("voco-b1", "voco-b1-s1", "htc-b1", "htc-b1-s1")]
    assert len(trained) == 3  # voco-b1 is the run's own
    cmd = next(c for c in trained if f"output_dir={run / 'equal-steps' / 'htc-b1-s1'}" in c)
    assert cmd[:8] == ["htc-vlm", "train", "--config", "tiny", "--method", "htc", "--budget", "1"]
    assert {f"model.init={run / 'bases/s1/instruct/model'}", "optim.max_steps=3000", "optim.seed=1"} <= set(cmd)
    assert not any(c.startswith(("optim.stop_when_flat", "optim.min_steps")) for c in cmd)
    own = json.loads((run / "equal-steps" / "voco-b1" / "result.json").read_text())
    assert own["model"] == str(run / "runs/voco-b1/model") and not own["trained"] and own["steps"] == 3000
    assert [j["key"] for j in es.runs(run, record, ["htc", "voco"], 3000, [1])] == ["htc-b1-s1", "voco-b1-s1"]
    with pytest.raises(SystemExit, match="the run has no Table 1 seed 5; its seeds: 0, 1"):
        es.runs(run, record, ["htc"], 3000, [1, 5])
    with pytest.raises(SystemExit, match="not a trained method of Table 1: fastv; known: "):
        es.runs(run, record, ["htc", "fastv"], 3000)
    with pytest.raises(SystemExit, match="--steps must be at least 100"):
        es.main([str(run), "--steps", "50"])
    # --set: the overrides follow the run's own, reach the workers, and no run is taken as the run's own
    with pytest.raises(SystemExit, match="--set takes KEY=VALUE, got 'cosine'"):
        es.main([str(run), "--set", "cosine"])
    assert not any(j["own"] for j in es.runs(run, record, ["voco"], 3000, overrides=["optim.learning_rate=1e-3"]))
    es.main([str(run), "--methods", "voco", "--seeds", "0", "--set", "optim.lr_scheduler_type=cosine",
             "--set", "optim.learning_rate=1e-3", "--out", str(tmp_path / "cosine")])
    assert trained[-1][-2:] == ["optim.lr_scheduler_type=cosine", "optim.learning_rate=1e-3"]
    assert f"output_dir={tmp_path / 'cosine' / 'voco-b1'}" in trained[-1]
    cosine = json.loads((tmp_path / "cosine" / "equal_steps.json").read_text())
    assert cosine["overrides"][1] == "optim.learning_rate=1e-3" and cosine["machine"]["cpu_capability"]
    del trained[-1], workers[-1]
    # --threads 2 (other rounding): no run is the run's own (its workers trained on one thread); the workers
    # get two; a folder made with other settings is not resumed into
    assert not any(j["own"] for j in es.runs(run, record, ["voco"], 3000, threads=2))
    es.main([str(run), "--methods", "voco", "--seeds", "0", "--threads", "2", "--out", str(tmp_path / "two")])
    assert workers[-1] == ("voco-b1", "2") and f"output_dir={tmp_path / 'two' / 'voco-b1'}" in trained[-1]
    assert json.loads((tmp_path / "two" / "voco-b1" / "result.json").read_text())["threads"] == 2
    for other in (["--threads", "1"], ["--threads", "2", "--steps", "6000"]):
        with pytest.raises(SystemExit, match=r"two/voco-b1 was made with \{'steps': 3000, 'threads': 2, .*another --out"):
            es.main([str(run), "--methods", "voco", "--seeds", "0", "--out", str(tmp_path / "two"), *other])
    with pytest.raises(SystemExit, match="--jobs and --threads must be at least 1, got 1 and 0"):
        es.main([str(run), "--threads", "0"])
    del trained[-1], workers[-1]
    es.main([str(run), "--steps", "3000"])  # every run finished: no worker starts, the comparison is printed
    summary = json.loads((run / "equal-steps" / "equal_steps.json").read_text())
    for split in ("val", "test"):
        diff = summary[f"htc_minus_voco_{split}"]
        assert diff["open"]["difference"] == 100.0 and diff["open"]["seeds"] == [2, 2]
        assert diff["mc"]["difference"] == 100.0 and diff["pope_random"]["difference"] > 0
        cells = summary[f"table_{split}"]
        assert cells["htc"]["open"] == {"mean": 100.0, "ci95": [100.0, 100.0], "seeds": 2}
        assert cells["voco"]["mc"]["mean"] == 0.0 and list(cells) == ["htc", "voco"]
    assert len(workers) == 4  # nothing started again


def test_side_by_side_runs_real_processes_with_their_env_and_names_the_one_that_failed(tmp_path):
    """processes.side_by_side: each job's output in its log, the env given to every job, a failing job
    named with its log, and the job still running beside it stopped."""
    import sys

    from htc_vlm.processes import side_by_side

    py = lambda code: [sys.executable, "-c", code]  # noqa: E731
    said = []
    env = dict(os.environ) | {"HTC_TEST_VALUE": "7"}
    side_by_side([(n, py("import os; print(os.environ['HTC_TEST_VALUE'])"), tmp_path / f"{n}.log") for n in "ab"], 2,
                 env=env, say=said.append)
    assert [(tmp_path / f"{n}.log").read_text() for n in "ab"] == ["7\n", "7\n"]
    assert said[:2] == [f"a: started beside 0 other(s) (log {tmp_path / 'a.log'})",
                        f"b: started beside 1 other(s) (log {tmp_path / 'b.log'})"]
    # the slow job starts a child of its own (as a worker starts its training) and names it
    slow = py("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              "print(c.pid, flush=True); time.sleep(60)")
    t0 = time.perf_counter()
    with pytest.raises(HTCError, match=f"bad failed \\(log: {tmp_path / 'bad.log'}\\)"):
        side_by_side([("slow", slow, tmp_path / "slow.log"),
                      ("bad", py("import time; time.sleep(2); raise SystemExit(3)"), tmp_path / "bad.log")], 2)
    assert time.perf_counter() - t0 < 30  # the slow one was stopped, not waited for
    grandchild = int((tmp_path / "slow.log").read_text())
    for _ in range(50):  # and its own child with it (a moment for the signal to land)
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the failed job's neighbour left its child running")
    with pytest.raises(HTCError, match="--jobs must be at least 1"):
        side_by_side([], 0)
