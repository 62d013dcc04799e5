"""Values of the merge's command-line options, importable without torch (fast ``--help``)."""

# --dtype spellings -> torch dtype name.
DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16",
}
MERGE_METHODS = ("stream", "peft")  # the first is the default
