"""What the chat-template families (Gemma 3, SmolVLM2) share: prompts, text boxes, the collator.

These models have no location or mask tokens, so box tasks are written as text, one documented
convention for every such family::

    [ymin, xmin, ymax, xmax] label ; [ymin, xmin, ymax, xmax] label

Coordinates are integers normalised to 0..1000 by the ORIGINAL image height/width
(``round(v / size * 1000)``, clipped), in PaliGemma's y, x, y, x order so one mental model serves
every family; referring answers are the box alone. ``parse_text_boxes`` reads what models emit:
spacing, decimals, missing labels, brackets or parentheses, a box cut off at the end, ``ymin >
ymax`` (sorted), values past 1000 (clipped). It never raises on text.

Prompts: samples carry big_vision's task prefixes (``caption en``, ``answer en {q}``,
``detect cat ; dog``, ``ocr``, ...), which instruction-tuned chat models were never trained on;
``chat_prompt`` turns each into a plain instruction (table in ``_PROMPTS``) and passes any other
prefix through unchanged.

The collator (``ChatCollator``) lays out one user turn holding the image and the prompt, then the
assistant turn holding the target, exactly as the family's chat template renders them; a family
supplies the two template strings and the image expansion. Labels cover the target and its
end-of-turn token only; the template's trailing newline and the pads stay -100. Only the target is
ever truncated.
"""

from __future__ import annotations

import abc
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from pg_tune.data.collate import one_index_per_pair, padded_length, pair_rows
from pg_tune.data.images import load_image
from pg_tune.data.sample import DataError, Sample
from pg_tune.evaluate.metrics.detection import object_confidence
from pg_tune.models.family import ImageBudget, ModelFamily, ParsedObject

if TYPE_CHECKING:
    from transformers import ProcessorMixin


IGNORE_INDEX = -100
BOX_SCALE = 1000
OBJECT_SEPARATOR = " ; "
TEXT_BOX_TASKS = frozenset({"caption", "vqa", "docvqa", "ocr", "detect", "refer_detect"})
"""Tasks a family without mask tokens renders and parses (no ``refer_segment``)."""

# ---- prompts -------------------------------------------------------------------------------------

_BOX_FORMAT = "[ymin, xmin, ymax, xmax] from 0 to 1000"
_PROMPTS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^(?:caption|cap|describe) en$"), "Caption this image."),
    (re.compile(r"^(?:caption|cap|describe) (\w+)$"), "Caption this image in language {0}."),
    (re.compile(r"^answer en (.+)$", re.S), "{0}"),
    (re.compile(r"^answer (\w+) (.+)$", re.S), "{1} Answer in language {0}."),
    (re.compile(r"^ocr$"), "Read the text in this image."),
    (
        re.compile(r"^detect (.+)$", re.S),
        "Detect {0}. Answer with the box " + _BOX_FORMAT + " and label of each, separated by ' ; '.",
    ),
]
_REFER_PROMPT = "Find {0}. Answer with its box " + _BOX_FORMAT + "."
INSTRUCTION_WORDS = tuple(
    sorted({w for _, t in _PROMPTS for w in re.findall(r"[A-Za-z]+", t + _REFER_PROMPT)})
)
"""Words of the instructions above (the tiny tokenizers make each one token)."""


def chat_prompt(sample: Sample) -> str:
    """The instruction a chat model sees for ``sample`` (big_vision prefixes mapped, others kept)."""
    prefix = sample.prefix.strip()
    if sample.task == "refer_detect":
        match = re.match(r"^(?:detect|segment) (.+)$", prefix, re.S)
        expression = match.group(1) if match else prefix
        return _REFER_PROMPT.format(expression)
    for pattern, template in _PROMPTS:
        match = pattern.match(prefix)
        if match:
            return template.format(*match.groups())
    return prefix


# ---- boxes as text -------------------------------------------------------------------------------


def _norm(v: float, size: int) -> int:
    return min(BOX_SCALE, max(0, round(v / size * BOX_SCALE)))


def text_box(box_xyxy: Sequence[float], image_size: tuple[int, int]) -> str:
    """``[ymin, xmin, ymax, xmax]`` of a pixel box, normalised to 0..1000."""
    width, height = image_size
    x0, y0, x1, y1 = box_xyxy
    return f"[{_norm(y0, height)}, {_norm(x0, width)}, {_norm(y1, height)}, {_norm(x1, width)}]"


