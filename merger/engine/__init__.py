"""The bundled inference engine: load a Llama / Mistral / Mixtral / Qwen2-MoE checkpoint and generate.

Entry points: `model.load_model`, `tokenizer.load_tokenizer`, `generate.generate`.
"""
