import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image

from htc_vlm.cli import main
from htc_vlm.data import scenes as S


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_cli_writes_every_file_and_is_deterministic(tmp_path):
    for name in ("a", "b"):
        assert main(["data", "scenes", "--out", str(tmp_path / name), "--train", "30", "--val", "5", "--test", "10",
                     "--seed", "7"]) == 0
    a = tmp_path / "a"
    assert _digest(a) == _digest(tmp_path / "b")
    assert main(["data", "scenes", "--out", str(tmp_path / "c"), "--train", "30", "--test", "10", "--seed", "8"]) == 0
    assert _digest(a) != _digest(tmp_path / "c")

    assert len(list((a / "images").glob("*.png"))) == 45
    splits = {split: {s["image"] for s in S.read_jsonl(a / split / "scenes.jsonl")} for split in ("train", "val", "test")}
    assert [len(v) for v in splits.values()] == [30, 5, 10] and not (splits["val"] & (splits["train"] | splits["test"]))
    for fam in S.FAMILIES:  # the validation split has every family's question file, on its own images
        assert {r["image"] for r in S.read_jsonl(a / "val" / f"{fam}.jsonl")} <= splits["val"]
    assert {c["image"] for c in json.loads((a / "val" / "conversations.json").read_text())} == splits["val"]
    questions = [c["conversations"][0]["value"] for c in json.loads((a / "train" / "conversations.json").read_text())]
    pope = [q for q in questions if any(f"Is there a {c} " in q and " in the image?" in q for c in S.COLORS)]
    assert pope and all(q.endswith(f"in the image? {S.SHORT_ANSWER}") for q in pope)  # asked as the evaluator asks
    conv = json.loads((a / "train" / "conversations.json").read_text())
    assert len({c["image"] for c in conv}) == 30 and set(conv[0]) == {"id", "image", "conversations"}
    turns = conv[0]["conversations"]
    assert turns[0]["from"] == "human" and turns[0]["value"].startswith("<image>\n")
    assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
    assert sum("<image>" in t["value"] for t in turns) == 1
    caps = json.loads((a / "train" / "captions.json").read_text())
    cap = caps[0]["conversations"][1]["value"]
    assert any(cap.startswith(f"{pos} : ") for pos in S.POSITIONS) and cap.endswith(".")  # place first
    by_shape = caps[1]["conversations"][1]["value"]  # the same image listed by shape, in SHAPES order
    assert caps[1]["image"] == caps[0]["image"] and caps[1]["conversations"][0]["value"].endswith(S.SHAPE_CAPTION_PROMPT)
    shapes = [part.split(" : ")[0] for part in by_shape.rstrip(".").split(", ")]
    assert shapes == sorted(shapes, key=S.SHAPES.index) and len(shapes) == cap.count(" : ")
    for fam in S.FAMILIES:
        rows = S.read_jsonl(a / "test" / f"{fam}.jsonl")
        assert rows, fam
        ids = [r["question_id"] for r in rows]
        assert len(set(ids)) == len(ids)
        for r in rows:
            assert {"question_id", "image", "text", "answer", "tag", "template"} <= set(r)
            assert r["tag"] in ("semantic", "detail")
            assert (a / "images" / r["image"]).exists()
    meta = json.loads((a / "meta.json").read_text())
    assert meta["seed"] == 7 and meta["image_size"] == 48 and meta["val"] == 5
    assert (a / "tokenizer" / "tokenizer.json").exists()


def test_answers_are_true_to_the_scene(scenes_dir):
    scenes = {s["image"]: s for s in S.read_jsonl(scenes_dir / "test" / "scenes.jsonl")}
    for q in S.read_jsonl(scenes_dir / "test" / "open.jsonl"):
        objs = scenes[q["image"]]["objects"]
        if q["template"] == "open/count":
            assert q["answer"] == str(len(objs))
        if q["template"] == "open/color":
            shape = q["text"].split("the ")[1].rstrip("?")
            assert q["answer"] == next(o["color"] for o in objs if o["shape"] == shape)
    for q in S.read_jsonl(scenes_dir / "test" / "pope_adversarial.jsonl"):
        cat = q["text"][len("Is there a "):-len(" in the image?")]
        present = {f"{o['color']} {o['shape']}" for o in scenes[q["image"]]["objects"]}
        assert (cat in present) == (q["answer"] == "yes")
    mme = S.read_jsonl(scenes_dir / "test" / "mme.jsonl")
    by_image = defaultdict(list)
    for q in mme:
        by_image[q["image"]].append(q["answer"])
    assert all(sorted(a) == ["no", "yes"] for a in by_image.values())
    for q in S.read_jsonl(scenes_dir / "test" / "mc.jsonl"):
        assert q["options"][S.LETTERS.index(q["answer"])] == q["answer_text"]
        assert q["text"] == S.mc_prompt(q["question"], q["options"])


