"""The embedded toy world: procedural captioned images, a small pretrained pixel-space text-to-image model
M_0 and a small feature encoder, all offline (weights committed under chain/toy/assets/).

    from chain.toy import make_toy_dataset, toy_base_model_dir, load_toy_encoder
    make_toy_dataset("data/toy_d0", num_images=48, seed=0)       # D_0: PNG + same-name .txt captions
    toy_base_model_dir()                                         # diffusers folder for chain.models.load_base_model
    encoder = load_toy_encoder()                                 # FeatureEncoder for FD / recall / SFD

Importing this package needs numpy only; torch is imported by the functions that need it.
"""

from chain.toy.dataset import (
    COLOURS,
    DISTRIBUTIONS,
    SHAPES,
    TEXTURES,
    caption_for,
    iter_toy_batches,
    make_toy_dataset,
    render_scene,
    sample_scene,
    sample_toy_images,
)

__all__ = [
    "COLOURS",
    "DISTRIBUTIONS",
    "SHAPES",
    "TEXTURES",
    "caption_for",
    "iter_toy_batches",
    "load_toy_base_model",
    "load_toy_encoder",
    "make_toy_dataset",
    "render_scene",
    "sample_scene",
    "sample_toy_images",
    "toy_base_model_dir",
    "toy_encoder_dir",
]


def toy_base_model_dir():
    """Folder of the committed toy base model (diffusers format, pixel space: no vae/)."""
    from chain.toy.model import toy_base_model_dir as _dir

    return _dir()


def toy_encoder_dir():
    """Folder of the committed toy feature encoder."""
    from chain.toy.encoder import toy_encoder_dir as _dir

    return _dir()


def load_toy_base_model(folder=None):
    """The toy base model as chain.toy.model.ToyBaseModel (float32, eval)."""
    from chain.toy.model import load_toy_base_model as _load

    return _load(folder)


def load_toy_encoder(folder=None, *, device="cpu"):
    """The toy feature encoder (chain.features.FeatureEncoder protocol)."""
    from chain.toy.encoder import load_toy_encoder as _load

    return _load(folder, device=device)
