"""DocVQA (SP-DocVQA): questions about document images, scored with ANLS.

One raw record of ``{split}_v1.0.json`` (under ``data``)::

    {"questionId": 337, "question": "what is the date mentioned in this letter?",
     "image": "documents/xnbl0037_1.png", "docId": 279, "answers": ["1/8/93"]}

Training sees one answer per question per epoch (drawn by the training sampler, as big_vision's
``choice(inkey="answers")``); evaluation keeps every answer in ``references`` for ANLS. Test-split
questions have no answers: evaluation rows then carry no references and an empty suffix, and
scoring reports them as ``docvqa/unscored`` (predictions still written, left out of ANLS).
The default prompt is ``answer en {question}``; big_vision's DocVQA transfer uses the raw question
(``prompt: "{question}"``). Selected in a recipe by::

    data:
      train:
        - format: docvqa
          annotations: docvqa/train_v1.0.json
          images: docvqa          # image paths in the JSON ("documents/x.png") are relative to this
"""

from __future__ import annotations

from pathlib import Path

from pg_tune.config.datasets import DocvqaOptions
from pg_tune.data.formats._common import BuildContext, apply_limit, format_prompt, limit_reached, read_json
from pg_tune.data.sample import DataError, Sample


def build(options: DocvqaOptions, ctx: BuildContext) -> list[Sample]:
    path = Path(options.annotations)
    data = read_json(path, "DocVQA annotations")
    records = data.get("data") if isinstance(data, dict) else None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected an object with a 'data' list (SP-DocVQA {{split}}_v1.0.json)")
    root = Path(options.images)
    samples: list[Sample] = []
    for i, record in enumerate(records):
        if limit_reached(samples, options.limit):
            break
        where = f"{path}[data][{i}]"
        if not isinstance(record, dict):
            ctx.bad_rows.bad("wrong_type", f"{where}: expected an object, got {type(record).__name__}")
            continue
        missing = [k for k in ("question", "image") if not isinstance(record.get(k), str)]
        if missing:
            ctx.bad_rows.bad("missing_field", f"{where}: missing or non-string field {missing[0]!r}")
            continue
        where = f"{path}[data][{i}](questionId={record.get('questionId')})"
        answers = record.get("answers", [])
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            ctx.bad_rows.bad("wrong_type", f"{where}: field 'answers' must be a list of strings")
            continue
        answers = [a.strip() for a in answers if a.strip()]
        if ctx.split == "train" and not answers:
            ctx.bad_rows.bad("empty_suffix", f"{where}: field 'answers' is empty: nothing to learn")
            continue
        image = root / record["image"]
        if not image.is_file():
            ctx.bad_rows.bad("missing_image", f"{where}: image file not found: {image}")
            continue
        prefix = format_prompt(options.prompt, where, question=" ".join(record["question"].split()))
        meta = {"question_id": record.get("questionId")}
        if ctx.split == "train":
            unique = list(dict.fromkeys(answers))
            group = {"group": f"{path}#{i}"} if len(unique) > 1 else {}
            samples.extend(
                Sample(image, prefix, a, f"{where}[answer {k}]", "docvqa", tuple(answers), {**meta, **group})
                for k, a in enumerate(unique)
            )
        else:
            suffix = answers[0] if answers else ""
            samples.append(Sample(image, prefix, suffix, where, "docvqa", tuple(answers), meta))
    return apply_limit(samples, options.limit)
