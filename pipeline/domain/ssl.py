"""`adapt.domain: ssl`: a short self-supervised warm-up of the backbone on the unlabeled target images
and the labeled source images (labels unused), before the configured adapt strategy trains on the
labeled source images. The objective is SimCLR's (Chen et al. 2020, "A Simple Framework for
Contrastive Learning of Visual Representations"): two random views of each image, a small projection
head, and the NT-Xent loss that pulls the two views of an image together and pushes the other images
of the batch away. Written here rather than taken from a library because it is ~30 lines on top of
the training loop edgekiln already has (device, mixed precision, schedule), and the SSL libraries
(lightly, solo-learn, VISSL) each bring their own trainer. The projection head lives only in the
training wrapper; the model that comes out is the plain network."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from pipeline.domain.adabn import bn_layers
from runtime.preprocess import PreprocessSpec

log = logging.getLogger("edgekiln")

SSL_LR = 1e-4  # small: a warm-up of pretrained features on a few hundred images, not pre-training
SSL_TEMPERATURE = 0.2


def two_view_transform(spec: PreprocessSpec) -> v2.Compose:
    """SimCLR's augmentations (crop, flip, colour jitter, grey, blur) on uint8 crops, then the model's normalisation."""
    blur = max(3, (min(spec.hw) // 10) | 1)  # odd kernel, ~10 % of the side as in SimCLR
    return v2.Compose([
        v2.RandomResizedCrop(spec.hw, scale=(0.3, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(blur, sigma=(0.1, 2.0))], p=0.5),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(spec.mean), list(spec.std)),
    ])


class TwoViews(Dataset):
    """(two views stacked as (2, C, H, W), 0): the training loop's (inputs, labels) with no label."""

    def __init__(self, x_uint8: torch.Tensor, transform):
        self.x, self.transform = x_uint8, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return torch.stack([self.transform(self.x[i]), self.transform(self.x[i])]), 0


class SimCLRWrapper(nn.Module):
    """model's pooled features -> projection head; forward takes (B, 2, C, H, W) and returns (2B, dim)."""

    def __init__(self, model: nn.Module, hidden: int = 512, dim: int = 128):
        super().__init__()
        self.model = model
        d = model.num_features
        self.projection = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def train(self, mode: bool = True) -> SimCLRWrapper:
        """BatchNorm keeps its pretrained running statistics (eval mode) while the weights learn: batch
        statistics of a few hundred augmented images from two cameras are too noisy to replace them
        (with them updated, 4 warm-up steps cut textures -> dusk from 0.76 to 0.47)."""
        super().train(mode)
        for m in bn_layers(self.model):
            m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        views = x.transpose(0, 1).reshape(2 * b, *x.shape[2:]).contiguous(memory_format=torch.channels_last)
        return self.projection(self.model.forward_features(views))


def nt_xent(z: torch.Tensor, _y=None, temperature: float = SSL_TEMPERATURE) -> torch.Tensor:
    """NT-Xent over 2B embeddings, rows i and i+B being the two views of one image."""
    n = z.shape[0] // 2
    z = F.normalize(z.float(), dim=1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, positive)


def ssl_warmup(model: nn.Module, x_uint8: torch.Tensor, spec: PreprocessSpec, steps: int, batch_size: int,
               seed: int, desc: str = "ssl warm-up") -> dict:
    """Train `model`'s backbone weights (not the BatchNorm running statistics) for about `steps` SimCLR
    steps on `x_uint8`; the head is untouched. Returns what it did, for metrics.json."""
    from tqdm.auto import tqdm

    from pipeline.training import (
        cosine_schedule,
        make_optimizer,
        param_groups,
        train_device,
        train_one_epoch,
    )
    from pipeline.training.loop import Amp, device_of

    batch_size = max(2, min(batch_size, len(x_uint8)))
    loader = DataLoader(TwoViews(x_uint8, two_view_transform(spec)), batch_size=batch_size, shuffle=True,
                        drop_last=True, generator=torch.Generator().manual_seed(seed))
    epochs = max(1, math.ceil(steps / len(loader)))
    wrapper = SimCLRWrapper(model)
    trainable = [p for n, p in wrapper.named_parameters() if not n.startswith("model.head.")]
    model.head.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    home, device = device_of(model), train_device()
    wrapper.to(device)
    optimizer = make_optimizer("adamw", param_groups([(trainable, 1.0)], 1e-4), SSL_LR, 1e-4, 0.9)
    scheduler = cosine_schedule(optimizer, epochs, len(loader), 0.0)
    amp, losses = Amp(device), []
    for _ in tqdm(range(epochs), desc=desc, unit="epoch", disable=None):
        losses.append(train_one_epoch(wrapper, loader, nt_xent, optimizer, scheduler, amp=amp))
    model.head.requires_grad_(True)
    model.to(home).eval()
    log.info("%s: %d epochs x %d steps of %d images, NT-Xent %.3f -> %.3f", desc, epochs, len(loader), batch_size,
             losses[0], losses[-1])
    return {"epochs": epochs, "steps": epochs * len(loader), "images": len(x_uint8), "batch_size": batch_size,
            "loss_first_epoch": round(losses[0], 4), "loss_last_epoch": round(losses[-1], 4)}
