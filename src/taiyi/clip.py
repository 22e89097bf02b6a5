"""Chinese CLIP: a Chinese BERT/RoBERTa text tower aligned to a (frozen) CLIP image tower.

The same class also holds a plain (English) CLIP — ``CLIPTextModelWithProjection`` + byte-level BPE
``CLIPTokenizer`` — such as the recipe's stage (a) trained by ``taiyi train clip --new-clip``, so every
clip command scores, classifies and retrieves with either.

Loads every Taiyi-CLIP style unchanged (TAIYI.md §2):

- ``BertForSequenceClassification`` whose ``.logits`` are the text feature (Taiyi-CLIP-Roberta-102M
  / -large-326M), or ``BertModel`` whose pooler output is (Taiyi-CLIP-RoBERTa-102M-ViT-L / 326M-ViT-H);
- paired with a Hugging Face CLIP image model (hub id or folder) — by default the one each Taiyi
  text tower was aligned to.

Similarity is the model cards' computation: tower features, L2-normalised, cosine × ``logit_scale.exp()``.

taiyi's own format is one folder that ``ChineseCLIP.from_pretrained(dir)`` loads with no flags::

    config.json        {"_class_name": "ChineseCLIP", "text_head": "logits"|"pooler", "logit_scale": ..., ...}
    text_encoder/      transformers BertForSequenceClassification or BertModel (safetensors)
    tokenizer/         BertTokenizer (vocab.txt)
    image_encoder/     transformers CLIPVisionModelWithProjection (safetensors)
    image_processor/   CLIPImageProcessor config

A CLIP with its own text tower (``text_head="projection"``) is saved as a standard Hugging Face CLIP
folder instead — ``CLIPModel.from_pretrained(dir)`` loads it, and it serves as ``--image-tower``::

    config.json, model.safetensors       transformers CLIPModel (both towers, projections, logit scale)
    vocab.json, merges.txt, tokenizer*   CLIPTokenizer
    preprocessor_config.json             CLIPImageProcessor
    text_encoder/, tokenizer/            the text tower as CLIPTextModel + its tokenizer: the SD v1 layout
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .errors import InvalidInputError, ModelLoadError
from .io import atomic_folder

logger = logging.getLogger("taiyi")

CONFIG_NAME = "config.json"
CLASS_NAME = "ChineseCLIP"
TEXT_MAX_LENGTH = 77  # the Taiyi-CLIP training length (TAIYI.md §3)
MAX_LOGIT_SCALE = 100.0

# Zero-shot prompt templates: each label's embedding is the mean of its normalised template embeddings.
ZH_TEMPLATES: tuple[str, ...] = (
    "{}",
    "一张{}的照片。",
    "一张{}的图片。",
    "{}的照片。",
    "一幅{}的画。",
    "一张模糊的{}的照片。",
    "一张清晰的{}的照片。",
    "一张{}的特写照片。",
    "一张好看的{}的照片。",
    "一张{}的黑白照片。",
    "{}的图像。",
    "这是{}。",
)
# The same for an English CLIP (``text_head="projection"``).
EN_TEMPLATES: tuple[str, ...] = (
    "{}",
    "a photo of {}.",
    "a picture of {}.",
    "a painting of {}.",
    "an image of {}.",
    "a blurry photo of {}.",
    "a clear photo of {}.",
    "a close-up photo of {}.",
    "a nice photo of {}.",
    "a black and white photo of {}.",
    "a rendering of {}.",
    "this is {}.",
)
TEXT_HEADS = ("logits", "pooler", "projection")


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] or type(exc).__name__


def text_head_of(config) -> str:
    """``"logits"`` for a classification head (feature = logits), ``"pooler"`` for a bare BertModel,
    ``"projection"`` for a CLIP text tower (feature = ``text_embeds``)."""
    if getattr(config, "model_type", None) in ("clip", "clip_text_model"):
        return "projection"
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "logits"
    return "pooler"


def _resolve(model: str | os.PathLike) -> tuple[Path, str]:
    from .models import resolve_model

    return resolve_model(model)


class ChineseCLIP(nn.Module):
    """Chinese text tower + CLIP image tower, with encode / similarity / zero-shot / retrieval.

    Build with :meth:`from_pretrained` (taiyi's folder), :meth:`from_taiyi` (a published Taiyi-CLIP
    text tower + its image tower) or :func:`load_clip` (either, from a name, id or folder).

    Args:
        text_model: ``BertForSequenceClassification``, ``BertModel`` or ``CLIPTextModelWithProjection``.
        tokenizer: the text tower's ``BertTokenizer`` (or ``CLIPTokenizer``).
        vision_model: ``CLIPVisionModelWithProjection``.
        image_processor: ``CLIPImageProcessor`` for the image tower.
        text_head: ``"logits"``, ``"pooler"`` or ``"projection"`` (a CLIP text tower).
        logit_scale: the log of the similarity temperature (CLIP: ln 100 after training).
        max_length: text tokens (incl. [CLS]/[SEP]) read by the text tower.
    """

    def __init__(
        self,
        text_model: nn.Module,
        tokenizer,
        vision_model: nn.Module,
        image_processor,
        *,
        text_head: str = "logits",
        logit_scale: float = math.log(1 / 0.07),
        max_length: int = TEXT_MAX_LENGTH,
    ):
        super().__init__()
        if text_head not in TEXT_HEADS:
            raise ValueError(f"text_head must be one of {', '.join(TEXT_HEADS)}, not {text_head!r}")
        self.text_model = text_model
        self.tokenizer = tokenizer
        self.vision_model = vision_model
        self.image_processor = image_processor
        self.text_head = text_head
        self.max_length = max_length
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))
        text_dim, image_dim = self.text_dim, self.image_dim
        if text_dim != image_dim:
            raise ModelLoadError(
                f"the text tower gives {text_dim}-d features but the image tower {image_dim}-d; pair the text "
                "tower with the CLIP image model it was trained against"
            )

    # --- sizes and placement -----------------------------------------------------------------------
    @property
    def text_dim(self) -> int:
        config = self.text_model.config
        if self.text_head == "projection":
            return config.projection_dim
        return config.num_labels if self.text_head == "logits" else config.hidden_size

    @property
    def templates(self) -> tuple[str, ...]:
        """The zero-shot prompt templates of this model's language."""
        return EN_TEMPLATES if self.text_head == "projection" else ZH_TEMPLATES

    @property
    def image_dim(self) -> int:
        return self.vision_model.config.projection_dim

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vision_model.parameters()).dtype

    # --- differentiable features (training) --------------------------------------------------------
    def tokenize(self, texts: Sequence[str], *, normalize: bool = True) -> dict[str, torch.Tensor]:
        """Token ids and attention mask (B, L) on this model's device, L ≤ ``max_length``."""
        from .prompts import normalize_prompts

        texts = normalize_prompts(list(texts), enabled=normalize)
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Unnormalised text features (B, D), with gradients if enabled."""
        out = self.text_model(input_ids=input_ids, attention_mask=attention_mask)
        if self.text_head == "projection":
            return out.text_embeds  # the projected end-of-text state
        return out.logits if self.text_head == "logits" else out.pooler_output

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Unnormalised image features (B, D) from pixel values (B, 3, H, W)."""
        return self.vision_model(pixel_values=pixel_values.to(self.device, self.dtype)).image_embeds

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images (or paths, uint8 arrays) → pixel values (B, 3, S, S) as the image tower expects."""
        from .io import as_picture

        rgb = [as_picture(im, "RGB", "image") for im in images]  # 16-bit scaled, not clipped to white
        return self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]

    # --- inference API -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(
        self, texts: str | Sequence[str], *, batch_size: int = 64, normalize: bool = True, warn_long: bool = True
    ) -> torch.Tensor:
        """L2-normalised text embeddings (N, D) in float32 on CPU.

        Args:
            texts: Chinese (or any) texts; prompt normalisation (``taiyi.prompts``) applies unless
                ``normalize`` is False.
            batch_size: texts per forward pass.
            warn_long: warn, as ``taiyi generate`` does, about each text longer than the text tower reads (its
                end is dropped); off for bulk captions (evaluation sets), where it would be one line per caption.
        """
        texts = _texts(texts, "texts")
        _check_batch_size(batch_size)
        if warn_long:
            from .encoding import warn_truncated
            from .prompts import normalize_prompts

            warn_truncated(self.tokenizer, normalize_prompts(texts, enabled=normalize), self.max_length - 2)
        self.text_model.eval()
        chunks = []
        for i in range(0, len(texts), batch_size):
            feats = self.text_features(**self.tokenize(texts[i : i + batch_size], normalize=normalize))
            chunks.append(F.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(chunks)

    @torch.no_grad()
    def encode_image(
        self,
        images: Image.Image | str | os.PathLike | Sequence[Image.Image | str | os.PathLike],
        *,
        batch_size: int = 32,
    ) -> torch.Tensor:
        """L2-normalised image embeddings (N, D) in float32 on CPU.

        Args:
            images: one or more PIL images, image file paths or uint8 numpy arrays (H, W[, C]).
            batch_size: images per forward pass.
        """
        if isinstance(images, Image.Image | str | os.PathLike | np.ndarray):
            images = [images]
        elif not isinstance(images, Sequence):
            raise InvalidInputError(
                f"images must be a PIL image, a path or a list of them, not {type(images).__name__}"
            )
        images = list(images)
        if not images:
            raise InvalidInputError("no images to encode")
        _check_batch_size(batch_size)
        self.vision_model.eval()
        chunks = []
        for i in range(0, len(images), batch_size):
            feats = self.image_features(self.preprocess(images[i : i + batch_size]))
            chunks.append(F.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(chunks)

    def scale(self) -> float:
        return float(self.logit_scale.detach().clamp(max=math.log(MAX_LOGIT_SCALE)).exp())

    def similarity(self, images: Image.Image | Sequence[Image.Image], texts: str | Sequence[str]) -> torch.Tensor:
        """``logit_scale.exp() × cosine`` between every image and every text: (n_images, n_texts)."""
        return self.scale() * self.encode_image(images) @ self.encode_text(texts).T

    def label_embeddings(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
        """One normalised embedding per label: the mean of its normalised template embeddings (L, D).

        Args:
            labels: class names in the text tower's language (a list; one string is refused, not split).
            templates: prompt templates with ``{}`` (default: :attr:`templates`, Chinese or English); one
                string is one template.
        """
        templates = self.templates if templates is None else templates
        if isinstance(labels, str):  # its characters would be taken for the labels
            raise InvalidInputError(f"labels must be a list of class names, not one string; e.g. [{labels!r}, ...]")
        labels = _texts(labels, "labels")
        templates = [templates] if isinstance(templates, str) else templates
        if not templates or any(not isinstance(t, str) or "{}" not in t for t in templates):
            raise InvalidInputError("every template must be a string containing {} where the label goes")
        try:
            texts = [[t.format(label) for t in templates] for label in labels]  # (L, T)
        except (IndexError, KeyError, ValueError) as exc:
            raise InvalidInputError(
                f"a template has a brace field other than {{}} ({type(exc).__name__}: {exc}); write {{{{ }}}} "
                "for a literal brace"
            ) from None
        # a label too long for the text tower is said once, in its longest template, not once per template
        from .encoding import warn_truncated
        from .prompts import normalize_prompts

        warn_truncated(self.tokenizer, normalize_prompts([max(row, key=len) for row in texts]), self.max_length - 2)
        # every label's templates in shared batches: one forward pass per 64 texts, not one per label
        embeds = self.encode_text([text for row in texts for text in row], warn_long=False)  # (L * T, D)
        embeds = embeds.view(len(labels), len(templates), -1).mean(1)  # (L, D)
        return F.normalize(embeds, dim=-1)

    def zero_shot(
        self,
        images: Image.Image | Sequence[Image.Image],
        labels: Sequence[str],
        *,
        templates: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Zero-shot class probabilities (n_images, n_labels) for ``labels`` (Chinese, or English for an
        English CLIP); ``templates`` default to :attr:`templates`."""
        logits = self.scale() * self.encode_image(images) @ self.label_embeddings(labels, templates).T
        return logits.softmax(dim=-1)

    def retrieve(
        self, query: str | Image.Image | torch.Tensor, gallery: torch.Tensor, k: int = 10
    ) -> tuple[list[int], list[float]]:
        """Top-``k`` gallery rows for a text, an image or an embedding; returns (indices, cosines).

        Args:
            query: Chinese text, a PIL image, or a normalised embedding (D,) (tensor or numpy array).
            gallery: normalised embeddings (N, D), e.g. from :meth:`encode_image` (tensor or numpy array).
            k: how many rows to return (fewer when the gallery is smaller).
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
            raise InvalidInputError(f"k must be a whole number of results, 0 or more, not {k!r}")
        if isinstance(gallery, np.ndarray):
            gallery = torch.from_numpy(gallery)
        if not isinstance(gallery, torch.Tensor):
            raise InvalidInputError(f"gallery must be a tensor of embeddings (N, D), not {type(gallery).__name__}")
        if isinstance(query, str):
            q = self.encode_text([query])[0]
        elif isinstance(query, Image.Image):
            q = self.encode_image([query])[0]
        elif isinstance(query, torch.Tensor | np.ndarray):
            q = torch.as_tensor(query).float()
        else:
            raise InvalidInputError(f"query must be a text, a PIL image or an embedding, not {type(query).__name__}")
        if gallery.ndim != 2 or gallery.shape[1] != q.shape[-1]:
            raise InvalidInputError(
                f"gallery of shape {tuple(gallery.shape)} does not hold {q.shape[-1]}-d embeddings"
            )
        scores = gallery.float() @ q
        top = scores.topk(min(int(k), len(scores)))
        return top.indices.tolist(), top.values.tolist()

    # --- saving and loading ------------------------------------------------------------------------
    def config_dict(self) -> dict:
        return {
            "_class_name": CLASS_NAME,
            "text_head": self.text_head,
            "text_model_class": type(self.text_model).__name__,
            "logit_scale": float(self.logit_scale.detach()),
            "max_length": self.max_length,
            "projection_dim": self.text_dim,
        }

    def save_pretrained(self, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write taiyi's single-folder format (safetensors), atomically: a temporary folder, then rename."""
        from .tokenization import save_tokenizer_as_folder

        out_dir = Path(out_dir)
        _check_new_folder(out_dir, overwrite)
        with atomic_folder(out_dir) as tmp:
            if self.text_head == "projection":
                self._save_clip_folder(tmp)
            else:
                self.text_model.save_pretrained(tmp / "text_encoder", safe_serialization=True)
                self.vision_model.save_pretrained(tmp / "image_encoder", safe_serialization=True)
                self.image_processor.save_pretrained(tmp / "image_processor")
                save_tokenizer_as_folder(self.tokenizer, tmp / "tokenizer", max_length=self.max_length)
                (tmp / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2))
        return out_dir

    def to_clip_model(self):
        """Both towers, their projections and the logit scale as one transformers ``CLIPModel``
        (a model with a CLIP text tower only)."""
        from transformers import CLIPConfig, CLIPModel

        if self.text_head != "projection":
            raise InvalidInputError("only a CLIP with a CLIP text tower makes a CLIPModel; this one has a BERT tower")
        text_config = self.text_model.config.to_dict()
        vision_config = self.vision_model.config.to_dict()
        config = CLIPConfig(
            text_config=text_config,
            vision_config=vision_config,
            projection_dim=self.text_dim,
            logit_scale_init_value=float(self.logit_scale.detach()),
        )
        config.architectures = ["CLIPModel"]
        model = CLIPModel(config)
        model.text_model.load_state_dict(self.text_model.text_model.state_dict())
        model.text_projection.load_state_dict(self.text_model.text_projection.state_dict())
        model.vision_model.load_state_dict(self.vision_model.vision_model.state_dict())
        model.visual_projection.load_state_dict(self.vision_model.visual_projection.state_dict())
        with torch.no_grad():
            model.logit_scale.copy_(self.logit_scale.detach().float())
        return model.to(self.dtype).eval()

    def _save_clip_folder(self, folder: Path) -> None:
        """The standard CLIP folder plus ``text_encoder/`` and ``tokenizer/`` (see the module docstring)."""
        from transformers import CLIPTextModel

        from .recipe.tokenizer import save_clip_tokenizer

        clip = self.to_clip_model()
        clip.save_pretrained(folder, safe_serialization=True)
        save_clip_tokenizer(self.tokenizer, folder, max_length=self.max_length)
        self.image_processor.save_pretrained(folder)
        # The text tower alone, as Stable Diffusion v1 loads it (CLIPTextModel: no projection).
        text = CLIPTextModel(clip.config.text_config)
        text.load_state_dict(clip.text_model.state_dict())
        text.config.architectures = ["CLIPTextModel"]
        text.to(self.dtype).save_pretrained(folder / "text_encoder", safe_serialization=True)
        save_clip_tokenizer(self.tokenizer, folder / "tokenizer", max_length=self.max_length)

    def export_taiyi(self, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the text tower in the published Taiyi-CLIP layout (config, weights, ``vocab.txt``), atomically:
        a temporary folder, then rename.

        The result loads with ``BertForSequenceClassification``/``BertModel.from_pretrained`` and with
        :meth:`from_taiyi` given the same image tower.

        Args:
            out_dir: the folder to create; its parent must exist.
            overwrite: replace an existing ``out_dir`` instead of refusing.

        Raises:
            InvalidInputError: ``out_dir`` exists (without ``overwrite``), its parent does not, or the model has a
                CLIP text tower.
        """
        from .tokenization import save_tokenizer_as_folder

        if self.text_head == "projection":
            raise InvalidInputError(
                "a CLIP text tower has no Taiyi-CLIP layout; save_pretrained writes it as CLIP does"
            )
        out_dir = Path(out_dir)
        _check_new_folder(out_dir, overwrite)
        with atomic_folder(out_dir) as tmp:
            self.text_model.save_pretrained(tmp, safe_serialization=True)
            save_tokenizer_as_folder(self.tokenizer, tmp, max_length=512)
        return out_dir

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike, *, allow_pickle: bool = False, device: str | torch.device | None = None
    ) -> ChineseCLIP:
        """Load taiyi's own folder format, or a standard CLIP folder (see the module docstring).

        Args:
            folder: the folder, or a short name / hub id of one (``taiyi-mini-clip``); a published Taiyi-CLIP text
                tower loads with :func:`load_clip`.
            allow_pickle: accept pickled ``.bin`` weights.
            device: ``auto``/None, ``cpu``, ``cuda``…

        Raises:
            ModelLoadError: no such folder or name, or not a Chinese CLIP folder.
        """
        from transformers import (
            AutoConfig,
            BertForSequenceClassification,
            BertModel,
            CLIPImageProcessor,
            CLIPVisionModelWithProjection,
        )

        from .loading import check_weights
        from .tokenization import check_tokenizer, load_chinese_tokenizer

        folder = Path(folder) if Path(folder).is_dir() else _resolve(folder)[0]  # a short name or hub id
        if (folder / CONFIG_NAME).is_file() and _model_type(
            (folder / CONFIG_NAME).read_text(errors="replace")
        ) == "clip":
            return cls.from_clip(folder, allow_pickle=allow_pickle, device=device)
        config = _read_config(folder)
        for sub in ("text_encoder", "image_encoder"):
            if not (folder / sub).is_dir():
                raise ModelLoadError(f"{folder} has no {sub}/ folder; it is not a complete Chinese CLIP")
            check_weights(folder / sub, allow_pickle=allow_pickle)
        text_cls = BertForSequenceClassification if config.get("text_head") == "logits" else BertModel
        try:
            AutoConfig.from_pretrained(folder / "text_encoder")
            text_model = text_cls.from_pretrained(folder / "text_encoder", use_safetensors=not allow_pickle or None)
            vision = CLIPVisionModelWithProjection.from_pretrained(folder / "image_encoder")
            processor = CLIPImageProcessor.from_pretrained(folder / "image_processor")
            tokenizer = load_chinese_tokenizer(folder / "tokenizer", max_length=config.get("max_length", 77))
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"could not load the Chinese CLIP in {folder}: {_first_line(exc)}") from exc
        check_tokenizer(tokenizer, text_model, where=str(folder))
        model = cls(
            text_model,
            tokenizer,
            vision,
            processor,
            text_head=config.get("text_head", text_head_of(text_model.config)),
            logit_scale=config.get("logit_scale", math.log(100.0)),
            max_length=config.get("max_length", TEXT_MAX_LENGTH),
        )
        return model.eval().to(_device(device))

    @classmethod
    def from_taiyi(
        cls,
        text_tower: str | os.PathLike,
        image_tower: str | os.PathLike | None = None,
        *,
        allow_pickle: bool = False,
        device: str | torch.device | None = None,
        max_length: int = TEXT_MAX_LENGTH,
    ) -> ChineseCLIP:
        """Load a published Taiyi-CLIP text tower and its CLIP image tower.

        Args:
            text_tower: short name (``taiyi-clip-b32`` …), hub id or folder of the text tower.
            image_tower: HF CLIP model (hub id or folder, ``CLIPModel`` layout); default: the one the
                text tower was trained against (TAIYI.md table).
        """
        from transformers import AutoConfig, BertForSequenceClassification, BertModel, CLIPImageProcessor, CLIPModel

        from .loading import check_weights
        from .models import KNOWN_MODELS, split_revision
        from .tokenization import check_tokenizer, load_chinese_tokenizer

        text_folder, text_name = _resolve(text_tower)
        if image_tower is None:
            bare = split_revision(text_name)[0]  # ID@REVISION: the default of the repo's own model
            info = next((m for m in KNOWN_MODELS.values() if bare in (m.name, m.repo_id)), None)
            if info is None or info.image_tower is None:
                raise InvalidInputError(f"no default image tower is known for {text_name}; pass --image-tower")
            image_tower = info.image_tower
        image_folder, _ = _resolve(image_tower)
        check_weights(text_folder, allow_pickle=allow_pickle)
        check_weights(image_folder, allow_pickle=allow_pickle)
        try:
            config = AutoConfig.from_pretrained(text_folder)
            head = text_head_of(config)
            text_cls = BertForSequenceClassification if head == "logits" else BertModel
            use_st = None if allow_pickle else True
            text_model = text_cls.from_pretrained(text_folder, use_safetensors=use_st)
            tokenizer = load_chinese_tokenizer(text_folder, max_length=max_length)
            clip = CLIPModel.from_pretrained(image_folder, use_safetensors=use_st)
            processor = CLIPImageProcessor.from_pretrained(image_folder)
        except (ModelLoadError, InvalidInputError):
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"could not load {text_name} with image tower {image_tower}: {_first_line(exc)}"
            ) from exc
        check_tokenizer(tokenizer, text_model, where=str(text_folder))
        vision = _vision_with_projection(clip)
        model = cls(
            text_model,
            tokenizer,
            vision,
            processor,
            text_head=head,
            logit_scale=float(clip.logit_scale.detach()),
            max_length=max_length,
        )
        return model.eval().to(_device(device))

    @classmethod
    def from_clip_model(cls, clip, tokenizer, image_processor, *, max_length: int | None = None) -> ChineseCLIP:
        """Wrap a transformers ``CLIPModel`` (both of its towers) with its ``CLIPTokenizer`` and processor.

        Args:
            clip: ``CLIPModel``; its weights are copied into standalone towers with projection.
            max_length: text tokens read (default: the tokenizer's length, at most the tower's positions).
        """
        positions = clip.config.text_config.max_position_embeddings
        if max_length is None:
            max_length = min(int(tokenizer.model_max_length), positions)
        return cls(
            _text_with_projection(clip),
            tokenizer,
            _vision_with_projection(clip),
            image_processor,
            text_head="projection",
            logit_scale=float(clip.logit_scale.detach()),
            max_length=max_length,
        )

    @classmethod
    def from_clip(
        cls, folder: str | os.PathLike, *, allow_pickle: bool = False, device: str | torch.device | None = None
    ) -> ChineseCLIP:
        """Load a standard Hugging Face CLIP folder (``CLIPModel`` + ``CLIPTokenizer`` + image processor), such
        as ``taiyi train clip --new-clip``'s ``final/`` or openai/clip-vit-base-patch32."""
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        from .loading import check_weights
        from .tokenization import check_tokenizer

        folder = Path(folder)
        check_weights(folder, allow_pickle=allow_pickle)
        if not (folder / "vocab.json").is_file() and not (folder / "tokenizer.json").is_file():
            raise ModelLoadError(
                f"{folder} is a CLIP model without a tokenizer (vocab.json, merges.txt); it can serve as "
                "--image-tower but not as a CLIP to score text with"
            )
        try:
            clip = CLIPModel.from_pretrained(folder, use_safetensors=None if allow_pickle else True)
            tokenizer = CLIPTokenizer.from_pretrained(folder)
            processor = CLIPImageProcessor.from_pretrained(folder)
        except Exception as exc:
            raise ModelLoadError(f"could not load the CLIP in {folder}: {_first_line(exc)}") from exc
        check_tokenizer(tokenizer, clip.text_model, where=str(folder))
        return cls.from_clip_model(clip, tokenizer, processor).eval().to(_device(device))


def _text_with_projection(clip) -> nn.Module:
    """The text half of a ``CLIPModel`` as a standalone ``CLIPTextModelWithProjection``."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(**{**clip.config.text_config.to_dict(), "projection_dim": clip.config.projection_dim})
    text = CLIPTextModelWithProjection(config)
    text.text_model.load_state_dict(clip.text_model.state_dict())
    text.text_projection.load_state_dict(clip.text_projection.state_dict())
    return text.eval()


def _vision_with_projection(clip) -> nn.Module:
    """The image half of a ``CLIPModel`` as a standalone ``CLIPVisionModelWithProjection``."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(**{**clip.config.vision_config.to_dict(), "projection_dim": clip.config.projection_dim})
    vision = CLIPVisionModelWithProjection(config)
    vision.vision_model.load_state_dict(clip.vision_model.state_dict())
    vision.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    return vision.eval()


def _texts(texts, what: str) -> list[str]:
    """One text or a sequence of texts as a non-empty list; anything else is one line."""
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, Sequence):
        raise InvalidInputError(f"{what} must be a string or a list of strings, not {type(texts).__name__}")
    if not texts:
        raise InvalidInputError(f"no {what} to encode" if what == "texts" else f"no {what} given")
    for text in texts:
        if not isinstance(text, str):
            raise InvalidInputError(f"{what} must be strings, got {type(text).__name__} ({text!r})")
    return list(texts)


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a whole number, 1 or more, not {batch_size!r}")


