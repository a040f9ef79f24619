"""The Shapes world: procedural 3D objects with exact ground truth, their captioned renders, and 3D metrics.

- `catalog`: shapes (signed distance functions with parts), colors, captions, `parse_prompt`, held-out pairs.
- `render`: sphere-traced ground-truth renders (`render_object`) in gen3d's camera convention.
- `dataset`: captioned training renders for the embedded priors (`build_renders`, `iterate_batches`).
- `metrics`: `iou_3d`, `silhouette_iou`, `color_error`, `multiview_consistency`, `sample_agreement`, `border_background`
  over any result exposing the `Query` protocol.
"""

from gen3d.world.catalog import (
    BOUND_RADIUS,
    COLORS,
    HELD_OUT,
    SHAPES,
    TEMPLATES,
    Shape,
    WorldObject,
    all_captions,
    all_objects,
    caption,
    held_out_objects,
    parse_prompt,
    training_objects,
    vocabulary,
)
from gen3d.world.dataset import RenderSet, build_renders, iterate_batches, view_caption
from gen3d.world.metrics import (
    MultiviewConsistency,
    ObjectQuery,
    Query,
    SampleAgreement,
    border_background,
    ciede2000,
    color_error,
    delta_e,
    eval_cameras,
    iou_3d,
    multiview_consistency,
    sample_agreement,
    silhouette_iou,
    srgb_to_lab,
)
from gen3d.world.render import contact_sheet, render_object, render_sdf

__all__ = [
    "BOUND_RADIUS",
    "COLORS",
    "HELD_OUT",
    "SHAPES",
    "TEMPLATES",
    "MultiviewConsistency",
    "ObjectQuery",
    "Query",
    "RenderSet",
    "SampleAgreement",
    "Shape",
    "WorldObject",
    "all_captions",
    "all_objects",
    "border_background",
    "build_renders",
    "caption",
    "ciede2000",
    "color_error",
    "contact_sheet",
    "delta_e",
    "eval_cameras",
    "held_out_objects",
    "iou_3d",
    "iterate_batches",
    "multiview_consistency",
    "parse_prompt",
    "render_object",
    "render_sdf",
    "sample_agreement",
    "silhouette_iou",
    "srgb_to_lab",
    "training_objects",
    "view_caption",
    "vocabulary",
]
