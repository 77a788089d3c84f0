import json

from htc_vlm.cli import main


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
    try:
        main(["reproduce", "--quick", "--out", str(out)])
    except RuntimeError:
        pass
    assert "failed: RuntimeError: disk on fire" in (out / "report.md").read_text()
    assert main(["reproduce", "--quick", "--out", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["stages"]["boom"]["status"] == "done" and len(calls) == 2
