"""PaliGemma's token layout: the ids every checkpoint (and the tiny test tokenizer) shares."""

PAD_ID = 0
EOS_ID = 1
BOS_ID = 2
NEWLINE_ID = 108
TEXT_VOCAB_SIZE = 256000  # Gemma's own vocabulary; location and segmentation tokens follow it
LOC_TOKENS = [f"<loc{i:04d}>" for i in range(1024)]
SEG_TOKENS = [f"<seg{i:03d}>" for i in range(128)]
LOC_BASE_ID = TEXT_VOCAB_SIZE
SEG_BASE_ID = TEXT_VOCAB_SIZE + 1024
IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = SEG_BASE_ID + 128  # 257152 in the Hugging Face conversion
