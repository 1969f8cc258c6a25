"""Safe image loading for canonical samples: PNG/JPEG through PIL, DICOM through pydicom, NIfTI through nibabel.

Every image medtune reads (training, evaluation, serving uploads, ``data check``) comes through here, so the
guards live in one place:

* **Paths stay inside the dataset.** A sample's image path is relative to its image root; ``..`` escapes and
  absolute paths outside the root are refused unless the user allowed another root explicitly. Paths are judged
  lexically (after normalising ``..``) and the normalised path is what gets opened, so a record cannot walk out
  through ``..``; symlinks the user placed inside the root are followed.
* **Decompression bombs are refused before decoding.** ``Image.open`` reads only the header; the pixel count is
  compared with ``max_pixels`` before any pixel is decoded. PIL's own process-wide guard is switched off only
  for the header read (under a lock), so our error, naming the file, the size and the limit, is the one a user
  sees, and the caller chooses the limit. Several loads can share one budget (:func:`pixel_budget`: a server
  request's images), charged from each header. Compressed uploads are measured before they are inflated: a
  gzipped NIfTI from its header, then inflated no further than the header says; a deflated DICOM by counting
  its inflated size in bounded steps before pydicom inflates it whole.
* **Pixels only**: a loaded image carries no metadata (``info`` is emptied: JPEG comments, EXIF, ICC profiles,
  PNG text), so nothing a source file says about a person can be copied onward.
* **Every failure is an ImageError naming the file and a reason**, with a distinct reason for a missing file,
  an empty file, a file that is not an image, truncated data and an over-large image.
* **Always RGB out**, upright: an EXIF orientation (phone photos of skin or slides) is applied, as image
  viewers do. L/1/P/CMYK/YCbCr convert with PIL's standard conversions (CMYK without ICC colour management);
  anything with transparency (RGBA, LA, PA, P with a transparent colour) is composited on **white**, because
  medical figures with alpha are drawings on a page; 16-bit and float greyscale PNG/TIFF (I;16, I, F) are
  stretched from their own min/max to 0..255, the same rule as a DICOM without a window.
* A reference's ``frame`` picks a DICOM frame, a page of a multi-page TIFF/GIF, or the volume of a 4-D NIfTI;
  ``axis``/``slice`` on anything but NIfTI is an error (a data bug, not something to ignore).
* **DICOM**: modality LUT (rescale slope/intercept) first, then a VOI window: a named preset if the caller
  gives one, else the file's first WindowCenter/WindowWidth, else its first VOI LUT (output stretched), else
  the frame's min/max. MONOCHROME1 is inverted so that bright means dense everywhere. Multi-frame files decode
  only the requested frame. Colour DICOM passes through as RGB. Patient identifiers never leave this module:
  :func:`dicom_metadata` reads only whitelisted tags, pydicom's warnings (which can quote element values) are
  silenced while reading, and quoted values are removed from error messages.
* **Burned-in text is refused by default.** Patient names, MRNs and dates drawn into the pixels cannot be removed
  by filtering tags, so a DICOM object that says it has them (BurnedInAnnotation YES) or is of a kind that
  commonly does (secondary captures, ultrasound, modality OT/SC: see :func:`burned_in_reason`) raises
  :class:`BurnedInError` before any pixel is decoded, unless the caller passes ``allow_burned_in=True`` (the
  ``--allow-burned-in`` flag, which the commands that take it record in their report). Uploads to the serving
  verbs (:func:`image_from_bytes`) are accepted: they are shown to the person who sent them and not stored.
* **NIfTI**: one 2-D slice, read lazily from the volume. The axis (axial, coronal, sagittal) and slice index
  count in the closest canonical RAS+ orientation (slice 0 = most inferior / posterior / patient-left),
  default the middle axial slice; 4-D volumes use the volume ``frame`` names (default the first). Slices are
  shown in the radiological convention: superior (axial: anterior) up, patient right on the image left,
  sagittal anterior on the left. Windowing as for DICOM, with the header's cal_min/cal_max as the file's own
  window. Presets are in Hounsfield units, so they are meaningful for CT only.
* PNG/JPEG ignore ``window``: they are already display images.
* **Materialised files are named by content** (:func:`materialise`): a hash of the source's bytes and the frame,
  slice and window, never the source's file name, which may hold a patient's name or MRN.

pydicom and nibabel are the ``[dicom]`` extra and are imported only when such a file is opened.
"""
from __future__ import annotations

