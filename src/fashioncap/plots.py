"""Pictures for people: the loss curve and captioned validation panels (pure: values in, image out)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw


def loss_curve(train_log: list[dict], val_log: list[dict], path: Path, label_smoothing: float = 0.0) -> None:
    """Draws the training loss and validation loss against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train_log], [r["loss"] for r in train_log], label="train loss", lw=0.8)
    ax.plot([r["step"] for r in val_log], [r["val_loss"] for r in val_log], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"loss (cross-entropy, label smoothing {label_smoothing:g})" if label_smoothing else "cross-entropy")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def caption_panel(images: list[Image.Image], captions: list[str], references: list[str], width: int = 220) -> Image.Image:
    """Images side by side with their generated caption (and the reference) written below each,
    for `mlflow.log_image` during training."""
    lines_per = 6
    height = width + 14 * lines_per + 8
    panel = Image.new("RGB", (width * len(images), height), "white")
    draw = ImageDraw.Draw(panel)
    for i, (image, caption, reference) in enumerate(zip(images, captions, references)):
        panel.paste(image.convert("RGB").resize((width - 8, width - 8)), (i * width + 4, 4))
        text = _wrap(f"> {caption}", 34)[:3] + _wrap(f"ref: {reference}", 34)[:3]
        for j, line in enumerate(text):
            draw.text((i * width + 6, width + 2 + 14 * j), line, fill="black" if j < 3 else "#666666")
    return panel


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]
