"""3-D NIfTI volumes to the 2-D slice layout the loaders read, and back.

A package by idea: `options` (the layout's names, `SliceOptions`), `reading` (NIfTI, orientation,
a dataset's cases), `pixels` (one slice's arithmetic), `slicing` (volumes to slices) and `manifest`
(back to 3-D). Everything public is importable from `guided_diffusion.volumes`.

One implementation shared by `scripts/prepare_brats.py`, `scripts/prepare_synapse.py`,
`scripts/prepare_chaos.py` (through `guided_diffusion.chaos`) and `scripts/make_demo_data.py`. The layout it writes (see data/README.md):

    ROOT/training/{normal,tumor,seg}/    ROOT/validation/{normal,tumor,seg}/
    ROOT/manifest.csv                    one row per written slice
    ROOT/dataset.json                    the settings and the subject split

Geometry. A volume is read in its closest canonical (RAS+) orientation and cut into
axial slices `volume[:, :, z]`. A slice is shown with anterior at the top and the
volume's x axis running left to right; a square box [x0, x1) x [y0, y1) of voxels
(recorded in the manifest) is cut out and resized to `image_size`. `paste_slices`
inverts all of this, so per-slice predictions go back into the source voxel grid.

Pixel values. Images are 8-bit: 0..255 is the normalised [0, 1] range, which the
loaders map to [-1, 1]. Several channels (e.g. four BraTS modalities) are written as
one uint8 `.npy` array of shape (C, H, W). Masks are 8-bit PNG, 0 = background,
255 = lesion; every written slice has one (all zeros for `normal` slices).
"""

from ..layouts import VolumeCase  # noqa: F401  (the converters' case, defined with the layouts that find them)
from .options import (  # noqa: F401
    BRATS_MODALITIES, SPLITS, CLASSES, MANIFEST_NAME, SETTINGS_NAME, MANIFEST_FIELDS, MANIFEST_INT_FIELDS,
    SliceOptions, parse_modalities, parse_int_list, check_slice_options,
)
from .reading import (  # noqa: F401
    load_canonical, lesion_mask, label_values, voxel_geometry, find_brats_cases, find_btcv_cases,
)
from .pixels import (  # noqa: F401
    normalize_percentiles, ct_window, to_display, from_display, square_box, cut_box, paste_box, resize2d, to_uint8,
)
from .slicing import (  # noqa: F401
    split_subjects, normalise_volume, slice_geometry, cut_image, export_case, export_slice_dataset, format_counts,
)
from .manifest import (  # noqa: F401
    read_settings, resolve_source, read_manifest, paste_subject_masks, save_like, paste_slices,
)