def test_blind_baseline_is_near_chance_on_every_family():
    """A model that never looks at the image and answers each template's most frequent training
    answer must stay within 5 points of chance on every family."""
    train = S.test_questions(S.sample_scenes("train", 2000, 0, 64), seed=1)
    test = S.test_questions(S.sample_scenes("test", 500, 0, 64), seed=2)
    for fam in S.FAMILIES:
        counts = defaultdict(Counter)
        for q in train[fam]:
            counts[q["template"]][q["answer"]] += 1
        majority = {t: c.most_common(1)[0][0] for t, c in counts.items()}
        acc = sum(majority[q["template"]] == q["answer"] for q in test[fam]) / len(test[fam])
        if fam == "open":
            chance = sum(1 / len(S.ANSWER_SPACES[q["template"]]) for q in test[fam]) / len(test[fam])
        else:
            chance = 0.25 if fam == "mc" else 0.5
        assert abs(acc - chance) <= 0.05, (fam, acc, chance)


def test_letters_and_yes_no_are_balanced():
    test = S.test_questions(S.sample_scenes("test", 500, 0, 64), seed=2)
    letters = Counter(q["answer"] for q in test["mc"])
    assert set(letters) == set(S.LETTERS) and min(letters.values()) > 500 / 4 * 0.75
    for fam in ("pope_random", "pope_popular", "pope_adversarial"):
        yes = Counter(q["answer"] for q in test[fam])
        assert yes["yes"] == yes["no"]


@pytest.mark.parametrize("size", [48, 64, 336])
def test_render_sizes(size):
    scene = S.sample_scenes("test", 1, 0, size)[0]
    img = S.render(scene, size)
    assert img.size == (size, size) and img.mode == "RGB"
    # every object leaves coloured pixels inside its grid cell
    cell = size // S.GRID
    for o in scene.objects:
        crop = img.crop((o.col * cell, o.row * cell, (o.col + 1) * cell, (o.row + 1) * cell))
        assert S.COLORS[o.color] in {c for _, c in crop.getcolors(cell * cell)}


def test_png_decodes(scenes_dir):
    p = next((scenes_dir / "images").glob("*.png"))
    with Image.open(p) as im:
        assert im.size == (48, 48)


