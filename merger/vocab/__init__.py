"""Vocabularies of a merge: reading each input's tokenizer (read), choosing the output vocabulary
(base, a model's, or the union; plan), aligning embedding rows to it by token string (align), and
writing the output tokenizer files with the chosen chat template (write, templates)."""
