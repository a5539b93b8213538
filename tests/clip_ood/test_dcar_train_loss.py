"""DCAR training loss: the attribute loss reaches the text context only when ``attr_text_grad`` is set."""

import torch

from clip_ood.dcar.losses import category_similarity
from clip_ood.dcar.train import DCARConfig, RetrievalLoss, build_learner, category_text_features

CATS = ["seven", "three"]
BATCH = {
    "images": torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
    "captions": ["a red seven digit on a grass background", "a blue three digit on a brick background",
                 "a red three digit on a grass background", "a blue seven digit on a brick background"],
    "categories": ["seven", "three", "three", "seven"],
    "attributes": [["red digit", "grass background"], ["blue digit", "brick background"],
                   ["red digit", "grass background"], ["blue digit", "brick background"]],
    "negatives": [[], [], [], []],
}
VOCAB = ["red digit", "blue digit", "grass background", "brick background"]


def _grads(tiny_encoder, **over):
    cfg = DCARConfig(method="dcar", n_vis=2, vis_depth=1, **over)
    torch.manual_seed(0)
    model = build_learner(tiny_encoder.model, tiny_encoder.tokenizer, cfg, CATS)
    model.set_attributes(VOCAB, torch.tensor([2.0, 1.0, 0.5, 0.5]))
    cat_sim = category_similarity(category_text_features(model, CATS))
    out = RetrievalLoss(cfg, CATS, cat_sim, seed=0)(model, BATCH)
    out["loss"].backward()
    return model.ctx.grad.clone(), model.vis_prompts.grad.clone(), out


def test_attribute_loss_trains_visual_prompts_only_by_default(tiny_encoder):
    assert DCARConfig().attr_text_grad is False
    ctx_none, vis_none, out_none = _grads(tiny_encoder, lambda_attr=0.0)
    ctx_det, vis_det, out_det = _grads(tiny_encoder, lambda_attr=0.5)
    ctx_full, _, out_full = _grads(tiny_encoder, lambda_attr=0.5, attr_text_grad=True)
    assert "loss_attr" not in out_none and float(out_det["loss_attr"].detach()) > 0
    # same caption loss; the detached attribute loss adds nothing to the context gradient ...
    torch.testing.assert_close(out_det["loss_cat"], out_none["loss"])
    torch.testing.assert_close(ctx_det, ctx_none)
    # ... but does move the visual prompts, and with attr_text_grad the context too
    assert not torch.allclose(vis_det, vis_none)
    assert not torch.allclose(ctx_full, ctx_none)
    torch.testing.assert_close(out_full["loss"], out_det["loss"])
