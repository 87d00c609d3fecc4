"""Checkpoint formats, one module each: `sd` (the original single-file layout, one key table and one config preset
per family), `diffusers` (folders). Each turns files into (config, tensors by part under our names) and back; the
models' own parameter names are the original checkpoint's, so a family is a table, not a code path."""
