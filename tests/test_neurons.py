"""Second-order neuron effects: checked against the model itself, with everything but the path frozen.

The acceptance test runs the real model in float64 with every attention pattern, every LayerNorm σ
and every later MLP output frozen at its clean value, zeroes one neuron, and compares the change
of the image embedding, minus the neuron's direct effect, with `clipterm.vit.second_order`. The frozen pass
below is written from the model's modules, not from the formula in neurons.py.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from clipterm.cache.build import BuildOptions, build_cache
from clipterm.cache.reader import open_cache
from clipterm.errors import ClipTermError
from clipterm.toyworld.evaluate import model_world
from clipterm.vit import second_order

TOY_WORLD = model_world("toy")  # the world the shipped toy was trained on: what `toy:N` draws for it


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def toy_images(n: int, seed: int = 0) -> torch.Tensor:
    import numpy as np

    from clipterm.toyworld import world
    from clipterm.toyworld.train import to_tensor

    pixels = np.stack([world.render(world.scene_at(seed, i, TOY_WORLD))[0] for i in range(n)])  # (n, 64, 64, 3)
    return to_tensor(pixels)  # (n, 3, 64, 64)


# --------------------------------------------------------------------------- the frozen forward pass


def _attention_probs(attn, normed: torch.Tensor) -> torch.Tensor:
    """The full attention pattern (B, H, T, T) the model used."""
    if isinstance(attn, torch.nn.MultiheadAttention):
        return attn(normed, normed, normed, need_weights=True, average_attn_weights=False)[1]
    width, heads = normed.shape[-1], attn.num_heads
    q, k, _ = torch.nn.functional.linear(normed, attn.in_proj_weight, attn.in_proj_bias).split(width, -1)
    q = attn.ln_q(q.unflatten(-1, (heads, -1)).transpose(1, 2))  # (B, H, T, dh)
    k = attn.ln_k(k.unflatten(-1, (heads, -1)).transpose(1, 2))  # (B, H, T, dh)
    return (q @ k.transpose(-1, -2) * (width // heads) ** -0.5).softmax(-1)  # (B, H, T, T)


def record_forward(model, images: torch.Tensor, layer: int) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
    """The model's own forward, recorded by hooks on its modules: the embeddings (B, D), each block's input
    {l: (B, T, W)}, `layer`'s MLP hidden activations (B, T, M) and the residual entering ln_post (B, T, W) or (B, W)."""
    visual = model.visual
    blocks = visual.transformer.resblocks
    inputs, hidden, final = {}, {}, {}
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0])) for i, b in enumerate(blocks)]
    hooks.append(blocks[layer].mlp.gelu.register_forward_hook(lambda m, a, out: hidden.__setitem__("m", out)))
    hooks.append(visual.ln_post.register_forward_pre_hook(lambda m, a: final.__setitem__("r", a[0])))
    with torch.no_grad():
        embeds = model.encode_image(images)  # (B, D)
    for hook in hooks:
        hook.remove()
    return embeds, inputs, hidden["m"], final["r"]


def clean_run(model, images: torch.Tensor, layer: int) -> dict:
    """Everything a frozen pass needs, recorded from the model's own forward (hooks on its modules)."""
    visual = model.visual
    blocks = visual.transformer.resblocks
    embeds, inputs, hidden_m, final_r = record_forward(model, images, layer)
    hidden, final = {"m": hidden_m}, {"r": final_r}
    residual = final["r"][:, 0] if final["r"].dim() == 3 else final["r"]  # (B, W)
    run = {"embeds": embeds, "inputs": inputs, "probs": {}, "sigma": {}, "attn_out": {}, "mlp_out": {},
           "sigma_post": (residual.var(-1, unbiased=False) + visual.ln_post.eps).sqrt()}
    with torch.no_grad():
        for i, block in enumerate(blocks):
            x = inputs[i]  # (B, T, W)
            normed = block.ln_1(x)
            run["sigma"][i] = (x.var(-1, unbiased=False, keepdim=True) + block.ln_1.eps).sqrt()  # (B, T, 1)
            run["probs"][i] = _attention_probs(block.attn, normed)  # (B, H, T, T)
            run["attn_out"][i] = frozen_attention(block, x, run["sigma"][i], run["probs"][i])  # (B, T, W)
            after = inputs[i + 1] if i + 1 < len(blocks) else final["r"]
            if after.dim() == 3:
                run["mlp_out"][i] = after - x - run["attn_out"][i]  # (B, T, W)
        # The neuron's own write at every token, from the model's c_proj and ls_2.
        block = blocks[layer]
        run["hidden"] = hidden["m"]  # (B, T, M)
    return run


