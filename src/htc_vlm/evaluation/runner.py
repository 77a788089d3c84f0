"""``htc-vlm eval``: answer a LLaVA-style question file with a model and score it.

Writes ``predictions.jsonl`` (appended batch by batch, so a crash loses at most one batch; the
question ids already there are skipped on the next run) and ``metrics.json`` (atomically). Every
prediction line carries the run key (model fingerprint, question-file hash, answering settings;
spelled out in ``predictions.key.json``): an ``--out`` holding another run's predictions is refused,
never mixed in.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..data.images import check_header, image_under
from ..data.scenes import mc_prompt
from ..errors import HTCError
from ..io import atomic_write_bytes
from ..data.llava import PromptBuilder, get_template
from ..layout import check_context, image_prompt_ids
from ..inference import ImageEncoder
from .answering import answer_questions
from .scorers import get_benchmark
from .scorers.mcq import rotations


KEY_FILE = "predictions.key.json"  # the run key of predictions.jsonl, beside it


def _jsonl(path: Path, text: str, what: str):
    """(line number, row) of every non-empty line; a line that is not JSON is an error naming it."""
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise HTCError(f"{path}:{n}: not {what} ({e.msg})") from e


def read_questions(path: str | Path) -> list[dict]:
    """The rows of a LLaVA-style question file; a row the scorers could not use (a missing or
    wrong-typed field, a duplicate id, a line that is not JSON or not UTF-8) is named by its line."""
    path = Path(path)
    if not path.is_file():
        raise HTCError(f"question file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise HTCError(f"{path}:{line}: not UTF-8 text") from e
    rows, seen = [], {}
    for n, row in _jsonl(path, text, "JSON"):
        if not isinstance(row, dict):
            raise HTCError(f"{path}:{n}: not a JSON object")
        problem = _question_problem(row)
        if problem:
            raise HTCError(f"{path}:{n}: {problem}")
        qid = str(row["question_id"])
        if qid in seen:
            raise HTCError(f"{path}:{n}: duplicate question_id {qid!r} (first on line {seen[qid]})")
        seen[qid] = n
        rows.append(row | {"question_id": qid})
    if not rows:
        raise HTCError(f"{path} holds no questions")
    return rows


def _question_problem(row: dict) -> str | None:
    """What makes a question row unusable, or None."""
    for key in ("question_id", "image", "text"):
        if key not in row:
            return f"missing {key!r}"
    if not isinstance(row["question_id"], (str, int)) or isinstance(row["question_id"], bool):
        return f"question_id must be a string or an integer, got {row['question_id']!r}"
    if not isinstance(row["text"], str):
        return f"text must be a string, got {row['text']!r}"
    if not row["text"].strip():
        return "text is empty"
    answers = row.get("answers")
    if answers is not None:
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            return "answers must be a non-empty list of strings"
    elif not isinstance(row.get("answer"), str):
        return "missing 'answer' (the reference the scorer compares with)" if "answer" not in row else \
            f"answer must be a string, got {row['answer']!r}"
    if "options" in row:
        opts = row["options"]
        if not isinstance(opts, list) or not 2 <= len(opts) <= 8 or not all(isinstance(o, str) for o in opts):
            return "options must be a list of 2 to 8 strings"
        if row.get("answer") not in tuple("ABCDEFGH"[:len(opts)]):
            return f"answer must be one of the option letters {'ABCDEFGH'[:len(opts)]}, got {row.get('answer')!r}"
    return None


def _read_predictions(path: Path, benchmark: str, key: dict | None = None) -> dict[str, str]:
    """Question id -> prediction of a ``predictions.jsonl``; with ``key``, every line must carry it
    (made by the same model, question file and settings, see :func:`run_key`)."""
    if not path.exists():
        return {}
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise HTCError(f"{path} is not a predictions file (not UTF-8); delete it to start over") from e
    if text and not text.endswith("\n"):  # a line cut by a crash: drop it, it is answered again
        text = text[: text.rfind("\n") + 1]
        atomic_write_bytes(path, text.encode())
    done = {}
    for n, row in _jsonl(path, text, "a prediction line; delete the file to start over"):
        if not isinstance(row, dict) or not isinstance(row.get("question_id"), str) or "prediction" not in row:
            raise HTCError(f"{path}:{n} is not a prediction line; delete the file to start over")
        if row.get("benchmark") != benchmark:
            raise HTCError(f"{path}:{n} holds predictions for benchmark {row.get('benchmark')!r}, "
                           f"not {benchmark!r}; use another --out")
        if key is not None and row.get("key") != key["key"]:
            raise HTCError(f"{path}:{n} was answered by another model, question file or setting "
                           f"({_what_differs(path, key)}); use another --out or delete the file")
        done[row["question_id"]] = row["prediction"]
    return done


def run_key(model, benchmark: str, questions_file: str | Path, **settings) -> dict:
    """What makes a run's predictions: the model's fingerprint (weights and, for training-free
    methods, their settings), the question file's bytes and the answering settings (the discrete
    features read included)."""
    data = Path(questions_file).read_bytes()
    key = {"benchmark": benchmark, "model": model.fingerprint(), "questions": hashlib.sha256(data).hexdigest(),
           **settings}
    key["key"] = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return key


def _what_differs(predictions: Path, key: dict) -> str:
    """Name the parts of ``key`` that differ from the run key saved beside ``predictions``."""
    try:
        saved = json.loads(predictions.with_name(KEY_FILE).read_text())
        diff = [k for k in sorted(set(saved) | set(key)) if k != "key" and saved.get(k) != key.get(k)]
    except (OSError, ValueError, TypeError, AttributeError):
        return f"no readable {KEY_FILE} beside it"
    return "differs in: " + ", ".join(diff) if diff else f"its lines carry another key than {KEY_FILE}"


def accuracy_by(predictions: str | Path, questions: list[dict], group, benchmark: str = "scenes_open") -> dict[str, float]:
    """VQA accuracy (%) of the answered questions per ``group(question)`` (``None`` leaves one out),
    from a ``predictions.jsonl`` of :func:`run_eval`."""
    from .scorers import vqa

    preds = _read_predictions(Path(predictions), benchmark)
    acc: dict[str, list[float]] = {}
    for q in questions:
        g, qid = group(q), str(q["question_id"])
        if g is not None and qid in preds:
            acc.setdefault(g, []).append(vqa.accuracy(preds[qid], [q["answer"]]))
    return {g: 100 * sum(v) / len(v) for g, v in sorted(acc.items())}


def prompt_for(row: dict, suffix: str) -> str:
    text = mc_prompt(row["question"], row["options"]) if "question" in row and "options" in row else row["text"]
    return f"{text} {suffix}".strip() if suffix else text


@torch.no_grad()
def answer_by_likelihood(model, tokenizer, rows: list[dict], source: ImageEncoder, prompt, template: str,
                         batch_size: int) -> list[dict]:
    """Pick the option letter whose token the model finds most likely after the prompt."""
    builder = PromptBuilder(tokenizer, get_template(template), model.config)
    out = []
    for b in range(0, len(rows), batch_size):
        chunk = rows[b:b + batch_size]
        pix, q = source.batch([r["image"] for r in chunk])
        rows_ids = [builder.question_ids(prompt(r)) for r in chunk]
        logits = model.next_token_logits(pix, builder.prefix_ids(), rows_ids, latents=q,
                                         pad_token_id=tokenizer.pad_token_id)  # (Q, V), one image per row
        for r, row_logits in zip(chunk, logits):
            letters = "ABCDEFGH"[: len(r.get("options") or "ABCD")]
            letter_ids = [tokenizer.convert_tokens_to_ids(x) for x in letters]
            out.append({"question_id": r["question_id"], "prediction": letters[int(row_logits[letter_ids].argmax())]})
    return out


def scored_rows(benchmark: str, questions_file: str | Path) -> list[dict]:
    """The question rows as the benchmark scores them: MMBench's circular evaluation asks every
    question once per rotation of its options."""
    rows = read_questions(questions_file)
    return [r for row in rows for r in rotations(row)] if get_benchmark(benchmark).name == "mmbench" else rows


def run_eval(model, tokenizer, benchmark: str, questions_file: str | Path, images: str | Path, out: str | Path,
             method: str = "model", features=None, template: str = "plain", batch_size: int = 32,
             max_new_tokens: int = 8, likelihood: bool = False, image_norm: str | None = None, resize: bool = False,
             progress=None, model_name: str = "") -> dict:
    bench = get_benchmark(benchmark)
    if likelihood and not bench.multiple_choice:
        raise HTCError(f"--likelihood is for multiple-choice benchmarks; {bench.name} is open-ended")
    rows = scored_rows(benchmark, questions_file)
    source = ImageEncoder(model, features, image_norm=image_norm, resize=resize, root=Path(images))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pred_path = out / "predictions.jsonl"
    key = run_key(model, bench.name, questions_file, method=method, template=template, max_new_tokens=max_new_tokens,
                  likelihood=likelihood, image_norm=source.image_norm, resize=resize,
                  features=features.digest(r["image"] for r in rows) if features is not None else None)
    done = _read_predictions(pred_path, bench.name, key)
    if not done:
        atomic_write_bytes(out / KEY_FILE, (json.dumps(key, indent=1) + "\n").encode())
    todo = [r for r in rows if r["question_id"] not in done]
    for name, qid in {r["image"]: r["question_id"] for r in reversed(todo)}.items():  # each image, its first question
        try:
            check_header(image_under(images, name), source.processing)
        except HTCError as e:
            raise HTCError(f"question {qid!r}: {e}") from e

    def prompt(r):
        return prompt_for(r, bench.prompt_suffix)

    builder = PromptBuilder(tokenizer, get_template(template), model.config)
    head = len(image_prompt_ids(model.config, builder.prefix_ids()))
    for r in todo:  # before any answer: an over-long question is refused by its id
        check_context(model.config, head + len(builder.question_ids(prompt(r))) + (0 if likelihood else max_new_tokens),
                      f"question {r['question_id']!r}")
    with open(pred_path, "a") as f:
        answers = (answer_by_likelihood(model, tokenizer, todo, source, prompt, template, batch_size) if likelihood
                   else answer_questions(model, tokenizer, todo, source, prompt, template, batch_size,
                                         max_new_tokens, progress))
        for a in answers:
            f.write(json.dumps({"benchmark": bench.name, "key": key["key"], **a}) + "\n")
            f.flush()
            done[a["question_id"]] = a["prediction"]
    metrics = bench.score(rows, done)
    result = {"benchmark": bench.name, "method": method, "model": model_name, "questions": str(questions_file),
              "scores": {bench.name: metrics[bench.headline]}, "metrics": metrics, "protocol": bench.source,
              "run_key": key}
    atomic_write_bytes(out / "metrics.json", (json.dumps(result, indent=1) + "\n").encode())
    return result
