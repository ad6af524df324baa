"""Pretrained timm backbones: creation, identity for caches, discovery, and stage listing.

A :class:`Backbone` is the frozen feature extractor plus everything that decides what its features
mean (weights, preprocessing). :meth:`Backbone.identity` condenses that into one string so the
feature cache and the ONNX export cache miss whenever any of it changes.

- :mod:`~.create`: ``--backbone`` spec → :class:`Backbone` (registry name, hf-hub:, local-dir:),
  and the recipe that rebuilds a body without its source.
- :mod:`~.identity`: :class:`Backbone` and the weights hashes behind its identity.
- :mod:`~.hub`: local Hugging Face / torch cache lookups and the network probe.
- :mod:`~.search`: the weights search path (a name resolves to a local folder from anywhere).
- :mod:`~.listing`: ``transferlab backbones``.
- :mod:`~.stages`: a backbone's stages, stem first.
"""

from transferlab.backbones.create import at_input_size, create_backbone, timm_body_recipe
from transferlab.backbones.identity import Backbone
from transferlab.backbones.listing import BackboneInfo, list_backbones, with_params
from transferlab.backbones.stages import stage_modules

__all__ = [
    "Backbone",
    "at_input_size",
    "BackboneInfo",
    "create_backbone",
    "list_backbones",
    "stage_modules",
    "timm_body_recipe",
    "with_params",
]
