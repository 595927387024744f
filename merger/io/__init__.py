"""Checkpoint input/output: lazy sharded safetensors reading, streaming sharded writing, configs."""