def render_text_boxes(sample: Sample) -> str:
    """A box task's target text: ``[..] label`` per object joined by `` ; `` (referring: the box)."""
    if sample.image_size is None:
        raise DataError(f"{sample.source}: structured targets need the image size")
    parts = []
    for obj in sample.targets:
        box = text_box(obj.box, sample.image_size)
        label = "" if sample.task == "refer_detect" else obj.label
        parts.append(f"{box} {label}" if label else box)
    return OBJECT_SEPARATOR.join(parts)


_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_TEXT_BOX = re.compile(r"[\[(]" + ",".join([_NUMBER] * 4) + r"[\])]")


def parse_text_boxes(
    text: str,
    task: str,
    image_size: tuple[int, int],
    token_logprobs: Sequence[tuple[int, int, float]] | None = None,
) -> list[ParsedObject]:
    """Objects in ``[ymin, xmin, ymax, xmax] label ; ...`` text, boxes in original-image pixels.

    Referring tasks keep the first box only; an empty box (zero height or width after sorting and
    clipping) is dropped, as big_vision drops ``ymax <= ymin``. With ``token_logprobs``
    (``(start, end, logprob)`` per generated token) each object's score is exp(mean log-probability)
    of the tokens that wrote its box and label, so COCO mAP ranks boxes by the model's belief.
    """
    if not isinstance(text, str):
        return []
    width, height = image_size
    matches = list(_TEXT_BOX.finditer(text))
    objects: list[ParsedObject] = []
    for k, match in enumerate(matches):
        values = [float(v) for v in match.groups()]
        if not all(math.isfinite(v) for v in values):
            continue
        ymin, xmin, ymax, xmax = (min(BOX_SCALE, max(0.0, v)) for v in values)
        ymin, ymax = sorted((ymin, ymax))
        xmin, xmax = sorted((xmin, xmax))
        if ymax <= ymin or xmax <= xmin:
            if task in ("refer_detect", "refer_segment"):
                return []
            continue
        end = matches[k + 1].start() if k + 1 < len(matches) else len(text)
        written = text[match.end() : end].split(OBJECT_SEPARATOR.strip())[0]
        label = written.strip(" \n:-,.")
        span = (match.start(), match.end() + len(written.rstrip()))
        score = object_confidence(span, token_logprobs) if token_logprobs else None
        box = (
            xmin / BOX_SCALE * width,
            ymin / BOX_SCALE * height,
            xmax / BOX_SCALE * width,
            ymax / BOX_SCALE * height,
        )
        objects.append(
            ParsedObject(label=label, box=box, score=score, tokens={"box_1000": [ymin, xmin, ymax, xmax]})
        )
        if task in ("refer_detect", "refer_segment"):
            break
    return objects


# ---- the collator --------------------------------------------------------------------------------


@dataclass
class ChatRow:
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    untruncated_text_length: int


