"""The chat-template families (Gemma 3, SmolVLM2): one folder, shared turn collator and text boxes.

``base.py`` holds what they share (``ChatFamily``, ``ChatCollator``, the text-box codec and task
prompts); ``gemma3.py`` / ``smolvlm.py`` each family, ``*_tiny.py`` their tiny presets.
"""