def frozen_attention(block, x: torch.Tensor, sigma: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """One attention layer with its LayerNorm σ and its pattern frozen: linear in x. (B, T, W)."""
    ln, attn = block.ln_1, block.attn
    width, heads = x.shape[-1], attn.num_heads
    normed = (x - x.mean(-1, keepdim=True)) / sigma * ln.weight + ln.bias  # (B, T, W)
    values = torch.nn.functional.linear(normed, attn.in_proj_weight[2 * width :], attn.in_proj_bias[2 * width :])  # (B, T, W)
    values = values.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, H, T, dh)
    mixed = probs @ values  # (B, H, T, dh)
    if getattr(attn, "head_scale", None) is not None:
        mixed = mixed * attn.head_scale
    return block.ls_1(attn.out_proj(mixed.transpose(1, 2).flatten(2)))  # (B, T, W)


def neuron_write(model, run: dict, layer: int, neuron: int) -> torch.Tensor:
    """What neuron n adds to the residual stream at every token: MLP output minus the MLP with n zeroed."""
    block = model.visual.transformer.resblocks[layer]
    hidden = run["hidden"]
    zeroed = hidden.clone()
    zeroed[..., neuron] = 0
    with torch.no_grad():
        return block.ls_2(block.mlp.c_proj(hidden)) - block.ls_2(block.mlp.c_proj(zeroed))  # (B, T, W)


def frozen_embedding(model, run: dict, layer: int, write: torch.Tensor, through_heads: bool) -> torch.Tensor:
    """The image embedding with `write` removed after block `layer`, everything else frozen.

    Each later attention layer sees the clean residual minus the neuron's write (so only paths
    through one head remain) when `through_heads`; otherwise it keeps its clean output (direct path only).
    """
    visual = model.visual
    blocks = visual.transformer.resblocks
    with torch.no_grad():
        x = run["inputs"][layer + 1] - write if layer + 1 < len(blocks) else None  # (B, T, W)
        for i in range(layer + 1, len(blocks)):
            if through_heads:
                attn_out = frozen_attention(blocks[i], run["inputs"][i] - write, run["sigma"][i], run["probs"][i])
            else:
                attn_out = run["attn_out"][i]
            x = x + attn_out + run["mlp_out"][i]  # (B, T, W)
        cls = x[:, 0]  # (B, W)
        normed = (cls - cls.mean(-1, keepdim=True)) / run["sigma_post"][:, None] * visual.ln_post.weight + visual.ln_post.bias
        return normed @ visual.proj  # (B, D)


def second_order_truth(model64, images64: torch.Tensor, layer: int, neuron: int) -> torch.Tensor:
    run = clean_run(model64, images64, layer)
    nothing = torch.zeros_like(run["hidden"][..., :1]).expand_as(run["inputs"][layer])
    # The frozen replica must be the model itself when nothing is removed.
    assert rel(frozen_embedding(model64, run, layer, nothing, through_heads=True), run["embeds"]) < 1e-10
    write = neuron_write(model64, run, layer, neuron)
    total = run["embeds"] - frozen_embedding(model64, run, layer, write, through_heads=True)  # (B, D)
    direct = run["embeds"] - frozen_embedding(model64, run, layer, write, through_heads=False)  # (B, D)
    return total - direct  # (B, D)


