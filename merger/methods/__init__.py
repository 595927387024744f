"""Built-in merge methods, one module each; registered by merger.builtin through the public hook."""
