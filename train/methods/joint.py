"""``joint``: the upper bound. At every task a fresh model is trained on the
training data of *all* seen tasks (cross-entropy over all seen classes), so its
accuracy matrix shows what the head can do without any memory limit."""
from __future__ import annotations

from train.methods.base import Method, register_method


@register_method("joint")
class Joint(Method):
    replay = "all"
    reinit_each_task = True
