"""After training: a run folder read (``run``), its adapter merged into full-precision weights
(``merged``: whole-model parity; ``stream``: shard by shard, per-module parity), a model card
(``model_card``) and a push to the Hugging Face Hub (``hub``)."""
