"""Figure 3 analog: where the voco token looks. For each test image, the attention of the (first)
voco query over the image block, averaged over every head of every layer of the language model,
from the compression prefill (the same forward that fills the visual cache).

Shape notation: M images, L layers, H heads, T prompt length, N_img image-block tokens.
"""

from __future__ import annotations

import torch

from ..inference import ImageEncoder
from ..layout import IMAGE


@torch.no_grad()
def voco_attention(model, encoder: ImageEncoder, images: list[str]) -> torch.Tensor:
    """(M, N_img): the voco query's attention over the image block (anchors first for HTC)."""
    model.set_attn_implementation("eager")  # eager attention returns its probabilities
    kinds, out = model.image_prefill(*encoder.batch(images), output_attentions=True)
    att = torch.stack(out.attentions).float().mean(dim=(0, 2))  # (M, T, T): mean over layers and heads
    voco = kinds.shape[1] - model.config.num_voco
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
