"""CLAM-SB (Lu et al., Nature BME 2021): gated attention with instance-level clustering.

    h_i = Dropout(ReLU(W_fc x_i))                                     (N, 512)
    a_i = w^T (tanh(V h_i) ⊙ sigmoid(U h_i));  A = softmax(a)          gated attention, D = 256
    embedding = sum_i A_i h_i;  logits = W_c embedding

Instance clustering (training, given the label y): the k most and k least attended
instances (k = min(k_sample, N)) are pseudo-labelled in-class (1) and out-of-class (0)
for the classifier of class y; with `subtyping`, the other classes' classifiers also see
the top k as out-of-class. Their loss (CLAM's default: the smooth top-1 SVM of Berrada et
al. with α = 1, τ = 1, i.e. τ·logsumexp((α·[j ≠ t] + s_j − s_t)/τ) over the 2 outputs) is
averaged; the total is `bag_weight`·bag loss + (1 − `bag_weight`)·instance loss (0.7/0.3).
For a binary task with one logit, the positive class's instance classifier is trained on
positive bags only (the label-0 bag clusters class 0, as CLAM with 2 outputs does).

Initialisation (`init`): `xavier` (default) is CLAM's code as published and used until
April 2024 (`initialize_weights`: Xavier-normal weights, zero biases); `default` keeps
PyTorch's, as CLAM's code does since commit d613a3d. `input_layer=false` (a deviation,
for a same-architecture comparison with torchmil's CLAM_SB, which has no such layer)
drops the fc, so that h_i = x_i and dim = in_dim. It matters: with PyTorch's default
the four layers between the features and the attention score are each about half as
large, so at the start the attention is flat (on the synthetic cohort's 10x LeNet
features the scores within a bag vary by a std of 0.0013, against 0.017 with xavier) and
its gradients are 10 to 50 times smaller; the model then pools like a mean over ~400
tiles of which ~4% carry the class, and its bag loss stayed at 0.693 for 60 epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mil_experiments.errors import ConfigError
from mil_experiments.models.aggregator import Aggregator, AggregatorOutput
from mil_experiments.models.initialization import INITS, xavier_init

INSTANCE_LOSSES = ("svm", "ce")


def smooth_top1_svm(scores: torch.Tensor, targets: torch.Tensor, alpha: float = 1.0, tau: float = 1.0) -> torch.Tensor:
    """Mean smooth top-1 SVM loss of (n, K) scores against (n,) targets (Berrada et al., 2018)."""
    margins = alpha * (1 - nn.functional.one_hot(targets, scores.shape[1]).to(scores.dtype))  # (n, K)
    true = scores.gather(1, targets[:, None])  # (n, 1)
    return (tau * torch.logsumexp((margins + scores - true) / tau, dim=1)).mean()


class CLAMSB(Aggregator):
    """CLAM single branch."""

    @dataclass
    class Config:
        dim: int = 512
        attention_dim: int = 256
        dropout: float = 0.25
        k_sample: int = 8
        bag_weight: float = 0.7
        instance_loss: str = "svm"  # svm (CLAM's default) | ce
        subtyping: bool = False
        init: str = "xavier"  # xavier (CLAM's code as published) | default (PyTorch's, CLAM's code since 2024)
        input_layer: bool = True  # false: no fc in -> dim, attention on the features themselves (torchmil's CLAM_SB)

    def __init__(self, in_dim: int, n_outputs: int, dim: int = 512, attention_dim: int = 256, dropout: float = 0.25,
                 k_sample: int = 8, bag_weight: float = 0.7, instance_loss: str = "svm", subtyping: bool = False,
                 init: str = "xavier", input_layer: bool = True) -> None:
        super().__init__(in_dim, n_outputs)
        if instance_loss not in INSTANCE_LOSSES:
            raise ConfigError(f"aggregator.instance_loss={instance_loss!r}: choose one of {INSTANCE_LOSSES}")
        if init not in INITS:
            raise ConfigError(f"aggregator.init={init!r}: choose one of {INITS}")
        if not input_layer:
            dim = in_dim
        self.fc = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Dropout(dropout)) if input_layer else nn.Identity()
        self.attention_a = nn.Sequential(nn.Linear(dim, attention_dim), nn.Tanh(), nn.Dropout(dropout))
        self.attention_b = nn.Sequential(nn.Linear(dim, attention_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.attention_c = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(dim, n_outputs)
        self.instance_classifiers = nn.ModuleList(nn.Linear(dim, 2) for _ in range(max(n_outputs, 2)))
        self.k_sample, self.bag_weight, self.instance_loss, self.subtyping = k_sample, bag_weight, instance_loss, subtyping
        if init == "xavier":
            xavier_init(self)

    def forward(self, features: torch.Tensor, target: torch.Tensor | None = None, levels=None) -> AggregatorOutput:
        hidden = self.fc(features)  # (N, dim)
        scores = self.attention_c(self.attention_a(hidden) * self.attention_b(hidden)).squeeze(-1)  # (N,)
        attention = torch.softmax(scores, dim=0)  # (N,)
        embedding = attention @ hidden  # (dim,)
        output = AggregatorOutput(logits=self.classifier(embedding), instance_scores=attention, embedding=embedding)
        if target is not None and self.training:
            output.aux_losses["instance"] = (1 - self.bag_weight) * self.clustering_loss(scores, hidden, int(target))
            output.bag_loss_weight = self.bag_weight
        return output

    def clustering_loss(self, scores: torch.Tensor, hidden: torch.Tensor, label: int) -> torch.Tensor:
        """Mean instance loss over the classes that cluster (the bag's class; every class with `subtyping`)."""
        k = min(self.k_sample, hidden.shape[0])
        top = torch.topk(scores, k).indices  # (k,)
        bottom = torch.topk(-scores, k).indices  # (k,)
        losses = []
        for c, classifier in enumerate(self.instance_classifiers):
            if c == label:  # in the class: top k -> 1, bottom k -> 0
                rows = torch.cat([top, bottom])  # (2k,)
                targets = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(hidden.device)  # (2k,)
            elif self.subtyping:  # another class: its top k are out of the class
                rows, targets = top, torch.zeros(k, dtype=torch.long, device=hidden.device)
            else:
                continue
            logits = classifier(hidden[rows])  # (rows, 2)
            loss_fn = smooth_top1_svm if self.instance_loss == "svm" else nn.functional.cross_entropy
            losses.append(loss_fn(logits, targets))
        total = torch.stack(losses).sum()
        return total / len(self.instance_classifiers) if self.subtyping else total
