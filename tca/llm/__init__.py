"""The student: the decoder LLM, its prompts, the soft-label alignment loss and its trainer (packed rows,
block attention), and trie-constrained beam search. Nothing is imported here, so a stage that needs
one light module (`base_model`) does not load torch."""
