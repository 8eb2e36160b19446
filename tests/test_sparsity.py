"""The sparse-direct-effects penalty of the toy's recipe (clipterm/toyworld/sparsity.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clipterm.toyworld.recipe import to_tensor
from clipterm.toyworld.sparsity import direct_effects, sparsity_loss
from clipterm.toyworld.world import render, scene_at
from clipterm.vit.decompose import decompose, readout


def test_direct_effects_are_the_decomposition_and_sum_to_the_embedding(toy):
    model = toy.model.float().eval()
    pixels = to_tensor(np.stack([render(scene_at(3, i))[0] for i in range(6)]))  # (6, 3, 64, 64)
    embeds, components = direct_effects(model.visual, pixels)  # (6, D), (6, L*H + L, D)
    split = decompose(model, pixels)
    heads = torch.einsum("blhd,lhdk->blhk", split.head_out, readout(model)).flatten(1, 2)  # (6, L*H, D)
    assert torch.allclose(embeds, model.encode_image(pixels), atol=1e-4)
    assert torch.allclose(components, torch.cat([heads, split.mlps], 1), atol=1e-4)
    assert torch.allclose(components.sum(1) + split.embed + split.bias, embeds, atol=1e-4)
    assert components.requires_grad  # it is a training loss: gradients reach the tower


def test_the_penalty_counts_components_that_carry_the_signal_even_when_they_agree():
    signal = torch.randn(32, 1, 8)  # (B, 1, D)
    noise = torch.zeros(32, 9, 8)
    one = torch.cat([signal, noise], 1)  # (B, 10, D): one component carries everything
    copies = signal.expand(32, 10, 8) / 10  # the same signal split over 10 components that point the same way
    assert sparsity_loss(one).item() == pytest.approx(1.0)
    assert sparsity_loss(copies).item() == pytest.approx(10.0, rel=1e-4)
    assert sparsity_loss(one + torch.ones(8)).item() == pytest.approx(1.0)  # a constant effect costs nothing


def test_per_task_the_penalty_counts_only_the_components_that_write_that_task():
    """Task A's classes span dims 0-1 and task B's dims 2-3; component 0 writes A, components 1-4 share B, and
    component 5 writes a large signal outside both, which neither task's count sees."""
    torch.manual_seed(0)
    components = torch.zeros(64, 6, 8)  # (B, C, D)
    components[:, 0, :2] = torch.randn(64, 2)
    components[:, 1:5, 2:4] = torch.randn(64, 1, 2)  # four copies
    components[:, 5, 4:] = 10 * torch.randn(64, 4)
    eye = torch.eye(8)
    classes = {"a": torch.stack([eye[0], eye[1], -eye[0]]), "b": torch.stack([eye[2], eye[3], -eye[2]])}  # (3, D) each
    assert sparsity_loss(components, {"a": classes["a"]}).item() == pytest.approx(1.0, abs=1e-4)
    assert sparsity_loss(components, {"b": classes["b"]}).item() == pytest.approx(4.0, rel=1e-3)
    assert sparsity_loss(components, classes).item() == pytest.approx(2.5, rel=1e-3)


def test_train_with_sparsity_records_it_and_refuses_a_resnet(cli, tmp_path):
    out = tmp_path / "sparse"
    result = cli("toy", "train", str(out), "--world", "2", "--steps", "2", "--batch-size", "8", "--threads", "1",
                 "--sparsity", "0.01")
    assert result.code == 0, result
    assert json.loads((out / "training.json").read_text())["stages"][-1]["sparsity"] == 0.01
    refused = cli("toy", "train", str(tmp_path / "rn"), "--arch", "rn", "--steps", "1", "--sparsity", "0.01")
    assert refused.code != 0 and "ViT towers" in refused.err and not (tmp_path / "rn").exists()
