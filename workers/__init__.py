"""Ray actors, one per GPU rank: tensor-parallel worker groups and KV transfer.

Empty until the tensor-parallel issue; depends only on ``engine``.
"""
