"""One image, one prompt: generate with a trained model and parse what it wrote (``pg-tune predict``).

The prompt's task decides how the answer is read: ``detect ...`` (every object with its box and
label), ``segment ...`` (a referring box and mask), anything else text; ``--task`` names it outright.
The model's family parses the answer (PaliGemma: ``<loc>``/``<seg>`` tokens; the chat families:
text boxes), each object scored by the tokens that wrote it; masks come back as COCO RLE.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pg_tune.tasks import BOX_TASKS, TASKS

if TYPE_CHECKING:
    from pg_tune.models.family import ModelFamily

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


def _rle(mask) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(mask.astype("uint8", order="F"))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii"), "area": int(mask.sum())}


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
    from pg_tune.evaluate.scoring import objects_json

    task = task or task_of_prompt(prompt)
    if task not in TASKS:
        raise ValueError(f"--task {task!r}: one of {', '.join(TASKS)}")
    if task not in family.tasks:
        from pg_tune.models.family import unsupported_task_message

        raise ValueError(unsupported_task_message(family, task))
    image = load_image(image_path, image_path)
    loaded = load_for_eval(model_ref, family, trust_remote_code=trust_remote_code, base=base)
    sample = Sample(image=image, prefix=prompt, suffix="", source=image_path, task=task)
    generated = generate_with_logprobs(
        loaded.model, loaded.processor, [sample], family, max_new_tokens=max_new_tokens, num_beams=num_beams
    )[0]
    notes = []
    parsed = []
    if task in BOX_TASKS:
        parsed = family.parse_output(generated.text, task, image.size, generated.scored_tokens())
        if task == "refer_segment" and family.mask_codec is None and any(o.mask is None for o in parsed):
            notes.append(
                "masks not decoded: pass --vae-path vae-oid.npz (big_vision's mask VQ-VAE); boxes only"
            )
    objects = objects_json(parsed)
    for obj, parsed_object in zip(objects, parsed, strict=True):
        if parsed_object.mask is not None:
            obj["mask"] = _rle(parsed_object.mask)
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