def computed(model, images: torch.Tensor, layer: int, neuron: int) -> torch.Tensor:
    out = second_order.trace(model, images, layer)
    return second_order.effects(out.scalars, second_order.path_vectors(model, layer))[:, neuron]  # (B, D)


# --------------------------------------------------------------------------- acceptance


@pytest.mark.parametrize("layer, neuron", [(4, 7), (4, 300), (2, 11), (0, 42)])
def test_second_order_effect_matches_frozen_model(toy, layer, neuron):
    """L4 is the toy's second-to-last layer (one later attention layer); L2 and L0 have several."""
    images = toy_images(3)
    model64 = copy.deepcopy(toy.model).double()
    truth = second_order_truth(model64, images.double(), layer, neuron)  # (B, D)
    assert truth.norm() > 0
    assert rel(computed(toy.model, images, layer, neuron).double(), truth) < 1e-4


def test_layerscale_head_scale_and_custom_block():
    """LayerScale (ls_1, ls_2) and head_scale fold into the fixed vectors."""
    from test_decompose import tiny_clip

    model = tiny_clip(ls_init_value=0.5, block_type="custom", scale_heads=True, layers=4)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    model64 = copy.deepcopy(model).double()
    for layer in (1, 2):
        truth = second_order_truth(model64, images.double(), layer, 5)
        assert rel(computed(model, images, layer, 5).double(), truth) < 1e-4


# --------------------------------------------------------------------------- the pieces agree with each other


def test_norms_paths_and_mean_agree_with_effects(toy):
    images = toy_images(5)
    out = second_order.trace(toy.model, images, 3)
    vectors = second_order.path_vectors(toy.model, 3)  # (M, K, D)
    assert vectors.shape == (toy.info.mlp_width, 2 * toy.info.heads, toy.info.embed_dim)
    assert second_order.paths(toy.info.layers, toy.info.heads, 3)[:2] == ["L4.H0", "L4.H1"]
    full = second_order.effects(out.scalars, vectors)  # (B, M, D)
    assert rel(second_order.path_effects(out.scalars, vectors).sum(2), full) < 1e-5
    assert rel(second_order.effect_norms(out.scalars, second_order.gram(vectors)), full.norm(dim=-1)) < 1e-4
    assert rel(second_order.mean_effects(out.scalars.mean(0), vectors), full.mean(0)) < 1e-5
    assert rel(second_order.effect_sums(out.scalars, vectors), full.sum(1)) < 1e-5
    with torch.no_grad():
        assert rel(out.image_embeds, toy.model.encode_image(images)) < 1e-5


def test_top_k_streaming_equals_sorting_everything(toy):
    torch.manual_seed(0)
    norms, scalars = torch.rand(40, 6), torch.randn(40, 6, 3)  # (N, M), (N, M, K)
    top = second_order.TopK.empty(6, 3)
    for start in range(0, 40, 7):
        rows = torch.arange(start, min(start + 7, 40))
        top = top.add(norms[rows], rows, scalars[rows], k=5)
    expected = norms.T.topk(5, dim=1)  # (M, 5)
    assert torch.equal(top.rows, expected.indices) and torch.equal(top.norms, expected.values)
    assert torch.equal(top.scalars[2, 0], scalars[expected.indices[2, 0], 2])


def test_principal_direction_matches_svd_of_formed_effects():
    torch.manual_seed(0)
    vectors = torch.randn(4, 6, 10)  # (M, K, D)
    top = torch.randn(4, 20, 6) + 2.0  # (M, k, K)
    mean = torch.randn(4, 6) * 0.1  # (M, K)
    pc, share = second_order.principal_directions(top, mean, vectors)
    for n in range(4):
        effects = (top[n] - mean[n]) @ vectors[n]  # (k, D)
        _, singular, right = torch.linalg.svd(effects, full_matrices=False)
        assert abs(abs(float(pc[n] @ right[0])) - 1) < 1e-4
        assert (effects @ pc[n] > 0).sum() > 10  # most projections positive
        assert abs(float(share[n]) - float(singular[0] ** 2 / (singular**2).sum())) < 1e-4


