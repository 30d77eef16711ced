"""Local stand-ins for the real job's Hub downloads, in the Hugging Face cache layout.

`Salesforce/blip-image-captioning-base` and `tomytjandra/h-and-m-fashion-caption` cannot be fetched
without the Hub. These stand-ins have their shape, so the default profile runs unchanged against them
with `HF_HOME=<folder> HF_HUB_OFFLINE=1`, exactly as on a machine whose cache was filled earlier:

- the model: BLIP-base's real config values (224M parameters; or a shrunk copy with the same keys and
  ids and fewer, narrower layers), random weights, the Hub repository's legacy processor files
  (preprocessor_config.json, tokenizer_config.json, special_tokens_map.json, vocab.txt) and a
  vocabulary with bert-base-uncased's special ids ([PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102,
  [MASK]=103) plus BLIP's [DEC]=30522 and [ENC]=30523;
- the dataset: parquet shards under data/ with columns `image` and `text` and a dataset card naming
  them, catalogue-sized JPEGs (1166x1750 by default) and H&M-style descriptions of realistic length
  with numbers, units and sentence punctuation.

Both go into the hub cache (`<HF_HOME>/hub/{models,datasets}--<org>--<name>/snapshots/<sha>/` with
`refs/main`), the layout `huggingface-cli download` and every `from_pretrained` leave behind.
"""

from __future__ import annotations

import io
import json
import random
import string
from dataclasses import dataclass
from pathlib import Path

MODEL_ID = "Salesforce/blip-image-captioning-base"
DATASET_ID = "tomytjandra/h-and-m-fashion-caption"
# fixed commit ids, so repeated builds land in the same snapshot folder
MODEL_REVISION = "82a37760796d32b1411fe092ab5d4e227313294b"
DATASET_REVISION = "6b5f5a4e2a0c3d1f0e9b8a7c6d5e4f3a2b1c0d9e"
COMPLETE = ".fashioncap-standin"  # written last: a snapshot without it is rebuilt

# The Hub config's values (config.json of Salesforce/blip-image-captioning-base); SHRUNK keeps every key
# and id and makes the model ~70x smaller for tests.
TEXT_CONFIG = dict(vocab_size=30524, hidden_size=768, encoder_hidden_size=768, intermediate_size=3072,
                   num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=512,
                   bos_token_id=30522, eos_token_id=2, pad_token_id=0, sep_token_id=102, projection_dim=768,
                   layer_norm_eps=1e-12, hidden_act="gelu", max_length=20, tie_word_embeddings=True)
VISION_CONFIG = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     image_size=384, patch_size=16, layer_norm_eps=1e-5, projection_dim=512, max_length=20)
TOP_CONFIG = dict(projection_dim=512, image_text_hidden_size=256, logit_scale_init_value=2.6592)
SHRUNK = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2)

PREPROCESSOR = {"do_normalize": True, "do_resize": True, "image_processor_type": "BlipImageProcessor",
                "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
                "processor_class": "BlipProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
                "size": {"height": 384, "width": 384}}
TOKENIZER_CONFIG = {"cls_token": "[CLS]", "do_basic_tokenize": True, "do_lower_case": True, "mask_token": "[MASK]",
                    "model_max_length": 512, "name_or_path": "bert-base-uncased", "never_split": None,
                    "pad_token": "[PAD]", "processor_class": "BlipProcessor", "sep_token": "[SEP]",
                    "strip_accents": None, "tokenize_chinese_chars": True, "tokenizer_class": "BertTokenizer",
                    "unk_token": "[UNK]"}
SPECIAL_TOKENS_MAP = {"bos_token": "[DEC]", "cls_token": "[CLS]", "mask_token": "[MASK]", "pad_token": "[PAD]",
                      "sep_token": "[SEP]", "unk_token": "[UNK]", "additional_special_tokens": ["[ENC]"]}
BERT_VOCAB_SIZE = 30522

