"""Tests for fdcam.tail: the Tail protocol, MaskedTail, chunk_size and the torch backend TorchTail."""

import pytest
import torch

from fdcam.tail import MaskedTail, Tail, TorchTail, chunk_size
from nets import Mlp, Residual, split_at
from reference import assert_same_up_to_rounding


def _masks(k, n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(n, k, generator=generator) > 0.5).float()


def test_masked_tail_equals_the_tail_on_masked_copies_with_extras_broadcast():
    torch.manual_seed(0)
    model = Residual().eval()
    x = torch.randn(1, 3, 8, 8)
    split, activations, extras = split_at(model, "conv1", x)
    assert len(extras) == 1
    masks = _masks(8, 5)
    with torch.no_grad():
        got = MaskedTail(split.tail)(activations, masks[None], *extras)[0]
        expected = torch.cat([split.tail(activations * m[None, :, None, None], *extras) for m in masks])
    assert_same_up_to_rounding(got, expected)


def test_masked_tail_wrapper_is_in_eval_mode_without_touching_the_model():
    model = Mlp().train()
    wrapper = MaskedTail(model)
    assert not wrapper.training
    assert model.training and model.classifier[2].training


@pytest.mark.parametrize("model_class, layer", [(Residual, "conv1"), (Mlp, "features.1")])
@pytest.mark.parametrize("factorise", [True, False])
def test_torch_tail_is_a_tail_and_equals_masked_tail_in_any_chunking(model_class, layer, factorise):
    torch.manual_seed(0)
    model = model_class().eval()
    split, activations, extras = split_at(model, layer, torch.randn(1, 3, 8, 8))
    k = activations.shape[1]
    masks = _masks(k, 11)
    with torch.no_grad():
        expected = MaskedTail(split.tail)(activations, masks[None], *extras)
    for batch_size in (None, 1, 4, 11, 50):
        tail = TorchTail(split.tail, batch_size=batch_size, factorise=factorise)
        assert isinstance(tail, Tail)
        got = tail.run(activations, masks, extras)
        assert_same_up_to_rounding(got, expected)
        assert tail.calls == -(-11 // min(batch_size or 11, 11))
        assert not got.requires_grad


def test_torch_tail_shortens_the_mlp_pattern_only():
    torch.manual_seed(0)
    mlp_split, mlp_features, _ = split_at(Mlp().eval(), "features.1", torch.randn(1, 3, 8, 8))
    residual_split, residual_features, residual_extras = split_at(Residual().eval(), "conv1", torch.randn(1, 3, 8, 8))
    assert TorchTail(mlp_split.tail).shortcut_for(mlp_features).kind == "linear"
    assert TorchTail(mlp_split.tail, factorise=False).shortcut_for(mlp_features) is None
    # conv1 → relu first: not linear in the masks; only the last Linear's rows can be chosen
    assert TorchTail(residual_split.tail).shortcut_for(residual_features, residual_extras).kind == "plain"


def test_torch_tail_builds_the_factorised_module_once_per_feature_shape():
    torch.manual_seed(0)
    model = Mlp().eval()
    split, activations, _ = split_at(model, "features.1", torch.randn(1, 3, 8, 8))
    tail = TorchTail(split.tail)
    first = tail.shortcut_for(activations)
    assert tail.shortcut_for(activations * 2) is first
    _, larger, _ = split_at(model, "features.1", torch.randn(1, 3, 12, 12))
    second = tail.shortcut_for(larger)
    assert second is not None and second is not first
    masks = _masks(6, 3)
    with torch.no_grad():
        assert_same_up_to_rounding(tail.run(larger, masks), MaskedTail(split.tail)(larger, masks[None]))


def test_memory_budget_sets_the_chunks():
    torch.manual_seed(0)
    split, activations, extras = split_at(Mlp().eval(), "features.1", torch.randn(1, 3, 8, 8))
    per_mask = 4 * activations[0].numel() * activations.element_size()
    tail = TorchTail(split.tail, memory_budget=3 * per_mask, factorise=False)
    tail.run(activations, _masks(6, 10), extras)
    assert tail.calls == 4
    # Factorised, a masked pass holds the Linear's output (16 wide), not a copy of the features.
    factorised = TorchTail(split.tail, memory_budget=3 * 4 * 16 * activations.element_size())
    factorised.run(activations, _masks(6, 10), extras)
    assert factorised.calls == 4


def test_chunk_size():
    features = torch.zeros(1, 4, 2, 2)
    per_mask = 4 * 16 * 4
    assert chunk_size(features, None, 7, 100) == 7
    assert chunk_size(features, None, 500, 100) == 100
    assert chunk_size(features, None, 0, 100) == 1
    assert chunk_size(features, 10 * per_mask, None, 100) == 10
    assert chunk_size(features, 1, None, 100) == 1
    assert chunk_size(features, None, None, 100) == 100


def _images(model, layer, n, seed=0):
    """Split at `layer` and the head's outputs for n random images (on the model's device)."""
    x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)).to(next(model.parameters()).device)
    split, activations, extras = split_at(model, layer, x)
    return split, activations, extras