def test_last_layer_and_bad_layers_are_refused(toy):
    with pytest.raises(ClipTermError, match="last layer.*no second-order effect"):
        second_order.path_vectors(toy.model, toy.info.layers - 1)
    with pytest.raises(ClipTermError, match="last layer"):
        second_order.trace(toy.model, toy_images(1), toy.info.layers - 1)
    with pytest.raises(ClipTermError, match="no layer L9"):
        second_order.check_layer(6, 9)


# --------------------------------------------------------------------------- sparse text decomposition


def test_batched_omp_equals_scikit_learn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    from clipterm.analyses.sparse import omp, text_dictionary

    generator = torch.Generator().manual_seed(0)
    dictionary = text_dictionary(torch.randn(300, 48, generator=generator))  # (P, D)
    targets = torch.randn(7, 48, generator=generator)  # (M, D)
    code = omp(targets, dictionary, k=12)
    expected = sklearn.orthogonal_mp(dictionary.double().T.numpy(), targets.double().T.numpy(), n_nonzero_coefs=12)  # (P, M)
    for m in range(7):
        support = set(expected[:, m].nonzero()[0].tolist())
        assert set(code.indices[m].tolist()) == support
        for row, coefficient in code.texts(m):
            assert abs(coefficient - expected[row, m]) < 1e-4
    fit = (code.coefficients[:, None] @ dictionary[code.indices])[:, 0]  # (M, D)
    assert torch.allclose(code.cosine, torch.nn.functional.cosine_similarity(fit, targets, dim=-1))


def test_omp_recovers_an_exact_combination_and_stops_early():
    from clipterm.analyses.sparse import omp

    generator = torch.Generator().manual_seed(1)
    dictionary = torch.nn.functional.normalize(torch.randn(50, 32, generator=generator), dim=-1)  # (P, D)
    target = 2.0 * dictionary[3] - 0.5 * dictionary[17]  # (D,)
    code = omp(target[None], dictionary, k=8)
    assert code.texts(0) == [(3, pytest.approx(2.0, abs=1e-5)), (17, pytest.approx(-0.5, abs=1e-5))]
    assert code.leading(0) == 3 and omp(-target[None], dictionary, k=8).leading(0) == 17
    assert code.cosine[0] > 1 - 1e-6


# --------------------------------------------------------------------------- ground truth on the trained toy model


def _toy_is_trained() -> bool:
    import json

    from clipterm.locations import TOY_MODEL_DIR

    notes = TOY_MODEL_DIR / "training.json"
    return notes.is_file() and "placeholder" not in json.loads(notes.read_text())


def dominant_attribute(labels: dict[str, torch.Tensor], classes: dict[str, list[str]], rows: torch.Tensor) -> tuple[str, float]:
    """The colour or background most shared by these images: (class name, share of the images that have it)."""
    best = ("", 0.0)
    for task in ("colour", "background"):
        values = labels[task][rows]  # (k,)
        known = values[values >= 0]
        if known.numel():
            mode = int(known.mode().values)
            share = float((values == mode).float().mean())
            if share > best[1]:
                best = (classes[task][mode], share)
    return best


def names(text: str, attribute: str) -> bool:
    """Whether a text names an attribute as a word ("a dark scene" names dark; "darkness" does not)."""
    import re

    return re.search(rf"\b{attribute}\b", text) is not None


def attribute_neurons(reader, neuron_file, n_top: int = 40, top_images: int = 20, share: float = 0.8) -> list[dict]:
    """Of the n_top neurons with the largest effect norms, those whose top images (by effect norm) share one
    colour or background at least `share` of the time: [{"neuron", "attribute", "share"}]."""
    labels = {task: reader.labels(task) for task in ("colour", "background")}
    rows = []
    for n in neuron_file.ranking("norm")[:n_top].tolist():
        attribute, shared = dominant_attribute(labels, reader.tasks, neuron_file.column("norms", n).topk(top_images).indices)
        if shared >= share:
            rows.append({"neuron": n, "attribute": attribute, "share": shared})
    return rows


