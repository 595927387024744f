"""Clown-car MoE: compose dense fine-tunes into a Mixtral-style MoE; built-in gate initializers."""
