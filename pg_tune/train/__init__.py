"""Training: the loop (``loop.py``) and the small modules it calls (loss, checkpoints, resume, ...)."""