# H&M-style copy: product, colour, material, details, and a sentence with a measure.
COLOURS = ["black", "white", "dark blue", "light beige", "dusty pink", "khaki green", "dark grey marl", "cream",
           "burgundy", "light denim blue", "mustard yellow", "powder blue", "rust brown", "natural white"]
PRODUCTS = {
    "trousers": ["wide-cut trousers", "slim-fit chinos", "joggers", "cargo trousers", "tailored trousers"],
    "dress": ["short dress", "midi dress", "wrap dress", "shirt dress", "slip dress"],
    "top": ["fitted top", "vest top", "t-shirt", "long-sleeved top", "crop top"],
    "jumper": ["jumper", "cardigan", "fine-knit jumper", "hoodie", "sweatshirt"],
    "shoes": ["trainers", "ankle boots", "loafers", "block-heeled sandals", "ballet pumps"],
    "bag": ["shoulder bag", "tote bag", "crossbody bag", "backpack", "clutch bag"],
}
MATERIALS = ["soft cotton jersey", "woven fabric", "washed denim", "rib-knit viscose", "sturdy cotton twill",
             "soft, fine-knit wool blend", "imitation leather", "airy linen", "satin", "organic cotton",
             "recycled polyester", "sweatshirt fabric with a soft brushed inside"]
DETAILS = ["a round neckline", "a V-neck", "long puff sleeves", "short sleeves", "a zip fly and button",
           "an elasticated drawstring waist", "side pockets", "welt back pockets", "covered buttons down the front",
           "a concealed zip at the back", "dropped shoulders", "ribbing at the cuffs and hem", "a tie belt",
           "adjustable shoulder straps", "a lined upper", "a padded footbed", "rubber soles", "a magnetic fastener",
           "an inner compartment", "a detachable shoulder strap", "flared legs", "a high waist",
           "lacing at the front", "a chunky sole", "a slightly longer back", "gently dropped shoulders"]
MEASURES = ["Heel {h} cm.", "Length {l} cm in a size M.", "Inside leg {l} cm in a size 38.", "Shaft height {s} cm.",
            "Size {w}x{s}x{d} cm.", "Handle drop {s} cm.", "Regular fit.", "Relaxed fit.", "Slim fit."]
SHAPES = {"trousers": "legs", "dress": "dress", "top": "top", "jumper": "top", "shoes": "shoe", "bag": "bag"}
RGB = {"black": (25, 25, 28), "white": (245, 245, 242), "dark blue": (30, 40, 90), "light beige": (222, 205, 178),
       "dusty pink": (214, 160, 165), "khaki green": (120, 125, 80), "dark grey marl": (70, 70, 75),
       "cream": (240, 232, 210), "burgundy": (110, 20, 40), "light denim blue": (130, 160, 200),
       "mustard yellow": (215, 170, 40), "powder blue": (170, 200, 230), "rust brown": (150, 75, 40),
       "natural white": (238, 234, 222)}


@dataclass(frozen=True)
class Item:
    """One catalogue row: a description and the product it describes."""

    text: str
    category: str
    colour: str


def hm_item(rng: random.Random) -> Item:
    """An H&M-style product description: 15-45 words, numbers, units, commas and full stops."""
    category = rng.choice(sorted(PRODUCTS))
    colour = rng.choice(COLOURS)
    details = rng.sample(DETAILS, rng.randint(2, 5))
    first = f"{colour.capitalize()} {rng.choice(PRODUCTS[category])} in {rng.choice(MATERIALS)} with "
    first += (", ".join(details[:-1]) + " and " + details[-1]) + "."
    sentences = [first]
    for _ in range(rng.randint(1, 3)):
        measure = rng.choice(MEASURES).format(h=rng.choice(["2", "3.5", "4.5", "6", "8.5"]),
                                               l=rng.randint(40, 110), s=rng.randint(8, 60),
                                               w=rng.randint(18, 45), d=rng.randint(5, 15))
        sentences.append(measure)
    if rng.random() < 0.5:
        sentences.append(f"{rng.choice([60, 70, 95, 100])}% {rng.choice(['cotton', 'polyester', 'viscose', 'wool'])}.")
    return Item(" ".join(sentences), category, colour)


