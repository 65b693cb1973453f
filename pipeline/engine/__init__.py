"""Everything that touches Ray lives in this package, and nowhere else in bertpipe.

- ``cluster``: join a cluster or start a local Ray (one implementation for run, label and finetune);
- ``data``: the Ray Data graph of a job (readers, actor pools, checkpoint, writers and sinks);
- ``train``: Ray Train glue for fine-tuning (``TorchTrainer``, workers' context, progress relay).

Planning (config, models, shards, checks) and the stages are plain Python: they can be tested with
Arrow tables and run by ``bertpipe validate`` without starting Ray. ``tests/test_layout.py`` fails when
a module outside this package imports ``ray``.
"""
