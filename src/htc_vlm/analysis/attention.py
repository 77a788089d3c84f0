"""Figure 3 analog: where the voco token looks. For each test image, the attention of the (first)
voco query over the image block, averaged over every head of every layer of the language model,
from the compression prefill (the same forward that fills the visual cache).

Shape notation: M images, L layers, H heads, T prompt length, N_img image-block tokens.
"""

from __future__ import annotations

import torch

from ..inference import ImageEncoder
from ..layout import IMAGE, image_prompt_ids, token_kinds
from ..masking import attention_mask_4d


@torch.no_grad()
def voco_attention(model, encoder: ImageEncoder, images: list[str]) -> torch.Tensor:
    """(M, N_img): the voco query's attention over the image block (anchors first for HTC)."""
    c = model.config
    model.set_attn_implementation("eager")  # eager attention returns its probabilities
    ids = torch.tensor(image_prompt_ids(c)).expand(len(images), -1)
    kinds = token_kinds(ids, None, c)
    pix, q = encoder.batch(images)
    embeds = model.model.embed(ids, kinds, pix, q)
    out = model.model.language_model(inputs_embeds=embeds, output_attentions=True,
                                     attention_mask=attention_mask_4d(kinds, c.compresses, c.vision_attention, embeds.dtype),
                                     position_ids=torch.arange(ids.shape[1]).expand(len(images), -1))
    att = torch.stack(out.attentions).float().mean(dim=(0, 2))  # (M, T, T): mean over layers and heads
    voco = ids.shape[1] - c.num_voco
    cols = (kinds[0] == IMAGE).nonzero().flatten()
    return att[:, voco, cols]


def plot_heatmaps(maps: dict[str, tuple[torch.Tensor, list[str]]], path, caption: str) -> None:
    """One heatmap per model: rows = images, columns = labelled image-block tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(maps), figsize=(4 + 3 * len(maps), 5), squeeze=False)
    for ax, (title, (m, labels)) in zip(axes[0], maps.items()):
        im = ax.imshow(m.numpy(), aspect="auto", cmap="viridis")
        ax.set_title(title)
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.set_ylabel("test image")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(caption, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
