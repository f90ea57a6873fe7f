"""The Hugging Face reference recipe each family is benchmarked against (``pg_tune.measure.bench``).

    python -m pg_tune.measure.bench --preset bench-mini --steps 8 --reps 3
    python -m pg_tune.measure.bench --preset gemma3-bench-mini --steps 6 --reps 2

The recipe of the transformers docs, the HF fine-tuning posts and TRL's vision examples: the
family's own processor builds each batch as those examples do (``ModelFamily.reference_batch``:
PaliGemma's ``PaliGemmaProcessor(text, images, suffix=...)``; the chat families' chat template with
TRL's completion-only loss: the answer and its end-of-turn token supervised), peft LoRA on the same
modules as pg_tune, and ``transformers.Trainer`` with the model's own loss over full-sequence logits.
Same data in the same order, batch, LoRA rank, optimizer and precision as the pg_tune side, so both
sides' first steps see the same batch and their first losses must agree (``bench`` checks it).
"""

from __future__ import annotations

from pg_tune.measure.bench_setup import base_model, bench_recipe, shape_of, step_mark


def run_reference(args, samples, device: str, family) -> tuple[list[float], list, float]:
    import peft
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    recipe = bench_recipe(args)
    model, processor = base_model(args, device, family)
    # The examples' LoRA on the same target modules as pg_tune (a regex over the LM's layers).
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
    run_reference.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def collate_fn(examples):
        return family.reference_batch(processor, examples)

    marks, tokens, losses = [], [], []

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            marks.append(step_mark(device))

        def on_step_end(self, *_, **__):
            marks.append(step_mark(device))

    class CountingTrainer(Trainer):
        def _get_train_sampler(self, *_, **__):
            # The rows in file order, as the pg_tune side reads them: both first losses are of one batch.
            return SequentialSampler(self.train_dataset)

        def compute_loss(self, model, inputs, *a, **kw):
            tokens.append(shape_of(inputs))
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