@pytest.mark.parametrize("args, message", [
    (["--train", "0"], "must be positive"),
    (["--test", "-3"], "must be positive"),
    (["--size", "8"], "at least 24"),
    (["--mme-pairs", "7"], "--mme-pairs must be 1-6"),
    (["--mc-questions", "0"], "--mc-questions 1-4"),
])
def test_cli_bad_numbers(tmp_path, capsys, args, message):
    out = tmp_path / "o"
    assert main(["data", "scenes", "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_refuses_non_empty_out_and_overwrites_on_request(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["data", "scenes", "--out", str(out), "--train", "2", "--test", "2"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["data", "scenes", "--out", str(out), "--train", "2", "--test", "2", "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "meta.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no temporary folder left behind


def test_cli_unwritable_and_unknown_option(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["data", "scenes", "--out", str(blocker / "sub"), "--train", "2", "--test", "2"]) == 2
    assert "cannot write" in capsys.readouterr().err
    assert main(["data", "scenes", "--out", str(tmp_path / "o"), "--frobnicate", "1"]) == 2
    assert main(["no-such-command"]) == 2


def test_more_verification_and_mc_questions_per_image():
    """--mme-pairs / --mc-questions: that many MME pairs (distinct sub-tasks, one true one false) and
    MC questions (distinct kinds) per training image; the other questions are drawn as before."""
    import random

    scenes = S.sample_scenes("train", 30, 0, 48)
    for scene in scenes:
        recs = S.train_conversations(scene, random.Random(scene.id), [], mme_pairs=3, mc_questions=2)
        qs = [(r["conversations"][0]["value"], r["conversations"][1]["value"]) for r in recs]
        mme = [(q, a) for q, a in qs if q.endswith(S.MME_SUFFIX)]
        mc = [q for q, _ in qs if q.endswith(S.MC_SUFFIX)]
        assert len(mme) == 6 and sorted(a for _, a in mme) == ["no"] * 3 + ["yes"] * 3
        assert len(mc) == 2 and len({tuple(q.split("\n")[1].split()[:2]) for q in mc}) == 2  # two kinds
        one = S.train_conversations(scene, random.Random(scene.id), [])
        assert len(recs) - len(one) == 4 + 1  # two more pairs, one more MC question


def _truth(scene, question: str) -> str:
    """The answer to an MC question's stem, read from the scene itself."""
    if question == "How many objects are there?":
        return str(len(scene.objects))
    thing = question.rstrip("?").split(" the ", 1)[1]
    if question.startswith("What shape is at"):
        return next(o.shape for o in scene.objects if o.position == thing)
    o = scene.by_shape(thing)
    return o.color if question.startswith("What color") else o.position


def test_content_letter_mc_answers_say_the_options_text_then_its_letter(tmp_path, capsys):
    """--mc-form content-letter: every training MC answer is "<text> <letter>", the letter the option
    holding that text and the text the scene's truth; nothing else changes, and the test questions
    keep the bare letter (what the scorer compares with). An unknown form is one clear error."""
    import random

    scenes = S.sample_scenes("train", 40, 0, 48)
    for scene in scenes:
        plain = S.train_conversations(scene, random.Random(scene.id), [], mc_questions=4)
        recs = S.train_conversations(scene, random.Random(scene.id), [], mc_questions=4, mc_form="content-letter")
        assert [r["conversations"][0] for r in recs] == [r["conversations"][0] for r in plain]
        for r, p in zip(recs, plain):
            q, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
            if not q.endswith(S.MC_SUFFIX):
                assert a == p["conversations"][1]["value"]
                continue
            text, letter = a.rsplit(" ", 1)
            options = dict(line.split(". ", 1) for line in q.split("\n")[2:-1])
            assert letter == p["conversations"][1]["value"] and options[letter] == text
            assert text == _truth(scene, q.split("\n")[1])  # "<image>", the stem, the options, MC_SUFFIX
    assert S.mc_answer("C", "top left", "content-letter") == "top left C" and S.mc_answer("C", "x", "letter") == "C"
    for scene in scenes:  # lookups: the stem is the answer's text, packed with the image; nothing else moves
        plain = S.train_conversations(scene, random.Random(scene.id), [])
        recs = S.train_conversations(scene, random.Random(scene.id), [], mc_form="content-letter", lookups=3)
        looks = [r for r in recs if r["conversations"][0]["value"].split("\n")[1] in
                 {r["conversations"][1]["value"].rsplit(" ", 1)[0] for r in recs}]
        assert len(recs) == len(plain) + 3 and len(looks) >= 3 and all(r["image"] == scene.image for r in recs)
        marked = [r for r in recs if r.get("lookup")]
        assert len(marked) == 3 and all(r in looks and r["lookup"] is True for r in marked)
        assert not any("lookup" in r for r in plain)  # lookups=0: the default files' bytes
        for r in looks:
            q, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
            text, letter = a.rsplit(" ", 1)
            assert dict(line.split(". ", 1) for line in q.split("\n")[2:-1])[letter] == text == q.split("\n")[1]
    assert main(["data", "scenes", "--out", str(tmp_path / "a"), "--train", "3", "--val", "2", "--test", "3",
                 "--mc-form", "content-letter"]) == 0
    mc = S.read_jsonl(tmp_path / "a" / "test" / "mc.jsonl")
    assert all(r["answer"] in S.LETTERS for r in mc)
    assert json.loads((tmp_path / "a" / "meta.json").read_text())["mc_form"] == "content-letter"
    assert main(["data", "scenes", "--out", str(tmp_path / "b"), "--train", "3", "--test", "3", "--mc-form", "words"]) == 2
    assert "unknown MC answer form 'words'" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_with_lookups_the_scenes_also_write_their_conversations_without_them(tmp_path):
    """The compression runs' file: conversations.json, record for record and in order, less the
    records marked as lookups; none is written without lookups."""
    assert main(["data", "scenes", "--out", str(tmp_path / "a"), "--train", "6", "--val", "3", "--test", "2",
                 "--mc-form", "content-letter", "--lookups", "2"]) == 0
    for split, n in (("train", 6), ("val", 3)):
        full = json.loads((tmp_path / "a" / split / "conversations.json").read_text())
        rest = json.loads((tmp_path / "a" / split / S.WITHOUT_LOOKUPS).read_text())
        assert sum(bool(r.get("lookup")) for r in full) == 2 * n
        assert rest == [r for r in full if "lookup" not in r] and len(rest) == len(full) - 2 * n
    assert main(["data", "scenes", "--out", str(tmp_path / "b"), "--train", "3", "--val", "2", "--test", "2"]) == 0
    assert not list((tmp_path / "b").rglob(S.WITHOUT_LOOKUPS))


def test_text_lookups_follow_the_captions_in_a_file_of_their_own(tmp_path):
    """--text-lookups N: train/captions-lookups.json is captions.json, record for record, then N
    text-only lookups per training scene (no image, the stem is the answer's text, the answer in the
    run's MC form); every other file keeps its bytes, and without it there is no such file."""
    args = ["--train", "5", "--val", "2", "--test", "2", "--mc-form", "content-letter", "--lookups", "1"]
    assert main(["data", "scenes", "--out", str(tmp_path / "a"), *args]) == 0
    assert main(["data", "scenes", "--out", str(tmp_path / "b"), *args, "--text-lookups", "3"]) == 0
    assert not list((tmp_path / "a").rglob(S.ALIGN_LOOKUPS))
    a, b = tmp_path / "a", tmp_path / "b"
    files = sorted(f.relative_to(a) for f in a.rglob("*") if f.is_file())
    assert sorted(f.relative_to(b) for f in b.rglob("*") if f.is_file()) == sorted(files + [Path("train") / S.ALIGN_LOOKUPS])
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files if f.name != "meta.json")
    assert json.loads((b / "meta.json").read_text())["text_lookups"] == 3
    captions = json.loads((a / "train" / "captions.json").read_text())
    both = json.loads((b / "train" / S.ALIGN_LOOKUPS).read_text())
    assert both[:len(captions)] == captions and len(both) == len(captions) + 5 * 3
    scenes = {r["id"]: S.Scene.from_json(r) for r in S.read_jsonl(b / "train" / "scenes.jsonl")}
    for r in both[len(captions):]:
        assert "image" not in r and S.IMAGE_TOKEN not in r["conversations"][0]["value"]
        q, answer = r["conversations"][0]["value"], r["conversations"][1]["value"]
        text, letter = answer.rsplit(" ", 1)
        options = dict(line.split(". ", 1) for line in q.split("\n")[1:-1])
        assert q.split("\n")[0] == text == options[letter] and q.endswith(S.MC_SUFFIX)
        assert r["id"].split("-text-lookup-")[0] in scenes
    assert main(["data", "scenes", "--out", str(tmp_path / "c"), "--train", "3", "--test", "2",
                 "--text-lookups", "33"]) == 2 and not (tmp_path / "c").exists()


def test_another_mc_form_also_writes_the_default_training_conversations(tmp_path):
    """conversations-letter.json (a first instruct stage's data) is, byte for byte, the
    conversations.json the default options write for the same scenes, and conversations-replay.json is
    the run's own records followed by that file's POPE and MME records again; the default writes neither."""
    args = ["--train", "6", "--val", "3", "--test", "2", "--seed", "3"]
    assert main(["data", "scenes", "--out", str(tmp_path / "d"), *args]) == 0
    assert not list((tmp_path / "d").rglob(S.LETTER_FORM)) and not list((tmp_path / "d").rglob(S.REPLAY_FORM))
    for extra in (["--mc-form", "content-letter"], ["--lookups", "2"]):
        out = tmp_path / extra[0][2:]
        assert main(["data", "scenes", "--out", str(out), *args, *extra]) == 0
        letter = (out / "train" / S.LETTER_FORM).read_bytes()
        assert letter == (tmp_path / "d" / "train" / "conversations.json").read_bytes()
        assert letter != (out / "train" / "conversations.json").read_bytes()
        assert not (out / "val" / S.LETTER_FORM).exists()
        # the replay file: the run's own records, then the letter file's POPE and MME records once more
        own, letter = (json.loads((out / "train" / f).read_text()) for f in ("conversations.json", S.LETTER_FORM))
        replay = json.loads((out / "train" / S.REPLAY_FORM).read_text())
        assert replay[:len(own)] == own
        extra = replay[len(own):]
        assert len(extra) == 4 * 6  # 2 POPE + one MME pair per training image
        by_id = {r["id"]: r for r in letter}
        for r in extra:
            q = r["conversations"][0]["value"]
            assert q.endswith((S.SHORT_ANSWER, S.MME_SUFFIX)) and r["conversations"][1]["value"] in ("yes", "no")
            assert by_id[r["id"].removesuffix("-replay")] | {"id": r["id"]} == r
        assert len({r["id"] for r in replay}) == len(replay)


def test_a_scene_read_back_from_scenes_jsonl_is_the_scene_written(scenes_dir):
    rows = S.read_jsonl(scenes_dir / "train" / "scenes.jsonl")
    for row in rows[:50]:
        scene = S.Scene.from_json(row)
        assert scene.to_json() == row and scene.id == row["id"]
