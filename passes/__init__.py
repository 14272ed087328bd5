"""pared.passes: rewrite passes, one subpackage per kind of redundancy.

generic/ holds the target-independent clean-ups; cache/, quant/, sparsity/, decode/, kv/ and
partition/ come with their issues.
"""
