"""The Hugging Face reference recipe of the chat families (Gemma 3, SmolVLM2), for ``pg_tune.bench``.

    python -m pg_tune.bench --preset gemma3-bench-mini --steps 6 --reps 2
    python -m pg_tune.bench --preset smolvlm2-bench-mini --steps 6 --reps 2

The recipe of the transformers / TRL vision fine-tuning examples for these models: the processor's
chat template renders the user turn (image + prompt) and the assistant's answer, the processor
tokenizes it with the images, ``labels`` are the ids with padding and image tokens set to -100
(the whole conversation is supervised), peft LoRA on the same modules as pg_tune, and
``transformers.Trainer`` with the model's own loss over full-sequence logits. Same data, batch,
LoRA rank, optimizer and precision as the pg_tune side (``pg_tune.bench``).
"""

from __future__ import annotations

import time


def run_reference_chat(args, samples, device: str) -> tuple[list[float], list, float]:
    import peft
    from PIL import Image
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from pg_tune.bench import _base_model, _recipe, _shape_of, _sync
    from pg_tune.models.family import family_for

    recipe = _recipe(args)
    family = family_for(args.preset)
    model, processor = _base_model(args, device)
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            lora_dropout=0.0,
            target_modules=family.lora_target_regex(recipe.lora),
            task_type="CAUSAL_LM",
        ),
    )
    tokenizer = processor.tokenizer
    # The examples mask padding and the image placeholders (Gemma 3: soft tokens, begin/end of image).
    names = ("image_token_id", "boi_token_id", "eoi_token_id")
    image_ids = {getattr(tokenizer, n, None) for n in names} | {processor.image_token_id}
    image_ids.discard(None)

    def collate_fn(examples):
        texts = [
            processor.apply_chat_template(
                [
                    {
                        "role": "user",
                        "content": [{"type": "image"}, {"type": "text", "text": family.render_prompt(s)}],
                    },
                    {"role": "assistant", "content": [{"type": "text", "text": s.suffix}]},
                ],
                tokenize=False,
            )
            for s in examples
        ]
        images = [[Image.open(s.image).convert("RGB")] for s in examples]
        batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        for token_id in image_ids:
            labels[labels == token_id] = -100
        batch["labels"] = labels
        return batch

    marks, tokens, losses = [], [], []

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            _sync(device)
            marks.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            _sync(device)
            marks.append(time.perf_counter())

    class CountingTrainer(Trainer):
        def compute_loss(self, model, inputs, *a, **kw):
            tokens.append(_shape_of(inputs))
            result = super().compute_loss(model, inputs, *a, **kw)
            loss = result[0] if isinstance(result, tuple) else result
            losses.append(float(loss.detach()))
            return result

    training_args = TrainingArguments(
        output_dir=recipe.output_dir,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-4,
        max_grad_norm=1.0,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        bf16=args.dtype == "bfloat16",
        remove_unused_columns=False,
        dataloader_num_workers=args.num_workers,
        dataloader_pin_memory=device == "cuda",
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=device == "cpu",
        seed=0,
        disable_tqdm=True,
    )
    trainer = CountingTrainer(
        model=model, args=training_args, train_dataset=samples, data_collator=collate_fn, callbacks=[Clock()]
    )
    trainer.train()
    return marks, tokens, losses[0] if losses else float("nan")
