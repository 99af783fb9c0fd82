"""Writes tests/reference/data/anomalyclip.npz from the authors' AnomalyCLIP code (zqhang/AnomalyCLIP, MIT).

    python tests/reference/anomalyclip_reference.py AUTHORS_REPO OUT.npz

``AUTHORS_REPO`` is a checkout of the authors' repository (its ``AnomalyCLIP_lib``, ``prompt_ensemble.py`` and
``loss.py`` are imported from there; nothing of it is copied here). The script runs, on the CPU in float32:

1. open_clip's model for :data:`CONFIG` (a small ViT with the published depth: 24 visual blocks, DPAM on 19,
   maps of blocks 6/12/18/24; 12 text blocks, deep tokens in 9), run at :data:`IMAGE_SIZE`, above its native
   size, so that their bilinear resize of the positional embedding is compared too; seeded random weights, every
   parameter perturbed so no bias or norm stays at its default; its state dict is converted once to the
   authors' CLIP (``AnomalyCLIP_lib.build_model``) — both follow OpenAI's parameter names;
2. the authors' prompt learner (n_ctx 12, depth 9, t_n_ctx 4), seeded;
3. their test script's steps for each image alone (batch 1, as test.py): DPAM, the learned text features,
   the image score ``softmax(image·text / 0.07)[abnormal]``, the layer maps ``(p_abn + 1 - p_norm) / 2``
   summed, then ``scipy.ndimage.gaussian_filter(σ=4)``;
4. their training step (train.py) on the whole batch: focal + two dice terms per layer ×4, plus the cross
   entropy of the image logits, one Adam step (lr 1e-3, betas (0.5, 0.999)).

tests/test_anomalyclip_parity.py rebuilds the same open_clip weights (checked by a checksum) and compares.
"""

from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

