"""``finetune``: the lower bound. Each task trains on its own data only, with
cross-entropy over all seen classes; nothing protects old classes."""
from __future__ import annotations

from train.methods.base import Method, register_method


@register_method("finetune")
class Finetune(Method):
    replay = "none"
