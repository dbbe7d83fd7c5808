"""Ray actors, one per rank: tensor-parallel worker groups (and, later, KV transfer).

``RayExecutor`` (``workers.group``) is the engine's executor for
``tensor_parallel_size > 1``; the engine finds it by name, never imports it itself.
Depends only on ``engine``.
"""
