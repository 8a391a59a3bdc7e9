"""Where brain-tumour data sets keep their files and what their label values mean.

Three layouts are read, told apart by what is on disk:

    brats2021   one folder per subject: <id>_flair, <id>_t1, <id>_t1ce, <id>_t2, <id>_seg (.nii / .nii.gz)
                (BraTS 2020 and 2021); labels 1 NCR/NET, 2 ED, 4 ET
    brats2023   one folder per subject: <id>-t2f, <id>-t1n, <id>-t1c, <id>-t2w, <id>-seg
                (BraTS 2023 and later: GLI, MEN, MET, PED, SSA); labels 1 NCR, 2 ED, 3 ET
    msd         the Medical Segmentation Decathlon's Task01_BrainTumour: imagesTr/<id>.nii.gz, 4-D with
                the channels on the 4th axis (FLAIR, T1w, T1gd, T2w, or as its dataset.json "modality"
                names them), labelsTr/<id>.nii.gz; labels 1 edema, 2 non-enhancing tumour, 3 enhancing

One modality vocabulary covers them: flair = t2f, t1 = t1n, t1ce = t1c, t2 = t2w (the Decathlon's
FLAIR, T1w, T1gd, T2w). The BraTS 2020/2021 names are the canonical ones, written to dataset.json.

Regions (`--region`): wt, the whole tumour (every tumour label); tc, the tumour core (without the
edema); et, the enhancing tumour. `region_labels` gives their label values per layout.
"""

import json
import os
import re
from dataclasses import dataclass

import nibabel as nib

from .cli import UserError

MODALITIES = ("flair", "t1", "t1ce", "t2")  # canonical names, and the Decathlon's channel order
BRATS2023_NAMES = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w"}
MODALITY_ALIASES = {
    **{m: m for m in MODALITIES},
    **{name: m for m, name in BRATS2023_NAMES.items()},
    "t1w": "t1", "t1gd": "t1ce",  # the Decathlon's dataset.json (FLAIR, T1w, t1gd, T2w), lower-cased
}
NIFTI_SUFFIXES = (".nii.gz", ".nii")
REGIONS = {"wt": "whole tumour", "tc": "tumour core", "et": "enhancing tumour"}


@dataclass(frozen=True)
class VolumeCase:
    """One subject: one NIfTI path per image channel and its label map.

    channel_index: per image, its index on the file's 4th axis (a Decathlon image holds every
    channel); () when each image is a 3-D file. scheme: the layout whose labels the label map must
    follow (see `SCHEMES`); "" leaves the label values unchecked.
    """

    subject: str
    images: tuple
    seg: str
    channel_index: tuple = ()
    scheme: str = ""


@dataclass(frozen=True)
class LabelScheme:
    title: str
    classes: dict  # label value -> class name
    regions: dict  # region -> label values


SCHEMES = {
    "brats2021": LabelScheme("BraTS 2020/2021", {1: "NCR/NET", 2: "ED", 4: "ET"},
                             {"wt": (1, 2, 4), "tc": (1, 4), "et": (4,)}),
    "brats2023": LabelScheme("BraTS 2023+", {1: "NCR", 2: "ED", 3: "ET"},
                             {"wt": (1, 2, 3), "tc": (1, 3), "et": (3,)}),
    "msd": LabelScheme("Decathlon Task01", {1: "edema", 2: "non-enhancing tumour", 3: "enhancing tumour"},
                       {"wt": (1, 2, 3), "tc": (2, 3), "et": (3,)}),
}

# <subject>_<modality or seg> (2020/2021) and <subject>-<modality or seg> (2023+)
_NAME_PATTERNS = {
    "brats2021": re.compile(r"^(?P<subject>.+)_(?P<role>flair|t1|t1ce|t2|seg)\.nii(\.gz)?$"),
    "brats2023": re.compile(r"^(?P<subject>.+)-(?P<role>t2f|t1n|t1c|t2w|seg)\.nii(\.gz)?$"),
}


