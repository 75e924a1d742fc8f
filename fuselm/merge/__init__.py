"""Weight merging (FuseChat's fuse-then-merge): pure per-tensor rules and the merge stage."""

from fuselm.merge.methods import MERGE_METHODS, MergeParams, get_merge_method

__all__ = ["MERGE_METHODS", "MergeParams", "get_merge_method"]
