"""MME (Fu et al. 2023): per sub-task ``acc`` (questions right) + ``acc+`` (images with both of
their two questions right), each in percent. As the official ``calculation.py`` reports them, the
perception score sums the perception sub-tasks and the cognition score the four cognition ones
(commonsense reasoning, numerical calculation, text translation, code reasoning), apart; a
sub-task of neither official list (the scene benchmark's own) counts as perception.

A prediction is read as the official ``calculation.py`` does: "yes" / "no" if it is exactly one
(lower-cased), else by "yes" or "no" in its first four characters, else "other" (always wrong).
Rows carry their sub-task in ``category`` and their image in ``image``.
"""

from __future__ import annotations

from collections import defaultdict

COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse(text: str) -> str:
    t = text.strip().lower()
    if t in ("yes", "no"):
        return t
    head = t[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def score(questions: list[dict], predictions: dict[str, str]) -> dict:
    tasks: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for q in questions:
        right = parse(predictions[q["question_id"]]) == q["answer"].strip().lower()
        tasks[q.get("category", "all")][q["image"]].append(right)
    per_task = {}
    for task, images in sorted(tasks.items()):
        answers = [r for rs in images.values() for r in rs]
        acc = 100 * sum(answers) / len(answers)
        acc_plus = 100 * sum(all(rs) for rs in images.values()) / len(images)
        per_task[task] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    return {"perception": sum(t["score"] for k, t in per_task.items() if k not in COGNITION),
            "cognition": sum(t["score"] for k, t in per_task.items() if k in COGNITION),
            "per_task": per_task, "n": len(questions)}
