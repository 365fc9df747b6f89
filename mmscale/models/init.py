"""Initialization of new towers for contrastive pretraining: open_clip's scheme, applied per module.

Hugging Face's own initialization (every BERT matrix and CLIP's patch and position embeddings
at std 0.02, projections at 0.02) is tuned for fine-tuning released weights, not for training a
dual encoder from scratch. At that init the attention of both towers is near-uniform and its
value path has a gain of about 0.2, so the pooled features hardly depend on the input: on the
tiny preset the text features of different captions have mean cosine 0.9997, the image features
of different handwritten digits 0.996. The contrastive gradient is proportional to the spread
of the features, so CLIP's loss sits at ln(batch) for a long plateau, and with MLM sharing the
text tower for the whole of a short run (issue 11).

open_clip's towers (`open_clip/transformer.py`) start with unit-gain attention and wider
embeddings; mapped onto the same Hugging Face modules they leave the saved folder a plain
`transformers` model. Applied per module, so the ZeRO-3 re-initialization can run it with one
module's parameters gathered at a time.
"""

from __future__ import annotations

from torch import nn


def _normal(module: nn.Module, std: float) -> None:
    nn.init.normal_(module.weight, std=std)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


def _torch_default(module: nn.Module) -> None:
    """What nn.Linear/nn.Conv2d give by themselves in open_clip's ViT: std 1/sqrt(3 fan_in), zero bias."""
    fan_in = module.weight[0].numel()
    _normal(module, (3 * fan_in) ** -0.5)


def init_module(module: nn.Module, *, towers_config) -> bool:
    """Initialize `module`'s own weights (and its leaf children's) as open_clip would; False when this
    module has nothing of its own to set. `towers_config` is the VisionTextDualEncoderConfig or BlipConfig."""
    kind = type(module).__name__
    vision, text = towers_config.vision_config, towers_config.text_config
    if kind == "CLIPVisionEmbeddings":
        scale = vision.hidden_size ** -0.5
        nn.init.normal_(module.class_embedding, std=scale)
        nn.init.normal_(module.position_embedding.weight, std=scale)
        _torch_default(module.patch_embedding)
    elif kind == "CLIPAttention":
        # nn.MultiheadAttention's xavier-uniform in_proj over [3w, w]: std (2w)^-0.5.
        for projection in (module.q_proj, module.k_proj, module.v_proj):
            _normal(projection, (2 * module.embed_dim) ** -0.5)
        _torch_default(module.out_proj)
    elif kind == "CLIPMLP":
        _torch_default(module.fc1)
        _torch_default(module.fc2)
    elif kind in ("BertSelfAttention", "BertSelfOutput", "BertIntermediate", "BertOutput", "BertPooler",
                  "BertEmbeddings"):
        _init_bert_module(module, kind, width=text.hidden_size, layers=text.num_hidden_layers)
    elif kind == "VisionTextDualEncoderModel":
        _normal(module.visual_projection, vision.hidden_size ** -0.5)
        _normal(module.text_projection, text.hidden_size ** -0.5)
    elif kind.startswith("Blip"):
        return _init_blip_module(module, kind, vision=vision, text=text)
    else:
        return False
    return True


def _init_bert_module(module: nn.Module, kind: str, *, width: int, layers: int) -> None:
    """open_clip's TextTransformer.init_parameters, on BERT's modules: unit-gain attention, residual
    branches scaled by (2 layers)^-0.5, token embeddings 0.02 and positions 0.01."""
    attention_std, residual_std, fc_std = width ** -0.5, width ** -0.5 * (2 * layers) ** -0.5, (2 * width) ** -0.5
    if kind == "BertEmbeddings":
        nn.init.normal_(module.word_embeddings.weight, std=0.02)
        nn.init.normal_(module.position_embeddings.weight, std=0.01)
        if module.word_embeddings.padding_idx is not None:
            nn.init.zeros_(module.word_embeddings.weight[module.word_embeddings.padding_idx])
    elif kind == "BertSelfAttention":
        for projection in (module.query, module.key, module.value):
            _normal(projection, attention_std)
    elif kind in ("BertSelfOutput", "BertOutput"):  # BLIP's cross-attention output too
        _normal(module.dense, residual_std)
    elif kind == "BertIntermediate":
        _normal(module.dense, fc_std)
    else:  # BertPooler: unit gain into its tanh
        _normal(module.dense, attention_std)


def _init_blip_module(module: nn.Module, kind: str, *, vision, text) -> bool:
    """The same scheme on BLIP's modules (fusion.FusionEncoder): its ViT like CLIP's (BLIP's own init leaves the
    class and position embeddings at std 1e-10), its text encoder like BERT's, the cross-attention's keys and
    values at unit gain from the image width, the projections at width^-0.5 and the ITM head as BERT's heads."""
    if kind == "BlipVisionEmbeddings":
        scale = vision.hidden_size ** -0.5
        nn.init.normal_(module.class_embedding, std=scale)
        nn.init.normal_(module.position_embedding, std=scale)
        _torch_default(module.patch_embedding)
    elif kind == "BlipAttention":  # fused qkv, as nn.MultiheadAttention's in_proj
        _normal(module.qkv, (2 * module.embed_dim) ** -0.5)
        _torch_default(module.projection)
    elif kind == "BlipMLP":
        _torch_default(module.fc1)
        _torch_default(module.fc2)
    elif kind == "BlipTextSelfAttention":
        _normal(module.query, text.hidden_size ** -0.5)
        for projection in (module.key, module.value):  # fan-in: the image width for cross-attention
            _normal(projection, projection.in_features ** -0.5)
    elif kind in ("BlipTextSelfOutput", "BlipTextIntermediate", "BlipTextOutput", "BlipTextEmbeddings"):
        _init_bert_module(module, "Bert" + kind.removeprefix("BlipText"), width=text.hidden_size,
                          layers=text.num_hidden_layers)
    elif kind == "BlipForImageTextRetrieval":
        _normal(module.vision_proj, vision.hidden_size ** -0.5)
        _normal(module.text_proj, text.hidden_size ** -0.5)
        _normal(module.itm_head, 0.02)
    else:
        return False
    return True


def init_towers(towers: nn.Module) -> None:
    """open_clip's initialization for every module of freshly built VisionTextDualEncoder towers."""
    for module in towers.modules():
        init_module(module, towers_config=towers.config)

