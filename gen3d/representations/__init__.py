"""Representations: `nn.Module`s that own a 3D asset's parameters (3D Gaussians, neural fields)."""

from gen3d.representations.fields import (
    Field,
    FieldConfig,
    FieldOutput,
    HashGridConfig,
    HashGridField,
    TriplaneConfig,
    TriplaneField,
)

__all__ = ["Field", "FieldConfig", "FieldOutput", "HashGridConfig", "HashGridField", "TriplaneConfig", "TriplaneField"]