def truth_cache(loaded, root, n_images: int = 1000, layer: int | None = None):
    """A cache of n_images toy scenes, their neuron activations stored (as `test_toy_truth.truth_reader` builds it,
    so the two share one), with the neurons of `layer` (default: the second-to-last) built."""
    from clipterm.cache.neurons import NeuronFile, build_neurons, neurons_file

    if not (Path(root) / "truth" / "manifest.json").is_file():
        build_cache(BuildOptions(images=f"toy:{n_images}", model=loaded.info.spec, name="truth", cache_dir=str(root),
                                 neurons=True, workers=0), loaded=loaded)
    reader = open_cache(Path(root) / "truth")
    layer = loaded.info.layers - 2 if layer is None else layer
    if not neurons_file(reader.path, layer).is_file():
        build_neurons(reader, layer, device="cpu", loaded=loaded)
    return reader, NeuronFile(reader, layer)


def ground_truth_rates(loaded, root, n_images: int = 1000, n_top: int = 40, n_random: int = 100, seed: int = 0,
                       layer: int | None = None, label=None) -> dict:
    """For one layer (default: the second-to-last): which of the neurons with the largest effect norms are colour
    or background neurons (their top-20 images share one at least 80% of the time), and how often the top text of
    their sparse decomposition (pool `toy`) names that attribute; against how often the top texts of randomly drawn
    neurons do. `label(neuron_file, ids, pool_embeds) -> texts` replaces the shipped labelling (for the bench)."""
    from clipterm.cache.neurons import decompose_neurons
    from clipterm.inputs.texts import embed_pool, load_pool

    reader, neuron_file = truth_cache(loaded, root, n_images, layer)
    pool = load_pool("toy")
    embeds = embed_pool(loaded, pool, cache_dir=str(root))

    def top_texts(ids: list[int]) -> list[str]:
        if label is not None:
            return label(neuron_file, ids, embeds, pool.texts)
        code = decompose_neurons(neuron_file, ids, embeds, k=32)
        return [pool.texts[code.leading(i)] if code.leading(i) is not None else "" for i in range(len(ids))]

    rows = attribute_neurons(reader, neuron_file, n_top)
    for row, text in zip(rows, top_texts([row["neuron"] for row in rows])):
        row.update(text=text, named=names(text, row["attribute"]))
    drawn = torch.randperm(reader.shape.neurons, generator=torch.Generator().manual_seed(seed))[:n_random].tolist()
    random_texts = top_texts(drawn)
    chance = [sum(names(text, row["attribute"]) for text in random_texts) / len(random_texts) for row in rows]
    return {
        "attribute_neurons": rows,
        "rate": sum(row["named"] for row in rows) / max(len(rows), 1),
        "random_rate": sum(chance) / max(len(chance), 1),
    }


@pytest.mark.slow
@pytest.mark.skipif(not _toy_is_trained(), reason="needs the trained toy model (the shipped weights are a placeholder)")
def test_colour_and_background_neurons_are_named_by_their_top_text(toy, toy_truth_root):
    """The neurons issue's ground truth: >= 5 of the 40 L4 neurons with the largest effects have top-20 images that
    share a colour or background, >= 60% of them are named by their first OMP text, and >= 2x random."""
    rates = ground_truth_rates(toy, toy_truth_root)
    print({key: value for key, value in rates.items() if key != "attribute_neurons"}, rates["attribute_neurons"])
    assert len(rates["attribute_neurons"]) >= 5
    assert rates["rate"] >= 0.6 and rates["rate"] >= 2 * rates["random_rate"], rates["attribute_neurons"]