def _file_pattern(naming, role):
    """How a file of `role` (a canonical modality or "seg") is named in a layout, for messages."""
    if naming == "brats2023":
        return f"*-{BRATS2023_NAMES.get(role, role)}.nii.gz"
    return f"*_{role}.nii.gz"


# ----------------------------------------------------------------------------- modalities


def canonical_modality(name):
    """The canonical name of a modality in any layout's spelling ('t2f' -> 'flair'); None if unknown."""
    return MODALITY_ALIASES.get(str(name).strip().lower())


def parse_modalities(text):
    """'flair', 'all' (flair, t1, t1ce, t2 in that order) or a comma list, in any layout's names; canonical names."""
    if text.strip().lower() == "all":
        return MODALITIES
    names = [canonical_modality(m) for m in text.split(",")]
    if not names or None in names or len(set(names)) != len(names):
        raise UserError(f"--modality {text!r}: expected one of flair (t2f), t1 (t1n), t1ce (t1c), t2 (t2w), 'all' "
                        f"or a comma list of different ones")
    return tuple(names)


# ----------------------------------------------------------------------------- labels


def region_labels(scheme, region, flag="--region"):
    """The label values of `region` (wt, tc, et) in a layout's label scheme."""
    if region not in REGIONS:
        raise UserError(f"{flag} {region!r}: expected wt (whole tumour), tc (tumour core) or et (enhancing tumour)")
    if scheme not in SCHEMES:
        if region == "wt":
            return ()  # every nonzero label, whatever the scheme
        raise UserError(f"{flag} {region}: the labels follow no known scheme (not named like BraTS 2020/2021, "
                        f"BraTS 2023+ or Decathlon files), so which label is the {REGIONS[region]} is unknown")
    labels = SCHEMES[scheme].regions.get(region)
    if not labels:
        raise UserError(f"{flag} {region}: {SCHEMES[scheme].title} labels have no {REGIONS[region]} class")
    return labels


def _legend(scheme):
    return ", ".join(f"{v} {name}" for v, name in SCHEMES[scheme].classes.items())


def check_label_values(values, scheme, path):
    """UserError naming `path` and the values found when label values (0 = background) do not fit `scheme`."""
    found = sorted({int(v) for v in values} - {0})
    if set(found) <= set(SCHEMES[scheme].classes):
        return
    listed = ", ".join(str(v) for v in found)
    expected = f"{SCHEMES[scheme].title} labels ({_legend(scheme)}), as its layout implies"
    others = [s.title for name, s in SCHEMES.items() if name != scheme and set(found) <= set(s.classes)]
    if others:
        raise UserError(f"{path}: label values {listed} are not {expected}; they look like {others[0]} labels")
    raise UserError(f"{path}: label values {listed} fit no known label scheme (a mix of schemes, or other data); "
                    f"expected {expected}")


# ----------------------------------------------------------------------------- file names


@dataclass(frozen=True)
class ParsedName:
    subject: str
    role: str  # a canonical modality or "seg"
    naming: str  # "brats2021" or "brats2023"


def parse_name(name):
    """A BraTS file name's subject, role and naming; None for any other name."""
    base = os.path.basename(os.path.normpath(name))
    for naming, pattern in _NAME_PATTERNS.items():
        match = pattern.match(base)
        if match:
            role = match["role"] if match["role"] == "seg" else canonical_modality(match["role"])
            return ParsedName(match["subject"], role, naming)
    return None


def is_segmentation_name(name):
    """A label map by its name (<id>_seg, <id>-seg): never a scan."""
    parsed = parse_name(name)
    return parsed is not None and parsed.role == "seg"


def label_scheme_of(path):
    """The label scheme a label map's name (or its Decathlon labelsTr folder) implies; "" when none."""
    parsed = parse_name(path)
    if parsed is not None:
        return parsed.naming
    return "msd" if os.path.basename(os.path.dirname(os.path.abspath(path))) == "labelsTr" else ""


