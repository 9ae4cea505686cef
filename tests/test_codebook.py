"""Routing among prototype masks: the selection rule, the applied masks, and the checkpoint round trip."""

from __future__ import annotations

import torch

from ftwt_cli.core.codebook import Codebook
from ftwt_cli.core.gating import FTWTModel
from ftwt_cli.io import loading
from ftwt_cli.io.checkpoint import save_checkpoint
from ftwt_cli.io.config import resolve
from ftwt_cli.models import create_model


def test_each_image_takes_the_prototype_that_agrees_best_with_its_logits():
    book = Codebook(torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]]))
    logits = torch.tensor([[3.0, 2.0, -1.0, -2.0], [-1.0, -1.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert book.select(logits).tolist() == [0, 1, 2, 0]  # all-zero logits tie: the lowest index
    torch.testing.assert_close(book.mask(logits), book.prototypes[[0, 1, 2, 0]])


def test_straight_through_keeps_the_forward_value_and_passes_the_sigmoid_gradient():
    book = Codebook(torch.tensor([[1, 0, 1]]))
    logits = torch.tensor([[0.5, -0.5, 2.0]], requires_grad=True)
    mask = book.mask(logits, straight_through=True)
    assert torch.equal(mask.detach(), torch.tensor([[1.0, 0.0, 1.0]]))
    mask.sum().backward()
    torch.testing.assert_close(logits.grad, torch.sigmoid(logits) * (1 - torch.sigmoid(logits)))


def test_a_gated_model_applies_its_codebook_and_a_checkpoint_carries_it(tmp_path):
    cfg = resolve("smoke")
    torch.manual_seed(0)
    model = FTWTModel(create_model("smallnet", 10), (32, 32)).eval()
    widths = [b.out_channels for b in model.graph.blocks]
    g = torch.Generator().manual_seed(1)
    books = [torch.rand(3, c, generator=g) > 0.5 for c in widths[:-1]] + [None]
    model.set_codebooks(books).configure(mask_source="predicted", record=True)
    model(torch.randn(5, 3, 32, 32))
    for rec, book in zip(model.records(), books):
        if book is not None:  # every image's mask is one of the block's prototypes
            assert all(any(torch.equal(row > 0, p) for p in book) for row in rec.mask)
    assert model.codebook_sizes() == [3] * (len(widths) - 1) + [0]

    path = tmp_path / "codebook.pt"
    meta = {**loading.ftwt_meta(cfg, 10, 0.9), "codebook_sizes": model.codebook_sizes()}
    save_checkpoint(path, model, meta)
    loaded = loading.load_model(cfg, str(path), require="ftwt").model
    for block, book in zip(loaded.blocks, books):
        if book is None:
            assert block.codebook is None
        else:
            assert torch.equal(block.codebook.prototypes > 0, book)
