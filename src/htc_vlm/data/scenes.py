"""The generated scene benchmark: the embedded data that lets the whole paper run on a CPU.

A scene is 1-4 objects on a 3x3 grid. Each object has a shape, colour, texture and size, and sits
in its own grid cell (with a little jitter inside the cell). Shapes within a scene are distinct,
so "the circle" always names one object.

Question families mirror the paper's benchmarks; every question is tagged ``semantic`` (identity,
existence, counting, relations) or ``detail`` (colour, texture, size, exact position):

=========================  ======================================  ==============================
family                     mirrors                                 answer
=========================  ======================================  ==============================
``open``                   VQAv2 / GQA (open-ended short answers)  a word or a digit
``pope_{random,...}``      POPE (object existence, 3 negatives)    yes / no
``mme``                    MME (two paired yes/no per image)       yes / no, scored acc and acc+
``mc``                     MMBench / SEED / ScienceQA-IMG          a letter A-D; options rotatable
=========================  ======================================  ==============================

Answers are balanced by construction (a referent, a truth value or a letter is drawn uniformly),
so a blind model that answers each template's most frequent answer scores near chance; a test
checks that. Files use the LLaVA ecosystem's formats (see :func:`write_benchmark`).
"""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw

from ..errors import HTCError

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = {
    "red": (215, 38, 38),
    "green": (36, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (230, 200, 20),
    "purple": (140, 50, 180),
    "orange": (240, 130, 20),
}
TEXTURES = ("solid", "striped", "dotted")
SIZES = ("small", "large")
GRID = 3
POSITIONS = (
    "top left", "top middle", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom middle", "bottom right",
)  # row-major: POSITIONS[row * GRID + col]
BACKGROUND = (238, 238, 238)
MAX_OBJECTS = 4

IMAGE_TOKEN = "<image>"
MME_SUFFIX = " Please answer yes or no."
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
LETTERS = ("A", "B", "C", "D")
CAPTION_PROMPT = "Describe the image briefly."
SHAPE_CAPTION_PROMPT = "List the objects by shape."
FORMAT_VERSION = 2  # 2: a val split, captions by shape, POPE with the short-answer instruction

# The answer space of each question template: chance = 1 / len(space) for open questions.
ANSWER_SPACES: dict[str, tuple[str, ...]] = {
    "open/shape_at": SHAPES,
    "open/count": ("1", "2", "3", "4"),
    "open/color": tuple(COLORS),
    "open/texture": TEXTURES,
    "open/size": SIZES,
    "open/where": POSITIONS,
    "open/left_of": ("yes", "no"),
    "open/exists": ("yes", "no"),
}
TAGS = {
    "shape_at": "semantic", "count": "semantic", "exists": "semantic", "left_of": "semantic",
    "color": "detail", "texture": "detail", "size": "detail", "where": "detail", "position": "detail",
}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    texture: str
    size: str
    row: int
    col: int
    x: int  # top-left pixel of the sprite
    y: int

    @property
    def position(self) -> str:
        return POSITIONS[self.row * GRID + self.col]

    @property
    def category(self) -> str:
        """The POPE-style object category: ``"red circle"``."""
        return f"{self.color} {self.shape}"

    def describe(self) -> str:
        return f"{self.position} : {self.size} {self.color} {self.texture} {self.shape}"


@dataclass(frozen=True)
class Scene:
    id: str
    objects: tuple[SceneObject, ...]

    @property
    def image(self) -> str:
        return f"{self.id}.png"

    def by_shape(self, shape: str) -> SceneObject:
        return next(o for o in self.objects if o.shape == shape)

    def caption(self) -> str:
        """Objects in raster order, each introduced by its place ("top left : small red solid circle ,
        center : ..."): naming the cell first tells the language model which patch to read next,
        instead of making it pick the next object before its place is said. (Measured once, 4 align
        epochs: shape named right in one-object captions 0.56 vs 0.49 with the place last.)"""
        parts = [o.describe() for o in sorted(self.objects, key=lambda o: (o.row, o.col))]
        return ", ".join(parts) + "."

    def shape_caption(self) -> str:
        """Objects in the fixed order of SHAPES, each introduced by its shape ("circle : top left small red
        solid , ..."): to say where the circle is and what it looks like, the language model must find
        the circle's patches by their content, the lookup most questions need, and it practises it on
        every word of the caption instead of once per answer."""
        parts = [f"{o.shape} : {o.position} {o.size} {o.color} {o.texture}"
                 for o in sorted(self.objects, key=lambda o: SHAPES.index(o.shape))]
        return ", ".join(parts) + "."

    def to_json(self) -> dict:
        return {"id": self.id, "image": self.image, "objects": [asdict(o) | {"position": o.position} for o in self.objects]}

    @classmethod
    def from_json(cls, row: dict) -> "Scene":
        """The scene of a ``scenes.jsonl`` line (:meth:`to_json`; ``position`` is derived, so dropped)."""
        fields = SceneObject.__dataclass_fields__
        return cls(row["id"], tuple(SceneObject(**{k: v for k, v in o.items() if k in fields}) for o in row["objects"]))


# ----------------------------------------------------------------------------- rendering


def _sprite_sizes(image_size: int) -> dict[str, int]:
    cell = image_size // GRID
    return {"large": max(6, round(cell * 0.86)), "small": max(4, round(cell * 0.55))}


@lru_cache(maxsize=None)
def _mask(shape: str, side: int) -> Image.Image:
    m = Image.new("L", (side, side), 0)
    d = ImageDraw.Draw(m)
    e = side - 1
    if shape == "circle":
        d.ellipse((0, 0, e, e), fill=255)
    elif shape == "square":
        pad = round(side * 0.08)
        d.rectangle((pad, pad, e - pad, e - pad), fill=255)
    elif shape == "triangle":
        d.polygon([(e / 2, 0), (e, e), (0, e)], fill=255)
    elif shape == "diamond":
        d.polygon([(e / 2, 0), (e, e / 2), (e / 2, e), (0, e / 2)], fill=255)
    elif shape == "cross":
        t = max(1, round(side * 0.3))
        lo = (side - t) // 2
        d.rectangle((lo, 0, lo + t - 1, e), fill=255)
        d.rectangle((0, lo, e, lo + t - 1), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return m


@lru_cache(maxsize=None)
def _pattern(color: str, texture: str, side: int, image_size: int) -> Image.Image:
    rgb = COLORS[color]
    p = Image.new("RGB", (side, side), rgb)
    d = ImageDraw.Draw(p)
    unit = max(1, round(image_size / 64))  # stripe / dot width scales with the image
    light = (255, 255, 255)
    if texture == "striped":
        for y0 in range(unit, side, 4 * unit):
            d.rectangle((0, y0, side - 1, y0 + unit - 1), fill=light)
    elif texture == "dotted":
        for y0 in range(unit, side, 3 * unit):
            for x0 in range(unit, side, 3 * unit):
                d.rectangle((x0, y0, x0 + unit - 1, y0 + unit - 1), fill=light)
    elif texture != "solid":
        raise ValueError(f"unknown texture {texture!r}; known: {', '.join(TEXTURES)}")
    return p


def render(scene: Scene, image_size: int) -> Image.Image:
    """Draw a scene as an RGB image of ``image_size`` x ``image_size`` pixels."""
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    sides = _sprite_sizes(image_size)
    for o in scene.objects:
        side = sides[o.size]
        img.paste(_pattern(o.color, o.texture, side, image_size), (o.x, o.y), _mask(o.shape, side))
    return img


def sample_scene(rng: random.Random, scene_id: str, image_size: int) -> Scene:
    n = rng.randint(1, MAX_OBJECTS)
    cells = rng.sample(range(GRID * GRID), n)
    shapes = rng.sample(SHAPES, n)
    cell = image_size // GRID
    sides = _sprite_sizes(image_size)
    objects = []
    for c, shape in zip(cells, shapes):
        size = rng.choice(SIZES)
        slack = cell - sides[size]
        row, col = divmod(c, GRID)
        objects.append(SceneObject(
            shape=shape, color=rng.choice(tuple(COLORS)), texture=rng.choice(TEXTURES), size=size,
            row=row, col=col, x=col * cell + rng.randint(0, slack), y=row * cell + rng.randint(0, slack),
        ))
    return Scene(scene_id, tuple(objects))


# ----------------------------------------------------------------------------- questions


def _other(rng: random.Random, values, exclude) -> str:
    return rng.choice([v for v in values if v not in exclude])


def _q(template: str, text: str, answer: str, **extra) -> dict:
    kind = template.split("/", 1)[1].split(":")[0]
    return {"template": template, "text": text, "answer": answer, "tag": TAGS[kind], **extra}


def _open_questions(scene: Scene, rng: random.Random) -> dict[str, dict]:
    """One candidate question per applicable open-ended template (VQAv2 / GQA style)."""
    o = rng.choice(scene.objects)
    present = {x.shape for x in scene.objects}
    qs = {
        "shape_at": _q("open/shape_at", f"What shape is at the {o.position}?", o.shape),
        "count": _q("open/count", "How many objects are there?", str(len(scene.objects))),
        "color": _q("open/color", f"What color is the {o.shape}?", o.color),
        "texture": _q("open/texture", f"What texture does the {o.shape} have?", o.texture),
        "size": _q("open/size", f"What size is the {o.shape}?", o.size),
        "where": _q("open/where", f"Where is the {o.shape}?", o.position),
    }
    shape = o.shape if rng.random() < 0.5 else _other(rng, SHAPES, present)
    qs["exists"] = _q("open/exists", f"Is there a {shape} in the image?", "yes" if shape in present else "no")
    pairs = [(a, b) for a in scene.objects for b in scene.objects if a.col < b.col]
    if pairs:
        a, b = rng.choice(pairs)
        if rng.random() < 0.5:
            a, b = b, a
        qs["left_of"] = _q("open/left_of", f"Is the {a.shape} to the left of the {b.shape}?",
                           "yes" if a.col < b.col else "no")
    return qs


def _pope_questions(scene: Scene, rng: random.Random, split: str, popularity: list[str]) -> list[dict]:
    """POPE: ground-truth objects as positives, as many negatives drawn by ``split``.

    ``random`` draws absent categories uniformly; ``popular`` takes the absent categories most
    frequent in the split (POPE's definition; our generator is uniform, so it is close to random);
    ``adversarial`` takes absent categories that share a colour or a shape with a present object
    (our analogue of POPE's co-occurrence negatives: generated scenes have no co-occurrence
    structure, but attribute binding is the hard case for a compressed representation).
    """
    present = [o.category for o in scene.objects]
    absent = [f"{c} {s}" for c in COLORS for s in SHAPES if f"{c} {s}" not in present]
    k = min(2, len(present))
    positives = rng.sample(present, k)
    if split == "random":
        negatives = rng.sample(absent, k)
    elif split == "popular":
        negatives = [c for c in popularity if c in absent][:k]
    elif split == "adversarial":
        confusable = [c for c in absent if any(c.split()[0] == p.split()[0] or c.split()[1] == p.split()[1] for p in present)]
        negatives = rng.sample(confusable, k)
    else:
        raise ValueError(f"unknown POPE split {split!r}")
    out = [_q("pope/exists", f"Is there a {c} in the image?", "yes", category=split) for c in positives]
    out += [_q("pope/exists", f"Is there a {c} in the image?", "no", category=split) for c in negatives]
    rng.shuffle(out)
    return out


MME_SUBTASKS = ("exists", "count", "position", "color", "texture", "size")


def _mme_pair(scene: Scene, rng: random.Random, subtask: str) -> list[dict]:
    """MME: two questions about one image, one true and one false; acc+ needs both right."""
    o = rng.choice(scene.objects)
    if subtask == "exists":
        present = {x.category for x in scene.objects}
        wrong = rng.choice([f"{c} {o.shape}" for c in COLORS if f"{c} {o.shape}" not in present])
        texts = (f"Is there a {o.category} in this image?", f"Is there a {wrong} in this image?")
    elif subtask == "count":
        n = len(scene.objects)
        texts = (f"Are there {n} objects in this image?", f"Are there {_other(rng, '1234', str(n))} objects in this image?")
    elif subtask == "position":
        texts = (f"Is the {o.shape} at the {o.position}?", f"Is the {o.shape} at the {_other(rng, POSITIONS, [o.position])}?")
    else:
        values = {"color": tuple(COLORS), "texture": TEXTURES, "size": SIZES}[subtask]
        true = getattr(o, subtask)
        texts = (f"Is the {o.shape} {true}?", f"Is the {o.shape} {_other(rng, values, [true])}?")
    pair = [_q(f"mme/{subtask}", t + MME_SUFFIX, a, category=subtask) for t, a in zip(texts, ("yes", "no"))]
    rng.shuffle(pair)
    return pair


MC_KINDS = ("color", "shape_at", "count", "where")


def mc_prompt(question: str, options: list[str]) -> str:
    """The MMBench-style prompt of LLaVA's evaluation: question, lettered options, instruction."""
    lines = [question] + [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
    return "\n".join(lines + [MC_SUFFIX])


MC_FORMS = ("letter", "content-letter")


def mc_answer(letter: str, text: str, form: str) -> str:
    """A training answer to an MC question: LLaVA's bare letter, or the option's text then its letter.

    ``content-letter`` ("green B") splits the answer into the two steps a 4-layer language model can
    learn one at a time: reading the image (as open questions do) and finding the letter of that text
    among the options (docs/LOG.md, session 13). VLMEvalKit's MMBench matcher reads the lone letter.
    """
    if form not in MC_FORMS:
        raise HTCError(f"unknown MC answer form {form!r}; choose one of {', '.join(MC_FORMS)}")
    return letter if form == "letter" else f"{text} {letter}"


def _mc_question(scene: Scene, rng: random.Random, kind: str) -> dict:
    o = rng.choice(scene.objects)
    question, correct, values = {
        "color": (f"What color is the {o.shape}?", o.color, tuple(COLORS)),
        "shape_at": (f"What shape is at the {o.position}?", o.shape, SHAPES),
        "count": ("How many objects are there?", str(len(scene.objects)), ("1", "2", "3", "4")),
        "where": (f"Where is the {o.shape}?", o.position, POSITIONS),
    }[kind]
    options = rng.sample([v for v in values if v != correct], 3)
    letter = rng.randrange(4)
    options.insert(letter, correct)
    return _q(f"mc/{kind}", mc_prompt(question, options), LETTERS[letter],
              question=question, options=options, answer_text=correct)


# ----------------------------------------------------------------------------- the benchmark


POPE_SPLITS = ("random", "popular", "adversarial")
FAMILIES = ("open",) + tuple(f"pope_{s}" for s in POPE_SPLITS) + ("mme", "mc")


def sample_scenes(split: str, n: int, seed: int, image_size: int) -> list[Scene]:
    rng = random.Random(f"htc-vlm-scenes/{seed}/{split}")  # str seeds hash deterministically
    return [sample_scene(rng, f"{split}_{i:06d}", image_size) for i in range(n)]


def test_questions(scenes: list[Scene], seed: int, open_per_image: int = 4) -> dict[str, list[dict]]:
    """Per-family test questions, in the LLaVA question-file layout (question_id, image, text, ...)."""
    rng = random.Random(f"htc-vlm-questions/{seed}")
    popularity = [c for c, _ in Counter(o.category for s in scenes for o in s.objects).most_common()]
    families: dict[str, list[dict]] = {f: [] for f in FAMILIES}
    templates = list(ANSWER_SPACES)
    for i, scene in enumerate(scenes):
        cands = _open_questions(scene, rng)
        # Cycle through templates so each gets the same share of questions over the split.
        order = [templates[(i * open_per_image + j) % len(templates)].split("/")[1] for j in range(open_per_image)]
        new = {"open": [cands[k] for k in dict.fromkeys(order) if k in cands]}
        for split in POPE_SPLITS:
            new[f"pope_{split}"] = _pope_questions(scene, rng, split, popularity)
        new["mme"] = _mme_pair(scene, rng, MME_SUBTASKS[i % len(MME_SUBTASKS)])
        new["mc"] = [_mc_question(scene, rng, MC_KINDS[i % len(MC_KINDS)])]
        for fam, qs in new.items():
            families[fam] += [{"question_id": f"{fam}-{len(families[fam]) + j:06d}", "image": scene.image, **q}
                              for j, q in enumerate(qs)]
    return families


MAX_LOOKUPS = 32


def check_question_counts(mme_pairs: int, mc_questions: int = 1) -> None:
    """One clear error for MME pairs or MC questions per image out of range (one per sub-task / kind at most)."""
    if not 1 <= mme_pairs <= len(MME_SUBTASKS):
        raise HTCError(f"--mme-pairs must be 1-{len(MME_SUBTASKS)} (one per MME sub-task), got {mme_pairs}")
    if not 1 <= mc_questions <= len(MC_KINDS):
        raise HTCError(f"expected --mc-questions 1-{len(MC_KINDS)} (one per MC kind), got {mc_questions}")


def check_mc_options(mc_form: str, lookups: int, text_lookups: int = 0) -> None:
    """One clear error for an unknown MC answer form or a lookup count out of range."""
    mc_answer("A", "red", mc_form)
    for flag, n in (("--lookups", lookups), ("--text-lookups", text_lookups)):
        if not 0 <= n <= MAX_LOOKUPS:
            raise HTCError(f"{flag} must be 0-{MAX_LOOKUPS}, got {n}")


LOOKUP_TEMPLATE = "mc/lookup"
# Beside conversations.json when lookups > 0: its records less the lookups (marked "lookup": true), which
# only the base's instruct stage trains on; compression runs step through the rest (docs/LOG.md, session 16).
WITHOUT_LOOKUPS = "conversations-without-lookups.json"
# Beside train/conversations.json when its MC answers are not letters or it has lookups: the same scenes'
# records as the default writes them (letter answers, no lookups), byte for byte. A first instruct stage
# on them learns to read the image before the second learns the MC options (reproduce --letter-epochs;
# docs/LOG.md, session 17).
LETTER_FORM = "conversations-letter.json"
# Beside LETTER_FORM: train/conversations.json followed by LETTER_FORM's yes/no verification records (its
# POPE and MME questions, ids suffixed "-replay"), for a second instruct stage that keeps rehearsing the
# verification the first one learnt while it learns the MC options (reproduce --replay-verification;
# docs/LOG.md, session 20).
REPLAY_FORM = "conversations-replay.json"
# Beside captions.json with --text-lookups: its captions, then text-only lookup records (no image), for an
# align stage that also teaches the from-scratch language model to find the letter of a given option text
# before any instruct stage needs it, as a pretrained LLM would already know (reproduce --text-lookups;
# docs/LOG.md, session 22).
ALIGN_LOOKUPS = "captions-lookups.json"


def is_verification(record: dict) -> bool:
    """Whether a training record asks a POPE or MME yes/no question (by the instruction each ends with)."""
    return record["conversations"][0]["value"].endswith((SHORT_ANSWER, MME_SUFFIX))


def replay_records(records: list[dict], letter_records: list[dict]) -> list[dict]:
    """REPLAY_FORM's records: ``records`` and then the verification records of ``letter_records``."""
    return records + [r | {"id": f"{r['id']}-replay"} for r in letter_records if is_verification(r)]


def lookup_prompt(q: dict) -> str:
    """MC question ``q``'s prompt with its stem replaced by the answer's text ("blue\\nA. orange\\n...\\nD.
    blue\\n..."): only the second step of an MC answer is left, finding the letter of a given text."""
    return mc_prompt(q["answer_text"], q["options"])


def lookup_question(scene: Scene, rng: random.Random) -> dict:
    """A :func:`lookup_prompt` question on an MC question of a random kind."""
    q = _mc_question(scene, rng, rng.choice(MC_KINDS))
    return q | {"template": LOOKUP_TEMPLATE, "text": lookup_prompt(q)}


def text_lookup_records(scene: Scene, rng: random.Random, n: int, mc_form: str = "letter") -> list[dict]:
    """``n`` :func:`lookup_question` records on ``scene``'s objects without its image: the answer is in
    the text, so the language model can learn the lookup alone."""
    qs = [lookup_question(scene, rng) for _ in range(n)]
    return [{"id": f"{scene.id}-text-lookup-{j:02d}", "conversations": [
        {"from": "human", "value": q["text"]}, {"from": "gpt", "value": mc_answer(q["answer"], q["answer_text"], mc_form)}]}
        for j, q in enumerate(qs)]


def train_conversations(scene: Scene, rng: random.Random, popularity: list[str], mme_pairs: int = 1,
                        mc_questions: int = 1, mc_form: str = "letter", lookups: int = 0) -> list[dict]:
    """LLaVA-format records for one training image: one question-answer pair each, mixing every
    family's question kinds (several records may share an image, as in LLaVA-665k).

    One pair per record rather than a multi-turn conversation: in a conversation about one scene,
    earlier answers give later ones away ("Is the diamond small? yes" before "What size is the
    diamond?"), and a tiny model trained that way learned the text shortcuts instead of the image
    (counting 0.62 after 6 multi-turn epochs, 1.00 after 1 single-turn epoch).

    ``mme_pairs`` MME pairs (of distinct sub-tasks) and ``mc_questions`` MC questions (of distinct
    kinds) per image; more of them teach verification (docs/LOG.md, session 5). ``mc_form`` is how MC
    answers are written (:func:`mc_answer`); ``lookups`` adds that many :func:`lookup_question` records
    (with the image, so that they pack with its other questions; the answer is in the text).
    """
    qa = list(_open_questions(scene, rng).values())
    # POPE is asked with LLaVA's short-answer instruction (the evaluator appends it, as LLaVA's
    # eval_pope does), so training asks it the same way: without it, POPE questions reached the model
    # only in a form it had never seen, and some were answered with a letter.
    qa += [q | {"text": f"{q['text']} {SHORT_ANSWER}"}
           for q in _pope_questions(scene, rng, rng.choice(POPE_SPLITS), popularity)[:2]]
    # one of each: rng.choice, as before these options, so the default files keep their bytes
    for sub in [rng.choice(MME_SUBTASKS)] if mme_pairs == 1 else rng.sample(MME_SUBTASKS, mme_pairs):
        qa += _mme_pair(scene, rng, sub)
    for kind in [rng.choice(MC_KINDS)] if mc_questions == 1 else rng.sample(MC_KINDS, mc_questions):
        q = _mc_question(scene, rng, kind)
        qa.append(q | {"answer": mc_answer(q["answer"], q["answer_text"], mc_form)})
    for _ in range(lookups):  # drawn after the others, so lookups=0 leaves the default files' bytes
        q = lookup_question(scene, rng)
        qa.append(q | {"answer": mc_answer(q["answer"], q["answer_text"], mc_form)})
    rng.shuffle(qa)
    return [{"id": f"{scene.id}-{j:02d}", "image": scene.image, "conversations": [
        {"from": "human", "value": f"{IMAGE_TOKEN}\n" + q["text"]}, {"from": "gpt", "value": q["answer"]}]}
        | ({"lookup": True} if q.get("template") == LOOKUP_TEMPLATE else {})
        for j, q in enumerate(qa)]


SHORT_ANSWER = "Answer the question using a single word or phrase."


def caption_records(scene: Scene) -> list[dict]:
    """LLaVA stage-1 (blip_laion_cc_sbu_558k) format: two captions per image, by place and by shape."""
    return [{"id": f"{scene.id}-{kind}", "image": scene.image, "conversations": [
        {"from": "human", "value": f"{IMAGE_TOKEN}\n{prompt}"}, {"from": "gpt", "value": text}]}
        for kind, prompt, text in (("place", CAPTION_PROMPT, scene.caption()),
                                   ("shape", SHAPE_CAPTION_PROMPT, scene.shape_caption()))]


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def write_benchmark(out: Path, n_train: int, n_test: int, seed: int, image_size: int, progress=None,
                    n_val: int = 200, mme_pairs: int = 1, mc_questions: int = 1, mc_form: str = "letter",
                    lookups: int = 0, text_lookups: int = 0) -> dict:
    """Write the benchmark into ``out`` (which must exist and be empty). Returns ``meta``.

    Layout::

        meta.json                       generator version, seed, size, counts
        images/{split}_{i:06d}.png      all images
        train/scenes.jsonl              ground-truth objects per scene (also used by probing)
        train/captions.json             LLaVA stage-1 caption file (alignment)
        train/conversations.json        LLaVA-665k format, one question-answer record each (instruction tuning)
        train/conversations-letter.json with another --mc-form or --lookups: the default's records (letter
                                        answers, no lookups) of the same scenes (a first instruct stage)
        train/conversations-replay.json with it: conversations.json, then the letter file's POPE and MME
                                        records again (a second stage that rehearses them)
        {train,val}/conversations-without-lookups.json
                                        with --lookups: the same records less the lookups (compression runs)
        train/captions-lookups.json     with --text-lookups: captions.json, then that many text-only lookup
                                        records per scene (an align stage that also teaches the lookup)
        val/scenes.jsonl, val/conversations.json, val/{family}.jsonl
                                        the validation split: every recipe choice is made here
        test/scenes.jsonl
        test/{family}.jsonl             question_id, image, text, answer, tag, template, ...

    The three splits draw their scenes from separate random streams, so no image repeats across them.
    """
    if n_train <= 0 or n_test <= 0 or n_val <= 0:
        raise HTCError(f"--train, --val and --test must be positive, got {n_train}, {n_val} and {n_test}")
    if image_size < 24:
        raise HTCError(f"--size must be at least 24 pixels, got {image_size}")
    check_question_counts(mme_pairs, mc_questions)
    check_mc_options(mc_form, lookups, text_lookups)  # before any image is written
    (out / "images").mkdir()
    splits = {"train": sample_scenes("train", n_train, seed, image_size),
              "val": sample_scenes("val", n_val, seed, image_size),
              "test": sample_scenes("test", n_test, seed, image_size)}
    for split, scenes in splits.items():
        (out / split).mkdir()
        for scene in scenes:
            (out / "images" / scene.image).write_bytes(png_bytes(render(scene, image_size)))
            if progress:
                progress()
        _write_jsonl(out / split / "scenes.jsonl", [s.to_json() for s in scenes])

    popularity = [c for c, _ in Counter(o.category for s in splits["train"] for o in s.objects).most_common()]
    def conversations(split: str, form: str, n_lookups: int) -> list[dict]:
        rng = random.Random(f"htc-vlm-{split}-questions/{seed}")
        return [r for s in splits[split]
                for r in train_conversations(s, rng, popularity, mme_pairs, mc_questions, form, n_lookups)]

    own = {split: conversations(split, mc_form, lookups) for split in ("train", "val")}
    for split, records in own.items():
        _write_json(out / split / "conversations.json", records)
        if lookups:
            _write_json(out / split / WITHOUT_LOOKUPS, [r for r in records if not r.get("lookup")])
    if mc_form != "letter" or lookups:
        letter = conversations("train", "letter", 0)
        _write_json(out / "train" / LETTER_FORM, letter)
        _write_json(out / "train" / REPLAY_FORM, replay_records(own["train"], letter))
    captions = [r for s in splits["train"] for r in caption_records(s)]
    _write_json(out / "train" / "captions.json", captions)
    if text_lookups:  # a stream of their own, so that the other files keep their bytes
        rng = random.Random(f"htc-vlm-text-lookups/{seed}")
        _write_json(out / "train" / ALIGN_LOOKUPS,
                    captions + [r for s in splits["train"] for r in text_lookup_records(s, rng, text_lookups, mc_form)])
    counts: dict[str, dict[str, int]] = {}
    for split, offset in (("val", 1), ("test", 0)):
        counts[split] = {}
        for fam, qs in test_questions(splits[split], seed + offset * 1_000_003).items():
            _write_jsonl(out / split / f"{fam}.jsonl", qs)
            counts[split][fam] = len(qs)
    meta = {"format_version": FORMAT_VERSION, "seed": seed, "image_size": image_size, "mme_pairs": mme_pairs,
            "mc_questions": mc_questions, "mc_form": mc_form, "lookups": lookups,
            **({"text_lookups": text_lookups} if text_lookups else {}),
            "train": n_train, "val": n_val, "test": n_test, "questions": counts["test"],
            "val_questions": counts["val"]}
    _write_json(out / "meta.json", meta)
    return meta


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


def _write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def vocabulary_texts() -> list[str]:
    """Every word the benchmark can write, for building the embedded tokenizer.

    Generated from a fixed sample of scenes plus every attribute value, so the vocabulary does not
    depend on the user's seed or sizes.
    """
    rng = random.Random("htc-vlm-vocab")
    scenes = [sample_scene(rng, f"v{i}", 64) for i in range(400)]
    texts = [IMAGE_TOKEN, CAPTION_PROMPT, SHAPE_CAPTION_PROMPT, SHORT_ANSWER, MC_SUFFIX, MME_SUFFIX, *POSITIONS, *LETTERS,
             *SHAPES, *COLORS, *TEXTURES, *SIZES, "yes no 0 1 2 3 4 5 6 7 8 9 USER ASSISTANT : . , ?"]
    popularity = [f"{c} {s}" for c in COLORS for s in SHAPES]
    for s in scenes:
        texts += [s.caption(), s.shape_caption()]
        for rec in train_conversations(s, rng, popularity):
            texts += [turn["value"] for turn in rec["conversations"]]
    for qs in test_questions(scenes, 0).values():
        texts += [q["text"] for q in qs]
    return texts