@dataclass(frozen=True)
class SubjectFolder:
    """A BraTS subject folder: the NIfTI files of one subject in one naming."""

    folder: str
    subject: str
    naming: str
    files: dict  # role -> sorted file names

    def path(self, role, why=""):
        """The one file of `role` (a canonical modality or "seg"); UserError naming the folder and the file."""
        hits = self.files.get(role, [])
        pattern = _file_pattern(self.naming, role)
        if not hits:
            name = "" if role == "seg" or self.naming == "brats2021" else f" ({role})"
            raise UserError(f"{self.folder}: no {pattern}{name} {why}".rstrip())
        if len(hits) > 1:
            raise UserError(f"{self.folder}: several {pattern} files ({', '.join(hits)})")
        return os.path.join(self.folder, hits[0])

    def has_modality(self):
        return any(role != "seg" for role in self.files)


def read_subject_folder(folder, several_subjects_ok=True):
    """The folder's BraTS files as a `SubjectFolder`, or None when it holds none, or (with
    `several_subjects_ok`) files of several subjects (a flat folder of scans).

    A folder whose files of one subject mix 2020/2021 and 2023 names is a UserError.
    """
    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    parsed = [(n, parse_name(n)) for n in names]
    parsed = [(n, p) for n, p in parsed if p is not None]
    if not parsed:
        return None
    subjects = sorted({p.subject for _, p in parsed})
    if len(subjects) > 1:
        if several_subjects_ok:
            return None
        raise UserError(f"{folder}: files of several subjects ({', '.join(subjects[:3])}); expected one folder "
                        f"per subject")
    namings = {p.naming: n for n, p in parsed}
    if len(namings) > 1:
        raise UserError(f"{folder}: mixes BraTS 2020/2021 file names ({namings['brats2021']}) and BraTS 2023 "
                        f"names ({namings['brats2023']}); a subject folder uses one naming")
    files = {}
    for name, p in parsed:
        files.setdefault(p.role, []).append(name)
    return SubjectFolder(folder, subjects[0], next(iter(namings)), files)


# ----------------------------------------------------------------------------- the Decathlon


def msd_channel_names(task_dir):
    """The canonical modality of each channel of a Decathlon task's 4-D images: from its dataset.json
    "modality" ({"0": "FLAIR", ...}) when present, else FLAIR, T1w, T1gd, T2w."""
    path = os.path.join(task_dir, "dataset.json")
    if not os.path.isfile(path):
        return MODALITIES
    try:
        with open(path) as f:
            modality = json.load(f).get("modality")
    except (OSError, ValueError, AttributeError) as err:
        raise UserError(f"{path}: cannot read the Decathlon task description ({type(err).__name__})") from None
    if not isinstance(modality, dict) or not modality:
        return MODALITIES
    try:
        order = sorted(modality, key=int)
    except ValueError:
        raise UserError(f"{path}: \"modality\" keys must be channel numbers, got {sorted(modality)}") from None
    names = tuple(canonical_modality(modality[k]) for k in order)
    if None in names or len(set(names)) != len(names):
        raise UserError(f"{path}: \"modality\" {[modality[k] for k in order]} are not distinct FLAIR, T1w, T1gd "
                        f"and T2w channels")
    return names


def _msd_channels(channel_names, modalities, where):
    missing = [m for m in modalities if m not in channel_names]
    if missing:
        raise UserError(f"{where}: the channels are {', '.join(channel_names)}; no {missing[0]} (--modality)")
    return tuple(channel_names.index(m) for m in modalities)


def _nifti_names(folder):
    return sorted(n for n in os.listdir(folder) if not n.startswith(".") and n.endswith(NIFTI_SUFFIXES))


def _stem(name):
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


def find_msd_cases(root, modalities):
    """The cases of a Decathlon task folder (imagesTr/ and labelsTr/)."""
    images_dir, labels_dir = os.path.join(root, "imagesTr"), os.path.join(root, "labelsTr")
    if not os.path.isdir(labels_dir):
        raise UserError(f"{labels_dir}: no such directory (a Decathlon task holds imagesTr/ and labelsTr/)")
    names = _nifti_names(images_dir)
    if not names:
        raise UserError(f"{images_dir}: no .nii.gz images")
    channels = _msd_channels(msd_channel_names(root), modalities, os.path.join(root, "dataset.json"))
    cases = []
    for name in names:
        seg = os.path.join(labels_dir, name)
        if not os.path.isfile(seg):
            raise UserError(f"{os.path.join(images_dir, name)}: no label file {seg}")
        image = os.path.join(images_dir, name)
        cases.append(VolumeCase(_stem(name), (image,) * len(channels), seg, channel_index=channels, scheme="msd"))
    return cases