class ChatCollator(abc.ABC):
    """One user turn (image + prompt), one assistant turn (target); see the module docstring.

    A family implements ``_images`` (pixel inputs of a batch plus each image's expanded placeholder
    string) and ``_extra`` (its attention-rule inputs); the rest is shared. Each batch is as wide as
    its longest row rounded up to a multiple of ``pad_to_multiple_of``.
    """

    def __init__(
        self,
        family: Any,
        processor: Any,
        max_text_length: int,
        train: bool = True,
        pad_to_multiple_of: int = 1,
    ):
        self.family = family
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_text_length = max_text_length
        self.train = train
        self.pad_to_multiple_of = pad_to_multiple_of
        self.reserved = family.reserved_tokens(processor)
        self.end_of_turn_id: int = family.end_of_turn_id(processor)
        self.pad_id: int = self.tokenizer.pad_token_id

    # family parts
    @abc.abstractmethod
    def _images(self, samples: Sequence[Sample]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Image tensors for the batch and, per sample, the text that stands for its image."""

    def _extra(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The family's attention-rule inputs for a padded batch (Gemma 3: ``token_type_ids``)."""
        return {}

    # shared
    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _parts(self, sample: Sample) -> tuple[str, list[int], list[int], list[int]]:
        """The prompt, its own tokens, the supervised target tokens (+ end of turn) and the trailer."""
        self.family.check_task(sample)
        self.family.check_text(sample, self.reserved)
        prompt = self.family.render_prompt(sample)
        prompt_tokens = self._tokens(prompt)
        if not self.train:
            return prompt, prompt_tokens, [], []
        target = self.family.render_target(sample)
        if not target.strip():
            raise DataError(f"{sample.source}: empty suffix: a training row needs a target to learn")
        head, tail = self.family.assistant_turn(target)
        return prompt, prompt_tokens, self._tokens(head) + [self.end_of_turn_id], self._tokens(tail)

    def _room(self, sample: Sample, prompt_tokens: list[int]) -> int:
        """Target tokens allowed after the prompt within ``data.max_text_length``."""
        room = self.max_text_length - len(prompt_tokens)
        if not self.train and room < 0:
            raise DataError(
                f"{sample.source}: prompt is {len(prompt_tokens)} tokens, over data.max_text_length="
                f"{self.max_text_length}"
            )
        if self.train and room < 1:
            raise DataError(
                f"{sample.source}: prompt is {len(prompt_tokens)} tokens, leaving no room for the target within "
                f"data.max_text_length={self.max_text_length}; raise it"
            )
        return room

    def encode(self, sample: Sample, image_text: str) -> ChatRow:
        """Ids and labels of one sample whose image stands as ``image_text`` (no padding).

        ``data.max_text_length`` budgets the prompt's own tokens, the target's and its end-of-turn
        token; the chat template's scaffolding and the image block are not counted, so one recipe
        fits every family (PaliGemma counts its bos and newline, two tokens).
        """
        prompt, prompt_tokens, supervised, trailer = self._parts(sample)
        room = self._room(sample, prompt_tokens)
        prompt_ids = self._tokens(self.family.user_turn(image_text, prompt))
        if not self.train:
            return ChatRow(prompt_ids, [IGNORE_INDEX] * len(prompt_ids), False, len(prompt_tokens))
        full = len(prompt_tokens) + len(supervised)
        truncated = len(supervised) > room
        if truncated:
            supervised, trailer = supervised[:room], []
        return ChatRow(
            input_ids=prompt_ids + supervised + trailer,
            labels=[IGNORE_INDEX] * len(prompt_ids) + supervised + [IGNORE_INDEX] * len(trailer),
            truncated=truncated,
            untruncated_text_length=full,
        )

    def text_length(self, sample: Sample) -> tuple[int, int]:
        """Budgeted text tokens (see ``encode``) after and before truncation; no image is read."""
        _, prompt_tokens, supervised, _ = self._parts(sample)
        room = self._room(sample, prompt_tokens)
        return len(prompt_tokens) + min(len(supervised), room), len(prompt_tokens) + len(supervised)

    def row_length(self, sample: Sample) -> int:
        """Positions of the encoded row: the image's text (its size read from the file header when
        the family's image tokens depend on it), the turns and the budgeted text."""
        image_text, _ = self.family.image_text(self.processor, sample)
        return len(self.encode(sample, image_text).input_ids)

    def max_row_length(self) -> int:
        """The largest image's text and the turns around it, plus ``data.max_text_length``."""
        image_text, _ = self.family.image_text(self.processor, None)
        _, trailer = self.family.assistant_turn("x")
        turns = self._tokens(self.family.user_turn(image_text, ""))
        return len(turns) + self.max_text_length + len(self._tokens(trailer))

    def __call__(self, batch: Sequence[tuple[int, Sample]]) -> dict[str, torch.Tensor]:
        pixels, image_texts = self._images([sample for _, sample in batch])
        return {**self._text_batch(batch, image_texts), **pixels}

    def text_batch(self, batch: Sequence[tuple[int, Sample]]) -> dict[str, torch.Tensor]:
        """Everything but the pixel inputs."""
        _, image_texts = self._images([sample for _, sample in batch])
        return self._text_batch(batch, image_texts)

    def preference_batch(self, batch: Sequence[tuple[int, Sample]]) -> dict[str, torch.Tensor]:
        """``B`` preference pairs as ``2B`` training rows (chosen, then rejected: ``pair_rows``), each
        image processed once: the pixel inputs hold ``B`` images, the loss encodes each once per pair."""
        pixels, image_texts = self._images([sample for _, sample in batch])
        text = self._text_batch(pair_rows(batch), [*image_texts, *image_texts])
        return {**one_index_per_pair(text, len(batch)), **pixels}

    def preference_text_batch(self, batch: Sequence[tuple[int, Sample]]) -> dict[str, torch.Tensor]:
        """``preference_batch`` without the pixel inputs (the feature cache supplies the features)."""
        return one_index_per_pair(self.text_batch(pair_rows(batch)), len(batch))

    def _text_batch(
        self, batch: Sequence[tuple[int, Sample]], image_texts: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        rows = [self.encode(sample, text) for (_, sample), text in zip(batch, image_texts, strict=True)]
        length = padded_length(max(len(r.input_ids) for r in rows), self.pad_to_multiple_of)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row.input_ids)
            # Training pads on the right; generation on the left so every prompt ends at one column.
            cols = slice(0, n) if self.train else slice(length - n, length)
            input_ids[i, cols] = torch.tensor(row.input_ids)
            attention_mask[i, cols] = 1
            labels[i, cols] = torch.tensor(row.labels)
        out = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            **self._extra(input_ids),
            "sample_index": torch.tensor([index for index, _ in batch], dtype=torch.long),
            "truncated": torch.tensor([r.truncated for r in rows], dtype=torch.bool),
        }
        if self.train:
            out["labels"] = labels
        return out

    def _load_images(self, samples: Sequence[Sample]) -> list:
        return [load_image(sample.image, sample.source) for sample in samples]


