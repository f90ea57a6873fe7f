"""One image, one prompt: generate with a trained model and parse what it wrote (``pg-tune predict``).

The prompt's task decides how the answer is read: ``detect ...`` (every object with its box and
label), ``segment ...`` (a referring box and mask), anything else text; ``--task`` names it outright.
The model's family parses the answer (PaliGemma: ``<loc>``/``<seg>`` tokens; the chat families:
text boxes), each object scored by the tokens that wrote it; masks come back as COCO RLE.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pg_tune.tasks import BOX_TASKS, TASKS

if TYPE_CHECKING:
    from pg_tune.models.family import ModelFamily, ParsedObject

_PROMPT_TASKS = (
    ("detect ", "detect"),
    ("segment ", "refer_segment"),
    ("caption", "caption"),
    ("cap ", "caption"),
    ("describe", "caption"),
    ("answer ", "vqa"),
    ("ocr", "ocr"),
)


def task_of_prompt(prompt: str) -> str:
    """The task a big_vision-style prompt asks for (``detect cat`` -> ``detect``); else ``caption``,
    i.e. the answer is read as text."""
    text = prompt.strip().lower()
    return next((task for start, task in _PROMPT_TASKS if text.startswith(start)), "caption")


def prompt_task(prompt: str, family: ModelFamily, task: str | None = None) -> str:
    """The task named outright (``--task``), else read from the prompt; ``ValueError`` when it is no
    task, or one ``family`` cannot parse (e.g. ``segment ...`` for a family without mask tokens)."""
    task = task or task_of_prompt(prompt)
    if task not in TASKS:
        raise ValueError(f"task {task!r}: one of {', '.join(TASKS)}")
    if task not in family.tasks:
        from pg_tune.models.family import unsupported_task_message

        raise ValueError(unsupported_task_message(family, task))
    return task


def _rle(mask) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(mask.astype("uint8", order="F"))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii"), "area": int(mask.sum())}


def read_answer(
    family: ModelFamily,
    text: str,
    task: str,
    image_size: tuple[int, int],
    token_logprobs: Sequence[tuple[int, int, float]] | None = None,
) -> tuple[list[dict[str, Any]], list[ParsedObject], list[str]]:
    """What an answer says, JSON-ready: the family's parsed objects for box tasks (label, pixel box,
    score from the tokens that wrote it, raw tokens, mask as COCO RLE), the parsed objects themselves,
    and notes (masks that could not be decoded). Text tasks give no objects. ``pg-tune predict`` and
    ``pg-tune serve`` both read answers with it."""
    from pg_tune.evaluate.scoring import objects_json

    notes: list[str] = []
    parsed: list[ParsedObject] = []
    if task in BOX_TASKS:
        parsed = family.parse_output(text, task, image_size, token_logprobs)
        if task == "refer_segment" and family.mask_codec is None and any(o.mask is None for o in parsed):
            notes.append(
                "masks not decoded: pass --vae-path vae-oid.npz (big_vision's mask VQ-VAE); boxes only"
            )
    objects = objects_json(parsed)
    for obj, parsed_object in zip(objects, parsed, strict=True):
        if parsed_object.mask is not None:
            obj["mask"] = _rle(parsed_object.mask)
    return objects, parsed, notes


def predict_one(
    model_ref: str,
    family: ModelFamily,
    image_path: str,
    prompt: str,
    task: str | None = None,
    max_new_tokens: int = 64,
    num_beams: int = 1,
    draw_path: str | None = None,
    trust_remote_code: bool = False,
    base: str | None = None,
) -> dict[str, Any]:
    """Generate for one image and prompt with ``model_ref`` (of ``family``, its mask codec bound);
    returns the raw text and the parsed objects, JSON-ready."""
    from pg_tune.data.images import load_image
    from pg_tune.data.sample import Sample
    from pg_tune.evaluate.generate import generate_with_logprobs
    from pg_tune.evaluate.run import load_for_eval

    task = prompt_task(prompt, family, task)
    image = load_image(image_path, image_path)
    loaded = load_for_eval(model_ref, family, trust_remote_code=trust_remote_code, base=base)
    sample = Sample(image=image, prefix=prompt, suffix="", source=image_path, task=task)
    generated = generate_with_logprobs(
        loaded.model, loaded.processor, [sample], family, max_new_tokens=max_new_tokens, num_beams=num_beams
    )[0]
    objects, parsed, notes = read_answer(family, generated.text, task, image.size, generated.scored_tokens())
    if draw_path:
        from pg_tune.evaluate.report import draw_annotations

        drawn = [
            {**o, "pixels": p.mask} if p.mask is not None else o for o, p in zip(objects, parsed, strict=True)
        ]
        draw_annotations(image, [], drawn, max_side=None).save(draw_path)
    return {
        "model": loaded.description,
        "family": family.name,
        "prompt": prompt,
        "task": task,
        "prediction": generated.text,
        "image_size": list(image.size),
        "image": str(Path(image_path)),
        "objects": objects,
        "notes": notes,
    }
