"""The Prefect pipeline of the Bunny recipe: typed config, supervised deepspeed launches,
completion markers, artifacts, the flows themselves and the CPU demo (`python -m flows.demo`).

Entry points: `flows.pipeline.bunny_pipeline`, `flows.pipeline.merge_and_average`,
`flows.config.PipelineConfig`. This package imports nothing on its own, so the supervisor
script and the config stay cheap to load.
"""