def _check_new_folder(out_dir: Path, overwrite: bool) -> None:
    """Before writing a model folder: never replace one unasked, never a file, and its parent must exist."""
    if out_dir.exists() and not overwrite:
        raise InvalidInputError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidInputError(f"{out_dir} is a file, not a folder; give a folder name")
    if not out_dir.parent.is_dir():
        raise InvalidInputError(f"output folder {out_dir.parent} does not exist; create it first")


def _read_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise ModelLoadError(f"Chinese CLIP folder {folder} does not exist")
    path = folder / CONFIG_NAME
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{folder} has no config.json; it is not a Chinese CLIP folder") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON") from exc
    if config.get("_class_name") != CLASS_NAME:
        raise ModelLoadError(
            f"{folder} is not a taiyi Chinese CLIP folder (config.json names no ChineseCLIP); load a Taiyi-CLIP "
            "text tower with taiyi.clip.load_clip"
        )
    return config


def _model_type(config_text: str) -> str | None:
    try:
        config = json.loads(config_text)
    except ValueError:
        return None
    return config.get("model_type") if isinstance(config, dict) else None


def _device(device: str | torch.device | None) -> torch.device:
    from .loading import limit_threads, select_device

    limit_threads()
    return select_device(device)


def load_clip(
    model: str | os.PathLike,
    *,
    image_tower: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    device: str | torch.device | None = None,
) -> ChineseCLIP:
    """Load a Chinese CLIP from taiyi's folder format, a Taiyi-CLIP text tower (+ image tower), or a
    standard CLIP folder (``CLIPModel`` + ``CLIPTokenizer``, e.g. from ``taiyi train clip --new-clip``).

    Args:
        model: a folder written by :meth:`ChineseCLIP.save_pretrained`, a Taiyi-CLIP text tower
            (short name such as ``taiyi-clip-b32``, hub id, or folder in the published layout), or a CLIP
            folder.
        image_tower: CLIP image model for a Taiyi text tower (default: the one it was trained against).
        allow_pickle: accept pickled ``.bin`` weights (the published Taiyi-CLIP repos ship them).
        device: ``auto``/None, ``cpu``, ``cuda``…
    """
    folder, name = _resolve(model)
    if (folder / "model_index.json").is_file():
        conditioned = '"text_encoder"' in (folder / "model_index.json").read_text(encoding="utf-8", errors="replace")
        kind = "a text-to-image pipeline" if conditioned else "an unconditional diffusion model"
        raise InvalidInputError(
            f"{name} is {kind} (model_index.json), not a Chinese CLIP; give a CLIP (taiyi models lists them) or "
            "the pipeline's text_encoder folder with --image-tower"
        )
    config = folder / CONFIG_NAME
    text = config.read_text(encoding="utf-8", errors="replace") if config.is_file() else ""
    if '"ChineseCLIP"' in text:
        if image_tower is not None:  # it would be ignored: the folder holds its own image tower
            raise InvalidInputError(f"{model} is a complete Chinese CLIP with its own image tower; drop --image-tower")
        return ChineseCLIP.from_pretrained(folder, allow_pickle=allow_pickle, device=device)
    if _model_type(text) == "clip":
        if image_tower is not None:
            raise InvalidInputError(f"{model} is a complete CLIP with its own image tower; drop --image-tower")
        return ChineseCLIP.from_clip(folder, allow_pickle=allow_pickle, device=device)
    return ChineseCLIP.from_taiyi(model, image_tower, allow_pickle=allow_pickle, device=device)