# ---- the family base -----------------------------------------------------------------------------


class ChatFamily(ModelFamily):
    """A chat-template image-text model without location/mask tokens (Gemma 3, SmolVLM2).

    Subclasses name their classes, module paths, tiny-preset module and LoRA layer patterns, and
    implement the turn strings, the collator and the image / decoder entry points.
    """

    tasks = TEXT_BOX_TASKS
    collator_class: ClassVar[type[ChatCollator]]

    # turns (what the chat template renders around the image, the prompt and the target)
    @abc.abstractmethod
    def user_turn(self, image_text: str, prompt: str) -> str:
        """Everything before the target: the user turn and the assistant turn's opening."""

    @abc.abstractmethod
    def assistant_turn(self, target: str) -> tuple[str, str]:
        """Target text before the end-of-turn token (supervised) and the template's text after it."""

    @abc.abstractmethod
    def end_of_turn_id(self, processor: Any) -> int:
        """The token that ends the assistant's turn (supervised; generation stops there)."""

    @abc.abstractmethod
    def image_text(self, processor: Any, sample: Sample | None) -> tuple[str, int]:
        """The text that stands for ``sample``'s image in the user turn (image tokens and markers,
        as the processor expands it) and the encoder passes it takes; for the largest image the
        processor's settings allow when ``sample`` is None. Reads the image's size, never its pixels."""

    def image_budget(self, processor: Any, sample: Sample | None = None) -> ImageBudget:
        text, passes = self.image_text(processor, sample)
        return ImageBudget(len(processor.tokenizer(text, add_special_tokens=False)["input_ids"]), passes)

    def largest_image_text(self, processor: Any) -> str:
        """The text that stands for the largest image the processor's settings allow."""
        return self.image_text(processor, None)[0]

    def sequence_overhead(self, processor: Any) -> int:
        """The largest image block plus the chat template's turns: what ``encode`` does not budget."""
        tokens = processor.tokenizer(
            self.user_turn(self.largest_image_text(processor), "") + "".join(self.assistant_turn("")),
            add_special_tokens=False,
        )["input_ids"]
        return len(tokens)

    # sequences
    fixed_reserved: ClassVar[frozenset[str]]
    """The family's control strings, refused in sample text even before a processor is loaded."""

    def reserved_tokens(self, processor: ProcessorMixin | None) -> frozenset[str]:
        """Every special token of the tokenizer (turn markers, image placeholders, bos/eos/pad)."""
        if processor is None:
            return self.fixed_reserved
        tokenizer = processor.tokenizer
        named = set(tokenizer.all_special_tokens) | {
            str(t) for t in tokenizer.added_tokens_decoder.values() if getattr(t, "special", False)
        }
        return frozenset(t for t in named | self.fixed_reserved if t)

    def render_prompt(self, sample: Sample) -> str:
        return chat_prompt(sample)

    def render_target(self, sample: Sample) -> str:
        """``sample.suffix`` for text tasks, else the text boxes (module docstring)."""
        self.check_task(sample)
        if not sample.targets:
            return sample.suffix
        return render_text_boxes(sample)

    def collator(
        self, processor, max_text_length: int, train: bool = True, pad_to_multiple_of: int = 1
    ) -> ChatCollator:
        return self.collator_class(
            self, processor, max_text_length, train=train, pad_to_multiple_of=pad_to_multiple_of
        )

    # generation and parsing
    def generation_kwargs(self, processor: ProcessorMixin) -> dict[str, Any]:
        tokenizer = processor.tokenizer
        ends = list(dict.fromkeys([self.end_of_turn_id(processor), tokenizer.eos_token_id]))
        return {"eos_token_id": ends, "pad_token_id": tokenizer.pad_token_id}

    def decode(self, processor: ProcessorMixin, token_ids: Sequence[int]) -> str:
        """Cut at the first end-of-turn / eos; special tokens dropped, surrounding space stripped."""
        ends = set(self.generation_kwargs(processor)["eos_token_id"])
        ids = list(token_ids)
        for k, token in enumerate(ids):
            if token in ends:
                ids = ids[:k]
                break
        return processor.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def parse_output(
        self,
        text: str,
        task: str,
        image_size: tuple[int, int],
        token_logprobs: Sequence[tuple[int, int, float]] | None = None,
    ) -> list[ParsedObject]:
        """Text boxes (module docstring), each scored by the tokens that wrote it."""
        return parse_text_boxes(text, task, image_size, token_logprobs)

    def reference_image_kwargs(self, processor: ProcessorMixin) -> dict[str, Any]:
        """Image settings the HF recipe passes to the processor call (a processor's call defaults
        override its image processor's attributes): the recipe's ``model.image`` budget, as users pass it."""
        return {}

    def reference_batch(
        self, processor: ProcessorMixin, samples: Sequence[Sample]
    ) -> dict[str, torch.Tensor]:
        """TRL's ``SFTTrainer`` recipe for prompt-completion data (the transformers vision examples'
        collate function with TRL's default completion-only loss): the processor's chat template renders
        the user turn (image + prompt) and the answer, the processor tokenizes it (no second ``<bos>``:
        the template writes it, as TRL passes ``add_special_tokens=False``), and ``labels`` are the
        answer's ids and its end-of-turn token; the prompt, the image, the template's newline after the
        end of turn and the padding are -100.

        Supervising the whole conversation instead (the examples' older collate functions, which mask
        only padding and the ``<image>`` placeholders) trains the model to predict the user's prompt and
        the image markers (SmolVLM2's ``<row_1_col_1>``, ``<global-img>``): not the task, and a
        different loss from the same batch. pg_tune supervises the answer and its end-of-turn token
        only (``ChatCollator``), so on the same batch both sides' losses are equal."""
        from PIL import Image

        def conversation(sample: Sample, answer: bool) -> list[dict]:
            user = {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": self.render_prompt(sample)}],
            }
            if not answer:
                return [user]
            return [user, {"role": "assistant", "content": [{"type": "text", "text": sample.suffix}]}]

        texts = [processor.apply_chat_template(conversation(s, True), tokenize=False) for s in samples]
        prompts = [
            processor.apply_chat_template(conversation(s, False), tokenize=False, add_generation_prompt=True)
            for s in samples
        ]
        images = [[Image.open(s.image).convert("RGB")] for s in samples]
        kwargs = {"return_tensors": "pt", "padding": True, "add_special_tokens": False}
        kwargs.update(self.reference_image_kwargs(processor))
        batch = processor(text=texts, images=images, **kwargs)
        prompt_lengths = processor(text=prompts, images=images, **kwargs)["attention_mask"].sum(dim=1)
        end_of_turn = self.end_of_turn_id(processor)
        labels = torch.full_like(batch["input_ids"], -100)
        for row, (ids, mask) in enumerate(zip(batch["input_ids"], batch["attention_mask"], strict=True)):
            real = mask.nonzero().flatten()  # the row's tokens, whichever side the padding is on
            answer = real[int(prompt_lengths[row]) :]
            ends = (ids[answer] == end_of_turn).nonzero().flatten()
            answer = answer[: int(ends[0]) + 1] if len(ends) else answer
            labels[row, answer] = ids[answer]
        batch["labels"] = labels
        return batch

    # export and hub
    def usage_snippet(self, base_id: str | None, repo_or_dir: str, merged: bool) -> str:
        model_cls, processor_cls = self.model_class.__name__, self.processor_class.__name__
        if merged:
            load = f'model = {model_cls}.from_pretrained("{repo_or_dir}")\n'
        else:
            load = (
                f'base = {model_cls}.from_pretrained("{base_id or "BASE"}", dtype=torch.bfloat16)\n'
                f'model = PeftModel.from_pretrained(base, "{repo_or_dir}")\n'
            )
        code = (
            "import torch\n"
            + ("" if merged else "from peft import PeftModel\n")
            + f"from transformers import {model_cls}, {processor_cls}\n\n"
            + load
            + f'processor = {processor_cls}.from_pretrained("{repo_or_dir}")\n'
            + 'messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]\n'
            + "text = processor.apply_chat_template(messages, add_generation_prompt=True)\n"
            + "# the template already wrote the special tokens (Gemma 3's <bos>): add none twice\n"
            + 'inputs = processor(images=[[image]], text=[text], return_tensors="pt", add_special_tokens=False)\n'
        )
        return (
            f"```python\n{code}```\n\n"
            "Prompts are one user turn (the image, then the instruction) through the processor's chat "
            "template; boxes are written as `[ymin, xmin, ymax, xmax] label` with coordinates from 0 to 1000.\n"
        )