CONFIG = {
    "embed_dim": 64,
    "quick_gelu": True,  # OpenAI's CLIP, as the authors' implementation
    "vision_cfg": {"image_size": 48, "layers": 24, "width": 128, "head_width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 12},
}
CONFIG_NAME = "anomalyclip-parity-vit"
# Run above the native 48 px (6×6 → 8×8 positions), as the published 518 px on ViT-L/14@336: their CLIP
# resizes the positional embedding bilinearly at its first forward.
IMAGE_SIZE = 64
SEED = 0
BATCH = 4
LABELS = [1, 0, 1, 0]
FEATURES = [6, 12, 18, 24]  # the authors' features_list (blocks from 1)
DPAM_LAYER = 20  # the authors' DPAM_layer: range(1, 20) replaces the last 19 blocks
DESIGN = {"Prompt_length": 12, "learnabel_text_embedding_depth": 9, "learnabel_text_embedding_length": 4}


def build_open_clip_model():
    """The seeded open_clip model of CONFIG, every parameter perturbed (shared with the test)."""
    import open_clip

    open_clip.factory._MODEL_CONFIGS[CONFIG_NAME] = json.loads(json.dumps(CONFIG))
    torch.manual_seed(SEED)
    model = open_clip.create_model(CONFIG_NAME)
    generator = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def weights_checksum(state_dict) -> str:
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def make_batch():
    """Images, masks (a rectangle on each anomalous image) and labels, seeded."""
    generator = torch.Generator().manual_seed(SEED + 2)
    size = IMAGE_SIZE
    images = torch.randn(BATCH, 3, size, size, generator=generator)
    masks = torch.zeros(BATCH, size, size)
    for index, label in enumerate(LABELS):
        if label:
            top, left = 5 + 9 * index, 3 + 7 * index
            masks[index, top : top + 18, left : left + 24] = 1
    return images, masks, torch.tensor(LABELS)


def _import_authors(repo: Path):
    # Their modules import two things this venv lacks: pkg_resources (only for its vendored `packaging`) and
    # thop (imported, never used). Both are stood in for; their code is imported unchanged.
    import packaging.version

    sys.modules.setdefault("pkg_resources", types.SimpleNamespace(packaging=packaging))
    sys.modules.setdefault("thop", types.SimpleNamespace(profile=None))
    sys.path.insert(0, str(repo))
    import AnomalyCLIP_lib
    from AnomalyCLIP_lib.build_model import build_model
    from loss import BinaryDiceLoss, FocalLoss
    from prompt_ensemble import AnomalyCLIP_PromptLearner

    return AnomalyCLIP_lib, build_model, AnomalyCLIP_PromptLearner, FocalLoss, BinaryDiceLoss


def text_features_of(model, prompt_learner):
    prompts, tokenized_prompts, compound_prompts_text = prompt_learner(cls_id=None)
    features = model.encode_text_learn(prompts, tokenized_prompts, compound_prompts_text).float()
    features = torch.stack(torch.chunk(features, dim=0, chunks=2), dim=1)
    return features / features.norm(dim=-1, keepdim=True)


def main(repo: Path, out: Path) -> None:
    from scipy.ndimage import gaussian_filter

    lib, build_model, PromptLearner, FocalLoss, BinaryDiceLoss = _import_authors(repo)
    reference = build_open_clip_model()
    state = {key: value.clone() for key, value in reference.state_dict().items()}
    checksum = weights_checksum(state)
    # open_clip keeps OpenAI's names; its logit_bias / attn_mask have no counterpart in the authors' CLIP.
    authors_state = {key: value for key, value in state.items() if key not in ("logit_bias", "attn_mask")}
    model = build_model("parity", authors_state, DESIGN).float().eval()
    size = IMAGE_SIZE
    images, masks, labels = make_batch()

    torch.manual_seed(SEED + 3)
    prompt_learner = PromptLearner(model, DESIGN)
    initial = {
        key: value.detach().clone()
        for key, value in prompt_learner.state_dict().items()
        if key.startswith(("ctx_", "compound_prompts_text"))
    }
    model.visual.DAPM_replace(DPAM_layer=DPAM_LAYER)

    # test.py, one image at a time
    text_features = text_features_of(model, prompt_learner).detach()
    scores, raw_maps, smoothed_maps = [], [], []
    with torch.no_grad():
        for image in images:
            image_features, patch_features = model.encode_image(image[None], FEATURES, DPAM_layer=DPAM_LAYER)
            image_features = image_features / image_features.norm(dim=-1, keepdim=True)
            probabilities = ((image_features @ text_features.permute(0, 2, 1)) / 0.07).softmax(-1)
            scores.append(probabilities[:, 0, 1])
            layer_maps = []
            for patch_feature in patch_features:
                patch_feature = patch_feature / patch_feature.norm(dim=-1, keepdim=True)
                similarity, _ = lib.compute_similarity(patch_feature, text_features[0])
                similarity_map = lib.get_similarity_map(similarity[:, 1:, :], size)
                layer_maps.append((similarity_map[..., 1] + 1 - similarity_map[..., 0]) / 2.0)
            summed = torch.stack(layer_maps).sum(0)
            raw_maps.append(summed[0])
            smoothed_maps.append(torch.from_numpy(gaussian_filter(summed[0].numpy(), sigma=4)))

    # train.py, one step on the whole batch
    optimizer = torch.optim.Adam(list(prompt_learner.parameters()), lr=1e-3, betas=(0.5, 0.999))
    focal, dice = FocalLoss(), BinaryDiceLoss()
    with torch.no_grad():
        image_features, patch_features = model.encode_image(images, FEATURES, DPAM_layer=DPAM_LAYER)
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features_of(model, prompt_learner)
    logits = (image_features.unsqueeze(1) @ text_features.permute(0, 2, 1))[:, 0, ...] / 0.07
    image_loss = torch.nn.functional.cross_entropy(logits.squeeze(), labels.long())
    map_loss = 0
    for patch_feature in patch_features:
        patch_feature = patch_feature / patch_feature.norm(dim=-1, keepdim=True)
        similarity, _ = lib.compute_similarity(patch_feature, text_features[0])
        similarity_map = lib.get_similarity_map(similarity[:, 1:, :], size).permute(0, 3, 1, 2)
        map_loss = map_loss + focal(similarity_map, masks)
        map_loss = map_loss + dice(similarity_map[:, 1, :, :], masks)
        map_loss = map_loss + dice(similarity_map[:, 0, :, :], 1 - masks)
    map_loss = 4 * map_loss
    optimizer.zero_grad()
    (map_loss + image_loss).backward()
    optimizer.step()
    learned = {
        key: value
        for key, value in prompt_learner.named_parameters()
        if key.startswith(("ctx_", "compound_prompts_text"))
    }

    arrays = {
        "config": np.array(json.dumps(CONFIG)),
        "image_size": np.array(IMAGE_SIZE),
        "weights_sha256": np.array(checksum),
        "images": images.numpy(),
        "masks": masks.numpy(),
        "labels": labels.numpy(),
        "pred_score": torch.cat(scores).numpy(),
        "anomaly_map_raw": torch.stack(raw_maps).numpy(),
        "anomaly_map": torch.stack(smoothed_maps).float().numpy(),
        "map_loss": np.array(float(map_loss)),
        "image_loss": np.array(float(image_loss)),
    }
    for key, value in initial.items():
        arrays[f"initial/{key}"] = value.numpy()
    for key, value in learned.items():
        arrays[f"grad/{key}"] = value.grad.numpy()
        arrays[f"updated/{key}"] = value.detach().numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(
        f"wrote {out}: map loss {float(map_loss):.6f}, image loss {float(image_loss):.6f}, "
        f"scores {torch.cat(scores).numpy()}"
    )


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]).resolve(), Path(sys.argv[2]))