@pytest.mark.parametrize("model_class, layer", [(Residual, "conv1"), (Mlp, "features.1")])
@pytest.mark.parametrize("factorise", [True, False])
@pytest.mark.parametrize("batch_size", [None, 4, 7, 100])
def test_a_batch_of_images_equals_one_run_per_image(model_class, layer, factorise, batch_size):
    torch.manual_seed(0)
    split, activations, extras = _images(model_class().eval(), layer, 3)
    k = activations.shape[1]
    per_image = torch.stack([_masks(k, 5, seed=i) for i in range(3)])  # chunks of 4 and 7 cross image boundaries
    shared = _masks(k, 5, seed=9)
    tail = TorchTail(split.tail, batch_size=batch_size, factorise=factorise)
    with torch.no_grad():
        for masks in (per_image, shared):
            got = tail.run(activations, masks, extras)
            expected = torch.cat(
                [
                    MaskedTail(split.tail)(
                        activations[i : i + 1],
                        (masks[i] if masks.dim() == 3 else masks)[None],
                        *(e[i : i + 1] for e in extras),
                    )
                    for i in range(3)
                ]
            )
            assert_same_up_to_rounding(got, expected)


def test_run_refuses_masks_that_do_not_fit():
    split, activations, extras = _images(Mlp().eval(), "features.1", 2)
    with pytest.raises(ValueError, match="do not fit"):
        TorchTail(split.tail).run(activations, torch.ones(3, 4, 6), extras)


@pytest.mark.parametrize("factorise", [True, False])
def test_precisions_of_the_torch_tail(factorise):
    torch.manual_seed(0)
    split, activations, extras = _images(Residual().eval(), "conv1", 1)
    masks = _masks(8, 6)
    exact = TorchTail(split.tail, factorise=factorise).run(activations, masks, extras)
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    # TF32 only changes CUDA math: on the CPU it is fp32.
    torch.testing.assert_close(TorchTail(split.tail, precision="tf32").run(activations, masks, extras), exact)
    bf16 = TorchTail(split.tail, precision="bf16", factorise=factorise).run(activations, masks, extras)
    assert bf16.dtype == torch.float32
    assert (bf16 - exact).abs().max() <= 0.05 * exact.abs().max()
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags
    with pytest.raises(ValueError, match="precision"):
        TorchTail(split.tail, precision="int8")


@pytest.mark.gpu
@pytest.mark.parametrize("model_class, layer", [(Residual, "conv1"), (Mlp, "features.1")])
def test_cuda_graph_replays_equal_eager_runs(model_class, layer, monkeypatch):
    captures = []
    capture = torch.cuda.graph
    monkeypatch.setattr(torch.cuda, "graph", lambda *args, **kwargs: captures.append(1) or capture(*args, **kwargs))
    torch.manual_seed(0)
    model = model_class().eval().cuda()
    split, activations, extras = _images(model, layer, 2)
    k = activations.shape[1]
    eager = TorchTail(split.tail)
    graphed = TorchTail(split.tail, cuda_graph=True)
    for seed in range(3):  # new inputs each time: the graph must read them, not the captured ones
        masks = torch.stack([_masks(k, 9, seed=seed + i) for i in range(2)]).cuda()
        scaled = activations * (1 + seed)
        torch.testing.assert_close(graphed.run(scaled, masks, extras), eager.run(scaled, masks, extras))
        torch.testing.assert_close(
            graphed.run(scaled[:1], masks[0], [e[:1] for e in extras]),
            eager.run(scaled[:1], masks[0], [e[:1] for e in extras]),
        )
    assert graphed.graph_replays == 6 and len(captures) == 2  # one capture per input shape, then replays