import contextlib
import contextvars
import gzip
import io
import math
import os
import re
import threading
import warnings
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps

from medtune.data.files import hash_file
from medtune.data.jsonl import atomic_open
from medtune.data.schema import ImageRef
from medtune.errors import UserError

# Large enough for whole-slide thumbnails and 7k x 7k scans, far below what would exhaust memory (RGB: 150 MB).
DEFAULT_MAX_PIXELS = 50_000_000

# (center, width) in Hounsfield units; common CT display windows as listed by Radiopaedia ("Windowing (CT)").
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (32.0, 8.0),
    "abdomen": (50.0, 400.0),
    "liver": (30.0, 150.0),
    "soft_tissue": (50.0, 400.0),
    "temporal_bone": (600.0, 2800.0),
}
# Not a preset: stretch the data's own min/max, ignoring any window stored in the file.
MINMAX = "minmax"

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Tags that may leave a DICOM file as metadata (keyword -> medtune name). Nothing that identifies a patient,
# an institution or a person, and no free-text descriptions (they often carry names).
DICOM_METADATA_TAGS = {
    "Modality": "modality",
    "BodyPartExamined": "body_part",
    "ViewPosition": "view",
    "ImageLaterality": "laterality",
    "Laterality": "laterality",
    "PatientPosition": "patient_position",
    "PhotometricInterpretation": "photometric",
    "Rows": "rows",
    "Columns": "columns",
    "NumberOfFrames": "frames",
    "BitsStored": "bits_stored",
    "PixelSpacing": "pixel_spacing",
    "SliceThickness": "slice_thickness",
}
# DICOM objects whose pixels commonly carry burned-in text, whatever their optional BurnedInAnnotation says
# (DICOM PS3.15 Annex E: the Clean Pixel Data option exists for these): screen and document captures, and
# ultrasound, whose scanners write the patient's details into the image. Retired ultrasound UIDs are still
# common in archives.
BURNED_IN_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.1": "Multi-frame Single Bit Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.6.1": "Ultrasound",
    "1.2.840.10008.5.1.4.1.1.3.1": "Ultrasound Multi-frame",
    "1.2.840.10008.5.1.4.1.1.6": "Ultrasound (retired)",
    "1.2.840.10008.5.1.4.1.1.3": "Ultrasound Multi-frame (retired)",
}
BURNED_IN_MODALITIES = {"US": "ultrasound", "OT": "other, usually a screen capture", "SC": "secondary capture"}
_BURNED_IN_TAGS = ["BurnedInAnnotation", "SOPClassUID", "Modality"]
_EXIF_ORIENTATION = 0x0112
_KIND_NAMES = {"dicom": "a DICOM file", "nifti": "a NIfTI volume", "pil": "a 2-D image"}
_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}  # axis name -> RAS+ axis it is perpendicular to


class ImageError(ValueError):
    """An image cannot be used: ``file`` says which, ``reason`` says why (no patient data in either)."""

    def __init__(self, file: str | os.PathLike, reason: str):
        self.file, self.reason = str(file), reason
        super().__init__(f"{self.file}: {reason}")


class BurnedInError(ImageError):
    """A DICOM image that may show patient identifiers in its pixels, refused unless burned-in text is allowed."""

    def __init__(self, file: str | os.PathLike, why: str):
        super().__init__(file, f"may show burned-in patient text ({why}), which removing tags cannot clean, so it "
                               "is refused; check the images and pass --allow-burned-in to use them anyway (the "
                               "report records it)")
        self.why = why


class WindowError(ValueError):
    """An unknown window preset name."""


class ImageRootError(UserError, ValueError):
    """An image root that does not exist: named once, before any record would report its images missing."""


def require_image_root(root: str | os.PathLike, what: str = "image root") -> Path:
    """``root`` when it is an existing folder; else one error naming it."""
    root = Path(root)
    if not root.is_dir():
        state = "is a file, not a folder" if root.exists() else "does not exist"
        raise ImageRootError(f"{what} {root} {state}, so no image under it can be found (pass --image-root DIR, "
                             "or image_root in a recipe)")
    return root


# --------------------------------------------------------------------------------------------------- paths