def hm_image(item: Item, rng: random.Random, size: tuple[int, int]) -> bytes:
    """A catalogue photo of the item: the product's silhouette in its colour on a studio background,
    with sensor noise so the JPEG is as large as a real one."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    w, h = size
    image = Image.new("RGB", size, (236 + rng.randint(-6, 6),) * 3)
    draw = ImageDraw.Draw(image)
    colour = RGB[item.colour]
    cx, cy, s = w // 2 + rng.randint(-w // 12, w // 12), h // 2 + rng.randint(-h // 12, h // 12), min(w, h) // 3
    shape = SHAPES[item.category]
    if shape == "legs":
        draw.rectangle([cx - s, cy - s * 1.6, cx + s, cy - s * 1.2], fill=colour)
        draw.polygon([(cx - s, cy - s * 1.2), (cx - s * 1.1, cy + s * 1.8), (cx - s * 0.1, cy + s * 1.8), (cx, cy - s * 0.6),
                      (cx + s * 0.1, cy + s * 1.8), (cx + s * 1.1, cy + s * 1.8), (cx + s, cy - s * 1.2)], fill=colour)
    elif shape in ("dress", "top"):
        length = 1.8 if shape == "dress" else 0.9
        draw.polygon([(cx - s * 0.6, cy - s), (cx - s * 1.3, cy - s * 0.5), (cx - s * 1.0, cy - s * 0.2),
                      (cx - s * 0.7, cy - s * 0.4), (cx - s * 0.8 - (0.4 * s if shape == "dress" else 0), cy + s * length),
                      (cx + s * 0.8 + (0.4 * s if shape == "dress" else 0), cy + s * length), (cx + s * 0.7, cy - s * 0.4),
                      (cx + s * 1.0, cy - s * 0.2), (cx + s * 1.3, cy - s * 0.5), (cx + s * 0.6, cy - s)], fill=colour)
    elif shape == "shoe":
        draw.ellipse([cx - s * 1.2, cy - s * 0.3, cx + s * 1.2, cy + s * 0.5], fill=colour)
        draw.rectangle([cx - s * 1.2, cy + s * 0.3, cx + s * 1.2, cy + s * 0.5], fill=(40, 40, 40))
    else:
        draw.rounded_rectangle([cx - s, cy - s * 0.6, cx + s, cy + s * 0.8], radius=s // 6, fill=colour)
        draw.arc([cx - s * 0.6, cy - s * 1.4, cx + s * 0.6, cy - s * 0.2], 180, 360, fill=colour, width=max(4, s // 12))
    image = image.filter(ImageFilter.GaussianBlur(2))
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 6, (h, w, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks, as BERT's basic tokenizer splits them."""
    from tokenizers.pre_tokenizers import BertPreTokenizer

    return [w for w, _ in BertPreTokenizer().pre_tokenize_str(text.lower())]


def standin_vocab() -> list[str]:
    """30,522 WordPiece entries laid out as bert-base-uncased's: [PAD], [unused0-98], [UNK], [CLS], [SEP],
    [MASK], more [unusedN] up to id 998, then characters, whole words and ##-continuations."""
    vocab = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [f"[unused{i}]" for i in range(99, 994)]
    chars = [c for c in string.printable[:94] if not c.isupper()]
    rng = random.Random(0)
    words = {w for _ in range(3000) for w in _words(hm_item(rng).text)} | {str(n) for n in range(200)}
    for piece in chars + sorted(words - set(chars)):
        vocab.append(piece)
    vocab += [f"##{s}" for s in sorted({*(c for c in chars if c.isalnum()), "ed", "ing", "ly", "er", "est", "ion"})]
    seen = set(vocab)
    filler = (f"[unused{i}]" for i in range(994, 10**6))
    while len(vocab) < BERT_VOCAB_SIZE:
        token = next(filler)
        if token not in seen:
            vocab.append(token)
    return vocab[:BERT_VOCAB_SIZE]