# ----------------------------------------------------------------------------- whole data sets


def find_cases(root, modalities):
    """The subjects under `root` (the `--input_dir` of prepare_brats.py) in whichever layout it has; each
    case's scheme is its layout. Subject folders of both BraTS namings in one input are a UserError."""
    if not os.path.isdir(root):
        raise UserError(f"--input_dir {root}: no such directory")
    if os.path.isdir(os.path.join(root, "imagesTr")):
        return find_msd_cases(root, modalities)
    subjects = sorted(d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
    if not subjects:
        raise UserError(f"--input_dir {root}: no subject folders (expected one folder per subject with "
                        f"*_flair, *_t1, *_t1ce, *_t2, *_seg.nii.gz or *-t2f, *-t1n, *-t1c, *-t2w, *-seg.nii.gz, "
                        f"or a Decathlon task with imagesTr/ and labelsTr/)")
    cases, first_of = [], {}
    for subject in subjects:
        folder = os.path.join(root, subject)
        found = read_subject_folder(folder, several_subjects_ok=False)
        if found is None:
            raise UserError(f"{folder}: no *_{modalities[0]}.nii.gz or "
                            f"{_file_pattern('brats2023', modalities[0])} for subject {subject}")
        first_of.setdefault(found.naming, subject)
        if len(first_of) > 1:
            raise UserError(f"--input_dir {root}: mixes BraTS 2020/2021 subjects ({first_of['brats2021']}) and "
                            f"BraTS 2023 subjects ({first_of['brats2023']}), whose labels differ (ET is 4 or 3); "
                            f"prepare them separately")
        why = f"for subject {subject}"
        images = tuple(found.path(m, why) for m in modalities)
        cases.append(VolumeCase(subject, images, found.path("seg", why), scheme=found.naming))
    return cases


# ----------------------------------------------------------------------------- single scans


def _header_shape(path):
    try:
        return tuple(int(n) for n in nib.load(os.fspath(path)).shape)
    except Exception as err:  # nibabel and gzip raise many kinds for broken files
        text = str(err).strip().splitlines()
        raise UserError(f"{path}: cannot read NIfTI volume ({type(err).__name__}"
                        f"{': ' + text[0] if text else ''})") from None


def scan_channels(path, modalities):
    """How a NIfTI scan file holds the models' `modalities`: (channel_index, channel names) of a 4-D file whose
    channels include them (named by a Decathlon dataset.json beside its imagesTr/ or imagesTs/ folder, else
    the Decathlon order when it has four), or ((), ()) for any other file (3-D; the loader checks it)."""
    shape = _header_shape(path)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) <= 3:
        return (), ()
    folder = os.path.dirname(os.path.abspath(path))
    names = None
    if os.path.basename(folder) in ("imagesTr", "imagesTs"):
        names = msd_channel_names(os.path.dirname(folder))
    elif len(shape) == 4 and shape[3] == len(MODALITIES):
        names = MODALITIES
    if len(shape) == 4 and names is not None and len(names) == shape[3] and set(modalities) <= set(names):
        return tuple(names.index(m) for m in modalities), names
    raise UserError(f"{path}: expected a 3-D volume, or a 4-D one whose channels (the Decathlon's FLAIR, T1w, T1gd, "
                    f"T2w) include the models' {', '.join(modalities)}; got shape {shape}")


def msd_label_path(image_path):
    """labelsTr/<name> beside a Decathlon imagesTr/<name>, when it exists; else None."""
    folder = os.path.dirname(os.path.abspath(image_path))
    if os.path.basename(folder) != "imagesTr":
        return None
    label = os.path.join(os.path.dirname(folder), "labelsTr", os.path.basename(image_path))
    return label if os.path.isfile(label) else None