def resolve_image_path(path: str, root: str | os.PathLike, allowed_roots: Iterable[str | os.PathLike] = ()
                       ) -> Path:
    """The file an image path names, refusing anything outside ``root`` and ``allowed_roots``.

    Relative paths are joined to ``root``; absolute paths are taken as they are. Either way the normalised
    path must lie inside one of the roots. The normalised path is returned (and should be opened), so
    ``a/../b`` can never resolve differently through a symlink ``a``.
    """
    if not isinstance(path, str) or not path or "\0" in path:
        raise ImageError(repr(path), "image path must be a non-empty string without NUL bytes")
    root = os.path.abspath(root)
    candidate = Path(os.path.normpath(path if os.path.isabs(path) else os.path.join(root, path)))
    roots = [Path(root)] + [Path(os.path.abspath(r)) for r in allowed_roots]
    if not any(candidate == r or r in candidate.parents for r in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise ImageError(path, f"path is outside the image root ({allowed}); "
                               "use --allow-root DIR to allow another folder")
    return candidate


def _image_kind(path: Path, head: bytes) -> str:
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(DICOM_SUFFIXES) or head[128:132] == b"DICM":
        return "dicom"
    return "pil"


# ------------------------------------------------------------------------------------------------ loading

def load_image(ref: ImageRef | str, root: str | os.PathLike, *, allowed_roots: Iterable = (),
               window: str | Sequence[float] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
               allow_burned_in: bool = False) -> Image.Image:
    """Load the image a reference names as an RGB PIL image (see the module docstring for every rule)."""
    ref = ImageRef(ref) if isinstance(ref, str) else ref
    path = resolve_image_path(ref.path, root, allowed_roots)
    window_bounds(window)  # an unknown preset is the caller's mistake, reported before touching the file
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except OSError as error:
        raise ImageError(path, f"cannot read the file ({error.strerror})") from None
    if path.is_dir():
        raise ImageError(path, "is a folder, not an image file")
    if size == 0:
        raise ImageError(path, "empty file (0 bytes)")
    with open(path, "rb") as handle:
        head = handle.read(132)
    kind = _image_kind(path, head)
    if kind != "nifti" and (ref.axis is not None or ref.slice is not None):
        raise ImageError(path, f"axis/slice apply only to NIfTI volumes, and this is {_KIND_NAMES[kind]}")
    if kind == "dicom":
        return _load_dicom(path, ref.frame, window, max_pixels, allow_burned_in=allow_burned_in)
    if kind == "nifti":
        return _load_nifti(path, ref.axis, ref.slice, window, max_pixels, volume_index=ref.frame)
    return _load_pil(path, path, max_pixels, frame=ref.frame)


def image_from_bytes(data: bytes, *, name: str = "upload", window: str | Sequence[float] | None = None,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load an uploaded file (PNG/JPEG/…, DICOM, NIfTI or gzipped NIfTI) with the same limits as files.

    ``name`` only appears in error messages (and its suffix helps recognise DICOM without a preamble).
    DICOM gives its first frame; NIfTI its middle axial slice.
    """
    window_bounds(window)
    if not data:
        raise ImageError(name, "empty file (0 bytes)")
    lowered = name.lower()
    if data[:2] == b"\x1f\x8b" or lowered.endswith(NIFTI_SUFFIXES):
        return _load_nifti(_nifti_from_bytes(data, name, max_pixels), None, None, window, max_pixels, name=name)
    if data[128:132] == b"DICM" or lowered.endswith(DICOM_SUFFIXES):
        _check_deflated_dicom(data, name, max_pixels)
        return _load_dicom(io.BytesIO(data), None, window, max_pixels, name=name, allow_burned_in=True)
    return _load_pil(io.BytesIO(data), name, max_pixels)


_PIL_GUARD_LOCK = threading.Lock()


@contextlib.contextmanager
def _pil_guard_off():
    """Switch PIL's global decompression-bomb guard off while a header is read; our own check follows.

    PIL raises for images over twice its global limit inside ``Image.open``, with no file name and a limit
    the caller cannot choose per call. The lock keeps concurrent medtune loads from restoring each other's value.
    """
    with _PIL_GUARD_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _check_pixels(name, width: int, height: int, max_pixels: int, what: str = "image") -> None:
    if width * height > max_pixels:
        raise ImageError(name, f"{what} is {width}x{height} = {width * height:,} pixels, over the limit of "
                               f"{max_pixels:,} (possible decompression bomb; raise max_pixels to allow it)")
    _charge_budget(name, width * height, f"{what} of {width}x{height}")


class PixelBudget:
    """Pixels that several images decoded together may have in all (a server request's images). Each header's
    count is charged before its pixels are decoded; a NIfTI upload is charged its whole volume, which is inflated
    to read a slice. Set with :func:`pixel_budget` around the loads it covers."""

    def __init__(self, limit: int, label: str):
        self.limit, self.label, self.used = limit, label, 0

    def charge(self, name, pixels: int, what: str) -> None:
        if self.used + pixels > self.limit:
            before = f" with the {self.used:,} decoded before it" if self.used else ""
            raise ImageError(name, f"{what} = {pixels:,} pixels{before} is over {self.label} of {self.limit:,} "
                                   "pixels")
        self.used += pixels


# The budget of the loads running in this context (a thread serving one request), if any: passed this way rather
# than through every loader's signature.
_BUDGET: contextvars.ContextVar[PixelBudget | None] = contextvars.ContextVar("medtune_pixel_budget", default=None)


@contextlib.contextmanager
def pixel_budget(limit: int, label: str):
    """Charge every image loaded inside the block to one :class:`PixelBudget` of ``limit`` pixels; ``label``
    names the limit in the error (e.g. "this server's limit per request")."""
    token = _BUDGET.set(PixelBudget(limit, label))
    try:
        yield _BUDGET.get()
    finally:
        _BUDGET.reset(token)


def _charge_budget(name, pixels: int, what: str) -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.charge(name, pixels, what)


def _load_pil(source, name, max_pixels: int, frame: int | None = None) -> Image.Image:
    try:
        with _pil_guard_off():
            image = Image.open(source)
    except Image.UnidentifiedImageError:
        raise ImageError(name, "not an image file (PIL does not recognise the format)") from None
    except Exception as error:  # plugins raise OSError, SyntaxError, struct.error, ... on hostile headers
        raise ImageError(name, f"corrupt image header ({type(error).__name__}: {_clean(error)})") from None
    with image:
        if frame:  # multi-page TIFF / animated GIF: the page named by the reference's frame
            pages = getattr(image, "n_frames", 1)
            if frame >= pages:
                raise ImageError(name, f"frame {frame} out of range (the file has {pages} frame{'s' * (pages > 1)})")
            image.seek(frame)
        _check_pixels(name, *image.size, max_pixels)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image.load()
        except Image.DecompressionBombError as error:  # frames of animated formats are checked again by PIL
            raise ImageError(name, f"over PIL's own pixel limit ({_clean(error)})") from None
        except Exception as error:  # decoders of untrusted data raise many types; a bad file must not crash a run
            raise ImageError(name, f"truncated or corrupt image data ({_clean(error)})") from None
        if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:  # camera photos: show them as viewers do
            image = ImageOps.exif_transpose(image)
        rgb = to_rgb(image)
    # Pixels only: comments, EXIF, ICC profiles and text chunks (which may name a person) stay behind, so no
    # later writer (materialise, a cache, an upload log) can copy them.
    rgb.info = {}
    return rgb


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB by the module's documented rules (alpha on white, 16-bit min/max)."""
    if image.mode == "RGB":
        return image.copy()
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        return _grey_to_rgb(_window_to_uint8(values, _minmax_window(values)))
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(grey), mode="L").convert("RGB")


def _clean(error: BaseException) -> str:
    """An exception's message without quoted values (which, for DICOM, could be a patient's name)."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", str(error)) or type(error).__name__
    return text[:200]


# ---------------------------------------------------------------------------------------------- windowing

def window_bounds(window: str | Sequence[float] | None) -> tuple[float, float] | str | None:
    """A preset name or (center, width) -> (center, width); None and "minmax" pass through. Unknown: WindowError."""
    if window is None or window == MINMAX:
        return window
    if isinstance(window, str):
        key = window.strip().lower().replace("-", "_").replace(" ", "_")
        if key not in WINDOW_PRESETS:
            raise WindowError(f"unknown window preset {window!r} (known: {', '.join(WINDOW_PRESETS)}, {MINMAX})")
        return WINDOW_PRESETS[key]
    center, width = (float(v) for v in window)
    if width <= 0:
        raise WindowError(f"window width must be positive, got {width}")
    return center, width


def _minmax_window(values: np.ndarray) -> tuple[float, float]:
    low, high = float(np.min(values)), float(np.max(values))
    return (low + high) / 2, max(high - low, 1e-6)


def _window_to_uint8(values: np.ndarray, center_width: tuple[float, float]) -> np.ndarray:
    """Linear VOI window: center - width/2 -> 0, center + width/2 -> 255, clipped outside."""
    center, width = center_width
    low = center - width / 2
    scaled = (values.astype(np.float64) - low) * 255.0 / width
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _choose_window(window, file_window: tuple[float, float] | None, values: np.ndarray) -> tuple[float, float]:
    """Caller's preset beats the file's window, which beats the data's own min/max."""
    bounds = window_bounds(window)
    if isinstance(bounds, tuple):
        return bounds
    if bounds is None and file_window is not None:
        return file_window
    return _minmax_window(values)


# -------------------------------------------------------------------------------------------------- DICOM

def _import_pydicom():
    try:
        import pydicom
        import pydicom.pixels
    except ImportError:
        raise ImportError("reading DICOM needs pydicom: pip install 'medtune[dicom]'") from None
    return pydicom


@contextlib.contextmanager
def _quiet_pydicom():
    # pydicom's validation warnings quote element values, and an invalid PatientName would be quoted too.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _read_dicom(source, name, pydicom, **options):
    try:
        with _quiet_pydicom():
            return pydicom.dcmread(source, **options)
    except pydicom.errors.InvalidDicomError:
        raise ImageError(name, "not a DICOM file (no DICM preamble or readable DICOM header)") from None
    except (OSError, ValueError, EOFError, KeyError, TypeError, AttributeError) as error:
        raise ImageError(name, f"unreadable DICOM header ({type(error).__name__}: {_clean(error)})") from None


def _check_deflated_dicom(data: bytes, name: str, max_pixels: int) -> None:
    """pydicom inflates a deflated DICOM's whole dataset in one call, without a limit (a few MB can inflate to
    gigabytes): count what it would inflate, in bounded steps, and refuse more than 16 bytes per allowed pixel, or
    than the budget of :func:`pixel_budget` (charged a pixel per 2 bytes, a 16-bit pixel), before pydicom reads
    it."""
    pydicom = _import_pydicom()
    # pydicom's reader of the file meta group (what comes before the deflated part) is private: taken outside the
    # try below, where a pydicom without it would pass silently and let the bomb through
    read_file_meta = pydicom.filereader._read_file_meta_info
    source = io.BytesIO(data)
    try:
        with _quiet_pydicom():
            pydicom.filereader.read_preamble(source, False)
            meta = read_file_meta(source)
    except Exception:  # no preamble or an unreadable meta group: pydicom reads it as plain, or refuses it later
        return
    if meta.get("TransferSyntaxUID") != pydicom.uid.DeflatedExplicitVRLittleEndian:
        return
    limit, budget = 16 * max_pixels, _BUDGET.get()
    counted = limit if budget is None else min(limit, 2 * (budget.limit - budget.used))   # past it, refused
    inflated, inflater, pending = 0, zlib.decompressobj(-zlib.MAX_WBITS), data[source.tell():]
    try:
        while not inflater.eof and inflated <= counted:
            out = inflater.decompress(pending, 1 << 20)
            pending = inflater.unconsumed_tail
            if not out and not pending:   # truncated: pydicom will say so
                break
            inflated += len(out)
    except zlib.error as error:
        raise ImageError(name, f"corrupt deflated DICOM data ({_clean(error)})") from None
    if inflated > limit:
        raise ImageError(name, f"deflated DICOM dataset inflates to over {limit:,} bytes (16 bytes per allowed "
                               "pixel; raise max_pixels to allow it)")
    size = f"{inflated:,}" if inflater.eof else f"over {inflated:,}"
    _charge_budget(name, inflated // 2, f"deflated DICOM dataset of {size} bytes (a pixel per 2 bytes)")


def burned_in_reason(dataset) -> str | None:
    """Why a DICOM dataset may show burned-in text (see BURNED_IN_SOP_CLASSES), or None. No element value that
    could identify anyone is quoted: only the flag, the SOP class and the modality."""
    if str(dataset.get("BurnedInAnnotation", "") or "").strip().upper() == "YES":
        return "BurnedInAnnotation is YES"
    meta = getattr(dataset, "file_meta", None)
    sop = str(dataset.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else "") or "")
    if sop in BURNED_IN_SOP_CLASSES:
        return f"a {BURNED_IN_SOP_CLASSES[sop]} object"
    modality = str(dataset.get("Modality", "") or "").strip().upper()
    if modality in BURNED_IN_MODALITIES:
        return f"modality {modality}: {BURNED_IN_MODALITIES[modality]}"
    return None


def refuse_burned_in(path: str | os.PathLike) -> None:
    """Raise :class:`BurnedInError` when the DICOM file at ``path`` may show burned-in text (header only)."""
    pydicom = _import_pydicom()
    dataset = _read_dicom(path, path, pydicom, stop_before_pixels=True, specific_tags=_BURNED_IN_TAGS)
    reason = burned_in_reason(dataset)
    if reason is not None:
        raise BurnedInError(path, reason)


def _load_dicom(source, frame: int | None, window, max_pixels: int, *, name=None,
                allow_burned_in: bool = False) -> Image.Image:
    pydicom = _import_pydicom()
    name = name if name is not None else source
    dataset = _read_dicom(source, name, pydicom)
    reason = None if allow_burned_in else burned_in_reason(dataset)
    if reason is not None:
        raise BurnedInError(name, reason)
    if "PixelData" not in dataset and "FloatPixelData" not in dataset and "DoubleFloatPixelData" not in dataset:
        raise ImageError(name, "DICOM file has no pixel data (not an image object)")
    rows, columns = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
    _check_pixels(name, columns, rows, max_pixels, what="DICOM frame")
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    index = frame or 0
    if index >= frames:
        raise ImageError(name, f"frame {index} out of range (the file has {frames} frame{'s' * (frames > 1)})")
    try:
        with _quiet_pydicom():
            pixels = pydicom.pixels.pixel_array(dataset, index=index if frames > 1 else None)
    except Exception as error:  # decoders raise many types; none of them is ours to let through
        raise ImageError(name, f"DICOM pixel data cannot be decoded ({type(error).__name__}: {_clean(error)})"
                         ) from None
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        pixels = pydicom.pixels.apply_color_lut(pixels, dataset)
    if pixels.ndim == 3:  # colour (RGB / YBR already converted to RGB by pydicom)
        return Image.fromarray(_colour_to_uint8(pixels, int(dataset.get("BitsStored", 8) or 8)), mode="RGB")
    values = pydicom.pixels.apply_modality_lut(pixels, dataset)
    file_window = _dicom_window(dataset)
    if window is None and file_window is None and "VOILUTSequence" in dataset:
        # A lookup table instead of a window (common in CR/DX): apply its first table, then stretch its output.
        values = pydicom.pixels.apply_voi(values, dataset, index=0)
    values = np.asarray(values, dtype=np.float64)
    grey = _window_to_uint8(values, _choose_window(window, file_window, values))
    if photometric == "MONOCHROME1":  # low values are bright in MONOCHROME1
        grey = 255 - grey
    return _grey_to_rgb(grey)


def _colour_to_uint8(pixels: np.ndarray, bits_stored: int) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    return np.clip(np.rint(pixels.astype(np.float64) * (255.0 / (2 ** bits_stored - 1))), 0, 255).astype(np.uint8)


def _dicom_window(dataset) -> tuple[float, float] | None:
    """The file's first (WindowCenter, WindowWidth) pair, or None when absent or unusable."""
    center, width = dataset.get("WindowCenter"), dataset.get("WindowWidth")
    if center is None or width is None or center == "" or width == "":
        return None
    first = lambda v: float(v[0] if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" else v)
    try:
        center, width = first(center), first(width)
    except (TypeError, ValueError, IndexError):
        return None
    return (center, width) if width > 0 else None


def dicom_metadata(path: str | os.PathLike) -> dict:
    """Whitelisted, non-identifying tags of a DICOM file (see DICOM_METADATA_TAGS); nothing else is read."""
    pydicom = _import_pydicom()
    dataset = _read_dicom(path, path, pydicom, stop_before_pixels=True, specific_tags=list(DICOM_METADATA_TAGS))
    out = {}
    for keyword, key in DICOM_METADATA_TAGS.items():
        value = dataset.get(keyword)
        if value is None or value == "" or key in out:
            continue
        if type(value).__name__ == "MultiValue" or isinstance(value, (list, tuple)):
            out[key] = [float(v) for v in value]
        elif isinstance(value, (int, float)):
            out[key] = int(value) if float(value).is_integer() else float(value)
        else:
            out[key] = str(value)
    return out


# -------------------------------------------------------------------------------------------------- NIfTI

def _import_nibabel():
    try:
        import nibabel
    except ImportError:
        raise ImportError("reading NIfTI needs nibabel: pip install 'medtune[dicom]'") from None
    return nibabel


def _nifti_from_bytes(data: bytes, name: str, max_pixels: int):
    """A NIfTI-1 image over uploaded bytes. A gzipped upload is inflated as a stream, only as far as its header
    says the volume goes, once that size has passed the limits (16 bytes per allowed pixel, and the budget of
    :func:`pixel_budget`): a few hundred kilobytes of gzip can inflate to gigabytes."""
    nibabel = _import_nibabel()
    compressed = data[:2] == b"\x1f\x8b"
    stream = gzip.GzipFile(fileobj=io.BytesIO(data)) if compressed else io.BytesIO(data)
    try:
        with stream:
            head = stream.read(nibabel.Nifti1Header.template_dtype.itemsize)
            try:
                header = nibabel.Nifti1Header.from_fileobj(io.BytesIO(head), check=True)
                shape, voxels = header.get_data_shape(), math.prod(header.get_data_shape())
                size = voxels * header.get_data_dtype().itemsize
                end = int(header.get_data_offset()) + size
            except Exception as error:  # nibabel raises several types for a bad header
                raise ImageError(name, f"not a readable NIfTI-1 volume ({type(error).__name__}: {_clean(error)})"
                                 ) from None
            if size > 16 * max_pixels:
                raise ImageError(name, f"NIfTI volume data is {size:,} bytes, over {16 * max_pixels:,} (16 bytes "
                                       "per allowed pixel; raise max_pixels to allow it)")
            _charge_budget(name, voxels, f"NIfTI volume of {'x'.join(map(str, shape))}")
            if compressed:   # inflated again from the start, into one buffer no longer than the header promises
                stream.seek(0)
                data = stream.read(max(end, 0))
    except (OSError, EOFError, zlib.error) as error:
        raise ImageError(name, f"truncated or corrupt gzip data ({_clean(error)})") from None
    if len(data) < end:
        raise ImageError(name, f"truncated NIfTI volume ({len(data):,} of {end:,} bytes)")
    try:
        return nibabel.Nifti1Image.from_bytes(data)
    except Exception as error:  # nibabel raises several types for a bad header
        raise ImageError(name, f"not a readable NIfTI-1 volume ({type(error).__name__}: {_clean(error)})") from None


def _load_nifti(source, axis: str | None, slice_index: int | None, window, max_pixels: int, *,
                volume_index: int | None = None, name=None) -> Image.Image:
    nibabel = _import_nibabel()
    name = name if name is not None else source
    if isinstance(source, (str, Path)):
        try:
            volume = nibabel.load(str(source))
        except Exception as error:  # ImageFileError, ValueError, OSError, gzip errors ...
            raise ImageError(name, f"not a readable NIfTI volume ({type(error).__name__}: {_clean(error)})"
                             ) from None
    else:
        volume = source
    plane = _nifti_plane(volume, axis or "axial", slice_index, volume_index or 0, name, max_pixels)
    header_window = _nifti_cal_window(volume)
    return _grey_to_rgb(_window_to_uint8(plane, _choose_window(window, header_window, plane)))


def _nifti_plane(volume, axis: str, slice_index: int | None, volume_index: int, name, max_pixels: int
                 ) -> np.ndarray:
    """One 2-D slice (rows x columns, display orientation) read lazily from a 3-D or 4-D volume."""
    nibabel = _import_nibabel()
    shape = volume.shape
    if len(shape) < 3:
        raise ImageError(name, f"NIfTI data has {len(shape)} dimensions; a volume needs 3 or 4")
    volumes = shape[3] if len(shape) > 3 else 1
    if volume_index >= volumes:
        raise ImageError(name, f"frame {volume_index} out of range (the file has {volumes} volume"
                               f"{'s' * (volumes > 1)} in its 4th dimension)")
    orientation = nibabel.orientations.io_orientation(volume.affine)  # per array axis: (RAS axis, +1/-1)
    array_axis = int(np.flatnonzero(orientation[:3, 0] == _AXES[axis])[0])
    other = [a for a in range(3) if a != array_axis]
    _check_pixels(name, shape[other[1]], shape[other[0]], max_pixels, what=f"{axis} slice")
    if shape[other[0]] * shape[other[1]] == 0:
        raise ImageError(name, f"{axis} slice is empty (the volume's shape is {'x'.join(map(str, shape))})")
    count = shape[array_axis]
    position = count // 2 if slice_index is None else slice_index
    if position >= count:
        raise ImageError(name, f"{axis} slice {position} out of range (the volume has {count})")
    array_position = position if orientation[array_axis, 1] > 0 else count - 1 - position
    index = [slice(None)] * 3 + [volume_index] * (len(shape) > 3) + [0] * (len(shape) - 4)
    index[array_axis] = array_position
    try:
        plane = np.asarray(volume.dataobj[tuple(index)], dtype=np.float64)
    except Exception as error:
        raise ImageError(name, f"NIfTI voxel data cannot be read ({type(error).__name__}: {_clean(error)})"
                         ) from None
    _require_finite(plane, name, f"{axis} slice {position}")
    # Put the two remaining axes in RAS order, each increasing towards R/A/S, then show it radiologically.
    if orientation[other[0], 0] > orientation[other[1], 0]:
        plane, other = plane.T, other[::-1]
    for dim, array_dim in enumerate(other):
        if orientation[array_dim, 1] < 0:
            plane = np.flip(plane, axis=dim)
    return np.ascontiguousarray(plane.T[::-1, ::-1])


def _require_finite(values: np.ndarray, name, what: str) -> None:
    """Refuse NaN or infinite values: the window would turn the slice black (all NaN) or spread them as 0s
    among real intensities (some NaN), and either would be trained on or shown as if it were an image."""
    bad = values.size - int(np.count_nonzero(np.isfinite(values)))
    if bad:
        share = "all" if bad == values.size else f"{bad:,} of {values.size:,} ({100 * bad / values.size:.1f}%)"
        raise ImageError(name, f"{what} has {share} of its values NaN or infinite; replace them (or choose "
                               "another slice) before using the volume")


def _nifti_cal_window(volume) -> tuple[float, float] | None:
    low, high = float(volume.header.get("cal_min", 0)), float(volume.header.get("cal_max", 0))
    return ((low + high) / 2, high - low) if high > low else None


# ------------------------------------------------------------------------------------------- materialising

def materialise(ref: ImageRef, root: str | os.PathLike, out_dir: str | os.PathLike, *,
                window: str | Sequence[float] | None = None, allowed_roots: Iterable = (),
                allow_burned_in: bool = False) -> ImageRef:
    """Write the image a reference names as a PNG in ``out_dir``; return a reference relative to ``out_dir``.

    The name is a hash of the source file's bytes and of (frame, axis, slice, window): never the source's name,
    which may hold a patient's name or MRN. The same image always lands in the same file (however many paths
    name it) and an existing file is reused; burned-in text is refused on reuse as on first writing. The PNG
    holds pixels only: no text chunks or other metadata travel from the source.
    """
    ref = ImageRef(ref) if isinstance(ref, str) else ref
    allowed_roots = tuple(allowed_roots)
    source = resolve_image_path(ref.path, root, allowed_roots)
    out = Path(out_dir) / f"{_content_key(source, ref, window)}.png"
    if not out.exists():
        image = load_image(ref, root, allowed_roots=allowed_roots, window=window, allow_burned_in=allow_burned_in)
        with atomic_open(out, "wb") as handle:
            image.save(handle, format="PNG")
    elif not allow_burned_in and _image_kind(source, _head(source)) == "dicom":
        refuse_burned_in(source)
    return ImageRef(out.name)


def _content_key(source: Path, ref: ImageRef, window) -> str:
    """SHA-256 (first 128 bits, hex) of the file's bytes and the selection that makes it one 2-D image."""
    try:
        digest = hash_file(source)
    except FileNotFoundError:
        raise ImageError(source, "file not found") from None
    except OSError as error:
        raise ImageError(source, f"cannot read the file ({error.strerror})") from None
    digest.update("|".join(str(v) for v in (ref.frame, ref.axis, ref.slice, window)).encode("utf-8"))
    return digest.hexdigest()[:32]


def _head(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(132)
