"""``l2p`` / ``dualprompt``: prompt-based rehearsal-free continual learning
(L2P: Wang et al., "Learning to Prompt for Continual Learning", CVPR 2022;
DualPrompt: Wang et al., "DualPrompt: Complementary Prompting for Rehearsal-free
Continual Learning", ECCV 2022) on heads ``l2p`` / ``dualprompt`` (:mod:`train.heads.prompted`).

Loss on each batch of the current task (no exemplars):

    L = CE(softmax(z[:, current task's classes]), y) + lambda_pull * sum_{keys used} (1 - cos(q(x), k))

The CE is masked to the current task's classes (both papers' training mask);
the second term pulls the selected keys towards the queries. Prediction: argmax
over all seen classes.

Adaptation to cached features (departure from both papers): the papers prompt a
frozen ImageNet-pretrained ViT and never train it. Our encoders are frozen and
cached, and there is no pre-trained fusion transformer, so the fusion
transformer is trained together with its prompts on the first task
(``freeze_after_first``, default on) and frozen from the second task on; only
prompts, keys and the classifier learn after that. The queries therefore come
from a transformer trained on the first task's classes. Omitted: L2P's batch-wise
prompt selection and prompt-frequency diversity penalty. lambda_pull = 0.1
(L2P's value, assumed for DualPrompt too). The optimiser is the shared one
(Adam, lr 1e-3), not the papers' (Adam lr 0.03 / 0.005 on a ViT), and weight
decay is 0 (a decayed prompt pool would drift in tasks that do not select it).
"""
from __future__ import annotations

from dataclasses import dataclass

from train.heads.base import OptionError
from train.methods import losses
from train.methods.base import Hparams, Method, register_method


@dataclass(frozen=True)
class PromptHparams(Hparams):
    weight_decay: float = 0.0
    lambda_pull: float = 0.1
    freeze_after_first: bool = True


@register_method("l2p")
class L2P(Method):
    Hparams = PromptHparams
    replay = "none"
    default_head = "l2p"

    def before_task(self, task: int) -> None:
        head = self.trainer.model.head
        if not hasattr(head, "prompt_parameter_names"):
            raise OptionError(f"method {self.name!r} needs a prompted head (l2p or dualprompt), "
                              f"got head {self.trainer.head_name!r}")
        if task >= head.cfg.pool_size and self.trainer.head_name == "dualprompt":
            raise OptionError(f"head 'dualprompt' has {head.cfg.pool_size} E-prompts (pool_size) for "
                              f"{self.trainer.T} tasks; set head.pool_size >= {self.trainer.T}")
        head.task = task
        trainable = set(head.prompt_parameter_names())
        for name, p in head.named_parameters():
            p.requires_grad_(not (self.hp.freeze_after_first and task > 0) or name.split(".")[0] in trainable)

    def loss(self, batch, out):
        head = self.trainer.model.head
        return {"ce": losses.task_separated_ce(out["logits"], batch["y"], self.n_old),
                "pull": self.hp.lambda_pull * head.last["key_distance"]}


@register_method("dualprompt")
class DualPrompt(L2P):
    default_head = "dualprompt"
