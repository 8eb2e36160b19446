"""`--convention reference`: the quantities of the reference repositories, checked against their formulas.

The reference formulas are written out here the way the reference code computes them (second_order_lens'
`prs_second_order_neurons_hook.py`: every neuron's write materialised per token, the LayerNorms split in
equal shares, attention applied to all tokens, then ×100/‖embedding‖), from the model's own modules and
hooks, not from `clipterm.vit.second_order`.
"""

from __future__ import annotations

import pytest
import torch
from test_neurons import record_forward  # tests/ is on sys.path (rootdir conftest)

from clipterm.vit import second_order


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def small_vit_b32():
    """ViT-B-32's vision tower (width 768, 12 heads, 32 px patches, 224 px) cut to 3 layers, random weights,
    with every LayerNorm and bias perturbed so no share of β or of a bias is zero by accident."""
    import open_clip

    torch.manual_seed(0)
    cfg = open_clip.get_model_config("ViT-B-32")
    cfg = {**cfg, "vision_cfg": {**cfg["vision_cfg"], "layers": 3}, "text_cfg": {**cfg["text_cfg"], "layers": 1}}
    model = open_clip.model.CLIP(**cfg, quick_gelu=True).eval()
    with torch.no_grad():
        for name, param in model.visual.named_parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def _attention_probs(attn, normed: torch.Tensor) -> torch.Tensor:
    """The full attention pattern (B, H, T, T) of nn.MultiheadAttention."""
    return attn(normed, normed, normed, need_weights=True, average_attn_weights=False)[1]


