"""Real-size training throughput of ``bunny/train/train.py`` against the clean-loop ceiling.

``python -m bunny.bench.throughput`` builds random-weight models at the Bunny-4B shapes and
synthetic data of the reference lengths, runs each stage through the deepspeed launcher and
``train.py``, and prints one JSON line per stage (see ``docs/throughput.md``).
"""