def blip_config(shrunk: bool):
    """BLIP-base's configuration, or the same keys with fewer and narrower layers."""
    from transformers import BlipConfig

    text, vision = dict(TEXT_CONFIG), dict(VISION_CONFIG)
    if shrunk:
        text.update(SHRUNK, encoder_hidden_size=SHRUNK["hidden_size"])
        vision.update(SHRUNK)
    return BlipConfig(text_config=text, vision_config=vision, **TOP_CONFIG)


def write_model(folder: Path, shrunk: bool, seed: int) -> None:
    """A BLIP captioning checkpoint with random weights and the Hub repository's file set."""
    import torch
    from transformers import BlipForConditionalGeneration

    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(blip_config(shrunk))
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "generation_config.json").unlink(missing_ok=True)  # the Hub repository has none
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP, indent=2))
    (folder / "vocab.txt").write_text("\n".join(standin_vocab()) + "\n")


def dataset_card(items: int, size: int) -> str:
    """The dataset card's YAML header, which tells `datasets` the features and where the shards are."""
    return (
        "---\ndataset_info:\n  features:\n  - name: image\n    dtype: image\n  - name: text\n    dtype: string\n"
        f"  splits:\n  - name: train\n    num_bytes: {size}\n    num_examples: {items}\n"
        f"  download_size: {size}\n  dataset_size: {size}\nconfigs:\n- config_name: default\n  data_files:\n"
        "  - split: train\n    path: data/train-*\n---\n# H&M fashion captions (local stand-in)\n"
    )


def write_dataset(folder: Path, items: int, shards: int, image_size: tuple[int, int], seed: int) -> None:
    """`items` rows of (image, text) in `shards` parquet files under data/, and the dataset card."""
    import datasets

    rng = random.Random(seed)
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    (folder / "data").mkdir(parents=True, exist_ok=True)
    bounds = [round(i * items / shards) for i in range(shards + 1)]
    for shard in range(shards):
        rows = {"image": [], "text": []}
        for _ in range(bounds[shard], bounds[shard + 1]):
            item = hm_item(rng)
            rows["image"].append({"bytes": hm_image(item, rng, image_size), "path": None})
            rows["text"].append(item.text)
        path = folder / "data" / f"train-{shard:05d}-of-{shards:05d}.parquet"
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    size = sum(p.stat().st_size for p in (folder / "data").glob("*.parquet"))
    (folder / "README.md").write_text(dataset_card(items, size))


def snapshot(hub_cache: Path, kind: str, repo_id: str, revision: str) -> tuple[Path, bool]:
    """The snapshot folder of a repository in the hub cache (refs/main pointing at it), and whether a
    complete stand-in is already there."""
    repo = hub_cache / f"{kind}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    folder = repo / "snapshots" / revision
    return folder, (folder / COMPLETE).is_file()


def build(hf_home: Path, shrunk: bool, items: int, shards: int, image_size: tuple[int, int], seed: int = 0) -> dict:
    """Writes both stand-ins into `hf_home`/hub (kept when already complete with the same settings)."""
    import shutil

    hub = hf_home / "hub"
    settings = {"shrunk": shrunk, "items": items, "shards": shards, "image_size": list(image_size), "seed": seed}
    built = {}
    for kind, repo_id, revision, writer, mine in (
        ("model", MODEL_ID, MODEL_REVISION, lambda f: write_model(f, shrunk, seed), {"shrunk": shrunk, "seed": seed}),
        ("dataset", DATASET_ID, DATASET_REVISION, lambda f: write_dataset(f, items, shards, image_size, seed),
         settings),
    ):
        folder, complete = snapshot(hub, kind, repo_id, revision)
        if complete and json.loads((folder / COMPLETE).read_text()) == mine:
            built[kind] = {"path": str(folder), "reused": True}
            continue
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        writer(folder)
        (folder / COMPLETE).write_text(json.dumps(mine))
        built[kind] = {"path": str(folder), "reused": False}
    for info in built.values():
        info["bytes"] = sum(p.stat().st_size for p in Path(info["path"]).rglob("*") if p.is_file())
    return built