def reference_second_order(model, images: torch.Tensor, layer: int, neurons: list[int]) -> torch.Tensor:
    """The reference's merged second-order effects (B, m, D) of some neurons of `layer`, summed over later heads."""
    visual = model.visual
    blocks = visual.transformer.resblocks
    representation, inputs, hidden_m, final_r = record_forward(model, images, layer)  # (B, D) unnormalised, ...
    hidden = {"m": hidden_m}
    residual = final_r[:, 0] if final_r.dim() == 3 else final_r  # (B, W): the class token
    n_layers, c_proj = len(blocks), blocks[layer].mlp.c_proj
    n_neurons = c_proj.weight.shape[1]
    mean_post = residual.mean(-1, keepdim=True)  # (B, 1)
    std_post = (residual.var(-1, unbiased=False, keepdim=True) + visual.ln_post.eps).sqrt()  # (B, 1)
    total = 0.0
    with torch.no_grad():
        # apply_mlp_post: each neuron's write at every token, plus an equal share of c_proj's bias
        writes = hidden["m"][..., neurons, None] * c_proj.weight.T[neurons] + c_proj.bias / n_neurons  # (B, T, m, W)
        for out_layer in range(layer + 1, n_layers):
            block = blocks[out_layer]
            attn, ln_1 = block.attn, block.ln_1
            x = inputs[out_layer]  # (B, T, W)
            mean = x.mean(-1, keepdim=True)[..., None]  # (B, T, 1, 1)
            std = (x.var(-1, unbiased=False, keepdim=True) + ln_1.eps).sqrt()[..., None]  # (B, T, 1, 1)
            share_1 = (1 + out_layer * 2) * n_neurons
            normalized = ln_1.weight * (writes - mean / share_1) / std + ln_1.bias / share_1  # (B, T, m, W)
            probs = _attention_probs(attn, ln_1(x))  # (B, H, T, T)
            heads, width = attn.num_heads, x.shape[-1]
            w_v = attn.in_proj_weight[2 * width :].view(heads, width // heads, width)  # (H, dh, W)
            b_v = attn.in_proj_bias[2 * width :].view(heads, width // heads)  # (H, dh)
            w_o = attn.out_proj.weight.view(width, heads, width // heads)  # (W, H, dh)
            for head in range(heads):
                v = normalized @ w_v[head].T + b_v[head] / share_1  # (B, T, m, dh)
                after = torch.einsum("bt,btmc->bmc", probs[:, head, 0], v)  # (B, m, dh): the CLS query row
                after = after @ w_o[:, head].T + attn.out_proj.bias / (share_1 * heads)  # (B, m, W)
                share_2 = share_1 * (1 + n_layers * 2) * heads
                post = visual.ln_post.weight * (after - mean_post[:, None] / share_2) / std_post[:, None]
                total = total + (post + visual.ln_post.bias / share_2) @ visual.proj  # (B, m, D)
    return total * second_order.REFERENCE_COEFFICIENT / representation.norm(dim=-1)[:, None, None]


def _clipterm_reference(model, images, layer, neurons):
    out = second_order.trace(model, images, layer, convention="reference")
    vectors = second_order.path_vectors(model, layer, convention="reference")  # (M, K, D)
    return second_order.effects(out.scalars[:, neurons], vectors[neurons], out.constant), out  # (B, m, D)


@pytest.mark.parametrize("layer", [0, 1])
def test_reference_second_order_equals_the_reference_formulas_on_vit_b32(layer):
    model = small_vit_b32().double()
    torch.manual_seed(1)
    images = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    neurons = [0, 7, 1000, 3071]
    expected = reference_second_order(model, images, layer, neurons)  # (B, m, D)
    ours, out = _clipterm_reference(model.float(), images.float(), layer, neurons)
    assert rel(ours.double(), expected) <= 1e-5
    assert out.constant.abs().sum() > 0.01 * ours.abs().sum()  # the shares are there and matter
    clipterm = second_order.effects(second_order.trace(model, images.float(), layer).scalars[:, neurons],
                                    second_order.path_vectors(model, layer)[neurons])
    assert rel(clipterm.double(), expected) > 1e-3  # the default convention differs


def test_reference_second_order_equals_the_reference_formulas_on_the_toy(toy):
    from test_neurons import toy_images  # tests/ is on sys.path (rootdir conftest)

    model = toy.model.eval()
    images = toy_images(3)
    for layer in (1, 4):
        neurons = list(range(0, model.visual.transformer.resblocks[layer].mlp.c_proj.weight.shape[1], 37))
        expected = reference_second_order(model.double(), images.double(), layer, neurons)
        ours, _ = _clipterm_reference(model.float(), images, layer, neurons)
        assert rel(ours.double(), expected) <= 1e-5, layer
    model.float()


def test_reference_norms_with_the_shared_term_equal_formed_effects(toy):
    from test_neurons import toy_images

    model = toy.model.eval()
    out = second_order.trace(model, toy_images(4), 2, convention="reference")
    vectors = second_order.path_vectors(model, 2, convention="reference")
    formed = second_order.effects(out.scalars, vectors, out.constant)  # (B, M, D)
    norms = second_order.effect_norms(out.scalars, second_order.gram(vectors), vectors, out.constant.sum(1))
    assert torch.allclose(norms, formed.norm(dim=-1), rtol=1e-4, atol=1e-5)


def test_neurons_build_in_the_reference_convention_holds_the_reference_effects(toy, tmp_path):
    from test_neurons import toy_images

    from clipterm.analyses import ablation
    from clipterm.cache.build import BuildOptions, build_cache
    from clipterm.cache.neurons import NeuronFile, build_neurons
    from clipterm.cache.reader import CacheReader

    build_cache(BuildOptions(images="toy:12", name="c", cache_dir=str(tmp_path), dtype="float32"), loaded=toy)
    reader = CacheReader(tmp_path / "c")
    result = build_neurons(reader, 3, device="cpu", top_k=4, batch_size=5, loaded=toy, convention="reference")
    assert result.convention == "reference"
    file = NeuronFile(reader, 3)
    assert file.convention == "reference"
    out = second_order.trace(toy.model, toy_images(12), 3, convention="reference")
    formed = second_order.effects(out.scalars, second_order.path_vectors(toy.model, 3, "reference"), out.constant)  # (N, M, D)
    mean = formed.mean(0)  # (M, D)
    assert rel(file.tensor("mean"), mean) < 1e-5
    assert rel(file.tensor("norms").float(), formed.norm(dim=-1)) < 2e-3  # stored in float16
    assert rel(file.tensor("effect_sum"), formed.sum(1)) < 1e-5
    centred = formed - mean  # (N, M, D)
    top = centred.norm(dim=-1).T.topk(4, dim=1)  # (M, 4)
    assert torch.equal(file.tensor("top_rows"), top.indices)
    picked = centred.transpose(0, 1).gather(1, top.indices[..., None].expand(-1, -1, centred.shape[-1]))  # (M, 4, D)
    first = torch.linalg.svd(picked, full_matrices=False)[2][:, 0]  # (M, D)
    assert (torch.nn.functional.cosine_similarity(file.tensor("pc1"), first, dim=-1).abs() > 1 - 1e-4).all()
    significant = torch.zeros_like(formed[:, 0])  # (N, D)
    for neuron in range(formed.shape[1]):
        significant[top.indices[neuron]] += picked[neuron]
    assert rel(file.tensor("significant_sum"), significant) < 1e-5
    # ablation shifts are back in clipterm's space: the reference adds mean - effect to 100 e/|e|
    (_, shift), = ablation.second_order_shifts(file, ["all"])
    norm = reader.image_embeds().norm(dim=-1, keepdim=True)  # (N, 1)
    expected = (mean.sum(0) - formed.sum(1)) * norm / 100  # (N, D)
    assert rel(shift, expected) < 1e-5


# --------------------------------------------------------------------------- clip_text_span's direct effects and ablations


def reference_direct_effects(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """clip_text_span's (`prs_hook.py`, non-spatial) per-head and per-"MLP" effects, ([B, L, H, D], [B, L+1, D]):
    each head's CLS output through its out-proj slice plus 1/H of the bias, ln_pre's output then each MLP's,
    ln_post split in equal shares of the class token's mean and β, all divided by ‖embedding‖."""
    visual = model.visual
    blocks = visual.transformer.resblocks
    inputs, outputs = {}, {}
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0])) for i, b in enumerate(blocks)]
    hooks += [b.mlp.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out)) for i, b in enumerate(blocks)]
    hooks.append(visual.ln_pre.register_forward_hook(lambda m, a, out: outputs.__setitem__("pre", out)))
    hooks.append(visual.ln_post.register_forward_pre_hook(lambda m, a: outputs.__setitem__("post", a[0])))
    with torch.no_grad():
        representation = model.encode_image(images)  # (B, D)
    for hook in hooks:
        hook.remove()
    attentions, mlps = [], [outputs["pre"][:, 0]]
    with torch.no_grad():
        for i, block in enumerate(blocks):
            attn, x = block.attn, inputs[i]
            heads, width = attn.num_heads, x.shape[-1]
            normed = block.ln_1(x)
            probs = _attention_probs(attn, normed)  # (B, H, T, T)
            v = (normed @ attn.in_proj_weight[2 * width :].T + attn.in_proj_bias[2 * width :]).unflatten(-1, (heads, -1))  # (B, T, H, dh)
            cls = torch.einsum("bht,bthd->bhd", probs[:, :, 0], v)  # (B, H, dh)
            w_o = attn.out_proj.weight.view(width, heads, width // heads)  # (W, H, dh)
            per_head = torch.einsum("bhd,whd->bhw", cls, w_o) + attn.out_proj.bias / heads  # (B, H, W)
            attentions.append(block.ls_1(per_head))
            mlps.append(outputs[i][:, 0])
    attentions, mlps = torch.stack(attentions, 1), torch.stack(mlps, 1)  # (B, L, H, W), (B, L+1, W)
    residual = outputs["post"][:, 0] if outputs["post"].dim() == 3 else outputs["post"]  # (B, W)
    mean = residual.mean(-1, keepdim=True)  # (B, 1)
    std = (residual.var(-1, unbiased=False, keepdim=True) + visual.ln_post.eps).sqrt()  # (B, 1)
    terms = attentions.shape[1] + mlps.shape[1]  # 2L + 1
    ln = visual.ln_post
    share = terms * attentions.shape[2]
    attn_post = ln.weight * (attentions - mean[:, :, None, None] / share) / std[:, :, None, None] + ln.bias / share
    mlp_post = ln.weight * (mlps - mean[:, :, None] / terms) / std[:, :, None] + ln.bias / terms
    norm = representation.norm(dim=-1)
    return (attn_post @ visual.proj) / norm[:, None, None, None], (mlp_post @ visual.proj) / norm[:, None, None]


def _accuracy(embeds: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor) -> float:
    """The recipe's top-1 accuracy over the images with a label (clipterm leaves label -1 out too)."""
    known = labels >= 0
    return float(((embeds[known] @ weights.T).argmax(1) == labels[known]).float().mean())


def test_reference_ablation_equals_clip_text_span_recipe_on_the_same_images(toy, tmp_path):
    from test_neurons import toy_images

    from clipterm.analyses import ablation
    from clipterm.analyses.conventions import ReferenceView
    from clipterm.cache.build import BuildOptions, build_cache
    from clipterm.cache.reader import CacheReader

    n = 48
    build_cache(BuildOptions(images=f"toy:{n}", name="c", cache_dir=str(tmp_path), dtype="float32", neurons=True), loaded=toy)
    reader = CacheReader(tmp_path / "c")
    view = ReferenceView(reader, toy.model)
    attns, mlps = reference_direct_effects(toy.model.eval(), toy_images(n))  # (N, L, H, D), (N, L+1, D)
    assert rel(view.effects("L2.H1"), attns[:, 2, 1]) < 1e-5
    assert rel(view.effects("embed"), mlps[:, 0]) < 1e-5 and rel(view.effects("L3.MLP"), mlps[:, 4]) < 1e-5
    assert rel(view.effects("L4"), attns[:, 4].sum(1) + mlps[:, 5]) < 1e-5
    assert rel(view.effects("L2.H1"), reader.effects("L2.H1") / view.norm) > 1e-3  # clipterm's own differs

    task = "colour"
    labels = reader.labels(task)

    def encode(texts):
        with torch.no_grad():
            return toy.model.encode_text(toy.tokenizer(texts))

    weights = ablation.class_weights(encode, ablation.prompts_for("toy", task, reader.tasks[task], None))  # (K, D)
    scoring = ablation.Scoring(weights, reader.image_embeds(), labels)
    attns, mlps = attns.detach(), mlps.detach()

    # compute_ablations.py: baseline, "+ MLPs ablation" (ln_pre's term included), attention layers 0..l mean-ablated
    baseline = attns.sum((1, 2)) + mlps.sum(1)  # (N, D) = e/|e|
    all_mlps = attns.sum((1, 2)) + mlps.mean(0).sum(0)
    per_layer = attns.sum(2)  # (N, L, D)
    layers = per_layer.shape[1]
    curve = [mlps.sum(1) + per_layer[:, : l + 1].mean(0).sum(0) + per_layer[:, l + 1 :].sum(1) for l in range(layers)]
    assert _accuracy(baseline, weights, labels) == float(scoring.outcome().float().mean())
    mlp_rows = list(ablation.cumulative_shifts(reader, "mlp", view))
    assert mlp_rows[-1][0] == "embed+" + names_all(layers)
    assert _accuracy(all_mlps, weights, labels) == float(scoring.outcome(mlp_rows[-1][1]).float().mean())
    for layer, (_, shift) in enumerate(ablation.cumulative_shifts(reader, "head", view)):
        assert _accuracy(curve[layer], weights, labels) == float(scoring.outcome(shift).float().mean()), layer
    # the ablated embeddings themselves agree, not only the counts
    assert rel((reader.image_embeds() + mlp_rows[-1][1]) / view.norm, all_mlps) < 1e-5
    accuracies = [_accuracy(e, weights, labels) for e in [baseline, all_mlps, *curve]]
    assert accuracies[0] > 0.5 and len(set(accuracies)) > 2, accuracies  # a real classifier, and ablations that bite


def names_all(layers: int) -> str:
    from clipterm import names

    return names.format_layers(list(range(layers)))


def test_ablate_convention_reference_command(cli, toy, tmp_path):
    import json

    from clipterm.cache.build import BuildOptions, build_cache
    from clipterm.cache.neurons import build_neurons
    from clipterm.cache.reader import CacheReader

    build_cache(BuildOptions(images="toy:24", name="n", cache_dir=str(tmp_path), neurons=True), loaded=toy)
    build_cache(BuildOptions(images="toy:24", name="plain", cache_dir=str(tmp_path)), loaded=toy)
    path = str(tmp_path / "n")
    result = cli("ablate", path, "--by", "mlp", "--cumulative", "--task", "colour", "--draws", "200", "--convention", "reference", "--json")
    assert result.code == 0, result
    payload = json.loads(result.out)
    assert payload["convention"] == "reference"
    rows = payload["tasks"]["colour"]
    assert {r["component"] for r in rows["components"]} == {"embed", *[f"L{l}.MLP" for l in range(6)]}
    assert rows["cumulative"][-1]["component"] == "embed+L0-5"
    own = json.loads(cli("ablate", path, "--by", "mlp", "--task", "colour", "--draws", "200", "--json").out)
    assert own["convention"] == "clipterm" and "embed" not in {r["component"] for r in own["tasks"]["colour"]["components"]}

    refused = cli("ablate", str(tmp_path / "plain"), "--convention", "reference", "--task", "colour")
    assert refused.code == 2 and "--neurons" in refused.err
    assert cli("ablate", path, "--convention", "theirs").code == 2
    build_neurons(CacheReader(tmp_path / "n"), 4, device="cpu", top_k=3, loaded=toy)
    mismatch = cli("ablate", path, "--second-order", "L4", "--task", "colour", "--convention", "reference")
    assert mismatch.code == 2 and "--convention reference" in mismatch.err


# --------------------------------------------------------------------------- clip_text_span's TextSpan


@pytest.mark.parametrize("n", [40, 12])  # more images than the toy's head dim (16), and fewer: the rank is min(N, dh)
def test_textspan_convention_reference_gives_the_reference_texts_for_every_head(cli, toy, tmp_path, n):
    """`compute_complete_text_set.py`'s texts per head: `replace_with_iterative_removal`, written out in
    `test_textspan.reference_text_span`, run on each head's reference effects (`reference_direct_effects` above,
    from the model's own forward) with the unit text embeddings, at the reference's rank min(N, head dim)."""
    import json

    import torch.nn.functional as F
    from test_neurons import toy_images
    from test_textspan import reference_text_span

    from clipterm.cache.build import BuildOptions, build_cache
    from clipterm.inputs.texts import load_pool

    build_cache(BuildOptions(images=f"toy:{n}", name="c", cache_dir=str(tmp_path), dtype="float32", neurons=True), loaded=toy)
    attns = reference_direct_effects(toy.model.eval(), toy_images(n))[0].detach()  # (N, L, H, D)
    texts = load_pool("toy").texts
    with torch.no_grad():
        text_embeds = F.normalize(toy.model.encode_text(toy.tokenizer(texts)).float(), dim=-1)  # (M, D)
    layers, heads = attns.shape[1:3]
    rank = min(n, toy.model.visual.transformer.width // heads)
    expected = {f"L{l}.H{h}": reference_text_span(attns[:, l, h], text_embeds, n_texts=10, rank=rank)[0]
                for l in range(layers) for h in range(heads)}

    def texts_per_head(*options: str) -> tuple[dict, dict[str, list[int]]]:
        result = cli("textspan", str(tmp_path / "c"), "--layers", f"L0-{layers - 1}", "--baseline-draws", "0",
                     "--cache-dir", str(tmp_path), "--json", *options)
        assert result.code == 0, result
        payload = json.loads(result.out)
        return payload, {e["component"]: [t["row"] for t in e["texts"]] for e in payload["components"]}

    payload, chosen = texts_per_head("--convention", "reference")
    assert payload["convention"] == "reference" and payload["rank"] == rank
    assert list(chosen) == list(expected)  # every head
    for name, rows in expected.items():
        assert chosen[name] == rows, name  # the same texts, in the same order
    payload, own = texts_per_head()
    assert payload["convention"] == "clipterm" and payload["rank"] is None
    assert sum(own[name] != expected[name] for name in expected) > len(expected) // 2  # the default convention differs


def test_textspan_convention_reference_refuses_what_it_cannot_do_in_one_line(cli, toy, tmp_path):
    from test_reliability import one_line_error

    from clipterm.cache.build import BuildOptions, build_cache

    build_cache(BuildOptions(images="toy:8", name="n", cache_dir=str(tmp_path), neurons=True), loaded=toy)
    build_cache(BuildOptions(images="toy:8", name="plain", cache_dir=str(tmp_path)), loaded=toy)
    path = str(tmp_path / "n")
    cases = {
        "no convention 'bogus'": (path, "--convention", "bogus"),
        "--neurons": (str(tmp_path / "plain"), "--convention", "reference"),
        "heads only, not L3.MLP": (path, "-c", "L5.H0", "-c", "L3.MLP", "--convention", "reference"),
        "does not combine with --evaluate": (path, "--evaluate", "2", "--convention", "reference"),
    }
    for words, args in cases.items():
        result = cli("textspan", *args, "--cache-dir", str(tmp_path))
        assert result.code == 2 and words in one_line_error(result), (words, result)
